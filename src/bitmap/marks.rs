//! The write path's side of the bitmaps: marking what a write changes in every recording
//! bitmap, and, for crash-consistent bitmaps, what it must wait for before it reaches the disk.

use std::sync::atomic::Ordering;

use super::{durable, BitmapCursor, BitmapManager};

/// What a write whose marks are not on disk yet waits for ([`BitmapManager::mark`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingMarks {
    /// The group commit that makes them durable.
    pub epoch: u64,
    /// The generation they were marked with.
    marked: u64,
    /// The manager's generation then: which tracks recorded them.
    tracks: u64,
}

impl BitmapManager {
    /// Mark `[offset, offset + len)` in every recording bitmap. Returns what the write must
    /// wait for, if some of its granules are not on disk yet (crash-consistent bitmaps);
    /// `None` if it may go ahead. No lock is taken unless the list changed since the cursor
    /// last looked, or a commit is needed.
    #[inline]
    pub fn mark(&self, cursor: &mut BitmapCursor, offset: u64, len: u64) -> Option<PendingMarks> {
        self.mark_ranges(cursor, std::iter::once((offset, len)))
    }

    /// [`Self::mark`] for a request that changes several ranges: one wait for all of them.
    pub fn mark_ranges(
        &self,
        cursor: &mut BitmapCursor,
        ranges: impl Iterator<Item = (u64, u64)> + Clone,
    ) -> Option<PendingMarks> {
        let generation = self.generation.load(Ordering::Acquire);
        if generation != cursor.generation {
            *cursor = self.cursor();
        }
        let mut settled = true;
        for (b, track) in &cursor.recording {
            match track {
                Some(track) => {
                    settled = settled
                        && ranges
                            .clone()
                            .all(|(offset, len)| track.settled(b, offset, len));
                }
                None => {
                    for (offset, len) in ranges.clone() {
                        b.mark(offset, len);
                    }
                }
            }
        }
        if settled {
            return None;
        }
        // Every tracked bitmap takes the slow path, so that one generation confirms them all.
        let tracked = || {
            cursor
                .recording
                .iter()
                .filter_map(|(b, t)| Some((b, t.as_ref()?)))
        };
        for (b, track) in tracked() {
            for (offset, len) in ranges.clone() {
                track.begin_mark(b, offset, len);
            }
        }
        let marked = durable::next_generation();
        for (b, track) in tracked() {
            for (offset, len) in ranges.clone() {
                track.end_mark(b, offset, len, marked);
            }
        }
        let committer = self.committer.as_ref()?;
        Some(PendingMarks {
            epoch: committer.request(),
            marked,
            tracks: cursor.generation,
        })
    }

    /// After the group commit `pending` waited for: whether the marks of the ranges are on
    /// disk. If not, the commit failed, and the write must fail rather than reach the disk
    /// unrecorded.
    pub fn confirm(
        &self,
        cursor: &mut BitmapCursor,
        ranges: impl Iterator<Item = (u64, u64)> + Clone,
        pending: PendingMarks,
    ) -> bool {
        let generation = self.generation.load(Ordering::Acquire);
        if generation != cursor.generation {
            *cursor = self.cursor();
        }
        let tracked = cursor
            .recording
            .iter()
            .filter_map(|(b, t)| Some((b, t.as_ref()?)));
        if cursor.generation == pending.tracks {
            tracked.into_iter().all(|(b, track)| {
                ranges
                    .clone()
                    .all(|(offset, len)| track.durable_since(b, offset, len, pending.marked))
            })
        } else {
            // The tracks were replaced since (a store, which holds what memory held): what
            // they say now is all there is.
            tracked.into_iter().all(|(b, track)| {
                ranges
                    .clone()
                    .all(|(offset, len)| track.settled(b, offset, len))
            })
        }
    }

    /// Whether the group commit `epoch` has completed. The write that waited for it must then
    /// [`Self::confirm`] its marks: if they are still not on disk, the commit failed.
    #[inline]
    pub fn committed(&self, epoch: u64) -> bool {
        self.committer
            .as_ref()
            .is_none_or(|c| c.completed() >= epoch)
    }
}
