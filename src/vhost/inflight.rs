//! In-flight I/O tracking for split virtqueues (vhost-user.rst, "Inflight I/O tracking";
//! `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`): a region of shared memory, kept by the frontend
//! across backend restarts, that records which popped requests are not yet on the used ring.
//! After a crash the new backend resubmits exactly those, in the order they were popped, even
//! if the old one completed others out of order meanwhile.
//!
//! Layout of one queue's region (little-endian, as the specification and libvhost-user lay it
//! out):
//!
//! ```text
//! offset 0   u64 features
//!        8   u16 version          (0: fresh, never used by a backend; 1: in use)
//!       10   u16 desc_num         (the queue size)
//!       12   u16 last_batch_head  (first head of the last batch published)
//!       14   u16 used_idx         (the used ring's index after the last complete publish)
//!       16   desc[desc_num], 16 bytes each:
//!              u8 inflight, u8 padding[5], u16 next, u64 counter
//! ```
//!
//! The frontend shares the region, so it is untrusted input and is only ever accessed through
//! atomics (never through references to plain fields), and every walk is bounded.
//!
//! Publishing a batch follows the specification's steps: the batch's heads are linked through
//! `next` in publish order from `last_batch_head`; then each goes on the used ring (virtio-queue
//! advances the used index after each one); then their `inflight` flags are cleared; last,
//! `used_idx` catches up with the ring. A crash at any point leaves the region and the used ring
//! saying together which heads are still in flight: the first `used.idx - used_idx` heads of the
//! batch list reached the ring, the others did not.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{compiler_fence, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use thiserror::Error;

use super::shared_file::SharedMapping;

/// The region format version vubd writes.
pub const VERSION: u16 = 1;
/// Bytes of a queue region's header.
const HEADER: usize = 16;
/// Bytes of one descriptor's state.
const DESC: usize = 16;
/// Alignment of each queue's region within the file.
const ALIGN: u64 = 64;

/// Why a region cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InflightError {
    #[error("inflight region of {len} bytes is too small for a queue of {queue_size}")]
    TooSmall { len: usize, queue_size: u16 },
    #[error("inflight region is not 8-byte aligned")]
    Misaligned,
    #[error("inflight region's used index {region} is {ahead} behind the used ring's {ring}, more than the queue holds ({queue_size})")]
    UsedIndexOutOfRange {
        region: u16,
        ring: u16,
        ahead: u16,
        queue_size: u16,
    },
    #[error("inflight region's batch list leaves the queue at entry {0}")]
    BadBatchList(u16),
}

/// Bytes one queue of `queue_size` takes in the shared file: libvhost-user's formula, so that a
/// region a frontend kept from another backend (qemu-storage-daemon) fits vubd's and back.
pub fn queue_region_size(queue_size: u16) -> u64 {
    (DESC as u64 * u64::from(queue_size) + 2).next_multiple_of(ALIGN)
}

/// The in-flight file a frontend shares (`SET_INFLIGHT_FD`), mapped: one region per queue.
pub struct InflightMemory {
    mapping: SharedMapping,
    stride: usize,
    num_queues: u16,
    queue_size: u16,
}

impl InflightMemory {
    /// `GET_INFLIGHT_FD`: a new zeroed file for `num_queues` queues of `queue_size`, sealed
    /// against resizing, and its size.
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<(File, u64)> {
        let size = u64::from(num_queues) * queue_region_size(queue_size);
        // SAFETY: memfd_create with a valid NUL-terminated name and flags.
        let fd = unsafe {
            libc::memfd_create(
                c"vubd-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on our own memfd.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((file, size))
    }

    /// `SET_INFLIGHT_FD`: map `size` bytes at `offset` of the frontend's `file`, for
    /// `num_queues` queues of `queue_size`. The file is the frontend's: it must really hold
    /// what it claims (a short file would raise SIGBUS on the first access).
    pub fn map(
        file: &File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<Arc<InflightMemory>> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
        let stride = queue_region_size(queue_size);
        let needed = u64::from(num_queues) * stride;
        if num_queues == 0 || queue_size == 0 || size < needed {
            return Err(invalid(format!(
                "inflight region of {size} bytes for {num_queues} queues of {queue_size}"
            )));
        }
        let mapping = SharedMapping::new(file, offset, size, "inflight region")?;
        // The files backends hand out (vubd's, libvhost-user's) are sealed; QEMU passes them
        // back as they are.
        SharedMapping::require_shrink_seal(file, "inflight")?;
        Ok(Arc::new(InflightMemory {
            mapping,
            stride: stride as usize,
            num_queues,
            queue_size,
        }))
    }

    /// Queue `index`'s region, keeping the mapping alive.
    pub fn queue(self: &Arc<Self>, index: usize) -> Option<QueueRegion> {
        if index >= usize::from(self.num_queues) {
            return None;
        }
        // SAFETY: `index * stride + stride` is within the mapping (checked in `map`), which the
        // region keeps alive through its `Arc`, and which is only accessed through atomics.
        let mut region = unsafe {
            QueueRegion::from_raw(
                self.mapping.base().add(index * self.stride),
                self.stride,
                self.queue_size,
            )
        }
        .ok()?;
        region._mapping = Some(self.clone());
        Some(region)
    }
}

/// One queue's region.
pub struct QueueRegion {
    base: *mut u8,
    queue_size: u16,
    /// The next request's arrival number.
    counter: u64,
    /// The mapping the region lives in, if it is one (tests use plain memory).
    _mapping: Option<Arc<InflightMemory>>,
}

// SAFETY: the region is shared memory accessed only through atomics; the owner keeps the
// mapping alive for as long as the `QueueRegion` exists (see `from_raw`).
unsafe impl Send for QueueRegion {}

impl QueueRegion {
    /// A view of `len` bytes at `base` as the region of a queue of `queue_size`.
    ///
    /// # Safety
    /// `base..base + len` must stay mapped, readable and writable for the life of the returned
    /// value, and nothing in this process may access it other than through atomics.
    pub unsafe fn from_raw(
        base: *mut u8,
        len: usize,
        queue_size: u16,
    ) -> Result<QueueRegion, InflightError> {
        if !(base as usize).is_multiple_of(8) {
            return Err(InflightError::Misaligned);
        }
        if len < HEADER + DESC * usize::from(queue_size) {
            return Err(InflightError::TooSmall { len, queue_size });
        }
        Ok(QueueRegion {
            base,
            queue_size,
            counter: 0,
            _mapping: None,
        })
    }

    fn u8_at(&self, offset: usize) -> &AtomicU8 {
        // SAFETY: `offset` is inside the region (callers index headers and descriptors below
        // `queue_size`), which `from_raw`'s contract keeps mapped and atomic-only.
        unsafe { AtomicU8::from_ptr(self.base.add(offset)) }
    }

    fn u16_at(&self, offset: usize) -> &AtomicU16 {
        // SAFETY: as above; every u16 field is at an even offset of an 8-aligned base.
        unsafe { AtomicU16::from_ptr(self.base.add(offset).cast()) }
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: as above; every u64 field is at a multiple of 8 from an 8-aligned base.
        unsafe { AtomicU64::from_ptr(self.base.add(offset).cast()) }
    }

    fn desc(&self, head: u16) -> usize {
        HEADER + DESC * usize::from(head)
    }

    fn version(&self) -> &AtomicU16 {
        self.u16_at(8)
    }

    fn desc_num(&self) -> &AtomicU16 {
        self.u16_at(10)
    }

    fn last_batch_head(&self) -> &AtomicU16 {
        self.u16_at(12)
    }

    fn used_idx(&self) -> &AtomicU16 {
        self.u16_at(14)
    }

    fn inflight(&self, head: u16) -> &AtomicU8 {
        self.u8_at(self.desc(head))
    }

    fn next(&self, head: u16) -> &AtomicU16 {
        self.u16_at(self.desc(head) + 6)
    }

    fn counter(&self, head: u16) -> &AtomicU64 {
        self.u64_at(self.desc(head) + 8)
    }

    /// Record `head` as popped and in flight, before its request starts.
    pub fn record(&mut self, head: u16) {
        if head >= self.queue_size {
            return;
        }
        self.counter(head).store(self.counter, Ordering::Relaxed);
        self.counter += 1;
        compiler_fence(Ordering::SeqCst);
        self.inflight(head).store(1, Ordering::Relaxed);
    }

    /// Before a batch goes on the used ring: link its heads, in publish order, from
    /// `last_batch_head`.
    pub fn begin_publish(&self, batch: &[u16]) {
        let mut first = self.last_batch_head().load(Ordering::Relaxed);
        for &head in batch.iter().rev().filter(|h| **h < self.queue_size) {
            self.next(head).store(first, Ordering::Relaxed);
            first = head;
        }
        compiler_fence(Ordering::SeqCst);
        self.last_batch_head().store(first, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
    }

    /// After `published` (the batch, or the part of it that reached the ring) is on the used
    /// ring, whose index is now `used_idx`.
    pub fn end_publish(&self, published: &[u16], used_idx: u16) {
        compiler_fence(Ordering::SeqCst);
        for &head in published.iter().filter(|h| **h < self.queue_size) {
            self.inflight(head).store(0, Ordering::Relaxed);
        }
        compiler_fence(Ordering::SeqCst);
        self.used_idx().store(used_idx, Ordering::Relaxed);
    }

    /// Whether no backend ever used the region (so there is nothing to recover).
    pub fn is_fresh(&self) -> bool {
        self.version().load(Ordering::Relaxed) == 0
    }

    /// Start the region over at the used ring's index `ring_used_idx`, forgetting what it
    /// held: for a region that contradicts the ring.
    pub fn restart_at(&mut self, ring_used_idx: u16) {
        for head in 0..self.queue_size {
            self.inflight(head).store(0, Ordering::Relaxed);
        }
        self.version().store(0, Ordering::Relaxed);
        let _ = self.recover(ring_used_idx);
    }

    /// When the queue starts on a region (after `SET_INFLIGHT_FD`), with the used ring's index
    /// `ring_used_idx`: the heads to resubmit, oldest first. Every request popped before is
    /// among them or on the used ring, each exactly once. The caller resumes popping the avail
    /// ring at `ring_used_idx + returned.len()`.
    pub fn recover(&mut self, ring_used_idx: u16) -> Result<Vec<u16>, InflightError> {
        if self.version().load(Ordering::Relaxed) == 0 {
            // Fresh: nothing was ever recorded. Start the region at the ring's position.
            self.desc_num().store(self.queue_size, Ordering::Relaxed);
            self.last_batch_head().store(0, Ordering::Relaxed);
            self.used_idx().store(ring_used_idx, Ordering::Relaxed);
            compiler_fence(Ordering::SeqCst);
            self.version().store(VERSION, Ordering::Relaxed);
            self.counter = 0;
            return Ok(Vec::new());
        }
        let region_used = self.used_idx().load(Ordering::Relaxed);
        let ahead = ring_used_idx.wrapping_sub(region_used);
        if ahead > self.queue_size {
            return Err(InflightError::UsedIndexOutOfRange {
                region: region_used,
                ring: ring_used_idx,
                ahead,
                queue_size: self.queue_size,
            });
        }
        // The first `ahead` heads of the last batch reached the ring before the crash.
        let mut head = self.last_batch_head().load(Ordering::Relaxed);
        for _ in 0..ahead {
            if head >= self.queue_size {
                return Err(InflightError::BadBatchList(head));
            }
            self.inflight(head).store(0, Ordering::Relaxed);
            head = self.next(head).load(Ordering::Relaxed);
        }
        compiler_fence(Ordering::SeqCst);
        self.used_idx().store(ring_used_idx, Ordering::Relaxed);
        self.desc_num().store(self.queue_size, Ordering::Relaxed);
        let mut pending: Vec<(u64, u16)> = (0..self.queue_size)
            .filter(|h| self.inflight(*h).load(Ordering::Relaxed) == 1)
            .map(|h| (self.counter(h).load(Ordering::Relaxed), h))
            .collect();
        pending.sort_unstable();
        self.counter = pending.last().map_or(0, |(c, _)| c.wrapping_add(1));
        Ok(pending.into_iter().map(|(_, h)| h).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUEUE: u16 = 8;

    /// A zeroed, 8-aligned region, as a fresh memfd would be.
    fn region_memory() -> Vec<u64> {
        vec![0u64; queue_region_size(QUEUE) as usize / 8]
    }

    fn region(memory: &mut [u64]) -> QueueRegion {
        let len = memory.len() * 8;
        // SAFETY: `memory` outlives the region in every test and is only used through it.
        unsafe { QueueRegion::from_raw(memory.as_mut_ptr().cast(), len, QUEUE).unwrap() }
    }

    /// A backend's queue as the tests drive it: the used ring's index and what is on it.
    struct Ring {
        used: u16,
        on_ring: Vec<u16>,
    }

    /// Publish `batch`, stopping after `steps` of its steps (link, each add_used, the clears,
    /// the used index): a crash at any point.
    fn publish(r: &QueueRegion, ring: &mut Ring, batch: &[u16], steps: usize) {
        let mut step = 0;
        let mut go = || {
            step += 1;
            step <= steps
        };
        if !go() {
            return;
        }
        r.begin_publish(batch);
        for &h in batch {
            if !go() {
                return;
            }
            ring.on_ring.push(h);
            ring.used = ring.used.wrapping_add(1);
        }
        if !go() {
            return;
        }
        r.end_publish(batch, ring.used);
    }

    #[test]
    fn sizes_follow_libvhost_user() {
        assert_eq!(queue_region_size(128), 2112);
        assert_eq!(queue_region_size(1024), 16448);
        assert!(queue_region_size(QUEUE) as usize >= HEADER + DESC * usize::from(QUEUE));
    }

    #[test]
    fn a_fresh_region_starts_at_the_ring_and_resubmits_nothing() {
        let mut memory = region_memory();
        let mut r = region(&mut memory);
        assert_eq!(r.recover(5), Ok(vec![]));
        assert_eq!(r.version().load(Ordering::Relaxed), VERSION);
        assert_eq!(r.used_idx().load(Ordering::Relaxed), 5);
        assert_eq!(r.desc_num().load(Ordering::Relaxed), QUEUE);
    }

    /// Requests popped 0..6 (heads 3, 1, 4, 0, 5, 2), completed out of order: a batch [1, 0]
    /// published whole, then a batch [5, 3, 2] cut at every step. Recovery must list exactly
    /// the popped heads not on the ring, oldest first.
    #[test]
    fn a_crash_at_any_step_of_a_publish_resubmits_exactly_what_is_not_on_the_ring() {
        let popped = [3u16, 1, 4, 0, 5, 2];
        let second = [5u16, 3, 2];
        for steps in 0..=second.len() + 2 {
            let mut memory = region_memory();
            let mut r = region(&mut memory);
            r.recover(10).unwrap();
            let mut ring = Ring {
                used: 10,
                on_ring: Vec::new(),
            };
            for h in popped {
                r.record(h);
            }
            publish(&r, &mut ring, &[1, 0], usize::MAX);
            publish(&r, &mut ring, &second, steps);
            // The backend dies; a new one maps the same memory.
            let mut again = region(&mut memory);
            let resubmit = again.recover(ring.used).unwrap();
            let expected: Vec<u16> = popped
                .iter()
                .copied()
                .filter(|h| !ring.on_ring.contains(h))
                .collect();
            assert_eq!(resubmit, expected, "crash after {steps} steps");
            assert_eq!(again.used_idx().load(Ordering::Relaxed), ring.used);
            // Recovery is idempotent: a second crash before anything new changes nothing.
            let mut third = region(&mut memory);
            assert_eq!(third.recover(ring.used).unwrap(), expected);
            // New requests are numbered after the resubmitted ones.
            third.record(6);
            let mut fourth = region(&mut memory);
            let mut more = expected.clone();
            more.push(6);
            assert_eq!(fourth.recover(ring.used).unwrap(), more);
        }
    }

    #[test]
    fn a_corrupt_region_is_refused_not_followed() {
        let mut memory = region_memory();
        let mut r = region(&mut memory);
        r.recover(0).unwrap();
        // The ring claims more completions than the queue holds.
        assert!(matches!(
            r.recover(QUEUE + 1),
            Err(InflightError::UsedIndexOutOfRange { .. })
        ));
        // A batch list that leaves the queue.
        r.last_batch_head().store(200, Ordering::Relaxed);
        assert_eq!(r.recover(1), Err(InflightError::BadBatchList(200)));
        // Heads out of range are never recorded.
        r.record(QUEUE);
        let mut small = [0u64; 2];
        // SAFETY: `small` outlives the call.
        let err = unsafe { QueueRegion::from_raw(small.as_mut_ptr().cast(), 16, QUEUE) };
        assert!(matches!(err, Err(InflightError::TooSmall { .. })));
    }
}
