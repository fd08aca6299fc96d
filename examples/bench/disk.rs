//! The second table of `make bench`: the same workloads on a disk filesystem with O_DIRECT
//! (`--cache none` for vubd, `cache.direct=on` for qemu-storage-daemon), against fio with
//! `--direct=1` on the same file. On a real disk the device, not the backend, should be the
//! limit: issue 15's target is at least 90% of fio's IOPS and MB/s on every workload.
//!
//! The bitmap's granules are all made dirty first, by one sequential pass: the table measures
//! the I/O path. What a write to a clean granule costs on this disk (its mark is synced
//! first) is measured apart, in the section on crash-consistent bitmaps.

use crate::bitmaps::dirty_everything;
use crate::report::{ratio, Results};
use crate::runner::{prepare, Sample};
use crate::workloads::{Backend, WORKLOADS};
use crate::{measure_backends, Cleanup, Options};
use std::fmt::Write as _;

pub const HEADING: &str = "## On a disk: O_DIRECT, against fio on the same file";

/// At least this share of fio's IOPS and MB/s on every workload.
const TARGET: f64 = 0.9;

/// The options of the disk table: the bench's, in `--disk-dir` with O_DIRECT.
fn disk_options(o: &Options) -> Options {
    Options {
        dir: o.disk_dir.clone(),
        direct: true,
        ..o.clone()
    }
}

/// Measure and return the report's section.
pub fn run(o: &Options, have_qsd: bool, have_fio: bool) -> Result<String, String> {
    let od = disk_options(o);
    let work = od
        .dir
        .join(format!("vubd-bench-disk-{}", std::process::id()));
    let _cleanup = Cleanup(work.clone());
    prepare(&od, &work)?;
    dirty_everything(&od, &work)?;
    let results = measure_backends(&od, &work, have_qsd, have_fio)?;
    Ok(section(&od, &results, have_qsd, have_fio))
}

/// fio's better engine for a workload: at depth 1 plain system calls can beat io_uring.
fn limit(results: &Results, i: usize) -> Sample {
    let get = |b| results.get(&(i, b)).copied().unwrap_or_default();
    let (uring, sync) = (get(Backend::FioUring), get(Backend::FioSync));
    if sync.iops > uring.iops {
        sync
    } else {
        uring
    }
}

fn section(o: &Options, results: &Results, have_qsd: bool, have_fio: bool) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "{HEADING}\n");
    let _ = writeln!(
        md,
        "The same workloads on a {} MiB raw data file in `{}` ({}) with O_DIRECT: `--cache none` \
         for vubd, `cache.direct=on` for qemu-storage-daemon, `--direct=1` for fio. The bitmap's \
         granules are all dirty first (one sequential pass), so the table measures the I/O path; \
         the cost of a write to a clean granule on this disk is in [Crash-consistent \
         bitmaps](#crash-consistent-bitmaps). The limit is the better of fio's io_uring and psync \
         engines, on the backend's CPU (CPU 1, which also takes the disk's interrupts). Target: \
         vubd at least {:.0}% of fio's IOPS and MB/s on every workload.\n",
        o.size_mib,
        o.dir.display(),
        crate::bitmaps::filesystem(&o.dir),
        TARGET * 100.0
    );
    let _ = writeln!(
        md,
        "| workload | vubd IOPS | qsd IOPS | fio IOPS | vubd % of fio | qsd % of fio | vubd MB/s | fio MB/s | vubd p50 / p99 µs | qsd p50 / p99 µs | fio p50 µs | vubd CPU µs/IO | qsd CPU µs/IO | met |"
    );
    let _ = writeln!(
        md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: |"
    );
    for (i, w) in WORKLOADS.iter().enumerate() {
        let get = |b| results.get(&(i, b)).copied().unwrap_or_default();
        let (v, q, f) = (get(Backend::Vubd), get(Backend::Qsd), limit(results, i));
        let dash = |show: bool, x: String| if show { x } else { "–".to_string() };
        let (iops_share, mbs_share) = (ratio(v.iops, f.iops), ratio(v.bw, f.bw));
        let met = iops_share >= TARGET && mbs_share >= TARGET;
        let _ = writeln!(
            md,
            "| {} | {:.0} | {} | {} | {} | {} | {:.0} | {} | {:.1} / {:.1} | {} | {} | {:.2} | {} | {} |",
            w.label,
            v.iops,
            dash(have_qsd, format!("{:.0}", q.iops)),
            dash(have_fio, format!("{:.0}", f.iops)),
            dash(have_fio, format!("{:.0}%", iops_share * 100.0)),
            dash(have_fio && have_qsd, format!("{:.0}%", ratio(q.iops, f.iops) * 100.0)),
            v.bw / 1e6,
            dash(have_fio, format!("{:.0}", f.bw / 1e6)),
            v.p50,
            v.p99,
            dash(have_qsd, format!("{:.1} / {:.1}", q.p50, q.p99)),
            dash(have_fio, format!("{:.1}", f.p50)),
            v.cpu_us,
            dash(have_qsd, format!("{:.2}", q.cpu_us)),
            dash(have_fio, if met { "yes" } else { "**no**" }.to_string()),
        );
    }
    md.push('\n');
    md
}
