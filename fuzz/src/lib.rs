//! What the fuzz targets share: a scratch directory per process, and writing through a block
//! driver the way the executor does.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use vubd::block::{BlockDriver, BlockError, GuestIo, HostZeroOp, Mapping, ZeroOp};

static DIR: OnceLock<PathBuf> = OnceLock::new();
const PREFIX: &str = "vubd-fuzz-";

extern "C" fn remove_dir() {
    if let Some(dir) = DIR.get() {
        let _ = fs::remove_dir_all(dir);
    }
}

/// This process's scratch directory, `/dev/shm/vubd-fuzz-PID` (tmpfs: images are rewritten at
/// every input), created on first use and removed at exit. Directories left by processes that
/// died (a crash aborts without running exit handlers) are removed here too.
pub fn workdir() -> &'static Path {
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        if let Ok(entries) = fs::read_dir(&base) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else {
                    continue;
                };
                if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
        let dir = base.join(format!("{PREFIX}{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("creating the fuzz scratch directory");
        // SAFETY: registers a plain function with no arguments.
        unsafe { libc::atexit(remove_dir) };
        dir
    })
}

/// Whether `VUBD_FUZZ_TRACE` is set: targets then print what each input led to (run a
/// target over its corpus with `-runs=0` to see what the fuzzer reaches).
pub fn tracing() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("VUBD_FUZZ_TRACE").is_some())
}

/// Replace the content of `path` with `bytes`.
pub fn write_file(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).expect("writing a scratch file");
}

/// Make `path` a sparse file of `len` zero bytes, whatever it held before.
pub fn reset_sparse(path: &Path, len: u64) {
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .expect("creating a scratch file");
    f.set_len(len).expect("sizing a scratch file");
}

/// Bytes a file really occupies (tmpfs memory).
pub fn allocated(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// Write `data` at guest `offset` as the executor does: map, move the bytes of each extent,
/// release. The extents must cover exactly the request.
pub fn write_at(node: &dyn BlockDriver, offset: u64, data: &mut [u8]) -> Result<(), BlockError> {
    let iov = [libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    }];
    // SAFETY: `data` outlives `guest` and is not otherwise used meanwhile.
    let guest = unsafe { GuestIo::new(&iov) };
    let mut extents = Vec::new();
    let ticket = node.map_write(offset, data.len() as u64, guest, &mut extents)?;
    let covered: u64 = extents.iter().map(|e| e.len).sum();
    assert_eq!(covered, data.len() as u64, "write extents {extents:?}");
    let mut at = 0usize;
    let mut ok = true;
    for e in &extents {
        let piece = &data[at..at + e.len as usize];
        match e.mapping {
            Mapping::Data { file, offset } => {
                let f = node
                    .files()
                    .get(file)
                    .expect("extent names a file of the node");
                ok &= f.write_all_at(piece, offset).is_ok();
            }
            // The executor fails a write mapped to zeroes.
            Mapping::Zero => ok = false,
            Mapping::Filled => {}
        }
        at += e.len as usize;
    }
    node.release(ticket, ok);
    Ok(())
}

/// Discard or write zeroes over `[offset, offset + len)` as the executor does (with the
/// plain-write fallback, which needs no fallocate support).
pub fn zero_at(
    node: &dyn BlockDriver,
    offset: u64,
    len: u64,
    op: ZeroOp,
) -> Result<(), BlockError> {
    let mut ops: Vec<HostZeroOp> = Vec::new();
    node.map_zeroes(offset, len, op, &mut ops)?;
    for o in &ops {
        let f = node
            .files()
            .get(o.file)
            .expect("zero op names a file of the node");
        assert!(
            o.len <= len,
            "zero op {o:?} larger than the request of {len} bytes"
        );
        if let ZeroOp::WriteZeroes { unmap } = o.op {
            let _ = f.write_zeroes_fallback(o.offset, o.len, unmap);
        }
    }
    Ok(())
}
