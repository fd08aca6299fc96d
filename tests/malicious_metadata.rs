//! Malicious qcow2 images, part 1: metadata that lets a guest (or the allocator) write over
//! other metadata. Each image is made by qemu-img, then one field is patched; QEMU's own tools
//! are the oracle for what a repair must achieve.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::blkio_client::BlkioClient;
use common::cli::serve_qcow2_fails;
use common::image::{be64_at, both_repair_alike, patch, read_at, Layout};
use common::qemu::{info_json, qemu_img, qemu_io, try_run_in};
use common::{pattern, TempDir, Vubd};

const COPIED: u64 = 1 << 63;
const MAGIC: [u8; 4] = [b'Q', b'F', b'I', 0xfb];

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn serve_rw(dir: &TempDir, image: &Path) -> Vubd {
    Vubd::start(
        &dir.join("s.sock"),
        &["--image", path_str(image), "--format", "qcow2"],
    )
}

/// Write `writes` (offset, seed) of 64 KiB each through vubd, read them back, and stop vubd.
fn guest_writes(dir: &TempDir, image: &Path, writes: &[(u64, u64)]) -> Vec<(u64, Vec<u8>)> {
    let mut vubd = serve_rw(dir, image);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    let mut written = Vec::new();
    for &(offset, seed) in writes {
        let data = pattern(65536, seed);
        client.write(0, offset, &data).unwrap();
        written.push((offset, data));
    }
    for (offset, data) in &written {
        assert_eq!(&client.read(0, *offset, data.len()).unwrap(), data);
    }
    client.flush(0).unwrap();
    drop(client);
    vubd.stop();
    written
}

#[test]
fn a_refcount_table_without_entry_0_never_gets_a_block_on_the_header() {
    let dir = TempDir::new("evil-reftable0");
    let image = dir.join("m.qcow2");
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "m.qcow2", "16M"],
    );
    let layout = Layout::of(&image);
    patch(&image, layout.reftable_entry(0), &0u64.to_be_bytes());
    let header = read_at(&image, 0, 104);

    let written = guest_writes(&dir, &image, &[(0, 1), (1 << 20, 2), (5 << 20, 3)]);
    // The header is as it was, apart from refcount table fields a table move may change.
    let after = read_at(&image, 0, 104);
    assert_eq!(after[..48], header[..48], "header untouched");
    assert_eq!(after[60..], header[60..]);
    assert_eq!(info_json(dir.path(), "m.qcow2")["format"], "qcow2");

    let view = both_repair_alike(&dir, "m.qcow2");
    for (offset, data) in &written {
        assert_eq!(&view[*offset as usize..*offset as usize + data.len()], data);
    }
}

#[test]
fn a_zero_refcount_for_the_header_never_gives_it_to_a_guest_write() {
    let dir = TempDir::new("evil-refcount0");
    let image = dir.join("m.qcow2");
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "m.qcow2", "16M"],
    );
    let layout = Layout::of(&image);
    // The refcount of cluster 0 (the header) says free.
    patch(&image, layout.first_refblock(&image), &0u16.to_be_bytes());

    let writes: Vec<(u64, u64)> = (0..8).map(|i| (i << 20, 10 + i)).collect();
    let written = guest_writes(&dir, &image, &writes);
    assert_eq!(read_at(&image, 0, 4), MAGIC, "the header is still a header");
    assert_eq!(info_json(dir.path(), "m.qcow2")["format"], "qcow2");
    let view = both_repair_alike(&dir, "m.qcow2");
    for (offset, data) in &written {
        assert_eq!(&view[*offset as usize..*offset as usize + data.len()], data);
    }
}

#[test]
fn a_guest_write_into_the_refcount_table_is_refused_and_marks_the_image_corrupt() {
    let dir = TempDir::new("evil-l2-reftable");
    let image = dir.join("m.qcow2");
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "m.qcow2", "16M"],
    );
    qemu_io(
        dir.path(),
        "qcow2",
        "m.qcow2",
        &["write -P 0x11 0 64k".into()],
    );
    let layout = Layout::of(&image);
    // Guest cluster 0 now maps onto the refcount table.
    let entry = layout.l2_entry(&image, 0);
    patch(
        &image,
        entry,
        &(layout.reftable_offset | COPIED).to_be_bytes(),
    );
    let reftable = read_at(&image, layout.reftable_offset, 4096);
    let evil = dir.join("evil.qcow2");
    fs::copy(&image, &evil).unwrap();

    let mut vubd = serve_rw(&dir, &image);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    assert!(
        client.write(0, 0, &[0xee; 4096]).is_err(),
        "a write into metadata fails"
    );
    assert!(
        client.write(0, 8 << 20, &[0xee; 4096]).is_err(),
        "and the node takes no more writes"
    );
    assert!(client.read(0, 4 << 20, 4096).is_ok(), "reads still work");
    drop(client);
    // SIGTERM stops vubd at once, the image as it is.
    let started = Instant::now();
    let stderr = vubd.stop();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        stderr.contains("Preventing invalid write on metadata (overlaps with refcount table)"),
        "{stderr}"
    );
    assert_eq!(read_at(&image, layout.reftable_offset, 4096), reftable);
    let info = info_json(dir.path(), "m.qcow2");
    assert_eq!(info["format-specific"]["data"]["corrupt"], true, "{info}");
    let err = serve_qcow2_fails(&dir, &image, &[]);
    assert!(err.contains("marked corrupt"), "{err}");

    // What qemu-img check -r all repairs, vubd repairs: the shared cluster gets its two
    // references and loses COPIED, so the next guest write copies instead of overwriting.
    both_repair_alike(&dir, "evil.qcow2");
    let repaired = dir.join("evil.qcow2.vubd-repaired");
    let table_before = read_at(&repaired, be64_at(&repaired, 48), 4096);
    let mut vubd = serve_rw(&dir, &repaired);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    client.write(0, 0, &[0x77; 4096]).unwrap();
    assert_eq!(client.read(0, 0, 4096).unwrap(), vec![0x77; 4096]);
    drop(client);
    vubd.stop();
    assert_eq!(
        read_at(&repaired, be64_at(&repaired, 48), 4096),
        table_before,
        "the refcount table was not written over"
    );
    let (code, out) = try_run_in(
        dir.path(),
        "qemu-img",
        &["check", "evil.qcow2.vubd-repaired"],
    );
    assert_eq!(code, 0, "{out}");
}

#[test]
fn an_l2_table_placed_on_a_refcount_block_is_never_written() {
    let dir = TempDir::new("evil-l2-on-refblock");
    let image = dir.join("m.qcow2");
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "m.qcow2", "16M"],
    );
    qemu_io(
        dir.path(),
        "qcow2",
        "m.qcow2",
        &["write -P 0x22 0 64k".into()],
    );
    let layout = Layout::of(&image);
    // L1 entry 0 points at the refcount block: updating "the L2 table" would rewrite refcounts.
    let refblock = layout.first_refblock(&image);
    patch(&image, layout.l1_offset, &(refblock | COPIED).to_be_bytes());
    let before = read_at(&image, refblock, 65536);
    let mut vubd = serve_rw(&dir, &image);
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    assert!(client.write(0, 1 << 20, &[1; 4096]).is_err());
    drop(client);
    vubd.stop();
    assert_eq!(read_at(&image, refblock, 65536), before);
    assert_eq!(
        info_json(dir.path(), "m.qcow2")["format-specific"]["data"]["corrupt"],
        true
    );
}

#[test]
fn the_data_file_is_never_the_image_itself() {
    let dir = TempDir::new("evil-self-data");
    let image = dir.join("m.qcow2");
    fs::write(dir.join("d.raw"), vec![0u8; 1 << 20]).unwrap();
    qemu_img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=d.raw",
            "m.qcow2",
            "1M",
        ],
    );
    let err = serve_qcow2_fails(&dir, &image, &["--data-file", path_str(&image)]);
    assert!(
        err.contains("the data file is the image file itself"),
        "{err}"
    );
}

#[test]
fn what_qemu_img_cannot_repair_vubd_does_not_pretend_to() {
    let dir = TempDir::new("evil-beyond-eof");
    let image = dir.join("m.qcow2");
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "m.qcow2", "16M"],
    );
    qemu_io(
        dir.path(),
        "qcow2",
        "m.qcow2",
        &["write -P 0x11 0 64k".into()],
    );
    let layout = Layout::of(&image);
    // Guest cluster 0 maps to 1 GiB into a file of a few hundred KiB.
    let entry = layout.l2_entry(&image, 0);
    patch(&image, entry, &(COPIED | 1 << 30).to_be_bytes());
    fs::copy(&image, dir.join("v.qcow2")).unwrap();
    let (qemu_code, qemu_out) =
        try_run_in(dir.path(), "qemu-img", &["check", "-r", "all", "m.qcow2"]);
    let (vubd_code, vubd_out, vubd_err) =
        common::cli::run_vubd(&["check", "--repair", path_str(&dir.join("v.qcow2"))]);
    assert_eq!(qemu_code, 2, "{qemu_out}");
    assert_eq!(vubd_code, qemu_code, "{vubd_out}{vubd_err}");
    for (image, out) in [("m.qcow2", &qemu_out), ("v.qcow2", &vubd_out)] {
        assert!(out.contains("1 errors were found"), "{image}: {out}");
        let (code, after) = try_run_in(dir.path(), "qemu-img", &["check", image]);
        assert_eq!(code, 2, "{image}: {after}");
        assert!(after.contains("1 errors were found"), "{image}: {after}");
    }
}
