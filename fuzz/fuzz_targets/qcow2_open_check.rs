//! qcow2 open, reads, metadata walk and check over arbitrary image bytes; then the same image
//! opened read-write: a small write, write-zeroes and discard, flush, and `check` with repair.
//!
//! The input is the image file. It is written to this process's scratch directory beside the
//! files an image may name (stored names resolve beneath the image's directory): `data.raw`,
//! a raw external data file, and `base.raw`, a raw backing file. The read-write pass works on a
//! copy (`rw.qcow2`), and the data file is emptied before every input, so every input starts
//! from the same files.
//!
//! Nothing may panic, however broken the image. Beyond that: read and write extents cover the
//! request exactly (the helpers assert it), a repair that reports everything fixed leaves an
//! image that checks clean, and the files stay small (no metadata walk writes unbounded data).

#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use vubd::block::qcow2::check::check;
use vubd::block::qcow2::Qcow2Node;
use vubd::block::{BlockDriver, Locking, OpenOptions, ZeroOp};
use vubd_fuzz::{allocated, reset_sparse, workdir, write_at, write_file, zero_at};

/// Larger than any seed's virtual disk: a data file smaller than the disk is refused at open.
const DATA_FILE_BYTES: u64 = 64 << 20;
/// What the scratch files may occupy after one input (the input is at most a few MiB).
const MAX_ALLOCATED: u64 = 256 << 20;

struct Files {
    image: PathBuf,
    rw: PathBuf,
    data: PathBuf,
}

fn files() -> &'static Files {
    static FILES: std::sync::OnceLock<Files> = std::sync::OnceLock::new();
    FILES.get_or_init(|| {
        let dir = workdir();
        let base = dir.join("base.raw");
        let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        write_file(&base, &pattern);
        Files {
            image: dir.join("img.qcow2"),
            rw: dir.join("rw.qcow2"),
            data: dir.join("data.raw"),
        }
    })
}

/// Guest ranges to read: the start, the middle and the end of the disk.
fn ranges(size: u64) -> impl Iterator<Item = (u64, u64)> {
    [
        (0u64, 65536u64),
        (size / 2, 4096),
        (size.saturating_sub(3000), 3000),
    ]
    .into_iter()
    .filter_map(move |(off, len)| {
        let len = len.min(size.saturating_sub(off));
        (len > 0).then_some((off, len))
    })
}

fn read_only_pass(path: &std::path::Path) {
    let options = OpenOptions {
        read_only: true,
        locking: Locking::Off,
        ..OpenOptions::default()
    };
    let Ok(node) = Qcow2Node::open(path, &options) else {
        return;
    };
    let mut buf = vec![0u8; 65536];
    for (off, len) in ranges(node.size()) {
        let _ = node.read_at(off, &mut buf[..len as usize]);
    }
    let _ = check(&node, false);
}

fn read_write_pass(path: &std::path::Path) {
    let options = OpenOptions {
        read_only: false,
        repair: true,
        locking: Locking::Off,
        ..OpenOptions::default()
    };
    let Ok(node) = Qcow2Node::open(path, &options) else {
        return;
    };
    let size = node.size();
    let mut data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    if size > 0 {
        let len = size.min(4096) as usize;
        let _ = write_at(&node, 0, &mut data[..len]);
        let off = size / 3;
        let len = (size - off).min(1000) as usize;
        let _ = write_at(&node, off, &mut data[..len]);
        let off = (size / 2) & !511;
        let len = (size - off).min(2048);
        let _ = zero_at(&node, off, len, ZeroOp::WriteZeroes { unmap: true });
        let off = size / 4;
        let len = (size - off).min(1 << 16);
        let _ = zero_at(&node, off, len, ZeroOp::Discard);
        let mut buf = vec![0u8; 4096];
        for (off, len) in ranges(size) {
            let len = len.min(4096) as usize;
            let _ = node.read_at(off, &mut buf[..len]);
        }
    }
    let _ = node.flush_metadata();
    // An L2 entry may point a guest cluster anywhere below 2^56, and a write there grows the
    // image file (sparsely) that far: check must cost what the image uses, not the file's
    // length (regression: check-counts-sized-by-sparse-file.qcow2).
    let Ok(report) = check(&node, true) else {
        return;
    };
    let all_fixed =
        report.corruptions_fixed == report.corruptions && report.leaks_fixed == report.leaks;
    if report.corruptions > 0 && all_fixed {
        let _ = node.clear_corrupt_flag();
    }
    if all_fixed {
        if let Ok(again) = check(&node, false) {
            assert!(
                again.corruptions == 0 && again.leaks == 0,
                "repair reported everything fixed ({report:?}), a second check finds {again:?}"
            );
        }
    }
}

fuzz_target!(|image: &[u8]| {
    let f = files();
    reset_sparse(&f.data, DATA_FILE_BYTES);
    write_file(&f.image, image);
    write_file(&f.rw, image);
    let start = std::time::Instant::now();
    read_only_pass(&f.image);
    let read_only = start.elapsed();
    read_write_pass(&f.rw);
    if vubd_fuzz::tracing() {
        eprintln!(
            "qcow2_open_check: read-only {read_only:?}, read-write {:?}, rw.qcow2 {} bytes",
            start.elapsed() - read_only,
            std::fs::metadata(&f.rw).map_or(0, |m| m.len())
        );
    }
    for p in [&f.rw, &f.data] {
        let used = allocated(p);
        assert!(
            used <= MAX_ALLOCATED,
            "{} occupies {used} bytes",
            p.display()
        );
    }
});
