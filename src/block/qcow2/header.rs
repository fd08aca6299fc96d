//! The qcow2 header and header extensions (docs/interop/qcow2.txt, "Header" and
//! "Header extensions").
//!
//! All numbers are big-endian. The header occupies the start of cluster 0, followed by the
//! extensions and, if there is one, the backing file name. Unknown extensions and unknown
//! additional header fields are kept byte for byte and written back on every header update.

use thiserror::Error;

use super::units::{be32, be64};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header.
pub const V2_HEADER_LENGTH: u32 = 72;
/// Minimum length of a version 3 header.
pub const V3_HEADER_LENGTH: u32 = 104;
/// Smallest and largest cluster sizes vubd (like QEMU) supports: 512 B to 2 MiB.
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limits on the L1 table (32 MiB) and refcount table (8 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Where the incompatible feature bits are (version 3).
pub const INCOMPATIBLE_FEATURES_OFFSET: u64 = 72;
/// Longest backing file name the specification allows.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Incompatible feature bits (header bytes 72-79).
pub mod incompatible {
    /// Refcounts may be inconsistent (lazy refcounts in use).
    pub const DIRTY: u64 = 1 << 0;
    /// Any structure may be corrupt: never write.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// `compression_type` is non-zero.
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// 128-bit L2 entries with subclusters.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every bit this implementation knows.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION_TYPE | EXTENDED_L2;
}

/// Compatible feature bits (header bytes 80-87).
pub mod compatible {
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits (header bytes 88-95).
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a consistent raw image on its own.
    pub const DATA_FILE_RAW: u64 = 1 << 1;
    /// Bits vubd keeps on a read-write open, because it keeps what they promise true; it
    /// clears the others, as the spec requires.
    pub const KNOWN: u64 = BITMAPS | DATA_FILE_RAW;
}

/// Header extension types.
pub mod extension {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_NAMES: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const ENCRYPTION: u32 = 0x0537_be77;
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// `compression_type` values (header byte 104).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    Zlib,
    Zstd,
}

/// Why a header cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("not a qcow2 image (bad magic)")]
    BadMagic,
    #[error("unsupported qcow2 version {0}")]
    Version(u32),
    #[error("the header is truncated")]
    Truncated,
    #[error("invalid header: {0}")]
    Invalid(&'static str),
    #[error("cluster size 2^{0} is outside 512 B to 2 MiB")]
    ClusterBits(u32),
    #[error("unsupported incompatible features {0:#x}")]
    UnknownIncompatible(u64),
    #[error("encrypted images are not supported")]
    Encrypted,
    #[error(
        "extended L2 entries (subclusters) are not supported; convert the image with \
         qemu-img convert -O qcow2 -o extended_l2=off"
    )]
    ExtendedL2,
    #[error("unknown compression type {0}")]
    CompressionType(u8),
}

/// One header extension, kept as raw bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extension {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// The decoded header. Byte offsets are those of the specification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Bytes 4-7.
    pub version: u32,
    /// Bytes 8-15 and 16-19: where the backing file name is stored in cluster 0.
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    /// Bytes 20-23.
    pub cluster_bits: u32,
    /// Bytes 24-31: virtual disk size.
    pub size: u64,
    /// Bytes 32-35.
    pub crypt_method: u32,
    /// Bytes 36-39 and 40-47.
    pub l1_size: u32,
    pub l1_table_offset: u64,
    /// Bytes 48-55 and 56-59.
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    /// Bytes 60-63 and 64-71.
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    /// Bytes 72-79, 80-87, 88-95 (version 3).
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    /// Bytes 96-99: refcount width is `1 << refcount_order` bits.
    pub refcount_order: u32,
    /// Bytes 100-103.
    pub header_length: u32,
    /// Byte 104, if `header_length` covers it.
    pub compression_type: u8,
    /// Header bytes after byte 104 that this implementation does not know, kept as they are.
    pub unknown_fields: Vec<u8>,
    /// Extensions in file order, unknown ones included.
    pub extensions: Vec<Extension>,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
}

impl Header {
    /// Parse the header from the start of cluster 0 (`buf` holds at least the first cluster, or
    /// the whole file if it is shorter).
    pub fn parse(buf: &[u8]) -> Result<Header, HeaderError> {
        if buf.len() < V2_HEADER_LENGTH as usize {
            return Err(HeaderError::Truncated);
        }
        let u32_at = |at| be32(buf, at).ok_or(HeaderError::Truncated);
        let u64_at = |at| be64(buf, at).ok_or(HeaderError::Truncated);
        if u32_at(0)? != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let version = u32_at(4)?;
        if version != 2 && version != 3 {
            return Err(HeaderError::Version(version));
        }
        let cluster_bits = u32_at(20)?;
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(HeaderError::ClusterBits(cluster_bits));
        }
        let cluster_size = 1usize << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: u64_at(8)?,
            backing_file_size: u32_at(16)?,
            cluster_bits,
            size: u64_at(24)?,
            crypt_method: u32_at(32)?,
            l1_size: u32_at(36)?,
            l1_table_offset: u64_at(40)?,
            refcount_table_offset: u64_at(48)?,
            refcount_table_clusters: u32_at(56)?,
            nb_snapshots: u32_at(60)?,
            snapshots_offset: u64_at(64)?,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LENGTH,
            compression_type: 0,
            unknown_fields: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
        };
        if version == 3 {
            if buf.len() < V3_HEADER_LENGTH as usize {
                return Err(HeaderError::Truncated);
            }
            h.incompatible_features = u64_at(72)?;
            h.compatible_features = u64_at(80)?;
            h.autoclear_features = u64_at(88)?;
            h.refcount_order = u32_at(96)?;
            h.header_length = u32_at(100)?;
            if h.header_length < V3_HEADER_LENGTH || !h.header_length.is_multiple_of(8) {
                return Err(HeaderError::Invalid("header_length"));
            }
            if h.header_length as usize > cluster_size.min(buf.len()) {
                return Err(HeaderError::Invalid(
                    "header_length exceeds the first cluster",
                ));
            }
            if h.header_length > V3_HEADER_LENGTH {
                h.compression_type = buf[104];
                h.unknown_fields = buf[105..h.header_length as usize].to_vec();
            }
        }
        h.validate()?;
        h.extensions = parse_extensions(buf, h.header_length as usize, cluster_size)?;
        if h.backing_file_offset != 0 {
            let start = h.backing_file_offset as usize;
            let end = start
                .checked_add(h.backing_file_size as usize)
                .ok_or(HeaderError::Invalid("backing file name"))?;
            if h.backing_file_size > MAX_BACKING_NAME || end > cluster_size.min(buf.len()) {
                return Err(HeaderError::Invalid(
                    "backing file name outside the first cluster",
                ));
            }
            let name = String::from_utf8(buf[start..end].to_vec())
                .map_err(|_| HeaderError::Invalid("backing file name is not UTF-8"))?;
            h.backing_file = Some(name);
        }
        Ok(h)
    }

    fn validate(&self) -> Result<(), HeaderError> {
        let unknown = self.incompatible_features & !incompatible::KNOWN;
        if unknown != 0 {
            return Err(HeaderError::UnknownIncompatible(unknown));
        }
        if self.crypt_method != 0 {
            return Err(HeaderError::Encrypted);
        }
        if self.incompatible_features & incompatible::EXTENDED_L2 != 0 {
            return Err(HeaderError::ExtendedL2);
        }
        if self.refcount_order > 6 {
            return Err(HeaderError::Invalid("refcount_order above 6"));
        }
        let has_type_bit = self.incompatible_features & incompatible::COMPRESSION_TYPE != 0;
        match (self.compression_type, has_type_bit) {
            (0, false) | (1, true) => {}
            (0, true) => return Err(HeaderError::Invalid("compression type bit without a type")),
            (t, _) => return Err(HeaderError::CompressionType(t)),
        }
        let cluster_size = 1u64 << self.cluster_bits;
        let aligned = |off: u64| off.is_multiple_of(cluster_size);
        if !aligned(self.l1_table_offset)
            || !aligned(self.refcount_table_offset)
            || !aligned(self.snapshots_offset)
        {
            return Err(HeaderError::Invalid("table offset not cluster aligned"));
        }
        if self.refcount_table_offset == 0 || self.refcount_table_clusters == 0 {
            return Err(HeaderError::Invalid("no refcount table"));
        }
        if u64::from(self.refcount_table_clusters) * cluster_size > MAX_REFTABLE_BYTES {
            return Err(HeaderError::Invalid("refcount table too large"));
        }
        if u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            return Err(HeaderError::Invalid("L1 table too large"));
        }
        let l2_entries = cluster_size / 8;
        let needed = self.size.div_ceil(cluster_size).div_ceil(l2_entries);
        if u64::from(self.l1_size) < needed {
            return Err(HeaderError::Invalid(
                "L1 table too small for the virtual size",
            ));
        }
        if self.autoclear_features & autoclear::DATA_FILE_RAW != 0
            && self.incompatible_features & incompatible::DATA_FILE == 0
        {
            return Err(HeaderError::Invalid(
                "raw data file bit without a data file",
            ));
        }
        Ok(())
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn compression(&self) -> CompressionType {
        if self.compression_type == 1 {
            CompressionType::Zstd
        } else {
            CompressionType::Zlib
        }
    }

    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & incompatible::DATA_FILE != 0
    }

    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & autoclear::DATA_FILE_RAW != 0
    }

    /// A string extension's value (backing format, data file name).
    pub fn string_extension(&self, kind: u32) -> Option<String> {
        self.extension(kind)
            .map(|data| String::from_utf8_lossy(data).into_owned())
    }

    pub fn extension(&self, kind: u32) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| e.data.as_slice())
    }

    /// Replace (or add, or with `None` remove) the extension of `kind`.
    pub fn set_extension(&mut self, kind: u32, data: Option<Vec<u8>>) {
        match (self.extensions.iter().position(|e| e.kind == kind), data) {
            (Some(i), Some(data)) => self.extensions[i].data = data,
            (Some(i), None) => {
                self.extensions.remove(i);
            }
            (None, Some(data)) => self.extensions.push(Extension { kind, data }),
            (None, None) => {}
        }
    }

    /// Encode header, extensions and backing file name into the bytes of cluster 0's start.
    /// Fails if they do not fit in one cluster.
    pub fn serialize(&mut self) -> Result<Vec<u8>, HeaderError> {
        let mut out = vec![0u8; self.header_length as usize];
        let put32 =
            |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut out, 0, MAGIC);
        put32(&mut out, 4, self.version);
        put32(&mut out, 20, self.cluster_bits);
        put64(&mut out, 24, self.size);
        put32(&mut out, 32, self.crypt_method);
        put32(&mut out, 36, self.l1_size);
        put64(&mut out, 40, self.l1_table_offset);
        put64(&mut out, 48, self.refcount_table_offset);
        put32(&mut out, 56, self.refcount_table_clusters);
        put32(&mut out, 60, self.nb_snapshots);
        put64(&mut out, 64, self.snapshots_offset);
        if self.version >= 3 {
            put64(&mut out, 72, self.incompatible_features);
            put64(&mut out, 80, self.compatible_features);
            put64(&mut out, 88, self.autoclear_features);
            put32(&mut out, 96, self.refcount_order);
            put32(&mut out, 100, self.header_length);
            if self.header_length > V3_HEADER_LENGTH {
                out[104] = self.compression_type;
                let n = self.unknown_fields.len().min(out.len() - 105);
                out[105..105 + n].copy_from_slice(&self.unknown_fields[..n]);
            }
        }
        for ext in &self.extensions {
            out.extend_from_slice(&ext.kind.to_be_bytes());
            out.extend_from_slice(&(ext.data.len() as u32).to_be_bytes());
            out.extend_from_slice(&ext.data);
            out.resize(out.len().next_multiple_of(8), 0);
        }
        out.extend_from_slice(&[0u8; 8]); // end of the extension area
        match &self.backing_file {
            Some(name) => {
                self.backing_file_offset = out.len() as u64;
                self.backing_file_size = name.len() as u32;
                out.extend_from_slice(name.as_bytes());
            }
            None => {
                self.backing_file_offset = 0;
                self.backing_file_size = 0;
            }
        }
        put64(&mut out, 8, self.backing_file_offset);
        put32(&mut out, 16, self.backing_file_size);
        if out.len() as u64 > self.cluster_size() {
            return Err(HeaderError::Invalid(
                "header and extensions exceed the first cluster",
            ));
        }
        Ok(out)
    }
}

fn parse_extensions(
    buf: &[u8],
    start: usize,
    cluster_size: usize,
) -> Result<Vec<Extension>, HeaderError> {
    let limit = cluster_size.min(buf.len());
    let mut at = start;
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    loop {
        if at + 8 > limit {
            // An image may end its extension area at the cluster end without an end marker.
            return Ok(out);
        }
        let (Some(kind), Some(len)) = (be32(buf, at), be32(buf, at + 4)) else {
            return Ok(out);
        };
        let len = len as usize;
        if kind == extension::END {
            return Ok(out);
        }
        let data_end = (at + 8)
            .checked_add(len)
            .filter(|end| *end <= limit)
            .ok_or(HeaderError::Invalid(
                "header extension beyond the first cluster",
            ))?;
        // A set, not a scan of what was parsed: a cluster of 2 MiB holds 2^18 extensions.
        if !seen.insert(kind) && kind != extension::FEATURE_NAMES {
            return Err(HeaderError::Invalid("duplicate header extension"));
        }
        out.push(Extension {
            kind,
            data: buf[at + 8..data_end].to_vec(),
        });
        at = data_end.next_multiple_of(8);
    }
}

/// The feature name table vubd writes into images it creates (as QEMU does), so that tools
/// that do not know a feature can name it.
pub fn feature_name_table() -> Vec<u8> {
    let names: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut out = Vec::with_capacity(names.len() * 48);
    for (kind, bit, name) in names {
        let mut entry = [0u8; 48];
        entry[0] = kind;
        entry[1] = bit;
        entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
        out.extend_from_slice(&entry);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first bytes of an image made by `qemu-img create -f qcow2 -o
    /// data_file=d.raw,data_file_raw=on m.qcow2 64M` (QEMU 10.0.2), the rest of the cluster
    /// zero.
    fn qemu_raw_data_header() -> Vec<u8> {
        let hex = [
        "514649fb0000000300000000000000000000000000000010000000000400000000000000000000010000000000030000",
        "000000000001000000000001000000000000000000000000000000000000000400000000000000000000000000000002",
        "000000040000007000000000000000004441544100000005642e7261770000006803f857000001800000646972747920",
        "626974000000000000000000000000000000000000000000000000000000000000000000000000000001636f72727570",
        "74206269740000000000000000000000000000000000000000000000000000000000000000000000000265787465726e",
        "616c20646174612066696c65000000000000000000000000000000000000000000000000000000000003636f6d707265",
        "7373696f6e20747970650000000000000000000000000000000000000000000000000000000000000004657874656e64",
        "6564204c3220656e747269657300000000000000000000000000000000000000000000000000000001006c617a792072",
        "6566636f756e7473000000000000000000000000000000000000000000000000000000000000000002006269746d6170",
        "730000000000000000000000000000000000000000000000000000000000000000000000000000000201726177206578",
        "7465726e616c2064617461",
        ]
        .concat();
        let mut b: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        b.resize(65536, 0);
        b
    }

    #[test]
    fn parses_a_qemu_raw_data_file_header() {
        let h = Header::parse(&qemu_raw_data_header()).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_bits, 16);
        assert_eq!(h.size, 64 << 20);
        assert_eq!(h.l1_size, 1);
        assert_eq!(h.l1_table_offset, 0x30000);
        assert_eq!(h.refcount_table_offset, 0x10000);
        assert!(h.has_data_file() && h.data_file_raw());
        assert_eq!(h.refcount_order, 4);
        assert_eq!(h.header_length, 112);
        assert_eq!(
            h.string_extension(extension::DATA_FILE).as_deref(),
            Some("d.raw")
        );
        assert_eq!(h.extensions.len(), 2);
        assert_eq!(h.compression(), CompressionType::Zlib);
    }

    #[test]
    fn serialize_round_trips_and_keeps_unknown_extensions() {
        let mut h = Header::parse(&qemu_raw_data_header()).unwrap();
        h.set_extension(0x1234_5678, Some(vec![1, 2, 3]));
        h.backing_file = None;
        let bytes = h.serialize().unwrap();
        let mut padded = bytes.clone();
        padded.resize(65536, 0);
        let again = Header::parse(&padded).unwrap();
        assert_eq!(again, h);
        assert_eq!(again.extension(0x1234_5678), Some(&[1u8, 2, 3][..]));
    }

    #[test]
    fn refuses_what_it_cannot_handle() {
        let base = qemu_raw_data_header();
        let mut b = base.clone();
        b[0] = 0;
        assert_eq!(Header::parse(&b), Err(HeaderError::BadMagic));
        let mut b = base.clone();
        b[79] |= 0x20; // incompatible bit 5
        assert_eq!(
            Header::parse(&b),
            Err(HeaderError::UnknownIncompatible(0x20))
        );
        let mut b = base.clone();
        b[79] |= 0x10;
        assert_eq!(Header::parse(&b), Err(HeaderError::ExtendedL2));
        let mut b = base.clone();
        b[35] = 2;
        assert_eq!(Header::parse(&b), Err(HeaderError::Encrypted));
        let mut b = base.clone();
        b[23] = 22;
        assert_eq!(Header::parse(&b), Err(HeaderError::ClusterBits(22)));
        let mut b = base.clone();
        b[39] = 0; // l1_size 0 for a 64 MiB disk
        assert!(matches!(Header::parse(&b), Err(HeaderError::Invalid(_))));
        let mut b = base;
        b[0x74..0x78].copy_from_slice(&0x10000u32.to_be_bytes()); // extension runs off
        assert!(matches!(Header::parse(&b), Err(HeaderError::Invalid(_))));
    }
}
