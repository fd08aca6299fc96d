//! Growing the virtual disk (QMP `block_resize`, `vubd resize`).
//!
//! The spec keeps the disk's size in the header (bytes 24–31) and needs the L1 table to cover
//! it (`l1_size` entries at `l1_table_offset`, bytes 36–47); a bitmap's table must have the
//! entries its granularity needs on that size. So everything that depends on the size is
//! written beside the old structures first — an external data file grown, a larger L1 table
//! copied into fresh clusters, the bitmaps' new tables and directory — and one header write
//! switches to all of it at once. A crash before that write leaves the old disk (and leaked
//! clusters, which `check` reclaims); after it, the new one. Only then is the old L1 table
//! freed. Shrinking is refused, as it would drop guest data.
//!
//! The raw-data-file fast path grows its map with the disk: clusters past the old end take it
//! as soon as they are allocated.

use std::sync::atomic::Ordering;

use super::bitmap_store::StagedBitmaps;
use super::header::MAX_L1_BYTES;
use super::overlap::Kind;
use super::units::HostOffset;
use super::{Meta, Qcow2Error, Qcow2Node};
use crate::bitmap::StoreEntry;

/// Why a disk cannot grow to the size asked.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("cannot shrink the disk from {from} to {to} bytes: vubd only grows disks")]
    Shrink { from: u64, to: u64 },
    #[error("the new size {0} is not a multiple of 512 bytes")]
    Unaligned(u64),
    #[error("a disk of {0} bytes needs an L1 table larger than QEMU's limit of 32 MiB")]
    TooLarge(u64),
    #[error("the image stores dirty bitmaps; resize it while served (block_resize) or with 'vubd resize', which grow them too")]
    StoredBitmaps,
}

impl Qcow2Node {
    /// Grow the disk to `size` bytes; with `bitmaps`, store exactly that set (sized for the
    /// new size, preallocated if asked) in the same header switch, and return its layouts as
    /// [`crate::bitmap::BitmapStore::store_bitmaps`] does.
    pub(super) fn grow_disk(
        &self,
        size: u64,
        bitmaps: Option<(&[StoreEntry], bool)>,
    ) -> Result<Vec<Vec<u64>>, Qcow2Error> {
        self.writable()?;
        let mut meta = self.lock();
        if bitmaps.is_none() && self.read_directory(&meta)?.0.iter().any(|e| e.usable()) {
            // Their tables would no longer fit the size: the bitmap layer grows them with it.
            return Err(ResizeError::StoredBitmaps.into());
        }
        let old = self.disk_size();
        if size < old {
            return Err(ResizeError::Shrink {
                from: old,
                to: size,
            }
            .into());
        }
        if !size.is_multiple_of(512) {
            return Err(ResizeError::Unaligned(size).into());
        }
        let l1_entries = size
            .div_ceil(self.cluster_size())
            .div_ceil(self.l2_entries());
        if l1_entries * 8 > MAX_L1_BYTES {
            return Err(ResizeError::TooLarge(size).into());
        }
        // A raw external data file holds the disk byte for byte: it grows first, so that the
        // switch never points past its end.
        if self.format.external_data {
            self.data_file.grow_to(size)?;
        }
        // Undone if anything fails before the switch: the header and L1 in memory.
        let (header, l1) = (meta.header.clone(), meta.l1.clone());
        let staged = self.stage_growth(&mut meta, size, l1_entries, bitmaps);
        let (old_l1, staged) = match staged {
            Ok(staged) => staged,
            Err(e) => {
                meta.header = header;
                meta.l1 = l1;
                return Err(e);
            }
        };
        if let Err(e) = self.meta_file.event("resize_switch") {
            meta.header = header;
            meta.l1 = l1;
            return Err(e.into());
        }
        // Once the header write is attempted, the file may hold the new header even if the
        // write or its sync failed: memory keeps the new state, and a failure that a second
        // attempt does not cure leaves the node refusing writes (none may go where the old
        // header, if that is what the file holds, does not look).
        if let Err(e) = self.write_header(&mut meta) {
            log::warn!(
                "{}: writing the resized header: {e}; retrying",
                self.path.display()
            );
            if let Err(e) = self.write_header(&mut meta) {
                self.header_unknown.store(true, Ordering::Release);
                self.size.store(size, Ordering::Release);
                log::error!(
                    "{}: {}: {e}",
                    self.path.display(),
                    Qcow2Error::HeaderUnknown
                );
                return Err(e);
            }
        }
        if let Some(fast) = &self.fast {
            fast.grow(size);
        }
        self.size.store(size, Ordering::Release);
        log::info!("{}: grown from {old} to {size} bytes", self.path.display());
        // Only now is the old L1 table unreferenced.
        if let Some((offset, bytes)) = old_l1 {
            self.free_clusters(&mut meta, HostOffset(offset), bytes)?;
        }
        let layouts = match staged {
            Some(staged) => self.free_replaced_bitmaps(&mut meta, staged)?,
            None => Vec::new(),
        };
        meta.refcounts.write_back(&self.meta_file)?;
        self.meta_file.sync_data()?;
        Ok(layouts)
    }

    /// Write what the new size needs beside the old structures and set `meta.header` (not on
    /// disk yet) to it: a larger L1 table if the old one does not cover `l1_entries`, and the
    /// bitmaps. Returns where the old L1 table was, if replaced, and the staged bitmaps.
    #[allow(clippy::type_complexity)]
    fn stage_growth(
        &self,
        meta: &mut Meta,
        size: u64,
        l1_entries: u64,
        bitmaps: Option<(&[StoreEntry], bool)>,
    ) -> Result<(Option<(u64, u64)>, Option<StagedBitmaps>), Qcow2Error> {
        let mut old_l1 = None;
        if l1_entries > meta.l1.len() as u64 {
            let old_bytes = meta.l1.len() as u64 * 8;
            let bytes = l1_entries * 8;
            let clusters = bytes.div_ceil(self.cluster_size());
            self.meta_file.event("resize_l1")?;
            let at = meta
                .refcounts
                .allocate(&self.meta_file, clusters, Kind::ActiveL1)?;
            let mut table = Vec::with_capacity((clusters * self.cluster_size()) as usize);
            meta.l1.resize(l1_entries as usize, 0);
            for entry in &meta.l1 {
                table.extend_from_slice(&entry.to_be_bytes());
            }
            table.resize((clusters * self.cluster_size()) as usize, 0);
            self.meta_file.write_all_at(&table, at.0)?;
            // An image of no L1 entries has no table to free.
            old_l1 = (old_bytes > 0).then_some((meta.header.l1_table_offset, old_bytes));
            meta.header.l1_table_offset = at.0;
            meta.header.l1_size = l1_entries as u32;
        }
        meta.header.size = size;
        let staged = match bitmaps {
            Some((entries, preallocate)) => {
                Some(self.stage_bitmaps(meta, entries, preallocate, size)?)
            }
            None => None,
        };
        // Everything new, and its refcounts, is on disk before the header points to it.
        meta.refcounts.write_back(&self.meta_file)?;
        self.meta_file.sync_data()?;
        Ok((old_l1, staged))
    }

    /// Drop one reference to each cluster of `[offset, offset + bytes)`, a structure no
    /// longer referenced.
    fn free_clusters(
        &self,
        meta: &mut Meta,
        offset: HostOffset,
        bytes: u64,
    ) -> Result<(), Qcow2Error> {
        meta.refcounts.map_mut().unregister(offset, bytes);
        for c in offset.clusters(bytes, self.cluster_bits) {
            meta.refcounts.adjust(&self.meta_file, c, -1)?;
        }
        Ok(())
    }
}
