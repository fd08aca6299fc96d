//! Growing a disk: offline (`vubd resize`) and online (QMP `block_resize`, the same script as
//! qemu-storage-daemon's), its bitmaps grown with it and read back by QEMU; the frontends that
//! asked for it told (`VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`); refusals that leave the disk
//! serving; and a power loss or an I/O error at every step of the switch.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::bitmaps::{nbd_dirty_granules, qsd_export, serve_meta, vubd_bitmap};
use common::blkio_client::BlkioClient;
use common::cli::{one_line_error, run_vubd, vubd_ok};
use common::crash::{self, Harness};
use common::qemu::{assert_check_clean, info_json, qemu_img, qemu_io, try_run_in};
use common::qmp::Qmp;
use common::qsd::Daemon;
use common::raw_frontend::RawFrontend;
use common::{create_image, pattern, raw_with_metadata, TempDir, Vubd};
use serde_json::{json, Value};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures as Proto};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use vubd::bitmap::Action;
use vubd::block::fault::{Action as Fault, FaultInjector, Keep, Rule, Trigger};

const MIB: u64 = 1 << 20;
const OLD: u64 = 64 * MIB;
/// Past 512 MiB: with 64 KiB clusters, a second L1 entry, so a new L1 table.
const NEW: u64 = OLD + 600 * MIB;
const G: u64 = 65536;
const DEADLINE: Duration = Duration::from_secs(20);

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn file_len(p: &Path) -> u64 {
    fs::metadata(p).unwrap().len()
}

/// The dirty granules of bitmap `name` in `dir`'s meta.qcow2, read by qemu-nbd and nbdinfo.
fn dirty(dir: &TempDir, name: &str, granularity: u64) -> BTreeSet<u64> {
    nbd_dirty_granules(dir.path(), "meta.qcow2", name, granularity)
}

/// Node `node`'s virtual size, from query-named-block-nodes.
fn virtual_size(qmp: &mut Qmp, node: &str) -> u64 {
    let nodes = qmp.ok("query-named-block-nodes", json!({}));
    let list = nodes.as_array().unwrap();
    let info = list.iter().find(|n| n["node-name"] == node);
    let info = info.unwrap_or_else(|| panic!("no {node} in {nodes}"));
    info["image"]["virtual-size"].as_u64().unwrap()
}

/// What both servers report alike of a node's bitmaps.
fn bitmap_view(qmp: &mut Qmp, node: &str) -> Vec<Value> {
    let keys = ["name", "count", "granularity", "recording", "persistent"];
    let view =
        |b: &Value| Value::Object(keys.iter().map(|k| (k.to_string(), b[k].clone())).collect());
    let mut list: Vec<Value> = qmp.bitmaps(node).iter().map(view).collect();
    list.sort_by_key(|b| b["name"].to_string());
    list
}

/// A persistent bitmap of 64 KiB granules on `node`.
fn add_bitmap(qmp: &mut Qmp, node: &str, name: &str, disabled: bool) {
    let args = json!({"node": node, "name": name, "persistent": true, "disabled": disabled});
    qmp.ok("block-dirty-bitmap-add", args);
}

/// The mission graph (qcow2 metadata over a raw data file of `OLD` bytes) served with a
/// control socket.
fn serve_with_control(dir: &TempDir, seed: u64) -> (Vubd, Qmp) {
    raw_with_metadata(dir, OLD as usize, seed);
    let control = dir.join("qmp.sock");
    let vubd = serve_meta(dir, &["--control", path(&control)]);
    (vubd, Qmp::connect(&control))
}

#[test]
fn vubd_resize_grows_a_qcow2_image_its_data_file_and_bitmaps_for_qemu_and_vubd() {
    let dir = TempDir::new("resize-offline");
    let meta = dir.join("meta.qcow2");
    raw_with_metadata(&dir, OLD as usize, 1);
    vubd_bitmap(&dir, &["add", "b0"]);
    vubd_bitmap(&dir, &["add", "b1", "--granularity", "4096"]);
    let mut vubd = serve_meta(&dir, &[]);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    client.write(0, 4096, &pattern(4096, 2)).unwrap();
    client.write(0, OLD - 512, &pattern(512, 3)).unwrap();
    drop(client);
    vubd.stop();
    vubd_bitmap(&dir, &["disable", "b1"]);
    let b0 = dirty(&dir, "b0", G);
    let b1 = dirty(&dir, "b1", 4096);
    assert_eq!(b0, BTreeSet::from([0, OLD / G - 1]));
    assert_eq!(b1, BTreeSet::from([1, OLD / 4096 - 1]));
    assert_eq!(common::image::be32_at(&meta, 36), 1, "one L1 entry before");

    let out = vubd_ok(&["resize", "-f", "qcow2", path(&meta), "+600M"]);
    assert!(out.contains(&format!("from {OLD} to {NEW} bytes")), "{out}");
    assert_check_clean(dir.path(), "meta.qcow2");
    let info = info_json(dir.path(), "meta.qcow2");
    assert_eq!(info["virtual-size"], NEW);
    assert_eq!(common::image::be32_at(&meta, 36), 2, "the L1 table grew");
    assert_eq!(file_len(&dir.join("disk.raw")), NEW, "the data file grew");
    let bitmaps = &info["format-specific"]["data"]["bitmaps"];
    let flags = |i: usize| json!([bitmaps[i]["name"], bitmaps[i]["flags"]]);
    assert_eq!(
        [flags(0), flags(1)],
        [json!(["b0", ["auto"]]), json!(["b1", []])]
    );
    // The same dirty granules, read by QEMU at the new size: nothing past the old end.
    assert_eq!(dirty(&dir, "b0", G), b0);
    assert_eq!(dirty(&dir, "b1", 4096), b1);

    // QEMU writes the new space, and records it in the recording bitmap it loaded.
    let at = 640 * MIB;
    let io = ["write", "read"].map(|op| format!("{op} -P 0x5a {at} 64k"));
    qemu_io(dir.path(), "qcow2", "meta.qcow2", &io);
    assert_check_clean(dir.path(), "meta.qcow2");
    let mut expected = b0.clone();
    expected.insert(at / G);
    assert_eq!(dirty(&dir, "b0", G), expected);

    // vubd serves the grown disk: QEMU's data, the old data, the new space clean.
    let mut vubd = serve_meta(&dir, &[]);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    assert_eq!(client.capacity(), NEW);
    assert_eq!(client.read(0, at, 65536).unwrap(), vec![0x5a; 65536]);
    assert_eq!(client.read(0, 4096, 4096).unwrap(), pattern(4096, 2));
    assert_eq!(client.read(0, OLD - 512, 512).unwrap(), pattern(512, 3));
    assert!(client.read(0, OLD, 65536).unwrap().iter().all(|&b| b == 0));
    drop(client);
    vubd.stop();
    assert_check_clean(dir.path(), "meta.qcow2");
    assert_eq!(dirty(&dir, "b0", G), expected);
}

/// `vubd resize ARGS`, expected to fail with one line; returns it.
fn resize_fails(args: &[&str]) -> String {
    let full = [&["resize"][..], args].concat();
    let (code, out, err) = run_vubd(&full);
    assert_ne!(code, 0, "vubd {full:?} should fail: {out}");
    one_line_error(&err).to_string()
}

#[test]
fn vubd_resize_grows_a_raw_disk_and_refuses_what_it_cannot_do() {
    let dir = TempDir::new("resize-offline-raw");
    let raw = dir.join("disk.raw");
    let data = create_image(&raw, 10 << 20, 4);
    let out = vubd_ok(&["resize", path(&raw), "20M"]);
    assert!(out.contains("to 20971520 bytes"), "{out}");
    let now = fs::read(&raw).unwrap();
    assert_eq!(now.len(), 20 << 20);
    assert!(now[..10 << 20] == data[..], "the data is kept");
    assert!(now[10 << 20..].iter().all(|&b| b == 0));

    for (size, why) in [("-1M", "only grows"), ("1M", "smaller"), ("19M", "smaller")] {
        let line = resize_fails(&[path(&raw), size]);
        let ok = line.contains(why) && line.contains("disk.raw");
        assert!(ok, "{size}: {line}");
    }
    let nope = dir.join("nope.raw");
    let line = resize_fails(&[path(&nope), "30M"]);
    assert!(line.contains("nope.raw") && !nope.exists(), "{line}");
    assert_eq!(file_len(&raw), 20 << 20, "refusals change nothing");

    let create = ["create", "-q", "-f", "qcow2", "q.qcow2", "16M"];
    qemu_img(dir.path(), &create);
    let q = dir.join("q.qcow2");
    for (size, why) in [("+1000001", "512"), ("8M", "smaller"), ("-1M", "grows")] {
        let line = resize_fails(&["-f", "qcow2", path(&q), size]);
        assert!(line.contains(why), "{size}: {line}");
    }
    assert_eq!(info_json(dir.path(), "q.qcow2")["virtual-size"], 16 * MIB);
    assert_check_clean(dir.path(), "q.qcow2");
    // Found while writing these tests: vubd grows a raw disk to a size that is not a multiple
    // of 512, which `vubd serve` then refuses ("not a multiple of the logical block size").
    let line = resize_fails(&[path(&raw), "30000001"]);
    assert!(line.contains("512") && file_len(&raw) == 20 << 20, "{line}");
}

#[test]
fn block_resize_grows_a_served_disk_and_its_bitmap_for_the_next_connection() {
    let dir = TempDir::new("resize-online");
    let (mut vubd, mut qmp) = serve_with_control(&dir, 6);
    add_bitmap(&mut qmp, "disk", "b0", false);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    assert_eq!(client.capacity(), OLD);
    let tail = pattern(8192, 7);
    client.write(0, OLD - 8192, &tail).unwrap();
    assert_eq!(qmp.bitmaps("disk")[0]["count"], G);

    qmp.ok("block_resize", json!({"node-name": "disk", "size": NEW}));
    assert_eq!(virtual_size(&mut qmp, "disk"), NEW);
    let block = qmp.ok("query-block", json!({}));
    let size = &block[0]["inserted"]["image"]["virtual-size"];
    assert_eq!(size, &json!(NEW), "{block}");
    let bitmaps = qmp.bitmaps("disk");
    assert_eq!((bitmaps.len(), &bitmaps[0]["count"]), (1, &json!(G)));

    // libblkio reads the capacity when it connects.
    drop(client);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    assert_eq!(client.capacity(), NEW);
    assert_eq!(client.read(0, OLD - 8192, 8192).unwrap(), tail);
    assert!(client.read(0, OLD, 65536).unwrap().iter().all(|&b| b == 0));
    let past = pattern(4096, 8);
    client.write(0, 600 * MIB, &past).unwrap();
    assert_eq!(qmp.bitmaps("disk")[0]["count"], 2 * G, "one granule more");
    client.write(0, NEW - 512, &pattern(512, 9)).unwrap();
    assert_eq!(qmp.bitmaps("disk")[0]["count"], 3 * G);
    assert!(client.write(0, NEW, &[0; 512]).is_err(), "past the new end");
    assert_eq!(client.read(0, 600 * MIB, 4096).unwrap(), past);
    drop((client, qmp));
    vubd.stop();

    assert_check_clean(dir.path(), "meta.qcow2");
    assert_eq!(info_json(dir.path(), "meta.qcow2")["virtual-size"], NEW);
    assert_eq!(file_len(&dir.join("disk.raw")), NEW);
    let expected = BTreeSet::from([OLD / G - 1, 600 * MIB / G, NEW / G - 1]);
    assert_eq!(dirty(&dir, "b0", G), expected);
}

/// The block_resize script, on either server: what it reports before and after the resize,
/// and of a bitmap added after it.
fn resize_script(qmp: &mut Qmp) -> Vec<Value> {
    let mut seen = vec![json!([virtual_size(qmp, "fmt"), bitmap_view(qmp, "fmt")])];
    qmp.ok("block_resize", json!({"node-name": "fmt", "size": NEW}));
    let sizes = [virtual_size(qmp, "fmt"), virtual_size(qmp, "data")];
    seen.push(json!([sizes, bitmap_view(qmp, "fmt")]));
    add_bitmap(qmp, "fmt", "b1", false);
    seen.push(json!(bitmap_view(qmp, "fmt")));
    seen
}

#[test]
fn block_resize_behaves_like_qemu_storage_daemon() {
    // qemu-storage-daemon 10.0.2 dies of SIGSEGV on block_resize of a node it exports over
    // vhost-user-blk (with a frontend connected or not): it runs the same command line
    // without the export; vubd runs it whole.
    let mut results = Vec::new();
    for qsd in [true, false] {
        let dir = TempDir::new(if qsd { "resize-qsd" } else { "resize-vubd" });
        raw_with_metadata(&dir, OLD as usize, 6);
        vubd_bitmap(&dir, &["add", "b0"]);
        let write = [format!("write -P 7 {} 8k", OLD - 8192)];
        qemu_io(dir.path(), "qcow2", "meta.qcow2", &write);
        let export = qsd_export(&dir);
        let seen = if qsd {
            let mut args = export.args();
            args.truncate(args.iter().position(|a| a == "--export").unwrap());
            let mut qsd = Command::new("qemu-storage-daemon");
            qsd.current_dir(dir.path()).args(&args).stdin(Stdio::null());
            let mut child = qsd.spawn().unwrap();
            let mut qmp = Qmp::connect(&dir.join("qsd-qmp.sock"));
            let seen = resize_script(&mut qmp);
            qmp.try_execute("quit", json!({}));
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "qsd did not quit");
                std::thread::sleep(Duration::from_millis(10));
            }
            seen
        } else {
            let daemon = Daemon::vubd(dir.path(), &export);
            let client = BlkioClient::connect(daemon.socket(), 1).unwrap();
            let seen = resize_script(&mut daemon.qmp());
            drop(client);
            let client = BlkioClient::connect(daemon.socket(), 1);
            assert_eq!(client.unwrap().capacity(), NEW);
            let (status, stderr) = daemon.stop();
            assert!(status.success(), "{stderr}");
            seen
        };
        assert_check_clean(dir.path(), "meta.qcow2");
        let info = info_json(dir.path(), "meta.qcow2");
        let bitmaps = &info["format-specific"]["data"]["bitmaps"];
        let stored = json!([info["virtual-size"], bitmaps]);
        let granules = dirty(&dir, "b0", G);
        results.push((seen, stored, file_len(&dir.join("disk.raw")), granules));
    }
    assert_eq!(results[0].0[1][0][0], NEW, "qemu-storage-daemon grew it");
    assert_eq!(results[1], results[0], "vubd vs qemu-storage-daemon");
}

/// `block_resize` with `args` must fail saying `why` and leave the disk at its size, serving:
/// a write to granule `n` lands and the bitmap records it.
fn refused(qmp: &mut Qmp, client: &mut BlkioClient, args: Value, why: &str, n: u64) {
    let r = qmp.execute("block_resize", args.clone());
    let desc = r["error"]["desc"].as_str().unwrap_or_default();
    let ok = r["error"]["class"] == "GenericError" && desc.contains(why);
    assert!(ok, "{args}: {r}");
    assert_eq!(virtual_size(qmp, "disk"), OLD, "{args}");
    let count = qmp.bitmaps("disk")[0]["count"].as_u64().unwrap();
    let write = client.write(0, n * G, &pattern(512, n));
    assert!(write.is_ok(), "{args}: a write after it: {write:?}");
    assert_eq!(qmp.bitmaps("disk")[0]["count"], count + G, "{args}");
}

#[test]
fn block_resize_refusals_leave_the_disk_serving_at_its_size() {
    let dir = TempDir::new("resize-refusals");
    let (mut vubd, mut qmp) = serve_with_control(&dir, 9);
    add_bitmap(&mut qmp, "disk", "b0", false);
    add_bitmap(&mut qmp, "disk", "frozen", true);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    let cases = [
        (json!({"node-name": "disk", "size": NEW + 256}), "multiple"),
        (json!({"node-name": "disk", "size": 0}), "multiple"),
        (json!({"node-name": "nope", "size": NEW}), "nope"),
        (json!({"node-name": "disk-file", "size": NEW}), "protocol"),
        (json!({"device": "disk"}), "size"),
        (json!({"node-name": "disk", "size": "1G"}), "size"),
    ];
    for (n, (args, why)) in (1..).zip(cases) {
        refused(&mut qmp, &mut client, args, why, n);
    }
    // In use by an NBD export of the disk itself; then a bitmap busy in an export of another
    // node.
    let nbd = json!({"addr": {"type": "unix", "data": {"path": dir.join("nbd.sock")}}});
    qmp.ok("nbd-server-start", nbd);
    let e0 = json!({"type": "nbd", "id": "e0", "node-name": "disk", "writable": false});
    qmp.ok("block-export-add", e0);
    let grow = json!({"node-name": "disk", "size": NEW});
    refused(&mut qmp, &mut client, grow.clone(), "export e0", 10);
    qmp.ok("block-export-del", json!({"id": "e0"}));
    fs::write(dir.join("other.raw"), vec![0u8; MIB as usize]).unwrap();
    let file = json!({"driver": "file", "filename": dir.join("other.raw")});
    let other = json!({"driver": "raw", "node-name": "other", "read-only": true, "file": file});
    qmp.ok("blockdev-add", other);
    let e1 = json!({"type": "nbd", "id": "e1", "node-name": "other", "writable": false,
                    "bitmaps": [{"node": "disk", "name": "frozen"}]});
    qmp.ok("block-export-add", e1);
    let busy = "'frozen' is currently in use";
    refused(&mut qmp, &mut client, grow, busy, 11);
    qmp.ok("block-export-del", json!({"id": "e1"}));
    let shrink = json!({"node-name": "disk", "size": OLD - MIB});
    refused(&mut qmp, &mut client, shrink, "shrink", 12);
    qmp.ok("block_resize", json!({"device": "disk", "size": NEW}));
    assert_eq!(virtual_size(&mut qmp, "disk"), NEW);
    assert_eq!(qmp.bitmaps("disk").len(), 2);
    drop((client, qmp));
    vubd.stop();
    assert_check_clean(dir.path(), "meta.qcow2");
}

/// Found while writing these tests: on a raw disk, block_resize to a smaller size answers
/// success and changes nothing on disk, but bitmaps added afterwards cover only the smaller
/// size, so they miss writes past it.
#[test]
fn block_resize_refuses_to_shrink_a_raw_disk() {
    let dir = TempDir::new("resize-raw-shrink");
    let raw = dir.join("disk.raw");
    create_image(&raw, 16 << 20, 3);
    let control = dir.join("qmp.sock");
    let args = ["--image", path(&raw), "--control", path(&control)];
    let mut vubd = Vubd::start(&dir.join("vubd.sock"), &args);
    let mut qmp = Qmp::connect(&control);
    let shrink = json!({"node-name": "disk", "size": 8 * MIB});
    let r = qmp.execute("block_resize", shrink);
    let after = json!({"node": "disk", "name": "after"});
    qmp.ok("block-dirty-bitmap-add", after);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    client.write(0, 12 * MIB, &pattern(4096, 1)).unwrap();
    let count = qmp.bitmaps("disk")[0]["count"].as_u64().unwrap();
    let size = virtual_size(&mut qmp, "disk");
    let ok = r.get("error").is_some() && count == G;
    let why = "a bitmap added after counts";
    assert!(
        ok,
        "block_resize to 8 MiB: {r}; size {size}; {why} {count} for 12 MiB"
    );
    drop(client);
    vubd.stop();
}

/// A connection that has negotiated `protocol` (and REPLY_ACK and MQ), with no rings: the
/// frontend and a clone of its socket.
fn bare_frontend(socket: &Path, protocol: Proto) -> (Frontend, UnixStream) {
    let stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let clone = stream.try_clone().unwrap();
    let mut fe = Frontend::from_stream(stream, 1);
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    fe.set_features(offered & (1 << 32 | 1 << 30)).unwrap();
    let offered = fe.get_protocol_features().unwrap();
    let wanted = protocol | Proto::REPLY_ACK | Proto::MQ;
    fe.set_protocol_features(offered & wanted).unwrap();
    (fe, clone)
}

/// virtio-blk `capacity` (512-byte sectors, little endian at offset 0), by GET_CONFIG.
fn capacity(fe: &mut Frontend) -> u64 {
    let flags = VhostUserConfigFlags::WRITABLE;
    let (_, data) = fe.get_config(0, 8, flags, &[0; 8]).unwrap();
    u64::from_le_bytes(data[..8].try_into().unwrap())
}

/// Whether bytes are waiting on `s`, without taking them.
fn pending(s: &UnixStream) -> bool {
    let mut byte = 0u8;
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT;
    // SAFETY: recv into one live byte on an open socket.
    unsafe { libc::recv(s.as_raw_fd(), (&mut byte as *mut u8).cast(), 1, flags) > 0 }
}

/// The one notice `channel` must hold: exactly a 12-byte header, request 2, flags 1, size 0.
fn expect_notice(channel: &mut UnixStream) {
    channel.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut header = [0u8; 12];
    channel.read_exact(&mut header).expect("a notice");
    let word = |i: usize| u32::from_le_bytes(header[4 * i..4 * i + 4].try_into().unwrap());
    assert_eq!((word(0), word(1), word(2)), (2, 1, 0), "CONFIG_CHANGE_MSG");
    assert!(!pending(channel), "nothing but the 12-byte message");
}

#[test]
fn frontends_that_acked_config_and_backend_req_are_told_of_the_new_capacity() {
    let dir = TempDir::new("resize-notice");
    let (mut vubd, mut qmp) = serve_with_control(&dir, 10);
    // A: a started device with CONFIG, BACKEND_REQ and REPLY_ACK, and its backend channel.
    let mut a = RawFrontend::connect_protocol(&vubd.socket, 64, 0, Proto::BACKEND_REQ);
    let (mut a_channel, theirs) = UnixStream::pair().unwrap();
    a.frontend.set_backend_request_fd(&theirs).unwrap();
    drop(theirs);
    // A reply after SET_BACKEND_REQ_FD: vubd handled it (and kept the channel) before.
    assert_eq!(capacity(&mut a.frontend), OLD / 512);
    // C: BACKEND_REQ and a channel, but not CONFIG: no notices.
    let (mut c, _) = bare_frontend(&vubd.socket, Proto::BACKEND_REQ);
    let (c_channel, theirs) = UnixStream::pair().unwrap();
    c.set_backend_request_fd(&theirs).unwrap();
    drop(theirs);
    c.get_features().unwrap();

    qmp.ok("block_resize", json!({"node-name": "disk", "size": NEW}));
    // The notices are sent before block_resize returns.
    expect_notice(&mut a_channel);
    assert!(!pending(&c_channel), "C did not ack CONFIG");
    assert_eq!(capacity(&mut a.frontend), NEW / 512);
    drop(c);

    // B: CONFIG but not BACKEND_REQ: nothing sent, the capacity read when it asks.
    let (mut b, b_socket) = bare_frontend(&vubd.socket, Proto::CONFIG);
    assert_eq!(capacity(&mut b), NEW / 512);
    let newer = NEW + 64 * MIB;
    qmp.ok("block_resize", json!({"node-name": "disk", "size": newer}));
    expect_notice(&mut a_channel);
    assert!(!pending(&b_socket), "nothing unasked on B's own socket");
    assert_eq!(capacity(&mut b), newer / 512);
    assert_eq!(capacity(&mut a.frontend), newer / 512);
    drop((a, b, qmp));
    vubd.stop();
    assert_check_clean(dir.path(), "meta.qcow2");
}

// Power loss and I/O errors at every step of a resize (in-process, as tests/power_loss.rs).

const C_OLD: u64 = 2 * MIB;
const C_NEW: u64 = 600 * MIB;

/// The template: three bitmaps (one disabled, one of three data clusters once grown) with
/// dirty granules, in an image closed cleanly. Returns their model.
fn template(dir: &TempDir) -> crash::Model {
    raw_with_metadata(dir, C_OLD as usize, 11);
    let mut h = crash::open(&dir.join("meta.qcow2"), None).unwrap();
    let add = |name: &str, g| Action::Add {
        name: name.into(),
        granularity: Some(g),
        persistent: true,
        disabled: false,
    };
    assert!(h.transaction(&[add("b0", G), add("b1", 4096), add("b2", 512)]));
    assert!(h.write(0, 4096, 1) && h.write(C_OLD - 512, 512, 2));
    assert!(h.transaction(&[Action::Disable { name: "b2".into() }]));
    assert!(h.write(G, 512, 3));
    let model = h.model.clone();
    assert!(h.close());
    model
}

/// Grow, then write past the old end (if grown: the device checks the capacity, the harness
/// does not) and into a granule of the old range no bitmap has. Returns whether it grew.
fn grow_and_write(h: &mut Harness) -> bool {
    let grown = h.export.resize(C_NEW).is_ok();
    if grown {
        h.write(500 * MIB, 4096, 4);
    }
    h.write(MIB, 512, 5);
    grown
}

fn check_leaks_only(dir: &Path, what: &str) {
    let (code, out) = try_run_in(dir, "qemu-img", &["check", "meta.qcow2"]);
    assert!(code == 0 || code == 3, "{what}: qemu-img check: {out}");
}

/// After a cut: QEMU finds the image sound (leaks allowed), of the old size or the new one
/// (the new one if the resize said so), its bitmaps holding exactly what the model allows;
/// and the next boot grows it.
fn verify_cut(dir: &Path, what: &str, model: &crash::Model, grown: bool) {
    check_leaks_only(dir, what);
    let info = info_json(dir, "meta.qcow2");
    let size = info["virtual-size"].as_u64().unwrap();
    let expected = size == C_NEW || (size == C_OLD && !grown);
    assert!(expected, "{what}: size {size}, grown {grown}");
    assert!(file_len(&dir.join("disk.raw")) >= size, "{what}: data file");
    let bitmaps = info["format-specific"]["data"]["bitmaps"].to_string();
    assert!(!bitmaps.contains("in-use"), "{what}: {bitmaps}");
    let stored = crash::stored_bitmaps(&dir.join("meta.qcow2"));
    if let Err(e) = crash::matches(&stored, model) {
        panic!("{what}: at {size} bytes: {e}");
    }
    let h = crash::open(&dir.join("meta.qcow2"), None).unwrap();
    let regrown = h.export.resize(C_NEW);
    assert!(
        regrown.is_ok() && h.close(),
        "{what}: next boot: {regrown:?}"
    );
    check_leaks_only(dir, what);
}

fn copy_template(from: &TempDir, to: &TempDir) {
    for name in ["meta.qcow2", "disk.raw"] {
        fs::copy(from.join(name), to.join(name)).unwrap();
    }
}

/// Resize a copy of the template under `rule`; the machine stops right after (no clean
/// shutdown), whether power was lost or a write or sync failed.
fn cut(template: &TempDir, model: &crash::Model, rule: Rule) {
    let what = format!("{rule:?}");
    let dir = TempDir::new("resize-cut");
    copy_template(template, &dir);
    let fault = FaultInjector::new(rule);
    let mut h = crash::open(&dir.join("meta.qcow2"), Some(fault.clone())).unwrap();
    h.model = model.clone();
    let grown = grow_and_write(&mut h);
    assert!(fault.fired(), "{what}: never reached");
    let model = h.model.clone();
    drop(h);
    verify_cut(dir.path(), &what, &model, grown);
}

#[test]
fn a_power_loss_or_an_error_at_every_step_of_a_resize_leaves_the_old_disk_or_the_new() {
    let template_dir = TempDir::new("resize-template");
    let model = template(&template_dir);
    // Count the writes, syncs and steps of opening, then of the resize and the writes after.
    let dir = TempDir::new("resize-count");
    copy_template(&template_dir, &dir);
    let fault = FaultInjector::counting();
    let mut h = crash::open(&dir.join("meta.qcow2"), Some(fault.clone())).unwrap();
    h.model = model.clone();
    let opened = fault.counts();
    assert!(grow_and_write(&mut h), "the resize without a fault");
    let (counted, after) = (fault.counts(), h.model.clone());
    assert!(h.close());
    verify_cut(dir.path(), "without a fault", &after, true);
    let expected = BTreeSet::from([0, 1, C_OLD / G - 1, MIB / G, 500 * MIB / G]);
    assert_eq!(dirty(&dir, "b0", G), expected);

    // Power lost keeping none, all or either half of the unsynced writes; or the step failing.
    let halves = [(0..64).step_by(2), (1..64).step_by(2)].map(|h| Keep::Only(h.collect()));
    let all = [vec![Keep::None, Keep::All], halves.to_vec()].concat();
    let mut rules = Vec::new();
    let mut add = |trigger: Trigger, keeps: &[Keep]| {
        let actions = keeps
            .iter()
            .cloned()
            .map(Fault::PowerLoss)
            .chain([Fault::Fail]);
        rules.extend(actions.map(|action| (trigger.clone(), action)));
    };
    (opened.writes + 1..=counted.writes).for_each(|n| add(Trigger::Write(n), &all));
    (opened.syncs + 1..=counted.syncs).for_each(|n| add(Trigger::Sync(n), &all[..2]));
    for (name, n) in &counted.events {
        let before = opened.events.iter().find(|e| e.0 == *name);
        let before = before.map_or(0, |e| e.1);
        (before + 1..=*n).for_each(|n| add(Trigger::Event(name, n), &all));
    }
    let happened = |step| counted.events.iter().any(|e| e.0 == step);
    assert!(
        happened("resize_l1") && happened("resize_switch"),
        "{counted:?}"
    );
    let cuts = rules.len();
    let (rules, failed) = (Mutex::new(rules.into_iter()), Mutex::new(Vec::new()));
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let Some((trigger, action)) = rules.lock().unwrap().next() else {
                    break;
                };
                let rule = Rule { trigger, action };
                let what = format!("{rule:?}");
                let one = std::panic::AssertUnwindSafe(|| cut(&template_dir, &model, rule));
                if let Err(e) = std::panic::catch_unwind(one) {
                    let e = e.downcast_ref::<String>().cloned().unwrap_or(what);
                    failed.lock().unwrap().push(e);
                }
            });
        }
    });
    let failed = failed.into_inner().unwrap();
    let list = failed.join("\n");
    assert!(
        failed.is_empty(),
        "{} of {cuts} cuts failed:\n{list}",
        failed.len()
    );
}
