//! The write gate: lets a management operation run while no write is in flight.
//!
//! Each queue counts the writes it has marked in the bitmaps and not yet completed, in a
//! counter of its own (no cache line is shared between queues on the write path). A drained
//! section closes the gate, waits for every counter to reach zero, and reopens it when the
//! guard drops; queues that find the gate closed hold their writes back and are woken when it
//! reopens. The enter/close handshake is the classic store-then-load pairing with sequentially
//! consistent atomics: a queue that raced past a closing gate sees it closed and backs out.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// A counter alone on its cache line.
#[repr(align(128))]
#[derive(Default)]
struct PaddedCounter(AtomicUsize);

pub struct WriteGate {
    closed: AtomicBool,
    active: Box<[PaddedCounter]>,
    /// Queue threads' wake eventfds, poked when the gate reopens.
    wakers: Mutex<Vec<Weak<EventFd>>>,
}

impl std::fmt::Debug for WriteGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteGate")
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}

/// Writes in flight did not finish in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainTimeout;

/// Reopens the gate when dropped.
pub struct Drained<'a> {
    gate: &'a WriteGate,
}

impl Drop for Drained<'_> {
    fn drop(&mut self) {
        self.gate.closed.store(false, Ordering::SeqCst);
        self.gate.wake_all();
    }
}

impl WriteGate {
    pub fn new(queues: usize) -> Self {
        WriteGate {
            closed: AtomicBool::new(false),
            active: (0..queues).map(|_| PaddedCounter::default()).collect(),
            wakers: Mutex::new(Vec::new()),
        }
    }

    /// Start a write on `queue`; false if the gate is closed (hold the write back).
    pub fn try_enter(&self, queue: usize) -> bool {
        let Some(counter) = self.active.get(queue) else {
            return true;
        };
        counter.0.fetch_add(1, Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) {
            counter.0.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// A write started with `try_enter` completed.
    pub fn exit(&self, queue: usize) {
        if let Some(counter) = self.active.get(queue) {
            counter.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Close the gate and wait until no write is in flight; `Err` if that takes longer than
    /// `timeout` (the gate is reopened).
    pub fn drain(&self, timeout: Duration) -> Result<Drained<'_>, DrainTimeout> {
        self.closed.store(true, Ordering::SeqCst);
        let guard = Drained { gate: self };
        let deadline = Instant::now() + timeout;
        while self.active.iter().any(|c| c.0.load(Ordering::SeqCst) != 0) {
            if Instant::now() > deadline {
                return Err(DrainTimeout);
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(guard)
    }

    /// Register a queue thread's wake eventfd.
    pub fn register_waker(&self, waker: &Arc<EventFd>) {
        let mut wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        wakers.retain(|w| w.strong_count() > 0);
        wakers.push(Arc::downgrade(waker));
    }

    pub(crate) fn wake_all(&self) {
        let wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        for w in wakers.iter().filter_map(Weak::upgrade) {
            let _ = w.write(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_waits_for_writes_and_holds_new_ones_back() {
        let gate = Arc::new(WriteGate::new(2));
        assert!(gate.try_enter(1));
        let g2 = gate.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            g2.exit(1);
        });
        let started = Instant::now();
        let drained = gate.drain(Duration::from_secs(5)).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(40));
        assert!(!gate.try_enter(0), "closed while drained");
        drop(drained);
        assert!(gate.try_enter(0));
        t.join().unwrap();
    }
}
