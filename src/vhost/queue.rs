//! One virtqueue of a connection: its vring, its worker, and the thread that runs it.
//!
//! Each queue has its own thread, waiting in its own epoll set on three descriptors: the
//! guest's kick (watched only while the ring is started and enabled), the worker's wake-up
//! (completions, leftover work, the write gate reopening) and a stop event. The connection's
//! message handler changes the ring (start, stop, enable, addresses) under the worker's lock,
//! which the thread holds while it works, so the two never see the ring half-changed.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::ring::{QueueWorker, Vring};

const KICK: u64 = 0;
const WAKE: u64 = 1;
const STOP: u64 = 2;

/// A queue and its thread's controls.
pub struct Queue {
    index: usize,
    vring: Vring,
    worker: Mutex<QueueWorker>,
    epoll: Epoll,
    stop: EventFd,
    /// The kick descriptor in the epoll set, if any.
    watched_kick: Mutex<Option<RawFd>>,
}

impl Queue {
    /// Queue `index` over `vring`, worked by `worker`, and its thread.
    pub fn start(
        index: usize,
        vring: Vring,
        worker: QueueWorker,
    ) -> io::Result<(Arc<Queue>, JoinHandle<()>)> {
        let epoll = Epoll::new()?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let watch = |fd: RawFd, token: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
        };
        watch(worker.wake_fd().as_raw_fd(), WAKE)?;
        watch(stop.as_raw_fd(), STOP)?;
        let queue = Arc::new(Queue {
            index,
            vring,
            worker: Mutex::new(worker),
            epoll,
            stop,
            watched_kick: Mutex::new(None),
        });
        let thread_queue = queue.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vubd-queue-{index}"))
            .spawn(move || thread_queue.run())?;
        Ok((queue, thread))
    }

    pub fn vring(&self) -> &Vring {
        &self.vring
    }

    /// The worker, locked.
    pub fn worker(&self) -> MutexGuard<'_, QueueWorker> {
        // A worker panicking would have taken the daemon down; a poisoned lock still holds a
        // consistent worker, since every step leaves it consistent.
        self.worker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watch the guest's kicks exactly while the ring is started and enabled. Call after any
    /// change to either, or to the kick descriptor (before the old one is closed).
    pub fn update_kick(&self) -> io::Result<()> {
        let wanted = {
            let state = self.vring.get_ref();
            let running = state.get_queue().ready() && state.is_enabled();
            state
                .get_kick()
                .as_ref()
                .filter(|_| running)
                .map(|kick| kick.as_raw_fd())
        };
        let mut watched = self.watched_kick.lock().unwrap_or_else(|p| p.into_inner());
        if *watched == wanted {
            return Ok(());
        }
        if let Some(fd) = watched.take() {
            // The descriptor may already be closed (which removed it): nothing to undo then.
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        if let Some(fd) = wanted {
            self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, KICK),
            )?;
            *watched = Some(fd);
        }
        Ok(())
    }

    /// Stop watching the kick descriptor (before it is replaced or closed).
    pub fn unwatch_kick(&self) {
        let mut watched = self.watched_kick.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fd) = watched.take() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    /// Ask the thread to end; join its handle afterwards.
    pub fn stop(&self) {
        let _ = self.stop.write(1);
    }

    fn run(&self) {
        let mut events = [EpollEvent::default(); 3];
        loop {
            let count = match self.epoll.wait(-1, &mut events) {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("queue {}: waiting for events: {e}", self.index);
                    return;
                }
            };
            for event in &events[..count] {
                match event.data() {
                    STOP => return,
                    KICK => {
                        // Reading the kick clears it; a kick on a disabled ring is dropped,
                        // as the ring is looked at again when it is enabled.
                        if let Ok(true) = self.vring.read_kick() {
                            self.worker().handle_event(true);
                        }
                    }
                    _ => self.worker().handle_event(false),
                }
            }
        }
    }
}
