//! The qcow2 bitmaps extension (docs/interop/qcow2.txt, "Bitmaps extension" and "Bitmaps"):
//! reading and checking the directory and tables. Storing is in `bitmap_store.rs`.
//!
//! The extension points to a bitmap directory; each directory entry points to a bitmap table,
//! whose entries point to clusters of bitmap data (or say "all zeroes" / "all ones"). Storing
//! always writes new clusters and a new directory, switches the header over, and only then
//! frees the old clusters, so a crash at any point leaves a consistent image (at worst with
//! leaked clusters). Bitmaps vubd cannot use (unknown type, extra data without the
//! `extra_data_compatible` flag) are carried over untouched.

use crate::bitmap::{
    MAX_BITMAPS, MAX_BITMAP_BYTES, MAX_GRANULARITY_BITS, MAX_NAME_BYTES, MIN_GRANULARITY_BITS,
};

use thiserror::Error;

use super::entry::OFFSET_MASK;
use super::header::{autoclear, extension};
use super::overlap::Kind;
use super::units::{be16, be32, be64, be64_entries, HostOffset};
use super::{Meta, Qcow2Error, Qcow2Node};

/// Directory entry flags.
pub(super) const FLAG_IN_USE: u32 = 1 << 0;
pub(super) const FLAG_AUTO: u32 = 1 << 1;
pub(super) const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
const FLAGS_KNOWN: u32 = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE;
/// The only bitmap type: dirty tracking.
pub(super) const TYPE_DIRTY_TRACKING: u8 = 1;
/// Fixed part of a directory entry.
const ENTRY_HEADER: usize = 24;
/// QEMU's limit on the directory size.
pub(super) const MAX_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS as u64;
/// [`MAX_BITMAPS`] for counting loops.
pub(super) const MAX_BITMAPS_U32: u32 = MAX_BITMAPS as u32;
/// QEMU's limit on bitmap table entries.
pub(super) const MAX_TABLE_ENTRIES: u64 = 0x800_0000;
/// Bitmap table entry bit 0 with no offset: the cluster reads as all ones.
const TABLE_ALL_ONES: u64 = 1;

/// One bitmap directory entry. Byte offsets: table offset 0, table size 8, flags 12, type 16,
/// granularity bits 17, name size 18, extra data size 20, then extra data, name, padding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct DirEntry {
    pub table_offset: u64,
    pub table_size: u32,
    pub flags: u32,
    pub kind: u8,
    pub granularity_bits: u8,
    pub extra: Vec<u8>,
    pub name: String,
}

impl DirEntry {
    fn encoded_len(&self) -> usize {
        (ENTRY_HEADER + self.extra.len() + self.name.len()).next_multiple_of(8)
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.table_offset.to_be_bytes());
        out.extend_from_slice(&self.table_size.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.push(self.kind);
        out.push(self.granularity_bits);
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(self.name.as_bytes());
        out.resize(start + self.encoded_len(), 0);
    }

    /// Whether vubd may use (load, mark, rewrite the data of) this bitmap.
    pub fn usable(&self) -> bool {
        self.kind == TYPE_DIRTY_TRACKING
            && (self.extra.is_empty() || self.flags & FLAG_EXTRA_DATA_COMPATIBLE != 0)
            && (MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS)
                .contains(&u32::from(self.granularity_bits))
    }
}

/// What is wrong with a bitmap directory (qcow2 corruption; bitmap names are quoted).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DirectoryError {
    #[error("extension too short")]
    ExtensionTooShort,
    #[error("invalid bitmap count {0}")]
    BadCount(u32),
    #[error("invalid directory size or offset")]
    BadDirectory,
    #[error("truncated entry")]
    TruncatedEntry,
    #[error("invalid entry name or extra data size")]
    BadNameOrExtra,
    #[error("bitmap name is not UTF-8")]
    NameNotUtf8,
    #[error("invalid entry for bitmap '{0}'")]
    BadEntry(String),
    #[error("wrong table size for bitmap '{0}'")]
    WrongTableSize(String),
    #[error("table too large for bitmap '{0}'")]
    TableTooLarge(String),
    #[error("duplicate bitmap name '{0}'")]
    DuplicateName(String),
    #[error("bitmap '{0}' is too large")]
    BitmapTooLarge(String),
    #[error("invalid table entry {raw:#x} of bitmap '{name}'")]
    BadTableEntry { raw: u64, name: String },
    #[error("bitmap '{0}' has no stored data to keep")]
    NothingToKeep(String),
    #[error("{0:#x} is not a bitmap data cluster")]
    NotBitmapData(u64),
}

/// A directory entry's fixed fields, read from `dir` at `at` (the caller checked that
/// `ENTRY_HEADER` bytes are there).
fn entry_fields(dir: &[u8], at: usize) -> Option<(u64, u32, u32, u8, u8, u16, u32)> {
    Some((
        be64(dir, at)?,
        be32(dir, at + 8)?,
        be32(dir, at + 12)?,
        *dir.get(at + 16)?,
        *dir.get(at + 17)?,
        be16(dir, at + 18)?,
        be32(dir, at + 20)?,
    ))
}

impl Qcow2Node {
    /// Bytes of data a bitmap of this granularity has.
    fn bitmap_bytes(&self, granularity_bits: u32) -> u64 {
        self.disk_size().div_ceil(1 << granularity_bits).div_ceil(8)
    }

    /// Bitmap table entries a bitmap of this granularity needs.
    pub(super) fn bitmap_table_size(&self, granularity_bits: u32) -> u64 {
        self.bitmap_table_size_for(self.disk_size(), granularity_bits)
    }

    /// Bitmap table entries a bitmap of this granularity needs on a disk of `disk_size` bytes.
    pub(super) fn bitmap_table_size_for(&self, disk_size: u64, granularity_bits: u32) -> u64 {
        disk_size
            .div_ceil(1 << granularity_bits)
            .div_ceil(8)
            .div_ceil(self.cluster_size())
    }

    /// Parse and check the bitmap directory; also whether the extension is marked consistent.
    pub(super) fn read_directory(&self, meta: &Meta) -> Result<(Vec<DirEntry>, bool), Qcow2Error> {
        let Some(ext) = meta.header.extension(extension::BITMAPS) else {
            return Ok((Vec::new(), true));
        };
        let (Some(nb), Some(reserved), Some(dir_size), Some(dir_offset)) =
            (be32(ext, 0), be32(ext, 4), be64(ext, 8), be64(ext, 16))
        else {
            return Err(DirectoryError::ExtensionTooShort.into());
        };
        if nb == 0 || nb as usize > MAX_BITMAPS || reserved != 0 {
            return Err(DirectoryError::BadCount(nb).into());
        }
        if dir_size > MAX_DIRECTORY_BYTES
            || !dir_offset.is_multiple_of(self.cluster_size())
            || !self.inside_file(dir_offset, dir_size)
        {
            return Err(DirectoryError::BadDirectory.into());
        }
        let mut dir = vec![0u8; dir_size as usize];
        self.meta_file.read_exact_at(&mut dir, dir_offset)?;
        let mut entries: Vec<DirEntry> = Vec::with_capacity(nb as usize);
        let mut at = 0usize;
        for _ in 0..nb {
            let Some((
                table_offset,
                table_size,
                flags,
                kind,
                granularity_bits,
                name_size,
                extra_size,
            )) = entry_fields(&dir, at)
            else {
                return Err(DirectoryError::TruncatedEntry.into());
            };
            let (name_size, extra_size) = (usize::from(name_size), extra_size as usize);
            let end = at + ENTRY_HEADER + extra_size + name_size;
            if name_size == 0 || name_size > MAX_NAME_BYTES || end > dir.len() {
                return Err(DirectoryError::BadNameOrExtra.into());
            }
            let e = DirEntry {
                table_offset,
                table_size,
                flags,
                kind,
                granularity_bits,
                extra: dir[at + ENTRY_HEADER..at + ENTRY_HEADER + extra_size].to_vec(),
                name: String::from_utf8(dir[at + ENTRY_HEADER + extra_size..end].to_vec())
                    .map_err(|_| DirectoryError::NameNotUtf8)?,
            };
            if !e.table_offset.is_multiple_of(self.cluster_size()) || e.flags & !FLAGS_KNOWN != 0 {
                return Err(DirectoryError::BadEntry(e.name).into());
            }
            if e.usable()
                && u64::from(e.table_size) != self.bitmap_table_size(u32::from(e.granularity_bits))
            {
                return Err(DirectoryError::WrongTableSize(e.name).into());
            }
            if u64::from(e.table_size) > MAX_TABLE_ENTRIES {
                return Err(DirectoryError::TableTooLarge(e.name).into());
            }
            // QEMU's constraints hold for every bitmap it could use, in use or not.
            if e.usable() && self.bitmap_bytes(u32::from(e.granularity_bits)) > MAX_BITMAP_BYTES {
                return Err(DirectoryError::BitmapTooLarge(e.name).into());
            }
            if entries.iter().any(|o| o.name == e.name) {
                return Err(DirectoryError::DuplicateName(e.name).into());
            }
            at = (end).next_multiple_of(8);
            entries.push(e);
        }
        let consistent = meta.header.autoclear_features & autoclear::BITMAPS != 0;
        Ok((entries, consistent))
    }

    pub(super) fn read_table(&self, e: &DirEntry) -> Result<Vec<u64>, Qcow2Error> {
        let bytes = u64::from(e.table_size) * 8;
        if u64::from(e.table_size) > MAX_TABLE_ENTRIES || !self.inside_file(e.table_offset, bytes) {
            return Err(DirectoryError::TableTooLarge(e.name.clone()).into());
        }
        let mut raw = vec![0u8; bytes as usize];
        self.meta_file.read_exact_at(&mut raw, e.table_offset)?;
        Ok(be64_entries(&raw).collect())
    }

    /// Whether `[offset, offset + len)` lies inside the image file.
    fn inside_file(&self, offset: u64, len: u64) -> bool {
        let size = self.meta_file.current_size().unwrap_or(0);
        offset.checked_add(len).is_some_and(|end| end <= size)
    }

    /// The clusters the bitmaps extension takes: directory, tables, data.
    pub(super) fn bitmap_clusters(
        &self,
        meta: &Meta,
    ) -> Result<Vec<(HostOffset, u64, Kind)>, Qcow2Error> {
        let mut out = Vec::new();
        let Some((dir_offset, dir_size)) = meta
            .header
            .extension(extension::BITMAPS)
            .and_then(|ext| Some((be64(ext, 16)?, be64(ext, 8)?)))
        else {
            return Ok(out);
        };
        let (entries, _) = self.read_directory(meta)?;
        out.push((HostOffset(dir_offset), dir_size, Kind::BitmapDirectory));
        let cs = self.cluster_size();
        for e in &entries {
            let table = self.read_table(e)?;
            out.push((
                HostOffset(e.table_offset),
                u64::from(e.table_size) * 8,
                Kind::BitmapTable,
            ));
            for raw in table {
                let offset = raw & OFFSET_MASK;
                if offset != 0 {
                    out.push((HostOffset(offset), cs, Kind::BitmapData));
                }
            }
        }
        Ok(out)
    }

    /// The data of a usable, consistent bitmap.
    pub(super) fn read_bitmap_data(&self, e: &DirEntry) -> Result<Vec<u8>, Qcow2Error> {
        let bytes = self.bitmap_bytes(u32::from(e.granularity_bits));
        if bytes > MAX_BITMAP_BYTES {
            return Err(DirectoryError::BitmapTooLarge(e.name.clone()).into());
        }
        let cs = self.cluster_size() as usize;
        let mut data = vec![0u8; bytes as usize];
        let mut scratch = vec![0u8; cs.min(bytes as usize)];
        for (i, raw) in self.read_table(e)?.into_iter().enumerate() {
            let chunk = &mut data[(i * cs).min(bytes as usize)..((i + 1) * cs).min(bytes as usize)];
            let offset = raw & OFFSET_MASK;
            if raw & !OFFSET_MASK & !TABLE_ALL_ONES != 0
                || (offset != 0 && raw & TABLE_ALL_ONES != 0)
            {
                return Err(DirectoryError::BadTableEntry {
                    raw,
                    name: e.name.clone(),
                }
                .into());
            }
            if offset != 0 {
                // Read into a scratch cluster and copy only what is not zero: `data` is
                // allocated zeroed, and its clean stretches then take no memory (vubd
                // preallocates every cluster of a recording bitmap, mostly zeros).
                let scratch = &mut scratch[..chunk.len()];
                self.meta_file.read_exact_at(scratch, offset)?;
                if !is_zero(scratch) {
                    chunk.copy_from_slice(scratch);
                }
            } else if raw & TABLE_ALL_ONES != 0 {
                chunk.fill(0xff);
            }
        }
        Ok(data)
    }
}

/// Whether every byte of `bytes` is zero, 64 at a time (a 1 TiB disk has 16 MiB of bitmap data
/// for 8 bitmaps at 64 KiB granularity, read at every open).
fn is_zero(bytes: &[u8]) -> bool {
    let (blocks, rest) = bytes.as_chunks::<64>();
    blocks
        .iter()
        .all(|b| b.iter().fold(0, |acc, &x| acc | x) == 0)
        && rest.iter().all(|&x| x == 0)
}
