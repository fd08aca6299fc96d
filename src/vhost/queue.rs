//! One virtqueue's worker: pops requests, runs them through the block graph and the I/O engine,
//! and returns them to the guest.
//!
//! Each queue has its own worker and its own thread, so queues never contend: the only shared
//! state on the path is the read-only device and whatever short, per-node locks a format driver
//! takes while mapping. A request occupies a [`Slot`] from the moment it is popped until its
//! status is written and it is put on the used ring; the slot keeps the guest memory mapping,
//! the iovecs the kernel reads or writes, and the count of operations still in flight.

use std::collections::VecDeque;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bitmap::BitmapCursor;
use crate::block::file::AlignedBuf;
use crate::block::io::{self, Engine, InlinePolicy, Op};
use crate::block::{Extent, GuestIo, HostZeroOp, IoTicket, Mapping, ZeroOp};
use crate::virtio_blk::device::BlockDevice;
use crate::virtio_blk::request::{self, GuestMemory, Request, RequestBuffers, RequestKind};
use crate::virtio_blk::{DeviceLimits, Status};

/// The vring type the daemon uses.
pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMemory>>;

/// Requests popped per wake-up before the worker yields to its other events. A guest that keeps
/// its queue full cannot keep the thread from completing requests or serving a shutdown.
const MAX_REQUESTS_PER_WAKEUP: usize = 256;

/// A pass over at least this many available requests hands the first half back as soon as it
/// is done (see [`QueueWorker::publish_done`]).
const SPLIT_BATCHES_FROM: usize = 4;

/// Longest a busy-polling worker keeps its queue before going back to its event loop, so that
/// a guest that never lets the queue go idle cannot keep the control path (which stops queues
/// and drains them) waiting.
const MAX_POLL_SESSION: Duration = Duration::from_millis(1);

/// State of one in-flight request.
struct Slot {
    head: u16,
    status: GuestAddress,
    kind: RequestKind,
    /// Bytes written into the guest's buffers, status byte included, if the request succeeds.
    used_len: u32,
    /// Engine operations not yet completed.
    pending: u32,
    failed: bool,
    /// A writethrough sync has been issued for this request.
    synced: bool,
    bufs: RequestBuffers,
    /// iovecs cut at extent boundaries, for requests that map to several extents.
    split_iov: Vec<libc::iovec>,
    ops: Vec<SlotOp>,
    /// Keeps the guest memory the iovecs point into mapped until the request completes.
    mem: Option<Arc<GuestMemory>>,
    /// Handed back to the block driver when the request's data I/O is over.
    ticket: IoTicket,
    /// The request passed the write gate and must leave it when it completes.
    gated: bool,
}

/// An operation a slot has pushed, kept to retry short transfers and fall back on refusals.
#[derive(Clone, Copy)]
struct SlotOp {
    op: Op,
    /// For transfers: whether the engine may complete it inline.
    inline: InlinePolicy,
    /// Bytes a transfer moves.
    expected: u64,
    /// For fallocate operations: what it implements.
    zero: Option<(usize, ZeroOp)>,
}

// SAFETY: the raw pointers in a slot point into guest memory that `Slot::mem` keeps mapped, or
// into the slot's own vectors; a slot is only ever used by the thread that holds its worker.
unsafe impl Send for Slot {}

impl Slot {
    fn new(limits: &DeviceLimits) -> Self {
        Slot {
            head: 0,
            status: GuestAddress(0),
            kind: RequestKind::Flush,
            used_len: 0,
            pending: 0,
            failed: false,
            synced: false,
            bufs: RequestBuffers::with_limits(limits),
            split_iov: Vec::new(),
            ops: Vec::new(),
            mem: None,
            ticket: IoTicket::None,
            gated: false,
        }
    }
}

/// Logs at most one message per interval, counting the rest, so a hostile guest cannot flood
/// the log.
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    const INTERVAL: Duration = Duration::from_secs(5);

    fn new() -> Self {
        RateLimitedLog {
            last: None,
            suppressed: 0,
        }
    }

    fn warn(&mut self, queue: usize, msg: std::fmt::Arguments) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Self::INTERVAL)
        {
            self.suppressed += 1;
            return;
        }
        if self.suppressed > 0 {
            log::warn!(
                "queue {queue}: {msg} ({} similar messages suppressed)",
                self.suppressed
            );
        } else {
            log::warn!("queue {queue}: {msg}");
        }
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// The worker of one virtqueue.
pub struct QueueWorker {
    index: usize,
    device: Arc<BlockDevice>,
    mem: GuestMemoryAtomic<GuestMemory>,
    /// Whether the guest enabled the volatile write cache (`writeback` in config space).
    writeback: Arc<AtomicBool>,
    engine: Engine,
    /// Signalled by the engine on completions, by the worker to resume later, and by the
    /// write gate when it reopens.
    wake: Arc<EventFd>,
    /// Writes held back while the write gate is closed.
    deferred: VecDeque<(u32, Request)>,
    bitmap_cursor: BitmapCursor,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// The vring, kept from the first event so that [`QueueWorker::drain`] can complete requests.
    vring: Option<Vring>,
    /// Work is left on the available ring (budget used up or no free slot).
    resume: bool,
    /// Busy-polling: the guest's notifications stay suppressed while the ring is empty.
    polling: bool,
    used_added: bool,
    extents: Vec<Extent>,
    zero_ops: Vec<HostZeroOp>,
    completions: Vec<(u64, i32)>,
    log: RateLimitedLog,
}

impl QueueWorker {
    pub fn new(
        index: usize,
        device: Arc<BlockDevice>,
        mem: GuestMemoryAtomic<GuestMemory>,
        writeback: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        device.bitmaps().gate().register_waker(&wake);
        let bitmap_cursor = device.bitmaps().cursor();
        let depth = u32::from(device.queue_size());
        let engine = Engine::new(device.engine(), depth * 2, wake.as_raw_fd())?;
        let slots = (0..depth).map(|_| Slot::new(device.limits())).collect();
        Ok(QueueWorker {
            index,
            device,
            mem,
            writeback,
            engine,
            wake,
            deferred: VecDeque::new(),
            bitmap_cursor,
            slots,
            free: (0..depth).rev().collect(),
            vring: None,
            resume: false,
            polling: false,
            used_added: false,
            extents: Vec::new(),
            zero_ops: Vec::new(),
            completions: Vec::new(),
            log: RateLimitedLog::new(),
        })
    }

    /// The eventfd the queue thread's epoll loop must watch.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Handle a wake-up: the guest kicked the queue (`kick`), or completions or leftover work
    /// are ready.
    pub fn handle_event(&mut self, vring: &Vring, kick: bool) {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        if !kick {
            // Clear the wake-up being handled (a level-triggered epoll reports it until then);
            // a kick leaves it alone, saving a system call per request.
            let _ = self.wake.read();
        }
        let mut state = vring.get_mut();
        self.run_deferred(&mut state);
        if kick || std::mem::take(&mut self.resume) {
            self.process_avail(&mut state);
        }
        self.run_completions(&mut state);
        self.notify_guest(&mut state);
        if let Some(window) = self.device.poll_window() {
            self.poll(&mut state, window);
        }
    }

    /// Busy-poll the available ring and the engine until nothing has happened for `window`
    /// (or the session limit is reached), handling work as it shows up. Waking a sleeping
    /// thread costs microseconds that a request at queue depth 1 feels in full; a spinning
    /// thread sees the next request, or its completion, at once.
    fn poll(&mut self, state: &mut VringState<GuestMemoryAtomic<GuestMemory>>, window: Duration) {
        let started = Instant::now();
        let mut last_work = started;
        self.polling = true;
        loop {
            // A bitmap operation waits for writes to drain: leave the thread to it.
            if self.device.bitmaps().gate().is_closed() || !self.deferred.is_empty() {
                break;
            }
            let popped = self.process_avail(state);
            let reaped = self.run_completions(state);
            let now = Instant::now();
            if popped > 0 || reaped {
                self.notify_guest(state);
                last_work = now;
            } else if now.duration_since(last_work) >= window {
                break;
            }
            if now.duration_since(started) >= MAX_POLL_SESSION {
                // Still busy: come back through the event loop.
                self.resume = true;
                let _ = self.wake.write(1);
                break;
            }
            std::hint::spin_loop();
        }
        self.polling = false;
        // Ask for notifications again, handling what was made available meanwhile the way a
        // wake-up would (this also re-arms, and gives up on a ring whose index is invalid).
        if !self.resume {
            self.process_avail(state);
            self.run_completions(state);
            self.notify_guest(state);
        }
    }

    /// Wait for every request in flight to complete and put it on the used ring.
    pub fn drain(&mut self) {
        let Some(vring) = self.vring.clone() else {
            // No event was ever handled, so no request was ever started.
            return;
        };
        loop {
            {
                let mut state = vring.get_mut();
                // Held-back writes start once the gate reopens; completions keep being reaped
                // meanwhile, which is what lets a bitmap operation's drain finish.
                self.run_deferred(&mut state);
                if let Err(e) = self.engine.submit() {
                    log::error!("queue {}: submitting I/O: {e}", self.index);
                }
                self.run_completions(&mut state);
                self.notify_guest(&mut state);
            }
            if self.deferred.is_empty() && self.engine.in_flight() == 0 {
                break;
            }
            if self.engine.in_flight() > 0 {
                if let Err(e) = self.engine.wait() {
                    log::error!("queue {}: waiting for I/O: {e}", self.index);
                    break;
                }
            } else {
                // Only writes held back by a bitmap operation remain; it ends shortly.
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        self.resume = false;
    }

    /// Pop and start requests until the ring is empty, the budget is spent or slots run out.
    /// Returns how many were popped.
    fn process_avail(&mut self, state: &mut VringState<GuestMemoryAtomic<GuestMemory>>) -> usize {
        if self.device.bitmaps().gate().is_closed() || !self.deferred.is_empty() {
            // Requests wait on the ring while writes are held back; the gate wakes us.
            self.resume = true;
            return 0;
        }
        let mut total = 0;
        let mut mem = self.mem.memory().into_inner();
        let mut budget = MAX_REQUESTS_PER_WAKEUP;
        let mut empty_passes = 0;
        loop {
            // Errors here mean the guest put the ring outside its memory; popping fails too.
            let _ = state.get_queue_mut().disable_notification(&*mem);
            let publish_at = self.publish_point(state, &mem);
            let mut popped = 0;
            while budget > 0 && !self.free.is_empty() {
                let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&*mem) else {
                    break;
                };
                // The frontend may have added memory (and then made this request available)
                // after we took our view of it: a request must be read with the memory as it
                // was when its ring entry became visible. Take the entry back and retry.
                let current = self.mem.memory().into_inner();
                if !Arc::ptr_eq(&current, &mem) {
                    state.get_queue_mut().go_to_previous_position();
                    mem = current;
                    continue;
                }
                budget -= 1;
                popped += 1;
                total += 1;
                self.start_request(chain, &mem, state);
                if popped == publish_at && self.engine.done_inline_bytes() > 0 {
                    self.publish_done(state);
                }
            }
            if popped == 0 {
                empty_passes += 1;
                if empty_passes > 1 {
                    // The ring claims entries that cannot be popped: its avail index is
                    // beyond what the queue can hold. Wait for the next kick rather than spin.
                    self.log.warn(
                        self.index,
                        format_args!("available ring index is invalid; ignoring the queue"),
                    );
                    break;
                }
            }
            if budget == 0 || self.free.is_empty() {
                // Come back after other events; a full slot table resumes on completions.
                self.resume = true;
                if budget == 0 {
                    let _ = self.wake.write(1);
                }
                break;
            }
            if self.polling {
                // The poller comes back at once; notifications stay off meanwhile.
                break;
            }
            match state.get_queue_mut().enable_notification(&*mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
        if let Err(e) = self.engine.submit() {
            log::error!("queue {}: submitting I/O: {e}", self.index);
        }
        total
    }

    /// Reap completions until none are left, submitting follow-up operations as they arise.
    /// Returns whether anything completed.
    fn run_completions(&mut self, state: &mut VringState<GuestMemoryAtomic<GuestMemory>>) -> bool {
        let mut any = false;
        loop {
            if !self.complete_ready(state) {
                return any;
            }
            any = true;
            if self.resume && !self.free.is_empty() {
                self.resume = false;
                self.process_avail(state);
            } else if let Err(e) = self.engine.submit() {
                log::error!("queue {}: submitting I/O: {e}", self.index);
            }
        }
    }

    /// After how many requests of this pass to hand the finished ones back early: half of
    /// what the driver has made available, when that is a batch worth splitting. (Measured
    /// against no split, quarters and eighths: halves gave the most IOPS at 4k depth 32 and
    /// 64k depth 8; more notifications cost more than the overlap gains.)
    fn publish_point(
        &self,
        state: &VringState<GuestMemoryAtomic<GuestMemory>>,
        mem: &GuestMemory,
    ) -> usize {
        let queue = state.get_queue();
        let Ok(avail) = queue.avail_idx(mem, Ordering::Acquire) else {
            return usize::MAX;
        };
        let available = usize::from((avail - Wrapping(queue.next_avail())).0);
        if available >= SPLIT_BATCHES_FROM {
            available / 2
        } else {
            usize::MAX
        }
    }

    /// Put the requests finished so far on the used ring and notify the driver, in the middle
    /// of a pass over the available ring. A pass of inline copies can take a while (eight
    /// 64 KiB requests are ~100 µs of copying); handing back finished requests early lets the
    /// driver refill the ring while the rest is copied, so the queue does not run dry and
    /// sleep between batches. Transfers in flight in io_uring are not waited for.
    fn publish_done(&mut self, state: &mut VringState<GuestMemoryAtomic<GuestMemory>>) {
        self.complete_ready(state);
        self.notify_guest(state);
    }

    /// Finish every operation the engine has ready (follow-up operations are pushed, not
    /// submitted). Returns whether there was any.
    fn complete_ready(&mut self, state: &mut VringState<GuestMemoryAtomic<GuestMemory>>) -> bool {
        let mut completions = std::mem::take(&mut self.completions);
        completions.clear();
        self.engine
            .reap(|user_data, result| completions.push((user_data, result)));
        for &(user_data, result) in &completions {
            self.complete_op(user_data, result, state);
        }
        let any = !completions.is_empty();
        self.completions = completions;
        any
    }

    fn notify_guest(&mut self, state: &mut VringState<GuestMemoryAtomic<GuestMemory>>) {
        if std::mem::take(&mut self.used_added) && state.needs_notification().unwrap_or(true) {
            if let Err(e) = state.signal_used_queue() {
                log::error!("queue {}: notifying the guest: {e}", self.index);
            }
        }
    }

    /// Parse a chain and start its I/O, or answer it at once.
    fn start_request(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
        mem: &Arc<GuestMemory>,
        state: &mut VringState<GuestMemoryAtomic<GuestMemory>>,
    ) {
        let head = chain.head_index();
        let Some(slot_index) = self.free.pop() else {
            return;
        };
        let slot = &mut self.slots[slot_index as usize];
        match request::parse(chain, mem, self.device.limits(), &mut slot.bufs) {
            Ok(req) => {
                slot.head = head;
                slot.status = req.status;
                slot.kind = req.kind;
                slot.used_len = 1;
                slot.pending = 0;
                slot.failed = false;
                slot.synced = false;
                slot.ops.clear();
                slot.mem = Some(mem.clone());
                self.begin(slot_index, req, state);
            }
            Err(err) => {
                self.free.push(slot_index);
                match err.status {
                    Some(status) => {
                        self.log.warn(
                            self.index,
                            format_args!("request {head} refused ({:?}): {err}", err.code),
                        );
                        write_status(mem, status, err.code);
                        self.add_used(state, head, 1);
                    }
                    None => {
                        self.log
                            .warn(self.index, format_args!("request {head} dropped: {err}"));
                        // Return the descriptors so the guest is not left waiting; a head
                        // index the ring does not have cannot be returned.
                        self.add_used(state, head, 0);
                    }
                }
            }
        }
    }

    fn add_used(
        &mut self,
        state: &mut VringState<GuestMemoryAtomic<GuestMemory>>,
        head: u16,
        len: u32,
    ) {
        match state.add_used(head, len) {
            Ok(()) => self.used_added = true,
            Err(e) => self.log.warn(
                self.index,
                format_args!("cannot return descriptor {head} to the guest: {e}"),
            ),
        }
    }

    /// Start a validated request: writes pass the write gate and are marked in the dirty
    /// bitmaps first (failed writes stay marked: their data may have partly landed).
    fn begin(
        &mut self,
        slot_index: u32,
        req: Request,
        state: &mut VringState<GuestMemoryAtomic<GuestMemory>>,
    ) {
        let modifies = matches!(
            req.kind,
            RequestKind::Write { .. } | RequestKind::Discard | RequestKind::WriteZeroes
        );
        if modifies {
            let bitmaps = self.device.bitmaps();
            if !bitmaps.gate().try_enter(self.index) {
                // A bitmap operation is draining writes: hold this one until it is done.
                self.deferred.push_back((slot_index, req));
                return;
            }
            let slot = &mut self.slots[slot_index as usize];
            slot.gated = true;
            match req.kind {
                RequestKind::Write { offset, len } => {
                    bitmaps.mark(&mut self.bitmap_cursor, offset, len);
                }
                _ => {
                    for seg in &slot.bufs.segments {
                        bitmaps.mark(&mut self.bitmap_cursor, seg.offset, seg.len);
                    }
                }
            }
        }
        self.execute(slot_index, req);
        if self.slots[slot_index as usize].pending == 0 {
            self.finish(slot_index, state);
        }
    }

    /// Start the requests held back while the write gate was closed.
    fn run_deferred(&mut self, state: &mut VringState<GuestMemoryAtomic<GuestMemory>>) {
        let mut started = false;
        while !self.device.bitmaps().gate().is_closed() {
            let Some((slot_index, req)) = self.deferred.pop_front() else {
                break;
            };
            self.begin(slot_index, req, state);
            started = true;
        }
        if started {
            if let Err(e) = self.engine.submit() {
                log::error!("queue {}: submitting I/O: {e}", self.index);
            }
        }
    }

    /// Start the I/O of a validated request.
    fn execute(&mut self, slot_index: u32, req: Request) {
        let driver = self.device.driver().clone();
        let result = match req.kind {
            RequestKind::Read { offset, len } | RequestKind::Write { offset, len } => {
                let write = matches!(req.kind, RequestKind::Write { .. });
                self.extents.clear();
                let slot = &self.slots[slot_index as usize];
                // SAFETY: the iovecs were validated against guest memory that `slot.mem`
                // keeps mapped, and the request owns them until it completes.
                let guest = unsafe { GuestIo::new(&slot.bufs.iovecs) };
                let mapped = if write {
                    driver.map_write(offset, len, guest, &mut self.extents)
                } else {
                    driver.map_read(offset, len, guest, &mut self.extents)
                };
                mapped.map(|ticket| {
                    self.slots[slot_index as usize].ticket = ticket;
                    self.start_transfer(slot_index, write, len)
                })
            }
            RequestKind::Flush => driver
                .flush_metadata()
                .map(|()| self.start_sync(slot_index)),
            RequestKind::GetId => {
                self.copy_id(slot_index);
                Ok(())
            }
            RequestKind::Discard | RequestKind::WriteZeroes => {
                self.start_zeroes(slot_index, req.kind)
            }
        };
        if let Err(e) = result {
            self.log
                .warn(self.index, format_args!("{:?} failed: {e}", req.kind));
            self.slots[slot_index as usize].failed = true;
        }
    }

    /// Push the data transfers of a read or write whose extents are in `self.extents`.
    fn start_transfer(&mut self, slot_index: u32, write: bool, len: u64) {
        let files = self.device.driver().files();
        let slot = &mut self.slots[slot_index as usize];
        if !write {
            slot.used_len = (len as u32).saturating_add(1);
        }
        // One extent covering the request uses the request's iovecs directly; otherwise cut
        // them at extent boundaries into `split_iov`, reserved up front so that the pointers
        // handed to the kernel stay put.
        let single = self.extents.len() == 1;
        if !single {
            slot.split_iov.clear();
            slot.split_iov
                .reserve(slot.bufs.iovecs.len() + self.extents.len());
        }
        let mut cursor = IovCursor::default();
        for extent in &self.extents {
            let iov_start = slot.split_iov.len();
            let iov: &[libc::iovec] = if single {
                &slot.bufs.iovecs
            } else {
                cursor.take(&slot.bufs.iovecs, extent.len, &mut slot.split_iov);
                &slot.split_iov[iov_start..]
            };
            match extent.mapping {
                Mapping::Zero if !write => fill_zero(iov),
                Mapping::Zero => slot.failed = true,
                Mapping::Filled => {}
                Mapping::Data { file, offset } => {
                    let Some(node) = files.get(file) else {
                        slot.failed = true;
                        continue;
                    };
                    let align = node.direct_align();
                    if align > 1 && !is_aligned(iov, align) {
                        let transfer = Transfer {
                            fd: node.fd(),
                            offset,
                            write,
                        };
                        if let Err(e) = bounce_transfer(transfer, iov, extent.len, align) {
                            self.log
                                .warn(self.index, format_args!("unaligned direct I/O: {e}"));
                            slot.failed = true;
                        }
                        continue;
                    }
                    let op = Transfer {
                        fd: node.fd(),
                        offset,
                        write,
                    }
                    .op(iov);
                    let slot_op = SlotOp {
                        op,
                        inline: node.inline_policy(),
                        expected: extent.len,
                        zero: None,
                    };
                    push_op(&mut self.engine, slot, slot_index, slot_op);
                }
            }
        }
    }

    /// Push an fdatasync of every writable file.
    fn start_sync(&mut self, slot_index: u32) {
        let slot = &mut self.slots[slot_index as usize];
        slot.synced = true;
        for file in self.device.driver().files() {
            if file.read_only() {
                continue;
            }
            let op = SlotOp {
                op: Op::Fdatasync { fd: file.fd() },
                inline: InlinePolicy::Never,
                expected: 0,
                zero: None,
            };
            push_op(&mut self.engine, slot, slot_index, op);
        }
    }

    /// Map a discard or write-zeroes and push its fallocate operations.
    fn start_zeroes(
        &mut self,
        slot_index: u32,
        kind: RequestKind,
    ) -> Result<(), crate::block::BlockError> {
        let driver = self.device.driver().clone();
        self.zero_ops.clear();
        let slot = &mut self.slots[slot_index as usize];
        for seg in &slot.bufs.segments {
            let op = match kind {
                RequestKind::Discard => ZeroOp::Discard,
                _ => ZeroOp::WriteZeroes { unmap: seg.unmap },
            };
            driver.map_zeroes(seg.offset, seg.len, op, &mut self.zero_ops)?;
        }
        for zop in &self.zero_ops {
            let Some(file) = driver.files().get(zop.file) else {
                slot.failed = true;
                continue;
            };
            let mode = match zop.op {
                ZeroOp::Discard => file.discard_mode(),
                ZeroOp::WriteZeroes { unmap } => file.zero_mode(unmap),
            };
            match mode {
                Some(mode) => {
                    let op = SlotOp {
                        inline: InlinePolicy::Never,
                        op: Op::Fallocate {
                            fd: file.fd(),
                            mode,
                            offset: zop.offset,
                            len: zop.len,
                        },
                        expected: 0,
                        zero: Some((zop.file, zop.op)),
                    };
                    push_op(&mut self.engine, slot, slot_index, op);
                }
                // Discarding is advisory: a file that cannot deallocate keeps its data.
                None if zop.op == ZeroOp::Discard => {}
                None => {
                    let unmap = matches!(zop.op, ZeroOp::WriteZeroes { unmap: true });
                    if let Err(e) = file.write_zeroes_fallback(zop.offset, zop.len, unmap) {
                        self.log.warn(self.index, format_args!("write zeroes: {e}"));
                        slot.failed = true;
                    }
                }
            }
        }
        Ok(())
    }

    /// Copy the device ID into the request's buffers (already bounded to 20 bytes).
    fn copy_id(&mut self, slot_index: u32) {
        let serial = self.device.serial();
        let slot = &mut self.slots[slot_index as usize];
        let mut copied = 0usize;
        for iov in slot.bufs.iovecs.iter() {
            let n = iov.iov_len.min(serial.len() - copied);
            // SAFETY: the iovec was validated to lie in guest memory that `slot.mem` keeps
            // mapped, and `n` is within both it and `serial`.
            unsafe { libc::memcpy(iov.iov_base, serial[copied..].as_ptr().cast(), n) };
            copied += n;
        }
        slot.used_len = copied as u32 + 1;
    }

    /// Account for one finished engine operation.
    fn complete_op(
        &mut self,
        user_data: u64,
        result: i32,
        state: &mut VringState<GuestMemoryAtomic<GuestMemory>>,
    ) {
        let slot_index = (user_data >> 32) as u32;
        let op_index = user_data as u32 as usize;
        let Some(slot) = self.slots.get_mut(slot_index as usize) else {
            return;
        };
        let Some(op) = slot.ops.get(op_index).copied() else {
            return;
        };
        if let Err(e) = self.finish_op(op, result) {
            self.log.warn(self.index, format_args!("I/O error: {e}"));
            self.slots[slot_index as usize].failed = true;
        }
        let slot = &mut self.slots[slot_index as usize];
        slot.pending -= 1;
        if slot.pending > 0 {
            return;
        }
        let modifies = matches!(
            slot.kind,
            RequestKind::Write { .. } | RequestKind::Discard | RequestKind::WriteZeroes
        );
        if modifies && !slot.failed && !slot.synced && !self.writeback.load(Ordering::Relaxed) {
            // Writethrough: the write is complete only once it is stable.
            self.start_sync(slot_index);
            if self.slots[slot_index as usize].pending > 0 {
                return;
            }
        }
        self.finish(slot_index, state);
    }

    /// Interpret an operation's result, completing short transfers and refused fallocates
    /// synchronously.
    fn finish_op(&self, op: SlotOp, result: i32) -> std::io::Result<()> {
        let errno = |e: i32| std::io::Error::from_raw_os_error(e);
        match op.op {
            Op::Readv { .. } | Op::Writev { .. } if result >= 0 => {
                let done = result as u64;
                if done < op.expected {
                    // SAFETY: the op's iovecs belong to the slot, still in flight.
                    unsafe { finish_short_transfer(op.op, done, op.expected)? };
                }
                Ok(())
            }
            Op::Fallocate {
                mode, offset, len, ..
            } if result < 0 => {
                let Some((file, zero)) = op.zero else {
                    return Err(errno(-result));
                };
                let node = &self.device.driver().files()[file];
                if !node.note_fallocate_refusal(mode, -result) {
                    return Err(errno(-result));
                }
                match zero {
                    ZeroOp::Discard => Ok(()),
                    ZeroOp::WriteZeroes { unmap } => node.write_zeroes_fallback(offset, len, unmap),
                }
            }
            _ if result < 0 => Err(errno(-result)),
            _ => Ok(()),
        }
    }

    /// Write the status, return the request to the guest and free its slot.
    fn finish(&mut self, slot_index: u32, state: &mut VringState<GuestMemoryAtomic<GuestMemory>>) {
        let slot = &mut self.slots[slot_index as usize];
        let (status, used_len) = if slot.failed {
            (Status::IoErr, 1)
        } else {
            (Status::Ok, slot.used_len)
        };
        let head = slot.head;
        if std::mem::take(&mut slot.gated) {
            self.device.bitmaps().gate().exit(self.index);
        }
        let ticket = std::mem::take(&mut slot.ticket);
        self.device.driver().release(ticket);
        if let Some(mem) = slot.mem.take() {
            write_status(&mem, slot.status, status);
        }
        self.free.push(slot_index);
        self.add_used(state, head, used_len);
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        // The kernel may still be writing into guest memory that the slots keep mapped: wait.
        while self.engine.in_flight() > 0 {
            if self.engine.wait().is_err() {
                break;
            }
            self.engine.reap(|_, _| {});
        }
    }
}

/// Push `op` for `slot`, tagging it with the slot and operation index.
fn push_op(engine: &mut Engine, slot: &mut Slot, slot_index: u32, op: SlotOp) {
    let user_data = (u64::from(slot_index) << 32) | slot.ops.len() as u64;
    slot.ops.push(op);
    // SAFETY: the op's pointers are iovecs in `slot.bufs` / `slot.split_iov` (not modified
    // until the slot completes) naming guest memory that `slot.mem` keeps mapped.
    let pushed = match op.op {
        // SAFETY: as above.
        Op::Readv { .. } | Op::Writev { .. } => unsafe {
            engine.push_transfer(op.op, user_data, op.inline)
        },
        // SAFETY: as above.
        _ => unsafe { engine.push(op.op, user_data, false) },
    };
    match pushed {
        Ok(()) => slot.pending += 1,
        Err(e) => {
            log::warn!("cannot queue I/O: {e}");
            slot.failed = true;
        }
    }
}

fn write_status(mem: &GuestMemory, addr: GuestAddress, status: Status) {
    // The parser checked the address; a guest that removed the memory since only loses its
    // own status byte.
    let _ = mem.write_obj(status as u8, addr);
}

/// Walks a list of iovecs, cutting off successive runs of bytes.
#[derive(Default)]
struct IovCursor {
    index: usize,
    offset: usize,
}

impl IovCursor {
    /// Step over the next `len` bytes.
    fn skip(&mut self, iovecs: &[libc::iovec], len: u64) {
        let mut left = len as usize;
        while let Some(iov) = iovecs.get(self.index).filter(|_| left > 0) {
            let n = (iov.iov_len - self.offset).min(left);
            left -= n;
            self.offset += n;
            if self.offset == iov.iov_len {
                self.index += 1;
                self.offset = 0;
            }
        }
    }

    /// Append iovecs covering the next `len` bytes of `iovecs` to `out`.
    fn take(&mut self, iovecs: &[libc::iovec], len: u64, out: &mut Vec<libc::iovec>) {
        let mut left = len as usize;
        while left > 0 {
            let Some(iov) = iovecs.get(self.index) else {
                return;
            };
            let n = (iov.iov_len - self.offset).min(left);
            out.push(libc::iovec {
                // SAFETY: offset < iov_len, so the result is inside the same buffer.
                iov_base: unsafe { iov.iov_base.cast::<u8>().add(self.offset) }.cast(),
                iov_len: n,
            });
            left -= n;
            self.offset += n;
            if self.offset == iov.iov_len {
                self.index += 1;
                self.offset = 0;
            }
        }
    }
}

fn is_aligned(iovecs: &[libc::iovec], align: u64) -> bool {
    let align = align as usize;
    iovecs.iter().all(|iov| {
        (iov.iov_base as usize).is_multiple_of(align) && iov.iov_len.is_multiple_of(align)
    })
}

/// Zero the guest buffers a read of an unallocated range targets.
fn fill_zero(iovecs: &[libc::iovec]) {
    for iov in iovecs {
        // SAFETY: validated guest memory, kept mapped by the slot.
        unsafe { libc::memset(iov.iov_base, 0, iov.iov_len) };
    }
}

/// Where a read or write goes.
#[derive(Clone, Copy)]
struct Transfer {
    fd: std::os::fd::RawFd,
    offset: u64,
    write: bool,
}

impl Transfer {
    fn op(self, iov: &[libc::iovec]) -> Op {
        let (fd, offset) = (self.fd, self.offset);
        let (iov, iovcnt) = (iov.as_ptr(), iov.len() as u32);
        if self.write {
            Op::Writev {
                fd,
                offset,
                iov,
                iovcnt,
            }
        } else {
            Op::Readv {
                fd,
                offset,
                iov,
                iovcnt,
            }
        }
    }
}

/// Carry out a direct-I/O transfer whose guest buffers are not aligned through an aligned
/// bounce buffer, synchronously (guests normally align their buffers).
fn bounce_transfer(
    transfer: Transfer,
    iovecs: &[libc::iovec],
    len: u64,
    align: u64,
) -> std::io::Result<()> {
    let mut buf = AlignedBuf::zeroed(len as usize, align as usize)?;
    let bounce = [libc::iovec {
        iov_base: buf.as_mut_slice().as_mut_ptr().cast(),
        iov_len: len as usize,
    }];
    if transfer.write {
        copy_iovecs(iovecs, &bounce[0], true);
    }
    let op = transfer.op(&bounce);
    // SAFETY: `bounce` points into `buf`, both alive for the call.
    let ret = unsafe { io::run_sync(op) };
    if ret < 0 {
        return Err(std::io::Error::from_raw_os_error(-ret));
    }
    if (ret as u64) < len {
        // SAFETY: as above.
        unsafe { finish_short_transfer(op, ret as u64, len)? };
    }
    if !transfer.write {
        copy_iovecs(iovecs, &bounce[0], false);
    }
    Ok(())
}

/// Copy between guest iovecs and one contiguous buffer (`to_buf`: guest -> buffer).
fn copy_iovecs(iovecs: &[libc::iovec], buf: &libc::iovec, to_buf: bool) {
    let mut done = 0usize;
    for iov in iovecs {
        let n = iov.iov_len.min(buf.iov_len - done);
        // SAFETY: both ranges are valid for `n` bytes: the guest buffer by validation, the
        // bounce buffer by construction; they cannot overlap.
        unsafe {
            let b = buf.iov_base.cast::<u8>().add(done).cast();
            if to_buf {
                libc::memcpy(b, iov.iov_base, n);
            } else {
                libc::memcpy(iov.iov_base, b, n);
            }
        }
        done += n;
    }
}

/// Finish, synchronously, a transfer the kernel cut short after `done` of `expected` bytes.
///
/// # Safety
/// The iovecs `op` points to, and the buffers they name, must be valid for the call.
unsafe fn finish_short_transfer(op: Op, mut done: u64, expected: u64) -> std::io::Result<()> {
    let (transfer, iovecs) = match op {
        Op::Readv {
            fd,
            offset,
            iov,
            iovcnt,
        }
        | Op::Writev {
            fd,
            offset,
            iov,
            iovcnt,
        } => {
            let write = matches!(op, Op::Writev { .. });
            // SAFETY: the caller guarantees the iovec array is valid.
            let iovecs = unsafe { std::slice::from_raw_parts(iov, iovcnt as usize) };
            (Transfer { fd, offset, write }, iovecs)
        }
        _ => return Ok(()),
    };
    let mut rest = Vec::with_capacity(iovecs.len());
    while done < expected {
        rest.clear();
        let mut cursor = IovCursor::default();
        cursor.skip(iovecs, done);
        cursor.take(iovecs, expected - done, &mut rest);
        let op = Transfer {
            offset: transfer.offset + done,
            ..transfer
        }
        .op(&rest);
        // SAFETY: `rest` names the unfinished part of the same live buffers.
        let ret = unsafe { io::run_sync(op) };
        if ret < 0 {
            return Err(std::io::Error::from_raw_os_error(-ret));
        }
        if ret == 0 {
            // End of file inside the disk: the file shrank under us.
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        done += ret as u64;
    }
    Ok(())
}
