//! What of a persistent bitmap is known to be on disk, so that a write never reaches the disk
//! before the mark that covers it.
//!
//! A [`DurableTrack`] shadows one recording persistent bitmap while it is served: `durable` has
//! the bits the image is known to hold (the bitmap's data clusters are preallocated and written
//! in place), `flush` one bit per data cluster whose in-memory content is ahead of the disk, and
//! `clusters` where each data cluster lives in the image.
//!
//! The write path asks [`DurableTrack::mark`]: if every granule of the write is durable there is
//! nothing to do (one load, as for a bitmap kept only in memory); otherwise the granules are set
//! in memory, their clusters flagged, and the write must wait for the next group commit.
//!
//! Ordering, which is the whole point: a granule's bit is set in memory *before* its cluster is
//! flagged, and a cluster is flagged *before* the writer asks for a commit; the committer takes
//! the flags only after the epoch the writer was given has started, copies the clusters from
//! memory after taking their flags, and sets durable bits only after the copies are synced. So
//! a writer that sees a durable bit knows the disk has it, and a writer given epoch `E` knows
//! that when `E` completes its granules are on disk — whether `E` or an earlier commit wrote
//! them.

use std::sync::atomic::{AtomicU64, Ordering};

use super::DirtyBitmap;

/// The durable state of one recording persistent bitmap.
#[derive(Debug)]
pub struct DurableTrack {
    /// log2 of the bytes in a data cluster of the image.
    cluster_bits: u32,
    durable: Box<[AtomicU64]>,
    flush: Box<[AtomicU64]>,
    /// Host offset of each data cluster, in order.
    clusters: Vec<u64>,
}

impl DurableTrack {
    /// Track `bitmap`, whose data lives in `clusters` (each `1 << cluster_bits` bytes) and holds
    /// exactly what the bitmap holds in memory now.
    pub fn new(bitmap: &DirtyBitmap, cluster_bits: u32, clusters: Vec<u64>) -> Self {
        let words = bitmap.words();
        DurableTrack {
            cluster_bits,
            durable: words
                .iter()
                .map(|w| AtomicU64::new(w.load(Ordering::Acquire)))
                .collect(),
            flush: (0..clusters.len().div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            clusters,
        }
    }

    /// A track with no place on disk: every mark of a granule not durable yet waits for a
    /// commit that can never make it durable, so the write fails.
    pub fn unwritable(bitmap: &DirtyBitmap) -> Self {
        DurableTrack {
            cluster_bits: 9,
            durable: (0..bitmap.words().len())
                .map(|_| AtomicU64::new(0))
                .collect(),
            flush: Box::new([]),
            clusters: Vec::new(),
        }
    }

    /// Data clusters the bitmap takes.
    pub fn cluster_count(&self) -> usize {
        self.clusters.len()
    }

    /// Granule words per data cluster.
    fn words_per_cluster(&self) -> usize {
        (1usize << self.cluster_bits) / 8
    }

    /// Mark `[offset, offset + len)` in `bitmap`. Returns whether some granule was not durable
    /// yet: the write must then wait for the next group commit.
    #[inline]
    pub fn mark(&self, bitmap: &DirtyBitmap, offset: u64, len: u64) -> bool {
        let Some((first, last)) = bitmap.granule_range(offset, len) else {
            return false;
        };
        if self.all_durable(first, last) {
            return false;
        }
        bitmap.mark(offset, len);
        // Granule n is bit n % 8 of byte n / 8: its data cluster is byte / cluster size.
        let shift = self.cluster_bits + 3;
        for c in (first >> shift)..=(last >> shift) {
            if let Some(word) = self.flush.get((c / 64) as usize) {
                word.fetch_or(1 << (c % 64), Ordering::SeqCst);
            }
        }
        true
    }

    /// Whether every granule of `first..=last` is on disk.
    #[inline]
    fn all_durable(&self, first: u64, last: u64) -> bool {
        if first == last {
            // The common case: a write inside one granule.
            return self.durable[(first / 64) as usize].load(Ordering::Acquire)
                & (1 << (first % 64))
                != 0;
        }
        let mut g = first;
        while g <= last {
            let word = (g / 64) as usize;
            let lo = g % 64;
            let hi = (last - word as u64 * 64).min(63);
            let mask = if hi - lo == 63 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo + 1)) - 1) << lo
            };
            if self.durable[word].load(Ordering::Acquire) & mask != mask {
                return false;
            }
            g = word as u64 * 64 + hi + 1;
        }
        true
    }

    /// Whether `bitmap` holds bits the disk may not: a flagged cluster not committed yet, or
    /// a commit that failed.
    pub fn behind(&self, bitmap: &DirtyBitmap) -> bool {
        self.flush.iter().any(|w| w.load(Ordering::Acquire) != 0)
            || bitmap
                .words()
                .iter()
                .zip(self.durable.iter())
                .any(|(m, d)| m.load(Ordering::Acquire) != d.load(Ordering::Acquire))
    }

    /// Flag data cluster `c` again (a commit of it failed).
    pub fn flag(&self, c: usize) {
        if let Some(word) = self.flush.get(c / 64) {
            word.fetch_or(1 << (c % 64), Ordering::SeqCst);
        }
    }

    /// Take the flagged clusters (their flags are cleared): what the next commit writes.
    pub fn take_flush(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for (i, word) in self.flush.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::SeqCst);
            while bits != 0 {
                out.push(i * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
        out
    }

    /// Where data cluster `c` lives, and its content as the bitmap holds it now.
    pub fn cluster(&self, bitmap: &DirtyBitmap, c: usize) -> Option<(u64, Vec<u8>)> {
        let offset = *self.clusters.get(c)?;
        let per = self.words_per_cluster();
        let words = bitmap.words();
        let mut bytes = Vec::with_capacity(per * 8);
        for w in words.iter().skip(c * per).take(per) {
            bytes.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        bytes.resize(1 << self.cluster_bits, 0);
        Some((offset, bytes))
    }

    /// Data cluster `c` reached the disk holding `bytes` (a copy [`DurableTrack::cluster`]
    /// made): its bits are durable.
    pub fn set_durable(&self, c: usize, bytes: &[u8]) {
        let per = self.words_per_cluster();
        for (i, chunk) in bytes.as_chunks::<8>().0.iter().enumerate() {
            if let Some(word) = self.durable.get(c * per + i) {
                word.fetch_or(u64::from_le_bytes(*chunk), Ordering::Release);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_writes_to_granules_not_yet_durable_wait_for_a_commit() {
        // 1 MiB disk, 4 KiB granules: 256 granules, 32 bytes of data in one 512-byte cluster.
        let b = DirtyBitmap::new("b", 12, 1 << 20, true, true);
        b.mark(0, 4096);
        let t = DurableTrack::new(&b, 9, vec![0x10000]);
        assert!(!t.mark(&b, 0, 4096), "already on disk");
        assert!(t.mark(&b, 8192, 4096), "a first touch");
        assert!(b.is_dirty_granule(2), "set in memory at once");
        assert!(
            t.mark(&b, 8192, 100),
            "set in memory but not durable: waits too"
        );
        assert_eq!(t.take_flush(), vec![0]);
        assert!(t.take_flush().is_empty(), "flags are taken once");
        let (offset, bytes) = t.cluster(&b, 0).unwrap();
        assert_eq!(offset, 0x10000);
        assert_eq!(bytes.len(), 512);
        assert_eq!(bytes[0], 0b101);
        t.set_durable(0, &bytes);
        assert!(!t.mark(&b, 8192, 4096), "durable now");
        assert!(
            t.mark(&b, 0, 3 * 4096),
            "a range with one granule (1) that is not"
        );
        assert_eq!(t.take_flush(), vec![0]);
        let (_, bytes) = t.cluster(&b, 0).unwrap();
        t.set_durable(0, &bytes);
        assert!(!t.mark(&b, 0, 3 * 4096), "a range of durable granules");
    }
}
