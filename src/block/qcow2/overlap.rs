//! Metadata overlap protection, as QEMU's `overlap-check`: which host clusters of the image
//! file hold metadata, so that no guest data is written over them, no two structures are
//! written over each other, and the allocator never hands one out.
//!
//! The map keeps a 4-bit kind per host cluster, in chunks allocated only where metadata lies
//! (memory follows the metadata's spread, at most half a byte per cluster of the file). A
//! cluster claimed by two structures at once (a corrupt image) is a *conflict*: writing either
//! structure would damage the other, so such writes are refused too.
//!
//! What is registered (QEMU's default `cached` checks plus what vubd's allocator must avoid):
//! the header cluster, the active L1 table and every active L2 table, the refcount table and
//! blocks, the snapshot table and the snapshots' L1 tables, the bitmap directory, tables and
//! data clusters. Snapshots' L2 tables are not (QEMU's default does not check them either:
//! finding them means reading every snapshot's L1 table).

use std::collections::BTreeMap;
use std::fmt;

use super::units::{HostCluster, HostOffset};

/// A kind of metadata. `Free` (0) is the absence of metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Free = 0,
    Header = 1,
    ActiveL1 = 2,
    ActiveL2 = 3,
    RefcountTable = 4,
    RefcountBlock = 5,
    SnapshotTable = 6,
    InactiveL1 = 7,
    BitmapDirectory = 8,
    BitmapTable = 9,
    BitmapData = 10,
}

impl Kind {
    fn from_nibble(n: u8) -> Kind {
        match n {
            1 => Kind::Header,
            2 => Kind::ActiveL1,
            3 => Kind::ActiveL2,
            4 => Kind::RefcountTable,
            5 => Kind::RefcountBlock,
            6 => Kind::SnapshotTable,
            7 => Kind::InactiveL1,
            8 => Kind::BitmapDirectory,
            9 => Kind::BitmapTable,
            10 => Kind::BitmapData,
            _ => Kind::Free,
        }
    }
}

impl fmt::Display for Kind {
    /// QEMU's names (`qcow2.c`'s `metadata_ol_names`), so messages read the same.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Free => "no metadata",
            Kind::Header => "qcow2_header",
            Kind::ActiveL1 => "active L1 table",
            Kind::ActiveL2 => "active L2 table",
            Kind::RefcountTable => "refcount table",
            Kind::RefcountBlock => "refcount block",
            Kind::SnapshotTable => "snapshot table",
            Kind::InactiveL1 => "inactive L1 table",
            Kind::BitmapDirectory => "bitmap directory",
            Kind::BitmapTable => "bitmap table",
            Kind::BitmapData => "bitmap data",
        })
    }
}

/// Clusters per chunk of the map.
const CHUNK_CLUSTERS: u64 = 4096;
type Chunk = Box<[u8; (CHUNK_CLUSTERS / 2) as usize]>;

/// The metadata clusters of an image file.
#[derive(Default)]
pub struct MetadataMap {
    cluster_bits: u32,
    chunks: Vec<Option<Chunk>>,
    /// Clusters two structures claim: the second claimant's kind.
    conflicts: BTreeMap<u64, Kind>,
}

impl fmt::Debug for MetadataMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetadataMap")
            .field("chunks", &self.chunks.iter().flatten().count())
            .field("conflicts", &self.conflicts.len())
            .finish()
    }
}

impl MetadataMap {
    pub fn new(cluster_bits: u32) -> Self {
        MetadataMap {
            cluster_bits,
            chunks: Vec::new(),
            conflicts: BTreeMap::new(),
        }
    }

    /// The kind of metadata at `cluster`.
    pub fn kind(&self, cluster: HostCluster) -> Kind {
        let (chunk, index) = Self::position(cluster);
        let Some(Some(chunk)) = self.chunks.get(chunk) else {
            return Kind::Free;
        };
        let byte = chunk[index / 2];
        Kind::from_nibble(if index % 2 == 0 {
            byte & 0xf
        } else {
            byte >> 4
        })
    }

    fn set_kind(&mut self, cluster: HostCluster, kind: Kind) {
        let (chunk, index) = Self::position(cluster);
        if self.chunks.len() <= chunk {
            if kind == Kind::Free {
                return;
            }
            self.chunks.resize_with(chunk + 1, || None);
        }
        let chunk = self.chunks[chunk].get_or_insert_with(|| Box::new([0; 2048]));
        let byte = &mut chunk[index / 2];
        let k = kind as u8;
        *byte = if index % 2 == 0 {
            (*byte & 0xf0) | k
        } else {
            (*byte & 0x0f) | (k << 4)
        };
    }

    fn position(cluster: HostCluster) -> (usize, usize) {
        (
            (cluster.0 / CHUNK_CLUSTERS) as usize,
            (cluster.0 % CHUNK_CLUSTERS) as usize,
        )
    }

    fn clusters(&self, offset: HostOffset, len: u64) -> impl Iterator<Item = HostCluster> {
        let bits = self.cluster_bits;
        let empty = len == 0;
        offset.clusters(len.max(1), bits).filter(move |_| !empty)
    }

    /// Record that `[offset, offset + len)` holds `kind`. Clusters already holding metadata
    /// become conflicts.
    pub fn register(&mut self, offset: HostOffset, len: u64, kind: Kind) {
        let clusters: Vec<HostCluster> = self.clusters(offset, len).collect();
        for c in clusters {
            match self.kind(c) {
                Kind::Free => self.set_kind(c, kind),
                _ => {
                    self.conflicts.insert(c.0, kind);
                }
            }
        }
    }

    /// Forget the metadata at `[offset, offset + len)` (its clusters were freed).
    pub fn unregister(&mut self, offset: HostOffset, len: u64) {
        let clusters: Vec<HostCluster> = self.clusters(offset, len).collect();
        for c in clusters {
            // A conflict's second claimant goes first; the cluster stays metadata.
            if self.conflicts.remove(&c.0).is_none() {
                self.set_kind(c, Kind::Free);
            }
        }
    }

    /// Whether `cluster` may be handed out by the allocator: not the header, not metadata.
    pub fn is_allocatable(&self, cluster: HostCluster) -> bool {
        cluster.0 != 0 && self.kind(cluster) == Kind::Free
    }

    /// The first metadata cluster guest data at `[offset, offset + len)` would overwrite.
    pub fn data_overlap(&self, offset: HostOffset, len: u64) -> Option<(HostCluster, Kind)> {
        self.clusters(offset, len)
            .map(|c| (c, self.kind(c)))
            .find(|(c, k)| *k != Kind::Free || c.0 == 0)
            .map(|(c, k)| (c, if c.0 == 0 { Kind::Header } else { k }))
    }

    /// The first cluster of a `kind` structure at `[offset, offset + len)` that another
    /// structure claims too, with that other structure's kind.
    pub fn metadata_overlap(
        &self,
        offset: HostOffset,
        len: u64,
        kind: Kind,
    ) -> Option<(HostCluster, Kind)> {
        self.clusters(offset, len).find_map(|c| {
            let here = self.kind(c);
            let other = self.conflicts.get(&c.0).copied();
            match (here, other) {
                (Kind::Free, _) => None,
                (k, _) if k != kind => Some((c, k)),
                (_, Some(o)) => Some((c, o)),
                _ => None,
            }
        })
    }

    /// How many clusters two structures claim.
    #[cfg(test)]
    pub fn conflicts(&self) -> usize {
        self.conflicts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_kept_per_cluster_and_conflicts_noted() {
        let bits = 16;
        let mut m = MetadataMap::new(bits);
        m.register(HostOffset(0), 1 << bits, Kind::Header);
        m.register(HostOffset(3 << bits), 2 << bits, Kind::RefcountTable);
        m.register(HostOffset(5000 << bits), 1 << bits, Kind::ActiveL2);
        assert_eq!(m.kind(HostCluster(4)), Kind::RefcountTable);
        assert_eq!(m.kind(HostCluster(5)), Kind::Free);
        assert_eq!(m.kind(HostCluster(5000)), Kind::ActiveL2);
        assert!(!m.is_allocatable(HostCluster(0)));
        assert!(!m.is_allocatable(HostCluster(3)));
        assert!(m.is_allocatable(HostCluster(6)));
        assert_eq!(
            m.data_overlap(HostOffset(4 << bits), 4096),
            Some((HostCluster(4), Kind::RefcountTable))
        );
        assert_eq!(m.data_overlap(HostOffset(6 << bits), 1 << bits), None);
        // An L2 table placed on the refcount table: both claim cluster 3.
        m.register(HostOffset(3 << bits), 1 << bits, Kind::ActiveL2);
        assert_eq!(m.conflicts(), 1);
        assert_eq!(
            m.metadata_overlap(HostOffset(3 << bits), 1 << bits, Kind::ActiveL2),
            Some((HostCluster(3), Kind::RefcountTable))
        );
        assert_eq!(
            m.metadata_overlap(HostOffset(3 << bits), 1 << bits, Kind::RefcountTable),
            Some((HostCluster(3), Kind::ActiveL2))
        );
        assert_eq!(
            m.metadata_overlap(HostOffset(5000 << bits), 1 << bits, Kind::ActiveL2),
            None
        );
        m.unregister(HostOffset(3 << bits), 1 << bits);
        assert_eq!(m.conflicts(), 0);
        assert_eq!(m.kind(HostCluster(3)), Kind::RefcountTable);
        m.unregister(HostOffset(5000 << bits), 1 << bits);
        assert!(m.is_allocatable(HostCluster(5000)));
    }
}
