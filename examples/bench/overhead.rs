//! What the request path's bookkeeping costs when nobody needs it: vubd as built against vubd
//! built without it, alternating run by run on the same image —
//!
//! * dirty-log marks for live migration (`--cfg vubd_no_dirty_marks`), which cost a check per
//!   request while no migration runs;
//! * I/O statistics (`--cfg vubd_no_stats`): per-queue counters and two clock reads per
//!   request.
//!
//! The target for both is no measurable difference.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use crate::report::{median_sample, ratio};
use crate::runner::{run_loadgen, start_backend, Sample};
use crate::workloads::{Backend, Baseline, Workload, RANDREAD_QD1, RANDWRITE_QD32};
use crate::Options;

/// The heading of the section.
pub const HEADING: &str = "## Bookkeeping on the request path";

impl Baseline {
    pub const ALL: [Baseline; 2] = [Baseline::NoDirtyMarks, Baseline::NoStats];

    /// The `--cfg` the baseline is built with.
    fn cfg(self) -> &'static str {
        match self {
            Baseline::NoDirtyMarks => "vubd_no_dirty_marks",
            Baseline::NoStats => "vubd_no_stats",
        }
    }

    /// Where it is built.
    pub fn target_dir(self) -> String {
        format!("target/{}", self.cfg())
    }

    pub fn what(self) -> &'static str {
        match self {
            Baseline::NoDirtyMarks => "dirty-log marks",
            Baseline::NoStats => "statistics",
        }
    }

    fn build(self) -> Result<(), String> {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "--bins", "--quiet", "--target-dir"])
            .arg(self.target_dir())
            .env("RUSTFLAGS", format!("--cfg {}", self.cfg()))
            .status()
            .map_err(|e| format!("building vubd without {}: {e}", self.what()))?;
        if !status.success() {
            return Err(format!("building vubd without {}: {status}", self.what()));
        }
        Ok(())
    }
}

/// The section: IOPS and CPU per I/O of each build on the workloads where a per-request cost
/// shows first (small requests, one at a time and many).
pub fn run(o: &Options, work: &Path) -> Result<String, String> {
    for baseline in Baseline::ALL {
        baseline.build()?;
    }
    let workloads: [Workload; 3] = [
        RANDREAD_QD1,
        crate::workloads::workload("4k randread qd32", "randread", "4k", 32, &[]),
        RANDWRITE_QD32,
    ];
    let reps = o.reps.max(3);
    let mut md = String::new();
    let _ = writeln!(md, "{HEADING}\n");
    let _ = writeln!(
        md,
        "vubd as built against vubd built without its dirty-log marks (`--cfg \
         vubd_no_dirty_marks`: the check per request made while no migration runs) and \
         without its statistics (`--cfg vubd_no_stats`: per-queue counters, two clock reads per \
         request); the three alternating, median of {reps} runs of {} s, one queue, qcow2 \
         metadata over a raw data file in `{}`. A ratio is as built / without.\n",
        o.runtime,
        o.dir.display()
    );
    let _ = writeln!(
        md,
        "| workload | IOPS as built | IOPS without marks | ratio | IOPS without statistics | ratio | CPU µs/IO as built | without marks | without statistics |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let backends = [
        Backend::Vubd,
        Backend::VubdWithout(Baseline::NoDirtyMarks),
        Backend::VubdWithout(Baseline::NoStats),
    ];
    for w in &workloads {
        let mut samples: [Vec<Sample>; 3] = Default::default();
        for rep in 0..reps {
            // Rotate the order run by run, so that none always goes first.
            for k in 0..backends.len() {
                let slot = (k + rep as usize) % backends.len();
                let backend = backends[slot];
                let running = start_backend(backend, o, work, w)?;
                let s = run_loadgen(o, work, w, &running, &[])?;
                drop(running);
                eprintln!(
                    "bench: {:<20} {:<28} run {}: {:>9.0} IOPS  CPU {:>6.2} us/IO",
                    w.label,
                    backend.name(),
                    rep + 1,
                    s.iops,
                    s.cpu_us
                );
                samples[slot].push(s);
            }
        }
        let [built, marks, stats] = samples.map(|s| median_sample(&s));
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} |",
            w.label,
            built.iops,
            marks.iops,
            ratio(built.iops, marks.iops),
            stats.iops,
            ratio(built.iops, stats.iops),
            built.cpu_us,
            marks.cpu_us,
            stats.cpu_us
        );
    }
    md.push('\n');
    Ok(md)
}
