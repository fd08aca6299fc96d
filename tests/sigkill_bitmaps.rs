//! Crash-consistent bitmaps against SIGKILL: vubd serves a qcow2-over-raw disk (started with
//! qemu-storage-daemon's command line) to a libblkio load on two queues — 4 KiB and 64 KiB
//! writes, write-zeroes, discards, eight in flight per queue — while a QMP client takes
//! checkpoints the way backup software does (one transaction: add a new persistent bitmap,
//! disable the previous one, remove an old one). At a random moment vubd is killed with
//! SIGKILL. Then, by QEMU's tools only:
//!
//! * `qemu-img info` lists every bitmap consistent (not `in-use`);
//! * `qemu-img check` finds no corruption;
//! * each bitmap read by `qemu-nbd -B` and `nbdinfo` marks every granule of every request
//!   acknowledged while it recorded, and every granule an in-flight write reached on disk.
//!
//! A request is placed among the checkpoints by a logical clock stamped when it was submitted
//! and when it was acknowledged, and when a checkpoint was sent and answered: a request wholly
//! inside a bitmap's recording window must be in that bitmap; one that overlaps a checkpoint
//! must be in one of the bitmaps either side of it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

use common::bitmaps::{nbd_dirty_granules, qsd_export};
use common::blkio_client::BlkioClient;
use common::load::{self, Clock, End, Issued, Kind};
use common::qemu::{info_json, try_run_in};
use common::qmp::Qmp;
use common::qsd::Daemon;
use common::{pattern, TempDir};

const DISK_SIZE: u64 = 1 << 30;
const GRANULE: u64 = 65536;
const KILLS: u64 = 20;
const NODE: &str = "fmt";

/// A checkpoint: the transaction that created bitmap `name`, stamped on the load's clock.
#[derive(Clone, Debug)]
struct Checkpoint {
    name: String,
    sent: u64,
    /// When the success reply came; `None` if none came (killed meanwhile).
    replied: Option<u64>,
}

fn bitmap_add(name: &str) -> Value {
    json!({"type": "block-dirty-bitmap-add",
           "data": {"node": NODE, "name": name, "persistent": true, "granularity": GRANULE}})
}

fn bitmap_action(kind: &str, name: &str) -> Value {
    json!({"type": kind, "data": {"node": NODE, "name": name}})
}

/// The bitmaps in the image by QEMU's reading: name → flags.
fn qemu_bitmaps(dir: &Path) -> BTreeMap<String, Vec<String>> {
    let info = info_json(dir, "meta.qcow2");
    let list = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    list.iter()
        .map(|b| {
            let flags = b["flags"]
                .as_array()
                .map(|f| {
                    f.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            (b["name"].as_str().unwrap_or_default().to_string(), flags)
        })
        .collect()
}

/// Take checkpoints every `every` until the connection dies or `stop` is set. Checkpoint `n`
/// adds bitmap `{prefix}{n}`, disables the one before and removes the one three before.
fn checkpoints(
    qmp: &mut Qmp,
    prefix: &str,
    clock: &Clock,
    stop: &AtomicBool,
    log: &Mutex<Vec<Checkpoint>>,
) {
    let mut n = 1;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(120));
        let name = format!("{prefix}{n}");
        let mut actions = vec![
            bitmap_add(&name),
            bitmap_action("block-dirty-bitmap-disable", &format!("{prefix}{}", n - 1)),
        ];
        if n >= 3 {
            actions.push(bitmap_action(
                "block-dirty-bitmap-remove",
                &format!("{prefix}{}", n - 3),
            ));
        }
        let sent = clock.tick();
        log.lock().unwrap().push(Checkpoint {
            name,
            sent,
            replied: None,
        });
        let reply = qmp.try_execute("transaction", json!({ "actions": actions }));
        match reply {
            Some(r) if r.get("return").is_some() => {
                log.lock().unwrap().last_mut().unwrap().replied = Some(clock.tick());
            }
            Some(r) => panic!("checkpoint transaction failed: {r}"),
            None => return,
        }
        n += 1;
    }
}

/// A bitmap's recording window on the clock, and the part of it no checkpoint overlaps.
struct Window {
    name: String,
    present: bool,
    /// It may hold writes stamped in `[start, end]`...
    start: u64,
    end: u64,
    /// ...and holds every write stamped inside `(sure_start, sure_end)`.
    sure_start: u64,
    sure_end: u64,
}

fn windows(checkpoints: &[Checkpoint], on_disk: &BTreeMap<String, Vec<String>>) -> Vec<Window> {
    checkpoints
        .iter()
        .enumerate()
        .map(|(i, c)| {
            // The next checkpoint ended this one's recording if it was applied: answered, or
            // cut short after its atomic switch (its bitmap is on disk).
            let next = checkpoints
                .get(i + 1)
                .filter(|n| n.replied.is_some() || on_disk.contains_key(&n.name));
            Window {
                name: c.name.clone(),
                present: on_disk.contains_key(&c.name),
                start: c.sent,
                end: next.map_or(u64::MAX, |n| n.replied.unwrap_or(u64::MAX)),
                sure_start: c.replied.unwrap_or(u64::MAX),
                sure_end: next.map_or(u64::MAX, |n| n.sent),
            }
        })
        .collect()
}

/// The granules of `op` that must be marked: all of an acknowledged request, those of an
/// in-flight write whose data is on disk.
fn must_mark(op: &Issued, data: &std::fs::File) -> Vec<u64> {
    let granules = op.offset / GRANULE..=(op.offset + op.len - 1) / GRANULE;
    if op.acknowledged.is_some() {
        return granules.collect();
    }
    let Kind::Write { seed } = op.kind else {
        // An in-flight discard or write-zeroes may or may not have happened: nothing to tell.
        return Vec::new();
    };
    let expected = pattern(op.len as usize, seed);
    granules
        .filter(|g| {
            let from = op.offset.max(g * GRANULE);
            let to = (op.offset + op.len).min((g + 1) * GRANULE);
            let mut got = vec![0u8; (to - from) as usize];
            data.read_exact_at(&mut got, from)
                .expect("read the data file");
            let at = (from - op.offset) as usize;
            got == expected[at..at + got.len()]
        })
        .collect()
}

/// Check every request of the log against the bitmaps QEMU reads; returns how many
/// acknowledged and in-flight requests could be checked.
fn check_round(
    dir: &Path,
    log: &[Issued],
    checkpoints: &[Checkpoint],
    round: u64,
) -> (usize, usize) {
    let on_disk = qemu_bitmaps(dir);
    for (name, flags) in &on_disk {
        assert!(
            !flags.iter().any(|f| f == "in-use"),
            "kill {round}: QEMU reads bitmap {name} as in use: {flags:?}"
        );
    }
    let (code, out) = try_run_in(dir, "qemu-img", &["check", "meta.qcow2"]);
    assert!(
        code == 0 || code == 3,
        "kill {round}: qemu-img check exit {code}:\n{out}"
    );
    let windows = windows(checkpoints, &on_disk);
    let dirty: BTreeMap<&str, BTreeSet<u64>> = windows
        .iter()
        .filter(|w| w.present)
        .map(|w| {
            (
                w.name.as_str(),
                nbd_dirty_granules(dir, "meta.qcow2", &w.name, GRANULE),
            )
        })
        .collect();
    let data = std::fs::File::open(dir.join("disk.raw")).expect("open the data file");
    let mut checked = (0, 0);
    for op in log {
        let (a, c) = (op.submitted, op.acknowledged.unwrap_or(u64::MAX));
        let candidates: Vec<&Window> = windows
            .iter()
            .filter(|w| w.start <= c && a <= w.end)
            .collect();
        if candidates.iter().any(|w| !w.present) {
            // Its bitmap was removed by a later checkpoint.
            continue;
        }
        let granules = must_mark(op, &data);
        if granules.is_empty() {
            continue;
        }
        if op.acknowledged.is_some() {
            checked.0 += 1;
        } else {
            checked.1 += 1;
        }
        let sure = candidates
            .iter()
            .find(|w| w.sure_start < a && c < w.sure_end);
        for g in granules {
            match sure {
                Some(w) => assert!(
                    dirty[w.name.as_str()].contains(&g),
                    "kill {round}: {op:?} inside the window of {} but granule {g} is clean",
                    w.name
                ),
                None => {
                    assert!(
                    candidates.iter().any(|w| dirty[w.name.as_str()].contains(&g)),
                    "kill {round}: {op:?} across checkpoints {:?} but granule {g} is clean in all",
                    candidates.iter().map(|w| &w.name).collect::<Vec<_>>()
                )
                }
            }
        }
    }
    checked
}

#[test]
fn bitmaps_stay_consistent_and_complete_across_sigkills_under_load() {
    let dir = TempDir::new("sigkill");
    std::fs::File::create(dir.join("disk.raw"))
        .and_then(|f| f.set_len(DISK_SIZE))
        .expect("create the data file");
    common::cli::vubd_ok(&[
        "create",
        dir.join("meta.qcow2").to_str().unwrap(),
        "--data-file",
        dir.join("disk.raw").to_str().unwrap(),
    ]);
    let export = qsd_export(&dir).queues(2);
    let mut rng = 0x5eed_u64;
    let (mut checked, mut in_flight) = (0, 0);
    for round in 1..=KILLS {
        // Start the round on a bitmap of its own; drop those of the last round.
        let prefix = format!("r{round}c");
        let mut actions = vec![bitmap_add(&format!("{prefix}0"))];
        for old in qemu_bitmaps(dir.path()).keys() {
            actions.push(bitmap_action("block-dirty-bitmap-remove", old));
        }
        let daemon = Daemon::vubd(dir.path(), &export);
        let mut qmp = daemon.qmp();
        let clock = Clock::default();
        let sent = clock.tick();
        qmp.ok("transaction", json!({ "actions": actions }));
        let checkpoint_log = Mutex::new(vec![Checkpoint {
            name: format!("{prefix}0"),
            sent,
            replied: Some(clock.tick()),
        }]);
        let mut client = BlkioClient::connect(daemon.socket(), 2).expect("connect libblkio");
        let stop = AtomicBool::new(false);
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let delay = Duration::from_millis(100 + rng % 600);
        let log = std::thread::scope(|s| {
            let load =
                s.spawn(|| load::run(&mut client, DISK_SIZE, rng, &clock, &stop, End::Collect));
            let qmp_thread =
                s.spawn(|| checkpoints(&mut qmp, &prefix, &clock, &stop, &checkpoint_log));
            std::thread::sleep(delay);
            daemon.kill();
            stop.store(true, Ordering::SeqCst);
            qmp_thread.join().expect("checkpoint thread");
            load.join().expect("load thread")
        });
        drop(client);
        let acknowledged = log.iter().filter(|op| op.acknowledged.is_some()).count();
        assert!(
            acknowledged > 20,
            "kill {round}: only {acknowledged} requests completed"
        );
        let (acked, landed) = check_round(dir.path(), &log, &checkpoint_log.lock().unwrap(), round);
        checked += acked;
        in_flight += landed;
    }
    eprintln!(
        "{KILLS} kills: {checked} acknowledged requests and {in_flight} in-flight writes found on \
         disk checked against QEMU's reading of the bitmaps"
    );
    assert!(
        checked > 500,
        "too few requests could be checked: {checked}"
    );

    // qemu-storage-daemon itself opens the image and finds the bitmaps usable.
    let qsd = Daemon::qsd(dir.path(), &export);
    let bitmaps = qsd.qmp().bitmaps(NODE);
    assert!(!bitmaps.is_empty());
    for b in &bitmaps {
        assert_ne!(b["inconsistent"], json!(true), "qemu-storage-daemon: {b}");
    }
    let (status, stderr) = qsd.stop();
    assert!(status.success(), "qemu-storage-daemon: {stderr}");
}
