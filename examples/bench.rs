//! `make bench`: vubd and qemu-storage-daemon side by side on the mission's configuration — a
//! qcow2 metadata image over a raw data file (`data_file_raw`) with one enabled persistent
//! dirty bitmap — driven by the same independent frontend (the libblkio-based `loadgen`),
//! backends alternating run by run, each figure the median of several runs. The limit is fio
//! with io_uring straight on the raw data file. Writes `docs/benchmarks.md` and a chart.
//!
//! ```text
//! cargo run --release --example bench -- [--runtime 5] [--reps 3] [--dir /dev/shm]
//!     [--cache none] [--size-mib 1024] [--vubd-args "..."] [--out docs/benchmarks.md]
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use plotters::prelude::*;
use serde_json::Value;

#[derive(Clone, Debug)]
struct Options {
    runtime: u32,
    reps: u32,
    dir: PathBuf,
    direct: bool,
    size_mib: u64,
    vubd_args: Vec<String>,
    out: PathBuf,
}

#[derive(Clone, Copy, Debug)]
struct Workload {
    label: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
    queues: u32,
    /// Options vubd runs this workload with, beyond the bench's own.
    vubd_args: &'static [&'static str],
    /// What vubd must reach against qemu-storage-daemon on this workload.
    targets: &'static [Target],
}

/// A target of the issue, as a ratio of vubd's figure to qemu-storage-daemon's.
#[derive(Clone, Copy, Debug)]
enum Target {
    IopsAtLeast(f64),
    P50AtMost(f64),
    CpuAtMost(f64),
    MbsAtLeast(f64),
}

const fn workload(
    label: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
    targets: &'static [Target],
) -> Workload {
    Workload {
        label,
        rw,
        bs,
        iodepth,
        queues: 1,
        vubd_args: &[],
        targets,
    }
}

/// A workload again, with vubd's optional busy-polling.
const fn polled(w: Workload, label: &'static str) -> Workload {
    Workload {
        label,
        vubd_args: &["--poll-us", "50"],
        ..w
    }
}

const DEPTH_1: &[Target] = &[Target::P50AtMost(0.7)];
const DEPTH_32: &[Target] = &[Target::IopsAtLeast(2.5), Target::CpuAtMost(0.5)];
const SEQUENTIAL: &[Target] = &[Target::MbsAtLeast(1.5)];

const RANDREAD_QD1: Workload = workload("4k randread qd1", "randread", "4k", 1, DEPTH_1);
const RANDWRITE_QD1: Workload = workload("4k randwrite qd1", "randwrite", "4k", 1, DEPTH_1);
const RANDWRITE_QD32: Workload = workload("4k randwrite qd32", "randwrite", "4k", 32, DEPTH_32);
const READ_64K: Workload = workload("64k read qd8", "read", "64k", 8, SEQUENTIAL);
const WRITE_64K: Workload = workload("64k write qd8", "write", "64k", 8, SEQUENTIAL);

/// The issue's workloads, then those whose targets are close again with vubd's optional
/// busy-polling (qemu-storage-daemon's iothread polls adaptively by default, up to 32 µs).
const WORKLOADS: [Workload; 12] = [
    RANDREAD_QD1,
    workload("4k randread qd32", "randread", "4k", 32, DEPTH_32),
    RANDWRITE_QD1,
    RANDWRITE_QD32,
    READ_64K,
    WRITE_64K,
    Workload {
        queues: 2,
        ..workload("4k randread qd32 2q", "randread", "4k", 32, &[])
    },
    polled(RANDREAD_QD1, "4k randread qd1, vubd --poll-us 50"),
    polled(RANDWRITE_QD1, "4k randwrite qd1, vubd --poll-us 50"),
    polled(RANDWRITE_QD32, "4k randwrite qd32, vubd --poll-us 50"),
    polled(READ_64K, "64k read qd8, vubd --poll-us 50"),
    polled(WRITE_64K, "64k write qd8, vubd --poll-us 50"),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Backend {
    Vubd,
    Qsd,
    /// fio with io_uring straight on the data file: the limit the issue names.
    FioUring,
    /// fio with synchronous preadv/pwritev: on tmpfs, io_uring hands most transfers to kernel
    /// worker threads, and plain system calls are the faster way to the same memory.
    FioSync,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Vubd => "vubd",
            Backend::Qsd => "qemu-storage-daemon",
            Backend::FioUring => "fio io_uring",
            Backend::FioSync => "fio psync",
        }
    }
}

/// One run's figures.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    iops: f64,
    bw: f64,
    p50: f64,
    p99: f64,
    /// Backend CPU time (user + system) per I/O, in microseconds.
    cpu_us: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

fn median_sample(samples: &[Sample]) -> Sample {
    Sample {
        iops: median(samples.iter().map(|s| s.iops).collect()),
        bw: median(samples.iter().map(|s| s.bw).collect()),
        p50: median(samples.iter().map(|s| s.p50).collect()),
        p99: median(samples.iter().map(|s| s.p99).collect()),
        cpu_us: median(samples.iter().map(|s| s.cpu_us).collect()),
    }
}

fn usage() -> String {
    "usage: bench [--runtime S] [--reps N] [--dir DIR] [--cache none|writeback] [--size-mib N] \
     [--vubd-args ARGS] [--out FILE.md]"
        .into()
}

fn parse_args() -> Result<Options, String> {
    let mut o = Options {
        runtime: 5,
        reps: 3,
        dir: PathBuf::from("/dev/shm"),
        direct: false,
        size_mib: 1024,
        vubd_args: Vec::new(),
        out: PathBuf::from("docs/benchmarks.md"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args
            .next()
            .ok_or_else(|| format!("{a} needs a value\n{}", usage()))?;
        match a.as_str() {
            "--runtime" => o.runtime = v.parse().map_err(|_| "bad --runtime")?,
            "--reps" => o.reps = v.parse::<u32>().map_err(|_| "bad --reps")?.max(1),
            "--dir" => o.dir = PathBuf::from(v),
            "--cache" => o.direct = v == "none",
            "--size-mib" => o.size_mib = v.parse().map_err(|_| "bad --size-mib")?,
            "--vubd-args" => o.vubd_args = v.split_whitespace().map(String::from).collect(),
            "--out" => o.out = PathBuf::from(v),
            _ => return Err(format!("unknown option {a}\n{}", usage())),
        }
    }
    Ok(o)
}

fn which(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success())
}

fn tool_version(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_else(|_| "not installed".into())
}

/// CPU pinning: the backend on CPU 1, the load on CPU 0, when there are two CPUs.
fn pinned(cpu: u32, program: &str) -> Command {
    if std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2) {
        let mut c = Command::new("taskset");
        c.args(["-c", &cpu.to_string(), program]);
        c
    } else {
        Command::new(program)
    }
}

fn cpu_ticks(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) start at ") ".
            let rest = s.rsplit_once(") ")?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// A running backend.
struct Running {
    child: Child,
    pid: u32,
}

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_backend(
    backend: Backend,
    o: &Options,
    work: &Path,
    w: &Workload,
) -> Result<Running, String> {
    let queues = w.queues;
    let sock = work.join("bench.sock");
    let _ = fs::remove_file(&sock);
    let mut cmd = match backend {
        Backend::Vubd => {
            let mut c = pinned(1, "target/release/vubd");
            c.args(["serve", "--socket"])
                .arg(&sock)
                .arg("--image")
                .arg(work.join("meta.qcow2"))
                .args(["--format", "qcow2", "--num-queues", &queues.to_string()])
                .args(["--cache", if o.direct { "none" } else { "writeback" }])
                .args(&o.vubd_args)
                .args(w.vubd_args);
            c
        }
        Backend::Qsd => {
            let direct = if o.direct { "on" } else { "off" };
            let mut c = pinned(1, "qemu-storage-daemon");
            c.arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=data,filename={},aio=io_uring,cache.direct={direct}",
                    work.join("disk.raw").display()
                ))
                .arg("--blockdev")
                .arg(format!("driver=file,node-name=meta,filename={}", work.join("meta.qcow2").display()))
                .args(["--blockdev", "driver=qcow2,node-name=fmt,file=meta,data-file=data"])
                .args(["--object", "iothread,id=io0"])
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e,node-name=fmt,addr.type=unix,addr.path={},writable=on,num-queues={queues},iothread=io0",
                    sock.display()
                ));
            c
        }
        Backend::FioUring | Backend::FioSync => return Err("fio is not a backend".into()),
    };
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", backend.name()))?;
    let pid = child.id();
    let running = Running { child, pid };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} did not start", backend.name()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    Ok(running)
}

fn run_loadgen(
    o: &Options,
    work: &Path,
    w: &Workload,
    backend: &Running,
) -> Result<Sample, String> {
    let before = cpu_ticks(backend.pid);
    let out = pinned(0, "target/release/examples/loadgen")
        .arg("--socket")
        .arg(work.join("bench.sock"))
        .args(["--rw", w.rw, "--bs", w.bs])
        .args([
            "--iodepth",
            &w.iodepth.to_string(),
            "--queues",
            &w.queues.to_string(),
        ])
        .args(["--runtime", &o.runtime.to_string(), "--json"])
        .output()
        .map_err(|e| format!("loadgen: {e}"))?;
    let after = cpu_ticks(backend.pid);
    if !out.status.success() {
        return Err(format!("loadgen: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("loadgen JSON: {e}"))?;
    let ios = v["ios"].as_f64().unwrap_or(1.0).max(1.0);
    Ok(Sample {
        iops: v["iops"].as_f64().unwrap_or(0.0),
        bw: v["bw_bytes"].as_f64().unwrap_or(0.0),
        p50: v["lat_us"]["p50"].as_f64().unwrap_or(0.0),
        p99: v["lat_us"]["p99"].as_f64().unwrap_or(0.0),
        cpu_us: (after - before) as f64 / ticks_per_second() * 1e6 / ios,
    })
}

fn run_fio(o: &Options, work: &Path, w: &Workload, engine: Backend) -> Result<Sample, String> {
    let engine = if engine == Backend::FioSync {
        "psync"
    } else {
        "io_uring"
    };
    let out = pinned(0, "fio")
        .args(["--name=limit", "--time_based"])
        .arg(format!("--ioengine={engine}"))
        .args(["--group_reporting"])
        .arg(format!("--filename={}", work.join("disk.raw").display()))
        .arg(format!("--rw={}", w.rw))
        .arg(format!("--bs={}", w.bs))
        // A synchronous engine has one I/O in flight per job whatever the depth (fio says so on
        // stdout, ahead of the JSON, if asked for more).
        .arg(format!(
            "--iodepth={}",
            if engine == "psync" { 1 } else { w.iodepth }
        ))
        .arg(format!("--numjobs={}", w.queues))
        .arg(format!("--runtime={}", o.runtime))
        .arg(format!("--direct={}", u8::from(o.direct)))
        .arg("--output-format=json")
        .output()
        .map_err(|e| format!("fio: {e}"))?;
    if !out.status.success() {
        return Err(format!("fio: {}", String::from_utf8_lossy(&out.stderr)));
    }
    // fio may print notes before the JSON document.
    let json = out
        .stdout
        .iter()
        .position(|&b| b == b'{')
        .map_or(&[][..], |at| &out.stdout[at..]);
    let v: Value = serde_json::from_slice(json).map_err(|e| format!("fio JSON: {e}"))?;
    let job = &v["jobs"][0];
    let side = if w.rw.contains("write") {
        &job["write"]
    } else {
        &job["read"]
    };
    let pct = |p: &str| side["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
    Ok(Sample {
        iops: side["iops"].as_f64().unwrap_or(0.0),
        bw: side["bw_bytes"].as_f64().unwrap_or(0.0),
        p50: pct("50.000000"),
        p99: pct("99.000000"),
        cpu_us: 0.0,
    })
}

/// Create the data file (filled, not holes), the metadata and the bitmap.
fn prepare(o: &Options, work: &Path) -> Result<(), String> {
    fs::create_dir_all(work).map_err(|e| format!("{}: {e}", work.display()))?;
    let disk = work.join("disk.raw");
    let status = Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "status=none"])
        .arg(format!("of={}", disk.display()))
        .arg(format!("count={}", o.size_mib))
        .status()
        .map_err(|e| format!("dd: {e}"))?;
    if !status.success() {
        return Err("dd failed".into());
    }
    let run = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("target/release/vubd")
            .args(args)
            .output()
            .map_err(|e| format!("vubd: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    };
    let meta = work.join("meta.qcow2");
    let meta = meta.to_str().ok_or("non-UTF-8 path")?;
    run(&[
        "create",
        meta,
        "--data-file",
        disk.to_str().ok_or("non-UTF-8 path")?,
    ])?;
    run(&["bitmap", meta, "add", "backup"])
}

type Results = BTreeMap<(usize, Backend), Sample>;

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

fn report(
    o: &Options,
    results: &Results,
    have_qsd: bool,
    have_fio: bool,
    elapsed: Duration,
) -> String {
    let mut md = String::new();
    let cpu_model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let _ = writeln!(md, "# Benchmarks: vubd and qemu-storage-daemon\n");
    let _ = writeln!(
        md,
        "Generated by `make bench` (`examples/bench.rs`) in {:.0} s. Every figure is the median of {} runs of {} s; \
         the backends alternate run by run.\n",
        elapsed.as_secs_f64(),
        o.reps,
        o.runtime
    );
    let _ = writeln!(md, "## Setup\n");
    let _ = writeln!(
        md,
        "* Machine: {} CPUs ({cpu_model}), kernel {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        kernel.trim()
    );
    let _ = writeln!(
        md,
        "* vubd {} ({}); {}; {}",
        env!("CARGO_PKG_VERSION"),
        if o.vubd_args.is_empty() {
            "default options".to_string()
        } else {
            o.vubd_args.join(" ")
        },
        tool_version("qemu-storage-daemon", "--version"),
        tool_version("fio", "--version")
    );
    let _ = writeln!(
        md,
        "* Image: a {} MiB raw data file of random data in `{}` with qcow2 metadata beside it \
         (`data_file_raw`, made by `vubd create`) and one enabled persistent dirty bitmap; {}.",
        o.size_mib,
        o.dir.display(),
        if o.direct {
            "`--cache none` / `cache.direct=on` (O_DIRECT) on the data file"
        } else {
            "page cache (`--cache writeback`)"
        }
    );
    let _ = writeln!(
        md,
        "* qemu-storage-daemon: the same qcow2 node over the same files, `aio=io_uring`, its export on \
         its own iothread (`--object iothread,id=io0`, `iothread=io0`)."
    );
    let _ = writeln!(
        md,
        "* Frontend: `examples/loadgen` (libblkio's `virtio-blk-vhost-user` driver) for both. The backend \
         runs on CPU 1 and the load generator on CPU 0. Backend CPU time is user + system time of the \
         backend process (all its threads, io_uring workers included) per I/O, from `/proc`.\n\
         * Limit: fio straight on the raw data file (no virtio, no vhost-user), same block size, \
         depth and jobs, on CPU 0: with `ioengine=io_uring`, and with `ioengine=psync` (one I/O at \
         a time per job), since on tmpfs io_uring hands transfers to kernel worker threads and \
         plain system calls reach the same memory faster. The chart uses the better of the two.\n"
    );
    let _ = writeln!(md, "## Results\n");
    let _ = writeln!(md, "| workload | vubd IOPS | qsd IOPS | IOPS × | vubd MB/s | qsd MB/s | vubd p50 / p99 µs | qsd p50 / p99 µs | p50 × | vubd CPU µs/IO | qsd CPU µs/IO | CPU × | fio io_uring IOPS (p50 µs) | fio psync IOPS (p50 µs) |");
    let _ = writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (i, w) in WORKLOADS.iter().enumerate() {
        let v = results
            .get(&(i, Backend::Vubd))
            .copied()
            .unwrap_or_default();
        let q = results.get(&(i, Backend::Qsd)).copied().unwrap_or_default();
        let fio = |b: Backend| match results.get(&(i, b)) {
            Some(f) if have_fio => format!("{:.0} ({:.1})", f.iops, f.p50),
            _ => "–".to_string(),
        };
        let qcol = |x: String| if have_qsd { x } else { "–".to_string() };
        let _ = writeln!(
            md,
            "| {} | {:.0} | {} | {} | {:.0} | {} | {:.1} / {:.1} | {} | {} | {:.2} | {} | {} | {} | {} |",
            w.label,
            v.iops,
            qcol(format!("{:.0}", q.iops)),
            qcol(format!("{:.2}", ratio(v.iops, q.iops))),
            v.bw / 1e6,
            qcol(format!("{:.0}", q.bw / 1e6)),
            v.p50,
            v.p99,
            qcol(format!("{:.1} / {:.1}", q.p50, q.p99)),
            qcol(format!("{:.2}", ratio(v.p50, q.p50))),
            v.cpu_us,
            qcol(format!("{:.2}", q.cpu_us)),
            qcol(format!("{:.2}", ratio(v.cpu_us, q.cpu_us))),
            fio(Backend::FioUring),
            fio(Backend::FioSync),
        );
    }
    if have_qsd {
        let _ = writeln!(
            md,
            "\n## Targets (vubd against qemu-storage-daemon, one queue)\n"
        );
        let _ = writeln!(md, "| target | measured | met |");
        let _ = writeln!(md, "| --- | --- | :---: |");
        let get = |i: usize, b: Backend| results.get(&(i, b)).copied().unwrap_or_default();
        for (i, w) in WORKLOADS.iter().enumerate() {
            let (v, q) = (get(i, Backend::Vubd), get(i, Backend::Qsd));
            for target in w.targets {
                let (what, r, ok) = match *target {
                    Target::IopsAtLeast(t) => {
                        let r = ratio(v.iops, q.iops);
                        (format!("IOPS ≥ {t}×"), r, r >= t)
                    }
                    Target::P50AtMost(t) => {
                        let r = ratio(v.p50, q.p50);
                        (format!("p50 latency ≤ {t}×"), r, r <= t)
                    }
                    Target::CpuAtMost(t) => {
                        let r = ratio(v.cpu_us, q.cpu_us);
                        (format!("CPU per I/O ≤ {t}×"), r, r <= t)
                    }
                    Target::MbsAtLeast(t) => {
                        let r = ratio(v.bw, q.bw);
                        (format!("MB/s ≥ {t}×"), r, r >= t)
                    }
                };
                let _ = writeln!(
                    md,
                    "| {}: {what} | {r:.2}× | {} |",
                    w.label,
                    if ok { "yes" } else { "**no**" }
                );
            }
        }
    } else {
        let _ = writeln!(
            md,
            "\nqemu-storage-daemon is not installed: its columns are skipped."
        );
    }
    if have_fio {
        let png = o.out.with_extension("png");
        let name = png.file_name().unwrap_or_default().to_string_lossy();
        let _ = writeln!(md, "\n![Throughput as a share of the fio limit]({name})\n");
    } else {
        let _ = writeln!(md, "\nfio is not installed: no limit and no chart.\n");
    }
    let _ = writeln!(
        md,
        "Where the time goes, the profiles behind these figures and what is left: \
         [performance.md](performance.md).\n"
    );
    md
}

/// Grouped bars: each backend's throughput as a percentage of the fio limit, per workload.
fn chart(path: &Path, results: &Results, have_qsd: bool) -> Result<(), String> {
    let font = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
    ]
    .iter()
    .find_map(|p| fs::read(p).ok())
    .ok_or("no DejaVuSans.ttf font (install fonts-dejavu-core)")?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| "cannot load the font")?;
    let backends: Vec<Backend> = if have_qsd {
        vec![Backend::Vubd, Backend::Qsd]
    } else {
        vec![Backend::Vubd]
    };
    let colors = [RGBColor(0x1f, 0x77, 0xb4), RGBColor(0xd6, 0x27, 0x28)];
    let pct = |i: usize, b: Backend| {
        let limit = [Backend::FioUring, Backend::FioSync]
            .iter()
            .filter_map(|f| results.get(&(i, *f)))
            .map(|s| s.iops)
            .fold(0.0, f64::max);
        ratio(results.get(&(i, b)).map(|s| s.iops).unwrap_or(0.0), limit) * 100.0
    };
    let max = (0..WORKLOADS.len())
        .flat_map(|i| backends.iter().map(move |b| (i, *b)))
        .map(|(i, b)| pct(i, b))
        .fold(100.0f64, f64::max);
    let root = BitMapBackend::new(path, (1800, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let n = WORKLOADS.len() as f64;
    let mut c = ChartBuilder::on(&root)
        .caption(
            "Throughput as % of fio on the raw data file (higher is better)",
            ("sans-serif", 24),
        )
        .margin(20)
        .x_label_area_size(70)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n, 0f64..(max * 1.1))
        .map_err(|e| e.to_string())?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(WORKLOADS.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < WORKLOADS.len() {
                WORKLOADS[i].label.replace(", vubd --poll-us 50", " (poll)")
            } else {
                String::new()
            }
        })
        .y_desc("% of fio limit (IOPS)")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| e.to_string())?;
    let width = 0.8 / backends.len() as f64;
    for (k, b) in backends.iter().enumerate() {
        let color = colors[k];
        c.draw_series((0..WORKLOADS.len()).map(|i| {
            let x0 = i as f64 + 0.1 + k as f64 * width;
            Rectangle::new([(x0, 0.0), (x0 + width * 0.95, pct(i, *b))], color.filled())
        }))
        .map_err(|e| e.to_string())?
        .label(b.name())
        .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    // Top left: above the depth-1 bars, which are the lowest.
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}

fn run(o: Options) -> Result<(), String> {
    let started = Instant::now();
    let have_qsd = which("qemu-storage-daemon");
    let have_fio = which("fio");
    if !have_qsd {
        eprintln!("bench: qemu-storage-daemon is not installed (Debian: qemu-utils); measuring vubd alone");
    }
    if !have_fio {
        eprintln!("bench: fio is not installed; the limit column is skipped");
    }
    let work = o.dir.join(format!("vubd-bench-{}", std::process::id()));
    let cleanup = Cleanup(work.clone());
    prepare(&o, &work)?;
    let mut samples: BTreeMap<(usize, Backend), Vec<Sample>> = BTreeMap::new();
    for (i, w) in WORKLOADS.iter().enumerate() {
        for rep in 0..o.reps {
            let mut order = vec![Backend::Vubd];
            if have_qsd {
                order.push(Backend::Qsd);
            }
            if rep % 2 == 1 {
                order.reverse();
            }
            for b in order {
                let running = start_backend(b, &o, &work, w)?;
                let s = run_loadgen(&o, &work, w, &running)?;
                drop(running);
                eprintln!(
                    "bench: {:<20} {:<20} run {}: {:>9.0} IOPS  p50 {:>7.1} us  CPU {:>6.2} us/IO",
                    w.label,
                    b.name(),
                    rep + 1,
                    s.iops,
                    s.p50,
                    s.cpu_us
                );
                samples.entry((i, b)).or_default().push(s);
            }
            // The limit does not depend on vubd's options: measured once per I/O pattern.
            if have_fio && w.vubd_args.is_empty() {
                for f in [Backend::FioUring, Backend::FioSync] {
                    samples
                        .entry((i, f))
                        .or_default()
                        .push(run_fio(&o, &work, w, f)?);
                }
            }
        }
    }
    drop(cleanup);
    let mut results: Results = samples
        .iter()
        .map(|(k, v)| (*k, median_sample(v)))
        .collect();
    for (i, w) in WORKLOADS.iter().enumerate() {
        let same_io = WORKLOADS.iter().position(|b| {
            b.vubd_args.is_empty()
                && (b.rw, b.bs, b.iodepth, b.queues) == (w.rw, w.bs, w.iodepth, w.queues)
        });
        for f in [Backend::FioUring, Backend::FioSync] {
            if let Some(limit) = same_io.and_then(|b| results.get(&(b, f))).copied() {
                results.entry((i, f)).or_insert(limit);
            }
        }
    }
    let md = report(&o, &results, have_qsd, have_fio, started.elapsed());
    print!("{md}");
    fs::write(&o.out, &md).map_err(|e| format!("{}: {e}", o.out.display()))?;
    let png = o.out.with_extension("png");
    if have_fio {
        chart(&png, &results, have_qsd)?;
        eprintln!("bench: wrote {} and {}", o.out.display(), png.display());
    }
    Ok(())
}

/// Removes the scratch directory when dropped.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn main() -> ExitCode {
    match parse_args().and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}
