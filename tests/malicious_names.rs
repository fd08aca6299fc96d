//! Malicious qcow2 images, part 3: names stored in an image (data file, backing file). A stored
//! name is resolved beneath the image's directory by the kernel, so neither `..` nor a symbolic
//! link leads out of it, and only regular files and block devices are opened — a FIFO is
//! refused, not waited on. Every refusal names the file and the rule.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::blkio_client::BlkioClient;
use common::cli::{one_line_error, serve_qcow2_fails};
use common::qemu::qemu_img;
use common::{TempDir, Vubd};

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `vm/m.qcow2` over a data file the image names `name` (created as a plain file first, then
/// replaced by whatever the test puts there).
fn image_naming_data_file(dir: &TempDir, name: &str) -> std::path::PathBuf {
    let vm = dir.join("vm");
    fs::create_dir_all(&vm).unwrap();
    qemu_img(
        &vm,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={name},data_file_raw=on"),
            "m.qcow2",
            "4M",
        ],
    );
    fs::remove_file(vm.join(name)).unwrap();
    vm.join("m.qcow2")
}

#[test]
fn a_symbolic_link_out_of_the_image_directory_is_not_followed() {
    let dir = TempDir::new("names-symlink-out");
    let image = image_naming_data_file(&dir, "disk.raw");
    fs::create_dir_all(dir.join("elsewhere")).unwrap();
    fs::write(dir.join("elsewhere/secret.raw"), vec![0x5a; 4 << 20]).unwrap();
    symlink("../elsewhere/secret.raw", dir.join("vm/disk.raw")).unwrap();
    let err = serve_qcow2_fails(&dir, &image, &[]);
    let line = one_line_error(&err);
    assert!(line.contains("disk.raw"), "names the file: {line}");
    assert!(
        line.contains("which a name stored in an image may not leave"),
        "names the rule: {line}"
    );
    // An absolute link is refused the same way.
    fs::remove_file(dir.join("vm/disk.raw")).unwrap();
    symlink(dir.join("elsewhere/secret.raw"), dir.join("vm/disk.raw")).unwrap();
    let err = serve_qcow2_fails(&dir, &image, &[]);
    assert!(err.contains("may not leave"), "{err}");
    // Given explicitly, the same file is the user's choice and is served.
    let mut vubd = Vubd::start(
        &dir.join("s.sock"),
        &[
            "--image",
            path_str(&image),
            "--format",
            "qcow2",
            "--data-file",
            path_str(&dir.join("elsewhere/secret.raw")),
        ],
    );
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    assert_eq!(client.read(0, 0, 4096).unwrap(), vec![0x5a; 4096]);
    drop(client);
    vubd.stop();
}

#[test]
fn a_symbolic_link_within_the_image_directory_is_followed() {
    let dir = TempDir::new("names-symlink-in");
    let image = image_naming_data_file(&dir, "disk.raw");
    fs::create_dir_all(dir.join("vm/data")).unwrap();
    fs::write(dir.join("vm/data/real.raw"), vec![0x33; 4 << 20]).unwrap();
    symlink("data/real.raw", dir.join("vm/disk.raw")).unwrap();
    let mut vubd = Vubd::start(
        &dir.join("s.sock"),
        &["--image", path_str(&image), "--format", "qcow2"],
    );
    let mut client = BlkioClient::connect(&vubd.socket, 1).unwrap();
    assert_eq!(client.read(0, 0, 4096).unwrap(), vec![0x33; 4096]);
    drop(client);
    vubd.stop();
}

#[test]
fn a_backing_file_behind_a_symbolic_link_out_of_the_directory_is_refused() {
    let dir = TempDir::new("names-backing");
    let vm = dir.join("vm");
    fs::create_dir_all(&vm).unwrap();
    fs::create_dir_all(dir.join("elsewhere")).unwrap();
    qemu_img(
        &dir.join("elsewhere"),
        &["create", "-q", "-f", "raw", "base.raw", "4M"],
    );
    symlink("../elsewhere/base.raw", vm.join("base.raw")).unwrap();
    qemu_img(
        &vm,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.qcow2",
        ],
    );
    let err = serve_qcow2_fails(&dir, &vm.join("top.qcow2"), &["--readonly"]);
    let line = one_line_error(&err);
    assert!(
        line.contains("base.raw") && line.contains("may not leave"),
        "{line}"
    );
}

#[test]
fn a_fifo_as_data_file_is_refused_at_once() {
    let dir = TempDir::new("names-fifo");
    let image = image_naming_data_file(&dir, "disk.raw");
    let ok = Command::new("mkfifo")
        .arg(dir.join("vm/disk.raw"))
        .status()
        .unwrap();
    assert!(ok.success());
    // Opening a FIFO for reading waits for a writer: a hang guard, not a benchmark.
    let started = Instant::now();
    let err = serve_qcow2_fails(&dir, &image, &[]);
    assert!(started.elapsed() < Duration::from_secs(10));
    let line = one_line_error(&err);
    assert!(
        line.contains("disk.raw") && line.contains("not a regular file or block device"),
        "{line}"
    );
    // A FIFO given explicitly is refused the same way.
    let err = serve_qcow2_fails(
        &dir,
        &image,
        &["--data-file", path_str(&dir.join("vm/disk.raw"))],
    );
    assert!(err.contains("not a regular file"), "{err}");
}

/// A stored name that QEMU would read as a remote store (an NBD server here, listening) is
/// refused without connecting: an image cannot make vubd reach the network.
#[test]
fn a_remote_store_named_in_an_image_is_not_contacted() {
    let dir = TempDir::new("names-remote");
    let listener_path = dir.join("lure.sock");
    let listener = std::os::unix::net::UnixListener::bind(&listener_path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let image = dir.join("m.qcow2");
    for name in [
        format!("nbd+unix:///x?socket={}", listener_path.display()),
        format!(
            r#"json:{{"driver": "nbd", "server": {{"type": "unix", "path": "{}"}}}}"#,
            listener_path.display()
        ),
        "rbd:pool/image".to_string(),
    ] {
        // A fresh image each time: qemu-img amend opens the data file the image names.
        qemu_img(
            dir.path(),
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "data_file=d.raw,data_file_raw=on",
                "m.qcow2",
                "4M",
            ],
        );
        qemu_img(
            dir.path(),
            &[
                "amend",
                "-f",
                "qcow2",
                "-o",
                // qemu-img's option syntax: a comma in a value is doubled.
                &format!("data_file={}", name.replace(',', ",,")),
                "m.qcow2",
            ],
        );
        let err = serve_qcow2_fails(&dir, &image, &[]);
        let line = one_line_error(&err);
        assert!(line.contains("does not follow"), "{name}: {line}");
        assert!(
            listener.accept().is_err(),
            "{name}: vubd connected to the socket an image named"
        );
    }
}
