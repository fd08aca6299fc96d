//! Online pull-mode backup: a fleecing view of the running disk (copy-before-write), exported
//! over NBD with its dirty bitmap, driven by QEMU's QMP commands and read by standard clients
//! (nbdcopy, nbdinfo, qemu-img, qemu-io).
//!
//! * `scripts/pull-backup.sh` — one full and two incremental backups — runs unchanged against
//!   qemu-storage-daemon and vubd; each restore (qemu-img over the backup chain) equals the disk
//!   at its checkpoint, and each incremental copies exactly the granules written before it.
//! * A backup read while a libblkio write load keeps writing equals the disk at the checkpoint.
//! * A bitmap exported is busy; the startup forms (`--nbd-server`, `--export type=nbd`) work;
//!   TLS admits a client with the CA and refuses others.
//! * A SIGKILL during a backup under load leaves the disk, its bitmaps and metadata consistent.

mod common;
#[path = "common/nbd_servers.rs"]
mod servers;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

use common::bitmaps::{granules, nbd_dirty_granules, qsd_export, run_ops, serve_meta, workload};
use common::blkio_client::BlkioClient;
use common::data::assert_same;
use common::load::{self, Clock, End};
use common::qemu::{assert_check_clean, info_json, try_run_in};
use common::qmp::Qmp;
use common::qsd::{Daemon, Export};
use common::{raw_with_metadata, TempDir};

const MIB: u64 = 1 << 20;
const DISK: u64 = 32 * MIB;
const GRANULE: u64 = 65536;

fn script() -> String {
    format!("{}/scripts/pull-backup.sh", env!("CARGO_MANIFEST_DIR"))
}

/// Run scripts/pull-backup.sh with `args`; panics with its output if it fails.
fn pull_backup(args: &[&str]) {
    pull_backup_with(args, &[]);
}

/// [`pull_backup`] with environment variables (`NBD_TLS_DIR`).
fn pull_backup_with(args: &[&str], env: &[(&str, &Path)]) {
    let out = Command::new(script())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("pull-backup.sh");
    assert!(
        out.status.success(),
        "pull-backup.sh {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The disk's bytes as the guest sees them, read by qemu-img while the daemon serves it
/// (`-U`: no lock; callers flush first, so that the daemon's metadata is on disk). Not the raw
/// data file: after a discard, qemu-storage-daemon may leave old bytes there behind a zero
/// cluster.
fn disk_bytes(dir: &TempDir) -> Vec<u8> {
    restored(dir.path(), &dir.join("meta.qcow2"))
}

/// An image's guest-visible content, through qemu-img (backing chains included).
fn restored(dir: &Path, image: &Path) -> Vec<u8> {
    let out = dir.join("restored.raw");
    let (code, text) = try_run_in(
        dir,
        "qemu-img",
        &[
            "convert",
            "-U",
            "-O",
            "raw",
            image.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "qemu-img convert: {text}");
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

/// The granules an incremental copied: the dirty extents of its map.
fn mapped_granules(map: &Path) -> BTreeSet<u64> {
    let extents: Value = serde_json::from_slice(&std::fs::read(map).unwrap()).unwrap();
    let mut out = BTreeSet::new();
    for e in extents.as_array().unwrap() {
        if e["type"].as_u64().unwrap() & 1 == 1 {
            let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            out.extend(o / GRANULE..(o + l).div_ceil(GRANULE));
        }
    }
    out
}

/// Full, then two incrementals, by the script alone; every restore checked.
fn full_and_two_incrementals(dir: &TempDir, daemon: &Daemon, node: &str, who: &str) {
    let qmp = dir.join("qsd-qmp.sock");
    let (qmp, work) = (qmp.to_str().unwrap(), dir.join("backups"));
    let work = work.to_str().unwrap();
    let mut client = BlkioClient::connect(daemon.socket(), 1).unwrap();
    for (i, seed) in [11u64, 12, 13].into_iter().enumerate() {
        let writes = workload(25, DISK, seed);
        run_ops(&mut client, &writes);
        client.flush(0).unwrap();
        let at_checkpoint = disk_bytes(dir);
        let name = format!("c{i}");
        let backup = dir.join(&format!("backups/{name}.qcow2"));
        if i == 0 {
            pull_backup(&[qmp, node, work, "full", &name]);
        } else {
            let (previous, previous_backup) = (
                format!("c{}", i - 1),
                dir.join(&format!("backups/c{}.qcow2", i - 1)),
            );
            pull_backup(&[
                qmp,
                node,
                work,
                "inc",
                &name,
                &previous,
                previous_backup.to_str().unwrap(),
            ]);
            assert_eq!(
                mapped_granules(&dir.join(&format!("backups/{name}.map.json"))),
                granules(&writes, GRANULE),
                "{who}: the {previous} bitmap exported at {name} lists exactly the granules written since {previous}"
            );
        }
        assert_same(
            &restored(dir.path(), &backup),
            &at_checkpoint,
            &format!("{who}: restore at {name}"),
        );
    }
    // The script removed the consumed checkpoints; c2 records on.
    let mut q = daemon.qmp();
    let names: Vec<String> = q
        .bitmaps(node)
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["c2".to_string()], "{who}");
}

/// Run the backup script on vubd and on qemu-storage-daemon, each serving what `export` sets
/// up in a fresh directory holding `meta.qcow2` over `disk.raw` (and keeps running: a server
/// the export uses), then check the image.
fn script_on_both_daemons(
    name: &str,
    seed: u64,
    export: impl Fn(&TempDir) -> (Export, Option<servers::Server>),
) {
    for vubd in [true, false] {
        let who = if vubd { "vubd" } else { "qemu-storage-daemon" };
        let dir = TempDir::new(&format!("{name}-{who}"));
        raw_with_metadata(&dir, DISK as usize, seed);
        let (export, server) = export(&dir);
        let daemon = if vubd {
            Daemon::vubd(dir.path(), &export)
        } else {
            Daemon::qsd(dir.path(), &export)
        };
        full_and_two_incrementals(&dir, &daemon, "fmt", who);
        let (status, stderr) = daemon.stop();
        assert!(status.success(), "{who}: {stderr}");
        drop(server);
        assert_check_clean(dir.path(), "meta.qcow2");
    }
}

#[test]
fn the_same_backup_script_runs_on_qemu_storage_daemon_and_vubd() {
    script_on_both_daemons("backup-script", 3, |dir| (qsd_export(dir), None));
}

/// The same with the disk's data file behind an NBD server (qemu-nbd): the graph and the
/// backup flow do not depend on where the data lives.
#[test]
fn the_backup_script_runs_on_a_disk_whose_data_is_on_nbd() {
    script_on_both_daemons("backup-nbd", 4, |dir| {
        let sock = dir.join("nbd.sock");
        let server = servers::qemu_nbd(
            &servers::unix_spec(&sock, "data"),
            &dir.join("disk.raw"),
            &[],
        );
        let meta = format!("driver=file,filename={}", dir.join("meta.qcow2").display());
        let data = format!(
            "driver=nbd,server.type=unix,server.path={},export=data",
            sock.display()
        );
        let export = Export::with_protocols(&meta, Some(&data), &dir.join("qsd.sock"))
            .monitor(&dir.join("qsd-qmp.sock"))
            .discard_unmap();
        (export, Some(server))
    });
}

/// A client for the backup steps, on vubd's control socket.
fn start_backup(qmp: &mut Qmp, dir: &TempDir, bitmap: Option<&str>) {
    let fleece = dir.join("fleece.qcow2");
    let (code, out) = try_run_in(
        dir.path(),
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            fleece.to_str().unwrap(),
            &DISK.to_string(),
        ],
    );
    assert_eq!(code, 0, "{out}");
    qmp.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "fleece",
               "file": {"driver": "file", "filename": fleece}, "backing": "disk"}),
    );
    let mut actions = vec![json!({"type": "block-dirty-bitmap-add",
        "data": {"node": "disk", "name": "next", "persistent": true}})];
    if let Some(b) = bitmap {
        actions.push(json!({"type": "block-dirty-bitmap-disable",
            "data": {"node": "disk", "name": b}}));
    }
    actions.push(json!({"type": "blockdev-backup",
        "data": {"device": "disk", "target": "fleece", "sync": "none", "job-id": "bk"}}));
    qmp.ok("transaction", json!({"actions": actions}));
    qmp.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": dir.join("nbd.sock")}}}),
    );
    // The bitmap as `{node, name}` (the script names it alone, looked up through the view's
    // backing chain).
    let bitmaps: Vec<Value> = bitmap
        .map(|b| json!({"node": "disk", "name": b}))
        .into_iter()
        .collect();
    qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "fleece", "name": "view",
               "writable": false, "bitmaps": bitmaps}),
    );
}

fn view_uri(dir: &TempDir) -> String {
    format!("nbd+unix:///view?socket={}", dir.join("nbd.sock").display())
}

#[test]
fn a_backup_read_under_a_write_load_is_the_disk_at_the_checkpoint() {
    let dir = TempDir::new("backup-under-load");
    raw_with_metadata(&dir, DISK as usize, 4);
    let control = dir.join("qmp.sock");
    let mut vubd = serve_meta(
        &dir,
        &["--num-queues", "2", "--control", control.to_str().unwrap()],
    );
    let mut qmp = Qmp::connect(&control);
    qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "c0", "persistent": true}),
    );
    let clock = Clock::default();
    // Writes before the checkpoint, then the disk as the checkpoint will see it.
    let stop = AtomicBool::new(false);
    let mut first = BlkioClient::connect(&vubd.socket, 2).unwrap();
    std::thread::scope(|s| {
        let t = s.spawn(|| load::run(&mut first, DISK, 1, &clock, &stop, End::Drain));
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::SeqCst);
        t.join().unwrap();
    });
    // The load drained: every one of its requests is answered. (Left in flight, they could
    // still land after the flush below: vubd serves a second frontend while it drains the
    // first, as live migration needs.) So the disk is at rest once the flush is answered, and
    // only then is it the checkpoint's.
    drop(first);
    let mut client = BlkioClient::connect(&vubd.socket, 2).unwrap();
    client.flush(0).unwrap();
    let at_checkpoint = disk_bytes(&dir);
    start_backup(&mut qmp, &dir, Some("c0"));
    // Exports QEMU refuses, refused the same way, and leaving no bitmap busy.
    for (bitmaps, error) in [
        (json!(["nope"]), "Bitmap 'nope' is not found"),
        (
            json!(["c0", "next"]),
            "Enabled bitmap 'next' incompatible with readonly export",
        ),
    ] {
        let r = qmp.execute(
            "block-export-add",
            json!({"type": "nbd", "id": "e1", "node-name": "fleece", "writable": false,
                   "bitmaps": bitmaps}),
        );
        assert_eq!(r["error"]["desc"], error, "{r}");
    }
    let next = qmp.bitmaps("disk");
    let next = next.iter().find(|b| b["name"] == "next").unwrap();
    assert_eq!(next["busy"], false);
    // The view, copied while the load goes on writing the disk: the copy starts once
    // copy-before-write has saved 2 MiB of the checkpoint's data, and the load stops after it.
    let copy = dir.join("copy.raw");
    let stop = AtomicBool::new(false);
    let saved_before_copy = std::thread::scope(|s| {
        let t = s.spawn(|| load::run(&mut client, DISK, 2, &clock, &stop, End::Collect));
        let mut saved = 0;
        while saved < 2 * MIB {
            saved = qmp.ok("query-block-jobs", json!({}))[0]["offset"]
                .as_u64()
                .unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = Command::new("nbdcopy")
            .arg(view_uri(&dir))
            .arg(&copy)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nbdcopy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        stop.store(true, Ordering::SeqCst);
        t.join().unwrap();
        saved
    });
    assert!(saved_before_copy >= 2 * MIB);
    assert_same(
        &std::fs::read(&copy).unwrap(),
        &at_checkpoint,
        "the view at the checkpoint",
    );
    assert!(
        disk_bytes(&dir) != at_checkpoint,
        "the load changed the disk meanwhile"
    );
    // While exported, the bitmap cannot change (QEMU's busy check).
    let busy = qmp.execute(
        "block-dirty-bitmap-remove",
        json!({"node": "disk", "name": "c0"}),
    );
    assert_eq!(
        busy["error"]["desc"],
        "Bitmap 'c0' is currently in use by another operation and cannot be used"
    );
    assert_eq!(
        qmp.bitmaps("disk")
            .iter()
            .find(|b| b["name"] == "c0")
            .unwrap()["busy"],
        true
    );
    // The view's bitmap is the checkpoint's: every request acknowledged before it.
    let map = Command::new("nbdinfo")
        .args(["--json", "--map=qemu:dirty-bitmap:c0", &view_uri(&dir)])
        .output()
        .unwrap();
    assert!(map.status.success());
    std::fs::write(dir.join("c0.map.json"), &map.stdout).unwrap();
    assert!(!mapped_granules(&dir.join("c0.map.json")).is_empty());
    // Teardown in QEMU's order; then the bitmap is free again.
    qmp.ok("block-export-del", json!({"id": "e0"}));
    qmp.ok("block-job-cancel", json!({"device": "bk"}));
    qmp.ok("blockdev-del", json!({"node-name": "fleece"}));
    qmp.ok("nbd-server-stop", json!({}));
    qmp.ok(
        "block-dirty-bitmap-remove",
        json!({"node": "disk", "name": "c0"}),
    );
    assert_eq!(qmp.ok("query-block-jobs", json!({})), json!([]));
    // QEMU's events for the teardown reached the client that asked, in order.
    let events: Vec<(&str, &Value)> = qmp
        .events
        .iter()
        .map(|e| (e["event"].as_str().unwrap(), &e["data"]))
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0], ("BLOCK_EXPORT_DELETED", &json!({"id": "e0"})));
    assert_eq!(events[1].0, "BLOCK_JOB_CANCELLED");
    assert_eq!(events[1].1["device"], "bk");
    assert_eq!(events[1].1["type"], "backup");
    drop(client);
    vubd.stop();
    assert_check_clean(dir.path(), "meta.qcow2");
}

#[test]
fn a_crash_during_a_backup_leaves_the_disk_and_its_bitmaps_consistent() {
    let dir = TempDir::new("backup-crash");
    raw_with_metadata(&dir, DISK as usize, 5);
    let control = dir.join("qmp.sock");
    let args = ["--control", control.to_str().unwrap()];
    let mut vubd = serve_meta(&dir, &args);
    let mut qmp = Qmp::connect(&control);
    start_backup(&mut qmp, &dir, None);
    let clock = Clock::default();
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    let stop = AtomicBool::new(false);
    let log = std::thread::scope(|s| {
        let t = s.spawn(|| load::run(&mut client, DISK, 3, &clock, &stop, End::Collect));
        let reader = s.spawn(|| {
            Command::new("nbdcopy")
                .arg(view_uri(&dir))
                .arg(dir.join("copy.raw"))
                .output()
        });
        std::thread::sleep(Duration::from_millis(300));
        vubd.stop_with(libc::SIGKILL);
        stop.store(true, Ordering::SeqCst);
        let _ = reader.join();
        t.join().unwrap()
    });
    // The disk's image: valid, its bitmap consistent and covering every acknowledged change.
    let (code, out) = try_run_in(dir.path(), "qemu-img", &["check", "meta.qcow2"]);
    assert!(
        code == 0 || code == 3,
        "qemu-img check (exit {code}): {out}"
    );
    assert!(!out.contains("ERROR"), "{out}");
    let info = info_json(dir.path(), "meta.qcow2");
    let bitmaps = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .unwrap();
    let next = bitmaps.iter().find(|b| b["name"] == "next").unwrap();
    assert!(
        !next["flags"].as_array().unwrap().contains(&json!("in-use")),
        "the bitmap survives the crash consistent: {info}"
    );
    let dirty = nbd_dirty_granules(dir.path(), "meta.qcow2", "next", GRANULE);
    let mut acknowledged = 0;
    for i in log.iter().filter(|i| i.acknowledged.is_some()) {
        acknowledged += 1;
        for g in i.offset / GRANULE..=(i.offset + i.len - 1) / GRANULE {
            assert!(
                dirty.contains(&g),
                "granule {g} of an acknowledged request not marked"
            );
        }
    }
    assert!(acknowledged > 0);
    // The disk serves again; the scratch fleecing image is simply deleted.
    std::fs::remove_file(dir.join("fleece.qcow2")).unwrap();
    let mut again = serve_meta(&dir, &args);
    let mut client = BlkioClient::connect(&again.socket, 1).unwrap();
    client.read(0, 0, 4096).unwrap();
    drop(client);
    again.stop();
}

#[test]
fn the_startup_forms_export_the_disk_over_nbd() {
    let dir = TempDir::new("backup-startup");
    raw_with_metadata(&dir, DISK as usize, 6);
    let nbd = dir.join("nbd.sock");
    let mut vubd = serve_meta(
        &dir,
        &[
            "--readonly",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", nbd.display()),
            "--export",
            "type=nbd,id=e0,node-name=disk,name=disk",
        ],
    );
    let out = Command::new("nbdcopy")
        .arg(format!("nbd+unix:///disk?socket={}", nbd.display()))
        .arg(dir.join("copy.raw"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read(dir.join("copy.raw")).unwrap() == disk_bytes(&dir));
    vubd.stop();
}

#[test]
fn backups_over_tls_admit_only_clients_with_the_ca() {
    let dir = TempDir::new("backup-tls");
    raw_with_metadata(&dir, DISK as usize, 7);
    common::tls::make_certs(dir.path());
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let server_dir = dir.join("server");
    let control = dir.join("qsd-qmp.sock");
    let mut vubd = serve_meta(
        &dir,
        &[
            "--control",
            control.to_str().unwrap(),
            "--object",
            &format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=off",
                server_dir.display()
            ),
            "--nbd-server",
            &format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port},tls-creds=tls0"),
            "--export",
            "type=nbd,id=e0,node-name=disk,name=disk",
        ],
    );
    let nbdinfo = |uri: String| {
        Command::new("nbdinfo")
            .arg("--size")
            .arg(uri)
            .output()
            .unwrap()
    };
    let with_ca = nbdinfo(format!(
        "nbds://127.0.0.1:{port}/disk?tls-certificates={}",
        dir.join("client").display()
    ));
    assert!(
        with_ca.status.success(),
        "{}",
        String::from_utf8_lossy(&with_ca.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&with_ca.stdout).trim(),
        DISK.to_string()
    );
    let other_ca = nbdinfo(format!(
        "nbds://127.0.0.1:{port}/disk?tls-certificates={}",
        dir.join("other").display()
    ));
    assert!(!other_ca.status.success(), "a client of another CA got in");
    let plain = nbdinfo(format!("nbd://127.0.0.1:{port}/disk"));
    assert!(!plain.status.success(), "a client without TLS got in");

    // The backup flow over TLS: the server stopped and started again by the script.
    let mut qmp = Qmp::connect(&control);
    qmp.ok("block-export-del", json!({"id": "e0"}));
    qmp.ok("nbd-server-stop", json!({}));
    qmp.ok("object-del", json!({"id": "tls0"}));
    drop(qmp);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    run_ops(&mut client, &workload(20, DISK, 14));
    client.flush(0).unwrap();
    let at_c0 = disk_bytes(&dir);
    let work = dir.join("backups");
    let (qmp, dir_work) = (control.to_str().unwrap(), work.to_str().unwrap());
    let tls = [("NBD_TLS_DIR", server_dir.as_path())];
    pull_backup_with(&[qmp, "disk", dir_work, "full", "c0"], &tls);
    assert_same(
        &restored(dir.path(), &work.join("c0.qcow2")),
        &at_c0,
        "full backup over TLS",
    );
    let w1 = workload(20, DISK, 15);
    run_ops(&mut client, &w1);
    client.flush(0).unwrap();
    let at_c1 = disk_bytes(&dir);
    let c0 = work.join("c0.qcow2");
    pull_backup_with(
        &[
            qmp,
            "disk",
            dir_work,
            "inc",
            "c1",
            "c0",
            c0.to_str().unwrap(),
        ],
        &tls,
    );
    assert_eq!(
        mapped_granules(&work.join("c1.map.json")),
        granules(&w1, GRANULE)
    );
    assert_same(
        &restored(dir.path(), &work.join("c1.qcow2")),
        &at_c1,
        "incremental over TLS",
    );
    drop(client);
    vubd.stop();
}

#[test]
fn sigterm_during_a_backup_stops_cleanly() {
    let dir = TempDir::new("backup-sigterm");
    raw_with_metadata(&dir, DISK as usize, 8);
    let control = dir.join("qmp.sock");
    let mut vubd = serve_meta(&dir, &["--control", control.to_str().unwrap()]);
    let mut qmp = Qmp::connect(&control);
    qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk", "name": "c0", "persistent": true}),
    );
    start_backup(&mut qmp, &dir, Some("c0"));
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    run_ops(&mut client, &workload(10, DISK, 16));
    // A client is connected to the export and the job runs when the daemon is told to stop.
    let nbd = std::process::Command::new("nbdinfo")
        .arg("--size")
        .arg(view_uri(&dir))
        .output()
        .unwrap();
    assert!(nbd.status.success());
    drop(client);
    vubd.stop();
    assert_check_clean(dir.path(), "meta.qcow2");
    let info = info_json(dir.path(), "meta.qcow2");
    let bitmaps = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .unwrap();
    let names: Vec<&str> = bitmaps
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["c0", "next"], "{info}");
    assert!(bitmaps
        .iter()
        .all(|b| !b["flags"].as_array().unwrap().contains(&json!("in-use"))));
}
