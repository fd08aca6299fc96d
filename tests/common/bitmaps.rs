//! Dirty bitmap test support: deterministic guest workloads, the granules they touch, and the
//! bitmaps stored in `meta.qcow2` read back by vubd and, independently, by qemu-nbd + nbdinfo.
//! Every bitmap test works on the layout of [`super::raw_with_metadata`] in a scratch directory.

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::blkio_client::BlkioClient;
use super::cli::vubd_ok;
use super::qsd::Export;
use super::{pattern, TempDir, Vubd};

/// One guest operation of a workload.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    Write,
    Zeroes,
    Discard,
}

/// A deterministic workload of `n` operations within `size` bytes.
pub fn workload(n: usize, size: u64, seed: u64) -> Vec<(Op, u64, u64)> {
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

/// Run `ops` on queue 0, each write with its own data.
pub fn run_ops(client: &mut BlkioClient, ops: &[(Op, u64, u64)]) {
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
pub fn granules(ops: &[(Op, u64, u64)], granularity: u64) -> BTreeSet<u64> {
    ops.iter()
        .flat_map(|&(_, offset, len)| offset / granularity..=(offset + len - 1) / granularity)
        .collect()
}

/// The dirty granules of bitmap `name`, read by QEMU's NBD server and libnbd's nbdinfo.
pub fn nbd_dirty_granules(dir: &Path, image: &str, name: &str, granularity: u64) -> BTreeSet<u64> {
    nbd_dirty_granules_of(dir, &["-f", "qcow2", image], name, granularity)
}

/// [`nbd_dirty_granules`] of the image `image_args` name to qemu-nbd (`-f FORMAT FILE`, or
/// `--image-opts OPTIONS`).
pub fn nbd_dirty_granules_of(
    dir: &Path,
    image_args: &[&str],
    name: &str,
    granularity: u64,
) -> BTreeSet<u64> {
    let sock = dir.join(format!("nbd-{name}.sock"));
    let _ = fs::remove_file(&sock);
    let mut server = Command::new("qemu-nbd")
        .current_dir(dir)
        .args(["-r", "-t", "-B", name, "-k"])
        .arg(&sock)
        .args(image_args)
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-nbd");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        if let Ok(Some(status)) = server.try_wait() {
            let mut err = String::new();
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
pub fn vubd_bitmap(dir: &TempDir, args: &[&str]) -> String {
    let image = dir.join("meta.qcow2");
    let mut full = vec!["bitmap", image.to_str().expect("utf-8 path")];
    full.extend_from_slice(args);
    vubd_ok(&full)
}

/// The dirty granules of bitmap `name` in `dir`'s `meta.qcow2`, from `vubd bitmap dump --json`.
pub fn dumped_granules(dir: &TempDir, name: &str, granularity: u64) -> BTreeSet<u64> {
    let dump = vubd_bitmap(dir, &["dump", name, "--json"]);
    let dump: Value = serde_json::from_str(&dump).expect("bitmap dump JSON");
    let mut dirty = BTreeSet::new();
    for e in dump["extents"].as_array().expect("extents") {
        let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        dirty.extend(o / granularity..(o + l).div_ceil(granularity));
    }
    dirty
}

/// Serve `meta.qcow2` in `dir` on `vubd.sock` with `extra` options.
pub fn serve_meta(dir: &TempDir, extra: &[&str]) -> Vubd {
    let image = dir.join("meta.qcow2");
    let mut args = vec!["--image", image.to_str().unwrap(), "--format", "qcow2"];
    args.extend_from_slice(extra);
    Vubd::start(&dir.join("vubd.sock"), &args)
}

/// The qemu-storage-daemon command line for the test image, which vubd also runs unchanged.
pub fn qsd_export(dir: &TempDir) -> Export {
    Export::new(
        &dir.join("meta.qcow2"),
        Some(&dir.join("disk.raw")),
        &dir.join("qsd.sock"),
    )
    .monitor(&dir.join("qsd-qmp.sock"))
    .discard_unmap()
}
