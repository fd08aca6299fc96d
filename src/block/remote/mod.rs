//! Remote protocol nodes: block storage reached through a client library or a network
//! protocol instead of a file descriptor: Ceph RBD ([`rbd`]) and NBD ([`nbd`]).
//!
//! A [`super::file::FileNode`] holds either a host file or a [`RemoteStore`]; format nodes
//! above it cannot tell. Data I/O on a remote store is asynchronous like io_uring's: the queue
//! thread hands a [`RemoteOp`] to [`RemoteStore::submit`] with a [`Completion`], the store's
//! own threads (librbd's, or the NBD connection's reader) finish it, and the completion is
//! queued for the queue thread's engine and signalled on the same eventfd io_uring signals
//! ([`CompletionSink`]). Metadata I/O (qcow2 tables, bitmaps) uses the synchronous helpers,
//! built on the same submission path with a one-shot wait.
//!
//! Which store a name means is decided by [`location`], from QEMU's own spellings:
//! `rbd:pool/image`, `nbd+unix:///export?socket=PATH`, `json:{"driver": "rbd", ...}`.

pub mod location;
pub mod nbd;
pub mod rbd;

use std::fmt::Debug;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::ZeroOp;

/// One asynchronous operation on a remote store. Pointers must stay valid until the
/// operation's [`Completion`] has been completed.
#[derive(Clone, Copy, Debug)]
pub enum RemoteOp {
    Readv {
        offset: u64,
        iov: *const libc::iovec,
        iovcnt: u32,
    },
    Writev {
        offset: u64,
        iov: *const libc::iovec,
        iovcnt: u32,
    },
    /// Make every completed write durable (RBD: on the OSDs' journals; NBD: `NBD_CMD_FLUSH`).
    Flush,
    /// A discard or write-zeroes.
    Zeroes { offset: u64, len: u64, op: ZeroOp },
}

impl RemoteOp {
    /// A read (or, with `write`, a write) of `iov` at `offset`.
    pub fn transfer(write: bool, offset: u64, iov: &[libc::iovec]) -> RemoteOp {
        let (iov, iovcnt) = (iov.as_ptr(), iov.len() as u32);
        if write {
            RemoteOp::Writev {
                offset,
                iov,
                iovcnt,
            }
        } else {
            RemoteOp::Readv {
                offset,
                iov,
                iovcnt,
            }
        }
    }

    /// The iovecs of a transfer.
    ///
    /// # Safety
    /// The op's iovec pointer must be valid (see [`RemoteOp`]).
    pub unsafe fn iovecs(&self) -> &[libc::iovec] {
        match *self {
            RemoteOp::Readv { iov, iovcnt, .. } | RemoteOp::Writev { iov, iovcnt, .. } => {
                // SAFETY: forwarded contract.
                unsafe { std::slice::from_raw_parts(iov, iovcnt as usize) }
            }
            _ => &[],
        }
    }
}

/// Block storage behind a client library or a network protocol.
///
/// Implementations are shared by every queue thread and must accept submissions from any of
/// them at once.
pub trait RemoteStore: Send + Sync + Debug {
    /// The protocol's name as QEMU spells its driver (`rbd`, `nbd`).
    fn driver(&self) -> &'static str;

    /// The store's size in bytes now.
    fn size(&self) -> io::Result<u64>;

    /// Make the store at least `size` bytes long. Stores that cannot grow say why.
    fn grow_to(&self, size: u64) -> io::Result<()>;

    /// Start `op`; its result (bytes moved or 0, or a negated errno) reaches `done`, from any
    /// thread, possibly before this returns. A store that cannot start it completes `done`
    /// with the error.
    ///
    /// # Safety
    /// Every pointer in `op` must stay valid until `done` is completed.
    unsafe fn submit(&self, op: RemoteOp, done: Completion);

    /// The alignment of offsets and lengths the store takes (an NBD export's minimum block
    /// size; 1 for byte-addressed stores).
    fn min_block(&self) -> u64 {
        1
    }

    /// Whether `[offset, offset + len)` starts with stored data (`false`: reads as zeroes),
    /// and for how many bytes. The default cannot tell and says data everywhere.
    fn allocation(&self, _offset: u64, len: u64) -> io::Result<(u64, bool)> {
        Ok((len, true))
    }
}

/// Synchronous helpers for metadata, on top of [`RemoteStore::submit`].
impl dyn RemoteStore {
    /// Run `op` and wait for it.
    ///
    /// # Safety
    /// As for [`RemoteStore::submit`], until this returns.
    unsafe fn run(&self, op: RemoteOp) -> io::Result<i32> {
        let (done, waiter) = Completion::oneshot();
        // SAFETY: forwarded contract; `wait` returns only after the completion.
        unsafe { self.submit(op, done) };
        let result = waiter.wait();
        if result < 0 {
            Err(io::Error::from_raw_os_error(-result))
        } else {
            Ok(result)
        }
    }

    /// Read exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let op = RemoteOp::Readv {
            offset,
            iov: &iov,
            iovcnt: 1,
        };
        // SAFETY: `iov` and `buf` outlive the wait.
        unsafe { self.run(op) }.map(drop)
    }

    /// Write all of `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let iov = libc::iovec {
            iov_base: buf.as_ptr().cast_mut().cast(),
            iov_len: buf.len(),
        };
        let op = RemoteOp::Writev {
            offset,
            iov: &iov,
            iovcnt: 1,
        };
        // SAFETY: `iov` and `buf` outlive the wait; a write only reads the buffer.
        unsafe { self.run(op) }.map(drop)
    }

    pub fn flush(&self) -> io::Result<()> {
        // SAFETY: no pointers.
        unsafe { self.run(RemoteOp::Flush) }.map(drop)
    }

    pub fn zeroes(&self, offset: u64, len: u64, op: ZeroOp) -> io::Result<()> {
        // SAFETY: no pointers.
        unsafe { self.run(RemoteOp::Zeroes { offset, len, op }) }.map(drop)
    }
}

/// Where a remote operation's result goes.
pub struct Completion {
    target: Option<Target>,
    user_data: u64,
}

enum Target {
    /// A queue thread's engine.
    Sink(Arc<SinkShared>),
    /// A synchronous caller waiting in [`Waiter::wait`].
    Oneshot(Arc<(Mutex<Option<i32>>, Condvar)>),
}

impl Completion {
    /// A completion for one synchronous caller, and what it waits on.
    pub fn oneshot() -> (Completion, Waiter) {
        let shared = Arc::new((Mutex::new(None), Condvar::new()));
        let completion = Completion {
            target: Some(Target::Oneshot(shared.clone())),
            user_data: 0,
        };
        (completion, Waiter(shared))
    }

    /// Hand the operation's result back: bytes moved or 0 on success, a negated errno on
    /// failure.
    pub fn complete(mut self, result: i32) {
        if let Some(target) = self.target.take() {
            deliver(target, self.user_data, result);
        }
    }
}

impl Drop for Completion {
    /// A store that lost an operation without completing it (a bug, or a connection torn
    /// down) reports it failed rather than leaving its request hanging.
    fn drop(&mut self) {
        if let Some(target) = self.target.take() {
            deliver(target, self.user_data, -libc::EIO);
        }
    }
}

fn deliver(target: Target, user_data: u64, result: i32) {
    match target {
        Target::Sink(sink) => sink.push(user_data, result),
        Target::Oneshot(shared) => {
            let (slot, cond) = &*shared;
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
            cond.notify_all();
        }
    }
}

/// What a synchronous caller of a remote operation waits on.
pub struct Waiter(Arc<(Mutex<Option<i32>>, Condvar)>);

impl Waiter {
    /// The operation's result, once it has one.
    pub fn wait(self) -> i32 {
        let (slot, cond) = &*self.0;
        let mut result = slot.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = *result {
                return r;
            }
            result = cond.wait(result).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A queue thread's inbox for remote completions: results are queued here by the stores'
/// threads and the queue thread's eventfd is signalled, exactly as io_uring signals it.
pub struct CompletionSink {
    shared: Arc<SinkShared>,
    /// Operations submitted and not yet reaped (only the owning thread changes it).
    in_flight: usize,
}

struct SinkShared {
    done: Mutex<Vec<(u64, i32)>>,
    /// `done` is not empty: checked without the lock by a polling queue thread.
    ready: AtomicBool,
    cond: Condvar,
    /// A duplicate of the queue's eventfd: a store's thread may complete an operation after
    /// the queue let go of its own descriptor, and must never write to a reused number.
    /// `None` for a queue that only waits (tests with the synchronous engine).
    wake: Option<OwnedFd>,
}

impl SinkShared {
    fn push(&self, user_data: u64, result: i32) {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((user_data, result));
        self.ready.store(true, Ordering::Release);
        self.cond.notify_all();
        if let Some(wake) = &self.wake {
            let one = 1u64.to_ne_bytes();
            // SAFETY: an 8-byte write from a live buffer to our own descriptor. It can only
            // fail if the counter would overflow, in which case the queue is awake anyway.
            let _ = unsafe { libc::write(wake.as_raw_fd(), one.as_ptr().cast(), 8) };
        }
    }
}

impl CompletionSink {
    /// A sink signalling `wake_fd` (an eventfd; duplicated, the caller keeps its own; a
    /// negative number for none).
    pub fn new(wake_fd: RawFd) -> io::Result<CompletionSink> {
        let wake = if wake_fd < 0 {
            None
        } else {
            // SAFETY: F_DUPFD_CLOEXEC on a descriptor the caller owns; the new one is ours.
            let dup = unsafe { libc::fcntl(wake_fd, libc::F_DUPFD_CLOEXEC, 0) };
            if dup < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `dup` was just created and is owned by nothing else.
            Some(unsafe { OwnedFd::from_raw_fd(dup) })
        };
        Ok(CompletionSink {
            shared: Arc::new(SinkShared {
                done: Mutex::new(Vec::new()),
                ready: AtomicBool::new(false),
                cond: Condvar::new(),
                wake,
            }),
            in_flight: 0,
        })
    }

    /// Start `op` on `store`, its result to be reaped with `user_data`.
    ///
    /// # Safety
    /// As for [`RemoteStore::submit`]: pointers valid until the result has been reaped.
    pub unsafe fn submit(&mut self, store: &dyn RemoteStore, op: RemoteOp, user_data: u64) {
        self.in_flight += 1;
        let done = Completion {
            target: Some(Target::Sink(self.shared.clone())),
            user_data,
        };
        // SAFETY: forwarded contract.
        unsafe { store.submit(op, done) };
    }

    /// Call `f(user_data, result)` for every finished operation.
    pub fn reap(&mut self, mut f: impl FnMut(u64, i32)) {
        if self.in_flight == 0 || !self.shared.ready.load(Ordering::Acquire) {
            return;
        }
        let done = {
            let mut done = self.shared.done.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.ready.store(false, Ordering::Relaxed);
            std::mem::take(&mut *done)
        };
        for (user_data, result) in done {
            self.in_flight -= 1;
            f(user_data, result);
        }
    }

    /// Operations submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Block until a completion is ready or `timeout` passes (`None`: no limit), if any
    /// operation is in flight.
    pub fn wait(&self, timeout: Option<Duration>) {
        if self.in_flight == 0 {
            return;
        }
        let done = self.shared.done.lock().unwrap_or_else(|e| e.into_inner());
        let ready = |d: &mut Vec<(u64, i32)>| d.is_empty();
        let _ = match timeout {
            Some(t) => self
                .shared
                .cond
                .wait_timeout_while(done, t, ready)
                .map(drop)
                .map_err(drop),
            None => self
                .shared
                .cond
                .wait_while(done, ready)
                .map(drop)
                .map_err(drop),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    /// A store that completes every operation from another thread with a fixed result.
    #[derive(Debug)]
    struct Echo(i32);

    impl RemoteStore for Echo {
        fn driver(&self) -> &'static str {
            "echo"
        }
        fn size(&self) -> io::Result<u64> {
            Ok(0)
        }
        fn grow_to(&self, _: u64) -> io::Result<()> {
            Ok(())
        }
        unsafe fn submit(&self, _op: RemoteOp, done: Completion) {
            let result = self.0;
            std::thread::spawn(move || done.complete(result));
        }
    }

    /// A store that forgets its operations.
    #[derive(Debug)]
    struct Forgetful;

    impl RemoteStore for Forgetful {
        fn driver(&self) -> &'static str {
            "forgetful"
        }
        fn size(&self) -> io::Result<u64> {
            Ok(0)
        }
        fn grow_to(&self, _: u64) -> io::Result<()> {
            Ok(())
        }
        unsafe fn submit(&self, _op: RemoteOp, done: Completion) {
            drop(done);
        }
    }

    #[test]
    fn completions_reach_the_sink_and_signal_its_eventfd() {
        let wake = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut sink = CompletionSink::new(wake.as_raw_fd()).unwrap();
        let store = Echo(4096);
        for user_data in [7, 8] {
            // SAFETY: no pointers.
            unsafe { sink.submit(&store, RemoteOp::Flush, user_data) };
        }
        let mut got = Vec::new();
        while got.len() < 2 {
            sink.wait(None);
            sink.reap(|u, r| got.push((u, r)));
        }
        got.sort();
        assert_eq!(got, [(7, 4096), (8, 4096)]);
        assert_eq!(sink.in_flight(), 0);
        assert!(wake.read().unwrap() >= 1);
    }

    #[test]
    fn a_dropped_completion_fails_its_operation() {
        let wake = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut sink = CompletionSink::new(wake.as_raw_fd()).unwrap();
        // SAFETY: no pointers.
        unsafe { sink.submit(&Forgetful, RemoteOp::Flush, 1) };
        let mut got = Vec::new();
        sink.reap(|u, r| got.push((u, r)));
        assert_eq!(got, [(1, -libc::EIO)]);
        let store: &dyn RemoteStore = &Forgetful;
        assert_eq!(store.flush().unwrap_err().raw_os_error(), Some(libc::EIO));
    }

    #[test]
    fn synchronous_helpers_report_errors() {
        let store: &dyn RemoteStore = &Echo(-libc::ENOSPC);
        let err = store.write_at(&[1, 2, 3], 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        let ok: &dyn RemoteStore = &Echo(3);
        ok.write_at(&[1, 2, 3], 0).unwrap();
    }
}
