//! Consistency check and repair, as `qemu-img check` does them.
//!
//! Every cluster the image references is counted ([`super::count`]) and compared with the
//! stored refcounts, over the clusters of the file: a stored refcount below the count is an
//! error (the cluster could be handed out twice), one above it a leak. Invalid table entries
//! and wrong COPIED flags are errors.
//!
//! Repair does what `qemu-img check -r all` does. Refcounts that exist are set to the count;
//! where the refcount structure itself is broken (a cluster in use without a refcount block,
//! a block misplaced or shared with another structure), it is rebuilt from the counts in
//! clusters nothing uses ([`super::rebuild`]), and a second pass frees the old structure.
//! No repair writes into a cluster another structure uses.

use super::count::{count_all, CopiedChecks, Counts};
use super::entry::{COPIED, OFFSET_MASK};
use super::overlap::Kind;
use super::refcount::BlockEntry;
use super::units::{HostCluster, HostOffset};
use super::{rebuild, Meta, Qcow2Error, Qcow2Node};

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

/// Check `node`; with `repair`, fix refcounts and COPIED flags, rebuilding the refcount
/// structure where it is broken.
pub fn check(node: &Qcow2Node, repair: bool) -> Result<CheckReport, Qcow2Error> {
    let mut meta = node.lock();
    let (mut report, counts, rebuild_needed) = count_and_compare(node, &mut meta, repair)?;
    if repair && (report.corruptions > 0 || report.leaks > 0) {
        if rebuild_needed {
            rebuild::rebuild_refcounts(node, &mut meta, &counts)?;
            // The old structure is now referenced by nothing: free it.
            count_and_compare(node, &mut meta, true)?;
        }
        node.write_back(&mut meta)?;
        node.meta_file.sync_data()?;
        // Check again: what is left is what could not be fixed.
        let (after, _, _) = count_and_compare(node, &mut meta, false)?;
        report.corruptions_fixed = report.corruptions.saturating_sub(after.corruptions);
        report.leaks_fixed = report.leaks.saturating_sub(after.leaks);
        report.image_end_offset = after.image_end_offset;
    }
    Ok(report)
}

/// Rebuild refcounts from the tables (an image left dirty with lazy refcounts).
pub(crate) fn repair_refcounts(node: &Qcow2Node, meta: &mut Meta) -> Result<(), Qcow2Error> {
    let (_, counts, rebuild_needed) = count_and_compare(node, meta, true)?;
    if rebuild_needed {
        rebuild::rebuild_refcounts(node, meta, &counts)?;
        count_and_compare(node, meta, true)?;
    }
    node.write_back(meta)?;
    Ok(())
}

/// Count, compare, and (with `repair`) fix what can be fixed in place. Returns the report,
/// the counts, and whether the refcount structure needs a rebuild.
fn count_and_compare(
    node: &Qcow2Node,
    meta: &mut Meta,
    repair: bool,
) -> Result<(CheckReport, Counts, bool), Qcow2Error> {
    let cluster_size = node.cluster_size();
    let file_clusters = node.meta_file.current_size()?.div_ceil(cluster_size);
    let mut report = CheckReport {
        total_clusters: node.disk_size().div_ceil(cluster_size),
        ..CheckReport::default()
    };
    let mut counts = Counts::new(node.cluster_bits, file_clusters);
    let mut copied_checks = CopiedChecks::new();
    let mut rebuild = count_all(node, meta, &mut counts, &mut report, &mut copied_checks)?;

    // Compare with the stored refcounts over the clusters of the file (as qemu-img does):
    // those something refers to, and those a refcount block describes — elsewhere both are
    // zero.
    let mut end = 0;
    let mut fixes = Vec::new();
    for (c, expected) in relevant_ranges(meta, &counts)
        .into_iter()
        .flat_map(|(start, end)| counts.each(start, end))
    {
        // A refcount that cannot be read (its block is invalid) is as good as none.
        let stored = meta
            .refcounts
            .get(&node.meta_file, HostCluster(c))
            .unwrap_or(0);
        if stored > 0 || expected > 0 {
            end = c + 1;
        }
        if stored == expected {
            continue;
        }
        if stored == 0 {
            // No refcount block to fix in place: only a rebuild helps.
            rebuild = true;
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
        if expected > meta.refcounts.max_refcount() {
            report.messages.push(format!(
                "ERROR cluster {c}: {expected} references exceed the refcount width"
            ));
            continue;
        }
        fixes.push((c, expected));
    }
    report.image_end_offset = end * cluster_size;

    // COPIED must be set exactly where the refcount is one.
    for (l1_index, l2_index, raw, host) in copied_checks.iter().copied() {
        let refcount = counts.get(host.cluster(node.cluster_bits).0);
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
                if let Err(e) = set_entry(node, meta, l1_index, l2_index, fixed) {
                    // A table another structure claims too is not written (repair never
                    // writes over metadata): the error stays.
                    report.messages.push(format!("ERROR cannot repair: {e}"));
                }
            }
        }
    }
    if repair && !rebuild {
        for (c, expected) in fixes {
            meta.refcounts
                .set(&node.meta_file, HostCluster(c), expected)?;
        }
    }
    Ok((report, counts, rebuild))
}

/// The ranges of the file's clusters that may have a reference or a refcount, in order and
/// disjoint: those the counts touched and those the refcount blocks describe.
fn relevant_ranges(meta: &Meta, counts: &Counts) -> Vec<(u64, u64)> {
    let entries = meta.refcounts.block_entries();
    let mut ranges: Vec<(u64, u64)> = counts.ranges().collect();
    for (i, entry) in meta.refcounts.entries().iter().enumerate() {
        if matches!(entry, BlockEntry::At(_) | BlockEntry::Invalid(_)) {
            let start = i as u64 * entries;
            ranges.push((start, (start + entries).min(counts.file_clusters())));
        }
    }
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (start, end) in ranges.into_iter().filter(|(s, e)| s < e) {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
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
            let at = meta.header.l1_table_offset + l1_index as u64 * 8;
            node.check_metadata_write(meta, HostOffset(at), 8, Kind::ActiveL1)?;
            meta.l1[l1_index] = raw;
            node.meta_file.write_all_at(&raw.to_be_bytes(), at)?;
        }
        Some(i) => {
            let table = HostOffset(meta.l1[l1_index] & OFFSET_MASK);
            node.check_metadata_write(meta, table, node.cluster_size(), Kind::ActiveL2)?;
            let slot = node.load_l2(meta, table, false)?;
            meta.l2.set_u64(slot, i, raw);
        }
    }
    Ok(())
}
