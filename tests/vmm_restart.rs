//! Restarting vubd under a running guest: a Linux guest under QEMU (TCG) runs fio with
//! verification on two virtqueues while the test SIGKILLs vubd five times, restarting it each
//! time with the same arguments on the same socket. QEMU (`reconnect-ms`) reconnects by itself
//! and replays the requests the ring shows as not completed (docs/usage.md, "Restarting or
//! upgrading vubd under a running VM"). The guest must see nothing of it: fio's every round
//! verifies clean and the kernel logs no I/O error. Afterwards the image passes `qemu-img
//! check` and its persistent bitmap, crash-consistent, holds every granule fio wrote.
//!
//! The disk is the graph vubd is built for: qcow2 metadata over a raw data file, with one
//! persistent bitmap. Needs the guest kit of `tests/qemu_guest.rs` (skipped without it unless
//! VUBD_REQUIRE_GUEST=1), qemu-img, qemu-nbd and nbdinfo.

mod common;
#[path = "guest/kit.rs"]
mod kit;
#[path = "guest/vm.rs"]
mod vm;

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use common::bitmaps::{nbd_dirty_granules, vubd_bitmap};
use common::cli::vubd_ok;
use common::qemu::assert_check_clean;
use common::{TempDir, Vubd};
use kit::{initrd_with_script, make_initramfs};
use vm::{
    assert_guest_clean, kit_or_skip, queue_interrupts, FioLoad, Vm, VmSpec, FIO_DONE, FIO_FAILED,
    FIO_RUNNING, GUEST_CHECKS, GUEST_END,
};

const RESTARTS: usize = 5;
const BITMAP: &str = "since-boot";
const GRANULE: u64 = 64 << 10;
/// Booting to fio under TCG takes 10-30 s; the slack is for a loaded machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// From `stop` to the end of the script: the round under way finishes first.
const END_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn fio_in_a_guest_verifies_clean_across_five_sigkill_restarts_of_vubd() {
    let Some(kit) = kit_or_skip("the VMM restart test") else {
        return;
    };
    let started = Instant::now();
    let dir = TempDir::new("vmm-restart");
    let meta = dir.join("meta.qcow2");
    let meta = meta.to_str().unwrap();
    let raw = dir.join("disk.raw");
    vubd_ok(&[
        "create",
        meta,
        "--data-file",
        raw.to_str().unwrap(),
        "--size",
        "64M",
    ]);
    vubd_bitmap(&dir, &["add", BITMAP, "--granularity", "64K"]);
    let socket = dir.join("vubd.sock");
    let args = ["--image", meta, "--format", "qcow2", "--num-queues", "2"];
    let mut vubd = Vubd::start(&socket, &args);

    let initramfs = dir.join("initramfs.cpio");
    make_initramfs(&kit, &initramfs).expect("initramfs");
    let load = FioLoad {
        offset: 8 << 20,
        job_size: 16 << 20,
    };
    let script = format!("{}{GUEST_CHECKS}", load.script());
    let initrd = initrd_with_script(&initramfs, &script).expect("initrd");
    let mut guest = Vm::start(
        &kit,
        &VmSpec {
            name: "guest",
            dir: dir.path(),
            initrd: &initrd,
            vhost_socket: &socket,
            num_queues: 2,
            reconnect_ms: Some(200),
            incoming: None,
        },
    );
    guest
        .wait_for(&[FIO_RUNNING], BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let booted = started.elapsed();
    let first_round = Instant::now();
    guest
        .wait_round_end("the first round")
        .unwrap_or_else(|e| panic!("{e}"));
    let round_time = first_round.elapsed();

    // What each killed vubd logged: with the console, the story of a failure.
    let mut logs = Vec::new();
    for n in 1..=RESTARTS {
        // Kill two fifths into a round, so that requests are in flight on both queues (fio
        // starts its jobs in the first tenths of a second of a round; a round ends with them).
        guest
            .run_for(round_time * 2 / 5, &[FIO_FAILED, GUEST_END])
            .unwrap_or_else(|e| panic!("before kill {n}: {e}\n{}", logs.join("\n")));
        let (status, stderr) = vubd.stop_with(libc::SIGKILL);
        assert_eq!(status.signal(), Some(libc::SIGKILL), "kill {n}: {stderr}");
        logs.push(format!("--- vubd {n} (killed) ---\n{stderr}"));
        vubd = Vubd::start(&socket, &args);
        // A round ending now went through the new vubd: QEMU came back to it on its own,
        // and the requests cut off by the kill were served again.
        guest
            .wait_round_end(&format!("restart {n}"))
            .unwrap_or_else(|e| {
                let live = vubd.stop();
                panic!(
                    "{e}\n{}\n--- vubd {} (running) ---\n{live}",
                    logs.join("\n"),
                    n + 1
                )
            });
    }
    guest.send_line("stop");
    let ended = guest.wait_for(&[GUEST_END], END_TIMEOUT);
    let exited = ended.and_then(|_| guest.wait_exit(Duration::from_secs(30)));
    let stderr = vubd.stop();
    logs.push(format!("--- vubd {} (stopped) ---\n{stderr}", RESTARTS + 1));
    let context = format!("{}\n{}", guest.describe(), logs.join("\n"));
    if let Err(e) = exited {
        panic!("{e}\n{}", logs.join("\n"));
    }

    let console = guest.console();
    assert_guest_clean(&console, &context);
    assert!(console.contains(FIO_DONE), "{context}");
    let rounds = load
        .check_rounds(&console)
        .unwrap_or_else(|e| panic!("{e}\n{context}"));
    let queues = queue_interrupts(&console);
    assert!(
        queues.len() == 2 && queues.iter().all(|&n| n > 0),
        "both virtqueues carry I/O (completions per queue: {queues:?}):\n{context}"
    );

    assert_check_clean(dir.path(), "meta.qcow2");
    let dirty = nbd_dirty_granules(dir.path(), "meta.qcow2", BITMAP, GRANULE);
    let range = load.range();
    let written: BTreeSet<u64> = (range.start / GRANULE..range.end.div_ceil(GRANULE)).collect();
    assert_eq!(
        dirty,
        written,
        "the bitmap holds exactly the granules fio wrote (dirty: {} granules, written: {})",
        dirty.len(),
        written.len()
    );
    // Every vubd after the first was handed the in-flight region QEMU kept (QEMU keeps it
    // across reconnects); whether a kill left requests in flight to resubmit is up to timing.
    for log in &logs[1..] {
        assert!(
            log.contains("in-flight region of the frontend"),
            "QEMU passed its in-flight region to each restarted vubd:\n{log}"
        );
    }
    let resubmitted = logs.iter().filter(|l| l.contains("resubmitted")).count();
    eprintln!(
        "vmm_restart: boot to fio {booted:.1?}, a round {round_time:.1?}, {rounds} fio rounds, \
         {RESTARTS} restarts ({resubmitted} resubmitted requests left in flight), completions \
         per queue {queues:?}, total {:.1?}",
        started.elapsed()
    );
}
