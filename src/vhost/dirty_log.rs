//! Dirty-page logging for live migration (vhost-user.rst, "Migration"; `VHOST_F_LOG_ALL`,
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD`).
//!
//! While a VM migrates, its frontend copies guest memory to the destination and asks every
//! device to set a bit in a shared bitmap (one bit per 4 KiB guest page, byte `page / 8`, bit
//! `page % 8`) for each page it writes, so that those pages are sent again. vubd writes guest
//! memory in several ways vm-memory never sees — the kernel fills read buffers (io_uring,
//! `preadv2`), inline copies go through raw pointers — so vubd logs every write itself, in one
//! place per kind of write: the data and status byte of a request when it finishes
//! (`Executor::finish`), the used ring whenever the worker has touched it (`notify_guest`).
//!
//! Logging is on while the frontend has acked `LOG_ALL`; otherwise marking costs one atomic
//! load per request. The log map itself sits behind a read-write lock that only marking takes,
//! and only while logging is on: when the frontend replaces the log (`SET_LOG_BASE`, for
//! instance after memory was added), the write lock guarantees that no mark lands in the old
//! log after the reply, which the frontend reads one last time before freeing it.

use std::fs::File;
use std::io;
use std::sync::atomic::{fence, AtomicBool, AtomicU8, Ordering};
use std::sync::RwLock;

use super::shared_file::SharedMapping;
use crate::iov::GuestRange;

/// Guest bytes per bit of the log.
const LOG_PAGE: u64 = 4096;

/// The dirty log of one frontend connection.
#[derive(Default)]
pub struct DirtyLog {
    /// `LOG_ALL` is acked: every write to guest memory must be logged.
    on: AtomicBool,
    map: RwLock<Option<LogMap>>,
}

impl DirtyLog {
    /// Logging starts or stops with the frontend's `LOG_ALL` feature bit.
    pub fn set_logging(&self, on: bool) {
        self.on.store(on, Ordering::SeqCst);
    }

    /// Whether writes must be logged. Built with `--cfg vubd_no_dirty_marks` it is always
    /// false and every mark compiles away: the baseline `make bench` measures the check
    /// against (`examples/bench/overhead.rs`).
    #[inline]
    pub fn logging(&self) -> bool {
        !cfg!(vubd_no_dirty_marks) && self.on.load(Ordering::Acquire)
    }

    /// `SET_LOG_BASE`: from now on, log into `size` bytes at `offset` of `file`.
    pub fn set_base(&self, file: &File, offset: u64, size: u64) -> io::Result<()> {
        let map = LogMap::new(file, offset, size)?;
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = Some(map);
        Ok(())
    }

    /// Log `len` bytes of guest memory at `addr`, written by vubd, if logging is on.
    #[inline]
    pub fn mark(&self, addr: u64, len: u64) {
        if self.logging() && len > 0 {
            self.mark_logging(addr, len);
        }
    }

    // Out of line and cold: the request path pays for the check only, and its callers stay
    // small enough for the compiler to keep inlining vm-memory's accessors into them.
    #[cold]
    #[inline(never)]
    fn mark_logging(&self, addr: u64, len: u64) {
        // The write must be visible before its bit: the frontend reads the log, then the page.
        fence(Ordering::SeqCst);
        if let Some(map) = self.map.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            map.mark(addr, len);
        }
    }

    /// Log the first `len` bytes of `ranges` (a request's device-writable buffers), if logging
    /// is on.
    #[inline]
    pub fn mark_ranges(&self, ranges: &[GuestRange], len: u64) {
        if self.logging() {
            self.mark_ranges_logging(ranges, len);
        }
    }

    #[cold]
    #[inline(never)]
    fn mark_ranges_logging(&self, ranges: &[GuestRange], mut len: u64) {
        for range in ranges {
            if len == 0 {
                break;
            }
            let n = range.len.min(len);
            if n > 0 {
                self.mark_logging(range.addr.0, n);
            }
            len -= n;
        }
    }
}

/// The frontend's log, mapped.
struct LogMap(SharedMapping);

impl LogMap {
    fn new(file: &File, offset: u64, size: u64) -> io::Result<LogMap> {
        // A log shorter than it claims would raise SIGBUS on the first mark past its end.
        SharedMapping::new(file, offset, size, "dirty log").map(LogMap)
    }

    fn mark(&self, addr: u64, len: u64) {
        let first = addr / LOG_PAGE;
        let last = addr.saturating_add(len - 1) / LOG_PAGE;
        for page in first..=last {
            let Some(byte) = usize::try_from(page / 8).ok().filter(|b| *b < self.0.len()) else {
                // Past the log the frontend sized for its memory: nothing to log there.
                return;
            };
            // SAFETY: `byte` is inside the mapping, which lives as long as `self`; the frontend
            // shares it, so it is only accessed atomically.
            let cell = unsafe { AtomicU8::from_ptr(self.0.base().add(byte)) };
            cell.fetch_or(1 << (page % 8), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhost::shared_file::test_memfd;
    use vm_memory::GuestAddress;

    fn memfd(len: u64) -> File {
        test_memfd(c"log-test", len)
    }

    fn bits(file: &File) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0; file.metadata().unwrap().len() as usize];
        file.read_exact_at(&mut buf, 0).unwrap();
        buf
    }

    #[test]
    fn marks_every_page_touched_only_while_logging() {
        let file = memfd(4096);
        let log = DirtyLog::default();
        log.set_base(&file, 0, 4096).unwrap();
        log.mark(0, 4096);
        assert!(bits(&file).iter().all(|b| *b == 0), "logging is off");
        log.set_logging(true);
        // Pages 1 and 2 (the write straddles them), and page 9.
        log.mark(2 * 4096 - 1, 2);
        log.mark(9 * 4096 + 100, 1);
        let b = bits(&file);
        assert_eq!(b[0], 0b0000_0110);
        assert_eq!(b[1], 0b0000_0010);
        assert!(b[2..].iter().all(|b| *b == 0));
        // Ranges: only the first `len` bytes count.
        let ranges = [
            GuestRange {
                addr: GuestAddress(64 * 4096),
                len: 4096,
            },
            GuestRange {
                addr: GuestAddress(80 * 4096),
                len: 4096,
            },
        ];
        log.mark_ranges(&ranges, 4096);
        let b = bits(&file);
        assert_eq!(b[8], 1);
        assert_eq!(b[10], 0);
        // Past the end of the log: ignored, not a crash.
        log.mark(u64::MAX - 10, 10);
    }

    #[test]
    fn logs_that_do_not_fit_their_file_are_refused() {
        let file = memfd(4096);
        let log = DirtyLog::default();
        assert!(log.set_base(&file, 0, 8192).is_err());
        assert!(log.set_base(&file, 4096, 1).is_err());
        assert!(log.set_base(&file, u64::MAX, 2).is_err());
        assert!(log.set_base(&file, 0, 0).is_err());
    }
}
