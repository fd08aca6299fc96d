//! Persistent dirty bitmaps: recorded in the write path, managed over QMP and offline, stored
//! in the qcow2 image, and read back independently with qemu-nbd + nbdinfo.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::blkio_client::BlkioClient;
use common::cli::{run_vubd, vubd_ok};
use common::qemu::{assert_check_clean, qemu_img, try_run_in};
use common::qmp::Qmp;
use common::qsd::{Daemon, Export};
use common::{pattern, raw_with_metadata, TempDir, Vubd};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// One guest operation of a workload.
#[derive(Clone, Copy, Debug)]
enum Op {
    Write,
    Zeroes,
    Discard,
}

/// A deterministic workload of `n` operations within `size` bytes.
fn workload(n: usize, size: u64, seed: u64) -> Vec<(Op, u64, u64)> {
    let mut rng = pattern(n * 16, seed).into_iter();
    let mut next = |m: u64| (0..4).fold(0u64, |a, _| (a << 8) | u64::from(rng.next().unwrap())) % m;
    (0..n)
        .map(|_| {
            let len = (1 + next(256)) * 512;
            let offset = next((size - len) / 512) * 512;
            let op = match next(8) {
                0 => Op::Zeroes,
                1 => Op::Discard,
                _ => Op::Write,
            };
            (op, offset, len)
        })
        .collect()
}

fn run(client: &mut BlkioClient, ops: &[(Op, u64, u64)]) {
    for (i, &(op, offset, len)) in ops.iter().enumerate() {
        match op {
            Op::Write => client
                .write(0, offset, &pattern(len as usize, i as u64))
                .unwrap(),
            Op::Zeroes => client.write_zeroes(0, offset, len, i % 2 == 0).unwrap(),
            Op::Discard => client.discard(0, offset, len).unwrap(),
        }
    }
}

/// Granules touched by `ops`.
fn granules(ops: &[(Op, u64, u64)], granularity: u64) -> BTreeSet<u64> {
    ops.iter()
        .flat_map(|&(_, offset, len)| offset / granularity..=(offset + len - 1) / granularity)
        .collect()
}

/// The dirty granules of bitmap `name`, read by QEMU's NBD server and libnbd's nbdinfo.
fn nbd_dirty_granules(dir: &Path, image: &str, name: &str, granularity: u64) -> BTreeSet<u64> {
    let sock = dir.join(format!("nbd-{name}.sock"));
    let _ = fs::remove_file(&sock);
    let mut server = Command::new("qemu-nbd")
        .current_dir(dir)
        .args(["-r", "-t", "-f", "qcow2", "-B", name, "-k"])
        .arg(&sock)
        .arg(image)
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-nbd");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        if let Ok(Some(status)) = server.try_wait() {
            let mut err = String::new();
            use std::io::Read;
            server
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("qemu-nbd exited ({status}): {err}");
        }
        assert!(Instant::now() < deadline, "qemu-nbd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let map = format!("--map=qemu:dirty-bitmap:{name}");
    let out = Command::new("nbdinfo")
        .args(["--json", &map, &uri])
        .output()
        .expect("nbdinfo");
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        out.status.success(),
        "nbdinfo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let extents: Value = serde_json::from_slice(&out.stdout).expect("nbdinfo JSON");
    let mut dirty = BTreeSet::new();
    for e in extents.as_array().unwrap() {
        if e["type"].as_u64().unwrap() & 1 == 1 {
            let (offset, length) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            assert_eq!(
                offset % granularity,
                0,
                "extents start on granule boundaries"
            );
            dirty.extend(offset / granularity..(offset + length).div_ceil(granularity));
        }
    }
    dirty
}

/// `vubd bitmap meta.qcow2 ARGS...` in `dir`, expecting success; returns stdout.
fn vubd_bitmap(dir: &TempDir, args: &[&str]) -> String {
    let image = dir.join("meta.qcow2");
    let mut full = vec!["bitmap", image.to_str().unwrap()];
    full.extend_from_slice(args);
    vubd_ok(&full)
}

fn serve(dir: &TempDir, extra: &[&str]) -> Vubd {
    let image = dir.join("meta.qcow2");
    let mut args = vec!["--image", image.to_str().unwrap(), "--format", "qcow2"];
    args.extend_from_slice(extra);
    Vubd::start(&dir.join("vubd.sock"), &args)
}

#[test]
fn bitmaps_hold_exactly_the_granules_written() {
    let dir = TempDir::new("bm-exact");
    raw_with_metadata(&dir, 64 << 20, 1);
    vubd_bitmap(&dir, &["add", "coarse"]);
    vubd_bitmap(&dir, &["add", "fine", "--granularity", "4K"]);
    vubd_bitmap(&dir, &["add", "off", "--disabled"]);
    let ops = workload(300, 64 * MIB, 5);
    let mut vubd = serve(&dir, &["--num-queues", "2"]);
    let mut client = BlkioClient::connect(&vubd.socket, 2).unwrap();
    run(&mut client, &ops);
    drop(client);
    vubd.stop();
    assert_check_clean(dir.path(), "meta.qcow2");
    assert_eq!(
        nbd_dirty_granules(dir.path(), "meta.qcow2", "coarse", 65536),
        granules(&ops, 65536)
    );
    assert_eq!(
        nbd_dirty_granules(dir.path(), "meta.qcow2", "fine", 4096),
        granules(&ops, 4096)
    );
    assert!(nbd_dirty_granules(dir.path(), "meta.qcow2", "off", 65536).is_empty());
    // vubd's own dump agrees.
    let dump = vubd_bitmap(&dir, &["dump", "fine", "--json"]);
    let dump: Value = serde_json::from_str(&dump).unwrap();
    let mut from_dump = BTreeSet::new();
    for e in dump["extents"].as_array().unwrap() {
        let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        from_dump.extend(o / 4096..(o + l).div_ceil(4096));
    }
    assert_eq!(from_dump, granules(&ops, 4096));
}

#[test]
fn a_bitmap_added_at_runtime_records_only_later_writes() {
    let dir = TempDir::new("bm-runtime");
    raw_with_metadata(&dir, 32 << 20, 1);
    let control = dir.join("qmp.sock");
    let mut vubd = serve(&dir, &["--control", control.to_str().unwrap()]);
    let mut qmp = Qmp::connect(&control);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    let before = workload(40, 32 * MIB, 6);
    run(&mut client, &before);
    qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b1", "persistent": true}),
    );
    qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "mem", "granularity": 65536}),
    );
    let after = workload(40, 32 * MIB, 7);
    run(&mut client, &after);
    let bitmaps = qmp.bitmaps("disk");
    let b1 = bitmaps.iter().find(|b| b["name"] == "b1").unwrap();
    assert_eq!(
        b1["count"].as_u64().unwrap(),
        granules(&after, 65536).len() as u64 * 65536
    );
    assert_eq!(b1["recording"], true);
    assert_eq!(b1["persistent"], true);
    assert_eq!(b1["granularity"], 65536);
    assert_eq!(b1["inconsistent"], false);
    drop(client);
    vubd.stop();
    assert_check_clean(dir.path(), "meta.qcow2");
    assert_eq!(
        nbd_dirty_granules(dir.path(), "meta.qcow2", "b1", 65536),
        granules(&after, 65536)
    );
    // The non-persistent bitmap is gone after a restart; the persistent one is not.
    let list = vubd_bitmap(&dir, &["list", "--json"]);
    let list: Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["b1"]);
}

/// The qemu-storage-daemon command line for the test image, which vubd also runs unchanged.
fn qsd_export(dir: &TempDir) -> Export {
    Export::new(
        &dir.join("meta.qcow2"),
        Some(&dir.join("disk.raw")),
        &dir.join("qsd.sock"),
    )
    .monitor(&dir.join("qsd-qmp.sock"))
    .discard_unmap()
}

/// Run the same management sequence against a server; returns the query results after each
/// step and the final bitmaps.
fn management_sequence(qmp: &mut Qmp, socket: &Path) -> Vec<Value> {
    let mut snapshots = Vec::new();
    let snap = |qmp: &mut Qmp| {
        let mut b = qmp.bitmaps("fmt");
        for x in b.iter_mut() {
            // Only what both report the same way.
            let obj = x.as_object_mut().unwrap();
            obj.retain(|k, _| {
                matches!(
                    k.as_str(),
                    "name" | "count" | "granularity" | "recording" | "persistent"
                )
            });
        }
        b.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        Value::Array(b)
    };
    let mut client = BlkioClient::connect(socket, 1).unwrap();
    qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": "fmt", "name": "a", "persistent": true}),
    );
    qmp.ok("block-dirty-bitmap-add", json!({"node": "fmt", "name": "b", "granularity": 16384, "persistent": true, "disabled": true}));
    run(&mut client, &workload(30, 16 * MIB, 8));
    snapshots.push(snap(qmp));
    qmp.ok(
        "block-dirty-bitmap-enable",
        json!({"node": "fmt", "name": "b"}),
    );
    qmp.ok(
        "block-dirty-bitmap-disable",
        json!({"node": "fmt", "name": "a"}),
    );
    run(&mut client, &workload(30, 16 * MIB, 9));
    snapshots.push(snap(qmp));
    qmp.ok(
        "block-dirty-bitmap-merge",
        json!({"node": "fmt", "target": "b", "bitmaps": ["a"]}),
    );
    snapshots.push(snap(qmp));
    qmp.ok(
        "block-dirty-bitmap-clear",
        json!({"node": "fmt", "name": "a"}),
    );
    snapshots.push(snap(qmp));
    // The checkpoint pattern: a new bitmap and the old one disabled, atomically.
    qmp.ok(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "fmt", "name": "c", "persistent": true}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "fmt", "name": "b"}},
        ]}),
    );
    run(&mut client, &workload(20, 16 * MIB, 10));
    snapshots.push(snap(qmp));
    // A transaction with a failing action changes nothing.
    let r = qmp.execute(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "fmt", "name": "d"}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": "fmt", "name": "nope"}},
        ]}),
    );
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    snapshots.push(snap(qmp));
    qmp.ok(
        "block-dirty-bitmap-remove",
        json!({"node": "fmt", "name": "a"}),
    );
    snapshots.push(snap(qmp));
    drop(client);
    snapshots
}

#[test]
fn management_behaves_like_qemu_storage_daemon() {
    // The same image, the same workload, the same QMP commands: once on qemu-storage-daemon,
    // once on vubd started with the very same command line.
    let qsd_dir = TempDir::new("bm-qsd");
    raw_with_metadata(&qsd_dir, 16 << 20, 1);
    let qsd = Daemon::qsd(qsd_dir.path(), &qsd_export(&qsd_dir));
    let mut qmp = qsd.qmp();
    let expected = management_sequence(&mut qmp, qsd.socket());
    drop(qmp);
    let (status, stderr) = qsd.stop();
    assert!(
        status.success() || status.code().is_none(),
        "{status}: {stderr}"
    );

    let dir = TempDir::new("bm-vubd");
    raw_with_metadata(&dir, 16 << 20, 1);
    let vubd = Daemon::vubd(dir.path(), &qsd_export(&dir));
    let mut qmp = vubd.qmp();
    let got = management_sequence(&mut qmp, vubd.socket());
    drop(qmp);
    let (status, stderr) = vubd.stop();
    assert!(
        status.success() || status.code().is_none(),
        "{status}: {stderr}"
    );
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g, e, "step {i}: vubd vs qemu-storage-daemon");
    }
    assert_check_clean(dir.path(), "meta.qcow2");
    // The stored bitmaps read the same through qemu-nbd.
    for (name, g) in [("b", 16384), ("c", 65536)] {
        assert_eq!(
            nbd_dirty_granules(dir.path(), "meta.qcow2", name, g),
            nbd_dirty_granules(qsd_dir.path(), "meta.qcow2", name, g),
            "bitmap {name}"
        );
    }
}

#[test]
fn a_bitmap_left_in_use_by_a_killed_qemu_is_inconsistent() {
    let dir = TempDir::new("bm-killed");
    raw_with_metadata(&dir, 16 << 20, 1);
    qemu_img(dir.path(), &["bitmap", "--add", "meta.qcow2", "b0"]);
    let qsd = Daemon::qsd(dir.path(), &qsd_export(&dir));
    drop(qsd.qmp());
    qsd.kill();
    let list = vubd_bitmap(&dir, &["list", "--json"]);
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list[0]["name"], "b0");
    assert_eq!(list[0]["inconsistent"], true, "{list}");

    let control = dir.join("qmp.sock");
    let mut vubd = serve(&dir, &["--control", control.to_str().unwrap()]);
    let mut qmp = Qmp::connect(&control);
    let b = &qmp.bitmaps("disk")[0];
    assert_eq!(b["inconsistent"], true);
    assert_eq!(b["recording"], false);
    let r = qmp.execute(
        "block-dirty-bitmap-clear",
        json!({"node": "disk", "name": "b0"}),
    );
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("inconsistent"),
        "{r}"
    );
    // Writes go on; the inconsistent bitmap stays flagged and can be removed.
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    client.write(0, 0, &pattern(4096, 1)).unwrap();
    drop(client);
    drop(qmp);
    vubd.stop();
    let (code, out) = try_run_in(dir.path(), "qemu-img", &["info", "meta.qcow2"]);
    assert_eq!(code, 0);
    assert!(out.contains("in-use"), "{out}");
    assert_check_clean(dir.path(), "meta.qcow2");
    vubd_bitmap(&dir, &["remove", "b0"]);
    assert_check_clean(dir.path(), "meta.qcow2");
    assert!(vubd_bitmap(&dir, &["list"]).contains("no bitmaps"));
}

#[test]
fn bitmaps_made_by_qemu_img_are_loaded_with_their_state() {
    let dir = TempDir::new("bm-qemu-img");
    raw_with_metadata(&dir, 16 << 20, 1);
    qemu_img(
        dir.path(),
        &["bitmap", "--add", "-g", "32768", "meta.qcow2", "on"],
    );
    qemu_img(
        dir.path(),
        &["bitmap", "--add", "--disable", "meta.qcow2", "off"],
    );
    let ops = workload(50, 16 * MIB, 11);
    let mut vubd = serve(&dir, &[]);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    run(&mut client, &ops);
    drop(client);
    vubd.stop();
    assert_check_clean(dir.path(), "meta.qcow2");
    assert_eq!(
        nbd_dirty_granules(dir.path(), "meta.qcow2", "on", 32768),
        granules(&ops, 32768)
    );
    assert!(nbd_dirty_granules(dir.path(), "meta.qcow2", "off", 65536).is_empty());
    // qemu-img sees them stored cleanly, with the auto flag where it was.
    let info = qemu_img(dir.path(), &["info", "--output=json", "meta.qcow2"]);
    let info: Value = serde_json::from_str(&info).unwrap();
    let bitmaps = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .unwrap()
        .clone();
    let flags = |name: &str| bitmaps.iter().find(|b| b["name"] == name).unwrap()["flags"].clone();
    assert_eq!(flags("on"), json!(["auto"]));
    assert_eq!(flags("off"), json!([]));
}

#[test]
fn offline_bitmap_commands() {
    let dir = TempDir::new("bm-offline");
    raw_with_metadata(&dir, 16 << 20, 1);
    vubd_bitmap(&dir, &["add", "a"]);
    vubd_bitmap(&dir, &["add", "b", "--disabled"]);
    let ops = workload(20, 16 * MIB, 12);
    let mut vubd = serve(&dir, &[]);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    run(&mut client, &ops);
    drop(client);
    vubd.stop();
    vubd_bitmap(&dir, &["merge", "--from", "a", "--into", "b"]);
    assert_eq!(
        nbd_dirty_granules(dir.path(), "meta.qcow2", "b", 65536),
        granules(&ops, 65536)
    );
    vubd_bitmap(&dir, &["clear", "a"]);
    assert!(nbd_dirty_granules(dir.path(), "meta.qcow2", "a", 65536).is_empty());
    vubd_bitmap(&dir, &["disable", "a"]);
    vubd_bitmap(&dir, &["enable", "b"]);
    let info = qemu_img(dir.path(), &["info", "--output=json", "meta.qcow2"]);
    let info: Value = serde_json::from_str(&info).unwrap();
    let bitmaps = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .unwrap();
    assert_eq!(
        bitmaps.iter().find(|b| b["name"] == "a").unwrap()["flags"],
        json!([])
    );
    assert_eq!(
        bitmaps.iter().find(|b| b["name"] == "b").unwrap()["flags"],
        json!(["auto"])
    );
    let dump = vubd_bitmap(&dir, &["dump", "b"]);
    let total: u64 = dump
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, granules(&ops, 65536).len() as u64 * 65536);
    // qemu-img's own bitmap command works on what vubd stored.
    qemu_img(dir.path(), &["bitmap", "--disable", "meta.qcow2", "b"]);
    qemu_img(dir.path(), &["bitmap", "--add", "meta.qcow2", "c"]);
    qemu_img(dir.path(), &["bitmap", "--merge", "b", "meta.qcow2", "c"]);
    assert_eq!(
        nbd_dirty_granules(dir.path(), "meta.qcow2", "c", 65536),
        granules(&ops, 65536)
    );
    let list = vubd_bitmap(&dir, &["list", "--json"]);
    let list: Value = serde_json::from_str(&list).unwrap();
    let b = list
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "b")
        .unwrap();
    assert_eq!(
        b["recording"], false,
        "qemu-img's --disable is seen by vubd"
    );
    vubd_bitmap(&dir, &["remove", "a"]);
    vubd_bitmap(&dir, &["remove", "b"]);
    vubd_bitmap(&dir, &["remove", "c"]);
    assert_check_clean(dir.path(), "meta.qcow2");
    let (code, _, err) = run_vubd(&[
        "bitmap",
        dir.join("meta.qcow2").to_str().unwrap(),
        "remove",
        "a",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn qmp_protocol_shapes() {
    let dir = TempDir::new("bm-qmp");
    raw_with_metadata(&dir, 8 << 20, 1);
    let control = dir.join("qmp.sock");
    let mut vubd = serve(
        &dir,
        &["--control", control.to_str().unwrap(), "--node-name", "vda"],
    );
    let mut qmp = Qmp::connect_raw(&control);
    assert!(
        qmp.greeting["QMP"]["version"]["qemu"].is_object(),
        "{}",
        qmp.greeting
    );
    assert!(qmp.greeting["QMP"]["capabilities"].is_array());
    let r = qmp.execute("query-version", json!({}));
    assert_eq!(
        r["error"]["class"], "CommandNotFound",
        "negotiation first: {r}"
    );
    assert_eq!(
        qmp.execute("qmp_capabilities", json!({})),
        json!({"return": {}})
    );
    let r = qmp.send(&json!({"execute": "query-version", "id": 42}));
    assert_eq!(r["id"], 42);
    assert!(r["return"]["package"].as_str().unwrap().starts_with("vubd"));
    let r = qmp.execute("no-such-command", json!({}));
    assert_eq!(r["error"]["class"], "CommandNotFound");
    let r = qmp.execute(
        "block-dirty-bitmap-add",
        json!({"node": "nope", "name": "x"}),
    );
    assert_eq!(r["error"]["class"], "GenericError");
    let r = qmp.execute("block-dirty-bitmap-add", json!({"node": "vda"}));
    assert!(
        r["error"]["desc"].as_str().unwrap().contains("'name'"),
        "{r}"
    );
    let r = qmp.execute(
        "block-dirty-bitmap-add",
        json!({"node": "vda", "name": "x", "granularity": 1000}),
    );
    assert!(
        r["error"]["desc"].as_str().unwrap().contains("Granularity"),
        "{r}"
    );
    qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": "vda", "name": "x", "granularity": 4096}),
    );
    let nodes = qmp.ok("query-named-block-nodes", json!({}));
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["vda", "vda-file", "vda-data-file"]);
    assert_eq!(nodes[0]["drv"], "qcow2");
    assert_eq!(nodes[0]["ro"], false);
    assert_eq!(nodes[0]["dirty-bitmaps"][0]["name"], "x");
    let block = qmp.ok("query-block", json!({}));
    assert_eq!(
        block[0]["inserted"]["dirty-bitmaps"][0]["granularity"],
        4096
    );
    drop(qmp);
    vubd.stop();
}

#[test]
fn checkpoints_under_load_lose_no_write() {
    checkpoints_under_load(&[]);
}

#[test]
fn checkpoints_under_load_lose_no_write_with_busy_polling() {
    // A polling queue must still let the write gate close and drain.
    checkpoints_under_load(&["--poll-us", "500"]);
}

fn checkpoints_under_load(extra: &[&str]) {
    use blkio::ReqFlags;
    use std::mem::MaybeUninit;

    let dir = TempDir::new("bm-stress");
    raw_with_metadata(&dir, 64 << 20, 1);
    vubd_bitmap(&dir, &["add", "cp0"]);
    let control = dir.join("qmp.sock");
    let mut args = vec!["--control", control.to_str().unwrap(), "--num-queues", "2"];
    args.extend_from_slice(extra);
    let mut vubd = serve(&dir, &args);
    let mut client = BlkioClient::connect(&vubd.socket, 2).unwrap();
    let base = client.buf(0).as_mut_ptr() as usize;
    let per_queue = BlkioClient::BUF;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let written: Vec<Vec<(u64, u64)>> = std::thread::scope(|s| {
        let writers: Vec<_> = client
            .queues
            .iter_mut()
            .enumerate()
            .map(|(t, q)| {
                let stop = &stop;
                s.spawn(move || {
                    let ops = workload(100_000, 64 * MIB, 20 + t as u64);
                    let mut done = Vec::new();
                    let mut completions: Vec<MaybeUninit<blkio::Completion>> =
                        (0..8).map(|_| MaybeUninit::uninit()).collect();
                    for batch in ops.chunks(8) {
                        if stop.load(std::sync::atomic::Ordering::Relaxed) {
                            break;
                        }
                        for (i, &(_, offset, len)) in batch.iter().enumerate() {
                            let ptr = (base + t * per_queue + i * 131072) as *mut u8;
                            q.write(offset, ptr, len as usize, i, ReqFlags::empty());
                        }
                        let mut got = 0;
                        while got < batch.len() {
                            let n = q
                                .do_io(
                                    &mut completions[got..batch.len()],
                                    batch.len() - got,
                                    None,
                                    None,
                                )
                                .unwrap();
                            got += n;
                        }
                        done.extend(batch.iter().map(|&(_, o, l)| (o, l)));
                    }
                    done
                })
            })
            .collect();
        let mut qmp = Qmp::connect(&control);
        for i in 1..=20 {
            std::thread::sleep(Duration::from_millis(20));
            qmp.ok(
                "transaction",
                json!({"actions": [
                    {"type": "block-dirty-bitmap-add", "data": {"node": "disk", "name": format!("cp{i}"), "persistent": true}},
                    {"type": "block-dirty-bitmap-disable", "data": {"node": "disk", "name": format!("cp{}", i - 1)}},
                ]}),
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    drop(client);
    vubd.stop();
    assert_check_clean(dir.path(), "meta.qcow2");
    let all: Vec<(Op, u64, u64)> = written
        .iter()
        .flatten()
        .map(|&(o, l)| (Op::Write, o, l))
        .collect();
    assert!(all.len() > 1000, "the writers made progress: {}", all.len());
    let mut union = BTreeSet::new();
    for i in 0..=20 {
        let dump = vubd_bitmap(&dir, &["dump", &format!("cp{i}"), "--json"]);
        let dump: Value = serde_json::from_str(&dump).unwrap();
        for e in dump["extents"].as_array().unwrap() {
            let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            union.extend(o / 65536..(o + l).div_ceil(65536));
        }
    }
    assert_eq!(
        union,
        granules(&all, 65536),
        "every write is in some checkpoint's bitmap"
    );
}
