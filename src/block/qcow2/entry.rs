//! L1 and L2 table entries (docs/interop/qcow2.txt, "Cluster mapping").

use super::units::HostOffset;

/// Bit 63 of L1 and standard L2 entries: the refcount is exactly one ("COPIED").
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry (version 3): the cluster reads as zeroes.
pub const ZERO: u64 = 1;
/// Bits 9-55: a cluster-aligned host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry bits that must be zero: 0-8 and 56-62.
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Standard L2 entry bits that must be zero: 1-8 and 56-61.
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// Where a guest cluster's data is, as one L2 entry says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Entry {
    /// Read from the backing file, or zeroes without one.
    Unallocated,
    /// Reads as zeroes; `host` is a preallocated cluster (with `copied` telling whether it may
    /// be written in place), if any.
    Zero {
        host: Option<HostOffset>,
        copied: bool,
    },
    /// Data at `host` (a cluster-aligned offset, in the data file if there is one).
    Normal { host: HostOffset, copied: bool },
    /// Compressed data: `len` bytes at `host` (not aligned).
    Compressed { host: HostOffset, len: u64 },
}

impl L2Entry {
    /// The allocated (or preallocated) cluster this entry points at, for standard and zero
    /// entries.
    pub fn allocated_host(self) -> Option<HostOffset> {
        match self {
            L2Entry::Normal { host, .. }
            | L2Entry::Zero {
                host: Some(host), ..
            } => Some(host),
            _ => None,
        }
    }
}

/// A decoded L1 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L1Entry {
    /// The L2 table, if one is allocated.
    pub table: Option<HostOffset>,
    /// The table's refcount is exactly one: it may be written in place.
    pub copied: bool,
}

/// Decoding parameters that depend on the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryFormat {
    pub cluster_bits: u32,
    /// Version 2 images have no zero flag.
    pub version: u32,
    /// With an external data file, host offset 0 is valid when COPIED is set.
    pub external_data: bool,
}

/// Why an entry is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidEntry(pub u64);

impl EntryFormat {
    /// Bit position of the compressed sector count: `62 - (cluster_bits - 8)`.
    fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }

    /// Decode a raw L2 entry.
    pub fn decode_l2(&self, raw: u64) -> Result<L2Entry, InvalidEntry> {
        if raw & COMPRESSED != 0 {
            if self.external_data || raw & COPIED != 0 {
                return Err(InvalidEntry(raw));
            }
            let shift = self.csize_shift();
            let host = raw & ((1u64 << shift) - 1);
            let sectors = ((raw >> shift) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
            let len = sectors * 512 - (host & 511);
            return Ok(L2Entry::Compressed {
                host: HostOffset(host),
                len,
            });
        }
        if raw & L2_RESERVED != 0 {
            return Err(InvalidEntry(raw));
        }
        let copied = raw & COPIED != 0;
        let offset = raw & OFFSET_MASK;
        let cluster_mask = (1u64 << self.cluster_bits) - 1;
        if offset & cluster_mask != 0 {
            return Err(InvalidEntry(raw));
        }
        let allocated = offset != 0 || (copied && self.external_data);
        if raw & ZERO != 0 {
            if self.version < 3 {
                return Err(InvalidEntry(raw));
            }
            return Ok(L2Entry::Zero {
                host: allocated.then_some(HostOffset(offset)),
                copied,
            });
        }
        if !allocated {
            return if copied {
                Err(InvalidEntry(raw))
            } else {
                Ok(L2Entry::Unallocated)
            };
        }
        Ok(L2Entry::Normal {
            host: HostOffset(offset),
            copied,
        })
    }
}

/// Encode a standard entry pointing at `host`.
pub fn encode_normal(host: HostOffset, copied: bool) -> u64 {
    host.0 | if copied { COPIED } else { 0 }
}

/// Encode a zero entry, keeping `host` preallocated if given.
pub fn encode_zero(host: Option<HostOffset>, copied: bool) -> u64 {
    host.map_or(0, |h| h.0) | ZERO | if copied { COPIED } else { 0 }
}

/// Decode a raw L1 entry.
pub fn decode_l1(raw: u64, cluster_bits: u32) -> Result<L1Entry, InvalidEntry> {
    let offset = raw & OFFSET_MASK;
    if raw & L1_RESERVED != 0 || offset & ((1u64 << cluster_bits) - 1) != 0 {
        return Err(InvalidEntry(raw));
    }
    Ok(L1Entry {
        table: (offset != 0).then_some(HostOffset(offset)),
        copied: raw & COPIED != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FMT: EntryFormat = EntryFormat {
        cluster_bits: 16,
        version: 3,
        external_data: false,
    };

    #[test]
    fn decodes_standard_zero_and_unallocated_entries() {
        assert_eq!(FMT.decode_l2(0), Ok(L2Entry::Unallocated));
        assert_eq!(
            FMT.decode_l2(COPIED | 0x50000),
            Ok(L2Entry::Normal {
                host: HostOffset(0x50000),
                copied: true
            })
        );
        assert_eq!(
            FMT.decode_l2(ZERO),
            Ok(L2Entry::Zero {
                host: None,
                copied: false
            })
        );
        assert_eq!(
            FMT.decode_l2(ZERO | COPIED | 0x70000),
            Ok(L2Entry::Zero {
                host: Some(HostOffset(0x70000)),
                copied: true
            })
        );
        // Misaligned offset, reserved bits, COPIED without an offset.
        assert!(FMT.decode_l2(0x50200).is_err());
        assert!(FMT.decode_l2(0x50000 | 2).is_err());
        assert!(FMT.decode_l2(COPIED).is_err());
        // Zero flag on version 2.
        let v2 = EntryFormat { version: 2, ..FMT };
        assert!(v2.decode_l2(ZERO).is_err());
    }

    #[test]
    fn external_data_allows_host_offset_zero() {
        let ext = EntryFormat {
            external_data: true,
            ..FMT
        };
        assert_eq!(
            ext.decode_l2(COPIED),
            Ok(L2Entry::Normal {
                host: HostOffset(0),
                copied: true
            })
        );
        assert!(ext.decode_l2(COMPRESSED | 0x1000).is_err());
    }

    #[test]
    fn decodes_compressed_entries() {
        // 64 KiB clusters: csize_shift = 54; two additional sectors; offset 0x12345 (mid-sector).
        let raw = COMPRESSED | (2u64 << 54) | 0x12345;
        assert_eq!(
            FMT.decode_l2(raw),
            Ok(L2Entry::Compressed {
                host: HostOffset(0x12345),
                len: 3 * 512 - 0x145
            })
        );
    }

    #[test]
    fn encode_round_trips() {
        assert_eq!(
            FMT.decode_l2(encode_normal(HostOffset(0x30000), true)),
            Ok(L2Entry::Normal {
                host: HostOffset(0x30000),
                copied: true
            })
        );
        assert_eq!(
            FMT.decode_l2(encode_zero(None, false)),
            Ok(L2Entry::Zero {
                host: None,
                copied: false
            })
        );
        assert_eq!(
            FMT.decode_l2(encode_zero(Some(HostOffset(0x40000)), true)),
            Ok(L2Entry::Zero {
                host: Some(HostOffset(0x40000)),
                copied: true
            })
        );
    }

    #[test]
    fn l1_entries() {
        assert_eq!(
            decode_l1(COPIED | 0x40000, 16),
            Ok(L1Entry {
                table: Some(HostOffset(0x40000)),
                copied: true
            })
        );
        assert_eq!(
            decode_l1(0, 16),
            Ok(L1Entry {
                table: None,
                copied: false
            })
        );
        assert!(decode_l1(0x40000 | 1, 16).is_err());
        assert!(decode_l1(0x48000, 16).is_err());
    }
}
