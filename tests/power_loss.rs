//! Crash-consistent bitmaps under power loss: every write vubd makes to an image while serving
//! it (bitmap marks, bitmap operations, qcow2 metadata) is a cut point. A scenario is run once
//! to count them, then again for each cut with power lost just before it — keeping none, all or
//! part of what was written since the last sync — and with the write failing instead. After
//! each cut the image must pass `qemu-img check` (leaks allowed, no corruption), hold no
//! `in_use` bitmap by QEMU's reading, and hold bitmaps that are exactly the model's state
//! before or after the operation in progress: every granule whose data reached the disk marked,
//! none that no write could have marked. Then the image must serve again, and `vubd check
//! --repair` must leave it without leaks.
//!
//! Guest data bypasses the fault injector (it counts as having reached the disk as soon as it
//! is written), so a mark that lagged behind its data would show.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::crash::{self, Harness, Model};
use common::qemu::{assert_check_clean, info_json, qemu_img, try_run_in};
use common::TempDir;
use vubd::bitmap::Action;
use vubd::block::fault::{Action as Fault, Counts, FaultInjector, Keep, Rule, Trigger};

const MIB: u64 = 1 << 20;
const DISK: &str = "disk.qcow2";

/// One step of a scenario.
#[derive(Clone, Debug)]
enum Op {
    Write(u64, u64, u8),
    Discard(u64, u64),
    Flush,
    Tx(Vec<Action>),
}

fn add(name: &str, granularity: u64) -> Action {
    Action::Add {
        name: name.into(),
        granularity: Some(granularity),
        persistent: true,
        disabled: false,
    }
}

fn named(make: fn(String) -> Action, name: &str) -> Action {
    make(name.into())
}

fn disable(name: &str) -> Action {
    named(|name| Action::Disable { name }, name)
}

/// Guest data in a raw data file: bitmap data clusters are all vubd writes besides the
/// bitmap directory. 4 KiB clusters and 512-byte granules give a bitmap of four data clusters,
/// each covering 16 MiB of the disk, so one write can need two of them.
fn raw_data_scenario() -> Vec<Op> {
    vec![
        Op::Tx(vec![add("b0", 512)]),
        Op::Tx(vec![add("b1", 65536)]),
        Op::Write(16 * MIB - 4096, 8192, 1),
        Op::Write(0, 512, 2),
        Op::Flush,
        Op::Write(0, 512, 3),
        // A checkpoint, as backup software takes one.
        Op::Tx(vec![add("b2", 4096), disable("b1")]),
        Op::Write(32 * MIB + 100, 3000, 4),
        Op::Discard(40 * MIB, MIB),
        Op::Tx(vec![Action::Merge {
            target: "b1".into(),
            sources: vec!["b2".into()],
        }]),
        Op::Tx(vec![named(|name| Action::Clear { name }, "b0")]),
        Op::Write(48 * MIB, 65536, 5),
        Op::Tx(vec![
            named(|name| Action::Remove { name }, "b2"),
            named(|name| Action::Enable { name }, "b1"),
        ]),
        Op::Write(60 * MIB, 4096, 6),
        Op::Flush,
    ]
}

/// Guest data inside the qcow2 file: cluster allocation with copy-on-write, L2 tables,
/// refcounts and discards interleave with the bitmap's writes.
fn internal_data_scenario() -> Vec<Op> {
    vec![
        Op::Tx(vec![add("b0", 4096)]),
        Op::Write(MIB, 512, 1),
        Op::Write(MIB + 4096, 8192, 2),
        Op::Flush,
        Op::Write(MIB, 4096, 3),
        Op::Discard(MIB, 4096),
        Op::Write(2 * MIB, 4096, 4),
        Op::Tx(vec![add("b1", 65536), disable("b0")]),
        Op::Write(8 * MIB, 65536 + 512, 5),
        Op::Flush,
    ]
}

/// Make the scenario's image in `dir`.
fn make_image(dir: &Path, raw_data: bool) {
    if raw_data {
        // A small disk: data_file_raw preallocates every L2 table.
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4096,data_file=disk.raw,data_file_raw=on",
                DISK,
                "64M",
            ],
        );
    } else {
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4096",
                DISK,
                "64M",
            ],
        );
    }
}

fn copy_image(from: &Path, to: &Path) {
    for name in [DISK, "disk.raw"] {
        if from.join(name).exists() {
            let status = std::process::Command::new("cp")
                .args(["--sparse=always"])
                .arg(from.join(name))
                .arg(to.join(name))
                .status()
                .expect("cp");
            assert!(status.success());
        }
    }
}

/// Run `ops` until the end or until power is lost; then close as a clean shutdown would.
fn run(mut h: Harness, ops: &[Op], fault: &FaultInjector) -> (Model, Option<Model>) {
    for op in ops {
        if fault.is_dead() {
            break;
        }
        match op {
            Op::Write(offset, len, byte) => {
                h.write(*offset, *len, *byte);
            }
            Op::Discard(offset, len) => {
                h.discard(*offset, *len);
            }
            Op::Flush => {
                h.flush();
            }
            Op::Tx(actions) => {
                h.transaction(actions);
            }
        }
    }
    let (model, before) = (h.model.clone(), h.before.clone());
    h.close();
    (model, before)
}

/// What a cut must leave: an image QEMU finds sound, with bitmaps matching the model (or the
/// state before an operation that was cut short), that serves again. Returns whether it
/// leaked clusters (and was repaired).
fn verify(dir: &Path, what: &str, model: &Model, before: Option<&Model>) -> bool {
    let (code, out) = try_run_in(dir, "qemu-img", &["check", DISK]);
    assert!(
        code == 0 || code == 3,
        "{what}: qemu-img check exit {code}:\n{out}"
    );
    let info = info_json(dir, DISK);
    let bitmaps = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for b in &bitmaps {
        let flags = b["flags"].to_string();
        assert!(!flags.contains("in-use"), "{what}: QEMU sees {b} in use");
    }
    let stored = crash::stored_bitmaps(&dir.join(DISK));
    let now = crash::matches(&stored, model);
    let then = before.map(|b| crash::matches(&stored, b));
    if let (Err(e), false) = (&now, matches!(then, Some(Ok(())))) {
        panic!("{what}: {e} (before the cut operation: {then:?})");
    }
    // The next boot: the image serves again, and records a new write.
    let mut h =
        crash::open(&dir.join(DISK), None).unwrap_or_else(|e| panic!("{what}: reopening: {e}"));
    assert!(h.write(63 * MIB, 512, 9), "{what}: writing after the cut");
    assert!(h.close(), "{what}: closing after the cut");
    for (name, (recording, _, set)) in crash::stored_bitmaps(&dir.join(DISK)) {
        let granularity = stored_granularity(&bitmaps, &name);
        assert_eq!(
            set.contains(&(63 * MIB / granularity)),
            recording,
            "{what}: {name} after a write on the next boot"
        );
    }
    let (code, out) = try_run_in(dir, "qemu-img", &["check", DISK]);
    assert!(
        code == 0 || code == 3,
        "{what}: qemu-img check after reuse, exit {code}:\n{out}"
    );
    // Leaks are all a cut may leave, and vubd's repair removes them.
    if code == 3 {
        let image = dir.join(DISK);
        let (code, _, err) = common::cli::run_vubd(&["check", "--repair", image.to_str().unwrap()]);
        assert_eq!(code, 0, "{what}: vubd check --repair: {err}");
        assert_check_clean(dir, DISK);
    }
    code == 3
}

fn stored_granularity(bitmaps: &[serde_json::Value], name: &str) -> u64 {
    bitmaps
        .iter()
        .find(|b| b["name"] == name)
        .and_then(|b| b["granularity"].as_u64())
        .unwrap_or_else(|| panic!("QEMU does not list bitmap {name}"))
}

/// Run `ops` on a copy of `template` under `rule`, then verify; returns whether it leaked.
fn cut(template: &Path, ops: &[Op], rule: Rule) -> bool {
    let dir = TempDir::new("cut");
    copy_image(template, dir.path());
    let what = format!("{rule:?}");
    let fault = FaultInjector::new(rule);
    let h = crash::open(&dir.join(DISK), Some(fault.clone()))
        .unwrap_or_else(|e| panic!("{what}: opening: {e}"));
    let (model, before) = run(h, ops, &fault);
    assert!(fault.fired(), "{what}: the cut point was never reached");
    verify(dir.path(), &what, &model, before.as_ref())
}

/// The template image of a scenario, and what its run without a fault counted (after checking
/// its result).
fn prepare(raw_data: bool, ops: &[Op]) -> (TempDir, Counts) {
    let template = TempDir::new("template");
    make_image(template.path(), raw_data);
    let dir = TempDir::new("count");
    copy_image(template.path(), dir.path());
    let fault = FaultInjector::counting();
    let h = crash::open(&dir.join(DISK), Some(fault.clone())).expect("open");
    let (model, _) = run(h, ops, &fault);
    assert!(!verify(dir.path(), "without a fault", &model, None));
    (template, fault.counts())
}

/// Run and verify a cut for each rule, on two threads; returns how many left leaks.
fn cut_all(template: &Path, ops: &[Op], rules: Vec<Rule>) -> usize {
    let rules = std::sync::Mutex::new(rules.into_iter());
    let leaked = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let Some(rule) = rules.lock().unwrap().next() else {
                    break;
                };
                if cut(template, ops, rule) {
                    leaked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    leaked.into_inner()
}

/// Power lost keeping none, all, or either half of the unsynced writes; or the step failing.
fn outcomes(trigger: Trigger, keeps: &[Keep]) -> impl Iterator<Item = Rule> + '_ {
    keeps
        .iter()
        .map(|keep| Fault::PowerLoss(keep.clone()))
        .chain([Fault::Fail])
        .map(move |action| Rule {
            trigger: trigger.clone(),
            action,
        })
}

fn halves() -> [Keep; 2] {
    [
        Keep::Only((0..64).step_by(2).collect()),
        Keep::Only((1..64).step_by(2).collect()),
    ]
}

/// Every write and every sync of a scenario as a cut point.
fn every_cut(raw_data: bool, ops: Vec<Op>) {
    let (template, counted) = prepare(raw_data, &ops);
    assert!(counted.writes > 20 && counted.syncs > 5, "{counted:?}");
    let [evens, odds] = halves();
    let on_write = [Keep::None, Keep::All, evens, odds.clone()];
    let on_sync = [Keep::None, odds];
    let mut rules: Vec<Rule> = Vec::new();
    for n in 1..=counted.writes {
        rules.extend(outcomes(Trigger::Write(n), &on_write));
    }
    for n in 1..=counted.syncs {
        rules.extend(outcomes(Trigger::Sync(n), &on_sync));
    }
    let cuts = rules.len();
    let leaked = cut_all(template.path(), &ops, rules);
    eprintln!(
        "{cuts} cuts ({} writes, {} syncs); {leaked} left leaks, repaired",
        counted.writes, counted.syncs
    );
}

/// Every named metadata step of a scenario (its first and last occurrence) as a cut point;
/// `expected` must all occur.
fn every_named_step(raw_data: bool, ops: Vec<Op>, expected: &[&str]) {
    let (template, counted) = prepare(raw_data, &ops);
    for name in expected {
        assert!(
            counted.events.iter().any(|(e, _)| e == name),
            "step {name} never happened: {:?}",
            counted.events
        );
    }
    let [evens, odds] = halves();
    let keeps = [Keep::None, Keep::All, evens, odds];
    let mut rules: Vec<Rule> = Vec::new();
    for (name, count) in &counted.events {
        let mut at = vec![1, *count];
        at.dedup();
        for n in at {
            rules.extend(outcomes(Trigger::Event(name, n), &keeps));
        }
    }
    let cuts = rules.len();
    let leaked = cut_all(template.path(), &ops, rules);
    eprintln!(
        "{cuts} cuts at named steps {:?}; {leaked} left leaks, repaired",
        counted.events
    );
}

#[test]
fn bitmaps_over_a_raw_data_file_survive_a_power_loss_at_every_write() {
    every_cut(true, raw_data_scenario());
}

#[test]
fn bitmaps_and_qcow2_metadata_survive_a_power_loss_at_every_write() {
    every_cut(false, internal_data_scenario());
}

/// The named steps: in the middle of a group commit, of a checkpoint transaction (each step of
/// the directory switch), of cluster allocation, copy-on-write and L2 and refcount updates.
#[test]
fn power_loss_at_every_named_metadata_step() {
    every_named_step(
        true,
        raw_data_scenario(),
        &[
            "bitmap_commit",
            "bitmap_data",
            "bitmap_table",
            "bitmap_directory",
            "bitmap_switch",
            "bitmap_free",
        ],
    );
    every_named_step(
        false,
        internal_data_scenario(),
        &[
            "bitmap_commit",
            "bitmap_switch",
            "cluster_alloc",
            "cluster_free",
            "cow_write",
            "l2_update",
            "refblock_update",
        ],
    );
}

/// The marks a first touch commits are in place before the write returns, in the data
/// clusters QEMU reads: checked with qemu-nbd, not vubd's own loader.
#[test]
fn qemu_reads_the_marks_of_a_run_cut_before_shutdown() {
    let dir = TempDir::new("qemu-reads");
    make_image(dir.path(), true);
    let fault = FaultInjector::counting();
    let mut h = crash::open(&dir.join(DISK), Some(fault)).expect("open");
    assert!(h.transaction(&[add("b0", 512)]));
    let writes = [(16 * MIB - 4096, 8192), (0, 512), (33 * MIB + 7, 1)];
    for (i, (offset, len)) in writes.iter().enumerate() {
        assert!(h.write(*offset, *len, i as u8 + 1));
    }
    // Killed: no close, no flush. What the disk holds is what the group commits wrote.
    std::mem::forget(h);
    let expected: BTreeSet<u64> = writes
        .iter()
        .flat_map(|(offset, len)| offset / 512..=(offset + len - 1) / 512)
        .collect();
    let got = common::bitmaps::nbd_dirty_granules(dir.path(), DISK, "b0", 512);
    assert_eq!(got, expected);
}
