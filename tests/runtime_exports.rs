//! vhost-user-blk exports added and removed at runtime over QMP, in qemu-storage-daemon's
//! command shapes: `blockdev-add` of file and qcow2 nodes (children by node name or inline),
//! `block-export-add` / `block-export-del`, the queries, transactions across disks.
//!
//! * The same QMP script runs against qemu-storage-daemon and vubd (started with the same
//!   monitor-only command line, and with `--control`): the queries, the deletion while a
//!   frontend is connected, the image after its nodes are deleted (checked and its bitmap read
//!   back by qemu-img, qemu-nbd and nbdinfo while the daemon runs) must agree.
//! * A node exported again keeps its bitmap and data.
//! * Two runtime exports beside a command-line disk: transactions across them are atomic; a
//!   hard deletion disconnects one frontend while the others keep working.
//! * What vubd refuses, the daemon serving on.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use serde_json::{json, Value};

use common::bitmaps::{granules, nbd_dirty_granules, workload, Op};
use common::blkio_client::BlkioClient;
use common::qemu::{assert_check_clean, info_json, qemu_img, try_run_in};
use common::qmp::Qmp;
use common::{create_image, pattern, TempDir, Vubd};

const DISK: u64 = 16 << 20;
const GRANULE: u64 = 65536;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Qsd,
    /// vubd with qemu-storage-daemon's `--chardev socket,... --monitor chardev=m`.
    VubdQsdSyntax,
    /// `vubd serve --control PATH`.
    VubdControl,
}

/// A daemon started with a QMP monitor (`qmp.sock`) and nothing else. Its stderr goes to
/// `daemon.log`, shown when something fails; dropped, it is stopped with SIGTERM.
struct Daemon {
    child: Option<Child>,
    kind: Kind,
    log: PathBuf,
    monitor: PathBuf,
}

impl Daemon {
    fn start(kind: Kind, dir: &TempDir) -> Daemon {
        let monitor = dir.join("qmp.sock");
        let chardev = format!("socket,id=m,path={},server=on,wait=off", monitor.display());
        let qsd_args = ["--chardev", &chardev, "--monitor", "chardev=m"];
        let mut command = Command::new(common::vubd_bin());
        match kind {
            Kind::Qsd => command = Command::new("qemu-storage-daemon"),
            Kind::VubdQsdSyntax => _ = command.arg("serve"),
            Kind::VubdControl => _ = command.args(["serve", "--control"]).arg(&monitor),
        }
        if !matches!(kind, Kind::VubdControl) {
            command.args(qsd_args);
        }
        let log = dir.join("daemon.log");
        let child = (command.current_dir(dir.path()).stdin(Stdio::null()))
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("start {kind:?}: {e}"));
        let child = Some(child);
        let mut daemon = Daemon {
            child,
            kind,
            log,
            monitor,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !daemon.monitor.exists() {
            assert!(daemon.running(), "{kind:?} exited: {}", daemon.log());
            assert!(Instant::now() < deadline, "{kind:?} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    fn qmp(&self) -> Qmp {
        Qmp::connect(&self.monitor)
    }

    fn running(&mut self) -> bool {
        let child = self.child.as_mut().expect("stopped");
        child.try_wait().unwrap().is_none()
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; the daemon must exit 0.
    fn stop(&mut self) {
        let mut child = self.child.take().expect("stopped");
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            match child.try_wait().unwrap() {
                Some(status) => break status,
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                None => {
                    let _ = child.kill();
                    panic!("{:?} did not exit after SIGTERM: {}", self.kind, self.log());
                }
            }
        };
        let (kind, log) = (self.kind, self.log());
        assert!(status.success(), "{kind:?} exited {status}: {log}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() && !std::thread::panicking() {
            self.stop();
        } else if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `{p}meta.qcow2` over the raw data file `{p}disk.raw` (`data_file_raw=on`), as qemu-img
/// makes it; qemu-img truncates the data file, so it is filled afterwards. Returns the disk.
fn qcow2_over_raw(dir: &TempDir, p: &str, seed: u64) -> Vec<u8> {
    let data = dir.join(&format!("{p}disk.raw"));
    let option = format!("data_file={},data_file_raw=on", data.display());
    let create = format!("create -q -f qcow2 -o {option} {p}meta.qcow2 {DISK}");
    qemu_img(dir.path(), &create.split(' ').collect::<Vec<_>>());
    create_image(&data, DISK as usize, seed)
}

/// `blockdev-add` of file nodes `{p}data` and `{p}meta` and qcow2 node `{p}fmt` over them by
/// node name; or (`inline`) of `{p}fmt` alone, its children inline.
fn add_nodes(qmp: &mut Qmp, dir: &TempDir, p: &str, inline: bool) {
    let file = |name: &str| json!({"driver": "file", "filename": dir.join(name)});
    let (meta, data) = (format!("{p}meta.qcow2"), format!("{p}disk.raw"));
    let (file_child, data_child) = if inline {
        (file(&meta), file(&data))
    } else {
        for (node, f) in [(format!("{p}data"), &data), (format!("{p}meta"), &meta)] {
            let mut args = file(f);
            args["node-name"] = json!(node);
            qmp.ok("blockdev-add", args);
        }
        (json!(format!("{p}meta")), json!(format!("{p}data")))
    };
    qmp.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": format!("{p}fmt"),
               "file": file_child, "data-file": data_child}),
    );
}

fn export_args(id: &str, node: &str, socket: &Path) -> Value {
    json!({"type": "vhost-user-blk", "id": id, "node-name": node,
           "addr": {"type": "unix", "path": socket}, "writable": true, "num-queues": 2})
}

fn export(qmp: &mut Qmp, id: &str, node: &str, socket: &Path) {
    qmp.ok("block-export-add", export_args(id, node, socket));
}

/// Writes spread over the disk: (queue, offset, data).
fn writes(seed: u64) -> Vec<(usize, u64, Vec<u8>)> {
    let ops = workload(24, DISK, seed).into_iter().enumerate();
    ops.map(|(i, (_, o, l))| (i % 2, o, pattern(l as usize, seed * 1000 + i as u64)))
        .collect()
}

/// Run `w` through `client`, and on `model`.
fn apply(client: &mut BlkioClient, model: &mut [u8], w: &[(usize, u64, Vec<u8>)]) {
    for (q, offset, data) in w {
        client.write(*q, *offset, data).unwrap();
        model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }
    client.flush(0).unwrap();
}

fn touched(w: &[(usize, u64, Vec<u8>)]) -> BTreeSet<u64> {
    let ops = w.iter().map(|(_, o, d)| (Op::Write, *o, d.len() as u64));
    granules(&ops.collect::<Vec<_>>(), GRANULE)
}

/// Write and read back through `client`, at 8 MiB.
fn works(client: &mut BlkioClient, seed: u64) {
    let data = pattern(65536, seed);
    client.write(1, 8 << 20, &data).unwrap();
    assert_eq!(client.read(0, 8 << 20, data.len()).unwrap(), data);
}

/// Whether the next request of `client` fails: an error, a failed completion, or no
/// completion within 2 s (libblkio does not notice that the backend hung up: the request
/// never completes; a live export completes it in milliseconds). A read: nothing changes.
fn next_request_fails(client: &mut BlkioClient) -> bool {
    let ptr = client.buf(0).as_mut_ptr();
    client.queues[0].read(0, ptr, 4096, 0, ReqFlags::empty());
    let mut completions = [MaybeUninit::<blkio::Completion>::uninit()];
    let mut timeout = Duration::from_secs(2);
    match client.queues[0].do_io(&mut completions, 1, Some(&mut timeout), None) {
        // SAFETY: do_io initialised the first entry.
        Ok(1) => unsafe { completions[0].assume_init_ref() }.ret != 0,
        _ => true,
    }
}

/// Wait for `BLOCK_EXPORT_DELETED` of `id` (events arrive between replies).
fn await_deleted(qmp: &mut Qmp, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let deleted = |e: &Value| e["event"] == "BLOCK_EXPORT_DELETED" && e["data"]["id"] == id;
    while !qmp.events.iter().any(deleted) {
        let events = &qmp.events;
        assert!(
            Instant::now() < deadline,
            "no BLOCK_EXPORT_DELETED {id}: {events:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
        qmp.ok("query-block-exports", json!({}));
    }
}

/// `block-export-del` in safe mode, retried while the daemon still counts a frontend that
/// has just disconnected; then its event.
fn delete_export(qmp: &mut Qmp, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = qmp.execute("block-export-del", json!({"id": id}));
        if r.get("return").is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "block-export-del {id}: {r}");
        std::thread::sleep(Duration::from_millis(20));
    }
    await_deleted(qmp, id);
}

/// Field `key` of every element of `list`, sorted.
fn names(list: &Value, key: &str) -> Vec<String> {
    let list = list.as_array().unwrap().iter();
    let mut names: Vec<String> = list.map(|e| e[key].as_str().unwrap().into()).collect();
    names.sort();
    names
}

fn export_ids(qmp: &mut Qmp) -> Vec<String> {
    names(&qmp.ok("query-block-exports", json!({})), "id")
}

/// The bitmaps of `node`, reduced to what QEMU and vubd both report, by name.
fn bitmap_summary(qmp: &mut Qmp, node: &str) -> Vec<Value> {
    let b = qmp.bitmaps(node);
    let mut b: Vec<Value> = (b.iter())
        .map(|b| {
            json!({"name": b["name"], "count": b["count"], "granularity": b["granularity"],
                   "persistent": b["persistent"], "recording": b["recording"]})
        })
        .collect();
    b.sort_by(|x, y| x["name"].as_str().cmp(&y["name"].as_str()));
    b
}

/// Run the script; returns what the daemon did at each step, to compare with another's.
fn the_script(kind: Kind) -> Vec<(&'static str, String)> {
    let dir = TempDir::new(&format!("rt-script-{kind:?}"));
    let mut model = qcow2_over_raw(&dir, "", 1);
    let mut daemon = Daemon::start(kind, &dir);
    let mut qmp = daemon.qmp();
    let mut seen = Vec::new();
    add_nodes(&mut qmp, &dir, "", false);
    let socket = dir.join("vhost.sock");
    export(&mut qmp, "e0", "fmt", &socket);
    let add = json!({"node": "fmt", "name": "b0", "persistent": true});
    qmp.ok("block-dirty-bitmap-add", add);
    let mut client = BlkioClient::connect(&socket, 2).unwrap();
    let w = writes(5);
    apply(&mut client, &mut model, &w);

    let mut exports = qmp.ok("query-block-exports", json!({}));
    for e in exports.as_array_mut().unwrap() {
        let keep = ["id", "node-name", "type", "shutting-down"];
        e.as_object_mut()
            .unwrap()
            .retain(|k, _| keep.contains(&k.as_str()));
    }
    seen.push(("query-block-exports", exports.to_string()));
    let nodes = qmp.ok("query-named-block-nodes", json!({}));
    let mut nodes: Vec<String> = (nodes.as_array().unwrap().iter())
        .map(|n| {
            let file = Path::new(n["file"].as_str().unwrap()).file_name().unwrap();
            let (name, drv) = (n["node-name"].as_str().unwrap(), n["drv"].as_str().unwrap());
            format!("{name}: {drv} ro={} {}", n["ro"], file.to_string_lossy())
        })
        .collect();
    nodes.sort();
    seen.push(("query-named-block-nodes", nodes.join(", ")));
    seen.push((
        "dirty-bitmaps",
        format!("{:?}", bitmap_summary(&mut qmp, "fmt")),
    ));
    let r = qmp.execute("blockdev-del", json!({"node-name": "fmt"}));
    seen.push((
        "blockdev-del of the exported node",
        r["error"]["class"].to_string(),
    ));

    // Deleting the export while the frontend is connected, in QEMU's default mode (safe).
    let r = qmp.execute("block-export-del", json!({"id": "e0"}));
    let class = r["error"]["class"].to_string();
    seen.push(("block-export-del (safe), frontend connected: error", class));
    if r.get("return").is_some() {
        await_deleted(&mut qmp, "e0");
    }
    let gone = next_request_fails(&mut client);
    seen.push((
        "the frontend's next request fails after it",
        gone.to_string(),
    ));
    drop(client);
    if export_ids(&mut qmp).contains(&"e0".to_string()) {
        delete_export(&mut qmp, "e0");
    }
    assert_eq!(export_ids(&mut qmp), Vec::<String>::new());
    for node in ["fmt", "meta", "data"] {
        qmp.ok("blockdev-del", json!({"node-name": node}));
    }
    let nodes = qmp.ok("query-named-block-nodes", json!({}));
    seen.push(("nodes after blockdev-del", nodes.to_string()));

    // The daemon still runs, the image closed: qemu-img and qemu-nbd open it.
    let (code, out) = try_run_in(dir.path(), "qemu-img", &["check", "meta.qcow2"]);
    let clean = code == 0 && out.contains("No errors were found");
    seen.push(("qemu-img check clean", clean.to_string()));
    let info = info_json(dir.path(), "meta.qcow2");
    let stored = &info["format-specific"]["data"]["bitmaps"];
    seen.push(("stored bitmaps", stored.to_string()));
    let dirty = nbd_dirty_granules(dir.path(), "meta.qcow2", "b0", GRANULE);
    assert_eq!(
        dirty,
        touched(&w),
        "{kind:?}: the bitmap records the writes"
    );
    seen.push(("dirty extents", format!("{dirty:?}")));
    let data_ok = fs::read(dir.join("disk.raw")).unwrap() == model;
    seen.push(("data as written", data_ok.to_string()));
    assert!(daemon.running(), "{kind:?}: {}", daemon.log());
    drop(qmp);
    daemon.stop();
    seen
}

#[test]
fn the_same_script_on_qemu_storage_daemon_and_vubd() {
    let qsd = the_script(Kind::Qsd);
    for what in ["qemu-img check clean", "data as written"] {
        assert!(qsd.contains(&(what, "true".into())), "qsd: {qsd:?}");
    }
    // Every difference named, for both ways of starting vubd.
    let mut differences = Vec::new();
    for kind in [Kind::VubdQsdSyntax, Kind::VubdControl] {
        for ((what, v), (_, q)) in the_script(kind).iter().zip(&qsd) {
            if v != q {
                differences.push(format!("{kind:?}: {what}:\n  vubd: {v}\n  qsd:  {q}"));
            }
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}

#[test]
fn a_node_exported_again_keeps_its_bitmap_and_data() {
    let dir = TempDir::new("rt-reexport");
    let mut model = qcow2_over_raw(&dir, "", 2);
    let mut daemon = Daemon::start(Kind::VubdControl, &dir);
    let mut qmp = daemon.qmp();
    add_nodes(&mut qmp, &dir, "", true);
    let (one, two) = (dir.join("one.sock"), dir.join("two.sock"));
    export(&mut qmp, "e0", "fmt", &one);
    let add = json!({"node": "fmt", "name": "b0", "persistent": true});
    qmp.ok("block-dirty-bitmap-add", add);
    let mut client = BlkioClient::connect(&one, 2).unwrap();
    let first = writes(7);
    apply(&mut client, &mut model, &first);
    drop(client);
    let before = bitmap_summary(&mut qmp, "fmt");
    assert_eq!(before[0]["count"], touched(&first).len() as u64 * GRANULE);
    delete_export(&mut qmp, "e0");
    assert!(!one.exists(), "the deleted export's socket is removed");
    let r = qmp.execute(
        "block-dirty-bitmap-add",
        json!({"node": "fmt", "name": "x"}),
    );
    assert!(
        r.get("error").is_some(),
        "bitmaps of an unexported node: {r}"
    );

    // The same id, the same node, a new socket.
    export(&mut qmp, "e0", "fmt", &two);
    assert_eq!(
        bitmap_summary(&mut qmp, "fmt"),
        before,
        "the bitmap as it was"
    );
    let mut client = BlkioClient::connect(&two, 2).unwrap();
    let data = client.read_all(0, DISK as usize).unwrap();
    assert!(data == model, "the data as written");
    let second = writes(8);
    apply(&mut client, &mut model, &second);
    let mut all = touched(&first);
    all.extend(touched(&second));
    let count = &bitmap_summary(&mut qmp, "fmt")[0]["count"];
    assert_eq!(count, all.len() as u64 * GRANULE);
    drop(client);
    delete_export(&mut qmp, "e0");
    qmp.ok("blockdev-del", json!({"node-name": "fmt"}));
    assert_eq!(qmp.ok("query-named-block-nodes", json!({})), json!([]));
    assert!(daemon.running(), "{}", daemon.log());
    assert_check_clean(dir.path(), "meta.qcow2");
    let dirty = nbd_dirty_granules(dir.path(), "meta.qcow2", "b0", GRANULE);
    assert_eq!(dirty, all);
    assert!(fs::read(dir.join("disk.raw")).unwrap() == model);
    drop(qmp);
    daemon.stop();
}

#[test]
fn runtime_exports_beside_a_command_line_disk() {
    let dir = TempDir::new("rt-three");
    common::raw_with_metadata(&dir, DISK as usize, 3);
    let mut models = [qcow2_over_raw(&dir, "a-", 4), qcow2_over_raw(&dir, "b-", 5)];
    let control = dir.join("qmp.sock");
    let args = format!(
        "--image {} --format qcow2 --num-queues 2 --control {}",
        dir.join("meta.qcow2").display(),
        control.display()
    );
    let args: Vec<&str> = args.split(' ').collect();
    let mut vubd = Vubd::start(&dir.join("disk.sock"), &args);
    let mut qmp = Qmp::connect(&control);
    add_nodes(&mut qmp, &dir, "a-", false);
    add_nodes(&mut qmp, &dir, "b-", true);
    export(&mut qmp, "ea", "a-fmt", &dir.join("a.sock"));
    export(&mut qmp, "eb", "b-fmt", &dir.join("b.sock"));
    let exports = qmp.ok("query-block-exports", json!({}));
    let exports = exports.as_array().unwrap();
    let cli = exports.iter().find(|e| e["node-name"] == "disk").unwrap();
    let cli_id = cli["id"].as_str().unwrap().to_string();
    let mut ids = vec![cli_id.clone(), "ea".into(), "eb".into()];
    ids.sort();
    assert_eq!(export_ids(&mut qmp), ids);
    let stats = qmp.ok("query-blockstats", json!({}));
    assert_eq!(names(&stats, "node-name"), ["a-fmt", "b-fmt", "disk"]);
    let mut disk = BlkioClient::connect(&vubd.socket, 2).unwrap();
    let mut a = BlkioClient::connect(&dir.join("a.sock"), 2).unwrap();
    let mut b = BlkioClient::connect(&dir.join("b.sock"), 2).unwrap();

    // A checkpoint on two disks at one point, then one whose last disk's action fails.
    let add = |node: &str, name: &str| {
        json!({"type": "block-dirty-bitmap-add",
               "data": {"node": node, "name": name, "persistent": true}})
    };
    let actions = [add("disk", "t1"), add("a-fmt", "t1")];
    qmp.ok("transaction", json!({"actions": actions}));
    let snapshot = |qmp: &mut Qmp| ["disk", "a-fmt", "b-fmt"].map(|n| bitmap_summary(qmp, n));
    let before = snapshot(&mut qmp);
    assert_eq!(before.each_ref().map(Vec::len), [1, 1, 0]);
    let actions = [add("disk", "t2"), add("b-fmt", "t2"), add("a-fmt", "t1")];
    let r = qmp.execute("transaction", json!({"actions": actions}));
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    assert_eq!(
        snapshot(&mut qmp),
        before,
        "a failed transaction changes no disk"
    );
    let wa = writes(9);
    apply(&mut a, &mut models[0], &wa);
    apply(&mut b, &mut models[1], &writes(10));
    let after = snapshot(&mut qmp);
    assert_eq!(
        after[0][0]["count"], 0,
        "the command-line disk was not written"
    );
    assert_eq!(after[1][0]["count"], touched(&wa).len() as u64 * GRANULE);

    // Hard deletion disconnects a's frontend; the others go on.
    qmp.ok("block-export-del", json!({"id": "ea", "mode": "hard"}));
    await_deleted(&mut qmp, "ea");
    assert!(next_request_fails(&mut a), "a's frontend was disconnected");
    drop(a);
    works(&mut disk, 11);
    works(&mut b, 12);
    ids.retain(|i| i != "ea");
    assert_eq!(export_ids(&mut qmp), ids);
    let stats = qmp.ok("query-blockstats", json!({}));
    assert_eq!(names(&stats, "node-name"), ["b-fmt", "disk"]);
    for node in ["a-fmt", "a-meta", "a-data"] {
        qmp.ok("blockdev-del", json!({"node-name": node}));
    }
    assert_check_clean(dir.path(), "a-meta.qcow2");
    let dirty = nbd_dirty_granules(dir.path(), "a-meta.qcow2", "t1", GRANULE);
    assert_eq!(dirty, touched(&wa));
    assert!(fs::read(dir.join("a-disk.raw")).unwrap() == models[0]);
    // The command-line disk's export can be deleted too.
    drop(disk);
    delete_export(&mut qmp, &cli_id);
    drop((b, qmp));
    vubd.stop();
    assert_check_clean(dir.path(), "meta.qcow2");
    assert_check_clean(dir.path(), "b-meta.qcow2");
    // Written once since t1, by `works`.
    let dirty = nbd_dirty_granules(dir.path(), "meta.qcow2", "t1", GRANULE);
    assert_eq!(dirty, BTreeSet::from([(8 << 20) / GRANULE]));
    models[1][8 << 20..(8 << 20) + 65536].copy_from_slice(&pattern(65536, 12));
    assert!(fs::read(dir.join("b-disk.raw")).unwrap() == models[1]);
}

/// Execute; the command must fail with `GenericError`, its description containing `says`.
fn refused(qmp: &mut Qmp, command: &str, args: Value, says: &str) {
    let r = qmp.execute(command, args.clone());
    assert_eq!(r["error"]["class"], "GenericError", "{command} {args}: {r}");
    let desc = r["error"]["desc"].as_str().unwrap();
    assert!(desc.contains(says), "{command} {args}: {desc}");
}

#[test]
fn refusals_leave_the_daemon_serving() {
    let dir = TempDir::new("rt-refusals");
    qcow2_over_raw(&dir, "a-", 6);
    qcow2_over_raw(&dir, "b-", 7);
    let mut daemon = Daemon::start(Kind::VubdControl, &dir);
    let mut qmp = daemon.qmp();
    add_nodes(&mut qmp, &dir, "a-", false);
    add_nodes(&mut qmp, &dir, "b-", false);
    let (a_sock, b_sock) = (dir.join("a.sock"), dir.join("b.sock"));
    export(&mut qmp, "ea", "a-fmt", &a_sock);
    let add = "block-export-add";
    refused(&mut qmp, add, export_args("e1", "nope", &b_sock), "'nope'");
    // QEMU accepts these two: a second export of a node, a socket path taken over.
    refused(&mut qmp, add, export_args("e1", "a-fmt", &b_sock), "a-fmt");
    refused(&mut qmp, add, export_args("e1", "b-fmt", &a_sock), "a.sock");
    let in_use = "'ea' is already in use";
    refused(&mut qmp, add, export_args("ea", "b-fmt", &b_sock), in_use);
    assert!(!b_sock.exists(), "a refused export leaves no socket");
    for node in ["a-fmt", "a-meta", "a-data"] {
        refused(
            &mut qmp,
            "blockdev-del",
            json!({"node-name": node}),
            "in use",
        );
    }
    for node in ["b-fmt", "a-meta"] {
        let args = json!({"node": node, "name": "x"});
        refused(&mut qmp, "block-dirty-bitmap-add", args, node);
    }
    let unknown = json!({"id": "nope"});
    refused(&mut qmp, "block-export-del", unknown, "'nope' is not found");

    // Export ids are shared with NBD exports; a disk an NBD export uses keeps its export.
    let nbd = json!({"addr": {"type": "unix", "data": {"path": dir.join("nbd.sock")}}});
    qmp.ok("nbd-server-start", nbd);
    let nbd = |id: &str, node: &str| json!({"type": "nbd", "id": id, "node-name": node});
    refused(&mut qmp, add, nbd("ea", "b-fmt"), in_use);
    qmp.ok(add, nbd("n0", "a-fmt"));
    refused(
        &mut qmp,
        add,
        export_args("n0", "b-fmt", &b_sock),
        "'n0' is already in use",
    );
    let hard = json!({"id": "ea", "mode": "hard"});
    refused(&mut qmp, "block-export-del", hard, "in use");
    qmp.ok("block-export-del", json!({"id": "n0"}));
    await_deleted(&mut qmp, "n0");
    assert_eq!(export_ids(&mut qmp), ["ea"]);

    // Nothing was disturbed: the export serves, the other node can be exported.
    assert!(daemon.running(), "{}", daemon.log());
    let mut a = BlkioClient::connect(&a_sock, 2).unwrap();
    works(&mut a, 13);
    export(&mut qmp, "eb", "b-fmt", &b_sock);
    let mut b = BlkioClient::connect(&b_sock, 2).unwrap();
    works(&mut b, 14);
    assert_eq!(export_ids(&mut qmp), ["ea", "eb"]);
    drop((a, b, qmp));
    daemon.stop();
    assert_check_clean(dir.path(), "a-meta.qcow2");
    assert_check_clean(dir.path(), "b-meta.qcow2");
}
