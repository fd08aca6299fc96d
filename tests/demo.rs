//! `make run` (scripts/run-demo.sh): the mission's graph on a demo disk — a raw file adopted
//! by qcow2 metadata with a persistent bitmap, a QMP socket and a metrics endpoint — and the
//! commands it prints work as printed.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::blkio_client::BlkioClient;
use common::{vubd_bin, TempDir};

fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(path).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never listened",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `scripts/qmp SOCKET COMMAND`: its output.
fn qmp(socket: &Path, command: &str) -> String {
    let out = Command::new("scripts/qmp")
        .arg(socket)
        .arg(command)
        .output()
        .expect("run scripts/qmp");
    assert!(out.status.success(), "scripts/qmp {command}: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn make_run_serves_the_mission_graph_with_what_it_prints() {
    let dir = TempDir::new("demo");
    let demo = dir.join("demo");
    let mut child = Command::new("scripts/run-demo.sh")
        .env("DEMO_DIR", &demo)
        .env("VUBD", vubd_bin())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start scripts/run-demo.sh");
    let sock = demo.join("vubd.sock");
    let qmp_sock = demo.join("qmp.sock");
    let metrics = demo.join("metrics.sock");
    wait_for_socket(&sock);
    wait_for_socket(&qmp_sock);
    wait_for_socket(&metrics);

    // The data file is the raw disk, the bitmap records; a write shows in it.
    let mut client = BlkioClient::connect(&sock, 2).expect("libblkio connect");
    client.write(0, 1 << 20, &[0x5a; 65536]).expect("write");
    drop(client);
    let block = qmp(&qmp_sock, r#"{"execute": "query-block"}"#);
    assert!(block.contains("\"since-create\""), "{block}");
    assert!(block.contains("\"count\": 65536"), "{block}");
    assert!(block.contains("\"drv\": \"qcow2\""), "{block}");
    let stats = qmp(&qmp_sock, r#"{"execute": "query-blockstats"}"#);
    assert!(stats.contains("\"wr_operations\": 1"), "{stats}");
    let mut http = UnixStream::connect(&metrics).expect("metrics");
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: vubd\r\n\r\n")
        .expect("request");
    let mut page = String::new();
    http.read_to_string(&mut page).expect("response");
    assert!(page.contains("vubd_bitmap_dirty_bytes{export=\"disk\",bitmap=\"since-create\"} 65536"));
    let raw = std::fs::read(demo.join("disk.raw")).expect("disk.raw");
    assert_eq!(
        &raw[1 << 20..(1 << 20) + 65536],
        &[0x5a; 65536][..],
        "data stays in disk.raw"
    );

    // SAFETY: kill() on our own child's pid (the script execs vubd).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    assert!(status.success(), "vubd exits 0 on SIGTERM: {status:?}");
    let mut printed = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut printed)
        .expect("read stdout");
    // What it printed names these sockets and the commands shown above.
    for needle in [
        sock.to_str().unwrap(),
        "vhost-user-blk-pci",
        "vhost_user=true",
        "scripts/qmp",
        "scripts/pull-backup.sh",
        "curl -s --unix-socket",
    ] {
        assert!(
            printed.contains(needle),
            "make run prints {needle}:\n{printed}"
        );
    }
}
