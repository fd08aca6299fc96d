//! Sharing images with qemu-storage-daemon: vubd runs its command line unchanged, images go back
//! and forth between the two and read the same, and image locks keep QEMU's tools and other
//! vubd processes off an image in use.

mod common;

use std::fs;
use std::path::Path;

use common::blkio_client::BlkioClient;
use common::cli::{run_vubd, serve_qcow2_fails};
use common::data::assert_same;
use common::qemu::{assert_check_clean, qemu_img, try_run_in};
use common::qsd::{Daemon, Export};
use common::{pattern, raw_with_metadata, TempDir, Vubd};

const MIB: usize = 1 << 20;

/// The qemu-storage-daemon command line exporting `image` (over `data` when given) in `dir`.
fn qsd_export(dir: &TempDir, image: &str, data: Option<&str>, socket: &Path) -> Export {
    let data = data.map(|d| dir.join(d));
    Export::new(&dir.join(image), data.as_deref(), socket).iothread()
}

#[test]
fn images_go_back_and_forth_with_qemu_storage_daemon() {
    let dir = TempDir::new("interop");
    let disk = dir.join("disk.raw");
    let mut model = raw_with_metadata(&dir, 16 * MIB, 12);
    qemu_img(dir.path(), &["create", "-f", "qcow2", "plain.qcow2", "16M"]);
    let mut plain_model = vec![0u8; 16 * MIB];

    // vubd writes, using exactly the qemu-storage-daemon command line.
    let sock = dir.join("vubd.sock");
    for (image, data, m) in [
        ("meta.qcow2", Some("disk.raw"), &mut model),
        ("plain.qcow2", None, &mut plain_model),
    ] {
        let vubd = Daemon::vubd(dir.path(), &qsd_export(&dir, image, data, &sock));
        let mut client = BlkioClient::connect(&sock, 1).unwrap();
        for i in 0..20u64 {
            let data = pattern(4096 * (1 + i as usize % 16), 100 + i);
            let offset = (i * 777 * 4096) % (15 * MIB as u64);
            client.write(0, offset, &data).unwrap();
            m[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        }
        drop(client);
        let (status, stderr) = vubd.stop();
        assert!(status.success(), "{status}: {stderr}");
        assert_check_clean(dir.path(), image);
    }

    // qemu-storage-daemon reads what vubd wrote, then writes some more.
    let qsock = dir.join("qsd.sock");
    for (image, data, m) in [
        ("meta.qcow2", Some("disk.raw"), &mut model),
        ("plain.qcow2", None, &mut plain_model),
    ] {
        let qsd = Daemon::qsd(dir.path(), &qsd_export(&dir, image, data, &qsock));
        let mut client = BlkioClient::connect(&qsock, 1).unwrap();
        assert_same(
            &client.read_all(0, m.len()).unwrap(),
            m,
            &format!("{image}: qemu-storage-daemon reads what vubd wrote"),
        );
        let data = pattern(3 * 65536, 77);
        client.write(0, 5 * MIB as u64 + 4096, &data).unwrap();
        m[5 * MIB + 4096..5 * MIB + 4096 + data.len()].copy_from_slice(&data);
        drop(client);
        drop(qsd);
    }

    // vubd reads what qemu-storage-daemon wrote.
    for (image, m) in [("meta.qcow2", &model), ("plain.qcow2", &plain_model)] {
        let path = dir.join(image);
        let mut vubd = Vubd::start(
            &sock,
            &[
                "--image",
                path.to_str().unwrap(),
                "--format",
                "qcow2",
                "--readonly",
            ],
        );
        let mut client = BlkioClient::connect_with(&vubd.socket, 1, true).unwrap();
        assert_same(
            &client.read_all(0, m.len()).unwrap(),
            m,
            &format!("{image}: vubd reads what qemu-storage-daemon wrote"),
        );
        drop(client);
        vubd.stop();
    }
    assert!(
        fs::read(&disk).unwrap() == model,
        "the raw data file is the disk"
    );
}

#[test]
fn images_are_locked_against_qemu_and_other_vubd_processes() {
    let dir = TempDir::new("locking");
    raw_with_metadata(&dir, 16 * MIB, 13);
    let meta = dir.join("meta.qcow2");
    let meta_s = meta.to_str().unwrap();
    let in_use = |out: &str| out.contains("in use by another process");

    // vubd writes: QEMU's tools and other vubd processes keep off both files.
    let mut vubd = Vubd::start(
        &dir.join("a.sock"),
        &["--image", meta_s, "--format", "qcow2"],
    );
    let (code, out) = try_run_in(dir.path(), "qemu-img", &["info", "meta.qcow2"]);
    assert!(code != 0 && out.contains("lock"), "qemu-img info: {out}");
    let (code, out) = try_run_in(
        dir.path(),
        "qemu-io",
        &["-f", "raw", "-c", "write 0 4k", "disk.raw"],
    );
    assert!(
        code != 0 && out.contains("lock"),
        "qemu-io on the data file: {out}"
    );
    let out = serve_qcow2_fails(&dir, &meta, &[]);
    assert!(in_use(&out), "a second vubd: {out}");
    let (code, _, out) = run_vubd(&["bitmap", meta_s, "add", "b"]);
    assert!(code != 0 && in_use(&out), "bitmap add: {out}");
    let (code, _, out) = run_vubd(&["bitmap", meta_s, "-U", "add", "b"]);
    assert!(
        code != 0 && out.contains("only goes with list and dump"),
        "{out}"
    );
    let (code, _, out) = run_vubd(&["check", meta_s]);
    assert!(code != 0 && in_use(&out), "check: {out}");
    // Read-only looks are allowed when asked for.
    let (code, out) = try_run_in(dir.path(), "qemu-img", &["info", "-U", "meta.qcow2"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(run_vubd(&["check", "-U", meta_s]).0, 0);
    assert_eq!(run_vubd(&["bitmap", meta_s, "list", "-U"]).0, 0);
    vubd.stop();
    // Released on exit.
    qemu_img(dir.path(), &["info", "meta.qcow2"]);

    // Readers share with readers.
    let ro = ["--image", meta_s, "--format", "qcow2", "--readonly"];
    let mut first = Vubd::start(&dir.join("r1.sock"), &ro);
    let mut second = Vubd::start(&dir.join("r2.sock"), &ro);
    qemu_img(dir.path(), &["info", "meta.qcow2"]);
    let out = serve_qcow2_fails(&dir, &meta, &[]);
    assert!(in_use(&out), "a writer next to readers: {out}");
    first.stop();
    second.stop();

    // qemu-storage-daemon writes: vubd refuses, unless told not to lock.
    let sock = dir.join("qsd.sock");
    let qsd = Daemon::qsd(
        dir.path(),
        &qsd_export(&dir, "meta.qcow2", Some("disk.raw"), &sock),
    );
    let out = serve_qcow2_fails(&dir, &meta, &[]);
    assert!(in_use(&out), "vubd next to qemu-storage-daemon: {out}");
    let mut unlocked = Vubd::start(
        &dir.join("u.sock"),
        &[
            "--image",
            meta_s,
            "--format",
            "qcow2",
            "--readonly",
            "--locking",
            "off",
        ],
    );
    unlocked.stop();
    drop(qsd);
    assert_check_clean(dir.path(), "meta.qcow2");
}

/// Block status (what NBD's `base:allocation` reports) against `qemu-img map`: data,
/// zero clusters and unallocated ones, through a backing file, and a raw file's holes.
#[test]
fn block_status_agrees_with_qemu_img_map() {
    use common::qemu::qemu_io;
    use vubd::block::{open_image, Allocation, Format, OpenOptions};
    let dir = TempDir::new("block-status");
    let c = 65536usize;
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"],
    );
    qemu_io(
        dir.path(),
        "qcow2",
        "base.qcow2",
        &[format!("write -P 1 0 {}", 3 * c)],
    );
    qemu_img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "1M",
        ],
    );
    qemu_io(
        dir.path(),
        "qcow2",
        "top.qcow2",
        &[
            format!("write -P 2 {} {}", 5 * c, c),
            format!("write -z {} {}", c, c),
            format!("write -z {} {}", 8 * c, 2 * c),
        ],
    );
    fs::write(dir.join("sparse.raw"), b"").unwrap();
    let f = fs::OpenOptions::new()
        .write(true)
        .open(dir.join("sparse.raw"))
        .unwrap();
    f.set_len(1 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 8192], 4 * c as u64).unwrap();
    for (image, format) in [("top.qcow2", Format::Qcow2), ("sparse.raw", Format::Raw)] {
        let map = qemu_img(
            dir.path(),
            &[
                "map",
                "--output=json",
                "-f",
                if format == Format::Raw {
                    "raw"
                } else {
                    "qcow2"
                },
                image,
            ],
        );
        let map: serde_json::Value = serde_json::from_str(&map).unwrap();
        let node = open_image(
            &dir.join(image),
            format,
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut offset = 0u64;
        while offset < node.size() {
            let (len, allocation) = node.block_status(offset, node.size() - offset).unwrap();
            assert!(len > 0);
            let entry = map
                .as_array()
                .unwrap()
                .iter()
                .find(|e| {
                    let s = e["start"].as_u64().unwrap();
                    s <= offset && offset < s + e["length"].as_u64().unwrap()
                })
                .unwrap();
            let expected_data = entry["data"].as_bool().unwrap();
            assert_eq!(
                allocation == Allocation::Data,
                expected_data,
                "{image} at {offset:#x}: vubd says {allocation:?}, qemu-img map {entry}"
            );
            if !expected_data {
                assert!(entry["zero"].as_bool().unwrap(), "{entry}");
            }
            // vubd's run never crosses a change qemu-img reports.
            let end = entry["start"].as_u64().unwrap() + entry["length"].as_u64().unwrap();
            assert!(
                offset + len <= end || allocation == Allocation::Data && expected_data,
                "{image}: run {offset:#x}+{len:#x} crosses qemu-img's boundary {end:#x}"
            );
            offset += len;
        }
    }
}
