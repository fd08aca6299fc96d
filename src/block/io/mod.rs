//! I/O engines: how a queue thread moves data between guest memory and host files.
//!
//! Each queue thread owns one [`Engine`]. Requests push operations, the thread submits them as a
//! batch once per kick, and completions come back through [`Engine::reap`]. The io_uring engine
//! signals finished operations on an eventfd that the queue thread's epoll loop watches; the
//! synchronous engine runs each operation when it is pushed, for kernels or sandboxes without
//! io_uring.

mod sync;
mod uring;

use std::io;
use std::os::fd::RawFd;

pub use sync::SyncEngine;
pub use uring::UringEngine;

/// One host operation. Pointers must stay valid until the operation completes.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    Readv {
        fd: RawFd,
        offset: u64,
        iov: *const libc::iovec,
        iovcnt: u32,
    },
    Writev {
        fd: RawFd,
        offset: u64,
        iov: *const libc::iovec,
        iovcnt: u32,
    },
    /// `fdatasync(2)`.
    Fdatasync { fd: RawFd },
    /// `fallocate(2)` with `mode`.
    Fallocate {
        fd: RawFd,
        mode: i32,
        offset: u64,
        len: u64,
    },
}

/// Which engine to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring where the kernel allows it, else synchronous.
    Auto,
    IoUring,
    Sync,
}

/// A queue thread's I/O engine.
pub enum Engine {
    Uring(Box<UringEngine>),
    Sync(SyncEngine),
}

impl Engine {
    /// An engine with room for `depth` operations in flight. An asynchronous engine signals
    /// `completion_fd` (an eventfd) when operations complete.
    pub fn new(kind: EngineKind, depth: u32, completion_fd: RawFd) -> io::Result<Engine> {
        match kind {
            EngineKind::Sync => Ok(Engine::Sync(SyncEngine::new())),
            EngineKind::IoUring => {
                UringEngine::new(depth, completion_fd).map(|e| Engine::Uring(Box::new(e)))
            }
            EngineKind::Auto => match UringEngine::new(depth, completion_fd) {
                Ok(engine) => Ok(Engine::Uring(Box::new(engine))),
                Err(e) => {
                    log::warn!("io_uring unavailable ({e}); using synchronous I/O");
                    Ok(Engine::Sync(SyncEngine::new()))
                }
            },
        }
    }

    /// Queue `op`. When `link` is set, the next pushed operation runs only after this one
    /// succeeds (it fails with `ECANCELED` otherwise).
    ///
    /// # Safety
    /// Every pointer in `op` must stay valid until its completion has been reaped.
    pub unsafe fn push(&mut self, op: Op, user_data: u64, link: bool) -> io::Result<()> {
        match self {
            // SAFETY: forwarded contract.
            Engine::Uring(e) => unsafe { e.push(op, user_data, link) },
            // SAFETY: forwarded contract.
            Engine::Sync(e) => unsafe { e.push(op, user_data, link) },
        }
    }

    /// Hand every pushed operation to the kernel.
    pub fn submit(&mut self) -> io::Result<()> {
        match self {
            Engine::Uring(e) => e.submit(),
            Engine::Sync(_) => Ok(()),
        }
    }

    /// Call `f(user_data, result)` for every finished operation; `result` is the syscall's
    /// return value or a negated errno.
    pub fn reap(&mut self, f: impl FnMut(u64, i32)) {
        match self {
            Engine::Uring(e) => e.reap(f),
            Engine::Sync(e) => e.reap(f),
        }
    }

    /// Block until at least one completion is ready, if any operation is in flight.
    pub fn wait(&mut self) -> io::Result<()> {
        match self {
            Engine::Uring(e) => e.wait(),
            Engine::Sync(_) => Ok(()),
        }
    }

    /// Operations pushed and not yet reaped.
    pub fn in_flight(&self) -> usize {
        match self {
            Engine::Uring(e) => e.in_flight(),
            Engine::Sync(e) => e.in_flight(),
        }
    }
}

/// Run `op` synchronously. Returns the syscall's result or a negated errno, like a CQE.
///
/// # Safety
/// Every pointer in `op` must be valid for the duration of the call.
pub unsafe fn run_sync(op: Op) -> i32 {
    // SAFETY: the caller guarantees the pointers are valid; the fds are plain integers the
    // kernel checks.
    let ret: i64 = unsafe {
        match op {
            Op::Readv {
                fd,
                offset,
                iov,
                iovcnt,
            } => libc::preadv(fd, iov, iovcnt as i32, offset as i64) as i64,
            Op::Writev {
                fd,
                offset,
                iov,
                iovcnt,
            } => libc::pwritev(fd, iov, iovcnt as i32, offset as i64) as i64,
            Op::Fdatasync { fd } => libc::fdatasync(fd) as i64,
            Op::Fallocate {
                fd,
                mode,
                offset,
                len,
            } => libc::fallocate(fd, mode, offset as i64, len as i64) as i64,
        }
    };
    if ret < 0 {
        -io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        // The kernel caps one transfer at MAX_RW_COUNT (just under 2 GiB), so this fits.
        ret.min(i64::from(i32::MAX)) as i32
    }
}
