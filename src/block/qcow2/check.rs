//! Consistency check and repair, as `qemu-img check` does them.
//!
//! Every cluster the image references is counted (header, L1 and L2 tables, data clusters,
//! refcount structures, snapshot tables, bitmap directory and tables) and compared with the
//! stored refcounts: a stored refcount below the count is an error (the cluster could be
//! handed out twice), one above it a leak. Invalid table entries and wrong COPIED flags are
//! errors. Repair sets every refcount to its count and fixes COPIED flags.

use super::entry::{decode_l1, L2Entry, COPIED, OFFSET_MASK};
use super::header::extension;
use super::units::{be16, be32, be64, be64_entries, HostCluster, HostOffset};
use super::{Meta, Qcow2Error, Qcow2Node};

/// What a check found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Errors: structures that are wrong.
    pub corruptions: u64,
    /// Clusters with a refcount above their number of references.
    pub leaks: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    /// One line per problem.
    pub messages: Vec<String>,
    /// Guest clusters allocated (or zero-preallocated), compressed, and in all.
    pub allocated_clusters: u64,
    pub compressed_clusters: u64,
    pub fragmented_clusters: u64,
    pub total_clusters: u64,
    /// Offset just past the last cluster in use.
    pub image_end_offset: u64,
}

impl CheckReport {
    /// The exit code `qemu-img check` would give: 0 clean, 2 errors, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.corruptions > self.corruptions_fixed {
            2
        } else if self.leaks > self.leaks_fixed {
            3
        } else {
            0
        }
    }
}

/// Reference counts the image's structures imply, per cluster.
struct Counts {
    cluster_bits: u32,
    refs: Vec<u32>,
    /// Clusters referenced past the end of the file.
    beyond_end: u64,
}

impl Counts {
    fn add(&mut self, offset: u64, len: u64, report: &mut CheckReport, what: &str) {
        if len == 0 {
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        for c in first..=last {
            match self.refs.get_mut(c as usize) {
                Some(n) => *n = n.saturating_add(1),
                None => {
                    self.beyond_end += 1;
                    report.corruptions += 1;
                    report.messages.push(format!(
                        "ERROR {what} at {offset:#x} lies beyond the end of the image"
                    ));
                    return;
                }
            }
        }
    }
}

/// Check `node`; with `repair`, fix refcounts and COPIED flags.
pub fn check(node: &Qcow2Node, repair: bool) -> Result<CheckReport, Qcow2Error> {
    let mut meta = node.lock();
    let mut report = count_and_compare(node, &mut meta, repair)?;
    if repair && (report.corruptions > 0 || report.leaks > 0) {
        node.write_back(&mut meta)?;
        node.meta_file.sync_data()?;
        // Check again: what is left is what could not be fixed.
        let after = count_and_compare(node, &mut meta, false)?;
        report.corruptions_fixed = report.corruptions.saturating_sub(after.corruptions);
        report.leaks_fixed = report.leaks.saturating_sub(after.leaks);
        report.image_end_offset = after.image_end_offset;
    }
    Ok(report)
}

/// Rebuild refcounts from the tables (an image left dirty with lazy refcounts).
pub(crate) fn repair_refcounts(node: &Qcow2Node, meta: &mut Meta) -> Result<(), Qcow2Error> {
    count_and_compare(node, meta, true)?;
    node.write_back(meta)?;
    Ok(())
}

fn count_and_compare(
    node: &Qcow2Node,
    meta: &mut Meta,
    repair: bool,
) -> Result<CheckReport, Qcow2Error> {
    let cluster_size = node.cluster_size();
    let bits = node.cluster_bits;
    let file_clusters = node.meta_file.current_size()?.div_ceil(cluster_size);
    let mut report = CheckReport {
        total_clusters: node.size.div_ceil(cluster_size),
        ..CheckReport::default()
    };
    let mut counts = Counts {
        cluster_bits: bits,
        refs: vec![0; file_clusters as usize],
        beyond_end: 0,
    };

    counts.add(0, cluster_size, &mut report, "header");
    let (rt_offset, rt_clusters) = meta.refcounts.table_location();
    counts.add(
        rt_offset.0,
        rt_clusters * cluster_size,
        &mut report,
        "refcount table",
    );
    let blocks: Vec<HostOffset> = meta.refcounts.block_offsets().collect();
    for block in blocks {
        counts.add(block.0, cluster_size, &mut report, "refcount block");
    }

    let l1_offset = meta.header.l1_table_offset;
    counts.add(l1_offset, meta.l1.len() as u64 * 8, &mut report, "L1 table");
    let active_l1 = meta.l1.clone();
    let mut copied_fixes = Vec::new();
    count_l1(
        node,
        meta,
        &active_l1,
        &mut counts,
        &mut report,
        Some(&mut copied_fixes),
    )?;
    count_snapshots(node, meta, &mut counts, &mut report)?;
    count_bitmaps(node, meta, &mut counts, &mut report)?;

    // Compare with the stored refcounts, over every cluster of the file and every cluster an
    // existing refcount block describes.
    let mut clusters: Vec<u64> = (0..file_clusters).collect();
    for range in meta.refcounts.described_ranges() {
        clusters.extend(range.filter(|c| *c >= file_clusters));
    }
    clusters.sort_unstable();
    clusters.dedup();
    let mut end = 0;
    let mut fixes = Vec::new();
    for c in clusters {
        let expected = u64::from(counts.refs.get(c as usize).copied().unwrap_or(0));
        let stored = meta.refcounts.get(&node.meta_file, HostCluster(c))?;
        if stored > 0 || expected > 0 {
            end = c + 1;
        }
        if stored == expected {
            continue;
        }
        if stored < expected {
            report.corruptions += 1;
            report.messages.push(format!(
                "ERROR cluster {c} refcount={stored} reference={expected}"
            ));
        } else {
            report.leaks += 1;
            report.messages.push(format!(
                "Leaked cluster {c} refcount={stored} reference={expected}"
            ));
        }
        fixes.push((c, expected));
    }
    report.image_end_offset = end * cluster_size;

    // COPIED must be set exactly where the refcount is one.
    for (l1_index, l2_index, raw, host) in copied_fixes.iter().copied() {
        let refcount = u64::from(
            counts
                .refs
                .get(host.cluster(bits).0 as usize)
                .copied()
                .unwrap_or(0),
        );
        let copied = raw & COPIED != 0;
        if copied != (refcount == 1) {
            report.corruptions += 1;
            report.messages.push(format!(
                "ERROR OFLAG_COPIED cluster: entry {raw:#x} refcount={refcount}"
            ));
            if repair {
                let fixed = if refcount == 1 {
                    raw | COPIED
                } else {
                    raw & !COPIED
                };
                set_entry(node, meta, l1_index, l2_index, fixed)?;
            }
        }
    }
    if repair {
        for (c, expected) in fixes {
            meta.refcounts
                .set(&node.meta_file, HostCluster(c), expected)?;
        }
    }
    Ok(report)
}

/// Fix an L1 entry (`l2_index` None) or L2 entry in place.
fn set_entry(
    node: &Qcow2Node,
    meta: &mut Meta,
    l1_index: usize,
    l2_index: Option<usize>,
    raw: u64,
) -> Result<(), Qcow2Error> {
    match l2_index {
        None => {
            meta.l1[l1_index] = raw;
            let at = meta.header.l1_table_offset + l1_index as u64 * 8;
            node.meta_file.write_all_at(&raw.to_be_bytes(), at)?;
        }
        Some(i) => {
            let table = HostOffset(meta.l1[l1_index] & OFFSET_MASK);
            let slot = node.load_l2(meta, table, false)?;
            meta.l2.set_u64(slot, i, raw);
        }
    }
    Ok(())
}

/// COPIED checks to make after counting: (L1 index, L2 index or None for the L1 entry, raw
/// entry, host cluster offset).
type CopiedChecks = Vec<(usize, Option<usize>, u64, HostOffset)>;

/// Count what an L1 table references. For the active table, collect COPIED checks and
/// allocation statistics.
fn count_l1(
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
        if table.cluster(node.cluster_bits).0 >= counts.refs.len() as u64 {
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
    let n = meta.header.nb_snapshots;
    if n == 0 {
        return Ok(());
    }
    let offset = meta.header.snapshots_offset;
    let mut at = offset;
    let mut l1_tables = Vec::new();
    for _ in 0..n {
        let mut fixed = [0u8; 40];
        node.meta_file.read_exact_at(&mut fixed, at)?;
        // The fixed part of a snapshot table entry holds every one of these fields.
        let (Some(l1_offset), Some(l1_size), Some(id_len), Some(name_len), Some(extra)) = (
            be64(&fixed, 0),
            be32(&fixed, 8),
            be16(&fixed, 12),
            be16(&fixed, 14),
            be32(&fixed, 36),
        ) else {
            unreachable!("a 40-byte snapshot entry header holds its fields");
        };
        let (id_len, name_len, extra) = (u64::from(id_len), u64::from(name_len), u64::from(extra));
        l1_tables.push((l1_offset, l1_size));
        at += (40 + extra + id_len + name_len).next_multiple_of(8);
    }
    counts.add(offset, at - offset, report, "snapshot table");
    for (l1_offset, l1_size) in l1_tables {
        counts.add(
            l1_offset,
            u64::from(l1_size) * 8,
            report,
            "snapshot L1 table",
        );
        if u64::from(l1_size) * 8 > super::header::MAX_L1_BYTES {
            report.corruptions += 1;
            report
                .messages
                .push("ERROR snapshot L1 table too large".into());
            continue;
        }
        let mut raw = vec![0u8; l1_size as usize * 8];
        node.meta_file.read_exact_at(&mut raw, l1_offset)?;
        let l1: Vec<u64> = be64_entries(&raw).collect();
        count_l1(node, meta, &l1, counts, report, None)?;
    }
    Ok(())
}

/// Count the bitmap directory, bitmap tables and bitmap data clusters.
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
    let (Some(nb), Some(dir_size), Some(dir_offset)) =
        (be32(&ext, 0), be64(&ext, 8), be64(&ext, 16))
    else {
        report.corruptions += 1;
        report
            .messages
            .push("ERROR bitmaps extension too short".into());
        return Ok(());
    };
    if dir_size > 64 << 20 {
        report.corruptions += 1;
        report
            .messages
            .push("ERROR bitmap directory too large".into());
        return Ok(());
    }
    counts.add(dir_offset, dir_size, report, "bitmap directory");
    let mut dir = vec![0u8; dir_size as usize];
    node.meta_file.read_exact_at(&mut dir, dir_offset)?;
    let mut at = 0usize;
    for _ in 0..nb {
        let (Some(table_offset), Some(table_size), Some(name_size), Some(extra)) = (
            be64(&dir, at),
            be32(&dir, at + 8),
            be16(&dir, at + 18),
            be32(&dir, at + 20),
        ) else {
            report.corruptions += 1;
            report
                .messages
                .push("ERROR bitmap directory truncated".into());
            break;
        };
        let (name_size, extra) = (usize::from(name_size), extra as usize);
        counts.add(
            table_offset,
            u64::from(table_size) * 8,
            report,
            "bitmap table",
        );
        let mut table = vec![0u8; table_size as usize * 8];
        node.meta_file.read_exact_at(&mut table, table_offset)?;
        for raw in be64_entries(&table) {
            let cluster = raw & OFFSET_MASK;
            if cluster != 0 {
                counts.add(cluster, node.cluster_size(), report, "bitmap data");
            }
        }
        at += (24 + extra + name_size).next_multiple_of(8);
    }
    Ok(())
}
