//! Where an image's metadata lies: the map of metadata clusters built when the image is
//! opened (see [`super::overlap`]), from the header, the active L1 table and its L2 tables,
//! the snapshot table and the snapshots' L1 tables. The refcount structures register
//! themselves when they are loaded, the bitmaps once the node can read its directory.

use super::entry::decode_l1;
use super::header::Header;
use super::overlap::{Kind, MetadataMap};
use super::snapshot::SnapshotTable;
use super::units::HostOffset;
use super::{Meta, Qcow2Node};

/// The map of the header, the active L1 table and its L2 tables, and the snapshots' tables.
/// Structures that lie (partly) past `file_size` are left out: they cannot be read, and an
/// access to them fails on its own.
pub(super) fn active_metadata(
    header: &Header,
    l1: &[u64],
    snapshots: &SnapshotTable,
    file_size: u64,
) -> MetadataMap {
    let bits = header.cluster_bits;
    let cluster_size = 1u64 << bits;
    let mut map = MetadataMap::new(bits);
    let add = |map: &mut MetadataMap, offset: u64, len: u64, kind: Kind| {
        if len > 0 && offset.checked_add(len).is_some_and(|end| end <= file_size) {
            map.register(HostOffset(offset), len, kind);
        }
    };
    add(&mut map, 0, cluster_size, Kind::Header);
    add(
        &mut map,
        header.l1_table_offset,
        l1.len() as u64 * 8,
        Kind::ActiveL1,
    );
    for raw in l1 {
        if let Ok(entry) = decode_l1(*raw, bits) {
            if let Some(table) = entry.table {
                add(&mut map, table.0, cluster_size, Kind::ActiveL2);
            }
        }
    }
    add(
        &mut map,
        snapshots.offset.0,
        snapshots.len,
        Kind::SnapshotTable,
    );
    for l1 in &snapshots.l1_tables {
        add(
            &mut map,
            l1.offset.0,
            u64::from(l1.size) * 8,
            Kind::InactiveL1,
        );
    }
    map
}

impl Qcow2Node {
    /// Register the bitmap directory, tables and data clusters. A directory that cannot be
    /// read is left out: loading the bitmaps reads it again and fails with the reason (so an
    /// export refuses the image), and `vubd check` reports it.
    pub(super) fn register_bitmaps(&self, meta: &mut Meta) {
        match self.bitmap_clusters(meta) {
            Ok(ranges) => {
                let file_size = self.meta_file.current_size().unwrap_or(0);
                for (offset, len, kind) in ranges {
                    if offset
                        .0
                        .checked_add(len)
                        .is_some_and(|end| end <= file_size)
                    {
                        meta.refcounts.map_mut().register(offset, len, kind);
                    }
                }
            }
            Err(e) => log::debug!(
                "{}: bitmaps not checked for overlaps: {}",
                self.path.display(),
                crate::error::Chain(&e)
            ),
        }
    }
}
