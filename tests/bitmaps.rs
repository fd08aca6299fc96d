//! Persistent dirty bitmaps recorded in the write path and stored in the qcow2 image: what
//! vubd records, what it loads from images QEMU left behind, and the offline `vubd bitmap`
//! commands, each read back independently with qemu-nbd + nbdinfo. Management over QMP is in
//! `bitmaps_qmp.rs`.

mod common;

use common::bitmaps::{
    dumped_granules, granules, nbd_dirty_granules, qsd_export, run_ops, serve_meta, vubd_bitmap,
    workload,
};
use common::blkio_client::BlkioClient;
use common::cli::run_vubd;
use common::qemu::{assert_check_clean, qemu_img, try_run_in};
use common::qmp::Qmp;
use common::qsd::Daemon;
use common::{pattern, raw_with_metadata, TempDir};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

#[test]
fn bitmaps_hold_exactly_the_granules_written() {
    let dir = TempDir::new("bm-exact");
    raw_with_metadata(&dir, 64 << 20, 1);
    vubd_bitmap(&dir, &["add", "coarse"]);
    vubd_bitmap(&dir, &["add", "fine", "--granularity", "4K"]);
    vubd_bitmap(&dir, &["add", "off", "--disabled"]);
    let ops = workload(300, 64 * MIB, 5);
    let mut vubd = serve_meta(&dir, &["--num-queues", "2"]);
    let mut client = BlkioClient::connect(&vubd.socket, 2).unwrap();
    run_ops(&mut client, &ops);
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
    assert_eq!(dumped_granules(&dir, "fine", 4096), granules(&ops, 4096));
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
    let mut vubd = serve_meta(&dir, &["--control", control.to_str().unwrap()]);
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
    let mut vubd = serve_meta(&dir, &[]);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    run_ops(&mut client, &ops);
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
    let mut vubd = serve_meta(&dir, &[]);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    run_ops(&mut client, &ops);
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
