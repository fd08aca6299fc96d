//! I/O statistics: QMP `query-blockstats` and the Prometheus endpoint (`--metrics`).
//!
//! * The same libblkio sequence on vubd and on qemu-storage-daemon, both started with the same
//!   qemu-storage-daemon command line over the mission graph (qcow2 metadata over a raw data
//!   file, one persistent bitmap, two queues): vubd reports what the sequence implies, and what
//!   qemu-storage-daemon reports of it too.
//! * `GET /metrics` on `--metrics unix:PATH` and `tcp:ADDR:PORT` agrees with QMP, per queue,
//!   per kind of request, with histograms that add up, and with the bitmap's dirty count.
//! * Counts outlive the frontend connection that made them.
//! * Requests past the end of the disk are counted invalid, not failed.
//! * A bad `--metrics` is refused with an error naming it.
//!
//! What qemu-storage-daemon can tell (QEMU 10): its vhost-user-blk export accounts nothing
//! (block/export/virtio-blk-handler.c calls no `block_acct_*`), and the export's BlockBackend
//! has neither a name nor a device, so `query-blockstats` returns `[]`. With `query-nodes:
//! true` it lists every node with node-level statistics, where only `wr_highest_offset` moves
//! (for every tracked write, write-zeroes included): that, and the set of keys, are what vubd
//! is compared with. The counters' oracle is QEMU's virtio-blk device model
//! (hw/block/virtio-blk.c): reads and writes by the bytes asked for, write-zeroes as writes,
//! flushes; out-of-range reads, writes and write-zeroes counted invalid. QEMU's virtio-blk does
//! not account discards at all; vubd counts them as unmaps, as it documents, and that is what
//! is checked for them.

#[path = "../common/mod.rs"]
mod common;
mod scrape;
use scrape::*;
mod sequence;
use sequence::*;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::bitmaps::vubd_bitmap;
use common::blkio_client::{BlkioClient, Errno};
use common::cli::one_line_error;
use common::qmp::Qmp;
use common::qsd::{Daemon, Export};
use common::{create_image, pattern, raw_with_metadata, vubd_bin, TempDir};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const DISK: u64 = 32 * MIB;
const QUEUES: usize = 2;
const BITMAP: &str = "b0";
const GRANULE: u64 = 64 * KIB;
/// How long one step (a libblkio sequence, a daemon's exit) may take before the test calls it
/// stuck.
const DEADLINE: Duration = Duration::from_secs(20);
/// EIO, as libblkio returns a request the device answered with `VIRTIO_BLK_S_IOERR`.
const EIO: Errno = -libc::EIO;

// ---------------------------------------------------------------------------------------------
// The graph, the daemons and the I/O.

/// `disk.raw` with `meta.qcow2` beside it (made by `vubd create`) and the persistent bitmap
/// [`BITMAP`] (by `vubd bitmap add`), in a new scratch directory.
fn graph(name: &str) -> TempDir {
    let dir = TempDir::new(name);
    raw_with_metadata(&dir, DISK as usize, 7);
    vubd_bitmap(&dir, &["add", BITMAP]);
    dir
}

/// The qemu-storage-daemon command line both daemons get: qcow2 node `fmt` over `meta` with
/// data file `data`, `discard=unmap`, a vhost-user-blk export with [`QUEUES`] queues and a QMP
/// monitor.
fn export(dir: &TempDir) -> Export {
    Export::new(
        &dir.join("meta.qcow2"),
        Some(&dir.join("disk.raw")),
        &dir.join("blk.sock"),
    )
    .monitor(&dir.join("qmp.sock"))
    .discard_unmap()
    .queues(QUEUES)
}

/// Run `f` on a thread; fail if it does not finish within [`DEADLINE`] (a daemon that stopped
/// answering leaves libblkio waiting forever; the daemon guards kill it as the test unwinds).
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(value) => value,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: not done within {DEADLINE:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: failed (see above)"),
    }
}

/// A libblkio client of `socket` with [`QUEUES`] queues.
fn connect(socket: &Path, who: &str) -> BlkioClient {
    let socket = socket.to_path_buf();
    within(&format!("{who}: libblkio connect"), move || {
        BlkioClient::connect(&socket, QUEUES).expect("libblkio connect")
    })
}

/// A TCP port nobody listens on now.
fn free_port() -> u16 {
    let probe = TcpListener::bind("127.0.0.1:0").expect("bind a probe");
    probe.local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------------------------
// 1. The same I/O on vubd and qemu-storage-daemon.

#[test]
fn the_same_io_gives_the_same_counts_on_vubd_and_qemu_storage_daemon() {
    let seq = sequence();
    let implied = implied_blockstats(&seq);
    let (vubd_dir, qsd_dir) = (graph("stats-vubd"), graph("stats-qsd"));
    let vubd = Daemon::vubd(vubd_dir.path(), &export(&vubd_dir));
    let qsd = Daemon::qsd(qsd_dir.path(), &export(&qsd_dir));
    let vubd_client = run_ok(connect(vubd.socket(), "vubd"), &seq, "vubd");
    let qsd_client = run_ok(
        connect(qsd.socket(), "qemu-storage-daemon"),
        &seq,
        "qemu-storage-daemon",
    );
    let (mut vq, mut qq) = (vubd.qmp(), qsd.qmp());
    let v = vubd_blockstats(&mut vq);
    let qsd_blk = qq.ok("query-blockstats", json!({}));
    let qsd_fmt = node_blockstats(&mut qq, "fmt");

    let mut differences = Vec::new();
    let mut table = String::from("counter: implied / vubd / qemu-storage-daemon (node fmt)\n");
    for (key, want) in &implied {
        let got = stat(&v, key);
        let q = qsd_fmt["stats"][key].as_u64();
        table.push_str(&format!("  {key}: {want} / {got} / {q:?}\n"));
        // wr_highest_offset is compared with qemu-storage-daemon's, below.
        if got != *want && *key != "wr_highest_offset" {
            differences.push(format!("{key}: vubd {got}, the sequence implies {want}"));
        }
    }
    // What qemu-storage-daemon accounts, vubd must agree with. QEMU 10 accounts nothing at the
    // export (an empty list); should it ever, every counter is compared.
    for entry in qsd_blk.as_array().expect("list") {
        for key in implied.keys() {
            if entry["stats"][key] != v["stats"][key] {
                differences.push(format!(
                    "{key}: vubd {}, qemu-storage-daemon's blk-level {}",
                    v["stats"][key], entry["stats"][key]
                ));
            }
        }
    }
    // Node level: QEMU's block layer tracks the highest write, write-zeroes included.
    let qsd_highest = qsd_fmt["stats"]["wr_highest_offset"].as_u64().unwrap();
    assert_eq!(
        qsd_highest, implied["wr_highest_offset"],
        "the oracle: qemu-storage-daemon's wr_highest_offset on fmt is the end of the highest write"
    );
    let highest = stat(&v, "wr_highest_offset");
    if highest != qsd_highest {
        let plain = highest_write_end(&seq, false);
        differences.push(format!(
            "wr_highest_offset: vubd {highest}, qemu-storage-daemon {qsd_highest} (the sequence's \
             highest write is its write-zeroes, a write in QEMU's accounting; the end of its \
             highest plain write is {plain}{})",
            if highest == plain {
                ", which vubd reports: vubd leaves write-zeroes out"
            } else {
                ""
            },
        ));
    }
    // Every key qemu-storage-daemon has under "stats", vubd has.
    let keys = |e: &Value| -> BTreeSet<String> {
        e["stats"]
            .as_object()
            .expect("stats object")
            .keys()
            .cloned()
            .collect()
    };
    let (vubd_keys, qsd_keys) = (keys(&v), keys(&qsd_fmt));
    let missing: Vec<&String> = qsd_keys.difference(&vubd_keys).collect();
    if !missing.is_empty() {
        differences.push(format!(
            "keys qemu-storage-daemon has and vubd lacks: {missing:?}"
        ));
    }
    let extra: Vec<&String> = vubd_keys.difference(&qsd_keys).collect();
    table.push_str(&format!(
        "  keys only vubd has: {extra:?}; qemu-storage-daemon's blk-level reply: {qsd_blk}\n"
    ));
    // vubd's own reply is consistent: histograms count the successful requests, times move.
    for prefix in ["rd", "wr", "flush"] {
        let bins: u64 = v["stats"][format!("{prefix}_latency_histogram")]["bins"]
            .as_array()
            .unwrap_or_else(|| panic!("{prefix}_latency_histogram in {v}"))
            .iter()
            .map(|b| b.as_u64().unwrap())
            .sum();
        assert_eq!(
            bins,
            stat(&v, &format!("{prefix}_operations")),
            "{prefix} bins"
        );
    }
    for prefix in ["rd", "wr", "flush", "unmap"] {
        assert!(
            stat(&v, &format!("{prefix}_total_time_ns")) > 0,
            "{prefix}_total_time_ns"
        );
    }
    // The bitmap dirtied the same on both, as the sequence implies.
    let vubd_dirty = query_block_dirty(&mut vq);
    let qsd_dirty = qq
        .bitmaps("fmt")
        .iter()
        .find(|b| b["name"] == BITMAP)
        .expect("qemu-storage-daemon's bitmap")["count"]
        .as_u64()
        .unwrap();
    table.push_str(&format!(
        "  {BITMAP} dirty: implied {} / vubd {vubd_dirty} / qemu-storage-daemon {qsd_dirty}\n",
        implied_dirty_bytes(&seq)
    ));
    assert_eq!(
        qsd_dirty,
        implied_dirty_bytes(&seq),
        "qemu-storage-daemon's bitmap"
    );
    assert_eq!(
        vubd_dirty, qsd_dirty,
        "vubd's bitmap against qemu-storage-daemon's"
    );
    eprintln!("{table}");

    drop((vubd_client, qsd_client));
    for (daemon, who) in [(vubd, "vubd"), (qsd, "qemu-storage-daemon")] {
        let (status, stderr) = within(&format!("{who}: SIGTERM"), move || daemon.stop());
        assert!(status.success(), "{who}: {status}: {stderr}");
    }
    assert!(
        differences.is_empty(),
        "vubd differs:\n  {}\n{table}",
        differences.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------
// 2. The Prometheus endpoint on a UNIX socket.

#[test]
fn the_metrics_endpoint_agrees_with_query_blockstats() {
    let seq = sequence();
    let dir = graph("stats-prom");
    let metrics = dir.join("metrics.sock");
    let option = format!("unix:{}", metrics.display());
    let vubd = Daemon::vubd_with(dir.path(), &export(&dir), &["--metrics", &option]);
    let mode = std::fs::metadata(&metrics)
        .expect("the metrics socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "metrics socket mode {mode:o}");
    // Before any frontend: whatever is there is zero. (vubd shows no per-queue series until a
    // frontend has started the queues; only the bitmap's gauge.)
    let m = metrics_of(http_unix(&metrics, &get_request("/metrics")));
    for s in m.samples.iter().filter(|s| s.name != "vubd_export_info") {
        assert_eq!(s.value, 0.0, "before any I/O: {s:?}");
    }
    // The export is labelled by its id; which node it serves is in its info series.
    assert_eq!(
        m.get("vubd_export_info", &[("export", "exp"), ("node", "fmt")]),
        1
    );
    assert_eq!(
        m.get(
            "vubd_bitmap_dirty_bytes",
            &[("export", "exp"), ("bitmap", BITMAP)]
        ),
        0
    );
    let mut qmp = vubd.qmp();

    let client = run_ok(connect(vubd.socket(), "vubd"), &seq, "vubd");
    let entry = vubd_blockstats(&mut qmp);
    let dirty = query_block_dirty(&mut qmp);
    assert_eq!(dirty, implied_dirty_bytes(&seq));
    let m = metrics_of(http_unix(&metrics, &get_request("/metrics")));
    check_scrape(&m, &entry, dirty, &implied_per_queue(&seq));
    assert_eq!(
        m.sum("vubd_requests_total", &[("op", "read")]),
        stat(&entry, "rd_operations")
    );
    // Scraping twice at rest gives the same counts.
    let again = metrics_of(http_unix(&metrics, &get_request("/metrics")));
    check_scrape(&again, &entry, dirty, &implied_per_queue(&seq));

    // Other paths and methods.
    let other = http_unix(&metrics, &get_request("/"));
    assert!(other.status.starts_with("HTTP/1.1 404"), "{}", other.status);
    let other = http_unix(&metrics, &get_request("/metricsx"));
    assert!(other.status.starts_with("HTTP/1.1 404"), "{}", other.status);
    let post = http_unix(&metrics, "POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(post.status.starts_with("HTTP/1.1 405"), "{}", post.status);

    drop(client);
    let (status, stderr) = within("vubd: SIGTERM", move || vubd.stop());
    assert!(status.success(), "{status}: {stderr}");
    assert!(!metrics.exists(), "vubd left its metrics socket behind");
}

// ---------------------------------------------------------------------------------------------
// 3. Counts survive reconnects; the endpoint on TCP.

#[test]
fn counts_survive_a_reconnect_and_are_served_over_tcp() {
    let seq = sequence();
    let dir = graph("stats-reconnect");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let option = format!("tcp:{addr}");
    let vubd = Daemon::vubd_with(dir.path(), &export(&dir), &["--metrics", &option]);
    let mut qmp = vubd.qmp();

    let first = run_ok(connect(vubd.socket(), "vubd"), &seq, "first frontend");
    let before = vubd_blockstats(&mut qmp);
    let m = metrics_of(http_tcp(addr, &get_request("/metrics")));
    check_scrape(
        &m,
        &before,
        query_block_dirty(&mut qmp),
        &implied_per_queue(&seq),
    );
    drop(first);

    let one_more = [(
        1,
        Req::Read {
            offset: 3 * MIB,
            len: 4 * KIB,
        },
    )];
    let second = run_ok(connect(vubd.socket(), "vubd"), &one_more, "second frontend");
    let after = vubd_blockstats(&mut qmp);
    assert_eq!(
        stat(&after, "rd_operations"),
        stat(&before, "rd_operations") + 1,
        "one more read, counted once, on top of the first frontend's"
    );
    assert_eq!(
        stat(&after, "rd_bytes"),
        stat(&before, "rd_bytes") + 4 * KIB
    );
    for key in [
        "wr_operations",
        "wr_bytes",
        "flush_operations",
        "unmap_operations",
        "unmap_bytes",
        "wr_highest_offset",
        "failed_rd_operations",
        "invalid_rd_operations",
    ] {
        assert_eq!(
            stat(&after, key),
            stat(&before, key),
            "{key}: unchanged by the reconnect (no flush of vubd's own counted)"
        );
    }
    let all: Vec<(usize, Req)> = seq.iter().chain(&one_more).copied().collect();
    let m = metrics_of(http_tcp(addr, &get_request("/metrics")));
    check_scrape(
        &m,
        &after,
        query_block_dirty(&mut qmp),
        &implied_per_queue(&all),
    );

    let other = http_tcp(addr, &get_request("/other"));
    assert!(other.status.starts_with("HTTP/1.1 404"), "{}", other.status);

    drop(second);
    let (status, stderr) = within("vubd: SIGTERM", move || vubd.stop());
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(),
        "the endpoint is gone with vubd"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Requests past the end of the disk.

/// Requests libblkio passes to the device unchecked, each beyond the end of the disk.
fn out_of_range() -> Vec<(usize, Req)> {
    vec![
        (
            0,
            Req::Read {
                offset: DISK,
                len: 4 * KIB,
            },
        ),
        (
            0,
            Req::Read {
                offset: DISK - 512,
                len: 4 * KIB,
            },
        ),
        (
            1,
            Req::Write {
                offset: DISK,
                len: 512,
            },
        ),
        (
            1,
            Req::WriteZeroes {
                offset: DISK,
                len: 4 * KIB,
            },
        ),
        (
            0,
            Req::Discard {
                offset: DISK,
                len: 4 * KIB,
            },
        ),
    ]
}

#[test]
fn requests_past_the_end_are_counted_invalid() {
    let bad = out_of_range();
    let (vubd_dir, qsd_dir) = (graph("stats-inv-vubd"), graph("stats-inv-qsd"));
    let metrics = vubd_dir.join("metrics.sock");
    let option = format!("unix:{}", metrics.display());
    let vubd = Daemon::vubd_with(vubd_dir.path(), &export(&vubd_dir), &["--metrics", &option]);
    let qsd = Daemon::qsd(qsd_dir.path(), &export(&qsd_dir));

    // libblkio does not check ranges: every request reaches the device, and both daemons
    // answer each with VIRTIO_BLK_S_IOERR.
    let (vubd_client, vubd_results) = run(connect(vubd.socket(), "vubd"), bad.clone(), "vubd");
    let (qsd_client, qsd_results) = run(
        connect(qsd.socket(), "qemu-storage-daemon"),
        bad.clone(),
        "qemu-storage-daemon",
    );
    for (((q, req), v), s) in bad.iter().zip(&vubd_results).zip(&qsd_results) {
        assert_eq!(*s, Err(EIO), "qemu-storage-daemon: {req:?} on queue {q}");
        assert_eq!(
            v, s,
            "vubd answers {req:?} on queue {q} as qemu-storage-daemon does"
        );
    }

    // vubd: QEMU's virtio-blk counts out-of-range reads, writes and write-zeroes invalid, and
    // discards not at all; vubd counts every refused request by kind, discards as unmaps.
    let mut qmp = vubd.qmp();
    let v = vubd_blockstats(&mut qmp);
    for (key, want) in [
        ("invalid_rd_operations", 2),
        ("invalid_wr_operations", 2),
        ("invalid_unmap_operations", 1),
        ("invalid_flush_operations", 0),
        ("rd_operations", 0),
        ("wr_operations", 0),
        ("unmap_operations", 0),
        ("failed_rd_operations", 0),
        ("failed_wr_operations", 0),
        ("failed_unmap_operations", 0),
        ("wr_highest_offset", 0),
    ] {
        assert_eq!(stat(&v, key), want, "vubd {key}: {v}");
    }
    assert_eq!(v["stats"]["account_invalid"], true);
    // Refused before any I/O: qemu-storage-daemon's block layer saw no write either.
    let mut qq = qsd.qmp();
    assert_eq!(
        node_blockstats(&mut qq, "fmt")["stats"]["wr_highest_offset"],
        0,
        "qemu-storage-daemon"
    );
    let m = metrics_of(http_unix(&metrics, &get_request("/metrics")));
    for (q, op, want) in [
        (0, "read", 2),
        (1, "write", 1),
        (1, "write_zeroes", 1),
        (0, "discard", 1),
        (1, "read", 0),
        (0, "write", 0),
        (0, "flush", 0),
    ] {
        let queue = q.to_string();
        let l = [("queue", queue.as_str()), ("op", op)];
        assert_eq!(
            m.get("vubd_requests_invalid_total", &l),
            want,
            "queue {q} {op}"
        );
        assert_eq!(m.get("vubd_requests_total", &l), 0, "queue {q} {op}");
        assert_eq!(
            m.get("vubd_request_failures_total", &l),
            0,
            "queue {q} {op}"
        );
    }
    check_scrape(&m, &v, 0, &implied_per_queue(&[]));

    // The queues still serve, and count, what is valid.
    let valid = [(
        0,
        Req::Read {
            offset: 0,
            len: 4 * KIB,
        },
    )];
    let vubd_client = run_ok(vubd_client, &valid, "vubd");
    let v = vubd_blockstats(&mut qmp);
    assert_eq!(stat(&v, "rd_operations"), 1);
    assert_eq!(stat(&v, "invalid_rd_operations"), 2);

    drop((vubd_client, qsd_client));
    for (daemon, who) in [(vubd, "vubd"), (qsd, "qemu-storage-daemon")] {
        let (status, stderr) = within(&format!("{who}: SIGTERM"), move || daemon.stop());
        assert!(status.success(), "{who}: {status}: {stderr}");
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Bad --metrics.

/// Run `vubd serve ARGS...`, which must exit within [`DEADLINE`]; returns its exit code and
/// stderr.
fn serve_exits(args: &[&str]) -> (i32, String) {
    let mut child = Command::new(vubd_bin())
        .arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vubd");
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.try_wait().expect("wait vubd") {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code().unwrap_or(-1), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vubd serve {args:?} still running after {DEADLINE:?}; it should refuse");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn a_bad_metrics_option_fails_with_an_error_naming_it() {
    let dir = TempDir::new("stats-errors");
    let image = dir.join("disk.raw");
    create_image(&image, MIB as usize, 3);
    let socket = dir.join("blk.sock");
    let base = |metrics: &str| -> Vec<String> {
        vec![
            "--socket".into(),
            socket.to_str().unwrap().into(),
            "--image".into(),
            image.to_str().unwrap().into(),
            "--metrics".into(),
            metrics.into(),
        ]
    };

    // Malformed addresses: refused by the argument parser, before anything is opened. Its one
    // error line names the option; clap adds its usual hint line, as for every option.
    for bad in [
        "bogus",
        "tcp:nowhere",
        "tcp:127.0.0.1",
        "unix:",
        "http://127.0.0.1:9100",
    ] {
        let args = base(bad);
        let (code, stderr) = serve_exits(&strs(&args));
        assert_ne!(code, 0, "--metrics {bad}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let errors: Vec<&&str> = lines
            .iter()
            .filter(|l| **l != "For more information, try '--help'.")
            .collect();
        assert_eq!(errors.len(), 1, "--metrics {bad}: one error line: {stderr}");
        assert!(
            errors[0].contains("--metrics"),
            "--metrics {bad}: the error names the option: {stderr}"
        );
        assert!(!socket.exists(), "--metrics {bad}: no socket left behind");
    }

    // Well-formed but unusable: vubd's own one-line error. A TCP address in use is named with
    // the option; a UNIX path that cannot be bound is named as the file (docs/usage.md: "one
    // line on stderr naming the file or option"), without the option.
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = format!("tcp:{}", busy.local_addr().unwrap());
    let no_dir = dir.join("no/such/dir/m.sock");
    let nowhere = format!("unix:{}", no_dir.display());
    for (bad, named) in [
        (busy_addr.as_str(), "--metrics".to_string()),
        (nowhere.as_str(), no_dir.display().to_string()),
    ] {
        let args = base(bad);
        let (code, stderr) = serve_exits(&strs(&args));
        assert_ne!(code, 0, "--metrics {bad}: {stderr}");
        let line = one_line_error(&stderr);
        assert!(line.contains(&named), "--metrics {bad}: {line}");
        assert!(!socket.exists(), "--metrics {bad}: no socket left behind");
        eprintln!("--metrics {bad}: {line}");
    }
    drop(busy);
}
