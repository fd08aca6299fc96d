//! Comparing disk contents: byte-exact comparison that says where two images differ, and
//! SHA-256 digests for when only a fingerprint can cross a boundary (a guest console, a file
//! that must not change).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Panic unless `actual == expected`, naming the first differing byte rather than dumping
/// megabytes of both.
pub fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if let Some(i) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} (got {:#04x}, expected {:#04x})",
            actual[i], expected[i]
        );
    }
}

/// The SHA-256 of `data` in hex, by `sha256sum` — the same tool a guest runs, so the digests
/// compare as text.
pub fn sha256_hex(data: &[u8]) -> String {
    let out = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().expect("piped stdin").write_all(data)?;
            child.wait_with_output()
        })
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

/// The SHA-256 of the file at `path`, in hex.
pub fn sha256_file(path: &Path) -> String {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    sha256_hex(&data)
}
