//! Copy-before-write: the filter that keeps a point-in-time view of a disk while the guest
//! goes on writing it (QEMU's `copy-before-write` driver, which its `backup` job with
//! `sync: none` inserts over the disk).
//!
//! The view is a *fleecing* node: a qcow2 image whose backing node is the disk. Until a
//! cluster of the disk is first written after the checkpoint, the view reads it through the
//! backing link, from the disk itself. The filter sits over the disk and, before the first
//! write, write-zeroes or discard that touches such a cluster reaches the disk, copies the
//! cluster's old content into the fleecing node; from then on the view reads the copy.
//!
//! * Copies are per cluster of the fleecing node, each done once: a bit per cluster says
//!   "the view no longer needs the disk here", checked with one atomic load per cluster, so
//!   writes to copied clusters pay nothing. Concurrent writes to one cluster wait for the one
//!   copy (claims are taken one run at a time and never held while waiting, so no deadlock).
//! * A reader of the view that found a cluster not yet copied reads it from the disk after
//!   mapping it. The copy of that cluster therefore waits for such readers to finish before
//!   it lets the guest's write through ([`CopyBeforeWrite::reading`] registers them), as
//!   QEMU's serialising fleecing writes do.
//! * A copy that fails fails the guest's write (QEMU's default `on-cbw-error=break-guest-write`):
//!   the view never silently loses the checkpoint's data.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::file::AlignedBuf;
use super::filter::Filter;
use super::{BlockDriver, BlockError};

/// Largest run of clusters copied in one read and one write.
const MAX_RUN_BYTES: u64 = 1 << 20;
/// Alignment of the copy buffer: direct I/O on the disk needs it.
const BUFFER_ALIGN: usize = 4096;

/// The copy-before-write filter over a disk, copying into `target`.
pub struct CopyBeforeWrite {
    target: Arc<dyn BlockDriver>,
    cluster_bits: u32,
    size: u64,
    /// A bit per cluster: its checkpoint data is in `target`, so the view no longer reads the
    /// disk there (set only once the copy is complete and no earlier reader remains).
    done: Vec<AtomicU64>,
    state: Mutex<CopyState>,
    changed: Condvar,
    copied_bytes: AtomicU64,
}

#[derive(Default)]
struct CopyState {
    /// Clusters being copied right now.
    copying: HashSet<u64>,
    /// Readers of the view, by arrival number: the byte range they read.
    readers: BTreeMap<u64, (u64, u64)>,
    next_reader: u64,
}

impl fmt::Debug for CopyBeforeWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CopyBeforeWrite")
            .field("cluster_size", &(1u64 << self.cluster_bits))
            .field("size", &self.size)
            .field("copied_bytes", &self.copied_bytes.load(Ordering::Relaxed))
            .finish()
    }
}

/// A reader of the view, registered until dropped.
pub struct ReadGuard {
    cbw: Arc<CopyBeforeWrite>,
    id: u64,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        self.cbw.lock().readers.remove(&self.id);
        self.cbw.changed.notify_all();
    }
}

impl CopyBeforeWrite {
    /// A filter for a disk of `size` bytes, copying clusters of `cluster_size` bytes (a power
    /// of two, at least 512) into `target`.
    pub fn new(target: Arc<dyn BlockDriver>, size: u64, cluster_size: u64) -> Self {
        let cluster_bits = cluster_size.max(512).next_power_of_two().trailing_zeros();
        let clusters = size.div_ceil(1 << cluster_bits);
        let words = clusters.div_ceil(64) as usize;
        CopyBeforeWrite {
            target,
            cluster_bits,
            size,
            done: (0..words).map(|_| AtomicU64::new(0)).collect(),
            state: Mutex::new(CopyState::default()),
            changed: Condvar::new(),
            copied_bytes: AtomicU64::new(0),
        }
    }

    /// Bytes copied into the target so far.
    pub fn copied_bytes(&self) -> u64 {
        self.copied_bytes.load(Ordering::Relaxed)
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Register a reader of `[offset, offset + len)` of the view: copies of clusters it may
    /// read from the disk wait for it.
    pub fn reading(self: &Arc<Self>, offset: u64, len: u64) -> ReadGuard {
        let mut state = self.lock();
        let id = state.next_reader;
        state.next_reader += 1;
        state
            .readers
            .insert(id, (offset, offset.saturating_add(len)));
        drop(state);
        ReadGuard {
            cbw: self.clone(),
            id,
        }
    }

    fn lock(&self) -> MutexGuard<'_, CopyState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_done(&self, cluster: u64) -> bool {
        let word = &self.done[(cluster / 64) as usize];
        word.load(Ordering::Acquire) & (1 << (cluster % 64)) != 0
    }

    fn set_done(&self, cluster: u64) {
        self.done[(cluster / 64) as usize].fetch_or(1 << (cluster % 64), Ordering::Release);
    }

    /// The clusters `[offset, offset + len)` touches, within the disk.
    fn clusters(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let end = offset.saturating_add(len).min(self.size);
        if len == 0 || offset >= end {
            return 0..0;
        }
        (offset >> self.cluster_bits)..((end - 1) >> self.cluster_bits) + 1
    }

    /// Make sure every cluster of `[offset, offset + len)` has its checkpoint data in the
    /// target, copying from `disk` what is not there yet.
    fn ensure_copied(
        &self,
        disk: &dyn BlockDriver,
        offset: u64,
        len: u64,
    ) -> Result<(), BlockError> {
        let clusters = self.clusters(offset, len);
        let mut next = clusters.start;
        while next < clusters.end {
            if self.is_done(next) {
                next += 1;
                continue;
            }
            // Claim a run of clusters nobody copies yet, or wait for the one being copied.
            let run = {
                let mut state = self.lock();
                loop {
                    if self.is_done(next) {
                        break None;
                    }
                    if !state.copying.contains(&next) {
                        let max = (MAX_RUN_BYTES >> self.cluster_bits).max(1);
                        let mut end = next + 1;
                        while end < clusters.end
                            && end - next < max
                            && !self.is_done(end)
                            && !state.copying.contains(&end)
                        {
                            end += 1;
                        }
                        state.copying.extend(next..end);
                        break Some(next..end);
                    }
                    state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
                }
            };
            let Some(run) = run else {
                next += 1;
                continue;
            };
            let result = self.copy(disk, run.clone());
            {
                let mut state = self.lock();
                for c in run.clone() {
                    if result.is_ok() {
                        self.set_done(c);
                    }
                    state.copying.remove(&c);
                }
            }
            self.changed.notify_all();
            result?;
            next = run.end;
        }
        Ok(())
    }

    /// Copy the clusters of `run` from the disk into the target, then wait for the readers
    /// that may still be reading them from the disk.
    fn copy(&self, disk: &dyn BlockDriver, run: std::ops::Range<u64>) -> Result<(), BlockError> {
        let start = run.start << self.cluster_bits;
        let end = (run.end << self.cluster_bits).min(self.size);
        let len = (end - start) as usize;
        let mut buf = AlignedBuf::zeroed(len, BUFFER_ALIGN).map_err(BlockError::from)?;
        disk.read_at(start, buf.as_mut_slice())?;
        self.target.write_at(start, buf.as_slice())?;
        self.copied_bytes.fetch_add(len as u64, Ordering::Relaxed);
        // Readers that arrived before the copy reached the target may have mapped these
        // clusters to the disk; later ones map them to the copy.
        let mut state = self.lock();
        let before = state.next_reader;
        while state
            .readers
            .range(..before)
            .any(|(_, &(s, e))| s < end && start < e)
        {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }
}

impl Filter for CopyBeforeWrite {
    fn name(&self) -> &'static str {
        "copy-before-write"
    }

    fn before_write(
        &self,
        child: &dyn BlockDriver,
        offset: u64,
        len: u64,
    ) -> Result<(), BlockError> {
        // The fast path: every cluster copied already.
        let clusters = self.clusters(offset, len);
        if clusters.clone().all(|c| self.is_done(c)) {
            return Ok(());
        }
        self.ensure_copied(child, offset, len)
    }
}
