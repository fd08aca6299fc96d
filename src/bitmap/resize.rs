//! Growing every bitmap with the disk (an online resize): the same bits over a larger disk,
//! and, for persistent bitmaps, tables sized for it, stored in the same switch that grows the
//! image ([`BitmapStore::grow_with_bitmaps`]), so that a crash never leaves bitmaps of one size
//! in an image of another.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{BitmapError, BitmapManager, DirtyBitmap, Persistence, StoreEntry};
use super::{DRAIN_TIMEOUT, MAX_BITMAP_BYTES};
use crate::block::BlockDriver;
use crate::error::Chain;

impl BitmapManager {
    /// Grow `node`, the disk these bitmaps cover, to `size` bytes, and every bitmap with it:
    /// with no write in flight (the gate drained), in one switch on disk. Refused while a
    /// bitmap is busy (exported over NBD) or inconsistent, or if one would outgrow QEMU's
    /// limit; on any error the disk and the bitmaps keep their size.
    pub fn resize(&self, size: u64, node: &dyn BlockDriver) -> Result<(), BitmapError> {
        let _ops = self.lock_ops();
        let old = self.disk_size();
        if size < old {
            return Err(BitmapError::Invalid(format!(
                "cannot shrink the disk from {old} to {size} bytes: vubd only grows disks"
            )));
        }
        if size == old {
            return Ok(());
        }
        let list = self.snapshot();
        for b in list.iter() {
            if self.is_busy(b.name()) {
                return Err(BitmapError::Busy(b.name().to_string()));
            }
            if b.is_inconsistent() {
                return Err(BitmapError::Invalid(format!(
                    "Bitmap '{}' is inconsistent; remove it (block-dirty-bitmap-remove) before \
                     resizing",
                    b.name()
                )));
            }
            if size.div_ceil(b.granularity()).div_ceil(8) > MAX_BITMAP_BYTES {
                return Err(BitmapError::Invalid(format!(
                    "Bitmap '{}' would need more than {} MiB of data at {size} bytes; remove it \
                     or use a larger granularity",
                    b.name(),
                    MAX_BITMAP_BYTES >> 20
                )));
            }
        }
        let _drained = self
            .gate
            .drain(DRAIN_TIMEOUT)
            .map_err(|_| BitmapError::Io("timed out waiting for writes in flight".into()))?;
        let grown: Vec<Arc<DirtyBitmap>> = list.iter().map(|b| Arc::new(b.grown(size))).collect();
        let persistent: Vec<&Arc<DirtyBitmap>> =
            grown.iter().filter(|b| b.is_persistent()).collect();
        let store = self.store.as_ref().filter(|_| !self.read_only);
        match store {
            Some(store) if !persistent.is_empty() => {
                // No group commit writes in place while the directory switches.
                let _switching = self.store_lock.lock().unwrap_or_else(|p| p.into_inner());
                let live = self.committer.is_some();
                let datas: Vec<Vec<u8>> = persistent.iter().map(|b| b.to_bytes()).collect();
                let entries: Vec<StoreEntry> = persistent
                    .iter()
                    .zip(&datas)
                    // Saved on close: in use while served, as QEMU keeps them.
                    .map(|(b, data)| {
                        StoreEntry::of(b, self.persistence == Persistence::OnClose, Some(data))
                    })
                    .collect();
                match store.grow_with_bitmaps(size, &entries, live) {
                    Ok(layouts) => {
                        self.publish(grown.clone());
                        if live {
                            self.install_tracks(store.as_ref(), &persistent, layouts);
                        }
                    }
                    Err(e) if node.size() == size => {
                        // Switched, then failed freeing the old structures: the disk and the
                        // bitmaps on it are the new ones. Memory follows, and no mark goes in
                        // place until a store succeeds.
                        self.publish(grown.clone());
                        self.refuse_marks(&persistent);
                        self.disk_size.store(size, Ordering::Release);
                        return Err(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            _ => {
                node.grow(size)
                    .map_err(|e| BitmapError::Io(Chain(&e).to_string()))?;
                self.publish(grown.clone());
            }
        }
        self.disk_size.store(size, Ordering::Release);
        Ok(())
    }
}
