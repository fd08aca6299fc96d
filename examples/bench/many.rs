//! Many disks: 8 exports under load at once, served by one vubd process, by 8 vubd processes
//! (one disk each), and by one qemu-storage-daemon with 8 exports (an iothread each). Each
//! disk is the mission's graph (qcow2 metadata over a raw data file, one enabled persistent
//! bitmap) with its own load generator; all backends share one CPU, all load generators the
//! other. The figures: aggregate IOPS, the slowest disk's IOPS (does one process serve every
//! disk fairly?), backend CPU per I/O, and the median of the disks' p50 latencies.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::host::{cpu_ticks, pinned, ticks_per_second, which};
use crate::report::{median_sample, ratio};
use crate::runner::{prepare_image, vubd_offline, Sample};
use crate::workloads::{workload, Workload};
use crate::Options;

/// The heading of the section.
pub const HEADING: &str = "## Many disks: 8 exports in one process or one process each";

/// Disks under load at once.
const DISKS: usize = 8;
/// Each disk's size: small enough for 8 in tmpfs beside the main image.
const DISK_MIB: u64 = 128;

/// How the disks are served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// One vubd process with `--disk` given 8 times.
    VubdOne,
    /// 8 vubd processes, one disk each.
    VubdEach,
    /// One qemu-storage-daemon with 8 exports, each on its own iothread.
    QsdOne,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::VubdOne => "vubd, 1 process",
            Layout::VubdEach => "vubd, 8 processes",
            Layout::QsdOne => "qemu-storage-daemon, 1 process",
        }
    }
}

/// One disk's files.
fn disk_dir(work: &Path, i: usize) -> PathBuf {
    work.join(format!("many-{i}"))
}

fn socket(work: &Path, i: usize) -> PathBuf {
    disk_dir(work, i).join("blk.sock")
}

/// The backend processes of one layout.
struct Backends(Vec<Child>);

impl Backends {
    fn pids(&self) -> Vec<u32> {
        self.0.iter().map(Child::id).collect()
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        for child in &self.0 {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        for child in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn start(layout: Layout, o: &Options, work: &Path) -> Result<Backends, String> {
    for i in 0..DISKS {
        let _ = fs::remove_file(socket(work, i));
    }
    let cache = if o.direct { "none" } else { "writeback" };
    let disk_option = |i: usize| {
        let dir = disk_dir(work, i);
        format!(
            "image={},format=qcow2,socket={},cache={cache},node-name=disk{i}",
            dir.join("meta.qcow2").display(),
            socket(work, i).display()
        )
    };
    let spawn = |mut c: Command, what: &str| {
        c.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {what}: {e}"))
    };
    let children = match layout {
        Layout::VubdOne => {
            let mut c = pinned(1, "target/release/vubd");
            c.arg("serve").args(&o.vubd_args);
            for i in 0..DISKS {
                c.arg("--disk").arg(disk_option(i));
            }
            vec![spawn(c, "vubd")?]
        }
        Layout::VubdEach => (0..DISKS)
            .map(|i| {
                let mut c = pinned(1, "target/release/vubd");
                c.arg("serve")
                    .args(&o.vubd_args)
                    .arg("--disk")
                    .arg(disk_option(i));
                spawn(c, "vubd")
            })
            .collect::<Result<_, _>>()?,
        Layout::QsdOne => {
            let direct = if o.direct { "on" } else { "off" };
            let mut c = pinned(1, "qemu-storage-daemon");
            for i in 0..DISKS {
                let dir = disk_dir(work, i);
                c.arg("--blockdev").arg(format!(
                    "driver=file,node-name=data{i},filename={},aio=io_uring,cache.direct={direct}",
                    dir.join("disk.raw").display()
                ));
                c.arg("--blockdev").arg(format!(
                    "driver=file,node-name=meta{i},filename={}",
                    dir.join("meta.qcow2").display()
                ));
                c.arg("--blockdev").arg(format!(
                    "driver=qcow2,node-name=fmt{i},file=meta{i},data-file=data{i}"
                ));
                c.arg("--object").arg(format!("iothread,id=io{i}"));
                c.arg("--export").arg(format!(
                    "type=vhost-user-blk,id=e{i},node-name=fmt{i},addr.type=unix,addr.path={},\
                     writable=on,num-queues=1,iothread=io{i}",
                    socket(work, i).display()
                ));
            }
            vec![spawn(c, "qemu-storage-daemon")?]
        }
    };
    let backends = Backends(children);
    let deadline = Instant::now() + Duration::from_secs(30);
    while (0..DISKS).any(|i| !socket(work, i).exists()) {
        if Instant::now() > deadline {
            return Err(format!("{} did not start", layout.name()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    Ok(backends)
}

/// One run: a load generator per disk, all at once. The sample's IOPS is the sum, `bw` holds
/// the slowest disk's IOPS, `p50` the median of the disks' p50s.
fn run_once(o: &Options, work: &Path, w: &Workload, backends: &Backends) -> Result<Sample, String> {
    let pids = backends.pids();
    let before: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
    let loads = (0..DISKS)
        .map(|i| {
            pinned(0, "target/release/examples/loadgen")
                .arg("--socket")
                .arg(socket(work, i))
                .args(["--rw", w.rw, "--bs", w.bs])
                .args(["--iodepth", &w.iodepth.to_string(), "--queues", "1"])
                .args(["--runtime", &o.runtime.to_string(), "--json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("loadgen: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut per_disk = Vec::with_capacity(DISKS);
    for load in loads {
        let out = load
            .wait_with_output()
            .map_err(|e| format!("loadgen: {e}"))?;
        if !out.status.success() {
            return Err(format!("loadgen: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let v: Value =
            serde_json::from_slice(&out.stdout).map_err(|e| format!("loadgen JSON: {e}"))?;
        per_disk.push((
            v["iops"].as_f64().unwrap_or(0.0),
            v["ios"].as_f64().unwrap_or(0.0),
            v["lat_us"]["p50"].as_f64().unwrap_or(0.0),
        ));
    }
    let after: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
    let ios: f64 = per_disk.iter().map(|d| d.1).sum::<f64>().max(1.0);
    let mut p50s: Vec<f64> = per_disk.iter().map(|d| d.2).collect();
    p50s.sort_by(f64::total_cmp);
    Ok(Sample {
        iops: per_disk.iter().map(|d| d.0).sum(),
        bw: per_disk.iter().map(|d| d.0).fold(f64::INFINITY, f64::min),
        p50: p50s[p50s.len() / 2],
        p99: 0.0,
        cpu_us: (after - before) as f64 / ticks_per_second() * 1e6 / ios,
    })
}

/// The section: every layout on each workload, alternating run by run, medians.
pub fn run(o: &Options, work: &Path) -> Result<String, String> {
    for i in 0..DISKS {
        let dir = disk_dir(work, i);
        prepare_image(&dir, DISK_MIB, false)?;
        let meta = dir.join("meta.qcow2");
        vubd_offline(&[
            "bitmap",
            meta.to_str().ok_or("non-UTF-8 path")?,
            "add",
            "backup",
        ])?;
    }
    let mut layouts = vec![Layout::VubdOne, Layout::VubdEach];
    if which("qemu-storage-daemon") {
        layouts.push(Layout::QsdOne);
    }
    let workloads = [
        workload("4k randread qd8", "randread", "4k", 8, &[]),
        workload("4k randwrite qd8", "randwrite", "4k", 8, &[]),
    ];
    let mut md = String::new();
    let _ = writeln!(md, "{HEADING}\n");
    let _ = writeln!(
        md,
        "{DISKS} disks of {DISK_MIB} MiB in `{}`, each qcow2 metadata over a raw data file with \
         one enabled persistent bitmap, one queue each, all under load at once from {DISKS} \
         load generators (on CPU 0; every backend process on CPU 1). Median of {} runs of {} s, \
         layouts alternating. Total IOPS is the sum over the disks; the slowest disk shows \
         whether every disk gets its share; CPU is all backend processes' per I/O.\n",
        o.dir.display(),
        o.reps,
        o.runtime
    );
    let _ = writeln!(
        md,
        "| workload | layout | total IOPS | slowest disk IOPS | median p50 µs | CPU µs/IO | IOPS vs 8 processes |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|");
    for w in &workloads {
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); layouts.len()];
        for rep in 0..o.reps {
            for k in 0..layouts.len() {
                let slot = (k + rep as usize) % layouts.len();
                let backends = start(layouts[slot], o, work)?;
                let s = run_once(o, work, w, &backends)?;
                drop(backends);
                eprintln!(
                    "bench: {:<18} {:<32} run {}: {:>9.0} IOPS (slowest disk {:>7.0})  CPU {:>6.2} us/IO",
                    w.label,
                    layouts[slot].name(),
                    rep + 1,
                    s.iops,
                    s.bw,
                    s.cpu_us
                );
                samples[slot].push(s);
            }
        }
        let medians: Vec<Sample> = samples.iter().map(|s| median_sample(s)).collect();
        let each = medians[1];
        for (layout, m) in layouts.iter().zip(&medians) {
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.0} | {:.1} | {:.2} | {:.2} |",
                w.label,
                layout.name(),
                m.iops,
                m.bw,
                m.p50,
                m.cpu_us,
                ratio(m.iops, each.iops)
            );
        }
    }
    md.push('\n');
    Ok(md)
}
