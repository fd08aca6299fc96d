//! The raw-data-file fast path.
//!
//! With `data_file_raw`, every allocated guest cluster lives at its own offset in the data
//! file. An atomic bit per guest cluster records clusters known to be mapped that way, so a
//! request whose clusters are all known goes straight to the same offset of the data file,
//! with no lock and no table lookup. Bits are only ever set: a cluster, once identity-mapped,
//! stays so (discards keep the mapping; the data file itself is what reads as the disk).

use std::sync::atomic::{AtomicU64, Ordering};

use super::entry::L2Entry;
use super::units::{be64_entries, GuestCluster, HostOffset};
use super::{Qcow2Error, Qcow2Node};
use crate::block::{Extent, Mapping};

/// Guest clusters known to be allocated at their identical offset of a raw data file.
pub(super) struct IdentityMap {
    cluster_bits: u32,
    words: Vec<AtomicU64>,
}

impl IdentityMap {
    pub fn new(size: u64, cluster_bits: u32) -> Self {
        let clusters = size.div_ceil(1 << cluster_bits);
        IdentityMap {
            cluster_bits,
            words: (0..clusters.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    fn is_set(&self, cluster: u64) -> bool {
        let word = &self.words[(cluster / 64) as usize];
        word.load(Ordering::Acquire) & (1 << (cluster % 64)) != 0
    }

    pub fn set(&self, cluster: GuestCluster) {
        self.words[(cluster.0 / 64) as usize].fetch_or(1 << (cluster.0 % 64), Ordering::Release);
    }

    /// Whether every cluster of `[offset, offset + len)` is mapped at its own offset.
    fn covers(&self, offset: u64, len: u64) -> bool {
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        (first..=last).all(|c| self.is_set(c))
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
        let clusters = self.size.div_ceil(self.cluster_size());
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
