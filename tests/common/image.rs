//! Making malicious qcow2 images: finding a structure's bytes in an image qemu-img made, and
//! patching them; running vubd under a memory limit.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use super::cli::run_vubd;
use super::qemu::{qemu_view, try_run_in};
use super::TempDir;

/// Overwrite `bytes` at `offset` of the file at `path`.
pub fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

/// `len` bytes at `offset` of the file at `path`.
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

pub fn be64_at(path: &Path, offset: u64) -> u64 {
    u64::from_be_bytes(read_at(path, offset, 8).try_into().unwrap())
}

pub fn be32_at(path: &Path, offset: u64) -> u32 {
    u32::from_be_bytes(read_at(path, offset, 4).try_into().unwrap())
}

/// The header fields the tests patch around.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub cluster_bits: u32,
    pub l1_offset: u64,
    pub reftable_offset: u64,
}

impl Layout {
    pub fn of(path: &Path) -> Layout {
        Layout {
            cluster_bits: be32_at(path, 20),
            l1_offset: be64_at(path, 40),
            reftable_offset: be64_at(path, 48),
        }
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Offset of refcount table entry `i`.
    pub fn reftable_entry(&self, i: u64) -> u64 {
        self.reftable_offset + 8 * i
    }

    /// The first refcount block's offset (16-bit refcounts: entry `c` at `+ 2 c`).
    pub fn first_refblock(&self, path: &Path) -> u64 {
        be64_at(path, self.reftable_entry(0))
    }

    /// Offset of the L2 entry mapping guest cluster `c` (its L2 table must exist).
    pub fn l2_entry(&self, path: &Path, c: u64) -> u64 {
        let per_table = self.cluster_size() / 8;
        let l1 = be64_at(path, self.l1_offset + 8 * (c / per_table)) & 0x00ff_ffff_ffff_fe00;
        assert_ne!(l1, 0, "no L2 table for guest cluster {c}");
        l1 + 8 * (c % per_table)
    }
}

/// Run `vubd ARGS...` with its address space limited to `bytes` (prlimit): a command that
/// allocates what an image claims instead of what it has fails here. Returns (exit code,
/// stdout, stderr).
pub fn vubd_limited(bytes: u64, args: &[&str]) -> (i32, String, String) {
    let out = Command::new("prlimit")
        .arg(format!("--as={bytes}"))
        .arg(super::vubd_bin())
        .args(args)
        .output()
        .expect("run prlimit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether a process ended by a signal or abort (what a bounded command never does).
pub fn crashed(code: i32, stderr: &str) -> bool {
    !(0..=3).contains(&code) || stderr.contains("panicked") || stderr.contains("memory allocation")
}

/// The qcow2 bitmaps header extension's type.
pub const BITMAPS_EXTENSION: u32 = 0x2385_2875;

/// Where header extension `kind`'s data is, and how long it is.
pub fn extension(path: &Path, kind: u32) -> Option<(u64, u32)> {
    let layout = Layout::of(path);
    let mut at = u64::from(be32_at(path, 100));
    while at + 8 <= layout.cluster_size() {
        let (k, len) = (be32_at(path, at), be32_at(path, at + 4));
        if k == 0 {
            return None;
        }
        if k == kind {
            return Some((at + 8, len));
        }
        at = (at + 8 + u64::from(len)).next_multiple_of(8);
    }
    None
}

/// The offset of the first bitmap directory entry (needs a bitmap).
pub fn first_bitmap_entry(path: &Path) -> u64 {
    let (ext, _) = extension(path, BITMAPS_EXTENSION).expect("a bitmaps extension");
    be64_at(path, ext + 16)
}

/// Repair a copy with `qemu-img check -r all` and another with `vubd check --repair`; both
/// must end clean and show the guest the same disk. Returns that disk.
pub fn both_repair_alike(dir: &TempDir, image: &str) -> Vec<u8> {
    let by_qemu = format!("{image}.qemu-repaired");
    let by_vubd = format!("{image}.vubd-repaired");
    fs::copy(dir.join(image), dir.join(&by_qemu)).unwrap();
    fs::copy(dir.join(image), dir.join(&by_vubd)).unwrap();
    let (qemu_code, qemu_out) =
        try_run_in(dir.path(), "qemu-img", &["check", "-r", "all", &by_qemu]);
    let (vubd_code, vubd_out, vubd_err) = run_vubd(&[
        "check",
        "--repair",
        dir.join(&by_vubd).to_str().expect("utf-8 path"),
    ]);
    assert!(
        qemu_code == 0 || qemu_code == 3,
        "qemu-img repaired: {qemu_out}"
    );
    assert!(
        vubd_code == 0 || vubd_code == 3,
        "vubd check --repair: {vubd_out}{vubd_err}"
    );
    for repaired in [&by_qemu, &by_vubd] {
        let (code, out) = try_run_in(dir.path(), "qemu-img", &["check", repaired]);
        assert_eq!(code, 0, "{repaired} after repair: {out}");
    }
    let view = qemu_view(dir.path(), &by_vubd, "qcow2");
    assert_eq!(
        view,
        qemu_view(dir.path(), &by_qemu, "qcow2"),
        "both repairs give the guest the same disk"
    );
    view
}
