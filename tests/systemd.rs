//! systemd: readiness notification, socket activation, and the units in contrib/systemd.
//!
//! * With `$NOTIFY_SOCKET`, vubd sends `READY=1` once every socket listens (a client may
//!   connect at once) and `STOPPING=1` when it shuts down.
//! * Under `systemd-socket-activate` (systemd's own tool for the `LISTEN_FDS` protocol), vubd
//!   serves on the vhost-user and control sockets it is handed, starts on the first
//!   connection, and leaves them in place when it exits (they are the manager's).
//! * `systemd-analyze verify` passes on the units: the per-disk templates and the many-disk
//!   `vubd.service` (man pages come with the package; `--man=no` here).

mod common;

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::blkio_client::BlkioClient;
use common::qmp::Qmp;
use common::{create_image, vubd_bin, TempDir};

fn recv_state(manager: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = manager
        .recv(&mut buf)
        .expect("a notification within the deadline");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn sigterm(child: &mut Child) -> std::process::ExitStatus {
    // SAFETY: kill() on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "vubd did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ready_is_notified_once_every_socket_listens() {
    let dir = TempDir::new("sd-notify");
    let image = dir.join("disk.raw");
    create_image(&image, 1 << 20, 7);
    let notify = dir.join("notify.sock");
    let manager = UnixDatagram::bind(&notify).expect("bind the notify socket");
    manager
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let (socket, control, metrics) = (
        dir.join("vubd.sock"),
        dir.join("qmp.sock"),
        dir.join("metrics.sock"),
    );
    let mut vubd = Command::new(vubd_bin())
        .args(["serve", "--image", image.to_str().unwrap(), "--socket"])
        .arg(&socket)
        .arg("--control")
        .arg(&control)
        .arg("--metrics")
        .arg(format!("unix:{}", metrics.display()))
        .env("NOTIFY_SOCKET", &notify)
        .stderr(Stdio::null())
        .spawn()
        .expect("start vubd");
    let ready = recv_state(&manager);
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    assert!(ready.contains("STATUS=serving"), "{ready}");
    // Ready means listening: every socket takes a client now, no retry.
    for path in [&socket, &control, &metrics] {
        UnixStream::connect(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
    let status = sigterm(&mut vubd);
    assert!(status.success(), "{status:?}");
    assert_eq!(recv_state(&manager), "STOPPING=1");
}

/// Wait until something listens at `path`.
fn wait_listening(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn socket_activation_serves_on_the_sockets_systemd_passes() {
    let dir = TempDir::new("sd-activate");
    let image = dir.join("disk.raw");
    let model = create_image(&image, 1 << 20, 9);
    let (socket, control) = (dir.join("vubd.sock"), dir.join("qmp.sock"));
    // systemd-socket-activate creates both sockets, then starts vubd (passing them as
    // descriptors 3 and 4) when the first client connects.
    let mut activator = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&socket)
        .arg("-l")
        .arg(&control)
        .arg(vubd_bin())
        .args(["serve", "--image", image.to_str().unwrap(), "--socket"])
        .arg(&socket)
        .arg("--control")
        .arg(&control)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start systemd-socket-activate (Debian: systemd)");
    wait_listening(&socket);
    wait_listening(&control);

    // The first connection starts vubd, which then serves it.
    let mut client = BlkioClient::connect(&socket, 1).expect("libblkio on the activated socket");
    assert_eq!(client.read(0, 0, 4096).expect("read"), model[..4096]);
    client.write(0, 8192, &[0xab; 4096]).expect("write");
    drop(client);
    let mut qmp = Qmp::connect(&control);
    let blockstats = qmp.ok("query-blockstats", serde_json::json!({}));
    assert_eq!(blockstats[0]["stats"]["wr_operations"], 1, "{blockstats}");
    drop(qmp);

    // vubd runs as the activator's process (it execs); SIGTERM ends it cleanly, and the
    // sockets stay: they are the manager's, for the next start.
    let status = sigterm(&mut activator);
    let mut stderr = String::new();
    if let Some(mut e) = activator.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(!stderr.contains("already served"), "{stderr}");
    assert!(
        socket.exists() && control.exists(),
        "activated sockets are left in place"
    );
    let disk = std::fs::read(&image).unwrap();
    assert_eq!(&disk[8192..12288], &[0xab; 4096][..]);
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    let dir = TempDir::new("sd-verify");
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd");
    // The instance of each template, with the binary and config where this test has them.
    let conf = dir.join("demo.conf");
    std::fs::write(
        &conf,
        "VUBD_ARGS=--image /var/lib/vubd/demo/meta.qcow2 --format qcow2\n",
    )
    .unwrap();
    let mut paths = Vec::new();
    for (template, instance) in [
        ("vubd@.service", "vubd@demo.service"),
        ("vubd@.socket", "vubd@demo.socket"),
        ("vubd.service", "vubd.service"),
    ] {
        let text = std::fs::read_to_string(units.join(template)).expect(template);
        let text = text
            .replace("/usr/bin/vubd", vubd_bin())
            .replace("/etc/vubd/%i.conf", conf.to_str().unwrap())
            .replace("/etc/vubd/vubd.conf", conf.to_str().unwrap());
        let path = dir.join(instance);
        std::fs::write(&path, text).unwrap();
        paths.push(path);
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&paths)
        .output()
        .expect("systemd-analyze (Debian: systemd)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The example config is what the service reads.
    let example = std::fs::read_to_string(units.join("vubd.conf.example")).unwrap();
    assert!(example.lines().any(|l| l.starts_with("VUBD_ARGS=")));
}
