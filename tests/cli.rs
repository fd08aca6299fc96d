//! Command-line behaviour: clear one-line errors and non-zero exits on bad input.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;

use common::blkio_client::BlkioClient;
use common::cli::{one_line_error, serve_fails};
use common::{create_image, TempDir, Vubd};

#[test]
fn missing_image_is_named() {
    let dir = TempDir::new("cli-missing");
    let sock = dir.join("s");
    let image = dir.join("nope.raw");
    let err = serve_fails(&[
        "--socket",
        sock.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
    ]);
    let line = one_line_error(&err);
    assert!(
        line.contains("nope.raw") && line.contains("No such file"),
        "{line}"
    );
    assert!(!sock.exists(), "no socket is left behind");
}

#[test]
fn image_size_must_be_a_multiple_of_the_block_size() {
    let dir = TempDir::new("cli-unaligned");
    let sock = dir.join("s");
    let image = dir.join("odd.raw");
    create_image(&image, 1000, 1);
    let err = serve_fails(&[
        "--socket",
        sock.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
    ]);
    let line = one_line_error(&err);
    assert!(
        line.contains("odd.raw") && line.contains("not a multiple"),
        "{line}"
    );

    create_image(&image, 6144, 1);
    let err = serve_fails(&[
        "--socket",
        sock.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--logical-block-size",
        "4096",
    ]);
    assert!(one_line_error(&err).contains("not a multiple of the logical block size 4096"));
    // The image was not touched.
    assert_eq!(fs::read(&image).unwrap(), common::pattern(6144, 1));
}

#[test]
fn a_socket_served_by_a_live_process_is_not_stolen() {
    let dir = TempDir::new("cli-in-use");
    let image = dir.join("d.raw");
    create_image(&image, 1 << 20, 2);
    let mut first = Vubd::start(&dir.join("s"), &["--image", image.to_str().unwrap()]);
    let err = serve_fails(&[
        "--socket",
        dir.join("s").to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
    ]);
    assert!(
        one_line_error(&err).contains("already served by a live process"),
        "{err}"
    );
    // The first daemon still serves.
    let mut client = BlkioClient::connect(&first.socket, 1).unwrap();
    client.read(0, 0, 4096).unwrap();
    drop(client);
    first.stop();
}

#[test]
fn a_stale_socket_is_replaced_and_a_regular_file_is_not() {
    let dir = TempDir::new("cli-stale");
    let image = dir.join("d.raw");
    create_image(&image, 1 << 20, 3);
    let sock = dir.join("s");
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let mut vubd = Vubd::start(&sock, &["--image", image.to_str().unwrap()]);
    vubd.stop();

    let file = dir.join("regular");
    fs::write(&file, b"keep me").unwrap();
    let err = serve_fails(&[
        "--socket",
        file.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
    ]);
    assert!(one_line_error(&err).contains("not a socket"), "{err}");
    assert_eq!(fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn socket_mode_defaults_to_0600() {
    let dir = TempDir::new("cli-mode");
    let image = dir.join("d.raw");
    create_image(&image, 1 << 20, 4);
    let mut vubd = Vubd::start(&dir.join("s"), &["--image", image.to_str().unwrap()]);
    let mode = fs::metadata(dir.join("s")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    vubd.stop();
    let mut vubd = Vubd::start(
        &dir.join("s2"),
        &["--image", image.to_str().unwrap(), "--socket-mode", "0660"],
    );
    let mode = fs::metadata(dir.join("s2")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    vubd.stop();
}

#[test]
fn bad_numbers_are_refused_with_the_option_named() {
    let dir = TempDir::new("cli-numbers");
    let image = dir.join("d.raw");
    create_image(&image, 1 << 20, 5);
    let base = [
        "--socket",
        "/nonexistent/s",
        "--image",
        image.to_str().unwrap(),
    ];
    for (option, value) in [
        ("--num-queues", "0"),
        ("--num-queues", "65"),
        ("--num-queues", "two"),
        ("--queue-size", "100"),
        ("--queue-size", "65536"),
        ("--logical-block-size", "1024"),
        ("--socket-mode", "999"),
        ("--serial", "this-serial-is-far-too-long"),
        ("--cache", "sometimes"),
    ] {
        let mut args = base.to_vec();
        args.extend_from_slice(&[option, value]);
        let err = serve_fails(&args);
        assert!(err.contains(option), "{option} {value}: {err}");
    }
}

#[test]
fn logs_are_filtered_per_module_and_can_be_json_lines() {
    let dir = TempDir::new("cli-log");
    let image = dir.join("disk.raw");
    create_image(&image, 1 << 20, 1);
    let socket = dir.join("vubd.sock");
    let image = image.to_str().unwrap();

    // JSON lines: every line is an object with the four fields.
    let mut vubd = Vubd::start(&socket, &["--image", image, "--log-format", "json"]);
    let stderr = vubd.stop();
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(!lines.is_empty(), "vubd logged nothing");
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for field in ["ts", "level", "target", "msg"] {
            assert!(v[field].is_string(), "{field} in {line}");
        }
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"target\":\"vubd::vhost::daemon\"") && l.contains("serving")),
        "{stderr}"
    );

    // A level for everything, and one per module.
    let mut vubd = Vubd::start(&socket, &["--image", image, "--log", "warn"]);
    let quiet = vubd.stop();
    assert!(!quiet.contains("INFO"), "--log warn: {quiet}");
    let mut vubd = Vubd::start(
        &socket,
        &["--image", image, "--log", "warn,vubd::vhost::daemon=info"],
    );
    let stderr = vubd.stop();
    assert!(stderr.contains("serving"), "{stderr}");
    assert!(stderr.contains("shutting down"), "{stderr}");

    // A bad format is refused before anything starts, naming the option.
    let err = serve_fails(&[
        "--image",
        image,
        "--socket",
        "x.sock",
        "--log-format",
        "xml",
    ]);
    assert!(err.contains("--log-format"), "{err}");
}

#[test]
fn submission_polling_needs_io_uring_and_a_cpu_that_exists() {
    let dir = TempDir::new("cli-sqpoll");
    let image = dir.join("disk.raw");
    create_image(&image, 1 << 20, 1);
    let serve = |extra: &[&str]| {
        let sock = dir.join("s");
        let mut args = vec![
            "--socket",
            sock.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let err = serve_fails(&args);
        one_line_error(&err).to_string()
    };
    let line = serve(&["--io-sqpoll", "0", "--io-engine", "sync"]);
    assert!(
        line.contains("--io-sqpoll") && line.contains("--io-engine sync"),
        "{line}"
    );
    let line = serve(&["--io-sqpoll", "4096"]);
    assert!(
        line.contains("--io-sqpoll 4096") && line.contains("CPUs 0 to"),
        "{line}"
    );
}
