//! What of a persistent bitmap is known to be on disk, so that a write never reaches the disk
//! before the mark that covers it.
//!
//! A [`DurableTrack`] follows one recording persistent bitmap while it is served, block by block
//! of its data (4 KiB, or the cluster if smaller; the bitmap's data clusters are preallocated
//! and written in place): `flush` has one bit per block whose in-memory content is ahead of the
//! disk, and each block's [`BlockState`] says whether everything set in it is on disk. A commit
//! writes only the flagged blocks: a first touch costs a 4 KiB write, not a cluster's. Nothing
//! the size of the bitmap is kept beside it (a shadow of the bits took as much memory as the
//! bitmap itself: 16 MiB for 8 bitmaps over 1 TiB).
//!
//! Generations order marks and commits: [`MARKS`] counts slow-path marks, process-wide. A
//! writer whose granules are not all on disk announces itself in each block it touches
//! (`busy`), sets its bits with read-modify-writes, takes a generation `g`, records it as the
//! block's latest change (`changed`), flags the block, leaves (`busy`), and waits for a commit.
//! The committer takes the flags, then reads the generation, then copies the blocks: a copy made
//! after reading `g` holds every bit set before `g` was taken. Once the copies are synced, each
//! block's `durable` rises to the generation read.
//!
//! A block is *settled* when nobody is marking in it and `durable >= changed`: then every bit
//! set in it is on disk. A writer that sees its bits set (acquire) and the block settled may go
//! ahead: the writer that set a bit announced itself before setting it, so if nobody is marking
//! now it has left, having recorded its generation first, and `durable` covers it. A writer
//! that waited for a commit confirms with its own generation ([`DurableTrack::durable_since`]):
//! other writers' later changes to the block do not make it wait again, and a commit that
//! failed (the block flagged again, `durable` unchanged) makes its write fail.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::dirty::{word_masks, zeroed_words};
use super::DirtyBitmap;

/// log2 of the largest block a commit writes.
const MAX_BLOCK_BITS: u32 = 12;

/// The generation of slow-path marks, shared by every track (only ever compared with values
/// taken from it).
static MARKS: AtomicU64 = AtomicU64::new(0);

/// What is known of one block of bitmap data.
#[derive(Debug, Default)]
struct BlockState {
    /// Writers between announcing themselves and recording their generation.
    busy: AtomicU32,
    /// The generation of the latest change.
    changed: AtomicU64,
    /// The generation the last successful commit of the block read before copying it.
    durable: AtomicU64,
}

/// The durable state of one recording persistent bitmap.
#[derive(Debug)]
pub struct DurableTrack {
    /// log2 of the bytes in a data cluster of the image.
    cluster_bits: u32,
    /// log2 of the bytes in a block, the unit a commit writes.
    block_bits: u32,
    /// One per block; none for a track that can never make anything durable.
    blocks: Box<[BlockState]>,
    flush: Box<[AtomicU64]>,
    /// Host offset of each data cluster, in order.
    clusters: Vec<u64>,
}

impl DurableTrack {
    /// Track `bitmap`, whose data lives in `clusters` (each `1 << cluster_bits` bytes) and holds
    /// exactly what the bitmap holds in memory now.
    pub fn new(cluster_bits: u32, clusters: Vec<u64>) -> Self {
        let block_bits = cluster_bits.min(MAX_BLOCK_BITS);
        let blocks = clusters.len() << (cluster_bits - block_bits);
        DurableTrack {
            cluster_bits,
            block_bits,
            blocks: (0..blocks).map(|_| BlockState::default()).collect(),
            flush: zeroed_words(blocks.div_ceil(64)),
            clusters,
        }
    }

    /// A track with no place on disk: every mark of a granule waits for a commit that can
    /// never make it durable, so the write fails.
    pub fn unwritable() -> Self {
        DurableTrack {
            cluster_bits: 9,
            block_bits: 9,
            blocks: Box::new([]),
            flush: Box::new([]),
            clusters: Vec::new(),
        }
    }

    /// The blocks holding the bits of granules `first..=last`.
    fn blocks_of(&self, first: u64, last: u64) -> std::ops::RangeInclusive<usize> {
        // Granule n is bit n % 8 of byte n / 8: its block is byte / block size.
        let shift = self.block_bits + 3;
        (first >> shift) as usize..=(last >> shift) as usize
    }

    /// Whether every granule of `[offset, offset + len)` is set in `bitmap` and on disk: the
    /// write may go ahead. The common case costs a load of the bit and three of its block.
    #[inline]
    pub fn settled(&self, bitmap: &DirtyBitmap, offset: u64, len: u64) -> bool {
        let Some((first, last)) = bitmap.granule_range(offset, len) else {
            return true;
        };
        let words = bitmap.words();
        let all_set = if first == last {
            words[(first / 64) as usize].load(Ordering::Acquire) & (1 << (first % 64)) != 0
        } else {
            word_masks(first, last).all(|(w, mask)| words[w].load(Ordering::Acquire) & mask == mask)
        };
        all_set
            && self.blocks_of(first, last).all(|b| {
                self.blocks.get(b).is_some_and(|s| {
                    s.busy.load(Ordering::Acquire) == 0
                        && s.durable.load(Ordering::Acquire) >= s.changed.load(Ordering::Acquire)
                })
            })
    }

    /// First half of a slow-path mark of `[offset, offset + len)`: announce the writer in
    /// each block, then set the bits with read-modify-writes (so that the generation taken
    /// next orders them even where another writer set them first).
    pub fn begin_mark(&self, bitmap: &DirtyBitmap, offset: u64, len: u64) {
        let Some((first, last)) = bitmap.granule_range(offset, len) else {
            return;
        };
        for b in self.blocks_of(first, last) {
            if let Some(s) = self.blocks.get(b) {
                s.busy.fetch_add(1, Ordering::AcqRel);
            }
        }
        let words = bitmap.words();
        for (w, mask) in word_masks(first, last) {
            words[w].fetch_or(mask, Ordering::AcqRel);
        }
    }

    /// Second half: record generation `g` (taken after [`Self::begin_mark`]) as each block's
    /// latest change, flag the block for the next commit, and leave.
    pub fn end_mark(&self, bitmap: &DirtyBitmap, offset: u64, len: u64, g: u64) {
        let Some((first, last)) = bitmap.granule_range(offset, len) else {
            return;
        };
        for b in self.blocks_of(first, last) {
            let Some(s) = self.blocks.get(b) else {
                continue;
            };
            s.changed.fetch_max(g, Ordering::AcqRel);
            self.flag(b);
            s.busy.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Whether a commit that read generation `g` or later made every block of
    /// `[offset, offset + len)` durable: the confirmation of a writer that marked with `g`.
    pub fn durable_since(&self, bitmap: &DirtyBitmap, offset: u64, len: u64, g: u64) -> bool {
        let Some((first, last)) = bitmap.granule_range(offset, len) else {
            return true;
        };
        self.blocks_of(first, last).all(|b| {
            self.blocks
                .get(b)
                .is_some_and(|s| s.durable.load(Ordering::Acquire) >= g)
        })
    }

    /// Whether the bitmap holds bits the disk may not: a flagged block not committed yet, a
    /// writer marking, or a commit that failed.
    pub fn behind(&self) -> bool {
        self.flush.iter().any(|w| w.load(Ordering::Acquire) != 0)
            || self.blocks.iter().any(|s| {
                s.busy.load(Ordering::Acquire) != 0
                    || s.durable.load(Ordering::Acquire) < s.changed.load(Ordering::Acquire)
            })
    }

    /// Flag block `b` for the next commit (again, if a commit of it failed).
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

    /// Where block `b` lives in the image, its content as the bitmap holds it now, and the
    /// generation read just before copying it (to give [`Self::set_durable`] once the copy is
    /// on disk). Called after [`Self::take_flush`], so that the generation covers every writer
    /// whose flag was taken.
    pub fn block(&self, bitmap: &DirtyBitmap, b: usize) -> Option<(u64, Vec<u8>, u64)> {
        let per_cluster = self.cluster_bits - self.block_bits;
        let cluster = *self.clusters.get(b >> per_cluster)?;
        let offset = cluster + (((b & ((1 << per_cluster) - 1)) as u64) << self.block_bits);
        let generation = MARKS.load(Ordering::Acquire);
        let per = (1usize << self.block_bits) / 8;
        let mut bytes = Vec::with_capacity(per * 8);
        for w in bitmap.words().iter().skip(b * per).take(per) {
            bytes.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        bytes.resize(1 << self.block_bits, 0);
        Some((offset, bytes, generation))
    }

    /// Block `b` reached the disk as copied when the generation was `g`.
    pub fn set_durable(&self, b: usize, g: u64) {
        if let Some(s) = self.blocks.get(b) {
            s.durable.fetch_max(g, Ordering::AcqRel);
        }
    }
}

/// A new generation for a slow-path mark, taken between [`DurableTrack::begin_mark`] and
/// [`DurableTrack::end_mark`] of every track the write marks.
pub fn next_generation() -> u64 {
    MARKS.fetch_add(1, Ordering::AcqRel) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mark as the manager makes it: `None` if settled, else the generation to confirm.
    fn mark(t: &DurableTrack, b: &DirtyBitmap, offset: u64, len: u64) -> Option<u64> {
        if t.settled(b, offset, len) {
            return None;
        }
        t.begin_mark(b, offset, len);
        let g = next_generation();
        t.end_mark(b, offset, len, g);
        Some(g)
    }

    /// A successful commit of every flagged block; returns the blocks written.
    fn commit(t: &DurableTrack, b: &DirtyBitmap) -> Vec<(usize, Vec<u8>)> {
        let mut out = Vec::new();
        for c in t.take_flush() {
            let (_, bytes, g) = t.block(b, c).unwrap();
            t.set_durable(c, g);
            out.push((c, bytes));
        }
        out
    }

    #[test]
    fn only_writes_to_granules_not_yet_durable_wait_for_a_commit() {
        // 1 MiB disk, 4 KiB granules: 256 granules, 32 bytes of data in one 512-byte cluster.
        let b = DirtyBitmap::new("b", 12, 1 << 20, true, true);
        b.mark(0, 4096);
        let t = DurableTrack::new(9, vec![0x10000]);
        assert!(mark(&t, &b, 0, 4096).is_none(), "already on disk");
        let g = mark(&t, &b, 8192, 4096).expect("a first touch");
        assert!(b.is_dirty_granule(2), "set in memory at once");
        assert!(!t.durable_since(&b, 8192, 4096, g));
        assert!(
            mark(&t, &b, 8192, 100).is_some(),
            "set in memory but not durable: waits too"
        );
        assert!(t.behind());
        assert_eq!(t.take_flush(), vec![0], "flagged");
        assert!(t.take_flush().is_empty(), "flags are taken once");
        t.flag(0);
        let written = commit(&t, &b);
        assert_eq!(written.len(), 1);
        let (offset, bytes, _) = t.block(&b, 0).unwrap();
        assert_eq!(offset, 0x10000);
        assert_eq!(bytes.len(), 512);
        assert_eq!(written[0].1[0], 0b101);
        assert!(t.durable_since(&b, 8192, 4096, g));
        assert!(!t.behind());
        assert!(mark(&t, &b, 8192, 4096).is_none(), "durable now");
        let g = mark(&t, &b, 0, 3 * 4096).expect("a range with one granule (1) that is not");
        commit(&t, &b);
        assert!(t.durable_since(&b, 0, 3 * 4096, g));
        assert!(
            mark(&t, &b, 0, 3 * 4096).is_none(),
            "a range of durable granules"
        );
    }

    #[test]
    fn a_commit_writes_the_4_kib_block_of_a_mark_not_its_cluster() {
        // 1 GiB disk, 512-byte granules: 256 KiB of data in four 64 KiB clusters.
        let b = DirtyBitmap::new("b", 9, 1 << 30, true, true);
        let t = DurableTrack::new(16, vec![0x10_0000, 0x20_0000, 0x30_0000, 0x40_0000]);
        // Granule 560000 is bit 0 of byte 70000 of the data: cluster 1, its block 1.
        let granule = 8 * 70000u64;
        assert!(mark(&t, &b, granule * 512, 512).is_some());
        assert_eq!(t.take_flush(), vec![17]);
        let (offset, bytes, g) = t.block(&b, 17).unwrap();
        assert_eq!(offset, 0x20_0000 + 4096);
        assert_eq!(bytes.len(), 4096);
        assert_eq!(bytes[(70000 - 65536 - 4096) as usize], 1);
        t.set_durable(17, g);
        assert!(mark(&t, &b, granule * 512, 512).is_none());
    }

    #[test]
    fn a_bit_set_by_a_writer_still_marking_is_not_on_disk() {
        let b = DirtyBitmap::new("b", 12, 1 << 20, true, true);
        let t = DurableTrack::new(9, vec![0x10000]);
        t.begin_mark(&b, 0, 4096);
        assert!(b.is_dirty_granule(0), "the bit is set already");
        assert!(
            !t.settled(&b, 0, 4096),
            "but its writer has not recorded it"
        );
        assert!(t.behind());
        // A commit that copies the block now reads a generation the writer's is above.
        let (_, bytes, copied) = t.block(&b, 0).unwrap();
        let g = next_generation();
        t.end_mark(&b, 0, 4096, g);
        assert!(copied < g);
        assert_eq!(t.take_flush(), vec![0]);
        t.set_durable(0, copied);
        assert_eq!(bytes[0], 1, "(the copy happened to hold the bit)");
        assert!(
            !t.durable_since(&b, 0, 4096, g),
            "an older copy confirms nothing"
        );
        assert!(!t.settled(&b, 0, 4096));
        t.flag(0);
        commit(&t, &b);
        assert!(t.durable_since(&b, 0, 4096, g));
        assert!(t.settled(&b, 0, 4096));
    }

    #[test]
    fn later_changes_to_a_block_do_not_undo_an_earlier_confirmation() {
        let b = DirtyBitmap::new("b", 12, 1 << 20, true, true);
        let t = DurableTrack::new(9, vec![0x10000]);
        let first = mark(&t, &b, 0, 4096).unwrap();
        commit(&t, &b);
        let second = mark(&t, &b, 8192, 4096).unwrap();
        assert!(
            t.durable_since(&b, 0, 4096, first),
            "the first writer goes ahead"
        );
        assert!(!t.durable_since(&b, 8192, 4096, second));
        assert!(
            !t.settled(&b, 0, 4096),
            "a new writer of granule 0 waits too: the block is behind"
        );
        commit(&t, &b);
        assert!(t.durable_since(&b, 8192, 4096, second));
        assert!(t.settled(&b, 0, 4096) && t.settled(&b, 8192, 4096));
    }

    #[test]
    fn a_failed_commit_leaves_the_block_behind_and_flagged_again() {
        let b = DirtyBitmap::new("b", 12, 1 << 20, true, true);
        let t = DurableTrack::new(9, vec![0x10000]);
        let g = mark(&t, &b, 0, 4096).unwrap();
        for c in t.take_flush() {
            let _ = t.block(&b, c).unwrap();
            t.flag(c); // the write or the sync failed
        }
        assert!(!t.durable_since(&b, 0, 4096, g), "the writer fails");
        assert!(t.behind());
        commit(&t, &b);
        assert!(t.settled(&b, 0, 4096), "a later commit retries it");
    }

    /// Writers on several threads and a committer racing on one block: whenever a writer may
    /// go ahead (its granule settled, or confirmed after its commit), the copy on "disk" has
    /// its bit.
    #[test]
    fn racing_writers_only_go_ahead_once_their_bit_is_on_disk() {
        use std::sync::atomic::AtomicBool;
        use std::sync::{Arc, Mutex};
        // 16 MiB at 512-byte granules: 32768 granules, 4 KiB of data, one block.
        let b = Arc::new(DirtyBitmap::new("b", 9, 16 << 20, true, true));
        let t = Arc::new(DurableTrack::new(12, vec![0x10000]));
        let disk = Arc::new(Mutex::new(vec![0u8; 4096]));
        let stop = Arc::new(AtomicBool::new(false));
        let committer = {
            let (b, t, disk, stop) = (b.clone(), t.clone(), disk.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    for c in t.take_flush() {
                        let (_, bytes, g) = t.block(&b, c).unwrap();
                        // The write and the sync, then what the commit publishes.
                        *disk.lock().unwrap() = bytes;
                        t.set_durable(c, g);
                    }
                    std::thread::yield_now();
                }
            })
        };
        let writers: Vec<_> = (0..4u64)
            .map(|seed| {
                let (b, t, disk) = (b.clone(), t.clone(), disk.clone());
                std::thread::spawn(move || {
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (seed + 1);
                    for _ in 0..20_000 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let granule = x % 32768;
                        let offset = granule * 512;
                        if let Some(g) = mark(&t, &b, offset, 512) {
                            while !t.durable_since(&b, offset, 512, g) {
                                std::thread::yield_now();
                            }
                        }
                        let on_disk = disk.lock().unwrap()[(granule / 8) as usize];
                        assert!(
                            on_disk & (1 << (granule % 8)) != 0,
                            "granule {granule} went ahead before its mark was on disk"
                        );
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::Release);
        committer.join().unwrap();
    }

    #[test]
    fn an_unwritable_track_never_lets_a_write_go() {
        let b = DirtyBitmap::new("b", 12, 1 << 20, true, true);
        b.mark(0, 4096);
        let t = DurableTrack::unwritable();
        assert!(!t.settled(&b, 0, 4096));
        let g = mark(&t, &b, 0, 4096).unwrap();
        assert!(t.take_flush().is_empty());
        assert!(!t.durable_since(&b, 0, 4096, g));
    }
}
