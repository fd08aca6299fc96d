//! Live migration of a guest between two QEMU processes on this host, both attached to one
//! vubd: the destination QEMU connects to the same vhost-user socket while the source is still
//! attached (vubd serves two frontends of one export at a time, for exactly this handover).
//!
//! The guest (TCG) runs fio rounds with verification on two virtqueues; the destination starts
//! with `-incoming defer`, and the source migrates to it over a unix socket while fio goes on.
//! After the switch the source quits, fio goes on through the destination, and the guest
//! writes a fresh region there. Checked: no migration blocker (a backend without dirty logging
//! makes QEMU refuse to migrate; the test names the blocker), fio clean in every round on
//! either side, no I/O error in the guest, the fresh region's data in the raw file, `qemu-img
//! check`, and the persistent bitmap, read by qemu-nbd + nbdinfo, holding exactly the granules
//! written from either side.
//!
//! And the point of dirty logging (`VHOST_F_LOG_ALL`, `VHOST_USER_PROTOCOL_F_LOG_SHMFD`): every
//! guest page vubd writes while the VM migrates must be sent again. fio alone hardly shows a
//! page vubd forgot to log (its buffers are checked as soon as they are read, mostly still on
//! the source), so the test makes one certain to matter: once the first pass over guest RAM is
//! over, the guest reads a region of known content through its page cache, pages that only vubd
//! writes (`init_on_alloc=0`) and that the guest reads again only after the switch, on the
//! destination. The migration is held until then (low bandwidth, 1 ms downtime limit, and a
//! guest process that dirties memory faster than that drains, so that it cannot converge
//! early), then let go.

mod common;
#[path = "guest/kit.rs"]
mod kit;
#[path = "guest/vm.rs"]
mod vm;

use std::collections::BTreeSet;
use std::fs;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::bitmaps::{nbd_dirty_granules, vubd_bitmap};
use common::cli::vubd_ok;
use common::data::sha256_hex;
use common::qemu::assert_check_clean;
use common::qmp::Qmp;
use common::{pattern, TempDir, Vubd};
use kit::{initrd_with_script, make_initramfs};
use serde_json::{json, Value};
use vm::{
    assert_guest_clean, kit_or_skip, queue_interrupts, FioLoad, Vm, VmSpec, FIO_DONE, FIO_FAILED,
    FIO_RUNNING, GUEST_CHECKS, GUEST_END, ROUND_MARKER,
};

const DISK: u64 = 64 << 20;
const BITMAP: &str = "since-boot";
const GRANULE: u64 = 64 << 10;
const MIB: u64 = 1 << 20;
/// fio's two regions: 8-40 MiB.
const LOAD: FioLoad = FioLoad {
    offset: 8 << 20,
    job_size: 16 << 20,
};
/// Known content the host puts there; the guest reads it into its page cache during the
/// migration, and never writes it.
const CACHED: Range<u64> = (52 << 20)..(60 << 20);
/// The region the guest writes on the destination only, after fio.
const FRESH: Range<u64> = (48 << 20)..(49 << 20);
const FILLED: &str = "VUBD-FILLED";
const CACHED_MARKER: &str = "VUBD-CACHED ";
const BUFFERS_MARKER: &str = "VUBD-BUFFERS ";
const REREAD_MARKER: &str = "VUBD-REREAD ";
const FRESH_MARKER: &str = "VUBD-FRESH-WRITTEN ";
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the destination may take to set up its device and answer QMP.
const DESTINATION_TIMEOUT: Duration = Duration::from_secs(60);
/// 512 MiB of mostly zero pages over a unix socket: seconds. The slack is for a loaded host.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(180);
const END_TIMEOUT: Duration = Duration::from_secs(120);
/// The migration's bandwidth while it is held (bytes per second).
const HELD_BANDWIDTH: u64 = 64 << 20;
/// The downtime limit that lets it converge at once: the spinner's few MiB fit many times.
const RELEASED_DOWNTIME_MS: u64 = 2000;

/// Bytes of random data the guest's spinner copies over and over, so that the migration, held
/// to a low bandwidth, always has more dirty memory to send than it may leave for the
/// downtime (random: QEMU sends zero pages at almost no cost).
const SPIN_BYTES: u64 = 4 << 20;

/// The guest's script: a memory-dirtying spinner, the page cache fill the host asks for during
/// the migration (`fill`), fio rounds, then on the destination the page cache read back (from
/// memory, then from the disk), the fresh region written, and the final checks. The script
/// holds /dev/vda open throughout: Linux drops a block device's page cache when its last
/// opener closes it, and the fill must stay cached until it is read back.
fn guest_script() -> String {
    let read_cached = format!(
        "dd if=/dev/vda bs=1M skip={} count={} 2>/dev/null",
        CACHED.start / MIB,
        (CACHED.end - CACHED.start) / MIB
    );
    format!(
        "exec 3</dev/vda\n\
         head -c {SPIN_BYTES} /dev/urandom > /tmp/junk\n\
         (while :; do dd if=/tmp/junk of=/tmp/spin bs=64k conv=notrunc 2>/dev/null; done) &\n\
         spinner=$!\n\
         cmd_fill() {{\n\
         \x20   blockdev --flushbufs /dev/vda\n\
         \x20   {read_cached} >/dev/null\n\
         \x20   echo {FILLED}\n\
         }}\n\
         {load}\
         echo \"{BUFFERS_MARKER}$(grep Buffers: /proc/meminfo)\"\n\
         echo \"{CACHED_MARKER}$({read_cached} | sha256sum)\"\n\
         blockdev --flushbufs /dev/vda\n\
         echo \"{REREAD_MARKER}$({read_cached} | sha256sum)\"\n\
         kill $spinner\n\
         head -c {fresh_len} /dev/urandom > /tmp/fresh\n\
         dd if=/tmp/fresh of=/dev/vda bs=64k seek={fresh_seek} conv=fsync 2>/dev/null \
             || {{ echo VUBD-FRESH-FAILED; exit 1; }}\n\
         sync\n\
         echo \"{FRESH_MARKER}$(sha256sum < /tmp/fresh)\"\n\
         {GUEST_CHECKS}",
        load = LOAD.script(),
        fresh_len = FRESH.end - FRESH.start,
        fresh_seek = FRESH.start / (64 << 10),
    )
}

#[test]
fn a_guest_running_fio_migrates_live_to_a_second_qemu_on_the_same_vubd() {
    let Some(kit) = kit_or_skip("the live migration test") else {
        return;
    };
    let started = Instant::now();
    let dir = TempDir::new("live-migration");
    // The raw disk, zeros but for the known content of CACHED, adopted by qcow2 metadata; the
    // bitmap starts clean after that.
    let raw = dir.join("disk.raw");
    let cached_content = pattern((CACHED.end - CACHED.start) as usize, 77);
    let file = fs::File::create(&raw).expect("create disk.raw");
    file.set_len(DISK).unwrap();
    file.write_all_at(&cached_content, CACHED.start).unwrap();
    drop(file);
    let meta = dir.join("meta.qcow2");
    let meta = meta.to_str().unwrap();
    vubd_ok(&["create", meta, "--data-file", raw.to_str().unwrap()]);
    vubd_bitmap(&dir, &["add", BITMAP, "--granularity", "64K"]);
    let socket = dir.join("vubd.sock");
    let mut vubd = Vubd::start(
        &socket,
        &["--image", meta, "--format", "qcow2", "--num-queues", "2"],
    );

    let initramfs = dir.join("initramfs.cpio");
    make_initramfs(&kit, &initramfs).expect("initramfs");
    let initrd = initrd_with_script(&initramfs, &guest_script()).expect("initrd");
    // Source and destination differ only in -incoming: a migration needs the same devices.
    // reconnect-ms as docs/usage.md has it for production.
    let spec = |name, incoming| VmSpec {
        name,
        dir: dir.path(),
        initrd: &initrd,
        vhost_socket: &socket,
        num_queues: 2,
        reconnect_ms: Some(1000),
        incoming,
    };
    let mut source = Vm::start(&kit, &spec("source", None));
    source
        .wait_for(&[FIO_RUNNING], BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let booted = started.elapsed();
    // A whole round on the source: every block of fio's regions written from this side.
    source
        .wait_round_end("the first round on the source")
        .unwrap_or_else(|e| panic!("{e}"));
    let mut source_qmp = source
        .qmp(DESTINATION_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));

    // The negative check: QEMU holds a migration blocker for a vhost-user device whose backend
    // cannot log dirty pages, and would refuse the migration outright.
    let info = source_qmp.ok("query-migrate", json!({}));
    if let Some(reasons) = info.get("blocked-reasons") {
        panic!(
            "QEMU refuses to migrate this VM: blocked-reasons {reasons}\n{}",
            vubd_log(&mut vubd)
        );
    }

    let mut destination = Vm::start(&kit, &spec("destination", Some("defer")));
    let mut destination_qmp = match destination.qmp(DESTINATION_TIMEOUT) {
        Ok(qmp) => qmp,
        Err(e) => panic!(
            "the destination QEMU did not get through setting up its vhost-user-blk device \
             while the source is attached (vubd must serve both frontends at once): {e}\n{}",
            vubd_log(&mut vubd)
        ),
    };
    let status = destination_qmp.ok("query-status", json!({}));
    assert_eq!(status["status"], "inmigrate", "{status}");
    let migration_socket = dir.join("migration.sock");
    let uri = format!("unix:{}", migration_socket.display());
    destination_qmp.ok("migrate-incoming", json!({ "uri": uri }));
    // Held: QEMU switches over once what is left to send fits in the downtime limit at the
    // measured bandwidth. 64 MiB/s by 1 ms is 64 KiB, and the guest's spinner dirties its
    // 4 MiB far faster than that drains, so the migration iterates until the limits go up.
    // (A downtime limit of 0 switches over right after the first pass: QEMU then skips the
    // dirty bitmap sync that would find the pages dirtied meanwhile.)
    source_qmp.ok(
        "migrate-set-parameters",
        json!({"max-bandwidth": HELD_BANDWIDTH, "downtime-limit": 1}),
    );
    let migrate_at = Instant::now();
    let reply = source_qmp.execute("migrate", json!({ "uri": uri }));
    if reply.get("error").is_some() {
        panic!(
            "QEMU refused to migrate: {reply}\n{}\n{}",
            source.describe(),
            vubd_log(&mut vubd)
        );
    }
    // dirty-sync-count counts the syncs of the dirty bitmap: the first as the migration
    // starts, the second once every page of guest RAM has been sent once.
    wait_migration(
        &mut source_qmp,
        &mut source,
        "the first pass over RAM",
        |info| info["ram"]["dirty-sync-count"].as_u64() >= Some(2),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", vubd_log(&mut vubd)));
    source.send_line("fill");
    if let Err(e) = source.wait_for(&[FILLED], vm::ROUND_TIMEOUT) {
        let info = source_qmp.ok("query-migrate", json!({}));
        panic!("no page cache fill on the source ({info}): {e}");
    }
    let info = source_qmp.ok("query-migrate", json!({}));
    assert_eq!(
        info["status"], "active",
        "the migration was held while the guest filled its page cache: {info}"
    );
    source_qmp.ok(
        "migrate-set-parameters",
        json!({"max-bandwidth": 8u64 << 30, "downtime-limit": RELEASED_DOWNTIME_MS}),
    );
    let migration = wait_migration(&mut source_qmp, &mut source, "completion", |info| {
        info["status"] == "completed"
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", destination.describe(), vubd_log(&mut vubd)));
    let migration_time = migrate_at.elapsed();
    wait_status(&mut destination_qmp, "running")
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", destination.describe(), vubd_log(&mut vubd)));
    let source_rounds = FioLoad::rounds_done(&source.console());

    // fio goes on through the destination, first with the source still attached (stopped),
    // then with the source gone, the way a management layer ends a migration.
    destination
        .wait_round_end("the switch, source still attached")
        .unwrap_or_else(|e| panic!("{e}"));
    let reply = source_qmp.try_execute("quit", json!({}));
    source
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("source quit ({reply:?}): {e}"));
    destination
        .wait_round_end("the source quit")
        .unwrap_or_else(|e| panic!("{e}"));
    destination.send_line("stop");
    let ended = destination
        .wait_for(&[GUEST_END], END_TIMEOUT)
        .and_then(|_| destination.wait_exit(Duration::from_secs(30)));
    let stderr = vubd.stop();
    let context = format!(
        "{}\n{}\n--- vubd ---\n{stderr}",
        source.describe(),
        destination.describe()
    );
    if let Err(e) = ended {
        panic!("{e}\n--- vubd ---\n{stderr}");
    }

    // The guest's story is the source's console, then the destination's.
    let (before, after) = (source.console(), destination.console());
    let console = format!("{before}{after}");
    assert_guest_clean(&console, &context);
    assert!(
        before.contains(FILLED),
        "the page cache was filled on the source:\n{context}"
    );
    assert!(after.contains(FIO_DONE), "{context}");
    assert!(
        after.contains(ROUND_MARKER),
        "fio rounds ended on the destination:\n{context}"
    );
    let rounds = LOAD
        .check_rounds(&console)
        .unwrap_or_else(|e| panic!("{e}\n{context}"));
    let queues = queue_interrupts(&after);
    assert!(
        queues.len() == 2 && queues.iter().all(|&n| n > 0),
        "both virtqueues carry I/O (completions per queue: {queues:?}):\n{context}"
    );

    // What vubd wrote into guest memory during the migration reached the destination. First,
    // that the read back comes from memory: the block device's cache ("Buffers") holds at
    // least the region.
    let buffers_kib: u64 = after
        .lines()
        .find_map(|l| l.strip_prefix(BUFFERS_MARKER))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kib| kib.parse().ok())
        .unwrap_or_else(|| panic!("no {BUFFERS_MARKER:?} on the console:\n{context}"));
    assert!(
        buffers_kib * 1024 >= CACHED.end - CACHED.start,
        "the region is in the guest's page cache when read back (Buffers: {buffers_kib} kB)"
    );
    let expected = sha256_hex(&cached_content);
    let reread = console_sum(&after, REREAD_MARKER, &context);
    assert_eq!(reread, expected, "the known region read from the disk");
    let cached = console_sum(&after, CACHED_MARKER, &context);
    assert_eq!(
        cached, expected,
        "page cache pages vubd filled on the source during the migration (after the first pass \
         over RAM) read on the destination differ from the disk: vubd did not log its writes \
         to guest memory in the dirty log, and QEMU did not send them again"
    );

    // The region written on the destination is in the raw data file, at its own offset.
    let fresh = console_sum(&after, FRESH_MARKER, &context);
    let data = fs::read(&raw).expect("read disk.raw");
    assert_eq!(
        sha256_hex(&data[FRESH.start as usize..FRESH.end as usize]),
        fresh,
        "the fresh region as the guest wrote it on the destination"
    );

    assert_check_clean(dir.path(), "meta.qcow2");
    let dirty = nbd_dirty_granules(dir.path(), "meta.qcow2", BITMAP, GRANULE);
    let written: BTreeSet<u64> = [LOAD.range(), FRESH]
        .iter()
        .flat_map(|r| r.start / GRANULE..r.end.div_ceil(GRANULE))
        .collect();
    let missing: Vec<u64> = written.difference(&dirty).copied().collect();
    let extra: Vec<u64> = dirty.difference(&written).copied().collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "the bitmap holds exactly the granules written from either side: granules (of {GRANULE} \
         bytes) written but clean {missing:?}, dirty but never written {extra:?}"
    );
    eprintln!(
        "live_migration: boot to fio {booted:.1?}, migration {migration_time:.1?} (held for the \
         page cache fill; downtime {} ms, {} MiB transferred), {rounds} fio rounds \
         ({source_rounds} ended on the source), completions per queue {queues:?}, total {:.1?}",
        migration["downtime"],
        migration["ram"]["transferred"].as_u64().unwrap_or(0) >> 20,
        started.elapsed()
    );
}

/// The SHA-256 the guest printed after `marker`.
fn console_sum<'a>(console: &'a str, marker: &str, context: &str) -> &'a str {
    console
        .lines()
        .find_map(|l| l.strip_prefix(marker))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {marker:?} on the console:\n{context}"))
}

/// Poll the source's `query-migrate` until `reached` holds of its answer, which it returns.
/// `Err` if the migration ends otherwise, the source's fio fails, or time runs out.
fn wait_migration(
    qmp: &mut Qmp,
    source: &mut Vm,
    what: &str,
    reached: impl Fn(&Value) -> bool,
) -> Result<Value, String> {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let info = qmp.ok("query-migrate", json!({}));
        if reached(&info) {
            return Ok(info);
        }
        if matches!(
            info["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ) {
            return Err(format!(
                "migration ended before {what}: {info}\n{}",
                source.describe()
            ));
        }
        if source.console().contains(FIO_FAILED) {
            return Err(format!("fio failed during the migration: {info}"));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "migration: no {what} after {MIGRATION_TIMEOUT:?}: {info}\n{}",
                source.describe()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Poll `query-status` until the VM is in `status`.
fn wait_status(qmp: &mut Qmp, status: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = qmp.ok("query-status", json!({}));
        if now["status"] == status {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("VM status {now}, not {status}, after 30 s"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// vubd's log so far, for a failure message: kills it to read its stderr (SIGKILL: a vubd
/// stuck in the failure must not hide it behind a shutdown that never ends).
fn vubd_log(vubd: &mut Vubd) -> String {
    let (status, stderr) = vubd.stop_with(libc::SIGKILL);
    format!("--- vubd (stopped: {status}) ---\n{stderr}")
}
