//! Images that need care before they can be served: header feature bits vubd must honour or
//! refuse, lazy-refcount images left dirty by a crash, and `vubd check` finding and repairing
//! what `qemu-img check` finds. The images are damaged on purpose by patching their bytes.

mod common;

use std::fs;

use common::blkio_client::BlkioClient;
use common::cli::{run_vubd, serve_qcow2_fails};
use common::image::patch;
use common::qemu::{assert_check_clean, qemu_img, qemu_io, qemu_view, try_run_in};
use common::{pattern, TempDir, Vubd};

const MIB: usize = 1 << 20;

/// Patch header bytes of an image.
#[test]
fn header_feature_bits_are_honoured() {
    let dir = TempDir::new("features");
    let img = dir.join("f.qcow2");
    qemu_img(dir.path(), &["create", "-f", "qcow2", "f.qcow2", "4M"]);
    qemu_io(
        dir.path(),
        "qcow2",
        "f.qcow2",
        &["write -P 0x42 0 64k".into()],
    );

    // An unknown incompatible bit: refused.
    patch(&img, 72, &(1u64 << 10).to_be_bytes());
    let err = serve_qcow2_fails(&dir, &img, &["--readonly"]);
    assert!(err.contains("incompatible"), "{err}");
    patch(&img, 72, &0u64.to_be_bytes());

    // Extended L2 entries: refused with a clear message.
    qemu_img(
        dir.path(),
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "x.qcow2",
            "4M",
        ],
    );
    let err = serve_qcow2_fails(&dir, &dir.join("x.qcow2"), &["--readonly"]);
    assert!(err.contains("extended L2"), "{err}");

    // The corrupt bit: read-only only.
    patch(&img, 72, &2u64.to_be_bytes());
    let err = serve_qcow2_fails(&dir, &img, &[]);
    assert!(
        err.contains("corrupt") && err.contains("--readonly"),
        "{err}"
    );
    let mut vubd = Vubd::start(
        &dir.join("ro"),
        &[
            "--image",
            img.to_str().unwrap(),
            "--format",
            "qcow2",
            "--readonly",
        ],
    );
    let mut client = BlkioClient::connect_with(&vubd.socket, 1, true).unwrap();
    assert!(client.read(0, 0, 4096).unwrap().iter().all(|b| *b == 0x42));
    drop(client);
    vubd.stop();
    patch(&img, 72, &0u64.to_be_bytes());

    // A backing file conflicts with a raw external data file.
    qemu_img(
        dir.path(),
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=d.raw,data_file_raw=on",
            "r.qcow2",
            "4M",
        ],
    );
    let err = serve_qcow2_fails(
        &dir,
        &dir.join("r.qcow2"),
        &[
            "--readonly",
            "--backing",
            img.to_str().unwrap(),
            "--backing-format",
            "qcow2",
        ],
    );
    assert!(
        err.contains("conflicts with a raw external data file"),
        "{err}"
    );

    // Unknown autoclear bits are cleared on a read-write open.
    patch(&img, 88, &(1u64 << 7).to_be_bytes());
    let mut vubd = Vubd::start(
        &dir.join("rw"),
        &["--image", img.to_str().unwrap(), "--format", "qcow2"],
    );
    vubd.stop();
    let header = fs::read(&img).unwrap();
    assert_eq!(u64::from_be_bytes(header[88..96].try_into().unwrap()), 0);
    assert_check_clean(dir.path(), "f.qcow2");
}

#[test]
fn lazy_refcount_dirty_images_are_repaired_on_open() {
    let dir = TempDir::new("lazy");
    let img = dir.join("lazy.qcow2");
    qemu_img(
        dir.path(),
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "lazy.qcow2",
            "8M",
        ],
    );
    // Leave refcounts stale the way a crash with lazy refcounts does: write with QEMU, then
    // zero the refcount block entries of the data clusters and set the dirty bit.
    qemu_io(
        dir.path(),
        "qcow2",
        "lazy.qcow2",
        &["write -P 0x61 0 1M".into(), "write -P 0x62 4M 64k".into()],
    );
    let expected = qemu_view(dir.path(), "lazy.qcow2", "qcow2");
    let header = fs::read(&img).unwrap();
    let reftable = u64::from_be_bytes(header[48..56].try_into().unwrap());
    let block = {
        let raw = fs::read(&img).unwrap();
        u64::from_be_bytes(
            raw[reftable as usize..reftable as usize + 8]
                .try_into()
                .unwrap(),
        )
    };
    // Clusters 5.. are data (0 header, 1 reftable, 2 block, 3 L1, 4 L2): claim them free.
    patch(&img, block + 10, &[0u8; 200]);
    patch(&img, 72, &1u64.to_be_bytes());
    let (code, _) = try_run_in(
        dir.path(),
        "qemu-img",
        &["check", "--force-share", "-r", "none", "lazy.qcow2"],
    );
    assert_ne!(
        code, 0,
        "the image really is inconsistent before vubd opens it"
    );

    let mut vubd = Vubd::start(
        &dir.join("s"),
        &["--image", img.to_str().unwrap(), "--format", "qcow2"],
    );
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    for half in 0..2 {
        let at = half * 4 * MIB;
        assert!(client.read(0, at as u64, 4 * MIB).unwrap() == expected[at..at + 4 * MIB]);
    }
    client.write(0, 6 * MIB as u64, &pattern(65536, 3)).unwrap();
    drop(client);
    let stderr = vubd.stop();
    assert!(stderr.contains("rebuilding refcounts"), "{stderr}");
    assert_check_clean(dir.path(), "lazy.qcow2");
    let header = fs::read(&img).unwrap();
    assert_eq!(
        u64::from_be_bytes(header[72..80].try_into().unwrap()) & 1,
        0,
        "dirty bit cleared"
    );
}

#[test]
fn vubd_check_finds_and_repairs_leaks_like_qemu_img() {
    let dir = TempDir::new("check");
    let img = dir.join("c.qcow2");
    qemu_img(dir.path(), &["create", "-f", "qcow2", "c.qcow2", "8M"]);
    // Clusters: 0 header, 1 refcount table, 2 refcount block, 3 L1, 4 L2, 5-8 data; the
    // discard frees cluster 6 inside the file.
    qemu_io(
        dir.path(),
        "qcow2",
        "c.qcow2",
        &["write -P 0x61 0 256k".into(), "discard 64k 64k".into()],
    );
    let (code, out, _) = run_vubd(&["check", img.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("No errors were found"), "{out}");
    // Leak cluster 6: give it a refcount nothing accounts for.
    let header = fs::read(&img).unwrap();
    let reftable = u64::from_be_bytes(header[48..56].try_into().unwrap()) as usize;
    let block = u64::from_be_bytes(header[reftable..reftable + 8].try_into().unwrap());
    patch(&img, block + 6 * 2, &1u16.to_be_bytes());
    let (qcode, _) = try_run_in(dir.path(), "qemu-img", &["check", "c.qcow2"]);
    let (code, out, _) = run_vubd(&["check", img.to_str().unwrap()]);
    assert_eq!((code, qcode), (3, 3), "leaks: exit 3 like qemu-img; {out}");
    assert!(out.contains("1 leaked clusters"), "{out}");
    let (code, out, _) = run_vubd(&["check", "--repair", img.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert_check_clean(dir.path(), "c.qcow2");
    // An error: a data cluster whose refcount was dropped to zero.
    patch(&img, block + 5 * 2, &0u16.to_be_bytes());
    let (qcode, _) = try_run_in(dir.path(), "qemu-img", &["check", "c.qcow2"]);
    let (code, out, _) = run_vubd(&["check", img.to_str().unwrap()]);
    assert_eq!((code, qcode), (2, 2), "errors: exit 2 like qemu-img; {out}");
    let (code, out, _) = run_vubd(&["check", "--repair", img.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert_check_clean(dir.path(), "c.qcow2");
}
