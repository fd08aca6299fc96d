//! What live migration's dirty-log marking costs when no migration runs: vubd as built against
//! vubd built with `--cfg vubd_no_dirty_marks` (every mark and its check compiled away), the
//! two alternating run by run on the same image. The target is no measurable difference.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use crate::report::{median_sample, ratio};
use crate::runner::{run_loadgen, start_backend, Sample};
use crate::workloads::{Backend, Workload, RANDREAD_QD1, RANDWRITE_QD32};
use crate::Options;

/// Where the baseline is built.
pub const NO_MARKS_TARGET: &str = "target/no-marks";

/// The heading of the section.
pub const HEADING: &str = "## Dirty-log marking when no migration runs";

fn build_baseline() -> Result<(), String> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "--bins",
            "--quiet",
            "--target-dir",
            NO_MARKS_TARGET,
        ])
        .env("RUSTFLAGS", "--cfg vubd_no_dirty_marks")
        .status()
        .map_err(|e| format!("building vubd without dirty-log marks: {e}"))?;
    if !status.success() {
        return Err(format!("building vubd without dirty-log marks: {status}"));
    }
    Ok(())
}

/// The section: IOPS and CPU per I/O of both builds on the workloads where a per-request
/// cost would show first (small requests, one at a time and many).
pub fn run(o: &Options, work: &Path) -> Result<String, String> {
    build_baseline()?;
    let workloads: [Workload; 3] = [
        RANDREAD_QD1,
        crate::workloads::workload("4k randread qd32", "randread", "4k", 32, &[]),
        RANDWRITE_QD32,
    ];
    let mut md = String::new();
    let _ = writeln!(md, "{HEADING}\n");
    let _ = writeln!(
        md,
        "vubd as built against vubd built with `--cfg vubd_no_dirty_marks`, where the marks \
         and their check compile away; alternating, median of {} runs of {} s, one queue, \
         qcow2 metadata over a raw data file in `{}`.\n",
        o.reps.max(3),
        o.runtime,
        o.dir.display()
    );
    let _ = writeln!(
        md,
        "| workload | IOPS, no marks | IOPS, as built | ratio | CPU µs/IO, no marks | CPU µs/IO, as built |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    for w in &workloads {
        let mut samples: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
        for rep in 0..o.reps.max(3) {
            let mut order = [(0, Backend::VubdNoMarks), (1, Backend::Vubd)];
            if rep % 2 == 1 {
                order.reverse();
            }
            for (slot, backend) in order {
                let running = start_backend(backend, o, work, w)?;
                let s = run_loadgen(o, work, w, &running, &[])?;
                drop(running);
                eprintln!(
                    "bench: {:<20} {:<24} run {}: {:>9.0} IOPS  CPU {:>6.2} us/IO",
                    w.label,
                    backend.name(),
                    rep + 1,
                    s.iops,
                    s.cpu_us
                );
                samples[slot].push(s);
            }
        }
        let (base, built) = (median_sample(&samples[0]), median_sample(&samples[1]));
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |",
            w.label,
            base.iops,
            built.iops,
            ratio(built.iops, base.iops),
            base.cpu_us,
            built.cpu_us
        );
    }
    md.push('\n');
    Ok(md)
}
