//! A submitted operation ([`Parent`]) and the NBD commands it is sent as ([`Cmd`]): one, or
//! several when it is larger than the server takes in one request. The operation completes
//! once every command has finished, with the first error any of them had.

use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::block::remote::Completion;
use crate::iov::Cursor;
use crate::nbd::wire::{Request, REQUEST_MAGIC};

/// Zero bytes a write-zeroes sends when the server has no `NBD_CMD_WRITE_ZEROES`: every
/// piece of such a write points here (it is only ever read).
static ZEROES: [u8; ZERO_BUF] = [0; ZERO_BUF];
const ZERO_BUF: usize = 64 << 10;

/// Where an operation's data is.
pub(super) enum Bufs {
    /// No data (flush, trim, write-zeroes).
    None,
    /// The submitter's iovecs (guest memory): written by reads, read by writes.
    Guest { iov: *const libc::iovec, cnt: usize },
    /// As many zero bytes as asked for.
    Zeroes,
}

/// One submitted operation, shared by its commands.
pub(super) struct Parent {
    bufs: Bufs,
    /// Commands not finished yet.
    remaining: AtomicUsize,
    /// The first errno a command finished with (0: none yet).
    error: AtomicI32,
    /// The result on success (bytes moved, or 0).
    success: i32,
    done: Mutex<Option<Completion>>,
}

// SAFETY: the only non-Send/Sync part is the iovec pointer of `Bufs::Guest`. The submitter
// guarantees the iovecs and the memory they describe stay valid until the completion is
// completed (`RemoteStore::submit`'s contract), from whichever thread; a command's range of
// them is accessed by one thread at a time (its sender reading it, or the connection's
// reader writing it), and never after the command finished (see `Parent::pieces`).
unsafe impl Send for Parent {}
// SAFETY: as for Send; the counters are atomics and the completion is behind a mutex.
unsafe impl Sync for Parent {}

impl Parent {
    pub fn new(bufs: Bufs, commands: usize, success: i32, done: Completion) -> Arc<Parent> {
        Arc::new(Parent {
            bufs,
            remaining: AtomicUsize::new(commands),
            error: AtomicI32::new(0),
            success,
            done: Mutex::new(Some(done)),
        })
    }

    /// Call `f` with the pieces of the operation's data from byte `at` for `len` bytes (as
    /// many as there are), in order, each within one iovec.
    ///
    /// # Safety
    /// A command covering `[at, at + len)` must be unfinished, and the caller the one thread
    /// entitled to its range (its sender, or the reader of its reply), so the memory is valid.
    pub unsafe fn pieces(&self, at: u64, len: u64, mut f: impl FnMut(libc::iovec)) {
        match self.bufs {
            Bufs::None => {}
            Bufs::Guest { iov, cnt } => {
                // SAFETY: valid until the operation completes, which it has not (above).
                let iovecs = unsafe { std::slice::from_raw_parts(iov, cnt) };
                let mut cursor = Cursor::new(iovecs);
                cursor.skip(at);
                cursor.take(len, f);
            }
            Bufs::Zeroes => {
                let mut left = len;
                while left > 0 {
                    let n = left.min(ZERO_BUF as u64);
                    f(libc::iovec {
                        iov_base: ZEROES.as_ptr().cast_mut().cast(),
                        iov_len: n as usize,
                    });
                    left -= n;
                }
            }
        }
    }

    /// One command finished with `errno` (0: success). The last one completes the operation:
    /// with the first error any command had, else with the success result.
    pub fn finish_part(&self, errno: i32) {
        if errno != 0 {
            let _ = self
                .error
                .compare_exchange(0, errno, Ordering::AcqRel, Ordering::Acquire);
        }
        let before = self
            .remaining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if before != Ok(1) {
            return;
        }
        let error = self.error.load(Ordering::Acquire);
        let result = if error != 0 { -error } else { self.success };
        let done = self
            .done
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(done) = done {
            done.complete(result);
        }
    }
}

/// One NBD command: a whole operation or a piece of one.
#[derive(Clone)]
pub(super) struct Cmd {
    pub kind: u16,
    pub flags: u16,
    /// Where in the export.
    pub offset: u64,
    pub len: u32,
    /// Where in the operation's data this command's bytes start.
    pub at: u64,
    pub parent: Arc<Parent>,
}

impl Cmd {
    /// The request header for this command under `cookie` (proto.md, "Request message").
    pub fn header(&self, cookie: u64) -> [u8; Request::SIZE] {
        Request {
            magic: REQUEST_MAGIC,
            flags: self.flags,
            kind: self.kind,
            cookie,
            offset: self.offset,
            length: self.len,
        }
        .encode()
    }

    /// This command is done: `errno` 0 for success.
    pub fn finish(self, errno: i32) {
        self.parent.finish_part(errno);
    }
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Cmd(type {} at {} len {})",
            self.kind, self.offset, self.len
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_error_wins_and_the_last_part_completes() {
        let (done, waiter) = Completion::oneshot();
        let parent = Parent::new(Bufs::None, 3, 4096, done);
        parent.finish_part(0);
        parent.finish_part(libc::ENOSPC);
        parent.finish_part(libc::EIO);
        assert_eq!(waiter.wait(), -libc::ENOSPC);
        // A stray extra finish neither wraps the count nor completes twice.
        parent.finish_part(0);
    }

    #[test]
    fn zero_pieces_cover_the_length() {
        let (done, _waiter) = Completion::oneshot();
        let parent = Parent::new(Bufs::Zeroes, 1, 0, done);
        let mut total = 0;
        // SAFETY: zero pieces point at a static buffer.
        unsafe { parent.pieces(0, 200_000, |p| total += p.iov_len) };
        assert_eq!(total, 200_000);
    }
}
