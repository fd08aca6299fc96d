//! The in-flight region a frontend keeps across backend restarts (`src/vhost/inflight.rs`):
//! untrusted shared memory, and the record of which requests must be resubmitted.
//!
//! Each input starts from arbitrary region bytes and a used-ring index: recovering from them
//! must not panic and may only name distinct heads of the queue. Then the region is started
//! over at the ring's index and driven like a queue — requests popped, finished out of order,
//! published in batches — with crashes anywhere, including in the middle of a publish. After
//! each crash, recovery must name exactly the requests popped and not on the used ring, in
//! the order they were popped: the model below says which.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vubd::vhost::inflight::{queue_region_size, QueueRegion};

#[derive(Arbitrary, Debug)]
struct Input {
    size_log2: u8,
    ring_used: u16,
    region: Vec<u8>,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// The driver made a request available and the backend popped it.
    Pop,
    /// The backend finished the request at this position of its in-flight list.
    Finish(u8),
    /// Publish the finished requests; the backend dies after `reached` of them are on the
    /// used ring if that is fewer than all.
    Publish { reached: u8 },
    /// The backend dies.
    Crash,
}

/// What the model knows: requests in flight (popped, not finished), finished and waiting for
/// the used ring, each with its pop number.
#[derive(Default)]
struct Model {
    in_flight: Vec<(u64, u16)>,
    finished: Vec<(u64, u16)>,
    popped: u64,
}

impl Model {
    fn free_head(&self, size: u16) -> Option<u16> {
        (0..size).find(|h| {
            !self.in_flight.iter().any(|(_, x)| x == h)
                && !self.finished.iter().any(|(_, x)| x == h)
        })
    }

    /// After a crash: every request not on the used ring, oldest first.
    fn pending(&self, published_of_finished: usize) -> Vec<u16> {
        let mut all: Vec<(u64, u16)> = self.in_flight.clone();
        all.extend_from_slice(&self.finished[published_of_finished..]);
        all.sort_unstable();
        all.into_iter().map(|(_, h)| h).collect()
    }
}

fuzz_target!(|input: Input| {
    let size = 1u16 << (input.size_log2 % 9);
    let len = queue_region_size(size) as usize;
    let mut memory = vec![0u64; len / 8];
    // SAFETY: `memory` is plain u64s; viewing it as bytes to fill it is sound.
    let bytes = unsafe { std::slice::from_raw_parts_mut(memory.as_mut_ptr().cast::<u8>(), len) };
    for (dst, src) in bytes.iter_mut().zip(&input.region) {
        *dst = *src;
    }
    // SAFETY: `memory` outlives `region` and is only accessed through it from here on.
    let mut region = unsafe { QueueRegion::from_raw(memory.as_mut_ptr().cast(), len, size) }
        .expect("an aligned region of the right size");

    let mut ring_used = input.ring_used;
    if let Ok(heads) = region.recover(ring_used) {
        let mut seen = vec![false; usize::from(size)];
        for h in heads {
            assert!(h < size, "recovered head {h} of a queue of {size}");
            assert!(!seen[usize::from(h)], "head {h} recovered twice");
            seen[usize::from(h)] = true;
        }
    }
    region.restart_at(ring_used);

    let mut model = Model::default();
    for op in input.ops.iter().take(512) {
        match op {
            Op::Pop => {
                let Some(head) = model.free_head(size) else {
                    continue;
                };
                region.record(head);
                model.in_flight.push((model.popped, head));
                model.popped += 1;
            }
            Op::Finish(at) => {
                if !model.in_flight.is_empty() {
                    let i = usize::from(*at) % model.in_flight.len();
                    let request = model.in_flight.remove(i);
                    model.finished.push(request);
                }
            }
            Op::Publish { reached } => {
                let batch: Vec<u16> = model.finished.iter().map(|(_, h)| *h).collect();
                region.begin_publish(&batch);
                let reached = usize::from(*reached).min(batch.len());
                ring_used = ring_used.wrapping_add(reached as u16);
                if reached == batch.len() {
                    region.end_publish(&batch, ring_used);
                    model.finished.clear();
                } else {
                    let expected = model.pending(reached);
                    let got = region
                        .recover(ring_used)
                        .expect("a region the backend kept");
                    assert_eq!(
                        got,
                        expected,
                        "crash after {reached} of a batch of {}",
                        batch.len()
                    );
                    restart(&mut model, expected);
                }
            }
            Op::Crash => {
                let expected = model.pending(0);
                let got = region
                    .recover(ring_used)
                    .expect("a region the backend kept");
                assert_eq!(got, expected, "crash");
                restart(&mut model, expected);
            }
        }
    }
});

/// The new backend resubmitted `pending`: in flight again, in that order.
fn restart(model: &mut Model, pending: Vec<u16>) {
    model.finished.clear();
    model.in_flight = pending
        .into_iter()
        .enumerate()
        .map(|(i, h)| (i as u64, h))
        .collect();
    model.popped = model.in_flight.len() as u64;
}
