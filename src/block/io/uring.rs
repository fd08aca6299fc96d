//! The io_uring engine.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types, IoUring};

use super::{Op, UringSetup};

/// How long a submission-polling kernel thread (`--io-sqpoll`) spins after the last submission
/// before it sleeps (the next submission then wakes it with a system call).
pub const SQPOLL_IDLE_MS: u32 = 10;

/// One io_uring instance that signals an eventfd on every completion.
pub struct UringEngine {
    ring: IoUring,
    in_flight: usize,
    /// Operations completed inline, reaped before the ring's completions.
    inline_done: VecDeque<(u64, i32)>,
    /// Whether transfers may complete inline at all.
    pub(super) allow_inline: bool,
    /// Bytes moved by the operations in `inline_done`.
    inline_bytes: u64,
}

impl UringEngine {
    /// A ring with room for `depth` operations (rounded up by the kernel to a power of two),
    /// signalling `completion_fd` when operations complete.
    pub fn new(depth: u32, completion_fd: RawFd, setup: UringSetup) -> io::Result<Self> {
        let mut builder = IoUring::builder();
        if let Some(cpu) = setup.sqpoll_cpu {
            builder.setup_sqpoll(SQPOLL_IDLE_MS).setup_sqpoll_cpu(cpu);
        }
        let ring = builder
            .build(depth.clamp(8, 4096))
            .map_err(|e| match setup.sqpoll_cpu {
                Some(cpu) => io::Error::new(
                    e.kind(),
                    format!("io_uring with a submission-polling thread on CPU {cpu}: {e}"),
                ),
                None => e,
            })?;
        ring.submitter().register_eventfd(completion_fd)?;
        Ok(UringEngine {
            ring,
            in_flight: 0,
            inline_done: VecDeque::new(),
            allow_inline: true,
            inline_bytes: 0,
        })
    }

    /// Queue `op`, submitting what is queued first if the submission ring is full.
    ///
    /// # Safety
    /// Every pointer in `op` must stay valid until its completion has been reaped.
    pub unsafe fn push(&mut self, op: Op, user_data: u64, link: bool) -> io::Result<()> {
        let mut entry = match op {
            Op::Readv {
                fd,
                offset,
                iov,
                iovcnt,
            } => opcode::Readv::new(types::Fd(fd), iov, iovcnt)
                .offset(offset)
                .build(),
            Op::Writev {
                fd,
                offset,
                iov,
                iovcnt,
            } => opcode::Writev::new(types::Fd(fd), iov, iovcnt)
                .offset(offset)
                .build(),
            Op::Fdatasync { fd } => opcode::Fsync::new(types::Fd(fd))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Fallocate {
                fd,
                mode,
                offset,
                len,
            } => opcode::Fallocate::new(types::Fd(fd), len)
                .offset(offset)
                .mode(mode)
                .build(),
        }
        .user_data(user_data);
        if link {
            entry = entry.flags(squeue::Flags::IO_LINK);
        }
        // SAFETY: the caller keeps the buffers the entry points to alive until completion.
        while unsafe { self.ring.submission().push(&entry) }.is_err() {
            // The submission ring is full: hand it to the kernel to make room. A linked chain
            // may be split by this; the kernel then treats the pieces as separate chains, which
            // only happens with more operations in flight than the ring has entries.
            self.ring.submit()?;
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Record an operation the caller completed inline.
    pub fn complete_inline(&mut self, user_data: u64, result: i32) {
        self.inline_done.push_back((user_data, result));
        self.inline_bytes += u64::try_from(result).unwrap_or(0);
        self.in_flight += 1;
    }

    /// Bytes moved by operations completed inline and not yet reaped.
    pub fn inline_bytes(&self) -> u64 {
        self.inline_bytes
    }

    pub fn submit(&mut self) -> io::Result<()> {
        {
            let sq = self.ring.submission();
            // Nothing queued and no completions held back by the kernel: entering the kernel
            // would be a wasted system call on every wake-up.
            if sq.is_empty() && !sq.cq_overflow() && !sq.taskrun() {
                return Ok(());
            }
        }
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EBUSY: the completion ring is overflowing; reaping makes room.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    pub fn reap(&mut self, mut f: impl FnMut(u64, i32)) {
        self.inline_bytes = 0;
        while let Some((user_data, result)) = self.inline_done.pop_front() {
            self.in_flight -= 1;
            f(user_data, result);
        }
        let mut completion = self.ring.completion();
        completion.sync();
        for cqe in &mut completion {
            self.in_flight = self.in_flight.saturating_sub(1);
            f(cqe.user_data(), cqe.result());
        }
    }

    /// Block until a completion is ready, if anything is in flight.
    pub fn wait(&mut self) -> io::Result<()> {
        if self.in_flight == 0 || !self.inline_done.is_empty() {
            return Ok(());
        }
        match self.ring.submit_and_wait(1) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}
