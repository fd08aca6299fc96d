//! `vubd create` and `vubd info`, and the stored-name policy: adopting a raw file as the data
//! file of new qcow2 metadata without touching it, and which data and backing file names vubd
//! follows on its own.

mod common;

use std::fs;
use std::process::Command;

use common::blkio_client::BlkioClient;
use common::cli::{run_vubd, vubd_ok};
use common::data::sha256_file;
use common::qemu::{assert_check_clean, info_json, qemu_img, qemu_view};
use common::{create_image, pattern, vubd_bin, TempDir, Vubd};

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
