//! Counting references: every cluster the image's structures use (header, L1 and L2 tables,
//! data, refcount structures, snapshot tables, bitmap directory, tables and data), as
//! `qemu-img check` counts them, into in-memory refcounts of the file's clusters. Structures
//! reaching past the end of the file are errors, counted no further. The counts are kept in
//! chunks allocated where something is referenced, so memory follows what the image uses, not
//! the file's length: a sparse file of a few TiB whose last cluster holds data costs one chunk.

use std::collections::BTreeMap;

use super::check::CheckReport;
use super::entry::{decode_l1, L2Entry};
use super::refcount::BlockEntry;
use super::snapshot;
use super::units::{be16, be32, be64, be64_entries, HostOffset};
use super::{Meta, Qcow2Error, Qcow2Node};
use crate::block::qcow2::header::extension;

/// log2 of the clusters per chunk of counts (256 KiB of counts per chunk).
const CHUNK_BITS: u32 = 16;

/// Reference counts the image's structures imply, per cluster of the file.
pub(super) struct Counts {
    cluster_bits: u32,
    /// Clusters of the file: a reference at or past it is an error.
    file_clusters: u64,
    chunks: BTreeMap<u64, Box<[u32]>>,
}

impl Counts {
    pub fn new(cluster_bits: u32, file_clusters: u64) -> Self {
        Counts {
            cluster_bits,
            file_clusters,
            chunks: BTreeMap::new(),
        }
    }

    pub fn file_clusters(&self) -> u64 {
        self.file_clusters
    }

    /// The computed refcount of `cluster` (zero where nothing refers to it).
    pub fn get(&self, cluster: u64) -> u64 {
        self.chunks
            .get(&(cluster >> CHUNK_BITS))
            .map_or(0, |chunk| {
                u64::from(chunk[(cluster & chunk_mask()) as usize])
            })
    }

    /// The counts of the clusters in `[start, end)`, in order, one chunk lookup per chunk.
    pub fn each(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let chunk_size = 1u64 << CHUNK_BITS;
        let first = start >> CHUNK_BITS;
        let last = end.saturating_sub(1) >> CHUNK_BITS;
        (first..=last)
            .filter(move |_| start < end)
            .flat_map(move |k| {
                let chunk = self.chunks.get(&k);
                let from = start.max(k * chunk_size);
                let to = end.min((k + 1) * chunk_size);
                (from..to).map(move |c| {
                    let n = chunk.map_or(0, |chunk| chunk[(c & chunk_mask()) as usize]);
                    (c, u64::from(n))
                })
            })
    }

    /// The clusters something refers to, in order.
    pub fn in_use(&self) -> impl Iterator<Item = u64> + '_ {
        self.chunks.iter().flat_map(|(k, chunk)| {
            chunk
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(move |(i, _)| (k << CHUNK_BITS) + i as u64)
        })
    }

    /// The ranges `[start, end)` of clusters that may have references, in order.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.chunks.keys().map(|k| {
            let start = k << CHUNK_BITS;
            (start, (start + (1 << CHUNK_BITS)).min(self.file_clusters))
        })
    }

    /// Count one more reference to every cluster of `[offset, offset + len)`.
    pub fn add(&mut self, offset: u64, len: u64, report: &mut CheckReport, what: &str) {
        if len == 0 {
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = offset.saturating_add(len - 1) >> self.cluster_bits;
        if last >= self.file_clusters {
            report.corruptions += 1;
            report.messages.push(format!(
                "ERROR {what} at {offset:#x} lies beyond the end of the image"
            ));
        }
        for c in first..(last + 1).min(self.file_clusters) {
            let chunk = self
                .chunks
                .entry(c >> CHUNK_BITS)
                .or_insert_with(|| vec![0; 1 << CHUNK_BITS].into_boxed_slice());
            let n = &mut chunk[(c & chunk_mask()) as usize];
            *n = n.saturating_add(1);
        }
    }
}

fn chunk_mask() -> u64 {
    (1 << CHUNK_BITS) - 1
}

/// Count every structure of the image. Returns whether the refcount structure itself is
/// broken (a refcount block misplaced or shared), which only a rebuild can fix.
pub(super) fn count_all(
    node: &Qcow2Node,
    meta: &mut Meta,
    counts: &mut Counts,
    report: &mut CheckReport,
    copied: &mut CopiedChecks,
) -> Result<bool, Qcow2Error> {
    let cluster_size = node.cluster_size();
    counts.add(0, cluster_size, report, "header");
    let l1_offset = meta.header.l1_table_offset;
    counts.add(l1_offset, meta.l1.len() as u64 * 8, report, "L1 table");
    let active_l1 = meta.l1.clone();
    count_l1(node, meta, &active_l1, counts, report, Some(copied))?;
    count_snapshots(node, meta, counts, report)?;
    count_bitmaps(node, meta, counts, report)?;
    let (table_offset, table_clusters) = meta.refcounts.table_location();
    counts.add(
        table_offset.0,
        table_clusters * cluster_size,
        report,
        "refcount table",
    );
    Ok(count_refblocks(node, meta, counts, report))
}

/// Count the refcount blocks; a block that is misaligned, outside the image, or referenced
/// more than once means the refcount structure must be rebuilt.
fn count_refblocks(
    node: &Qcow2Node,
    meta: &Meta,
    counts: &mut Counts,
    report: &mut CheckReport,
) -> bool {
    let cluster_size = node.cluster_size();
    let mut rebuild = false;
    let entries: Vec<BlockEntry> = meta.refcounts.entries().to_vec();
    for (i, entry) in entries.iter().enumerate() {
        match *entry {
            BlockEntry::Absent => {}
            BlockEntry::Invalid(raw) => {
                report.corruptions += 1;
                report.messages.push(format!(
                    "ERROR refcount block {i} at {raw:#x} is not cluster aligned or lies outside the image"
                ));
                rebuild = true;
            }
            BlockEntry::At(offset) => {
                counts.add(offset.0, cluster_size, report, "refcount block");
            }
        }
    }
    for (i, entry) in entries.iter().enumerate() {
        if let BlockEntry::At(offset) = entry {
            let n = counts.get(offset.cluster(node.cluster_bits).0);
            if n != 1 {
                report.corruptions += 1;
                report
                    .messages
                    .push(format!("ERROR refcount block {i} refcount={n}"));
                rebuild = true;
            }
        }
    }
    rebuild
}

/// COPIED checks to make after counting: (L1 index, L2 index or None for the L1 entry, raw
/// entry, host cluster offset).
pub(super) type CopiedChecks = Vec<(usize, Option<usize>, u64, HostOffset)>;

/// Count what an L1 table references. For the active table, collect COPIED checks and
/// allocation statistics.
pub(super) fn count_l1(
    node: &Qcow2Node,
    meta: &mut Meta,
    l1: &[u64],
    counts: &mut Counts,
    report: &mut CheckReport,
    mut active: Option<&mut CopiedChecks>,
) -> Result<(), Qcow2Error> {
    let cluster_size = node.cluster_size();
    let entries = node.l2_entries() as usize;
    let mut last_host: Option<HostOffset> = None;
    for (l1_index, &raw_l1) in l1.iter().enumerate() {
        let table = match decode_l1(raw_l1, node.cluster_bits) {
            Ok(entry) => entry.table,
            Err(_) => {
                report.corruptions += 1;
                report
                    .messages
                    .push(format!("ERROR invalid L1 entry {raw_l1:#x}"));
                continue;
            }
        };
        let Some(table) = table else {
            continue;
        };
        counts.add(table.0, cluster_size, report, "L2 table");
        if let Some(checks) = active.as_deref_mut() {
            checks.push((l1_index, None, raw_l1, table));
        }
        if table.cluster(node.cluster_bits).0 >= counts.file_clusters() {
            continue;
        }
        let slot = node.load_l2(meta, table, false)?;
        let raw_entries: Vec<u64> = (0..entries).map(|i| meta.l2.get_u64(slot, i)).collect();
        for (l2_index, raw) in raw_entries.into_iter().enumerate() {
            let guest_cluster = (l1_index * entries + l2_index) as u64;
            if guest_cluster >= report.total_clusters.max(1) && raw == 0 {
                continue;
            }
            let entry = match node.format.decode_l2(raw) {
                Ok(e) => e,
                Err(_) => {
                    report.corruptions += 1;
                    report.messages.push(format!(
                        "ERROR invalid L2 entry {raw:#x} for guest cluster {guest_cluster}"
                    ));
                    continue;
                }
            };
            let is_active = active.is_some();
            match entry {
                L2Entry::Normal { host, .. }
                | L2Entry::Zero {
                    host: Some(host), ..
                } => {
                    if is_active {
                        report.allocated_clusters += 1;
                        if last_host.is_some_and(|h| h.add(cluster_size) != host) {
                            report.fragmented_clusters += 1;
                        }
                        last_host = Some(host);
                    }
                    if !node.format.external_data {
                        counts.add(host.0, cluster_size, report, "data cluster");
                        if let Some(checks) = active.as_deref_mut() {
                            checks.push((l1_index, Some(l2_index), raw, host));
                        }
                    }
                }
                L2Entry::Compressed { .. } => {
                    if is_active {
                        report.allocated_clusters += 1;
                        report.compressed_clusters += 1;
                    }
                    for host in node.referenced_clusters(entry) {
                        let offset = host.offset(node.cluster_bits).0;
                        counts.add(offset, cluster_size, report, "compressed cluster");
                    }
                }
                L2Entry::Zero { host: None, .. } | L2Entry::Unallocated => {}
            }
        }
    }
    Ok(())
}

/// Count the snapshot table and what each snapshot's L1 table references.
fn count_snapshots(
    node: &Qcow2Node,
    meta: &mut Meta,
    counts: &mut Counts,
    report: &mut CheckReport,
) -> Result<(), Qcow2Error> {
    let table = match snapshot::read_table(
        &node.meta_file,
        meta.header.snapshots_offset,
        meta.header.nb_snapshots,
        node.cluster_bits,
    ) {
        Ok(table) => table,
        Err(e) => {
            report.corruptions += 1;
            report.messages.push(format!("ERROR snapshot table: {e}"));
            return Ok(());
        }
    };
    counts.add(table.offset.0, table.len, report, "snapshot table");
    for l1 in &table.l1_tables {
        let bytes = u64::from(l1.size) * 8;
        counts.add(l1.offset.0, bytes, report, "snapshot L1 table");
        let mut raw = vec![0u8; bytes as usize];
        node.meta_file.read_exact_at(&mut raw, l1.offset.0)?;
        let entries: Vec<u64> = be64_entries(&raw).collect();
        count_l1(node, meta, &entries, counts, report, None)?;
    }
    Ok(())
}

/// Count the bitmap directory, bitmap tables and bitmap data clusters, reading no structure
/// larger than the file or QEMU's limits.
fn count_bitmaps(
    node: &Qcow2Node,
    meta: &mut Meta,
    counts: &mut Counts,
    report: &mut CheckReport,
) -> Result<(), Qcow2Error> {
    let Some(ext) = meta
        .header
        .extension(extension::BITMAPS)
        .map(|e| e.to_vec())
    else {
        return Ok(());
    };
    let error = |report: &mut CheckReport, what: String| {
        report.corruptions += 1;
        report.messages.push(format!("ERROR {what}"));
    };
    let (Some(nb), Some(dir_size), Some(dir_offset)) =
        (be32(&ext, 0), be64(&ext, 8), be64(&ext, 16))
    else {
        error(report, "bitmaps extension too short".into());
        return Ok(());
    };
    let file_size = node.meta_file.current_size()?;
    let inside = |offset: u64, len: u64| offset.checked_add(len).is_some_and(|e| e <= file_size);
    if dir_size > super::bitmaps::MAX_DIRECTORY_BYTES || !inside(dir_offset, dir_size) {
        error(
            report,
            "bitmap directory too large or outside the image".into(),
        );
        return Ok(());
    }
    counts.add(dir_offset, dir_size, report, "bitmap directory");
    let mut dir = vec![0u8; dir_size as usize];
    node.meta_file.read_exact_at(&mut dir, dir_offset)?;
    let mut at = 0usize;
    for _ in 0..nb.min(super::bitmaps::MAX_BITMAPS_U32) {
        let (Some(table_offset), Some(table_size), Some(name_size), Some(extra)) = (
            be64(&dir, at),
            be32(&dir, at + 8),
            be16(&dir, at + 18),
            be32(&dir, at + 20),
        ) else {
            error(report, "bitmap directory truncated".into());
            break;
        };
        let (name_size, extra) = (usize::from(name_size), extra as usize);
        let table_bytes = u64::from(table_size) * 8;
        counts.add(table_offset, table_bytes, report, "bitmap table");
        if u64::from(table_size) > super::bitmaps::MAX_TABLE_ENTRIES
            || !inside(table_offset, table_bytes)
        {
            error(
                report,
                format!("bitmap table at {table_offset:#x} too large or outside the image"),
            );
        } else {
            let mut table = vec![0u8; table_bytes as usize];
            node.meta_file.read_exact_at(&mut table, table_offset)?;
            for raw in be64_entries(&table) {
                let data = HostOffset(raw & super::entry::OFFSET_MASK);
                if !data.is_zero() {
                    counts.add(data.0, node.cluster_size(), report, "bitmap data");
                }
            }
        }
        at = at
            .saturating_add(24 + extra + name_size)
            .next_multiple_of(8);
    }
    Ok(())
}
