//! vubd with the data file of its qcow2 graph behind an NBD server (qemu-nbd): the graph from
//! qemu-storage-daemon's own command line, the bitmap read back by QEMU, a server restart
//! under load (survived with `reconnect-delay`, an I/O error the guest sees without), and the
//! data file over TLS.

mod common;
#[path = "common/nbd_servers.rs"]
mod servers;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::bitmaps::{granules, nbd_dirty_granules, vubd_bitmap, Op};
use common::blkio_client::BlkioClient;
use common::data::assert_same;
use common::qemu::qemu_img;
use common::qsd::{Daemon, Export};
use common::{pattern, raw_with_metadata, TempDir, Vubd};
use servers::{qemu_nbd, unix_spec, Server};

const MIB: usize = 1 << 20;

/// qemu-nbd serving `dir`'s `disk.raw` as export `data` on `dir/nbd.sock`.
fn serve_data(dir: &TempDir, extra: &[&str]) -> Server {
    qemu_nbd(
        &unix_spec(&dir.join("nbd.sock"), "data"),
        &dir.join("disk.raw"),
        extra,
    )
}

/// The `--blockdev` options of the nbd node for `dir`'s server (node name aside).
fn nbd_node(dir: &TempDir, extra: &str) -> String {
    format!(
        "driver=nbd,server.type=unix,server.path={},export=data{extra}",
        dir.join("nbd.sock").display()
    )
}

fn apply(model: &mut [u8], offset: u64, data: &[u8]) {
    model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
}

#[test]
fn the_mission_graph_with_its_data_on_nbd_from_qemu_storage_daemons_command_line() {
    let dir = TempDir::new("nbd-mission");
    let mut model = raw_with_metadata(&dir, 16 * MIB, 1);
    vubd_bitmap(&dir, &["add", "since-full"]);
    let server = serve_data(&dir, &[]);
    let meta = format!("driver=file,filename={}", dir.join("meta.qcow2").display());
    let export = Export::with_protocols(&meta, Some(&nbd_node(&dir, "")), &dir.join("v.sock"));

    // qemu-storage-daemon runs the same command line.
    let qsd = Daemon::qsd(dir.path(), &export);
    let mut client = BlkioClient::connect(qsd.socket(), 1).unwrap();
    let first = pattern(4096, 7);
    client.write(0, 8192, &first).unwrap();
    apply(&mut model, 8192, &first);
    drop(client);
    let (status, stderr) = qsd.stop();
    assert!(status.success(), "qemu-storage-daemon: {stderr}");

    let vubd = Daemon::vubd(dir.path(), &export);
    let mut client = BlkioClient::connect(vubd.socket(), 1).unwrap();
    assert_same(
        &client.read(0, 0, 64 * 1024).unwrap(),
        &model[..64 * 1024],
        "before",
    );
    let mut ops = vec![(Op::Write, 8192, 4096)];
    for (i, &(offset, len)) in [(MIB as u64, 3 * MIB), (15 * MIB as u64 + 512, 4096)]
        .iter()
        .enumerate()
    {
        let bytes = pattern(len, 30 + i as u64);
        client.write(0, offset, &bytes).unwrap();
        apply(&mut model, offset, &bytes);
        ops.push((Op::Write, offset, len as u64));
    }
    client
        .write_zeroes(0, 6 * MIB as u64, 65536, false)
        .unwrap();
    model[6 * MIB..6 * MIB + 65536].fill(0);
    ops.push((Op::Zeroes, 6 * MIB as u64, 65536));
    client.flush(0).unwrap();
    assert_same(&client.read_all(0, 16 * MIB).unwrap(), &model, "read back");
    drop(client);
    let (status, stderr) = vubd.stop();
    assert!(status.success(), "vubd: {stderr}");
    drop(server);

    // The writes are in the file the server served; the image is valid and its bitmap, read
    // by QEMU, covers each of them.
    assert_same(
        &std::fs::read(dir.join("disk.raw")).unwrap(),
        &model,
        "the served file",
    );
    let check = qemu_img(dir.path(), &["check", "meta.qcow2"]);
    assert!(check.contains("No errors"), "{check}");
    assert_eq!(
        nbd_dirty_granules(dir.path(), "meta.qcow2", "since-full", 65536),
        granules(&ops, 65536)
    );
}

/// Writes of 64 KiB over the first 4 MiB (request `n` at slot `n % 64`), in a thread, until
/// `stop`, then a flush; counts those done. The handle returns every result.
fn writer(
    mut client: BlkioClient,
    progress: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Result<(), i32>>> {
    std::thread::spawn(move || {
        let mut results = Vec::new();
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            results.push(client.write(0, (n % 64) * 65536, &pattern(65536, 100 + n)));
            n += 1;
            progress.store(n as usize, Ordering::SeqCst);
        }
        results.push(client.flush(0));
        results
    })
}

fn wait_for(progress: &AtomicUsize, at_least: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while progress.load(Ordering::SeqCst) < at_least {
        assert!(Instant::now() < deadline, "the writer made no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn json_name(dir: &TempDir, reconnect_delay: u32) -> String {
    format!(
        r#"json:{{"driver": "nbd", "server": {{"type": "unix", "path": "{}"}}, "export": "data", "reconnect-delay": {reconnect_delay}}}"#,
        dir.join("nbd.sock").display()
    )
}

fn serve_meta_with_data(dir: &TempDir, data: &str) -> Vubd {
    let meta = dir.join("meta.qcow2");
    Vubd::start(
        &dir.join("v.sock"),
        &[
            "--image",
            meta.to_str().unwrap(),
            "--format",
            "qcow2",
            "--data-file",
            data,
        ],
    )
}

/// The server dies (SIGKILL) while writes are in flight and comes back on the same socket:
/// with `reconnect-delay`, the writes wait, are sent again, and every one lands.
#[test]
fn a_server_restart_under_load_is_survived_with_reconnect_delay() {
    let dir = TempDir::new("nbd-restart");
    let mut model = raw_with_metadata(&dir, 8 * MIB, 2);
    let mut server = serve_data(&dir, &[]);
    let vubd = serve_meta_with_data(&dir, &json_name(&dir, 60));
    let client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    let (progress, stop) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let handle = writer(client, progress.clone(), stop.clone());
    wait_for(&progress, 8);
    server.kill();
    // The writer goes on meanwhile: its next write waits for the server.
    std::thread::sleep(Duration::from_millis(500));
    let before_restart = progress.load(Ordering::SeqCst);
    let _server = serve_data(&dir, &[]);
    wait_for(&progress, before_restart + 8);
    stop.store(true, Ordering::SeqCst);
    let results = handle.join().unwrap();
    assert!(
        results.iter().all(Result::is_ok),
        "no request failed: {results:?}"
    );
    drop(vubd);
    let written = results.len() as u64 - 1;
    for n in 0..written {
        apply(&mut model, (n % 64) * 65536, &pattern(65536, 100 + n));
    }
    assert_same(
        &std::fs::read(dir.join("disk.raw")).unwrap(),
        &model,
        "the served file",
    );
}

/// Without `reconnect-delay` (QEMU's default 0), requests while the server is gone fail with
/// an I/O error the guest sees; once it is back (vubd reconnects by itself), the disk works.
#[test]
fn without_reconnect_delay_a_lost_server_is_an_io_error_the_guest_sees() {
    let dir = TempDir::new("nbd-lost");
    raw_with_metadata(&dir, 8 * MIB, 3);
    let mut server = serve_data(&dir, &[]);
    let uri = format!("nbd+unix:///data?socket={}", dir.join("nbd.sock").display());
    let vubd = serve_meta_with_data(&dir, &uri);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    client.write(0, 0, &pattern(4096, 1)).unwrap();
    server.kill();
    assert_eq!(client.write(0, 4096, &pattern(4096, 2)), Err(-libc::EIO));
    let _server = serve_data(&dir, &[]);
    let again = pattern(4096, 3);
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.write(0, 4096, &again).is_err() {
        assert!(Instant::now() < deadline, "vubd never reconnected");
        std::thread::sleep(Duration::from_millis(100));
    }
    client.flush(0).unwrap();
    assert_same(
        &client.read(0, 4096, 4096).unwrap(),
        &again,
        "after the server came back",
    );
}

/// The data file over TLS: vubd's `--object tls-creds-x509,endpoint=client` and the node's
/// `tls-creds`, against qemu-nbd asking for client certificates.
#[test]
fn the_data_file_over_tls() {
    let dir = TempDir::new("nbd-tls");
    let mut model = raw_with_metadata(&dir, 4 * MIB, 4);
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    common::tls::make_certs(&certs);
    let object = |endpoint: &str, sub: &str| {
        format!(
            "tls-creds-x509,id=tls0,endpoint={endpoint},dir={}",
            Path::new(&certs).join(sub).display()
        )
    };
    let _server = serve_data(
        &dir,
        &[
            "--object",
            &object("server", "server"),
            "--tls-creds",
            "tls0",
        ],
    );
    let meta = format!("driver=file,filename={}", dir.join("meta.qcow2").display());
    let data = nbd_node(&dir, ",tls-creds=tls0,tls-hostname=localhost");
    let export = Export::with_protocols(&meta, Some(&data), &dir.join("v.sock"));
    let vubd = Daemon::vubd_with(
        dir.path(),
        &export,
        &["--object", &object("client", "client")],
    );
    let mut client = BlkioClient::connect(vubd.socket(), 1).unwrap();
    let bytes = pattern(MIB, 5);
    client.write(0, 512, &bytes).unwrap();
    apply(&mut model, 512, &bytes);
    client.flush(0).unwrap();
    assert_same(&client.read_all(0, 4 * MIB).unwrap(), &model, "over TLS");
    drop(client);
    let (status, stderr) = vubd.stop();
    assert!(status.success(), "vubd: {stderr}");

    // Without the client object, the node's tls-creds names nothing: a one-line error.
    let args = export.args();
    let err = common::cli::run_vubd(&args.iter().map(String::as_str).collect::<Vec<_>>()).2;
    let line = common::cli::one_line_error(&err);
    assert!(line.contains("endpoint=client"), "{line}");
}

/// An export that takes I/O only in 4 KiB blocks (nbdkit's blocksize-policy): serving it with
/// 512-byte logical blocks, whose requests it would refuse, is a one-line error saying what to
/// pass; with 4096-byte blocks every request fits and data round-trips.
#[test]
fn an_export_with_4k_blocks_needs_a_4k_logical_block_size() {
    let dir = TempDir::new("nbd-4k");
    let spec = unix_spec(&dir.join("nbd.sock"), "");
    let _server = servers::nbdkit(
        &spec,
        &[
            "--filter=blocksize-policy",
            "memory",
            "8M",
            "blocksize-minimum=4096",
            "blocksize-error-policy=error",
        ],
    );
    let uri = format!("nbd+unix:///?socket={}", dir.join("nbd.sock").display());
    let sock = dir.join("v.sock");
    // (At `warn`: the connection itself is logged at `info`.)
    let err = common::cli::serve_fails(&[
        "--socket",
        sock.to_str().unwrap(),
        "--image",
        &uri,
        "--log",
        "warn",
    ]);
    let line = common::cli::one_line_error(&err);
    assert!(line.contains("--logical-block-size 4096"), "{line}");

    let vubd = Vubd::start(&sock, &["--image", &uri, "--logical-block-size", "4096"]);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    let bytes = pattern(3 * 4096, 11);
    client.write(0, 4096, &bytes).unwrap();
    client.flush(0).unwrap();
    assert_same(
        &client.read(0, 4096, bytes.len()).unwrap(),
        &bytes,
        "4 KiB blocks",
    );
}
