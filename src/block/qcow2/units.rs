//! Typed units, so that guest clusters, host clusters and host byte offsets cannot be mixed up,
//! and big-endian field access for on-disk structures.
//!
//! qcow2.txt: "guest cluster" is a cluster of the virtual disk, addressed through L1/L2 tables;
//! "host cluster" is a cluster of the image file (or the external data file), addressed by
//! refcounts. Conversions between indices and offsets need the cluster size, so they take
//! `cluster_bits` explicitly.

/// A cluster of the virtual disk: guest offset >> cluster_bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestCluster(pub u64);

/// A cluster of the image file (or the external data file): host offset >> cluster_bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostCluster(pub u64);

/// A byte offset in the image file (or the external data file).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostOffset(pub u64);

impl GuestCluster {
    /// The cluster holding guest byte `offset`.
    pub fn containing(offset: u64, cluster_bits: u32) -> Self {
        GuestCluster(offset >> cluster_bits)
    }

    /// The guest offset of the cluster's first byte.
    pub fn offset(self, cluster_bits: u32) -> u64 {
        self.0 << cluster_bits
    }

    /// Index of the L1 entry whose L2 table maps this cluster.
    pub fn l1_index(self, l2_entries: u64) -> u64 {
        self.0 / l2_entries
    }

    /// Index of this cluster's entry within its L2 table.
    pub fn l2_index(self, l2_entries: u64) -> usize {
        (self.0 % l2_entries) as usize
    }

    /// With an external data file, where this cluster's data must live: at its own offset.
    pub fn identity(self, cluster_bits: u32) -> HostOffset {
        HostOffset(self.offset(cluster_bits))
    }
}

impl HostCluster {
    /// The offset of the cluster's first byte.
    pub fn offset(self, cluster_bits: u32) -> HostOffset {
        HostOffset(self.0 << cluster_bits)
    }
}

impl HostOffset {
    /// The cluster holding this byte.
    pub fn cluster(self, cluster_bits: u32) -> HostCluster {
        HostCluster(self.0 >> cluster_bits)
    }

    /// The host clusters `len` bytes from here touch (`len > 0`).
    pub fn clusters(self, len: u64, cluster_bits: u32) -> impl Iterator<Item = HostCluster> {
        let first = self.0 >> cluster_bits;
        let last = (self.0 + len - 1) >> cluster_bits;
        (first..=last).map(HostCluster)
    }

    /// `n` bytes further on.
    pub fn add(self, n: u64) -> HostOffset {
        HostOffset(self.0 + n)
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

/// The `N` bytes of `b` at `at`; `None` past its end.
fn field<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..)?.first_chunk::<N>().copied()
}

/// A big-endian `u16` at byte `at` of `b`; `None` past its end.
pub fn be16(b: &[u8], at: usize) -> Option<u16> {
    field(b, at).map(u16::from_be_bytes)
}

/// A big-endian `u32` at byte `at` of `b`; `None` past its end.
pub fn be32(b: &[u8], at: usize) -> Option<u32> {
    field(b, at).map(u32::from_be_bytes)
}

/// A big-endian `u64` at byte `at` of `b`; `None` past its end.
pub fn be64(b: &[u8], at: usize) -> Option<u64> {
    field(b, at).map(u64::from_be_bytes)
}

/// A table of big-endian `u64` entries (L1, L2, refcount table); a trailing partial entry is
/// ignored.
pub fn be64_entries(b: &[u8]) -> impl Iterator<Item = u64> + '_ {
    b.as_chunks::<8>().0.iter().map(|e| u64::from_be_bytes(*e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_follow_the_cluster_size() {
        let bits = 16;
        let g = GuestCluster::containing(0x3_1234, bits);
        assert_eq!(g, GuestCluster(3));
        assert_eq!(g.offset(bits), 0x3_0000);
        assert_eq!(g.l1_index(8192), 0);
        assert_eq!(GuestCluster(8193).l2_index(8192), 1);
        assert_eq!(HostOffset(0x5_0000).cluster(bits), HostCluster(5));
        assert_eq!(HostCluster(5).offset(bits), HostOffset(0x5_0000));
        let touched: Vec<_> = HostOffset(0x1_fff0).clusters(0x20, bits).collect();
        assert_eq!(touched, vec![HostCluster(1), HostCluster(2)]);
    }

    #[test]
    fn fields_past_the_end_are_none_not_zero() {
        let b = [0x12, 0x34, 0x56, 0x78, 0x9a];
        assert_eq!(be16(&b, 0), Some(0x1234));
        assert_eq!(be32(&b, 1), Some(0x3456_789a));
        assert_eq!(be32(&b, 2), None);
        assert_eq!(be64(&b, 0), None);
        assert_eq!(be16(&b, usize::MAX), None);
        let entries: Vec<u64> = be64_entries(&[0, 0, 0, 0, 0, 0, 1, 0, 9]).collect();
        assert_eq!(entries, vec![256]);
    }
}
