//! The bitmap marks of a modifying request: made before it starts, and confirmed on disk after
//! the group commit it waited for (crash-consistent bitmaps, `src/bitmap/durable.rs`).

use super::Executor;
use crate::bitmap::PendingMarks;
use crate::virtio_blk::request::{Request, RequestKind};

impl Executor {
    /// Mark what the modifying request `req` changes in every recording bitmap; returns the
    /// group commit it must wait for, if any.
    pub(super) fn mark(&mut self, slot_index: u32, req: Request) -> Option<PendingMarks> {
        let bitmaps = self.device.export().bitmaps();
        match req.kind {
            RequestKind::Write { offset, len } => {
                bitmaps.mark(&mut self.bitmap_cursor, offset, len)
            }
            _ => {
                let segments = &self.slots[slot_index as usize].bufs.segments;
                bitmaps.mark_ranges(
                    &mut self.bitmap_cursor,
                    segments.iter().map(|seg| (seg.offset, seg.len)),
                )
            }
        }
    }

    /// Whether the marks `req` waited for are on disk now that their commit completed.
    pub(super) fn confirm(&mut self, slot_index: u32, req: Request, pending: PendingMarks) -> bool {
        let bitmaps = self.device.export().bitmaps();
        match req.kind {
            RequestKind::Write { offset, len } => bitmaps.confirm(
                &mut self.bitmap_cursor,
                std::iter::once((offset, len)),
                pending,
            ),
            _ => {
                let segments = &self.slots[slot_index as usize].bufs.segments;
                bitmaps.confirm(
                    &mut self.bitmap_cursor,
                    segments.iter().map(|seg| (seg.offset, seg.len)),
                    pending,
                )
            }
        }
    }
}
