//! Three disks in one process, driven at the same time: each file holds its own writes and
//! nothing else, the one bitmap records its own disk's writes and nothing else, each export
//! counts its own requests. And SIGTERM with every frontend attached closes every disk.

use std::collections::BTreeSet;
use std::sync::{Arc, Barrier};

use super::*;
use common::bitmaps::nbd_dirty_granules;
use common::blkio_client::BlkioClient;
use common::data::assert_same;
use common::pattern;
use common::qemu::{assert_check_clean, info_json, qemu_img, qemu_view};
use common::vhost_msg::{header, req, RawConn, VERSION};

const GRANULE: u64 = 64 * KIB;
const WRITES: u64 = 32;

/// Disk `d`'s writes: in its own 4 MiB of the disk (so that a write landing on another disk,
/// or marked in another disk's bitmap, shows), none overlapping, some crossing a granule.
fn writes_of(d: u64) -> Vec<(u64, Vec<u8>)> {
    (0..WRITES)
        .map(|k| {
            let offset = d * 4 * MIB + k * 128 * KIB + (k % 4) * 16 * KIB;
            let len = 4096 * (1 + (k * 5 + d) % 16) as usize;
            (offset, pattern(len, 100 * d + k + 1))
        })
        .collect()
}

/// Connect to `socket` with `queues` queues, wait for the others at `start`, write `writes`
/// (round robin over the queues), flush, and read each back.
fn drive(
    socket: PathBuf,
    queues: usize,
    writes: Vec<(u64, Vec<u8>)>,
    start: Arc<Barrier>,
) -> Result<(), String> {
    let mut client = BlkioClient::connect(&socket, queues).map_err(|e| format!("{e}"))?;
    start.wait();
    for (i, (offset, data)) in writes.iter().enumerate() {
        client
            .write(i % queues, *offset, data)
            .map_err(|e| format!("write at {offset}: {e}"))?;
    }
    client.flush(0).map_err(|e| format!("flush: {e}"))?;
    for (i, (offset, data)) in writes.iter().enumerate() {
        let got = client
            .read(i % queues, *offset, data.len())
            .map_err(|e| format!("read at {offset}: {e}"))?;
        if got != *data {
            return Err(format!("read at {offset}: not what was written"));
        }
    }
    Ok(())
}

#[test]
fn three_disks_driven_at_once_keep_data_bitmaps_and_counts_apart() {
    let dir = TempDir::new("many-three");
    let mut models = [
        create_image(&dir.join("a.raw"), DISK, 1),
        create_image(&dir.join("b.raw"), DISK, 2),
        mission(&dir, "m.qcow2", "m.raw", 3),
    ];
    let mut vubd = Proc::vubd(
        &dir,
        &[
            "--disk",
            "image=a.raw,socket=a.sock,id=alpha",
            "--disk",
            "image=b.raw,socket=b.sock,node-name=bravo,num-queues=2",
            "--disk",
            "image=m.qcow2,format=qcow2,data-file=m.raw,socket=m.sock,node-name=mission,id=m-exp",
            "--control",
            "qmp.sock",
            "--metrics",
            "unix:metrics.sock",
        ],
        &["a.sock", "b.sock", "m.sock", "qmp.sock", "metrics.sock"],
    );
    let mut qmp = Qmp::connect(&dir.join("qmp.sock"));
    // Node names default to diskN (N counting every --disk), export ids to the node name.
    let (nodes, ids) = (["disk0", "bravo", "mission"], ["alpha", "bravo", "m-exp"]);
    let listed = exports(&mut qmp);
    let mut want: Vec<_> = ids
        .iter()
        .zip(nodes)
        .map(|(id, node)| {
            (
                id.to_string(),
                node.to_string(),
                "vhost-user-blk".to_string(),
            )
        })
        .collect();
    want.sort();
    assert_eq!(listed, want, "query-block-exports");
    qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": "mission", "name": "b0", "persistent": true, "granularity": GRANULE}),
    );

    let sockets = ["a.sock", "b.sock", "m.sock"];
    let queues = [1, 2, 1];
    let start = Arc::new(Barrier::new(3));
    let drivers: Vec<_> = (0..3)
        .map(|d| {
            let (socket, start) = (dir.join(sockets[d]), start.clone());
            let (q, writes) = (queues[d], writes_of(d as u64));
            std::thread::spawn(move || drive(socket, q, writes, start))
        })
        .collect();
    for (d, driver) in drivers.into_iter().enumerate() {
        let result = within(&format!("the load on {}", sockets[d]), move || {
            driver.join()
        });
        result
            .expect("driver thread")
            .unwrap_or_else(|e| panic!("{}: {e}", sockets[d]));
    }

    // Each disk counts its own requests.
    for (d, node) in nodes.iter().enumerate() {
        let writes = writes_of(d as u64);
        let bytes: u64 = writes.iter().map(|(_, w)| w.len() as u64).sum();
        let highest = writes
            .iter()
            .map(|(o, w)| o + w.len() as u64)
            .max()
            .unwrap();
        let stats = blockstats(&mut qmp, &nodes, node);
        for (key, want) in [
            ("wr_operations", WRITES),
            ("wr_bytes", bytes),
            ("rd_operations", WRITES),
            ("rd_bytes", bytes),
            ("flush_operations", 1),
            ("wr_highest_offset", highest),
        ] {
            assert_eq!(stats[key], json!(want), "{node}: {key} in {stats}");
        }
    }
    // The bitmap records the mission disk's writes, and the other disks have none.
    let touched: BTreeSet<u64> = writes_of(2)
        .iter()
        .flat_map(|(o, w)| o / GRANULE..=(o + w.len() as u64 - 1) / GRANULE)
        .collect();
    let dirty = touched.len() as u64 * GRANULE;
    let b0 = qmp.bitmaps("mission");
    assert_eq!(b0.len(), 1, "{b0:?}");
    assert_eq!(
        b0[0]["count"],
        json!(dirty),
        "query-named-block-nodes: {b0:?}"
    );
    assert_eq!(qmp.bitmaps("disk0"), Vec::<Value>::new());
    assert_eq!(qmp.bitmaps("bravo"), Vec::<Value>::new());
    let block = qmp.ok("query-block", json!({}));
    let entry = block
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["inserted"]["node-name"] == "mission")
        .unwrap_or_else(|| panic!("no mission in {block}"));
    assert_eq!(
        entry["inserted"]["dirty-bitmaps"][0]["count"],
        json!(dirty),
        "{entry}"
    );

    // /metrics: one series set per export, labelled with its id.
    let m = scrape(&dir.join("metrics.sock"));
    for (d, (id, node)) in ids.iter().zip(nodes).enumerate() {
        let labels = [("export", *id)];
        let info: Vec<_> = select(&m, "vubd_export_info", &labels).collect();
        assert_eq!(info.len(), 1, "{id}: {info:?}");
        assert_eq!(info[0].1["node"], node, "{id}: {info:?}");
        let write = [("export", *id), ("op", "write")];
        let bytes: u64 = writes_of(d as u64)
            .iter()
            .map(|(_, w)| w.len() as u64)
            .sum();
        assert_eq!(sum(&m, "vubd_requests_total", &write), WRITES, "{id}");
        assert_eq!(sum(&m, "vubd_request_bytes_total", &write), bytes, "{id}");
        let per_queue = select(&m, "vubd_requests_total", &write).count();
        assert_eq!(per_queue, queues[d], "{id}: one series per queue");
    }
    let b_q1 = [("export", "bravo"), ("queue", "1"), ("op", "write")];
    assert_eq!(sum(&m, "vubd_requests_total", &b_q1), WRITES / 2);
    let bitmap_series: Vec<_> = select(&m, "vubd_bitmap_dirty_bytes", &[]).collect();
    assert_eq!(bitmap_series.len(), 1, "{bitmap_series:?}");
    assert_eq!(bitmap_series[0].1["export"], "m-exp");
    assert_eq!(bitmap_series[0].2 as u64, dirty);
    assert_eq!(sockets_in(dir.path()).len(), 5);

    drop(qmp);
    vubd.stop_ok();
    assert_eq!(
        sockets_in(dir.path()),
        Vec::<PathBuf>::new(),
        "sockets left behind"
    );
    for (d, file) in ["a.raw", "b.raw", "m.raw"].iter().enumerate() {
        apply(&mut models[d], &writes_of(d as u64));
        let content = std::fs::read(dir.join(file)).unwrap();
        assert_same(&content, &models[d], file);
    }
    assert_check_clean(dir.path(), "m.qcow2");
    let stored = nbd_dirty_granules(dir.path(), "m.qcow2", "b0", GRANULE);
    assert_eq!(stored, touched, "b0 as qemu-nbd reads it");
}

#[test]
fn sigterm_with_every_frontend_attached_closes_every_disk_cleanly() {
    let dir = TempDir::new("many-sigterm");
    let mut models = [
        mission(&dir, "m.qcow2", "m.raw", 4),
        vec![0; DISK],
        create_image(&dir.join("r.raw"), DISK, 5),
    ];
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "p.qcow2", "16M"],
    );
    let mut vubd = Proc::vubd(
        &dir,
        &[
            "--disk",
            "image=m.qcow2,format=qcow2,socket=m.sock",
            "--disk",
            "image=p.qcow2,format=qcow2,socket=p.sock,num-queues=2",
            "--disk",
            "image=r.raw,socket=r.sock",
            "--control",
            "qmp.sock",
            "--metrics",
            "unix:metrics.sock",
        ],
        &["m.sock", "p.sock", "r.sock", "qmp.sock", "metrics.sock"],
    );
    let mut qmp = Qmp::connect(&dir.join("qmp.sock"));
    for node in ["disk0", "disk1"] {
        qmp.ok(
            "block-dirty-bitmap-add",
            json!({"node": node, "name": "b0", "persistent": true}),
        );
    }
    // A frontend on every disk, each having written, still attached at SIGTERM; and one more
    // on r.sock stopped in the middle of a message.
    let mut clients = Vec::new();
    for (d, (socket, queues)) in [("m.sock", 1), ("p.sock", 2), ("r.sock", 1)]
        .into_iter()
        .enumerate()
    {
        let socket = dir.join(socket);
        let writes = writes_of(d as u64);
        apply(&mut models[d], &writes);
        let what = socket.display().to_string();
        clients.push(within(&what, move || {
            let mut c = BlkioClient::connect(&socket, queues).expect("libblkio connect");
            for (i, (offset, data)) in writes.iter().enumerate() {
                c.write(i % queues, *offset, data).expect("write");
            }
            c
        }));
    }
    let mut silent = RawConn::connect(&dir.join("r.sock"));
    silent.send_bytes(&header(req::SET_MEM_TABLE, VERSION, 64), &[]);
    assert_eq!(sockets_in(dir.path()).len(), 5);

    vubd.stop_ok();
    assert_eq!(
        sockets_in(dir.path()),
        Vec::<PathBuf>::new(),
        "sockets left behind"
    );
    assert!(
        silent.closed_within(DEADLINE),
        "the silent frontend's connection closed"
    );
    drop(clients);
    for image in ["m.qcow2", "p.qcow2"] {
        assert_check_clean(dir.path(), image);
        let info = info_json(dir.path(), image);
        let bitmaps = &info["format-specific"]["data"]["bitmaps"];
        assert_eq!(bitmaps[0]["name"], "b0", "{image}: {info}");
        let flags = bitmaps[0]["flags"].as_array().unwrap();
        assert!(
            !flags.contains(&json!("in-use")),
            "{image}: b0 stored: {info}"
        );
    }
    let seen = [
        std::fs::read(dir.join("m.raw")).unwrap(),
        qemu_view(dir.path(), "p.qcow2", "qcow2"),
        std::fs::read(dir.join("r.raw")).unwrap(),
    ];
    for (d, content) in seen.iter().enumerate() {
        assert_same(content, &models[d], &format!("disk {d} after SIGTERM"));
    }
}
