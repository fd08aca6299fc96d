//! What crash-consistent bitmaps cost, against bitmaps saved only on close (`vubd
//! --bitmap-persistence on-close`, QEMU's behaviour) — vubd both times, alternating run by run:
//!
//! * steady state: random 4 KiB overwrites of granules that are already dirty, and so already
//!   on disk: no extra I/O is expected, and the target is at most 5% fewer IOPS and at most 5%
//!   more CPU per I/O;
//! * first touch: every write lands in a clean granule (4 KiB writes one granule apart:
//!   loadgen's `--stride`), at 4 KiB and 64 KiB granularity, QD1 and QD32, on tmpfs and on a
//!   disk filesystem, where the group commit's sync reaches the device.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Command;

use crate::host::which;
use crate::report::{median_sample, ratio};
use crate::runner::{fill_once, prepare_image, run_loadgen, start_backend, vubd_offline, Sample};
use crate::workloads::{Backend, Workload};
use crate::Options;

/// How the two modes are started.
const MODES: [(&str, &[&str]); 2] = [
    ("crash-consistent", &[]),
    ("on-close", &["--bitmap-persistence", "on-close"]),
];

/// Runs per mode of the steady-state rows.
const STEADY_REPS: u32 = 5;

/// Disk size for the first-touch runs: a sparse data file with room for enough first touches
/// at 64 KiB granularity to last a second at memory speed.
const FIRST_TOUCH_MIB: u64 = 32 << 10;
/// First touches per run at most (each allocates a 4 KiB page of the sparse data file).
const MAX_TOUCHES: u64 = 400_000;

fn write_workload(label: &'static str, rw: &'static str, iodepth: u32, mode: usize) -> Workload {
    Workload {
        label,
        rw,
        bs: "4k",
        iodepth,
        queues: 1,
        vubd_args: MODES[mode].1,
        targets: &[],
    }
}

/// `reps` runs of `w` in each mode, alternating which goes first; the median per mode.
/// `before_run` prepares the image before each run.
fn both_modes(
    reps: u32,
    o: &Options,
    work: &Path,
    (label, rw): (&'static str, &'static str),
    iodepth: u32,
    extra: &[String],
    before_run: &dyn Fn() -> Result<(), String>,
) -> Result<[Sample; 2], String> {
    let mut samples: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
    for rep in 0..reps {
        let mut order = [0, 1];
        if rep % 2 == 1 {
            order.reverse();
        }
        for mode in order {
            before_run()?;
            let w = write_workload(label, rw, iodepth, mode);
            let running = start_backend(Backend::Vubd, o, work, &w)?;
            let s = run_loadgen(o, work, &w, &running, extra)?;
            drop(running);
            eprintln!(
                "bench: {label:<32} {:<16} run {}: {:>9.0} IOPS  p50 {:>8.1} us  CPU {:>6.2} us/IO",
                MODES[mode].0,
                rep + 1,
                s.iops,
                s.p50,
                s.cpu_us
            );
            samples[mode].push(s);
        }
    }
    Ok([median_sample(&samples[0]), median_sample(&samples[1])])
}

/// Make every granule of the bench image's bitmap dirty (and durable): one sequential pass.
pub fn dirty_everything(o: &Options, work: &Path) -> Result<(), String> {
    let w = Workload {
        bs: "1M",
        iodepth: 8,
        ..write_workload("fill", "write", 8, 0)
    };
    let running = start_backend(Backend::Vubd, o, work, &w)?;
    fill_once(o, work, &running, o.size_mib)
}

/// The type of the filesystem holding `dir`, as the mount table names it (statfs's magic
/// cannot tell ext4 from ext2). Of mounts stacked on one place, the last is the one seen.
pub fn filesystem(dir: &Path) -> String {
    let probe = |cmd: &mut Command| {
        cmd.output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                let out = String::from_utf8_lossy(&o.stdout).into_owned();
                out.lines().last().map(|l| l.trim().to_string())
            })
            .filter(|s| !s.is_empty())
    };
    probe(
        Command::new("findmnt")
            .args(["-n", "-o", "FSTYPE", "--target"])
            .arg(dir),
    )
    .or_else(|| probe(Command::new("stat").args(["-f", "-c", "%T"]).arg(dir)))
    .unwrap_or_else(|| "?".into())
}

/// Measure and return the report's section.
pub fn run(o: &Options, work: &Path) -> Result<String, String> {
    let mut md = String::new();
    let _ = writeln!(md, "## Crash-consistent bitmaps\n");
    let _ = writeln!(
        md,
        "vubd keeps persistent bitmaps consistent on disk while it serves them (the default, \
         `--bitmap-persistence crash-consistent`), against saving them only on close as QEMU does \
         (`--bitmap-persistence on-close`). vubd both times, the modes alternating run by run, \
         medians of {} runs ({} for the steady state; [bitmaps.md](bitmaps.md) explains the \
         design).\n",
        o.reps,
        o.reps.max(STEADY_REPS)
    );

    // Steady state, on the bench image and its bitmap (granularity 64 KiB).
    dirty_everything(o, work)?;
    let _ = writeln!(
        md,
        "### Steady state: random overwrites of dirty granules\n"
    );
    let _ = writeln!(
        md,
        "The bench image ({} MiB in `{}`, {}), its bitmap of 64 KiB granules made all dirty \
         first by one sequential pass. Target: at most 5% fewer IOPS and 5% more CPU per I/O.\n",
        o.size_mib,
        o.dir.display(),
        filesystem(&o.dir)
    );
    let _ = writeln!(md, "| workload | crash-consistent IOPS | on-close IOPS | IOPS × | crash-consistent CPU µs/IO | on-close CPU µs/IO | CPU × | within 5% |");
    let _ = writeln!(
        md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: |"
    );
    // Wall-clock CPU time per I/O varies by ±10% between identical runs here: more runs.
    let reps = o.reps.max(STEADY_REPS);
    for (label, depth) in [("4k randwrite qd1", 1), ("4k randwrite qd32", 32)] {
        let [cc, oc] = both_modes(reps, o, work, (label, "randwrite"), depth, &[], &|| Ok(()))?;
        let (iops, cpu) = (ratio(cc.iops, oc.iops), ratio(cc.cpu_us, oc.cpu_us));
        let _ = writeln!(
            md,
            "| {label} | {:.0} | {:.0} | {iops:.3} | {:.2} | {:.2} | {cpu:.3} | {} |",
            cc.iops,
            oc.iops,
            cc.cpu_us,
            oc.cpu_us,
            if iops >= 0.95 && cpu <= 1.05 {
                "yes"
            } else {
                "**no**"
            }
        );
    }

    if which("valgrind") {
        let [cc, oc] = instructions_per_write(work)?;
        let _ = writeln!(
            md,
            "\nDeterministically, under callgrind (vubd's user-space instructions per 4k random \
             overwrite at depth 32, from runs of 20000 and 60000 writes): crash-consistent \
             {cc:.0}, on-close {oc:.0} ({:+.1}%).",
            (cc / oc - 1.0) * 100.0
        );
    }

    // First touch, on a fresh image per filesystem.
    let _ = writeln!(md, "\n### First touch: writes to clean granules\n");
    let _ = writeln!(
        md,
        "A {} GiB image (sparse data file) per filesystem, a fresh bitmap before every run; 4 KiB \
         sequential writes one granule apart (`loadgen --stride`), so that every write is the \
         first to its granule and, crash-consistently, waits for its mark to be synced (writes \
         in flight together share one sync). Each run stops after {MAX_TOUCHES} writes or {} s. \
         `--cache writeback`: the data stays in the page cache; only the bitmap's group commit \
         syncs.\n",
        FIRST_TOUCH_MIB >> 10,
        o.runtime
    );
    let _ = writeln!(md, "| filesystem | granularity | QD | crash-consistent IOPS | on-close IOPS | IOPS × | crash-consistent p50 µs | on-close p50 µs | p50 added µs | crash-consistent CPU µs/IO | on-close CPU µs/IO |");
    let _ = writeln!(
        md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for base in [o.dir.clone(), o.disk_dir.clone()] {
        let dir = base.join(format!("vubd-bench-touch-{}", std::process::id()));
        prepare_image(&dir, FIRST_TOUCH_MIB, true)?;
        let result = first_touch_rows(o, &dir, &mut md);
        let _ = fs::remove_dir_all(&dir);
        result?;
    }
    Ok(md)
}

fn first_touch_rows(o: &Options, dir: &Path, md: &mut String) -> Result<(), String> {
    let fs_type = filesystem(dir);
    let meta = dir.join("meta.qcow2");
    let meta = meta.to_str().ok_or("non-UTF-8 path")?.to_string();
    for granularity in [4096u64, 65536] {
        let fresh_bitmap = || {
            let _ = vubd_offline(&["bitmap", &meta, "remove", "touch"]);
            vubd_offline(&[
                "bitmap",
                &meta,
                "add",
                "touch",
                "--granularity",
                &granularity.to_string(),
            ])
        };
        let extra = [
            "--stride".to_string(),
            granularity.to_string(),
            "--ios".to_string(),
            ((FIRST_TOUCH_MIB << 20) / granularity)
                .min(MAX_TOUCHES)
                .to_string(),
        ];
        for depth in [1, 32] {
            let label = if depth == 1 {
                "first touch qd1"
            } else {
                "first touch qd32"
            };
            let [cc, oc] = both_modes(
                o.reps,
                o,
                dir,
                (label, "write"),
                depth,
                &extra,
                &fresh_bitmap,
            )?;
            let _ = writeln!(
                md,
                "| {fs_type} | {} KiB | {depth} | {:.0} | {:.0} | {:.3} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |",
                granularity >> 10,
                cc.iops,
                oc.iops,
                ratio(cc.iops, oc.iops),
                cc.p50,
                oc.p50,
                cc.p50 - oc.p50,
                cc.cpu_us,
                oc.cpu_us
            );
        }
    }
    Ok(())
}

/// vubd's user-space instructions per 4k random overwrite of dirty granules, in each mode:
/// the difference between runs of `N` and `3 N` writes under callgrind, over `2 N`.
fn instructions_per_write(work: &Path) -> Result<[f64; 2], String> {
    const N: u64 = 20000;
    let mut out = [0.0; 2];
    for (mode, (_, args)) in MODES.iter().enumerate() {
        let mut refs = [0u64; 2];
        for (i, count) in [N, 3 * N].into_iter().enumerate() {
            let sock = work.join("cg.sock");
            let log = work.join("cg.log");
            let _ = fs::remove_file(&sock);
            let mut child = Command::new("valgrind")
                .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
                .arg(format!("--log-file={}", log.display()))
                .args(["target/release/vubd", "serve", "--socket"])
                .arg(&sock)
                .arg("--image")
                .arg(work.join("meta.qcow2"))
                .args(["--format", "qcow2"])
                .args(*args)
                .stderr(std::process::Stdio::null())
                .spawn()
                .map_err(|e| format!("valgrind: {e}"))?;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while !sock.exists() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            std::thread::sleep(std::time::Duration::from_millis(300));
            let status = Command::new("target/release/examples/loadgen")
                .arg("--socket")
                .arg(&sock)
                .args(["--rw", "randwrite", "--iodepth", "32", "--runtime", "600"])
                .args(["--ios", &count.to_string()])
                .stdout(std::process::Stdio::null())
                .status()
                .map_err(|e| format!("loadgen: {e}"))?;
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
            if !status.success() {
                return Err("loadgen under callgrind failed".into());
            }
            let text = fs::read_to_string(&log).map_err(|e| format!("{}: {e}", log.display()))?;
            refs[i] = text
                .lines()
                .find_map(|l| {
                    l.split_once("refs:")
                        .map(|(_, v)| v.trim().replace(',', ""))
                })
                .and_then(|v| v.parse().ok())
                .ok_or("no instruction count in the callgrind log")?;
        }
        out[mode] = refs[1].saturating_sub(refs[0]) as f64 / (2 * N) as f64;
    }
    Ok(out)
}
