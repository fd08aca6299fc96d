//! One qemu-storage-daemon command line with two vhost-user-blk exports — a raw disk, and the
//! mission graph on two queues — run unchanged by vubd and by qemu-storage-daemon (required,
//! as everywhere in this suite): both serve both disks, each on its own socket.

use std::sync::{Arc, Barrier};

use super::*;
use common::blkio_client::BlkioClient;
use common::data::assert_same;
use common::pattern;
use common::qemu::assert_check_clean;

/// The command line, with names relative to the daemon's working directory.
const ARGS: &[&str] = &[
    "--chardev",
    "socket,id=mon,path=qmp.sock,server=on,wait=off",
    "--monitor",
    "chardev=mon",
    "--blockdev",
    "driver=file,node-name=plain-file,filename=plain.raw",
    "--blockdev",
    "driver=raw,node-name=plain,file=plain-file",
    "--blockdev",
    "driver=file,node-name=meta,filename=meta.qcow2",
    "--blockdev",
    "driver=file,node-name=data,filename=data.raw",
    "--blockdev",
    "driver=qcow2,node-name=fmt,file=meta,data-file=data",
    "--export",
    "type=vhost-user-blk,id=exp-plain,node-name=plain,addr.type=unix,addr.path=plain.sock,writable=on",
    "--export",
    "type=vhost-user-blk,id=exp-fmt,node-name=fmt,addr.type=unix,addr.path=fmt.sock,writable=on,num-queues=2",
];

/// The writes made through `socket`'s queue `q`: 16 of 8 KiB, in a region of their own.
fn writes(socket: usize, q: usize) -> Vec<(u64, Vec<u8>)> {
    (0..16u64)
        .map(|k| {
            let offset = (socket as u64 * 2 + q as u64) * MIB + k * 64 * KIB;
            (offset, pattern(8192, (socket * 10 + q) as u64 * 100 + k))
        })
        .collect()
}

/// Run the command line under `program` in a new directory; both exports are served, each
/// queue writes its share from a thread of its own, and the files hold the writes after
/// SIGTERM.
fn serves_both_disks(name: &'static str, program: &str) {
    let dir = TempDir::new(&format!("many-qsd-{}", name.replace(' ', "-")));
    let mut models = [
        create_image(&dir.join("plain.raw"), DISK, 11),
        mission(&dir, "meta.qcow2", "data.raw", 12),
    ];
    let mut daemon = Proc::spawn(
        name,
        program,
        &dir,
        ARGS,
        &["plain.sock", "fmt.sock", "qmp.sock"],
    );
    let mut qmp = Qmp::connect(&dir.join("qmp.sock"));
    let kind = "vhost-user-blk".to_string();
    assert_eq!(
        exports(&mut qmp),
        vec![
            ("exp-fmt".into(), "fmt".into(), kind.clone()),
            ("exp-plain".into(), "plain".into(), kind),
        ],
        "{name}: query-block-exports"
    );

    let sockets = [("plain.sock", 1), ("fmt.sock", 2)];
    let start = Arc::new(Barrier::new(2));
    let loads: Vec<_> = sockets
        .iter()
        .enumerate()
        .map(|(s, &(socket, queues))| {
            let (socket, start) = (dir.join(socket), start.clone());
            std::thread::spawn(move || {
                let mut c = BlkioClient::connect(&socket, queues).expect("libblkio connect");
                start.wait();
                for q in 0..queues {
                    for (offset, data) in writes(s, q) {
                        c.write(q, offset, &data).expect("write");
                    }
                }
                c.flush(0).expect("flush");
                for q in 0..queues {
                    for (offset, data) in writes(s, q) {
                        assert_eq!(c.read(q, offset, data.len()).expect("read"), data);
                    }
                }
            })
        })
        .collect();
    for (load, (socket, _)) in loads.into_iter().zip(sockets) {
        within(&format!("{name}: the load on {socket}"), move || {
            load.join()
        })
        .unwrap_or_else(|_| panic!("{name}: the load on {socket} failed"));
    }
    drop(qmp);
    let (status, stderr) = daemon.stop();
    assert!(status.success(), "{name} exited with {status}: {stderr}");
    for (s, file) in ["plain.raw", "data.raw"].iter().enumerate() {
        for q in 0..sockets[s].1 {
            apply(&mut models[s], &writes(s, q));
        }
        let content = std::fs::read(dir.join(file)).unwrap();
        assert_same(&content, &models[s], &format!("{name}: {file}"));
    }
    assert_check_clean(dir.path(), "meta.qcow2");
}

#[test]
fn two_vhost_user_blk_exports_in_qemu_storage_daemon_syntax_serve_both_disks() {
    serves_both_disks("vubd", vubd_bin());
    // The reference: the same command line means the same to qemu-storage-daemon.
    serves_both_disks("qemu-storage-daemon", "qemu-storage-daemon");
}
