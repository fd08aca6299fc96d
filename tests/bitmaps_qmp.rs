//! Persistent dirty bitmaps managed over QMP while the disk is in use: the protocol's shapes,
//! bitmaps added at runtime, the same management sequence as qemu-storage-daemon, and
//! checkpoints taken under load.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::bitmaps::{
    dumped_granules, granules, nbd_dirty_granules, qsd_export, run_ops, serve_meta, vubd_bitmap,
    workload, Op,
};
use common::blkio_client::BlkioClient;
use common::qemu::assert_check_clean;
use common::qmp::Qmp;
use common::qsd::Daemon;
use common::{raw_with_metadata, TempDir};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

#[test]
fn a_bitmap_added_at_runtime_records_only_later_writes() {
    let dir = TempDir::new("bm-runtime");
    raw_with_metadata(&dir, 32 << 20, 1);
    let control = dir.join("qmp.sock");
    let mut vubd = serve_meta(&dir, &["--control", control.to_str().unwrap()]);
    let mut qmp = Qmp::connect(&control);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    let before = workload(40, 32 * MIB, 6);
    run_ops(&mut client, &before);
    qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "b1", "persistent": true}),
    );
    qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "mem", "granularity": 65536}),
    );
    let after = workload(40, 32 * MIB, 7);
    run_ops(&mut client, &after);
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
    run_ops(&mut client, &workload(30, 16 * MIB, 8));
    snapshots.push(snap(qmp));
    qmp.ok(
        "block-dirty-bitmap-enable",
        json!({"node": "fmt", "name": "b"}),
    );
    qmp.ok(
        "block-dirty-bitmap-disable",
        json!({"node": "fmt", "name": "a"}),
    );
    run_ops(&mut client, &workload(30, 16 * MIB, 9));
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
    run_ops(&mut client, &workload(20, 16 * MIB, 10));
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
fn qmp_protocol_shapes() {
    let dir = TempDir::new("bm-qmp");
    raw_with_metadata(&dir, 8 << 20, 1);
    let control = dir.join("qmp.sock");
    let mut vubd = serve_meta(
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
    let mut vubd = serve_meta(&dir, &args);
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
        union.extend(dumped_granules(&dir, &format!("cp{i}"), 65536));
    }
    assert_eq!(
        union,
        granules(&all, 65536),
        "every write is in some checkpoint's bitmap"
    );
}
