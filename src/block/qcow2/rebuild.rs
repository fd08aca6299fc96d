//! Rebuilding the refcount structure from counted references, as `qemu-img check -r all`
//! does when the structure itself is broken (a cluster in use that no refcount block
//! describes, a block misplaced or shared with another structure).
//!
//! The new blocks and table go at the end of the file, past every cluster the counts show in
//! use, so nothing is written over anything; the header then switches to the new table. Only
//! ranges holding a cluster in use get a block. The
//! old structure is leaked (the new one still counts it), and the caller's next repair pass
//! frees it.

use std::collections::BTreeSet;

use super::count::Counts;
use super::refcount::{write_entry, BlockEntry, Refcounts};
use super::units::HostCluster;
use super::{Meta, Qcow2Error, Qcow2Node};

/// Header bytes holding `refcount_table_offset` (8) and `refcount_table_clusters` (4).
const HEADER_REFTABLE_FIELDS: u64 = 48;

/// Write a new refcount structure holding `counts` and switch the image to it.
pub(super) fn rebuild_refcounts(
    node: &Qcow2Node,
    meta: &mut Meta,
    counts: &Counts,
) -> Result<(), Qcow2Error> {
    let bits = node.cluster_bits;
    let cluster_size = node.cluster_size();
    let order = meta.refcounts.order();
    let entries = meta.refcounts.block_entries();
    let max = meta.refcounts.max_refcount();
    // Everything new goes past the file's end: the blocks for every range holding a cluster in
    // use (the new structure included), then the table. Ranges with nothing in use get no
    // block, so a sparse file costs what it uses.
    let area = node.meta_file.current_size()?.div_ceil(cluster_size);
    let used_blocks: BTreeSet<u64> = counts.in_use().map(|c| c / entries).collect();
    let mut new_clusters = 1u64;
    let (blocks, table_clusters) = loop {
        let mut blocks = used_blocks.clone();
        blocks.extend(area / entries..=(area + new_clusters - 1) / entries);
        let table_entries = blocks.last().map_or(0, |b| b + 1);
        let table_clusters = (table_entries * 8).div_ceil(cluster_size);
        if table_clusters * cluster_size > super::header::MAX_REFTABLE_BYTES {
            return Err(Qcow2Error::RefcountTableFull);
        }
        let needed = blocks.len() as u64 + table_clusters;
        if needed <= new_clusters {
            break (blocks, table_clusters);
        }
        new_clusters = needed;
    };
    let first_new = area;
    let end_new = area + blocks.len() as u64 + table_clusters;
    let refcount = |c: u64| -> u64 {
        if (first_new..end_new).contains(&c) {
            1
        } else {
            counts.get(c).min(max)
        }
    };
    let mut table = vec![0u8; (table_clusters * cluster_size) as usize];
    let mut block = vec![0u8; cluster_size as usize];
    for (k, b) in blocks.iter().enumerate() {
        block.fill(0);
        for i in 0..entries {
            let value = refcount(b * entries + i);
            if value > 0 {
                write_entry(&mut block, order, i, value);
            }
        }
        let at = HostCluster(first_new + k as u64).offset(bits);
        node.meta_file.write_all_at(&block, at.0)?;
        let slot = (b * 8) as usize;
        table[slot..slot + 8].copy_from_slice(&at.0.to_be_bytes());
    }
    let table_offset = HostCluster(first_new + blocks.len() as u64).offset(bits);
    node.meta_file.write_all_at(&table, table_offset.0)?;
    node.meta_file.sync_data()?;
    // The new structure is complete on disk before the header points to it.
    let mut fields = [0u8; 12];
    fields[..8].copy_from_slice(&table_offset.0.to_be_bytes());
    fields[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
    node.meta_file
        .write_all_at(&fields, HEADER_REFTABLE_FIELDS)?;
    node.meta_file.sync_data()?;
    meta.header.refcount_table_offset = table_offset.0;
    meta.header.refcount_table_clusters = table_clusters as u32;

    // Load the new structure; the old one's clusters are ordinary leaked clusters now.
    let (old_table, old_clusters) = meta.refcounts.table_location();
    let old_blocks: Vec<BlockEntry> = meta.refcounts.entries().to_vec();
    let mut map = std::mem::take(meta.refcounts.map_mut());
    map.unregister(old_table, old_clusters * cluster_size);
    for entry in old_blocks {
        if let BlockEntry::At(offset) = entry {
            map.unregister(offset, cluster_size);
        }
    }
    meta.refcounts = Refcounts::load(
        &node.meta_file,
        bits,
        order,
        table_offset,
        table_clusters,
        super::open::REFCOUNT_CACHE_TABLES,
        map,
    )?;
    log::info!(
        "{}: rebuilt the refcount structure ({} blocks, table at {:#x})",
        node.path.display(),
        blocks.len(),
        table_offset.0
    );
    Ok(())
}
