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
/// Largest map of copied clusters, as QEMU bounds a dirty bitmap's data (512 MiB: 256 TiB of
/// disk at 64 KiB clusters).
pub const MAX_MAP_BYTES: u64 = 512 << 20;
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
    ///
    /// `None` when the map of copied clusters would exceed [`MAX_MAP_BYTES`] (a disk of
    /// exabytes, say): a larger cluster size in the fleecing image makes it fit.
    pub fn new(target: Arc<dyn BlockDriver>, size: u64, cluster_size: u64) -> Option<Self> {
        let cluster_bits = cluster_size.max(512).next_power_of_two().trailing_zeros();
        let clusters = size.div_ceil(1 << cluster_bits);
        let words = clusters.div_ceil(64);
        if words * 8 > MAX_MAP_BYTES {
            return None;
        }
        Some(CopyBeforeWrite {
            target,
            cluster_bits,
            size,
            done: (0..words).map(|_| AtomicU64::new(0)).collect(),
            state: Mutex::new(CopyState::default()),
            changed: Condvar::new(),
            copied_bytes: AtomicU64::new(0),
        })
    }

    /// Bytes copied into the target so far.
    pub fn copied_bytes(&self) -> u64 {
        self.copied_bytes.load(Ordering::Relaxed)
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::block::file::{FileNode, FileOptions};
    use crate::block::filter::FilterNode;
    use crate::block::raw::RawNode;
    use crate::block::ZeroOp;

    const CLUSTER: u64 = 65536;
    const SIZE: u64 = 8 * CLUSTER;

    struct Setup {
        disk: Arc<dyn BlockDriver>,
        target: Arc<dyn BlockDriver>,
        cbw: Arc<CopyBeforeWrite>,
        node: Arc<FilterNode<Arc<CopyBeforeWrite>>>,
        paths: Vec<PathBuf>,
    }

    impl Drop for Setup {
        fn drop(&mut self) {
            for p in &self.paths {
                let _ = std::fs::remove_file(p);
            }
        }
    }

    fn old_byte(offset: u64) -> u8 {
        (offset / 4096) as u8 | 1
    }

    fn raw(name: &str, content: Vec<u8>, read_only: bool) -> (Arc<dyn BlockDriver>, PathBuf) {
        let path = std::env::temp_dir().join(format!("vubd-cbw-{}-{name}", std::process::id()));
        std::fs::write(&path, content).unwrap();
        let file = FileNode::open(
            &path,
            FileOptions {
                read_only,
                ..FileOptions::default()
            },
        )
        .unwrap();
        (Arc::new(RawNode::new(Arc::new(file))), path)
    }

    fn setup(name: &str, target_read_only: bool) -> Setup {
        let old: Vec<u8> = (0..SIZE).map(old_byte).collect();
        let (disk, a) = raw(&format!("{name}-disk"), old, false);
        let (target, b) = raw(
            &format!("{name}-target"),
            vec![0; SIZE as usize],
            target_read_only,
        );
        let cbw = Arc::new(CopyBeforeWrite::new(target.clone(), SIZE, CLUSTER).unwrap());
        let node = Arc::new(FilterNode::new(cbw.clone(), disk.clone()));
        Setup {
            disk,
            target,
            cbw,
            node,
            paths: vec![a, b],
        }
    }

    fn read(node: &dyn BlockDriver, offset: u64, len: u64) -> Vec<u8> {
        let mut buf = vec![0u8; len as usize];
        node.read_at(offset, &mut buf).unwrap();
        buf
    }

    fn old(offset: u64, len: u64) -> Vec<u8> {
        (offset..offset + len).map(old_byte).collect()
    }

    #[test]
    fn the_first_write_to_a_cluster_copies_its_old_content_once() {
        let s = setup("once", false);
        s.node.write_at(2 * CLUSTER + 512, &[0xee; 4096]).unwrap();
        assert_eq!(s.cbw.copied_bytes(), CLUSTER);
        assert_eq!(
            read(&*s.target, 2 * CLUSTER, CLUSTER),
            old(2 * CLUSTER, CLUSTER)
        );
        assert_eq!(read(&*s.disk, 2 * CLUSTER + 512, 4096), vec![0xee; 4096]);
        // Copied clusters cost nothing more, and keep the checkpoint's content.
        s.node.write_at(2 * CLUSTER, &[0xdd; 8192]).unwrap();
        assert_eq!(s.cbw.copied_bytes(), CLUSTER);
        assert_eq!(
            read(&*s.target, 2 * CLUSTER, CLUSTER),
            old(2 * CLUSTER, CLUSTER)
        );
        // Write-zeroes and discards copy first too, every cluster they touch.
        let mut ops = Vec::new();
        s.node
            .map_zeroes(4 * CLUSTER + 100, CLUSTER, ZeroOp::Discard, &mut ops)
            .unwrap();
        assert_eq!(s.cbw.copied_bytes(), 3 * CLUSTER);
        assert_eq!(
            read(&*s.target, 4 * CLUSTER, 2 * CLUSTER),
            old(4 * CLUSTER, 2 * CLUSTER)
        );
        // Untouched clusters were not copied.
        assert_eq!(
            read(&*s.target, 0, 2 * CLUSTER),
            vec![0; 2 * CLUSTER as usize]
        );
    }

    #[test]
    fn concurrent_writes_to_one_cluster_copy_it_once() {
        let s = setup("concurrent", false);
        std::thread::scope(|scope| {
            for i in 0..8u8 {
                let node = s.node.clone();
                scope.spawn(move || node.write_at(CLUSTER + u64::from(i) * 4096, &[i; 4096]));
            }
        });
        assert_eq!(s.cbw.copied_bytes(), CLUSTER);
        assert_eq!(read(&*s.target, CLUSTER, CLUSTER), old(CLUSTER, CLUSTER));
    }

    #[test]
    fn a_copy_lets_the_write_through_only_after_earlier_readers_of_the_view() {
        let s = setup("readers", false);
        let reader = s.cbw.reading(3 * CLUSTER, 4096);
        let node = s.node.clone();
        let writer = std::thread::spawn(move || node.write_at(3 * CLUSTER, &[0xaa; 4096]));
        while s.cbw.copied_bytes() < CLUSTER {
            std::thread::yield_now();
        }
        // The copy is in the target, but the reader may still be reading the disk.
        assert!(
            !writer.is_finished(),
            "the write overtook a reader of the view"
        );
        assert_eq!(read(&*s.disk, 3 * CLUSTER, 4096), old(3 * CLUSTER, 4096));
        drop(reader);
        writer.join().unwrap().unwrap();
        assert_eq!(read(&*s.disk, 3 * CLUSTER, 4096), vec![0xaa; 4096]);
        // A reader of other clusters holds nothing back.
        let _other = s.cbw.reading(0, 4096);
        s.node.write_at(5 * CLUSTER, &[1; 512]).unwrap();
    }

    #[test]
    fn a_disk_too_large_for_the_map_is_refused_not_allocated() {
        let s = setup("huge", false);
        assert!(CopyBeforeWrite::new(s.target.clone(), 1 << 50, CLUSTER).is_none());
        assert!(CopyBeforeWrite::new(s.target.clone(), 1 << 50, 1 << 21).is_some());
    }

    #[test]
    fn a_failed_copy_fails_the_write_before_it_reaches_the_disk() {
        let s = setup("failed", true);
        assert!(s.node.write_at(0, &[0xbb; 4096]).is_err());
        assert_eq!(read(&*s.disk, 0, 4096), old(0, 4096));
        assert_eq!(s.cbw.copied_bytes(), 0);
        // Nothing is left claimed: the next write tries again (and fails again).
        assert!(s.node.write_at(0, &[0xbb; 4096]).is_err());
    }
}
