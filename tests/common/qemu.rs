//! QEMU's tools as the independent oracle: qemu-img, qemu-io, qemu-storage-daemon.

use std::path::Path;
use std::process::{Command, Stdio};

/// Run a QEMU tool in `dir` (QEMU resolves relative data file names against its working
/// directory); panics with its output if it fails.
pub fn run_in(dir: &Path, tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a QEMU tool and return (exit code, stdout + stderr) without asserting.
pub fn try_run_in(dir: &Path, tool: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(tool)
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

pub fn qemu_img(dir: &Path, args: &[&str]) -> String {
    run_in(dir, "qemu-img", args)
}

/// `qemu-io -c CMD ...` on an image of `format`.
pub fn qemu_io(dir: &Path, format: &str, image: &str, commands: &[String]) {
    let mut args = vec!["-f", format];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    args.push(image);
    let out = run_in(dir, "qemu-io", &args);
    assert!(
        !out.contains("error") && !out.contains("failed"),
        "qemu-io {commands:?}: {out}"
    );
}

/// What the guest sees of `image`, according to QEMU: `qemu-img convert -O raw`.
pub fn qemu_view(dir: &Path, image: &str, format: &str) -> Vec<u8> {
    let out = format!("{image}.qemu-view.raw");
    let _ = std::fs::remove_file(dir.join(&out));
    qemu_img(dir, &["convert", "-f", format, "-O", "raw", image, &out]);
    let data = std::fs::read(dir.join(&out)).expect("read converted image");
    let _ = std::fs::remove_file(dir.join(&out));
    data
}

/// `qemu-img check`: panics unless the image has no errors and no leaks.
pub fn assert_check_clean(dir: &Path, image: &str) {
    let (code, out) = try_run_in(dir, "qemu-img", &["check", image]);
    assert!(
        code == 0 && out.contains("No errors were found"),
        "qemu-img check {image} (exit {code}):\n{out}"
    );
}

/// `qemu-img info --output=json`.
pub fn info_json(dir: &Path, image: &str) -> serde_json::Value {
    let out = qemu_img(dir, &["info", "--output=json", image]);
    serde_json::from_str(&out).expect("qemu-img info JSON")
}
