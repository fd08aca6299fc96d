//! The Linux test guest's kit: QEMU, a Debian kernel with its modules, and the initramfs
//! (tests/guest/mkinitramfs.sh: busybox, virtio modules, fio) with a script appended as a second
//! cpio archive. Shared by `tests/qemu_guest.rs` and `make guest-bench` (examples/bench).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct GuestKit {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub kernel_version: String,
}

pub fn find_kit() -> Result<GuestKit, String> {
    let qemu = which("qemu-system-x86_64").ok_or("qemu-system-x86_64 not installed")?;
    which("busybox").ok_or("busybox not installed")?;
    let mut kernels: Vec<PathBuf> = fs::read_dir("/boot")
        .map_err(|e| format!("/boot: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    for kernel in kernels.into_iter().rev() {
        let name = kernel.file_name().unwrap().to_str().unwrap().to_string();
        let version = name.trim_start_matches("vmlinuz-").to_string();
        if Path::new("/lib/modules")
            .join(&version)
            .join("modules.dep")
            .exists()
        {
            return Ok(GuestKit {
                qemu,
                kernel,
                kernel_version: version,
            });
        }
    }
    Err("no kernel with modules under /boot (apt-get install linux-image-cloud-amd64)".into())
}

pub fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.exists())
}

/// A cpio archive (newc format) holding one executable file, to append to the initramfs.
pub fn cpio_with_file(name: &str, data: &[u8]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) {
        let header =
            format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            1, mode, 0, 0, 1, 0, data.len(), 0, 0, 0, 0, name.len() + 1, 0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    entry(&mut out, name, 0o100755, data);
    entry(&mut out, "TRAILER!!!", 0, &[]);
    out
}

/// Build the base initramfs at `out` for `kit`'s kernel.
pub fn make_initramfs(kit: &GuestKit, out: &Path) -> Result<(), String> {
    let status = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/guest/mkinitramfs.sh"
    ))
    .arg(out)
    .arg(&kit.kernel_version)
    .status()
    .map_err(|e| format!("mkinitramfs.sh: {e}"))?;
    if !status.success() {
        return Err("mkinitramfs.sh failed".into());
    }
    Ok(())
}

/// The initrd for one boot: the base image, then `script` as /script.sh (the kernel unpacks
/// concatenated archives in order).
pub fn initrd_with_script(initramfs: &Path, script: &str) -> Result<PathBuf, String> {
    let initrd = initramfs.with_extension("run.cpio");
    let mut image = fs::read(initramfs).map_err(|e| format!("{}: {e}", initramfs.display()))?;
    image.extend_from_slice(&cpio_with_file("script.sh", script.as_bytes()));
    fs::write(&initrd, image).map_err(|e| format!("{}: {e}", initrd.display()))?;
    Ok(initrd)
}
