//! Running `vubd` subcommands to completion and checking how they end: the helpers every
//! command-line test needs, in one place so that each file checks exit codes the same way.

use std::path::Path;
use std::process::Command;

use super::{vubd_bin, TempDir};

/// Run `vubd ARGS...` to completion; returns (exit code, stdout, stderr).
pub fn run_vubd(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(vubd_bin())
        .args(args)
        .output()
        .expect("run vubd");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run `vubd ARGS...` expecting success; returns stdout.
pub fn vubd_ok(args: &[&str]) -> String {
    let (code, out, err) = run_vubd(args);
    assert_eq!(code, 0, "vubd {args:?}: {out}{err}");
    out
}

/// Run `vubd serve ARGS...` expecting failure; returns stderr.
pub fn serve_fails(args: &[&str]) -> String {
    let mut full = vec!["serve"];
    full.extend_from_slice(args);
    let (code, _, stderr) = run_vubd(&full);
    assert_ne!(code, 0, "vubd {full:?} should fail; stderr: {stderr}");
    stderr
}

/// [`serve_fails`] for the qcow2 image `image` with `extra` options, on a socket in `dir` that
/// is never expected to appear.
pub fn serve_qcow2_fails(dir: &TempDir, image: &Path, extra: &[&str]) -> String {
    let socket = dir.join("fail.sock");
    let mut args = vec![
        "--socket",
        socket.to_str().expect("utf-8 path"),
        "--image",
        image.to_str().expect("utf-8 path"),
        "--format",
        "qcow2",
    ];
    args.extend_from_slice(extra);
    serve_fails(&args)
}

/// The one non-blank line of `stderr`; panics if there are more or none. Errors a user sees are
/// meant to be one line naming what is wrong.
pub fn one_line_error(stderr: &str) -> &str {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    lines[0]
}
