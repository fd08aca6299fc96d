//! The qcow2 driver against QEMU's tools: images QEMU writes read the same through vubd,
//! images vubd writes pass `qemu-img check` and read the same in QEMU.

mod common;

use std::fs;
use std::path::Path;

use common::blkio_client::BlkioClient;
use common::data::assert_same;
use common::qemu::{assert_check_clean, info_json, qemu_img, qemu_io, qemu_view, try_run_in};
use common::{pattern, TempDir, Vubd};

const MIB: usize = 1 << 20;

/// A raw source disk: pattern data with zero stretches, so that conversion leaves holes.
fn source_disk(dir: &Path, name: &str, size: usize, seed: u64) -> Vec<u8> {
    let mut data = pattern(size, seed);
    for hole in (0..size).step_by(3 * MIB / 2) {
        let end = (hole + 256 * 1024).min(size);
        data[hole..end].fill(0);
    }
    fs::write(dir.join(name), &data).unwrap();
    data
}

/// Serve `image` with vubd and check that it reads exactly what QEMU reads.
fn assert_vubd_reads_like_qemu(dir: &TempDir, image: &str, extra: &[&str]) {
    let expected = qemu_view(dir.path(), image, "qcow2");
    let path = dir.join(image);
    let mut args = vec![
        "--image",
        path.to_str().unwrap(),
        "--format",
        "qcow2",
        "--readonly",
    ];
    args.extend_from_slice(extra);
    let mut vubd = Vubd::start(&dir.join(&format!("{image}.sock")), &args);
    let mut client = BlkioClient::connect_with(&vubd.socket, 1, true).unwrap();
    assert_eq!(client.capacity() as usize, expected.len(), "{image}: size");
    let got = client
        .read_all(0, expected.len())
        .expect("read through vubd");
    assert_same(&got, &expected, image);
    drop(client);
    vubd.stop();
}

#[test]
fn images_written_by_qemu_read_the_same_through_vubd() {
    let dir = TempDir::new("qcow2-read");
    let size = 6 * MIB;
    source_disk(dir.path(), "src.raw", size, 1);
    let variants: &[(&str, &[&str])] = &[
        ("c512.qcow2", &["-o", "cluster_size=512"]),
        ("c64k.qcow2", &["-o", "cluster_size=65536"]),
        ("c2m.qcow2", &["-o", "cluster_size=2M"]),
        ("v2.qcow2", &["-o", "compat=0.10"]),
        ("rc1.qcow2", &["-o", "refcount_bits=1,cluster_size=4096"]),
        ("rc64.qcow2", &["-o", "refcount_bits=64"]),
        ("zlib.qcow2", &["-c"]),
        ("zstd.qcow2", &["-c", "-o", "compression_type=zstd"]),
    ];
    for (name, opts) in variants {
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&["src.raw", name]);
        qemu_img(dir.path(), &args);
        assert_vubd_reads_like_qemu(&dir, name, &[]);
    }
}

#[test]
fn backing_chains_and_zero_clusters_read_like_qemu() {
    let dir = TempDir::new("qcow2-backing");
    let size = 4 * MIB;
    source_disk(dir.path(), "src.raw", size, 2);
    qemu_img(
        dir.path(),
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "src.raw",
            "base.qcow2",
        ],
    );
    qemu_img(
        dir.path(),
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "top.qcow2",
        ],
    );
    qemu_io(
        dir.path(),
        "qcow2",
        "top.qcow2",
        &[
            "write -P 0xab 4096 8192".into(),
            "write -P 0xcd 1000448 70000".into(),
            "write -z 2097152 65536".into(),
            "discard 3145728 4096".into(),
        ],
    );
    assert_vubd_reads_like_qemu(&dir, "top.qcow2", &[]);
    // A raw backing file.
    qemu_img(
        dir.path(),
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "src.raw",
            "-F",
            "raw",
            "over-raw.qcow2",
        ],
    );
    qemu_io(
        dir.path(),
        "qcow2",
        "over-raw.qcow2",
        &["write -P 0x11 65536 65536".into()],
    );
    assert_vubd_reads_like_qemu(&dir, "over-raw.qcow2", &[]);
}

#[test]
fn raw_data_file_images_made_by_qemu_read_the_same() {
    let dir = TempDir::new("qcow2-datafile");
    qemu_img(
        dir.path(),
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=d.raw,data_file_raw=on",
            "m.qcow2",
            "8M",
        ],
    );
    qemu_io(
        dir.path(),
        "qcow2",
        "m.qcow2",
        &[
            "write -P 0x5a 0 1M".into(),
            "write -P 0x33 7340032 65536".into(),
        ],
    );
    assert_vubd_reads_like_qemu(&dir, "m.qcow2", &[]);
    // Without data_file_raw.
    qemu_img(
        dir.path(),
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=e.raw",
            "n.qcow2",
            "8M",
        ],
    );
    qemu_io(
        dir.path(),
        "qcow2",
        "n.qcow2",
        &["write -P 0x77 4096 1M".into()],
    );
    assert_vubd_reads_like_qemu(&dir, "n.qcow2", &[]);
}

/// A deterministic random workload of writes, write-zeroes and discards through vubd, kept in
/// `model` (the expected guest view). Discarded ranges may read back as their old data or as
/// zeroes, sector by sector; the model takes whatever vubd returns after checking that.
fn run_workload(client: &mut BlkioClient, model: &mut [u8], seed: u64, ops: usize) {
    let size = model.len() as u64;
    let mut rng = pattern(ops * 16, seed).into_iter();
    let mut next = |n: u64| -> u64 {
        let v = (0..4).fold(0u64, |acc, _| {
            (acc << 8) | u64::from(rng.next().unwrap_or(7))
        });
        v % n
    };
    for i in 0..ops {
        let sectors = 1 + next(512);
        let len = (sectors * 512).min(size);
        let offset = next((size - len) / 512 + 1) * 512;
        let (o, l) = (offset as usize, len as usize);
        match next(10) {
            0..=5 => {
                let data = pattern(l, seed * 1000 + i as u64);
                client.write(0, offset, &data).expect("write");
                model[o..o + l].copy_from_slice(&data);
            }
            6 | 7 => {
                client
                    .write_zeroes(0, offset, len, i % 2 == 0)
                    .expect("write zeroes");
                model[o..o + l].fill(0);
            }
            _ => {
                client.discard(0, offset, len).expect("discard");
                let got = client.read(0, offset, l).expect("read after discard");
                for (s, (g, m)) in got.chunks(512).zip(model[o..o + l].chunks(512)).enumerate() {
                    assert!(
                        g == m || g.iter().all(|b| *b == 0),
                        "discarded sector {} reads neither old data nor zeroes",
                        offset / 512 + s as u64
                    );
                }
                model[o..o + l].copy_from_slice(&got);
            }
        }
        if i % 50 == 49 {
            client.flush(0).expect("flush");
        }
    }
    client.flush(0).expect("flush");
}

/// Serve `image` (qcow2) read-write, run the workload, stop, and hold QEMU to the result:
/// `qemu-img check` clean and `qemu-img compare` identical to the model.
fn workload_then_qemu_agrees(dir: &TempDir, image: &str, seed: u64, extra: &[&str]) -> Vec<u8> {
    let mut model = qemu_view(dir.path(), image, "qcow2");
    let path = dir.join(image);
    let mut args = vec!["--image", path.to_str().unwrap(), "--format", "qcow2"];
    args.extend_from_slice(extra);
    let mut vubd = Vubd::start(&dir.join(&format!("{image}.sock")), &args);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    run_workload(&mut client, &mut model, seed, 400);
    assert_same(
        &client.read_all(0, model.len()).expect("read through vubd"),
        &model,
        "read back through vubd",
    );
    drop(client);
    vubd.stop();
    assert_check_clean(dir.path(), image);
    let expected = format!("{image}.expected.raw");
    fs::write(dir.join(&expected), &model).unwrap();
    let (code, out) = try_run_in(
        dir.path(),
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", image, &expected],
    );
    assert_eq!(code, 0, "qemu-img compare {image}: {out}");
    model
}

#[test]
fn workloads_on_qcow2_images_leave_them_clean_and_identical() {
    let dir = TempDir::new("qcow2-write");
    let variants: &[(&str, &[&str])] = &[
        ("plain.qcow2", &[]),
        ("small.qcow2", &["-o", "cluster_size=512,refcount_bits=64"]),
        ("rc1.qcow2", &["-o", "cluster_size=4096,refcount_bits=1"]),
        ("v2.qcow2", &["-o", "compat=0.10"]),
    ];
    for (i, (name, opts)) in variants.iter().enumerate() {
        let mut args = vec!["create", "-f", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[name, "16M"]);
        qemu_img(dir.path(), &args);
        workload_then_qemu_agrees(&dir, name, 10 + i as u64, &[]);
    }
}

#[test]
fn workloads_on_images_with_internal_snapshots_keep_the_snapshots() {
    let dir = TempDir::new("qcow2-snap");
    source_disk(dir.path(), "src.raw", 8 * MIB, 4);
    qemu_img(
        dir.path(),
        &["convert", "-f", "raw", "-O", "qcow2", "src.raw", "s.qcow2"],
    );
    qemu_img(dir.path(), &["snapshot", "-c", "before", "s.qcow2"]);
    workload_then_qemu_agrees(&dir, "s.qcow2", 40, &[]);
    // The snapshot still holds the original data: shared clusters were copied on write.
    qemu_img(dir.path(), &["snapshot", "-a", "before", "s.qcow2"]);
    assert_check_clean(dir.path(), "s.qcow2");
    assert_same(
        &qemu_view(dir.path(), "s.qcow2", "qcow2"),
        &fs::read(dir.join("src.raw")).unwrap(),
        "snapshot content",
    );
}

#[test]
fn workloads_over_backing_files_and_compressed_clusters() {
    let dir = TempDir::new("qcow2-cow");
    source_disk(dir.path(), "src.raw", 16 * MIB, 3);
    qemu_img(
        dir.path(),
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-c",
            "src.raw",
            "compressed.qcow2",
        ],
    );
    workload_then_qemu_agrees(&dir, "compressed.qcow2", 20, &[]);
    qemu_img(
        dir.path(),
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "src.raw",
            "base.qcow2",
        ],
    );
    qemu_img(
        dir.path(),
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    workload_then_qemu_agrees(&dir, "top.qcow2", 21, &[]);
    // The backing file is never written.
    assert_check_clean(dir.path(), "base.qcow2");
    let base = qemu_view(dir.path(), "base.qcow2", "qcow2");
    assert_same(
        &base,
        &fs::read(dir.join("src.raw")).unwrap(),
        "backing file content",
    );
}

#[test]
fn workloads_on_raw_data_files_keep_the_raw_file_the_disk() {
    let dir = TempDir::new("qcow2-rawdata");
    qemu_img(
        dir.path(),
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=d.raw,data_file_raw=on",
            "m.qcow2",
            "16M",
        ],
    );
    let model = workload_then_qemu_agrees(&dir, "m.qcow2", 30, &[]);
    // The raw file alone is the disk, byte for byte.
    assert_same(
        &fs::read(dir.join("d.raw")).unwrap(),
        &model,
        "raw data file",
    );
    let info = info_json(dir.path(), "m.qcow2");
    assert_eq!(
        info["format-specific"]["data"]["data-file-raw"], true,
        "{info}"
    );
    // An external data file without data_file_raw.
    qemu_img(
        dir.path(),
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=e.raw",
            "n.qcow2",
            "16M",
        ],
    );
    workload_then_qemu_agrees(&dir, "n.qcow2", 31, &[]);
}
