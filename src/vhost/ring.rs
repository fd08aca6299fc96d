//! One virtqueue's ring servicing: pops available chains, hands them to the queue's
//! [`Executor`], publishes finished requests on the used ring and notifies the guest; plus
//! busy-polling and draining.
//!
//! Each queue has its own worker and its own thread, so queues never contend: the only shared
//! state on the path is the read-only device and whatever short, per-node locks a format driver
//! takes while mapping.

use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_backend::{VringRwLock, VringState, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::chain::ChainWalker;
use super::device::BlkDevice;
use super::dirty_log::DirtyLog;
use super::executor::Executor;
use super::inflight::QueueRegion;
use super::poll::AdaptivePoll;
use crate::ratelimit::RateLimitedLog;
use crate::virtio_blk::request::GuestMemory;

/// The vring type the daemon uses.
pub type Vring = VringRwLock<GuestMemoryAtomic<GuestMemory>>;

type State = VringState<GuestMemoryAtomic<GuestMemory>>;

/// Requests popped per wake-up before the worker yields to its other events. A guest that keeps
/// its queue full cannot keep the thread from completing requests or serving a shutdown.
const MAX_REQUESTS_PER_WAKEUP: usize = 256;

/// A pass over at least this many available requests hands the first half back as soon as it
/// is done (see [`QueueWorker::publish_done`]).
const SPLIT_BATCHES_FROM: usize = 4;

/// How often a busy-polling worker yields its CPU (`sched_yield`), so that another thread on
/// the same CPU (another queue's, the frontend's) runs: with two always-busy queues on one CPU
/// and no yield, p99 was 4 ms (preemption slices); yielding every 50 µs gave 270-350 µs, as
/// without polling. A yield with nobody else to run costs one system call.
const YIELD_EVERY: Duration = Duration::from_micros(50);

/// Longest a busy-polling worker keeps its queue before going back to its event loop, so that
/// a guest that never lets the queue go idle cannot keep the control path (which stops queues
/// and drains them) waiting long. Going back costs three system calls (the wake-up written,
/// waited for and read): once every 50 µs that was 6% of the CPU per I/O at 64k on tmpfs.
const MAX_POLL_SESSION: Duration = Duration::from_millis(1);

/// The worker of one virtqueue.
pub struct QueueWorker {
    index: usize,
    device: Arc<BlkDevice>,
    mem: GuestMemoryAtomic<GuestMemory>,
    exec: Executor,
    /// Signalled by the engine on completions, by the worker to resume later, and by the
    /// write gate when it reopens.
    wake: Arc<EventFd>,
    vring: Vring,
    /// In-flight tracking (`SET_INFLIGHT_FD`), when the frontend keeps a region for us.
    inflight: Option<QueueRegion>,
    /// Heads being published, for the in-flight region.
    publishing: Vec<u16>,
    dirty_log: Arc<DirtyLog>,
    /// Where the frontend wants writes to the used ring logged (`SET_VRING_ADDR`'s
    /// `log_guest_addr` with `VHOST_VRING_F_LOG`); the ring's own address otherwise.
    used_log_addr: Option<u64>,
    /// The ring has run since it last started: what its in-flight region listed was
    /// resubmitted.
    recovered: bool,
    /// A notification was due while the ring had no call descriptor.
    missed_signal: bool,
    /// Work is left on the available ring (budget used up or no free slot).
    resume: bool,
    /// Busy-polling: the guest's notifications stay suppressed while the ring is empty.
    polling: bool,
    /// The adaptive polling window.
    poll: AdaptivePoll,
    /// When the worker last had work before it went to sleep (polling on): the next event
    /// tells the window how long the queue was idle.
    idle_since: Option<Instant>,
    used_added: bool,
    log: RateLimitedLog,
}

impl QueueWorker {
    pub fn new(
        index: usize,
        device: Arc<BlkDevice>,
        mem: GuestMemoryAtomic<GuestMemory>,
        writeback: Arc<AtomicBool>,
        vring: Vring,
        dirty_log: Arc<DirtyLog>,
    ) -> std::io::Result<Self> {
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let poll = AdaptivePoll::new(device.export().poll_policy());
        device.export().bitmaps().gate().register_waker(&wake);
        let exec = Executor::new(
            index,
            device.clone(),
            writeback,
            wake.as_raw_fd(),
            dirty_log.clone(),
        )?;
        Ok(QueueWorker {
            index,
            device,
            mem,
            exec,
            wake,
            vring,
            inflight: None,
            publishing: Vec::new(),
            dirty_log,
            used_log_addr: None,
            recovered: false,
            missed_signal: false,
            resume: false,
            polling: false,
            poll,
            idle_since: None,
            used_added: false,
            log: RateLimitedLog::new(),
        })
    }

    /// The eventfd the queue thread's epoll loop must watch.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    pub fn in_flight(&self) -> usize {
        self.exec.in_flight()
    }

    /// Whether new requests must wait: a bitmap operation is draining writes, or writes it
    /// held back have not started yet.
    fn held_back(&self) -> bool {
        self.device.export().bitmaps().gate().is_closed() || self.exec.has_deferred()
    }

    /// Handle a wake-up: the guest kicked the queue (`kick`), or completions or leftover work
    /// are ready.
    pub fn handle_event(&mut self, kick: bool) {
        let vring = self.vring.clone();
        if !kick {
            // Clear the wake-up being handled (a level-triggered epoll reports it until then);
            // a kick leaves it alone, saving a system call per request.
            let _ = self.wake.read();
        }
        if let Some(since) = self.idle_since.take() {
            self.poll.woke_after(since.elapsed());
        }
        let mut state = vring.get_mut();
        self.exec.run_deferred();
        if kick || std::mem::take(&mut self.resume) {
            self.process_avail(&mut state);
        }
        self.run_completions(&mut state);
        self.notify_guest(&mut state);
        if self.poll.enabled() {
            let window = self.poll.window();
            if window.is_zero() {
                self.idle_since = (!self.resume).then(Instant::now);
            } else {
                self.poll(&mut state, window);
            }
        }
    }

    /// Busy-poll the available ring and the engine until nothing has happened for `window`
    /// (or the session limit is reached), handling work as it shows up. Waking a sleeping
    /// thread costs microseconds that a request at queue depth 1 feels in full; a spinning
    /// thread sees the next request, or its completion, at once.
    fn poll(&mut self, state: &mut State, window: Duration) {
        let started = Instant::now();
        let mut last_work = started;
        let mut last_yield = started;
        self.polling = true;
        loop {
            // A bitmap operation waits for writes to drain: leave the thread to it.
            if self.held_back() {
                break;
            }
            self.exec.run_deferred();
            let popped = self.process_avail(state);
            let reaped = self.run_completions(state);
            let now = Instant::now();
            if popped > 0 || reaped {
                self.notify_guest(state);
                self.poll.caught();
                last_work = now;
            } else if now.duration_since(last_work) >= window {
                // Idle for the whole window: the next event says how long it really was.
                self.idle_since = Some(last_work);
                break;
            }
            if now.duration_since(last_yield) >= YIELD_EVERY {
                // Let whatever else wants this CPU run: a thread that always finds work never
                // sleeps, and would otherwise hold the CPU until the scheduler preempts it,
                // milliseconds later.
                // SAFETY: sched_yield has no memory effects.
                unsafe { libc::sched_yield() };
                last_yield = now;
                if now.duration_since(started) >= MAX_POLL_SESSION {
                    // Still busy: come back through the event loop.
                    self.resume = true;
                    let _ = self.wake.write(1);
                    break;
                }
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
        let vring = self.vring.clone();
        loop {
            {
                let mut state = vring.get_mut();
                // Held-back writes start once the gate reopens; completions keep being reaped
                // meanwhile, which is what lets a bitmap operation's drain finish.
                self.exec.run_deferred();
                self.exec.submit();
                self.run_completions(&mut state);
                self.notify_guest(&mut state);
            }
            let in_flight = self.exec.ops_in_flight();
            if !self.exec.has_deferred() && !self.exec.has_committing() && in_flight == 0 {
                break;
            }
            if in_flight > 0 {
                if let Err(e) = self.exec.wait() {
                    log::error!("queue {}: waiting for I/O: {e}", self.index);
                    break;
                }
            } else {
                // Only writes held back by a bitmap operation or waiting for their bitmap marks
                // to be committed remain; both end shortly.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.resume = false;
    }

    /// Pop and start requests until the ring is empty, the budget is spent or slots run out.
    /// Returns how many were popped.
    fn process_avail(&mut self, state: &mut State) -> usize {
        if !state.is_enabled() || !state.get_queue().ready() {
            // A stopped or disabled ring passes no new requests; it is looked at again when
            // it starts or is enabled.
            return 0;
        }
        if self.held_back() {
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
            while budget > 0 && self.exec.has_free_slot() {
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
                let head = chain.head_index();
                if let Some(region) = &mut self.inflight {
                    region.record(head);
                }
                self.exec.start(head, chain, &mem);
                // Each request goes to the kernel as soon as it is started, as fio submits by
                // default. One io_uring_enter for a whole pass plugs the batch: the device gets
                // it as one burst and serves it one after the other, so the first requests
                // wait for the last to be queued. On this VM's disk with O_DIRECT, a pass at a
                // time gave 59k IOPS at 4k randread depth 32 and 92k at randwrite; a request at
                // a time 70k and 119k (docs/performance.md). Nothing queued costs no syscall,
                // so transfers done inline (tmpfs, page-cache hits) pay nothing for it.
                self.exec.submit();
                if popped == publish_at && self.exec.done_inline_bytes() > 0 {
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
            if budget == 0 || !self.exec.has_free_slot() {
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
        self.exec.submit();
        total
    }

    /// Reap completions until none are left, submitting follow-up operations as they arise.
    /// Returns whether anything completed.
    fn run_completions(&mut self, state: &mut State) -> bool {
        let mut any = false;
        loop {
            if !self.exec.complete_ready() {
                return any;
            }
            any = true;
            if self.resume && self.exec.has_free_slot() {
                self.resume = false;
                self.process_avail(state);
            } else {
                self.exec.submit();
            }
        }
    }

    /// After how many requests of this pass to hand the finished ones back early: half of
    /// what the driver has made available, when that is a batch worth splitting. (Measured
    /// against no split, quarters and eighths: halves gave the most IOPS at 4k depth 32 and
    /// 64k depth 8; more notifications cost more than the overlap gains.)
    fn publish_point(&self, state: &State, mem: &GuestMemory) -> usize {
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
    fn publish_done(&mut self, state: &mut State) {
        self.exec.complete_ready();
        self.notify_guest(state);
    }

    /// Put finished requests on the used ring and signal the guest if it wants to know.
    fn notify_guest(&mut self, state: &mut State) {
        // One look at the memory map for the whole batch (`VringState::add_used` would take
        // one per request).
        let mem = self.mem.memory();
        if let Some(region) = &self.inflight {
            self.publishing.clear();
            self.publishing
                .extend(self.exec.done().iter().map(|(head, _)| *head));
            region.begin_publish(&self.publishing);
        }
        for (head, len) in self.exec.take_done() {
            match state.get_queue_mut().add_used(&*mem, head, len) {
                Ok(()) => self.used_added = true,
                // A head index the ring does not have cannot be returned.
                Err(e) => self.log.warn(
                    self.index,
                    format_args!("cannot return descriptor {head} to the guest: {e}"),
                ),
            }
        }
        if let Some(region) = &self.inflight {
            region.end_publish(&self.publishing, state.get_queue().next_used());
        }
        self.log_used_ring(state);
        // The queue's own check, on the memory the worker uses (`VringState`'s would read the
        // library's map, which may hold memory vubd refused).
        if std::mem::take(&mut self.used_added)
            && state
                .get_queue_mut()
                .needs_notification(&*mem)
                .unwrap_or(true)
        {
            // No call descriptor yet (a frontend may send it after starting the ring): the
            // notification is owed, and given when the descriptor comes.
            self.missed_signal = state.get_call().is_none();
            if let Err(e) = state.signal_used_queue() {
                log::error!("queue {}: notifying the guest: {e}", self.index);
            }
        }
    }
}

impl QueueWorker {
    /// Track this queue's requests in `region` from now on (`SET_INFLIGHT_FD`).
    pub fn set_inflight(&mut self, region: Option<QueueRegion>) {
        self.inflight = region;
    }

    /// Where to log used-ring writes (`SET_VRING_ADDR`).
    pub fn set_used_log_addr(&mut self, addr: Option<u64>) {
        self.used_log_addr = addr;
    }

    /// The ring runs (started and enabled): the first time since it started, resubmit what
    /// its in-flight region lists ([`QueueWorker::start_ring`]).
    pub fn ring_running(&mut self) {
        if !std::mem::replace(&mut self.recovered, true) {
            self.start_ring();
        }
    }

    /// Whether a notification was due while the ring had no call descriptor (and so is owed
    /// to the guest now that it has one); clears it.
    pub fn take_missed_signal(&mut self) -> bool {
        std::mem::take(&mut self.missed_signal)
    }

    /// The ring stopped (`GET_VRING_BASE`): recover again when it next runs.
    pub fn ring_stopped(&mut self) {
        self.recovered = false;
    }

    /// With an in-flight region that a previous backend used, resubmit the requests it left
    /// in flight, oldest first, and resume the available ring after the last request it
    /// popped. Returns how many were resubmitted.
    fn start_ring(&mut self) -> usize {
        let vring = self.vring.clone();
        let mut state = vring.get_mut();
        let Some(region) = self.inflight.as_mut().filter(|r| !r.is_fresh()) else {
            if let Some(region) = &mut self.inflight {
                // Fresh: start it at the ring's position.
                let _ = region.recover(state.get_queue().next_used());
            }
            return 0;
        };
        let used = state.get_queue().next_used();
        let heads = match region.recover(used) {
            Ok(heads) => heads,
            Err(e) => {
                // A region that contradicts the ring cannot say what to resubmit: the
                // frontend's own position stands, as without in-flight tracking.
                log::warn!("queue {}: in-flight region ignored: {e}", self.index);
                region.restart_at(used);
                return 0;
            }
        };
        let count = heads.len();
        let mem = self.mem.memory().into_inner();
        let queue_size = state.get_queue().size();
        let table = GuestAddress(state.get_queue().desc_table());
        for head in &heads {
            let chain = ChainWalker::new(&mem, table, queue_size, *head);
            self.exec.start(*head, chain, &mem);
        }
        // Every request popped before the crash is on the used ring or was just resubmitted.
        state
            .get_queue_mut()
            .set_next_avail(used.wrapping_add(count as u16));
        if count > 0 {
            log::info!(
                "queue {}: resubmitted {count} requests left in flight",
                self.index
            );
        }
        self.exec.submit();
        drop(state);
        // Finish them, and look at the available ring, from the queue's thread.
        self.resume = true;
        let _ = self.wake.write(1);
        count
    }

    /// Have the queue's thread look at the available ring (a ring was started or enabled:
    /// requests may be waiting that no kick will announce).
    pub fn wake_for_ring(&mut self) {
        self.resume = true;
        let _ = self.wake.write(1);
    }

    /// Log the used ring (entries, index, flags, avail_event) if logging is on: the worker
    /// has just touched it.
    #[inline]
    fn log_used_ring(&self, state: &State) {
        if self.dirty_log.logging() {
            self.log_used_ring_logging(state);
        }
    }

    #[cold]
    #[inline(never)]
    fn log_used_ring_logging(&self, state: &State) {
        let queue = state.get_queue();
        let addr = self.used_log_addr.unwrap_or(queue.used_ring());
        // flags + idx + ring[size] + avail_event.
        let len = 4 + 8 * u64::from(queue.size()) + 2;
        self.dirty_log.mark(addr, len);
    }
}
