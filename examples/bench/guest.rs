//! `make guest-bench`: fio inside a Linux guest under QEMU (vhost-user-blk-pci, 2 queues)
//! against vubd and against qemu-storage-daemon, on the bench's graph (qcow2 over a raw data
//! file, one enabled bitmap), backends alternating boot by boot. One boot runs every workload;
//! the host watches the guest's console for each workload's begin and end markers to take the
//! backend's CPU time over exactly that run.
//!
//! KVM when `/dev/kvm` works (a short trial start of QEMU), TCG otherwise. Under TCG the guest
//! is the bottleneck: the IOPS ratio and each backend's CPU per I/O are what stay meaningful.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::host::{cpu_ticks, pinned, ticks_per_second};
use crate::kit::{find_kit, initrd_with_script, make_initramfs, GuestKit};
use crate::runner::start_backend;
use crate::workloads::{Backend, Workload};
use crate::Options;

/// The guest's workloads: (label, fio rw, block size, iodepth per job). Two jobs, one per
/// queue.
const WORKLOADS: [(&str, &str, &str, u32); 6] = [
    ("4k randread qd1", "randread", "4k", 1),
    ("4k randread qd32", "randread", "4k", 32),
    ("4k randwrite qd1", "randwrite", "4k", 1),
    ("4k randwrite qd32", "randwrite", "4k", 32),
    ("64k read qd8", "read", "64k", 8),
    ("64k write qd8", "write", "64k", 8),
];
const QUEUES: u32 = 2;
const GUEST_MEMORY: &str = "512M";

/// One workload's figures from one boot.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    iops: f64,
    mbs: f64,
    cpu_us: f64,
}

/// Whether QEMU can run the guest with KVM here: a trial boot of the test kernel that must
/// run its (empty) script within 60 s. A `/dev/kvm` that opens is not enough: nested
/// virtualization without the CPU's support fails only once the guest runs.
fn kvm_works(kit: &GuestKit, initramfs: &Path, work: &Path) -> bool {
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let Ok(initrd) = initrd_with_script(initramfs, "true\n") else {
        return false;
    };
    let console = work.join("kvm-trial.console");
    let Ok(file) = fs::File::create(&console) else {
        return false;
    };
    let Ok(mut child) = Command::new(&kit.qemu)
        .args(["-accel", "kvm", "-m", "256", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(&kit.kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let failed = || {
        fs::read_to_string(&console)
            .is_ok_and(|c| c.contains("emulation failure") || c.contains("KVM internal error"))
    };
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline && !failed() {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    fs::read_to_string(&console).is_ok_and(|c| c.contains("VUBD-GUEST-END status=0"))
}

fn script(runtime: u32) -> String {
    let mut s = String::from("set -e\n");
    for (i, (_, rw, bs, qd)) in WORKLOADS.iter().enumerate() {
        let _ = writeln!(
            s,
            "echo BENCH-BEGIN-{i}\n\
             fio --name=w --filename=/dev/vda --rw={rw} --bs={bs} --iodepth={qd} --numjobs={QUEUES} \
             --ioengine=libaio --direct=1 --runtime={runtime} --time_based --group_reporting \
             --offset_increment=256M --size=256M --output-format=json > /tmp/out.json\n\
             echo BENCH-END-{i}\n\
             echo BENCH-JSON-{i}; tr -d '\\n' < /tmp/out.json; echo; echo BENCH-JSON-END-{i}"
        );
    }
    s
}

/// Boot the guest against the running backend `pid`; returns each workload's run.
fn boot(
    kit: &GuestKit,
    accel: &str,
    initrd: &Path,
    work: &Path,
    pid: u32,
) -> Result<Vec<Run>, String> {
    let console = work.join("guest.console");
    let file = fs::File::create(&console).map_err(|e| e.to_string())?;
    let mut child = pinned(0, kit.qemu.to_str().ok_or("non-UTF-8 path")?)
        .args([
            "-accel",
            accel,
            "-m",
            GUEST_MEMORY,
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&kit.kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={GUEST_MEMORY},share=on"),
        ])
        .args(["-numa", "node,memdev=mem"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=c0,path={}",
            work.join("bench.sock").display()
        ))
        .arg("-device")
        .arg(format!("vhost-user-blk-pci,chardev=c0,num-queues={QUEUES}"))
        .stdin(Stdio::null())
        .stdout(file.try_clone().map_err(|e| e.to_string())?)
        .stderr(file)
        .spawn()
        .map_err(|e| format!("starting QEMU: {e}"))?;
    // CPU ticks of the backend at each marker, as the console shows them.
    let mut marks: BTreeMap<String, u64> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(900);
    let read = || {
        fs::read_to_string(&console)
            .unwrap_or_default()
            .replace('\r', "")
    };
    loop {
        let text = read();
        for i in 0..WORKLOADS.len() {
            for m in [format!("BENCH-BEGIN-{i}"), format!("BENCH-END-{i}")] {
                if !marks.contains_key(&m) && text.contains(&m) {
                    marks.insert(m, cpu_ticks(pid));
                }
            }
        }
        if child.try_wait().map_err(|e| e.to_string())?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(format!("the guest did not finish:\n{}", read()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = read();
    let mut runs = Vec::new();
    for i in 0..WORKLOADS.len() {
        let (begin, end) = (format!("BENCH-JSON-{i}\n"), format!("\nBENCH-JSON-END-{i}"));
        let json = text
            .split_once(&begin)
            .and_then(|(_, rest)| rest.split_once(&end))
            .map(|(j, _)| j)
            .ok_or_else(|| format!("no fio output for workload {i}:\n{text}"))?;
        let v: Value = serde_json::from_str(json).map_err(|e| format!("fio JSON: {e}: {json}"))?;
        let job = &v["jobs"][0];
        let (r, w) = (&job["read"], &job["write"]);
        let ios = r["total_ios"].as_f64().unwrap_or(0.0) + w["total_ios"].as_f64().unwrap_or(0.0);
        let ticks =
            marks[&format!("BENCH-END-{i}")].saturating_sub(marks[&format!("BENCH-BEGIN-{i}")]);
        runs.push(Run {
            iops: r["iops"].as_f64().unwrap_or(0.0) + w["iops"].as_f64().unwrap_or(0.0),
            mbs: (r["bw_bytes"].as_f64().unwrap_or(0.0) + w["bw_bytes"].as_f64().unwrap_or(0.0))
                / 1e6,
            cpu_us: ticks as f64 / ticks_per_second() * 1e6 / ios.max(1.0),
        });
    }
    Ok(runs)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Measure, and return the report's section.
pub fn run(o: &Options, work: &Path) -> Result<String, String> {
    let kit = find_kit()?;
    let initramfs = work.join("guest.cpio");
    make_initramfs(&kit, &initramfs)?;
    let accel = if kvm_works(&kit, &initramfs, work) {
        "kvm"
    } else {
        "tcg"
    };
    eprintln!("bench: guest under {accel}");
    let initrd = initrd_with_script(&initramfs, &script(o.runtime))?;
    let workload = Workload {
        label: "guest",
        rw: "randread",
        bs: "4k",
        iodepth: 1,
        queues: QUEUES,
        vubd_args: &[],
        targets: &[],
    };
    let mut runs: BTreeMap<Backend, Vec<Vec<Run>>> = BTreeMap::new();
    for rep in 0..o.reps {
        let mut order = [Backend::Vubd, Backend::Qsd];
        if rep % 2 == 1 {
            order.reverse();
        }
        for b in order {
            let backend = start_backend(b, o, work, &workload)?;
            let r = boot(&kit, accel, &initrd, work, backend.pid())?;
            drop(backend);
            for (i, run) in r.iter().enumerate() {
                eprintln!(
                    "bench: guest {:<18} {:<20} boot {}: {:>8.0} IOPS {:>8.1} MB/s  CPU {:>6.2} us/IO",
                    WORKLOADS[i].0,
                    b.name(),
                    rep + 1,
                    run.iops,
                    run.mbs,
                    run.cpu_us
                );
            }
            runs.entry(b).or_default().push(r);
        }
    }
    let figure = |b: Backend, i: usize, f: fn(&Run) -> f64| {
        median(
            runs.get(&b)
                .map(|v| v.iter().map(|r| f(&r[i])).collect())
                .unwrap_or_default(),
        )
    };
    let mut md = String::new();
    let _ = writeln!(md, "{}\n", crate::GUEST_HEADING);
    let _ = writeln!(
        md,
        "fio in a Linux guest under QEMU ({}), `vhost-user-blk-pci` with {QUEUES} queues, {QUEUES} jobs \
         (libaio, direct), the bench's graph (qcow2 over a raw data file in `{}`, one enabled \
         bitmap); vubd and qemu-storage-daemon alternating boot by boot, medians of {} boots, {} s \
         per workload. {}\n",
        if accel == "kvm" { "KVM" } else { "TCG: no KVM on this machine" },
        o.dir.display(),
        o.reps,
        o.runtime,
        if accel == "kvm" {
            ""
        } else {
            "Under TCG the emulated guest is the bottleneck: the IOPS ratio and each backend's \
             CPU time per I/O are the meaningful columns."
        }
    );
    let _ = writeln!(md, "| workload | vubd IOPS | qemu-storage-daemon IOPS | IOPS × | vubd MB/s | qemu-storage-daemon MB/s | vubd CPU µs/IO | qemu-storage-daemon CPU µs/IO | CPU × |");
    let _ = writeln!(
        md,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (i, (label, ..)) in WORKLOADS.iter().enumerate() {
        let (vi, qi) = (
            figure(Backend::Vubd, i, |r| r.iops),
            figure(Backend::Qsd, i, |r| r.iops),
        );
        let (vm, qm) = (
            figure(Backend::Vubd, i, |r| r.mbs),
            figure(Backend::Qsd, i, |r| r.mbs),
        );
        let (vc, qc) = (
            figure(Backend::Vubd, i, |r| r.cpu_us),
            figure(Backend::Qsd, i, |r| r.cpu_us),
        );
        let _ = writeln!(
            md,
            "| {label} | {vi:.0} | {qi:.0} | {:.2} | {vm:.1} | {qm:.1} | {vc:.2} | {qc:.2} | {:.2} |",
            vi / qi.max(1e-9),
            vc / qc.max(1e-9)
        );
    }
    Ok(md)
}
