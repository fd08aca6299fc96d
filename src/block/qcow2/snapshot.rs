//! The snapshot table (docs/interop/qcow2.txt, "Snapshots"), read for what it references:
//! the table itself and each snapshot's L1 table. vubd serves the active state only; it never
//! creates, deletes or applies snapshots, but it must know where they are so that nothing is
//! written over them.
//!
//! Every size is bounded before it is used, with QEMU's limits: at most 65536 snapshots, a
//! table of at most 64 MiB, 1 KiB of extra data per entry, L1 tables of at most 32 MiB.

use thiserror::Error;

use super::header::MAX_L1_BYTES;
use super::units::{be16, be32, be64, HostOffset};
use crate::block::file::FileNode;

/// QEMU's `QCOW_MAX_SNAPSHOTS`.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// QEMU's `QCOW_MAX_SNAPSHOTS_SIZE`.
pub const MAX_TABLE_BYTES: u64 = 1024 * MAX_SNAPSHOTS as u64;
/// QEMU's `QCOW_MAX_SNAPSHOT_EXTRA_DATA`.
const MAX_EXTRA_DATA: u32 = 1024;
/// Fixed part of a snapshot table entry.
const ENTRY_HEADER: usize = 40;

/// What is wrong with a snapshot table.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("{0} snapshots exceed the limit of {MAX_SNAPSHOTS}")]
    TooMany(u32),
    #[error("the snapshot table at {0:#x} is not cluster aligned or lies outside the image")]
    BadTableOffset(u64),
    #[error("the snapshot table is truncated or larger than {MAX_TABLE_BYTES} bytes")]
    BadTableSize,
    #[error("snapshot {0}: extra data of {1} bytes exceeds {MAX_EXTRA_DATA}")]
    ExtraData(u32, u32),
    #[error("snapshot {0}: invalid L1 table (offset {1:#x}, {2} entries)")]
    BadL1(u32, u64, u32),
}

/// One snapshot's L1 table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotL1 {
    pub offset: HostOffset,
    /// Entries.
    pub size: u32,
}

/// Where the snapshot table and the snapshots' L1 tables are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotTable {
    pub offset: HostOffset,
    /// Bytes the table takes.
    pub len: u64,
    pub l1_tables: Vec<SnapshotL1>,
}

/// Read the table of `count` snapshots at `offset` of `file` (`cluster_bits` for alignment).
pub fn read_table(
    file: &FileNode,
    offset: u64,
    count: u32,
    cluster_bits: u32,
) -> Result<SnapshotTable, SnapshotError> {
    if count == 0 {
        return Ok(SnapshotTable::default());
    }
    if count > MAX_SNAPSHOTS {
        return Err(SnapshotError::TooMany(count));
    }
    let file_size = file.size().max(file.current_size().unwrap_or(0));
    if !offset.is_multiple_of(1 << cluster_bits) || offset == 0 || offset >= file_size {
        return Err(SnapshotError::BadTableOffset(offset));
    }
    // The table's size is only known once its entries are parsed: read it in growing pieces,
    // never past the file or QEMU's limit.
    let limit = MAX_TABLE_BYTES.min(file_size - offset) as usize;
    let mut buf = Vec::new();
    let fill = |buf: &mut Vec<u8>, need: usize| -> Result<(), SnapshotError> {
        if need <= buf.len() {
            return Ok(());
        }
        if need > limit {
            return Err(SnapshotError::BadTableSize);
        }
        let new_len = need.max(buf.len() * 2).max(4096).min(limit);
        let old_len = buf.len();
        buf.resize(new_len, 0);
        file.read_exact_at(&mut buf[old_len..], offset + old_len as u64)
            .map_err(|_| SnapshotError::BadTableSize)
    };
    let mut at = 0usize;
    let mut l1_tables = Vec::with_capacity(count as usize);
    for i in 0..count {
        fill(&mut buf, at + ENTRY_HEADER)?;
        let fields = (|| {
            Some((
                be64(&buf, at)?,
                be32(&buf, at + 8)?,
                be16(&buf, at + 12)?,
                be16(&buf, at + 14)?,
                be32(&buf, at + 36)?,
            ))
        })();
        let Some((l1_offset, l1_size, id_len, name_len, extra)) = fields else {
            return Err(SnapshotError::BadTableSize);
        };
        if extra > MAX_EXTRA_DATA {
            return Err(SnapshotError::ExtraData(i, extra));
        }
        let l1_bytes = u64::from(l1_size) * 8;
        if !l1_offset.is_multiple_of(1 << cluster_bits)
            || l1_bytes > MAX_L1_BYTES
            || (l1_size > 0 && (l1_offset == 0 || l1_offset.saturating_add(l1_bytes) > file_size))
        {
            return Err(SnapshotError::BadL1(i, l1_offset, l1_size));
        }
        l1_tables.push(SnapshotL1 {
            offset: HostOffset(l1_offset),
            size: l1_size,
        });
        let entry = ENTRY_HEADER + extra as usize + usize::from(id_len) + usize::from(name_len);
        // The entry must be there; its padding need not (QEMU writes the table unpadded at
        // the end of the file).
        fill(&mut buf, at + entry)?;
        at = (at + entry).next_multiple_of(8);
    }
    Ok(SnapshotTable {
        offset: HostOffset(offset),
        len: at as u64,
        l1_tables,
    })
}
