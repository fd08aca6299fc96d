//! What an idle disk costs: a frontend connected, its queues set up, nothing submitted — an
//! idle VM. vubd polls its queues adaptively by default, only after events, so an idle queue
//! must cost (next to) nothing; the target is under 1% of a CPU over 10 s. Measured for
//! qemu-storage-daemon too, on the same image.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::host::{cpu_ticks, pinned, ticks_per_second};
use crate::runner::start_backend;
use crate::workloads::{Backend, RANDREAD_QD1};
use crate::Options;

/// How long the idle CPU time is measured.
const IDLE: Duration = Duration::from_secs(10);

/// The share of a CPU `backend` uses while its one frontend is connected and idle, after a
/// short burst of I/O (so that its queues had work, and polled, before going idle).
fn idle_cpu(backend: Backend, o: &Options, work: &Path) -> Result<f64, String> {
    let running = start_backend(backend, o, work, &RANDREAD_QD1)?;
    let hold = IDLE + Duration::from_secs(3);
    let mut load = pinned(0, "target/release/examples/loadgen")
        .arg("--socket")
        .arg(work.join("bench.sock"))
        .args([
            "--rw",
            "randread",
            "--bs",
            "4k",
            "--iodepth",
            "1",
            "--ios",
            "2000",
        ])
        .args(["--runtime", "5", "--hold", &hold.as_secs().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("loadgen: {e}"))?;
    // The burst takes a fraction of a second; then the frontend sits idle.
    std::thread::sleep(Duration::from_millis(1500));
    let before = cpu_ticks(running.pid());
    std::thread::sleep(IDLE);
    let after = cpu_ticks(running.pid());
    let _ = load.wait();
    drop(running);
    Ok((after - before) as f64 / ticks_per_second() / IDLE.as_secs_f64() * 100.0)
}

/// The section.
pub fn run(o: &Options, work: &Path, have_qsd: bool) -> Result<String, String> {
    let mut md = String::new();
    let _ = writeln!(md, "## An idle disk\n");
    let _ = writeln!(
        md,
        "A frontend connected (libblkio, one queue) after 2000 reads at queue depth 1, then \
         idle; the backend's CPU time over the next {} s, default options. Target: vubd under \
         1% of a CPU.\n",
        IDLE.as_secs()
    );
    let _ = writeln!(md, "| backend | CPU while idle | target |");
    let _ = writeln!(md, "|---|---:|---|");
    let vubd = idle_cpu(Backend::Vubd, o, work)?;
    eprintln!("bench: idle vubd {vubd:.2}% of a CPU");
    let met = if vubd < 1.0 { "met" } else { "**missed**" };
    let _ = writeln!(md, "| vubd | {vubd:.2}% | < 1%: {met} |");
    if have_qsd {
        let qsd = idle_cpu(Backend::Qsd, o, work)?;
        eprintln!("bench: idle qemu-storage-daemon {qsd:.2}% of a CPU");
        let _ = writeln!(md, "| qemu-storage-daemon | {qsd:.2}% | |");
    }
    md.push('\n');
    Ok(md)
}
