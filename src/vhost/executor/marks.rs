//! The bitmap marks of a modifying request: made before it starts, and confirmed on disk after
//! the group commit it waited for (crash-consistent bitmaps, `src/bitmap/durable.rs`).

use super::Executor;
use crate::bitmap::PendingMarks;
use crate::virtio_blk::request::{Request, RequestKind, Segment};

/// The ranges a modifying request changes: a write's own, or its segments (discard, write
/// zeroes).
fn changed_ranges(
    req: Request,
    segments: &[Segment],
) -> impl Iterator<Item = (u64, u64)> + Clone + '_ {
    let (write, segments) = match req.kind {
        RequestKind::Write { offset, len } => (Some((offset, len)), &[][..]),
        _ => (None, segments),
    };
    write
        .into_iter()
        .chain(segments.iter().map(|seg| (seg.offset, seg.len)))
}

impl Executor {
    /// Mark what the modifying request `req` changes in every recording bitmap; returns the
    /// group commit it must wait for, if any.
    pub(super) fn mark(&mut self, slot_index: u32, req: Request) -> Option<PendingMarks> {
        let ranges = changed_ranges(req, &self.slots[slot_index as usize].bufs.segments);
        self.device
            .export()
            .bitmaps()
            .mark_ranges(&mut self.bitmap_cursor, ranges)
    }

    /// Whether the marks `req` waited for are on disk now that their commit completed.
    pub(super) fn confirm(&mut self, slot_index: u32, req: Request, pending: PendingMarks) -> bool {
        let ranges = changed_ranges(req, &self.slots[slot_index as usize].bufs.segments);
        self.device
            .export()
            .bitmaps()
            .confirm(&mut self.bitmap_cursor, ranges, pending)
    }
}
