//! One dirty bitmap in memory: a bit per granule of the disk, set by writes.
//!
//! The bits are kept in exactly the layout the qcow2 specification gives the bitmap data on
//! disk ("Bitmaps" section: granule `n` is bit `n % 8` of byte `n / 8`), as little-endian
//! 64-bit words, so storing a bitmap is a plain copy of its words and a single granule's bit can
//! later be persisted by writing the one cluster that holds it.
//!
//! Marking is lock-free: a word is only written (`fetch_or`) when it lacks some of the bits, so
//! writes to granules already dirty never touch a shared cache line, and the caller learns
//! whether any granule became dirty for the first time — the hook the crash-consistent
//! bitmaps need (such a first mark must reach the disk before the data write it covers).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::durable::DurableTrack;

/// Smallest and largest granularity (QEMU's limits): 512 B to 2 GiB.
pub const MIN_GRANULARITY_BITS: u32 = 9;
pub const MAX_GRANULARITY_BITS: u32 = 31;

/// A dirty bitmap.
#[derive(Debug)]
pub struct DirtyBitmap {
    name: String,
    granularity_bits: u32,
    /// Disk size in bytes.
    size: u64,
    words: Box<[AtomicU64]>,
    /// Recording writes ("enabled"; stored as the qcow2 `auto` flag).
    recording: AtomicBool,
    persistent: bool,
    /// Found `in_use` (or in an extension not marked consistent), or its marks could not be
    /// made durable: its content cannot be trusted. It records nothing and refuses use; it can
    /// only be removed.
    inconsistent: AtomicBool,
    /// While served crash-consistently: what of it is on disk (see [`super::durable`]).
    track: Mutex<Option<Arc<DurableTrack>>>,
}

/// `n` zeroed words, allocated zeroed: a large allocation then comes straight from the kernel
/// (calloc's fresh pages), and a page takes memory only once a word in it is written. A 1 TiB
/// disk at 64 KiB granularity has 2 MiB of bits per bitmap, mostly clean while it is served.
pub(crate) fn zeroed_words(n: usize) -> Box<[AtomicU64]> {
    const _: () = assert!(
        std::mem::size_of::<AtomicU64>() == std::mem::size_of::<u64>()
            && std::mem::align_of::<AtomicU64>() == std::mem::align_of::<u64>()
    );
    let words = Box::into_raw(vec![0u64; n].into_boxed_slice()) as *mut [AtomicU64];
    // SAFETY: `AtomicU64` has the same size, alignment (checked above) and bit validity as
    // `u64`, so the allocation holds `n` valid zeroed `AtomicU64`s and is freed with the same
    // layout; the box owns it alone.
    unsafe { Box::from_raw(words) }
}

impl DirtyBitmap {
    /// An empty bitmap. `granularity_bits` must be within the limits.
    pub fn new(
        name: &str,
        granularity_bits: u32,
        size: u64,
        recording: bool,
        persistent: bool,
    ) -> Self {
        let granules = size.div_ceil(1 << granularity_bits);
        DirtyBitmap {
            name: name.to_string(),
            granularity_bits,
            size,
            words: zeroed_words(granules.div_ceil(64) as usize),
            recording: AtomicBool::new(recording),
            persistent,
            inconsistent: AtomicBool::new(false),
            track: Mutex::new(None),
        }
    }

    /// This bitmap over a disk grown to `size` bytes: the same name, granularity, state and
    /// bits, the new granules clean. (Bits are granules in order, so the old data is the new
    /// data's prefix; the old last granule, partial before, now covers more, which only ever
    /// reports more as dirty.)
    pub fn grown(&self, size: u64) -> DirtyBitmap {
        let grown = DirtyBitmap::new(
            &self.name,
            self.granularity_bits,
            size.max(self.size),
            self.is_recording(),
            self.persistent,
        );
        grown.with_bytes(&self.to_bytes())
    }

    /// A bitmap whose stored content cannot be trusted. It keeps no bits (it can only be
    /// removed), so a stored bitmap's claimed size allocates nothing here, and it covers no
    /// bytes, so nothing can mark it.
    pub fn inconsistent(name: &str, granularity_bits: u32, persistent: bool) -> Self {
        DirtyBitmap {
            inconsistent: AtomicBool::new(true),
            ..DirtyBitmap::new(name, granularity_bits, 0, false, persistent)
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn granularity_bits(&self) -> u32 {
        self.granularity_bits
    }

    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_recording(&self) -> bool {
        self.recording.load(Ordering::Acquire)
    }

    pub fn set_recording(&self, on: bool) {
        self.recording.store(on, Ordering::Release);
    }

    pub fn is_persistent(&self) -> bool {
        self.persistent
    }

    pub fn is_inconsistent(&self) -> bool {
        self.inconsistent.load(Ordering::Acquire)
    }

    /// Its marks could not be made durable: it records nothing from now on and reads as
    /// inconsistent, as it will on disk.
    pub fn set_inconsistent(&self) {
        self.inconsistent.store(true, Ordering::Release);
        self.recording.store(false, Ordering::Release);
        self.set_track(None);
    }

    /// The durable state, while the bitmap is served crash-consistently.
    pub fn track(&self) -> Option<Arc<DurableTrack>> {
        self.track.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_track(&self, track: Option<Arc<DurableTrack>>) {
        *self.track.lock().unwrap_or_else(|p| p.into_inner()) = track;
    }

    fn granules(&self) -> u64 {
        self.size.div_ceil(self.granularity())
    }

    /// Mark the granules `[offset, offset + len)` touches. Returns whether any of them was
    /// clean before.
    #[inline(always)]
    pub fn mark(&self, offset: u64, len: u64) -> bool {
        let Some((first, last)) = self.granule_range(offset, len) else {
            return false;
        };
        if first == last {
            // The common case: a write inside one granule.
            let bit = 1u64 << (first % 64);
            let w = &self.words[(first / 64) as usize];
            return w.load(Ordering::Relaxed) & bit == 0
                && w.fetch_or(bit, Ordering::AcqRel) & bit == 0;
        }
        self.mark_range(first, last)
    }

    /// The first and last granules `[offset, offset + len)` touches on the disk, if any.
    #[inline(always)]
    pub(super) fn granule_range(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || offset >= self.size {
            return None;
        }
        let first = offset >> self.granularity_bits;
        let last = (offset.saturating_add(len) - 1).min(self.size - 1) >> self.granularity_bits;
        Some((first, last))
    }

    /// The bits, as words in the on-disk layout.
    pub(super) fn words(&self) -> &[AtomicU64] {
        &self.words
    }

    fn mark_range(&self, first: u64, last: u64) -> bool {
        let mut newly = false;
        for (word, mask) in word_masks(first, last) {
            let w = &self.words[word];
            if w.load(Ordering::Relaxed) & mask != mask {
                newly |= w.fetch_or(mask, Ordering::AcqRel) & mask != mask;
            }
        }
        newly
    }

    /// Whether granule `n` is dirty.
    pub fn is_dirty_granule(&self, n: u64) -> bool {
        self.words
            .get((n / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (n % 64)) != 0)
    }

    /// Dirty bytes (granules times granularity, the last one cut at the disk's end), as
    /// QEMU's `count`.
    pub fn dirty_bytes(&self) -> u64 {
        let granules = self.granules();
        let mut count = 0u64;
        for (i, w) in self.words.iter().enumerate() {
            let bits = w.load(Ordering::Acquire);
            if bits == 0 {
                continue;
            }
            count += u64::from(bits.count_ones()) * self.granularity();
            let last_in_word = i as u64 * 64 + 63;
            if last_in_word >= granules - 1 && bits & (1 << ((granules - 1) % 64)) != 0 {
                // The last granule may extend past the disk.
                count -= granules * self.granularity() - self.size;
            }
        }
        count
    }

    pub fn clear(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::Release);
        }
    }

    /// The dirty ranges, merged, as (offset, length) clipped to the disk.
    pub fn extents(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let g = self.granularity();
        for (i, w) in self.words.iter().enumerate() {
            let mut bits = w.load(Ordering::Acquire);
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let start = (i as u64 * 64 + b) * g;
                let end = (start + g).min(self.size);
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == start => last.1 = end - last.0,
                    _ => out.push((start, end - start)),
                }
            }
        }
        out
    }

    /// The runs of `[offset, offset + len)` (clipped to the disk) as `(length, dirty)`, in
    /// order, merged, at most `max_runs` of them (the last may then end before the range
    /// does). NBD's `qemu:dirty-bitmap:NAME` context reports these.
    pub fn runs(&self, offset: u64, len: u64, max_runs: usize, out: &mut Vec<(u64, bool)>) {
        let end = offset.saturating_add(len).min(self.size);
        let g = self.granularity();
        let mut pos = offset;
        while pos < end {
            let granule = pos >> self.granularity_bits;
            let dirty = self.is_dirty_granule(granule);
            // Whole words that are all clean or all dirty are skipped at once.
            let mut next = (granule + 1) * g;
            while next < end {
                let n = next >> self.granularity_bits;
                let word = self
                    .words
                    .get((n / 64) as usize)
                    .map_or(0, |w| w.load(Ordering::Acquire));
                if n.is_multiple_of(64) && word == if dirty { u64::MAX } else { 0 } {
                    next += 64 * g;
                } else if self.is_dirty_granule(n) == dirty {
                    next += g;
                } else {
                    break;
                }
            }
            let run_end = next.min(end);
            let full = out.len() >= max_runs;
            match out.last_mut() {
                Some(last) if last.1 == dirty => last.0 += run_end - pos,
                _ if full => return,
                _ => out.push((run_end - pos, dirty)),
            }
            pos = run_end;
        }
    }

    /// Set every granule `other` marks (granularities may differ).
    pub fn merge_from(&self, other: &DirtyBitmap) {
        for (offset, len) in other.extents() {
            self.mark(offset, len);
        }
    }

    /// The bitmap data as the qcow2 specification lays it out on disk.
    pub fn to_bytes(&self) -> Vec<u8> {
        let len = self.granules().div_ceil(8) as usize;
        let mut out = Vec::with_capacity(self.words.len() * 8);
        for w in self.words.iter() {
            out.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// This new, clean bitmap holding `data`, in the on-disk layout. Bits past the last granule
    /// are ignored. Only the words with a bit set are written: the pages of clean stretches
    /// stay untouched and take no memory (see [`zeroed_words`]).
    pub fn with_bytes(self, data: &[u8]) -> Self {
        let (whole, partial) = data.as_chunks::<8>();
        for (w, bytes) in self.words.iter().zip(whole) {
            let word = u64::from_le_bytes(*bytes);
            if word != 0 {
                w.store(word, Ordering::Release);
            }
        }
        if let (Some(w), false) = (self.words.get(whole.len()), partial.is_empty()) {
            let mut bytes = [0u8; 8];
            bytes[..partial.len()].copy_from_slice(partial);
            w.store(u64::from_le_bytes(bytes), Ordering::Release);
        }
        // Clear tail bits beyond the disk (the spec requires them to be zero).
        let granules = self.granules();
        if let Some(last) = self.words.last() {
            let used = granules % 64;
            if used != 0 {
                last.fetch_and((1u64 << used) - 1, Ordering::AcqRel);
            }
        }
        self
    }
}

/// The granules `first..=last` as (word index, mask of their bits in that word), word by word.
#[inline]
pub(super) fn word_masks(first: u64, last: u64) -> impl Iterator<Item = (usize, u64)> {
    let mut g = first;
    std::iter::from_fn(move || {
        if g > last {
            return None;
        }
        let word = g / 64;
        let lo = g % 64;
        let hi = (last - word * 64).min(63);
        let mask = if hi - lo == 63 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo + 1)) - 1) << lo
        };
        g = word * 64 + hi + 1;
        Some((word as usize, mask))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cover_a_range_merged_and_bounded() {
        const G: u64 = 65536;
        // 200 granules, the last one cut short by the disk's end.
        let b = DirtyBitmap::new("b", 16, 200 * G - 512, true, false);
        b.mark(3 * G, 2 * G);
        b.mark(64 * G, 130 * G); // whole words dirty
        let mut runs = Vec::new();
        b.runs(0, u64::MAX, 100, &mut runs);
        assert_eq!(
            runs,
            vec![
                (3 * G, false),
                (2 * G, true),
                (59 * G, false),
                (130 * G, true),
                (6 * G - 512, false)
            ]
        );
        assert_eq!(runs.iter().map(|r| r.0).sum::<u64>(), 200 * G - 512);
        // From inside a granule, cut to the range asked for.
        runs.clear();
        b.runs(4 * G + 100, G, 100, &mut runs);
        assert_eq!(runs, vec![(G - 100, true), (100, false)]);
        // At most `max_runs`, in order.
        runs.clear();
        b.runs(0, u64::MAX, 2, &mut runs);
        assert_eq!(runs, vec![(3 * G, false), (2 * G, true)]);
    }

    #[test]
    fn marks_granules_touched_and_reports_first_marks() {
        let b = DirtyBitmap::new("b", 16, 10 << 20, true, false);
        assert!(b.mark(65536 * 3 + 100, 10));
        assert!(!b.mark(65536 * 3, 65536), "already dirty");
        assert!(b.mark(65535, 2), "straddles granules 0 and 1");
        assert_eq!(b.extents(), vec![(0, 2 * 65536), (3 * 65536, 65536)]);
        assert_eq!(b.dirty_bytes(), 3 * 65536);
        // A range across many words.
        assert!(b.mark(65536 * 60, 65536 * 10));
        assert_eq!(b.dirty_bytes(), 13 * 65536);
        b.clear();
        assert_eq!(b.dirty_bytes(), 0);
        assert!(b.extents().is_empty());
    }

    #[test]
    fn last_granule_is_clipped_to_the_disk() {
        let size = 3 * 65536 + 4096;
        let b = DirtyBitmap::new("b", 16, size, true, false);
        assert!(b.mark(size - 512, 512));
        assert_eq!(b.dirty_bytes(), 4096);
        assert_eq!(b.extents(), vec![(3 * 65536, 4096)]);
        assert!(!b.mark(size, 512), "past the end marks nothing");
    }

    #[test]
    fn bytes_follow_the_qcow2_layout() {
        let b = DirtyBitmap::new("b", 9, 512 * 100, true, false);
        b.mark(0, 512); // granule 0: byte 0 bit 0
        b.mark(512 * 9, 512); // granule 9: byte 1 bit 1
        b.mark(512 * 99, 512); // granule 99: byte 12 bit 3
        let bytes = b.to_bytes();
        assert_eq!(bytes.len(), 13);
        assert_eq!(bytes[0], 1);
        assert_eq!(bytes[1], 2);
        assert_eq!(bytes[12], 8);
        let mut with_tail = bytes.clone();
        with_tail[12] |= 0xf0; // bits past granule 99 must be ignored
        let c = DirtyBitmap::new("c", 9, 512 * 100, true, false).with_bytes(&with_tail);
        assert_eq!(c.to_bytes(), bytes);
    }

    #[test]
    fn merge_across_granularities() {
        let fine = DirtyBitmap::new("f", 12, 1 << 20, true, false);
        let coarse = DirtyBitmap::new("c", 16, 1 << 20, true, false);
        fine.mark(70000, 10);
        coarse.merge_from(&fine);
        assert_eq!(coarse.extents(), vec![(65536, 65536)]);
    }
}
