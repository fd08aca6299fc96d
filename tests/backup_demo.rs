//! The incremental backup walkthrough of docs/bitmaps.md runs as documented and verifies.

mod common;

use std::path::Path;
use std::process::Command;

use common::TempDir;

#[test]
fn the_documented_incremental_backup_works() {
    let dir = TempDir::new("backup-demo");
    let root = env!("CARGO_MANIFEST_DIR");
    let loadgen = Path::new(common::vubd_bin())
        .parent()
        .unwrap()
        .join("examples")
        .join("loadgen");
    if !loadgen.exists() {
        // `cargo test` builds examples as test targets only; build the program itself.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--example", "loadgen"])
            .current_dir(root)
            .status()
            .expect("cargo build --example loadgen");
        assert!(
            status.success() && loadgen.exists(),
            "building the loadgen example"
        );
    }
    let out = Command::new(format!("{root}/scripts/incremental-backup-demo.sh"))
        .arg(dir.path())
        .env("VUBD_BIN", common::vubd_bin())
        .env("LOADGEN_BIN", &loadgen)
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Both verifications ran and found the restored images identical.
    assert_eq!(
        stdout.matches("Images are identical.").count(),
        2,
        "{stdout}"
    );
    assert!(
        stdout.contains("No errors were found on the image."),
        "{stdout}"
    );
}
