//! A logged random load for crash tests: writes of 4 KiB and 64 KiB, write-zeroes and
//! discards, several in flight on each queue, every request stamped on a shared logical clock
//! when it is submitted and when it completes. After the backend is killed the log says which
//! requests were acknowledged, and which were still in flight, relative to other events stamped
//! on the same clock (bitmap checkpoints).

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use blkio::{Completion, ReqFlags};

use super::blkio_client::BlkioClient;
use super::pattern;

/// A logical clock: every stamp is later than every stamp taken before it, on any thread.
#[derive(Default)]
pub struct Clock(AtomicU64);

impl Clock {
    pub fn tick(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Data from `pattern(len, seed)`.
    Write {
        seed: u64,
    },
    WriteZeroes,
    Discard,
}

/// One request of the load.
#[derive(Clone, Debug)]
pub struct Issued {
    pub kind: Kind,
    pub offset: u64,
    pub len: u64,
    /// Stamped before the request was submitted.
    pub submitted: u64,
    /// Stamped after it completed successfully; `None` if it was in flight or failed.
    pub acknowledged: Option<u64>,
}

/// How the load ends once it is told to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Collect what the backend has already answered and return, leaving what it has not in
    /// flight (crash tests: the backend may be dead).
    Collect,
    /// Wait until every request is answered: on return nothing of the load is in flight, so
    /// a flush that follows covers all of it. (A frontend's requests can outlive its
    /// connection: a backend drains them while it already serves the next one.)
    Drain,
}

/// How long a draining load waits for the backend before calling it a hang.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// Requests in flight per queue.
const DEPTH: usize = 8;
/// Buffer bytes per request slot.
const SLOT: usize = 64 << 10;

fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Run the load on every queue of `client` over a disk of `size` bytes until `stop` is set or
/// the backend goes away; returns the log. Completions the backend posted before it went away
/// are collected after `stop`, so that only requests it never answered stay in flight.
pub fn run(
    client: &mut BlkioClient,
    size: u64,
    seed: u64,
    clock: &Clock,
    stop: &AtomicBool,
    end: End,
) -> Vec<Issued> {
    let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut log: Vec<Issued> = Vec::new();
    // Per queue: the log index in each slot.
    let mut slots: Vec<Vec<Option<usize>>> = vec![vec![None; DEPTH]; client.queues.len()];
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..DEPTH).map(|_| MaybeUninit::uninit()).collect();
    let mut draining = 0;
    let in_flight = |slots: &[Vec<Option<usize>>]| slots.iter().flatten().any(Option::is_some);
    while draining < 3 || (end == End::Drain && in_flight(&slots)) {
        if stop.load(Ordering::SeqCst) {
            draining += 1;
        }
        for (q, queue_slots) in slots.iter_mut().enumerate() {
            for (slot, entry) in queue_slots.iter_mut().enumerate() {
                if draining > 0 || entry.is_some() {
                    continue;
                }
                let r = next(&mut rng);
                let (kind, len) = match r % 10 {
                    0..=4 => (Kind::Write { seed: r }, 4096),
                    5..=7 => (Kind::Write { seed: r }, 65536),
                    8 => (Kind::WriteZeroes, [4096, 65536][(r >> 8) as usize % 2]),
                    _ => (Kind::Discard, [4096, 65536][(r >> 8) as usize % 2]),
                };
                let offset = (next(&mut rng) % ((size - len) / 4096)) * 4096;
                let index = log.len();
                let at = slot * SLOT;
                if let Kind::Write { seed } = kind {
                    client.buf(q)[at..at + len as usize]
                        .copy_from_slice(&pattern(len as usize, seed));
                }
                let ptr = client.buf(q)[at..].as_ptr();
                log.push(Issued {
                    kind,
                    offset,
                    len,
                    submitted: clock.tick(),
                    acknowledged: None,
                });
                let queue = &mut client.queues[q];
                match kind {
                    Kind::Write { .. } => {
                        queue.write(offset, ptr, len as usize, index, ReqFlags::empty())
                    }
                    Kind::WriteZeroes => queue.write_zeroes(offset, len, index, ReqFlags::empty()),
                    Kind::Discard => queue.discard(offset, len, index, ReqFlags::empty()),
                }
                *entry = Some(index);
            }
            // Draining: wait for at least one answer where any is due.
            let wait = end == End::Drain && draining > 0 && queue_slots.iter().any(Option::is_some);
            let mut limit = DRAIN_LIMIT;
            let got = match client.queues[q].do_io(
                &mut completions,
                usize::from(wait),
                wait.then_some(&mut limit),
                None,
            ) {
                Ok(n) => n,
                Err(e) if wait => panic!("the backend left requests unanswered: {e}"),
                Err(_) => return log,
            };
            for c in &completions[..got] {
                // SAFETY: do_io initialised the first `got` entries.
                let c = unsafe { c.assume_init_ref() };
                if c.ret == 0 {
                    log[c.user_data].acknowledged = Some(clock.tick());
                }
                for s in queue_slots.iter_mut() {
                    if *s == Some(c.user_data) {
                        *s = None;
                    }
                }
            }
            if got == 0 {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
    log
}
