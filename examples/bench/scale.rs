//! Scale: a 1 TiB raw data file (sparse) with qcow2 metadata beside it and 8 enabled
//! persistent bitmaps, served by vubd and by qemu-storage-daemon in turn. For each: how long
//! until it serves (opening the image, loading and — for vubd — preallocating the bitmaps),
//! its memory once open, its memory after random writes spread over the whole terabyte
//! (every L2 table and bitmap region touched), and how long a clean shutdown takes, storing
//! the bitmaps. The goal: no worse than qemu-storage-daemon on each.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::host::{pinned, which};
use crate::runner::{prepare_image, qsd_command, vubd_offline};
use crate::Options;

/// The heading of the section.
pub const HEADING: &str = "## Scale: a 1 TiB disk with 8 bitmaps";

const DISK_MIB: u64 = 1 << 20;
const BITMAPS: usize = 8;
/// Random 4 KiB writes over the whole disk.
const WRITES: u64 = 100_000;

/// What one backend showed.
#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    open: Duration,
    rss_open_kib: u64,
    rss_written_kib: u64,
    shutdown: Duration,
}

/// `VmRSS` of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A fresh image: the sparse data file, its metadata, the bitmaps.
fn prepare(dir: &Path) -> Result<(), String> {
    let _ = fs::remove_dir_all(dir);
    prepare_image(dir, DISK_MIB, true)?;
    let meta = dir.join("meta.qcow2");
    let meta = meta.to_str().ok_or("non-UTF-8 path")?;
    for i in 0..BITMAPS {
        vubd_offline(&["bitmap", meta, "add", &format!("b{i}")])?;
    }
    Ok(())
}

fn spawn(qsd: bool, dir: &Path) -> Result<Child, String> {
    let sock = dir.join("scale.sock");
    let mut c = if qsd {
        qsd_command(dir, &sock, false, 1)
    } else {
        let mut c = pinned(1, "target/release/vubd");
        c.args(["serve", "--socket"])
            .arg(&sock)
            .arg("--image")
            .arg(dir.join("meta.qcow2"))
            .args(["--format", "qcow2"]);
        c
    };
    c.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the scale backend: {e}"))
}

/// One backend's figures on a fresh image.
fn measure(qsd: bool, dir: &Path) -> Result<Figures, String> {
    prepare(dir)?;
    let sock = dir.join("scale.sock");
    let started = Instant::now();
    let mut child = spawn(qsd, dir)?;
    while !sock.exists() {
        if started.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            return Err("the scale backend did not start".into());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the scale backend exited: {status}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let open = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let pid = child.id();
    let rss_open_kib = rss_kib(pid);
    let out = pinned(0, "target/release/examples/loadgen")
        .arg("--socket")
        .arg(&sock)
        .args(["--rw", "randwrite", "--bs", "4k", "--iodepth", "32"])
        .args(["--ios", &WRITES.to_string(), "--runtime", "600", "--json"])
        .output()
        .map_err(|e| format!("loadgen: {e}"))?;
    if !out.status.success() {
        let _ = child.kill();
        return Err(format!("loadgen: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let rss_written_kib = rss_kib(pid);
    let stopping = Instant::now();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = child.wait().map_err(|e| format!("waiting: {e}"))?;
    let shutdown = stopping.elapsed();
    if !status.success() {
        return Err(format!("the scale backend exited {status} at shutdown"));
    }
    Ok(Figures {
        open,
        rss_open_kib,
        rss_written_kib,
        shutdown,
    })
}

/// The section.
pub fn run(o: &Options, work: &Path) -> Result<String, String> {
    let dir = work.join("scale");
    let vubd = measure(false, &dir)?;
    eprintln!("bench: scale vubd {vubd:?}");
    let qsd = if which("qemu-storage-daemon") {
        let qsd = measure(true, &dir)?;
        eprintln!("bench: scale qemu-storage-daemon {qsd:?}");
        Some(qsd)
    } else {
        None
    };
    let _ = fs::remove_dir_all(&dir);
    let mut md = String::new();
    let _ = writeln!(md, "{HEADING}\n");
    let _ = writeln!(
        md,
        "A sparse 1 TiB raw data file in `{}` with qcow2 metadata beside it (`vubd create`) and \
         {BITMAPS} enabled persistent bitmaps (64 KiB granularity), served with default options \
         and one queue. *Open*: from start to the socket listening. *RSS*: resident memory, \
         once open and after {WRITES} random 4 KiB writes over the whole disk at depth 32 \
         (shared guest memory mapped by the backend included for both). *Shutdown*: from \
         SIGTERM to exit, bitmaps stored. One run each; lower is better.\n",
        o.dir.display()
    );
    let _ = writeln!(
        md,
        "| | vubd | qemu-storage-daemon | vubd / qsd | goal met |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---|");
    let mib = |kib: u64| kib as f64 / 1024.0;
    let rows: [(&str, f64, Option<f64>, &str); 4] = [
        (
            "open",
            vubd.open.as_secs_f64(),
            qsd.map(|q| q.open.as_secs_f64()),
            "s",
        ),
        (
            "RSS once open",
            mib(vubd.rss_open_kib),
            qsd.map(|q| mib(q.rss_open_kib)),
            "MiB",
        ),
        (
            "RSS after the writes",
            mib(vubd.rss_written_kib),
            qsd.map(|q| mib(q.rss_written_kib)),
            "MiB",
        ),
        (
            "shutdown, bitmaps stored",
            vubd.shutdown.as_secs_f64(),
            qsd.map(|q| q.shutdown.as_secs_f64()),
            "s",
        ),
    ];
    for (what, v, q, unit) in rows {
        match q {
            Some(q) => {
                let met = if v <= q { "yes" } else { "**no**" };
                let _ = writeln!(
                    md,
                    "| {what} | {v:.3} {unit} | {q:.3} {unit} | {:.2} | {met} |",
                    if q > 0.0 { v / q } else { 0.0 }
                );
            }
            None => {
                let _ = writeln!(md, "| {what} | {v:.3} {unit} | | | |");
            }
        }
    }
    md.push('\n');
    Ok(md)
}
