//! `vubd create`, `vubd info`, `vubd check`, the stored-name policy, header feature bits, the
//! qemu-storage-daemon command line, and images handed back and forth with
//! qemu-storage-daemon.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::blkio_client::BlkioClient;
use common::cli::{run_vubd, serve_qcow2_fails, vubd_ok};
use common::data::{assert_same, sha256_file};
use common::qemu::{assert_check_clean, info_json, qemu_img, qemu_io, qemu_view, try_run_in};
use common::qsd::{Daemon, Export};
use common::{create_image, pattern, raw_with_metadata, vubd_bin, TempDir, Vubd};

const MIB: usize = 1 << 20;

#[test]
fn create_adopts_an_existing_raw_file_without_touching_it() {
    let dir = TempDir::new("create-adopt");
    let disk = dir.join("disk.raw");
    let data = create_image(&disk, 24 * MIB + 4096, 7);
    let before = sha256_file(&disk);
    let meta = dir.join("meta.qcow2");
    let out = vubd_ok(&[
        "create",
        meta.to_str().unwrap(),
        "--data-file",
        disk.to_str().unwrap(),
    ]);
    assert!(out.contains("stored as 'disk.raw'"), "{out}");
    assert_eq!(sha256_file(&disk), before, "the raw file is unchanged");
    assert_eq!(fs::metadata(&disk).unwrap().len(), data.len() as u64);

    assert_check_clean(dir.path(), "meta.qcow2");
    let info = info_json(dir.path(), "meta.qcow2");
    assert_eq!(info["virtual-size"], data.len() as u64, "{info}");
    assert_eq!(info["format-specific"]["data"]["data-file"], "disk.raw");
    assert_eq!(info["format-specific"]["data"]["data-file-raw"], true);
    // Every cluster is allocated at its own offset.
    let map = qemu_img(dir.path(), &["map", "--output=json", "meta.qcow2"]);
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let extents = map.as_array().unwrap();
    assert_eq!(extents.len(), 1, "{map}");
    assert_eq!(extents[0]["data"], true);
    assert_eq!(extents[0]["offset"], 0);
    assert_eq!(extents[0]["length"], data.len() as u64);
    // QEMU reads the raw file's content through the metadata.
    assert!(qemu_view(dir.path(), "meta.qcow2", "qcow2") == data);
    // vubd's own tools agree.
    let (code, out, _) = run_vubd(&["check", meta.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let info = vubd_ok(&["info", "--json", meta.to_str().unwrap()]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["format-specific"]["data"]["data-file-raw"], true);

    // Served, writes land in the raw file at identical offsets.
    let mut vubd = Vubd::start(
        &dir.join("s"),
        &["--image", meta.to_str().unwrap(), "--format", "qcow2"],
    );
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    let piece = pattern(64 * 1024, 8);
    client.write(0, 3 * MIB as u64 + 512, &piece).unwrap();
    drop(client);
    vubd.stop();
    let raw = fs::read(&disk).unwrap();
    assert!(raw[3 * MIB + 512..3 * MIB + 512 + piece.len()] == piece[..]);
    assert_check_clean(dir.path(), "meta.qcow2");
}

#[test]
fn create_refuses_to_overwrite_or_resize() {
    let dir = TempDir::new("create-refuse");
    let disk = dir.join("disk.raw");
    create_image(&disk, 2 * MIB, 9);
    let before = sha256_file(&disk);
    let meta = dir.join("meta.qcow2");
    let (code, _, err) = run_vubd(&[
        "create",
        meta.to_str().unwrap(),
        "--data-file",
        disk.to_str().unwrap(),
        "--size",
        "4M",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("its size is the disk size"), "{err}");
    assert!(!meta.exists());
    vubd_ok(&[
        "create",
        meta.to_str().unwrap(),
        "--data-file",
        disk.to_str().unwrap(),
    ]);
    let (code, _, err) = run_vubd(&["create", meta.to_str().unwrap(), "--size", "1M"]);
    assert_ne!(code, 0);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(sha256_file(&disk), before);
}

#[test]
fn create_plain_images_and_new_data_files() {
    let dir = TempDir::new("create-plain");
    for cluster in ["512", "64K", "2M"] {
        let name = format!("plain-{cluster}.qcow2");
        vubd_ok(&[
            "create",
            dir.join(&name).to_str().unwrap(),
            "--size",
            "5M",
            "--cluster-size",
            cluster,
        ]);
        assert_check_clean(dir.path(), &name);
        assert!(qemu_view(dir.path(), &name, "qcow2")
            .iter()
            .all(|b| *b == 0));
    }
    // A data file that does not exist yet is created sparse, of --size.
    let meta = dir.join("new.qcow2");
    let data = dir.join("sub").join("new.raw");
    fs::create_dir_all(data.parent().unwrap()).unwrap();
    let out = vubd_ok(&[
        "create",
        meta.to_str().unwrap(),
        "--data-file",
        data.to_str().unwrap(),
        "--size",
        "3M",
    ]);
    assert!(out.contains("stored as 'sub/new.raw'"), "{out}");
    assert_eq!(fs::metadata(&data).unwrap().len(), 3 * MIB as u64);
    assert_check_clean(dir.path(), "new.qcow2");
}

#[test]
fn data_file_names_follow_the_image_directory_and_the_policy() {
    let dir = TempDir::new("names");
    let inner = dir.join("vm");
    let outer = dir.join("elsewhere");
    fs::create_dir_all(&inner).unwrap();
    fs::create_dir_all(&outer).unwrap();
    let disk = outer.join("disk.raw");
    let data = create_image(&disk, 2 * MIB, 11);
    let meta = inner.join("meta.qcow2");
    // Created from an unrelated working directory.
    let out = Command::new(vubd_bin())
        .current_dir("/")
        .args([
            "create",
            meta.to_str().unwrap(),
            "--data-file",
            disk.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("--data-file"),
        "tells the user serving needs --data-file: {stdout}"
    );
    // The stored absolute name is not followed on its own...
    let (code, _, err) = run_vubd(&[
        "serve",
        "--socket",
        dir.join("s").to_str().unwrap(),
        "--image",
        meta.to_str().unwrap(),
        "--format",
        "qcow2",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("absolute path") && err.contains("--data-file"),
        "{err}"
    );
    assert!(err.lines().count() == 1, "{err}");
    // ...but works when named on the command line.
    let mut vubd = Vubd::start(
        &dir.join("s"),
        &[
            "--image",
            meta.to_str().unwrap(),
            "--format",
            "qcow2",
            "--data-file",
            disk.to_str().unwrap(),
            "--readonly",
        ],
    );
    let mut client = BlkioClient::connect_with(&vubd.socket, 1, true).unwrap();
    assert!(client.read(0, 0, 2 * MIB).unwrap() == data);
    drop(client);
    vubd.stop();

    // A backing file named with '..' is refused; --backing names it explicitly.
    qemu_img(
        &inner,
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "../elsewhere/disk.raw",
            "../elsewhere/base.qcow2",
        ],
    );
    qemu_img(
        &inner,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "../elsewhere/base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    let top = inner.join("top.qcow2");
    let (code, _, err) = run_vubd(&[
        "serve",
        "--socket",
        dir.join("s2").to_str().unwrap(),
        "--image",
        top.to_str().unwrap(),
        "--format",
        "qcow2",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("'..'") && err.contains("--backing"), "{err}");
    let base = outer.join("base.qcow2");
    let mut vubd = Vubd::start(
        &dir.join("s2"),
        &[
            "--image",
            top.to_str().unwrap(),
            "--format",
            "qcow2",
            "--readonly",
            "--backing",
            base.to_str().unwrap(),
            "--backing-format",
            "qcow2",
        ],
    );
    let mut client = BlkioClient::connect_with(&vubd.socket, 1, true).unwrap();
    assert!(client.read(0, 0, 2 * MIB).unwrap() == data);
    drop(client);
    vubd.stop();
}

/// Patch header bytes of an image.
fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

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
