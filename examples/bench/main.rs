//! `make bench`: vubd and qemu-storage-daemon side by side on the mission's configuration — a
//! qcow2 metadata image over a raw data file (`data_file_raw`) with one enabled persistent
//! dirty bitmap — driven by the same independent frontend (the libblkio-based `loadgen`),
//! backends alternating run by run, each figure the median of several runs. The limit is fio
//! straight on the raw data file. Writes `docs/benchmarks.md` and a chart.
//!
//! The second table runs the same workloads on a disk filesystem (`--disk-dir`) with O_DIRECT,
//! against fio on the same file ([`disk`]).
//!
//! Then what crash-consistent bitmaps cost against bitmaps saved on close ([`bitmaps`]).
//! `--only guest` (`make guest-bench`) runs fio inside a Linux guest instead ([`guest`]) and
//! puts its section into the existing report.
//!
//! ```text
//! cargo run --release --example bench -- [--runtime 5] [--reps 3] [--dir /dev/shm]
//!     [--disk-dir /var/tmp] [--size-mib 1024] [--vubd-args "..."]
//!     [--only backends|disk|bitmaps|guest|overhead|many|scale|remote] [--out docs/benchmarks.md]
//! ```

mod bitmaps;
mod chart;
mod disk;
mod guest;
mod host;
mod idle;
#[allow(dead_code)]
#[path = "../../tests/guest/kit.rs"]
mod kit;
mod many;
mod overhead;
mod remote;
mod report;
mod runner;
mod scale;
mod workloads;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use host::which;
use report::{median_sample, report, Results};
use runner::{prepare, run_fio, run_loadgen, start_backend, Sample};
use workloads::{Backend, WORKLOADS};

/// The command line.
#[derive(Clone, Debug)]
pub struct Options {
    pub runtime: u32,
    pub reps: u32,
    pub dir: PathBuf,
    /// O_DIRECT on the data file: set for the disk table only.
    pub direct: bool,
    pub size_mib: u64,
    pub vubd_args: Vec<String>,
    pub out: PathBuf,
    /// A directory on a disk filesystem: the disk table, and the first-touch runs whose syncs
    /// must be real.
    pub disk_dir: PathBuf,
    /// Run only one part: `backends` (vubd against qemu-storage-daemon), `disk` (the same on a
    /// disk with O_DIRECT), `bitmaps`, `guest`, `overhead`, `many` or `scale`.
    pub only: Option<String>,
}

fn usage() -> String {
    "usage: bench [--runtime S] [--reps N] [--dir DIR] [--disk-dir DIR] [--size-mib N] \
     [--vubd-args ARGS] [--only backends|disk|bitmaps|guest|overhead|many|scale|remote] [--out FILE.md]"
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
        disk_dir: PathBuf::from("/var/tmp"),
        only: None,
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
            "--size-mib" => o.size_mib = v.parse().map_err(|_| "bad --size-mib")?,
            "--vubd-args" => o.vubd_args = v.split_whitespace().map(String::from).collect(),
            "--out" => o.out = PathBuf::from(v),
            "--disk-dir" => o.disk_dir = PathBuf::from(v),
            "--only"
                if matches!(
                    v.as_str(),
                    "backends"
                        | "disk"
                        | "bitmaps"
                        | "guest"
                        | "overhead"
                        | "many"
                        | "scale"
                        | "remote"
                ) =>
            {
                o.only = Some(v)
            }
            _ => return Err(format!("unknown option {a}\n{}", usage())),
        }
    }
    Ok(o)
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
    if o.only.as_deref() == Some("guest") {
        if !have_qsd || !have_fio {
            return Err("the guest bench needs qemu-storage-daemon and fio (make deps)".into());
        }
        let section = guest::run(&o, &work)?;
        drop(cleanup);
        print!("{section}");
        let old = fs::read_to_string(&o.out).unwrap_or_default();
        let md = replace_section(&old, GUEST_HEADING, &section);
        fs::write(&o.out, md).map_err(|e| format!("{}: {e}", o.out.display()))?;
        eprintln!("bench: wrote the guest section of {}", o.out.display());
        return Ok(());
    }
    let one_section: Option<(&str, Section)> = match o.only.as_deref() {
        Some("overhead") => Some((overhead::HEADING, overhead::run)),
        Some("many") => Some((many::HEADING, many::run)),
        Some("scale") => Some((scale::HEADING, scale::run)),
        Some("remote") => Some((remote::HEADING, remote::run)),
        _ => None,
    };
    if o.only.as_deref() == Some("disk") {
        let section = disk::run(&o, have_qsd, have_fio)?;
        drop(cleanup);
        return write_section(&o, disk::HEADING, &section);
    }
    if let Some((heading, measure)) = one_section {
        let section = measure(&o, &work)?;
        drop(cleanup);
        return write_section(&o, heading, &section);
    }
    let results = match o.only.as_deref() {
        Some("bitmaps") => None,
        _ => Some(measure_backends(&o, &work, have_qsd, have_fio)?),
    };
    let disk = match o.only.as_deref() {
        None | Some("backends") => Some(disk::run(&o, have_qsd, have_fio)?),
        _ => None,
    };
    let bitmaps = match o.only.as_deref() {
        Some("backends") => None,
        _ => Some(bitmaps::run(&o, &work)?),
    };
    let idle = match o.only.as_deref() {
        None | Some("backends") => Some(idle::run(&o, &work, have_qsd)?),
        _ => None,
    };
    let overhead = match o.only.as_deref() {
        None => Some(overhead::run(&o, &work)?),
        _ => None,
    };
    let many = match o.only.as_deref() {
        None => Some(many::run(&o, &work)?),
        _ => None,
    };
    let scale = match o.only.as_deref() {
        None => Some(scale::run(&o, &work)?),
        _ => None,
    };
    let remote = match o.only.as_deref() {
        None => Some(remote::run(&o, &work)?),
        _ => None,
    };
    drop(cleanup);
    let mut md = match &results {
        Some(results) => report(&o, results, have_qsd, have_fio, started.elapsed()),
        None => format!(
            "# Benchmarks: crash-consistent bitmaps\n\nGenerated by `make bench` \
             (`examples/bench/`, `--only bitmaps`) in {:.0} s.\n\n",
            started.elapsed().as_secs_f64()
        ),
    };
    md.push_str(disk.as_deref().unwrap_or_default());
    md.push_str(idle.as_deref().unwrap_or_default());
    md.push_str(bitmaps.as_deref().unwrap_or_default());
    md.push_str(overhead.as_deref().unwrap_or_default());
    md.push_str(many.as_deref().unwrap_or_default());
    md.push_str(scale.as_deref().unwrap_or_default());
    md.push_str(remote.as_deref().unwrap_or_default());
    // The guest section comes from `--only guest` (`make guest-bench`), which takes longer:
    // a full run keeps the last one.
    let old = fs::read_to_string(&o.out).unwrap_or_default();
    if let Some(at) = old.find(GUEST_HEADING) {
        let section = &old[at..];
        let end = section[GUEST_HEADING.len()..]
            .find("\n## ")
            .map_or(section.len(), |i| GUEST_HEADING.len() + i + 1);
        md = replace_section(&md, GUEST_HEADING, &section[..end]);
    }
    print!("{md}");
    fs::write(&o.out, &md).map_err(|e| format!("{}: {e}", o.out.display()))?;
    let png = o.out.with_extension("png");
    if let (Some(results), true) = (&results, have_fio) {
        chart::chart(&png, results, have_qsd)?;
        eprintln!("bench: wrote {} and {}", o.out.display(), png.display());
    }
    Ok(())
}

/// vubd and qemu-storage-daemon on every workload, with the fio limit: median figures.
fn measure_backends(
    o: &Options,
    work: &Path,
    have_qsd: bool,
    have_fio: bool,
) -> Result<Results, String> {
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
                let running = start_backend(b, o, work, w)?;
                let s = run_loadgen(o, work, w, &running, &[])?;
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
                        .push(run_fio(o, work, w, f)?);
                }
            }
        }
    }
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
    Ok(results)
}

/// Print `section` and put it into the report in place of the one under `heading`.
fn write_section(o: &Options, heading: &str, section: &str) -> Result<(), String> {
    print!("{section}");
    let old = fs::read_to_string(&o.out).unwrap_or_default();
    let md = replace_section(&old, heading, section);
    fs::write(&o.out, md).map_err(|e| format!("{}: {e}", o.out.display()))?;
    eprintln!(
        "bench: wrote the section {heading:?} of {}",
        o.out.display()
    );
    Ok(())
}

/// A section measured on its own (`--only overhead`, `--only many`).
type Section = fn(&Options, &Path) -> Result<String, String>;

/// The heading of the guest section, which `--only guest` writes.
const GUEST_HEADING: &str = "## Inside a guest: fio";

/// `doc` with the section starting at `heading` (up to the next `## `) replaced by `section`,
/// or `section` appended.
fn replace_section(doc: &str, heading: &str, section: &str) -> String {
    let Some(start) = doc.find(heading) else {
        let sep = if doc.is_empty() || doc.ends_with("\n\n") {
            ""
        } else {
            "\n"
        };
        return format!("{doc}{sep}{section}");
    };
    let after = &doc[start + heading.len()..];
    let end = after
        .find("\n## ")
        .map_or(doc.len(), |i| start + heading.len() + i + 1);
    let rest = &doc[end..];
    // A blank line between the section and the heading that follows it.
    let sep = if !rest.is_empty() && !section.ends_with("\n\n") {
        "\n"
    } else {
        ""
    };
    format!("{}{section}{sep}{rest}", &doc[..start])
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
