//! The raw-data-file fast path.
//!
//! With `data_file_raw`, every allocated guest cluster lives at its own offset in the data
//! file. An atomic bit per guest cluster records clusters known to be mapped that way, so a
//! request whose clusters are all known goes straight to the same offset of the data file,
//! with no lock and no table lookup. Bits are only ever set: a cluster, once identity-mapped,
//! stays so (discards keep the mapping; the data file itself is what reads as the disk).

use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::Mutex;

use super::entry::L2Entry;
use super::units::{be64_entries, GuestCluster, HostOffset};
use super::{Qcow2Error, Qcow2Node};
use crate::block::{Extent, Mapping};

/// Guest clusters known to be allocated at their identical offset of a raw data file.
///
/// One bit per guest cluster, in chunks of one L2 table's worth allocated the first time one
/// of their clusters is set: memory follows what the disk uses, not the virtual size an image
/// claims (a sparse data file can be exabytes). The directory of chunks has one pointer per L1
/// entry the disk needs, which the header bounded (32 MiB of L1, as QEMU). When the disk grows
/// ([`IdentityMap::grow`]) a larger directory replaces it, holding the same chunks; the one
/// replaced is kept until the map is dropped, as a reader may still be looking at it.
pub(super) struct IdentityMap {
    cluster_bits: u32,
    /// log2 of the clusters one chunk covers (the entries of an L2 table).
    chunk_bits: u32,
    /// The current directory, from `Box::into_raw`.
    directory: AtomicPtr<Directory>,
    /// Directories replaced by larger ones, boxed: readers may hold their address.
    #[allow(clippy::vec_box)]
    retired: Mutex<Vec<Box<Directory>>>,
}

/// A chunk pointer per L1 entry.
struct Directory {
    chunks: Box<[AtomicPtr<AtomicU64>]>,
}

impl Directory {
    fn new(chunks: u64) -> Box<Directory> {
        Box::new(Directory {
            chunks: (0..chunks)
                .map(|_| AtomicPtr::new(ptr::null_mut()))
                .collect(),
        })
    }
}

impl IdentityMap {
    pub fn new(size: u64, cluster_bits: u32) -> Self {
        let chunk_bits = cluster_bits - 3;
        let directory = Directory::new(Self::chunks_for(size, cluster_bits, chunk_bits));
        IdentityMap {
            cluster_bits,
            chunk_bits,
            directory: AtomicPtr::new(Box::into_raw(directory)),
            retired: Mutex::new(Vec::new()),
        }
    }

    fn chunks_for(size: u64, cluster_bits: u32, chunk_bits: u32) -> u64 {
        size.div_ceil(1 << cluster_bits).div_ceil(1 << chunk_bits)
    }

    #[inline]
    fn directory(&self) -> &Directory {
        // SAFETY: the pointer came from Box::into_raw, and neither it nor any directory it
        // replaced is freed before the map is dropped (replaced ones are kept in `retired`).
        unsafe { &*self.directory.load(Ordering::Acquire) }
    }

    /// Cover a disk of `size` bytes: the clusters known so far stay known. Called with the
    /// node's metadata lock held, so two growths never race; a cluster set concurrently in
    /// the replaced directory may be forgotten, which only sends it down the slow path.
    pub fn grow(&self, size: u64) {
        let chunks = Self::chunks_for(size, self.cluster_bits, self.chunk_bits);
        let old = self.directory();
        if chunks <= old.chunks.len() as u64 {
            return;
        }
        let new = Directory::new(chunks);
        for (to, from) in new.chunks.iter().zip(old.chunks.iter()) {
            to.store(from.load(Ordering::Acquire), Ordering::Relaxed);
        }
        let old = self.directory.swap(Box::into_raw(new), Ordering::AcqRel);
        // SAFETY: `old` came from Box::into_raw and is owned by the map alone; kept alive.
        let old = unsafe { Box::from_raw(old) };
        self.retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(old);
    }

    /// Words per chunk (a chunk covers at least 64 clusters: clusters are 512 bytes or more).
    fn chunk_words(&self) -> usize {
        1 << (self.chunk_bits - 6)
    }

    #[inline]
    fn is_set(&self, cluster: u64) -> bool {
        let Some(chunk) = self
            .directory()
            .chunks
            .get((cluster >> self.chunk_bits) as usize)
        else {
            return false;
        };
        let words = chunk.load(Ordering::Acquire);
        if words.is_null() {
            return false;
        }
        let bit = cluster & ((1 << self.chunk_bits) - 1);
        // SAFETY: a non-null chunk pointer was published (Release) after its `chunk_words`
        // words were initialised, is never freed before the map is dropped, and `bit / 64` is
        // below `chunk_words` by construction.
        let word = unsafe { &*words.add((bit / 64) as usize) };
        word.load(Ordering::Acquire) & (1 << (bit % 64)) != 0
    }

    pub fn set(&self, cluster: GuestCluster) {
        let Some(chunk) = self
            .directory()
            .chunks
            .get((cluster.0 >> self.chunk_bits) as usize)
        else {
            return;
        };
        let mut words = chunk.load(Ordering::Acquire);
        if words.is_null() {
            let fresh: Box<[AtomicU64]> =
                (0..self.chunk_words()).map(|_| AtomicU64::new(0)).collect();
            let fresh = Box::into_raw(fresh).cast::<AtomicU64>();
            match chunk.compare_exchange(
                ptr::null_mut(),
                fresh,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => words = fresh,
                Err(existing) => {
                    // Another thread published first: ours was never shared.
                    // SAFETY: `fresh` came from Box::into_raw of a slice of `chunk_words`.
                    drop(unsafe {
                        Box::from_raw(ptr::slice_from_raw_parts_mut(fresh, self.chunk_words()))
                    });
                    words = existing;
                }
            }
        }
        let bit = cluster.0 & ((1 << self.chunk_bits) - 1);
        // SAFETY: as in `is_set`.
        let word = unsafe { &*words.add((bit / 64) as usize) };
        word.fetch_or(1 << (bit % 64), Ordering::Release);
    }

    /// Whether every cluster of `[offset, offset + len)` is mapped at its own offset.
    #[inline]
    fn covers(&self, offset: u64, len: u64) -> bool {
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        (first..=last).all(|c| self.is_set(c))
    }
}

impl Drop for IdentityMap {
    fn drop(&mut self) {
        let words = self.chunk_words();
        // SAFETY: from Box::into_raw; no one can use the map while it is being dropped.
        let current = unsafe { Box::from_raw(*self.directory.get_mut()) };
        let retired = std::mem::take(self.retired.get_mut().unwrap_or_else(|p| p.into_inner()));
        // A chunk may be in several directories (copied when the disk grew): free it once.
        let mut chunks = std::collections::BTreeSet::new();
        for directory in retired.iter().chain(std::iter::once(&current)) {
            for chunk in directory.chunks.iter() {
                let p = chunk.load(Ordering::Acquire);
                if !p.is_null() {
                    chunks.insert(p as usize);
                }
            }
        }
        for p in chunks {
            // SAFETY: allocated in `set` by Box::into_raw of a slice of `words` elements,
            // published once, collected once above.
            drop(unsafe {
                Box::from_raw(ptr::slice_from_raw_parts_mut(p as *mut AtomicU64, words))
            });
        }
    }
}

impl Qcow2Node {
    /// The fast path: a range whose clusters are all identity-mapped goes to the same offset
    /// in the data file. Returns whether it applied.
    #[inline]
    pub(super) fn map_identity(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> bool {
        let Some(fast) = &self.fast else {
            return false;
        };
        if len == 0 || !fast.covers(offset, len) {
            return false;
        }
        let mapping = Mapping::Data {
            file: self.data_fid,
            offset,
        };
        out.push(Extent { len, mapping });
        true
    }

    /// Note that `cluster` maps to `host`: if that is its own offset, the fast path may serve
    /// it from now on.
    pub(super) fn note_identity(&self, cluster: GuestCluster, host: HostOffset) {
        if let Some(fast) = &self.fast {
            if host == cluster.identity(self.cluster_bits) {
                fast.set(cluster);
            }
        }
    }

    /// Mark every cluster already mapped at its own offset in the raw data file, so that the
    /// fast path serves them without taking the lock. Skipped for very large metadata (the
    /// map then fills in as clusters are first used).
    pub(super) fn prefill_identity_map(&self) -> Result<(), Qcow2Error> {
        const MAX_SCAN_BYTES: u64 = 64 << 20;
        if self.fast.is_none() {
            return Ok(());
        }
        let tables: Vec<(u64, HostOffset)> = self
            .lock()
            .l1
            .iter()
            .enumerate()
            .filter_map(|(i, raw)| {
                let entry = super::entry::decode_l1(*raw, self.cluster_bits).ok()?;
                Some((i as u64, entry.table?))
            })
            .collect();
        if tables.len() as u64 * self.cluster_size() > MAX_SCAN_BYTES {
            return Ok(());
        }
        let entries = self.l2_entries();
        let clusters = self.disk_size().div_ceil(self.cluster_size());
        let mut buf = vec![0u8; self.cluster_size() as usize];
        for (l1_index, offset) in tables {
            self.meta_file.read_exact_at(&mut buf, offset.0)?;
            for (i, raw) in be64_entries(&buf).enumerate() {
                let cluster = GuestCluster(l1_index * entries + i as u64);
                if cluster.0 >= clusters {
                    break;
                }
                if let Ok(L2Entry::Normal { host, .. }) = self.format.decode_l2(raw) {
                    self.note_identity(cluster, host);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_allocated_only_where_clusters_are_set() {
        // A 1 TiB disk of 64 KiB clusters: 2048 chunks of 8192 clusters, none allocated yet.
        let map = IdentityMap::new(1 << 40, 16);
        assert_eq!(map.directory().chunks.len(), 2048);
        assert!(!map.covers(0, 4096));
        map.set(GuestCluster(1_000_000));
        map.set(GuestCluster(1_000_001));
        assert!(map.covers(1_000_000 << 16, 2 << 16));
        assert!(!map.covers(1_000_000 << 16, 3 << 16));
        assert!(!map.is_set(999_999));
        let allocated = map
            .directory()
            .chunks
            .iter()
            .filter(|c| !c.load(Ordering::Relaxed).is_null())
            .count();
        assert_eq!(allocated, 1);
        // Past the disk: never set, never covered.
        map.set(GuestCluster(u64::MAX >> 20));
        assert!(!map.is_set(u64::MAX >> 20));
    }

    #[test]
    fn growing_keeps_what_is_known_and_covers_the_new_range() {
        // 64 MiB of 64 KiB clusters: one chunk.
        let map = IdentityMap::new(64 << 20, 16);
        map.set(GuestCluster(5));
        let beyond = GuestCluster(8192 * 3 + 7);
        map.set(beyond);
        assert!(!map.is_set(beyond.0), "past the disk");
        map.grow(1 << 30);
        assert_eq!(map.directory().chunks.len(), 2);
        map.grow(2 << 30);
        assert_eq!(map.directory().chunks.len(), 4);
        assert!(map.is_set(5), "what was known stays known");
        map.set(beyond);
        assert!(map.is_set(beyond.0));
        map.grow(1 << 20);
        assert_eq!(map.directory().chunks.len(), 4, "never shrinks");
        // Dropping frees each chunk once (under Miri or ASan a double free would show).
    }
}
