//! vubd on Ceph RBD: the `rbd` protocol node under raw and qcow2 disks, against a single-host
//! Ceph cluster each test starts (`scripts/ceph-test-cluster.sh`), with QEMU's rbd driver
//! (qemu-img, qemu-nbd) as the independent reader.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::bitmaps::{granules, nbd_dirty_granules_of, Op};
use common::blkio_client::BlkioClient;
use common::ceph::Cluster;
use common::cli::{one_line_error, run_vubd, serve_fails, vubd_ok};
use common::data::assert_same;
use common::qemu::qemu_img;
use common::qsd::{Daemon, Export};
use common::{pattern, TempDir, Vubd};

const MIB: usize = 1 << 20;

/// Apply a write to the model of the disk.
fn apply(model: &mut [u8], offset: u64, data: &[u8]) {
    model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
}

#[test]
fn a_raw_disk_on_rbd_round_trips_and_qemu_reads_what_it_wrote() {
    let cluster = Cluster::start("raw");
    let dir = TempDir::new("rbd-raw");
    cluster.create("disk", "32M");
    let name = cluster.name("disk");
    let vubd = Vubd::start(
        &dir.join("vubd.sock"),
        &["--image", &name, "--num-queues", "2"],
    );
    let mut client = BlkioClient::connect(&vubd.socket, 2).unwrap();
    assert_eq!(client.capacity(), 32 * MIB as u64);
    let mut model = vec![0u8; 32 * MIB];
    assert_same(
        &client.read(0, 0, MIB).unwrap(),
        &model[..MIB],
        "a new image",
    );

    // Writes of several sizes, on both queues, one spanning several RBD objects (4 MiB).
    let writes: [(u64, usize); 5] = [
        (0, 4096),
        (512 * 7, 512),
        (3 * MIB as u64 + 4096, 3 * MIB),
        (32 * MIB as u64 - 512, 512),
        (17 * MIB as u64 + 512, 64 * 1024),
    ];
    for (i, &(offset, len)) in writes.iter().enumerate() {
        let data = pattern(len, 10 + i as u64);
        client.write(i % 2, offset, &data).unwrap();
        apply(&mut model, offset, &data);
    }
    client.write_zeroes(1, 4 * MIB as u64, 8192, false).unwrap();
    model[4 * MIB..4 * MIB + 8192].fill(0);
    client
        .write_zeroes(0, 6 * MIB as u64, MIB as u64, true)
        .unwrap();
    model[6 * MIB..7 * MIB].fill(0);
    client.flush(0).unwrap();
    assert_same(&client.read_all(1, 32 * MIB).unwrap(), &model, "read back");
    drop(client);
    drop(vubd);

    assert_same(
        &cluster.read_image("disk", dir.path()),
        &model,
        "QEMU's view",
    );
}

/// The mission graph with metadata and data both on RBD, from the one command line that
/// qemu-storage-daemon runs too: guest writes land on the data image, the qcow2 image stays
/// valid for qemu-img check, and its persistent bitmap covers every write.
#[test]
fn the_mission_graph_on_rbd_from_qemu_storage_daemons_command_line() {
    let cluster = Cluster::start("mission");
    let dir = TempDir::new("rbd-mission");
    let (meta, data) = (cluster.name("meta"), cluster.name("data"));
    qemu_img(
        dir.path(),
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={data},data_file_raw=on"),
            &meta,
            "16M",
        ],
    );
    let opts = cluster.qcow2_opts("meta", "data");
    qemu_img(
        dir.path(),
        &["bitmap", "--add", "--image-opts", &opts, "since-full"],
    );
    let export = Export::with_protocols(
        &cluster.blockdev("meta"),
        Some(&cluster.blockdev("data")),
        &dir.join("vhost.sock"),
    );

    // The command line is qemu-storage-daemon's own: it serves the graph as well.
    let qsd = Daemon::qsd(dir.path(), &export);
    let mut client = BlkioClient::connect(qsd.socket(), 1).unwrap();
    let first = pattern(4096, 1);
    client.write(0, 0, &first).unwrap();
    drop(client);
    let (status, stderr) = qsd.stop();
    assert!(status.success(), "qemu-storage-daemon: {stderr}");

    let vubd = Daemon::vubd(dir.path(), &export);
    let mut client = BlkioClient::connect(vubd.socket(), 1).unwrap();
    let mut model = vec![0u8; 16 * MIB];
    apply(&mut model, 0, &first);
    assert_same(&client.read(0, 0, 4096).unwrap(), &first, "qsd's write");
    let mut ops = vec![(Op::Write, 0, 4096)];
    for (i, &(offset, len)) in [
        (MIB as u64, 70_000 / 512 * 512),
        (9 * MIB as u64 + 512, 512),
    ]
    .iter()
    .enumerate()
    {
        let bytes = pattern(len as usize, 20 + i as u64);
        client.write(0, offset, &bytes).unwrap();
        apply(&mut model, offset, &bytes);
        ops.push((Op::Write, offset, len));
    }
    client
        .write_zeroes(0, 12 * MIB as u64, 65536, false)
        .unwrap();
    ops.push((Op::Zeroes, 12 * MIB as u64, 65536));
    client.flush(0).unwrap();
    drop(client);
    let (status, stderr) = vubd.stop();
    assert!(status.success(), "vubd: {stderr}");

    assert_same(
        &cluster.read_image("data", dir.path()),
        &model,
        "the data image",
    );
    let check = qemu_img(dir.path(), &["check", "--image-opts", &opts]);
    assert!(check.contains("No errors"), "{check}");
    // qemu-storage-daemon's write was before vubd; QEMU marks it too (the bitmap is enabled).
    assert_eq!(
        nbd_dirty_granules_of(dir.path(), &["--image-opts", &opts], "since-full", 65536),
        granules(&ops, 65536),
        "the bitmap as qemu-nbd reads it"
    );
}

#[test]
fn a_second_writer_is_kept_out_by_the_exclusive_lock() {
    let cluster = Cluster::start("lock");
    let dir = TempDir::new("rbd-lock");
    cluster.create("disk", "8M");
    let name = cluster.name("disk");
    let mut first = Vubd::start(&dir.join("first.sock"), &["--image", &name]);
    let second = dir.join("second.sock");
    let err = serve_fails(&["--socket", second.to_str().unwrap(), "--image", &name]);
    let line = one_line_error(&err);
    assert!(
        line.contains("rbd:rbd/disk") && line.contains("in use by another client"),
        "{line}"
    );
    // Readers are not writers: a read-only open goes ahead.
    let reader = Vubd::start(&dir.join("reader.sock"), &["--image", &name, "--readonly"]);
    drop(reader);
    // Once the first has stopped, the lock is free again.
    first.stop();
    drop(Vubd::start(&second, &["--image", &name]));
}

#[test]
fn missing_images_pools_and_features_are_one_line_errors() {
    let cluster = Cluster::start("errors");
    let dir = TempDir::new("rbd-errors");
    let sock = dir.join("s.sock");
    let serve = |image: &str, extra: &[&str]| {
        let mut args = vec!["--socket", sock.to_str().unwrap(), "--image", image];
        args.extend_from_slice(extra);
        one_line_error(&serve_fails(&args)).to_string()
    };
    let conf = cluster.conf().display().to_string();
    let line = serve(&cluster.name("nothing"), &[]);
    assert!(line.contains("rbd create"), "{line}");
    let line = serve(&format!("rbd:nopool/x:conf={conf}"), &[]);
    assert!(line.contains("no pool 'nopool'"), "{line}");
    let line = serve(&format!("rbd:rbd/x:conf={conf}.missing"), &[]);
    assert!(line.contains("configuration"), "{line}");

    cluster.rbd(&[
        "create",
        "--size",
        "4M",
        "--image-feature",
        "layering",
        "rbd/nolock",
    ]);
    let line = serve(&cluster.name("nolock"), &[]);
    assert!(line.contains("exclusive-lock"), "{line}");
    // As the message says: locking off serves it.
    drop(Vubd::start(
        &sock,
        &["--image", &cluster.name("nolock"), "--locking", "off"],
    ));
}

/// While the cluster's only OSD stalls, the guest's flush waits for it (Ceph's default: no
/// operation timeout; librbd's writeback cache may take the writes meanwhile, as a page cache
/// would) and completes once it resumes, with every write on the image: nothing acknowledged
/// by a flush is lost.
#[test]
fn a_stalled_osd_delays_the_flush_and_loses_nothing() {
    let cluster = Cluster::start("stall");
    let dir = TempDir::new("rbd-stall");
    cluster.create("disk", "8M");
    let vubd = Vubd::start(&dir.join("vubd.sock"), &["--image", &cluster.name("disk")]);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    client.write(0, 0, &pattern(4096, 99)).unwrap();
    client.flush(0).unwrap();
    // Writes run until told to stop, then the flush: the stall always catches the load.
    let (progress, stop) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let writer = {
        let (progress, stop) = (progress.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                client
                    .write(0, (n % 64) * 65536, &pattern(65536, n))
                    .unwrap();
                n += 1;
                progress.store(n as usize, Ordering::SeqCst);
            }
            client.flush(0).unwrap();
            progress.store(usize::MAX, Ordering::SeqCst);
            n
        })
    };
    while progress.load(Ordering::SeqCst) < 8 {
        std::thread::sleep(Duration::from_millis(5));
    }
    cluster.signal_osd(libc::SIGSTOP);
    // The flush comes while the OSD is stalled.
    stop.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(2));
    let during = progress.load(Ordering::SeqCst);
    cluster.signal_osd(libc::SIGCONT);
    let written = writer.join().unwrap();
    assert_ne!(during, usize::MAX, "the flush waited for the stalled OSD");
    drop(vubd);
    let mut expected = vec![0u8; 4 * MIB];
    for n in 0..written {
        apply(&mut expected, (n % 64) * 65536, &pattern(65536, n));
    }
    assert_same(
        &cluster.read_image("disk", dir.path())[..4 * MIB],
        &expected,
        "what QEMU reads",
    );
}

/// With an operation timeout set (a Ceph option, here in the image's name), a stalled OSD
/// fails the guest's request with an I/O error it sees, and the disk works again once the OSD
/// is back. `--cache none` turns librbd's cache off, so the write itself goes to the OSD.
#[test]
fn with_an_operation_timeout_a_stalled_osd_is_an_io_error_the_guest_sees() {
    let cluster = Cluster::start("timeout");
    let dir = TempDir::new("rbd-timeout");
    cluster.create("disk", "8M");
    let name = format!("{}:rados_osd_op_timeout=2", cluster.name("disk"));
    let vubd = Vubd::start(
        &dir.join("vubd.sock"),
        &["--image", &name, "--cache", "none"],
    );
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    client.write(0, 0, &pattern(4096, 1)).unwrap();
    cluster.signal_osd(libc::SIGSTOP);
    let stalled = client.write(0, 4096, &pattern(4096, 2));
    cluster.signal_osd(libc::SIGCONT);
    assert_eq!(stalled, Err(-libc::EIO), "the guest sees the failure");
    let again = pattern(4096, 3);
    client.write(0, 4096, &again).unwrap();
    client.flush(0).unwrap();
    assert_same(
        &client.read(0, 4096, 4096).unwrap(),
        &again,
        "after the OSD is back",
    );
}

/// An existing raw RBD disk gets persistent bitmaps without a copy: `vubd create` writes the
/// qcow2 metadata into an empty RBD image and adopts the data image untouched; `vubd bitmap`
/// adds a bitmap; served, the disk keeps its old data and the bitmap covers the new writes.
#[test]
fn an_existing_raw_rbd_disk_gets_bitmaps_without_a_copy() {
    let cluster = Cluster::start("adopt");
    let dir = TempDir::new("rbd-adopt");
    cluster.create("data", "8M");
    cluster.create("meta", "1M");
    let (meta, data) = (cluster.name("meta"), cluster.name("data"));
    let old = pattern(8 * MIB, 5);
    let old_file = dir.join("old.raw");
    std::fs::write(&old_file, &old).unwrap();
    qemu_img(
        dir.path(),
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            old_file.to_str().unwrap(),
            &data,
        ],
    );
    vubd_ok(&["create", &meta, "--data-file", &data]);
    // Never over an image that is already there.
    let (code, _, err) = run_vubd(&["create", &meta, "--data-file", &data]);
    assert_ne!(code, 0);
    assert!(one_line_error(&err).contains("already exists"), "{err}");
    vubd_ok(&[
        "bitmap",
        &meta,
        "--data-file",
        &data,
        "add",
        "since-adoption",
    ]);

    let mut vubd = Vubd::start(
        &dir.join("v.sock"),
        &["--image", &meta, "--format", "qcow2", "--data-file", &data],
    );
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    assert_same(
        &client.read_all(0, 8 * MIB).unwrap(),
        &old,
        "the adopted data",
    );
    let mut model = old;
    let new = pattern(4096, 6);
    client.write(0, 3 * MIB as u64, &new).unwrap();
    apply(&mut model, 3 * MIB as u64, &new);
    client.flush(0).unwrap();
    drop(client);
    vubd.stop();

    assert_same(
        &cluster.read_image("data", dir.path()),
        &model,
        "the data image",
    );
    let opts = cluster.qcow2_opts("meta", "data");
    let check = qemu_img(dir.path(), &["check", "--image-opts", &opts]);
    assert!(check.contains("No errors"), "{check}");
    assert_eq!(
        nbd_dirty_granules_of(
            dir.path(),
            &["--image-opts", &opts],
            "since-adoption",
            65536
        ),
        granules(&[(Op::Write, 3 * MIB as u64, 4096)], 65536)
    );
}

/// After a crash (SIGKILL) the dead daemon's exclusive lock is broken once its watch on the
/// image times out (5 s on the test cluster, 30 s by Ceph's default): a restarted daemon waits
/// for that in its open, then serves, and what the dead one had flushed is there.
#[test]
fn a_restart_after_a_crash_takes_the_lock_over() {
    let cluster = Cluster::start("crash");
    let dir = TempDir::new("rbd-crash");
    cluster.create("disk", "8M");
    let name = cluster.name("disk");
    let sock = dir.join("v.sock");
    let mut first = Vubd::start(&sock, &["--image", &name]);
    let mut client = BlkioClient::connect(&first.socket, 1).unwrap();
    let flushed = pattern(65536, 8);
    client.write(0, 0, &flushed).unwrap();
    client.flush(0).unwrap();
    first.stop_with(libc::SIGKILL);
    drop(client);
    let _ = std::fs::remove_file(&sock);

    let second = Vubd::start(&sock, &["--image", &name]);
    let mut client = BlkioClient::connect(&second.socket, 1).unwrap();
    assert_same(
        &client.read(0, 0, 65536).unwrap(),
        &flushed,
        "the flushed write",
    );
    client.write(0, 65536, &pattern(4096, 9)).unwrap();
    client.flush(0).unwrap();
    // The lock is this daemon's now: a third is refused.
    let third = dir.join("third.sock");
    let err = serve_fails(&["--socket", third.to_str().unwrap(), "--image", &name]);
    assert!(
        one_line_error(&err).contains("in use by another client"),
        "{err}"
    );
}

/// A raw disk on RBD, exported over NBD for a backup, reports what was never written as holes
/// (from librbd's fast-diff map, object by object), so a backup client skips them.
#[test]
fn a_raw_rbd_disk_reports_unwritten_objects_as_holes_over_nbd() {
    let cluster = Cluster::start("holes");
    let dir = TempDir::new("rbd-holes");
    cluster.create("disk", "32M");
    let nbd = dir.join("nbd.sock");
    let mut vubd = Vubd::start(
        &dir.join("v.sock"),
        &[
            "--image",
            &cluster.name("disk"),
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", nbd.display()),
            "--export",
            "type=nbd,id=e0,node-name=disk,name=disk",
        ],
    );
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    // Objects are 4 MiB: these touch objects 1 and 5.
    client.write(0, 5 * MIB as u64, &pattern(4096, 1)).unwrap();
    client
        .write(0, 21 * MIB as u64 + 512, &pattern(512, 2))
        .unwrap();
    client.flush(0).unwrap();
    let out = std::process::Command::new("nbdinfo")
        .args(["--json", "--map"])
        .arg(format!("nbd+unix:///disk?socket={}", nbd.display()))
        .output()
        .expect("nbdinfo");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let extents: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut data = Vec::new();
    let mut end = 0;
    for e in extents.as_array().unwrap() {
        let (offset, length) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        assert_eq!(offset, end, "extents cover the disk in order");
        end = offset + length;
        if e["type"].as_u64().unwrap() & 1 == 0 {
            data.push((offset, length));
        }
    }
    assert_eq!(end, 32 * MIB as u64);
    let object = 4 * MIB as u64;
    assert_eq!(data, [(object, object), (5 * object, object)], "{extents}");
    drop(client);
    vubd.stop();
}
