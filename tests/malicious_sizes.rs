//! Malicious qcow2 images, part 2: sizes an image claims. Every size taken from an image is
//! bounded (by QEMU's limits and by the file) before it is used: the commands run here under
//! an address-space limit far below what the claimed sizes would take, and must end with a
//! one-line error or a report, never an abort, a panic or a hang.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::blkio_client::BlkioClient;
use common::cli::one_line_error;
use common::image::{
    be32_at, both_repair_alike, crashed, first_bitmap_entry, patch, vubd_limited, Layout,
};
use common::qemu::qemu_img;
use common::{pattern, TempDir, Vubd};

/// Far below what any of the claimed sizes needs, far above what vubd needs for these images.
const LIMIT: u64 = 768 << 20;

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `vubd serve` of `image` under the limit, expected to fail: its one-line error.
fn serve_refused(dir: &TempDir, image: &Path) -> String {
    let socket = dir.join("s.sock");
    let (code, _, stderr) = vubd_limited(
        LIMIT,
        &[
            "serve",
            "--socket",
            path_str(&socket),
            "--image",
            path_str(image),
            "--format",
            "qcow2",
        ],
    );
    assert_eq!(code, 1, "serve must refuse cleanly: {stderr}");
    one_line_error(&stderr).to_string()
}

#[test]
fn check_stays_bounded_when_every_refcount_table_entry_names_one_block() {
    let dir = TempDir::new("size-refblocks");
    let image = dir.join("m.qcow2");
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "m.qcow2", "16M"],
    );
    let layout = Layout::of(&image);
    // 8192 table entries, each naming the one refcount block: the table claims to describe
    // 2^28 clusters, none of which exist.
    let block = layout.first_refblock(&image).to_be_bytes();
    let table: Vec<u8> = (0..layout.cluster_size() / 8).flat_map(|_| block).collect();
    patch(&image, layout.reftable_offset, &table);

    let (code, out, err) = vubd_limited(LIMIT, &["check", path_str(&image)]);
    assert!(!crashed(code, &err), "check: {code} {err}");
    assert_eq!(code, 2, "the shared block is an error: {out}{err}");
    assert!(out.contains("refcount block"), "{out}");
    // Repair rebuilds the structure, as qemu-img check -r all does.
    let (code, out, err) = vubd_limited(
        LIMIT,
        &["check", "--repair", path_str(&dir.join("m.qcow2"))],
    );
    assert!(!crashed(code, &err), "repair: {code} {err}");
    assert!(code == 0 || code == 3, "{out}{err}");
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "n.qcow2", "16M"],
    );
    patch(&dir.join("n.qcow2"), layout.reftable_offset, &table);
    both_repair_alike(&dir, "n.qcow2");
}

#[test]
fn a_bitmap_table_size_of_2_to_the_32_is_refused_without_allocating_it() {
    let dir = TempDir::new("size-bitmap-table");
    let image = dir.join("m.qcow2");
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "m.qcow2", "16M"],
    );
    qemu_img(dir.path(), &["bitmap", "--add", "m.qcow2", "b0"]);
    let entry = first_bitmap_entry(&image);
    patch(&image, entry + 8, &u32::MAX.to_be_bytes());

    let (code, _, err) = vubd_limited(LIMIT, &["check", path_str(&image)]);
    assert!(!crashed(code, &err), "check: {code} {err}");
    let (code, _, err) = vubd_limited(LIMIT, &["bitmap", path_str(&image), "list"]);
    assert_eq!(code, 1, "{err}");
    assert!(one_line_error(&err).contains("b0"), "{err}");
    let err = serve_refused(&dir, &image);
    assert!(err.contains("bitmap"), "{err}");
}

#[test]
fn an_in_use_bitmap_beyond_qemus_size_limit_is_refused_without_allocating_it() {
    let dir = TempDir::new("size-bitmap-data");
    let image = dir.join("m.qcow2");
    // 4 TiB at 512-byte granularity would be 1 GiB of bits; QEMU's limit is 512 MiB.
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "m.qcow2", "4T"],
    );
    qemu_img(dir.path(), &["bitmap", "--add", "m.qcow2", "b0"]);
    let entry = first_bitmap_entry(&image);
    let table_entries = ((4u64 << 40) / 512 / 8).div_ceil(65536) as u32;
    patch(&image, entry + 8, &table_entries.to_be_bytes());
    patch(&image, entry + 17, &[9]);
    let flags = be32_at(&image, entry + 12) | 1;
    patch(&image, entry + 12, &flags.to_be_bytes());

    let (code, _, err) = vubd_limited(LIMIT, &["bitmap", path_str(&image), "list"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        one_line_error(&err).contains("bitmap 'b0' is too large"),
        "{err}"
    );
    let err = serve_refused(&dir, &image);
    assert!(err.contains("too large"), "{err}");
    let (code, _, err) = vubd_limited(LIMIT, &["check", path_str(&image)]);
    assert!(!crashed(code, &err), "check: {code} {err}");
}

#[test]
fn more_snapshots_than_qemu_allows_are_refused() {
    let dir = TempDir::new("size-snapshots");
    let image = dir.join("m.qcow2");
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "m.qcow2", "16M"],
    );
    patch(&image, 60, &u32::MAX.to_be_bytes());
    patch(&image, 64, &(1u64 << 16).to_be_bytes());
    let err = serve_refused(&dir, &image);
    assert!(err.contains("snapshots exceed the limit of 65536"), "{err}");
    let (code, out, err) = vubd_limited(LIMIT, &["check", path_str(&image)]);
    assert!(!crashed(code, &err), "check: {code} {out}{err}");
}

#[test]
fn a_raw_data_file_disk_of_an_exabyte_is_served_with_little_memory() {
    // tmpfs holds a sparse file of an exabyte; the image's L1 table is 16 MiB.
    let dir = TempDir::new_in(Path::new("/dev/shm"), "size-exabyte");
    let image = dir.join("m.qcow2");
    qemu_img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M,data_file=d.raw",
            "m.qcow2",
            "1E",
        ],
    );
    let ok = Command::new("truncate")
        .args(["-s", "1E", path_str(&dir.join("d.raw"))])
        .status()
        .unwrap();
    assert!(ok.success());
    // data_file_raw (qemu-img would preallocate every L2 table for it: 2^19 of them).
    let autoclear = u64::from_be_bytes(common::image::read_at(&image, 88, 8).try_into().unwrap());
    patch(&image, 88, &(autoclear | 2).to_be_bytes());

    let limit = format!("--as={LIMIT}");
    let mut vubd = Vubd::start_wrapped(
        &["prlimit", &limit],
        &dir.join("s.sock"),
        &["--image", path_str(&image), "--format", "qcow2"],
    );
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    assert_eq!(client.capacity(), 1 << 60);
    let data = pattern(65536, 5);
    for offset in [0, 1 << 40, (1 << 60) - 65536] {
        client.write(0, offset, &data).unwrap();
        assert_eq!(client.read(0, offset, data.len()).unwrap(), data);
    }
    drop(client);
    vubd.stop();
}

#[test]
fn header_extension_parsing_is_linear() {
    let dir = TempDir::new("size-extensions");
    let image = dir.join("m.qcow2");
    qemu_img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M",
            "m.qcow2",
            "64M",
        ],
    );
    // Fill the 2 MiB header cluster with empty extensions of distinct (unknown) types: 2^18 of
    // them. A duplicate check that scans what was parsed takes ~2^35 steps here.
    let start = u64::from(be32_at(&image, 100));
    let count = ((2 << 20) - start - 8) / 8;
    let mut bytes = Vec::with_capacity((count * 8 + 8) as usize);
    for i in 0..count as u32 {
        bytes.extend_from_slice(&(0x4000_0000 + i).to_be_bytes());
        bytes.extend_from_slice(&0u32.to_be_bytes());
    }
    bytes.extend_from_slice(&[0; 8]);
    patch(&image, start, &bytes);
    // A hang guard, not a benchmark: linear parsing takes well under a second even in a debug
    // build; quadratic parsing takes minutes.
    let started = Instant::now();
    let (code, out, err) = vubd_limited(LIMIT, &["check", path_str(&image)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let mut vubd = Vubd::start(
        &dir.join("s.sock"),
        &[
            "--image",
            path_str(&image),
            "--format",
            "qcow2",
            "--readonly",
        ],
    );
    vubd.stop();
}

#[test]
fn check_of_a_sparse_image_file_of_terabytes_costs_what_it_uses() {
    let dir = TempDir::new("size-sparse");
    let image = dir.join("m.qcow2");
    qemu_img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "m.qcow2",
            "1M",
        ],
    );
    common::qemu::qemu_io(dir.path(), "qcow2", "m.qcow2", &["write -P 7 0 4k".into()]);
    let layout = Layout::of(&image);
    // Guest cluster 0 moves to 2 TiB (a guest write there would grow the file so): 2^29
    // clusters of file, one of them in use.
    let far: u64 = 2 << 40;
    let entry = layout.l2_entry(&image, 0);
    patch(&image, entry, &((1u64 << 63) | far).to_be_bytes());
    patch(&image, far, &[7u8; 4096]);
    assert_eq!(std::fs::metadata(&image).unwrap().len(), far + 4096);

    let started = Instant::now();
    let (code, out, err) = vubd_limited(LIMIT, &["check", path_str(&image)]);
    assert!(!crashed(code, &err), "check: {code} {err}");
    assert_eq!(code, 2, "a cluster in use with no refcount: {out}{err}");
    assert!(out.contains("refcount=0 reference=1"), "{out}");
    // Repair rebuilds the refcounts with blocks only where clusters are in use.
    let (code, out, err) = vubd_limited(LIMIT, &["check", "--repair", path_str(&image)]);
    assert!(!crashed(code, &err), "repair: {code} {err}");
    assert!(code == 0 || code == 3, "{out}{err}");
    let (code, out, err) = vubd_limited(LIMIT, &["check", path_str(&image)]);
    assert_eq!(code, 0, "{out}{err}");
    // What the guest sees is intact.
    common::qemu::qemu_io(dir.path(), "qcow2", "m.qcow2", &["read -P 7 0 4k".into()]);
    eprintln!(
        "check, repair and check of a 2 TiB sparse file: {:?}",
        started.elapsed()
    );
}
