//! I/O engines: how a queue thread moves data between guest memory and host files.
//!
//! Each queue thread owns one [`Engine`]. Requests push operations, the thread submits them as a
//! batch once per kick, and completions come back through [`Engine::reap`]. The io_uring engine
//! signals finished operations on an eventfd that the queue thread's epoll loop watches; the
//! synchronous engine runs each operation when it is pushed, for kernels or sandboxes without
//! io_uring.

mod sync;
pub mod transfer;
pub mod uring;

use std::io;
use std::os::fd::RawFd;

pub use sync::SyncEngine;
pub use uring::UringEngine;

use super::remote::{CompletionSink, RemoteOp, RemoteStore};

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

/// Whether a transfer may be done inline, in the queue thread, instead of asynchronously.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InlinePolicy {
    /// Always asynchronous (direct I/O, block devices: the kernel would make the thread wait).
    #[default]
    Never,
    /// Try without blocking first (`RWF_NOWAIT`): a page-cache hit completes inline, anything
    /// that would wait goes to the asynchronous engine.
    NoWait,
    /// Always inline: memory-backed files (tmpfs), where a transfer is a memory copy and an
    /// asynchronous hand-off only adds a thread hop.
    Always,
}

/// Which engine to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring where the kernel allows it (else synchronous), with transfers the page cache
    /// or memory can serve at once done inline.
    Auto(UringSetup),
    /// Everything through io_uring.
    IoUring(UringSetup),
    /// Everything synchronous.
    Sync,
}

/// How each queue's io_uring is set up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UringSetup {
    /// Have a kernel thread pinned to this CPU poll the submission ring
    /// (`IORING_SETUP_SQPOLL`), so that submitting costs no system call while it is awake.
    /// It spins for [`uring::SQPOLL_IDLE_MS`] after the last submission: a CPU traded for
    /// latency, worth it only with a CPU to spare.
    pub sqpoll_cpu: Option<u32>,
}

/// A queue thread's I/O engine: host files through io_uring (or synchronously), remote stores
/// through their own asynchronous APIs, both completing into one [`Engine::reap`] and
/// signalling the same eventfd.
pub struct Engine {
    local: Local,
    remote: CompletionSink,
}

/// The engine for host files.
enum Local {
    Uring(Box<UringEngine>),
    Sync(SyncEngine),
}

/// The full length of a transfer, if `op` is one.
fn transfer_len(op: &Op) -> Option<usize> {
    match *op {
        Op::Readv { iov, iovcnt, .. } | Op::Writev { iov, iovcnt, .. } => {
            // SAFETY: the caller of `push_transfer` guarantees the iovec array is valid.
            let iovecs = unsafe { std::slice::from_raw_parts(iov, iovcnt as usize) };
            Some(iovecs.iter().map(|v| v.iov_len).sum())
        }
        _ => None,
    }
}

/// Try a transfer without blocking (`preadv2`/`pwritev2` with `RWF_NOWAIT`). Returns its
/// result if it moved everything; `None` if it would have had to wait (or the file cannot
/// say), leaving the caller to do it asynchronously. A partial write is harmless: the
/// asynchronous retry writes the same bytes again.
///
/// # Safety
/// Every pointer in `op` must be valid for the duration of the call.
unsafe fn run_nowait(op: Op) -> Option<i32> {
    let expected = transfer_len(&op)?;
    // SAFETY: forwarded contract.
    let ret = unsafe { run_transfer(&op, libc::RWF_NOWAIT) }?;
    (ret >= 0 && ret as usize == expected).then_some(ret as i32)
}

/// `preadv2`/`pwritev2` with `flags`; `None` if `op` is not a transfer.
///
/// # Safety
/// Every pointer in `op` must be valid for the duration of the call.
unsafe fn run_transfer(op: &Op, flags: libc::c_int) -> Option<isize> {
    // SAFETY: forwarded contract; the fds are plain integers the kernel checks.
    unsafe {
        match *op {
            Op::Readv {
                fd,
                offset,
                iov,
                iovcnt,
            } => Some(libc::preadv2(fd, iov, iovcnt as i32, offset as i64, flags)),
            Op::Writev {
                fd,
                offset,
                iov,
                iovcnt,
            } => Some(libc::pwritev2(fd, iov, iovcnt as i32, offset as i64, flags)),
            _ => None,
        }
    }
}

impl Engine {
    /// An engine with room for `depth` operations in flight. An asynchronous engine signals
    /// `completion_fd` (an eventfd) when operations complete.
    pub fn new(kind: EngineKind, depth: u32, completion_fd: RawFd) -> io::Result<Engine> {
        Ok(Engine {
            local: Local::new(kind, depth, completion_fd)?,
            remote: CompletionSink::new(completion_fd)?,
        })
    }

    /// Start `op` on a remote store.
    ///
    /// # Safety
    /// Every pointer in `op` must stay valid until its completion has been reaped.
    pub unsafe fn push_remote(&mut self, store: &dyn RemoteStore, op: RemoteOp, user_data: u64) {
        // SAFETY: forwarded contract.
        unsafe { self.remote.submit(store, op, user_data) }
    }

    /// Queue `op`. When `link` is set, the next pushed operation runs only after this one
    /// succeeds (it fails with `ECANCELED` otherwise).
    ///
    /// # Safety
    /// Every pointer in `op` must stay valid until its completion has been reaped.
    pub unsafe fn push(&mut self, op: Op, user_data: u64, link: bool) -> io::Result<()> {
        match &mut self.local {
            // SAFETY: forwarded contract.
            Local::Uring(e) => unsafe { e.push(op, user_data, link) },
            // SAFETY: forwarded contract.
            Local::Sync(e) => unsafe { e.push(op, user_data, link) },
        }
    }

    /// Queue a read or write, completing it inline when `policy` allows and it can be done
    /// without waiting; other operations go through [`Engine::push`].
    ///
    /// # Safety
    /// As for [`Engine::push`].
    pub unsafe fn push_transfer(
        &mut self,
        op: Op,
        user_data: u64,
        policy: InlinePolicy,
    ) -> io::Result<()> {
        let Local::Uring(e) = &mut self.local else {
            // SAFETY: forwarded contract.
            return unsafe { self.push(op, user_data, false) };
        };
        let policy = if e.allow_inline {
            policy
        } else {
            InlinePolicy::Never
        };
        let inline = match policy {
            InlinePolicy::Never => None,
            // SAFETY: forwarded contract.
            InlinePolicy::NoWait => unsafe { run_nowait(op) },
            // SAFETY: forwarded contract.
            InlinePolicy::Always => Some(unsafe { run_sync(op) }),
        };
        match inline {
            Some(result) => {
                e.complete_inline(user_data, result);
                Ok(())
            }
            // SAFETY: forwarded contract.
            None => unsafe { e.push(op, user_data, false) },
        }
    }

    /// Hand every pushed operation to the kernel.
    pub fn submit(&mut self) -> io::Result<()> {
        match &mut self.local {
            Local::Uring(e) => e.submit(),
            Local::Sync(_) => Ok(()),
        }
    }

    /// Call `f(user_data, result)` for every finished operation; `result` is the syscall's
    /// return value or a negated errno.
    pub fn reap(&mut self, mut f: impl FnMut(u64, i32)) {
        match &mut self.local {
            Local::Uring(e) => e.reap(&mut f),
            Local::Sync(e) => e.reap(&mut f),
        }
        self.remote.reap(f);
    }

    /// Bytes moved by transfers done in the calling thread whose results are not reaped yet:
    /// work the caller has finished but not yet handed back.
    pub fn done_inline_bytes(&self) -> u64 {
        match &self.local {
            Local::Uring(e) => e.inline_bytes(),
            Local::Sync(e) => e.done_bytes(),
        }
    }

    /// Block until at least one completion is ready, if any operation is in flight.
    pub fn wait(&mut self) -> io::Result<()> {
        let local = match &self.local {
            Local::Uring(e) => e.in_flight(),
            Local::Sync(_) => 0,
        };
        match (local, self.remote.in_flight()) {
            (_, 0) => match &mut self.local {
                Local::Uring(e) => e.wait(),
                Local::Sync(_) => Ok(()),
            },
            (0, _) => {
                self.remote.wait(None);
                Ok(())
            }
            // Both kinds in flight (a graph of local and remote nodes): neither wait covers
            // the other, so wait on the remote side briefly and let the caller look again.
            _ => {
                self.remote.wait(Some(std::time::Duration::from_millis(1)));
                Ok(())
            }
        }
    }

    /// Operations pushed and not yet reaped.
    pub fn in_flight(&self) -> usize {
        let local = match &self.local {
            Local::Uring(e) => e.in_flight(),
            Local::Sync(e) => e.in_flight(),
        };
        local + self.remote.in_flight()
    }
}

impl Local {
    fn new(kind: EngineKind, depth: u32, completion_fd: RawFd) -> io::Result<Local> {
        match kind {
            EngineKind::Sync => Ok(Local::Sync(SyncEngine::new())),
            EngineKind::IoUring(setup) => {
                UringEngine::new(depth, completion_fd, setup).map(|mut e| {
                    e.allow_inline = false;
                    Local::Uring(Box::new(e))
                })
            }
            // SQPOLL was asked for: failing to set it up is an error, not a fallback.
            EngineKind::Auto(setup) if setup.sqpoll_cpu.is_some() => {
                UringEngine::new(depth, completion_fd, setup).map(|e| Local::Uring(Box::new(e)))
            }
            EngineKind::Auto(setup) => match UringEngine::new(depth, completion_fd, setup) {
                Ok(engine) => Ok(Local::Uring(Box::new(engine))),
                Err(e) => {
                    log::warn!("io_uring unavailable ({e}); using synchronous I/O");
                    Ok(Local::Sync(SyncEngine::new()))
                }
            },
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
            // Always `Some` for these two.
            Op::Readv { .. } | Op::Writev { .. } => run_transfer(&op, 0).map_or(-1, |r| r as i64),
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
