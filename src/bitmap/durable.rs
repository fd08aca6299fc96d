//! What of a persistent bitmap is known to be on disk, so that a write never reaches the disk
//! before the mark that covers it.
//!
//! A [`DurableTrack`] shadows one recording persistent bitmap while it is served: `durable` has
//! the bits the image is known to hold (the bitmap's data clusters are preallocated and written
//! in place), `flush` one bit per block of data (4 KiB, or the cluster if smaller) whose
//! in-memory content is ahead of the disk, and `clusters` where each data cluster lives in the
//! image. A commit writes only the blocks that changed: a first touch costs a 4 KiB write, not
//! a cluster's.
//!
//! The write path asks [`DurableTrack::mark`]: if every granule of the write is durable there is
//! nothing to do (one load, as for a bitmap kept only in memory); otherwise the granules are set
//! in memory, their blocks flagged, and the write must wait for the next group commit.
//!
//! Ordering, which is the whole point: a granule's bit is set in memory *before* its block is
//! flagged, and a block is flagged *before* the writer asks for a commit; the committer takes
//! the flags only after the epoch the writer was given has started, copies the blocks from
//! memory after taking their flags, and sets durable bits only after the copies are synced. So
//! a writer that sees a durable bit knows the disk has it, and a writer given epoch `E` knows
//! that when `E` completes its granules are on disk — whether `E` or an earlier commit wrote
//! them.

use std::sync::atomic::{AtomicU64, Ordering};

use super::dirty::{word_masks, zeroed_words};
use super::DirtyBitmap;

/// log2 of the largest block a commit writes.
const MAX_BLOCK_BITS: u32 = 12;

/// The durable state of one recording persistent bitmap.
#[derive(Debug)]
pub struct DurableTrack {
    /// log2 of the bytes in a data cluster of the image.
    cluster_bits: u32,
    /// log2 of the bytes in a block, the unit a commit writes.
    block_bits: u32,
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
        let block_bits = cluster_bits.min(MAX_BLOCK_BITS);
        let blocks = clusters.len() << (cluster_bits - block_bits);
        // Zeroed, then only the dirty words copied: the shadow of a clean stretch of the
        // bitmap takes no memory until a write dirties it.
        let durable = zeroed_words(words.len());
        for (shadow, word) in durable.iter().zip(words.iter()) {
            let bits = word.load(Ordering::Acquire);
            if bits != 0 {
                shadow.store(bits, Ordering::Relaxed);
            }
        }
        DurableTrack {
            cluster_bits,
            block_bits,
            durable,
            flush: zeroed_words(blocks.div_ceil(64)),
            clusters,
        }
    }

    /// A track with no place on disk: every mark of a granule not durable yet waits for a
    /// commit that can never make it durable, so the write fails.
    pub fn unwritable(bitmap: &DirtyBitmap) -> Self {
        DurableTrack {
            cluster_bits: 9,
            block_bits: 9,
            durable: zeroed_words(bitmap.words().len()),
            flush: Box::new([]),
            clusters: Vec::new(),
        }
    }

    /// Granule words per block.
    fn words_per_block(&self) -> usize {
        (1usize << self.block_bits) / 8
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
        // Granule n is bit n % 8 of byte n / 8: its block is byte / block size.
        let shift = self.block_bits + 3;
        for b in (first >> shift)..=(last >> shift) {
            if let Some(word) = self.flush.get((b / 64) as usize) {
                word.fetch_or(1 << (b % 64), Ordering::SeqCst);
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
        word_masks(first, last)
            .all(|(word, mask)| self.durable[word].load(Ordering::Acquire) & mask == mask)
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

    /// Flag block `b` again (a commit of it failed).
    pub fn flag(&self, b: usize) {
        if let Some(word) = self.flush.get(b / 64) {
            word.fetch_or(1 << (b % 64), Ordering::SeqCst);
        }
    }

    /// Take the flagged blocks (their flags are cleared): what the next commit writes.
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

    /// Where block `b` lives in the image, and its content as the bitmap holds it now.
    pub fn block(&self, bitmap: &DirtyBitmap, b: usize) -> Option<(u64, Vec<u8>)> {
        let per_cluster = self.cluster_bits - self.block_bits;
        let cluster = *self.clusters.get(b >> per_cluster)?;
        let offset = cluster + (((b & ((1 << per_cluster) - 1)) as u64) << self.block_bits);
        let per = self.words_per_block();
        let words = bitmap.words();
        let mut bytes = Vec::with_capacity(per * 8);
        for w in words.iter().skip(b * per).take(per) {
            bytes.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        bytes.resize(1 << self.block_bits, 0);
        Some((offset, bytes))
    }

    /// Block `b` reached the disk holding `bytes` (a copy [`DurableTrack::block`] made): its
    /// bits are durable.
    pub fn set_durable(&self, b: usize, bytes: &[u8]) {
        let per = self.words_per_block();
        for (i, chunk) in bytes.as_chunks::<8>().0.iter().enumerate() {
            let bits = u64::from_le_bytes(*chunk);
            if let Some(word) = self.durable.get(b * per + i) {
                // A load first: most words are clean or already durable, and a locked
                // read-modify-write of each would cost more than the commit's write.
                if word.load(Ordering::Acquire) & bits != bits {
                    word.fetch_or(bits, Ordering::Release);
                }
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
        let (offset, bytes) = t.block(&b, 0).unwrap();
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
        let (_, bytes) = t.block(&b, 0).unwrap();
        t.set_durable(0, &bytes);
        assert!(!t.mark(&b, 0, 3 * 4096), "a range of durable granules");
    }

    #[test]
    fn a_commit_writes_the_4_kib_block_of_a_mark_not_its_cluster() {
        // 1 GiB disk, 512-byte granules: 256 KiB of data in four 64 KiB clusters.
        let b = DirtyBitmap::new("b", 9, 1 << 30, true, true);
        let t = DurableTrack::new(&b, 16, vec![0x10_0000, 0x20_0000, 0x30_0000, 0x40_0000]);
        // Granule 560000 is bit 0 of byte 70000 of the data: cluster 1, its block 1.
        let granule = 8 * 70000u64;
        assert!(t.mark(&b, granule * 512, 512));
        assert_eq!(t.take_flush(), vec![17]);
        let (offset, bytes) = t.block(&b, 17).unwrap();
        assert_eq!(offset, 0x20_0000 + 4096);
        assert_eq!(bytes.len(), 4096);
        assert_eq!(bytes[(70000 - 65536 - 4096) as usize], 1);
        t.set_durable(17, &bytes);
        assert!(!t.mark(&b, granule * 512, 512));
    }
}
