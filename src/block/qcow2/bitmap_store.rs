//! Storing bitmaps in the qcow2 bitmaps extension ([`BitmapStore`] for [`Qcow2Node`]).
//!
//! Every change of the stored set is one atomic switch: new data clusters, tables and
//! directory are written to fresh clusters and synced, then the header points to the new
//! directory (one write of the header's first bytes), and only then are the old structures
//! freed. A crash before the switch leaves the old set (plus leaked clusters), after it the new
//! one (plus leaked clusters): never a mix.
//!
//! For crash-consistent serving, the data clusters of recording bitmaps are all allocated,
//! all-zero ones included, and their offsets handed to the bitmap layer, which writes first
//! marks into them in place (only ever setting bits) and syncs before the guest write they
//! cover is submitted.

use crate::bitmap::{BitmapError, BitmapStore, StoreData, StoreEntry, StoredBitmap};

use super::bitmaps::{
    DirEntry, DirectoryError, FLAG_AUTO, FLAG_EXTRA_DATA_COMPATIBLE, FLAG_IN_USE,
    TYPE_DIRTY_TRACKING,
};
use super::entry::OFFSET_MASK;
use super::header::{autoclear, extension};
use super::overlap::Kind;
use super::units::{be64, HostOffset};
use super::{Meta, Qcow2Error, Qcow2Node};

/// A new bitmap set written beside the old one, its directory set in `meta.header` but not
/// yet on disk: what [`Qcow2Node::stage_bitmaps`] leaves for the header switch and
/// [`Qcow2Node::free_replaced_bitmaps`].
pub(super) struct StagedBitmaps {
    /// Per entry, its preallocated data clusters (empty unless live).
    layouts: Vec<Vec<u64>>,
    old: Vec<DirEntry>,
    /// The old directory's offset and size.
    old_dir: Option<(u64, u64)>,
    /// Tables of the old set the new one keeps.
    kept_tables: Vec<u64>,
}

/// Where a stored bitmap's table is, and (when preallocated) its data clusters.
struct Written {
    table_offset: u64,
    table_size: u32,
    clusters: Vec<u64>,
}

impl Qcow2Node {
    /// Write bitmap data into new clusters and a new table, sized for a disk of `disk_size`
    /// bytes. All-zero clusters are allocated only with `preallocate`.
    fn write_bitmap_data(
        &self,
        meta: &mut Meta,
        data: &[u8],
        granularity_bits: u32,
        preallocate: bool,
        disk_size: u64,
    ) -> Result<Written, Qcow2Error> {
        self.meta_file.event("bitmap_data")?;
        let cs = self.cluster_size() as usize;
        let entries = self.bitmap_table_size_for(disk_size, granularity_bits) as usize;
        let mut table = vec![0u8; entries * 8];
        let mut clusters = Vec::with_capacity(if preallocate { entries } else { 0 });
        for i in 0..entries {
            let chunk = &data[(i * cs).min(data.len())..((i + 1) * cs).min(data.len())];
            if !preallocate && chunk.iter().all(|b| *b == 0) {
                continue;
            }
            let offset = meta
                .refcounts
                .allocate(&self.meta_file, 1, Kind::BitmapData)?;
            let mut cluster = vec![0u8; cs];
            cluster[..chunk.len()].copy_from_slice(chunk);
            self.meta_file.write_all_at(&cluster, offset.0)?;
            table[i * 8..i * 8 + 8].copy_from_slice(&offset.0.to_be_bytes());
            if preallocate {
                clusters.push(offset.0);
            }
        }
        self.meta_file.event("bitmap_table")?;
        let table_clusters = (table.len() as u64).div_ceil(cs as u64).max(1);
        let table_offset =
            meta.refcounts
                .allocate(&self.meta_file, table_clusters, Kind::BitmapTable)?;
        table.resize((table_clusters as usize) * cs, 0);
        self.meta_file.write_all_at(&table, table_offset.0)?;
        Ok(Written {
            table_offset: table_offset.0,
            table_size: entries as u32,
            clusters,
        })
    }

    /// Free a bitmap's table and data clusters.
    fn free_bitmap(&self, meta: &mut Meta, e: &DirEntry) -> Result<(), Qcow2Error> {
        let bits = self.cluster_bits;
        let cs = self.cluster_size();
        for raw in self.read_table(e)? {
            let offset = HostOffset(raw & OFFSET_MASK);
            if !offset.is_zero() {
                meta.refcounts.map_mut().unregister(offset, cs);
                meta.refcounts
                    .adjust(&self.meta_file, offset.cluster(bits), -1)?;
            }
        }
        let table_bytes = (u64::from(e.table_size) * 8).max(1);
        let table = HostOffset(e.table_offset);
        meta.refcounts.map_mut().unregister(table, table_bytes);
        for c in table.clusters(table_bytes, bits) {
            meta.refcounts.adjust(&self.meta_file, c, -1)?;
        }
        Ok(())
    }

    /// The stored bitmap `e` as one entry of the new set: kept where its table serves (a
    /// recording bitmap needs every data cluster allocated when preallocating), copied into
    /// new clusters otherwise.
    fn keep_bitmap(
        &self,
        meta: &mut Meta,
        e: &DirEntry,
        preallocate: bool,
    ) -> Result<(Written, bool), Qcow2Error> {
        let table: Vec<u64> = self.read_table(e)?;
        let complete = table.iter().all(|raw| raw & OFFSET_MASK != 0);
        if !preallocate {
            return Ok((
                Written {
                    table_offset: e.table_offset,
                    table_size: e.table_size,
                    clusters: Vec::new(),
                },
                true,
            ));
        }
        if complete {
            let clusters = table.iter().map(|raw| raw & OFFSET_MASK).collect();
            return Ok((
                Written {
                    table_offset: e.table_offset,
                    table_size: e.table_size,
                    clusters,
                },
                true,
            ));
        }
        let data = self.read_bitmap_data(e)?;
        let written = self.write_bitmap_data(
            meta,
            &data,
            u32::from(e.granularity_bits),
            preallocate,
            self.disk_size(),
        )?;
        Ok((written, false))
    }

    /// Store exactly `entries` (plus the bitmaps vubd cannot use), as one header switch.
    fn store(
        &self,
        entries: &[StoreEntry],
        preallocate: bool,
    ) -> Result<Vec<Vec<u64>>, Qcow2Error> {
        let mut meta = self.lock();
        let staged = self.stage_bitmaps(&mut meta, entries, preallocate, self.disk_size())?;
        // New clusters and their refcounts are on disk before the header points to them.
        meta.refcounts.write_back(&self.meta_file)?;
        self.meta_file.sync_data()?;
        self.meta_file.event("bitmap_switch")?;
        self.write_header(&mut meta)?;
        // Only now are the old structures unreferenced.
        self.meta_file.event("bitmap_free")?;
        let layouts = self.free_replaced_bitmaps(&mut meta, staged)?;
        meta.refcounts.write_back(&self.meta_file)?;
        self.meta_file.sync_data()?;
        Ok(layouts)
    }

    /// Write the new set's data, tables and directory (tables sized for a disk of
    /// `disk_size` bytes) beside the old set, and point `meta.header` at the new directory;
    /// the caller writes the header, then frees the old set.
    pub(super) fn stage_bitmaps(
        &self,
        meta: &mut Meta,
        entries: &[StoreEntry],
        preallocate: bool,
        disk_size: u64,
    ) -> Result<StagedBitmaps, Qcow2Error> {
        let meta = &mut *meta;
        let (old, _) = self.read_directory(meta)?;
        let mut new: Vec<DirEntry> = Vec::with_capacity(entries.len());
        let mut layouts = Vec::with_capacity(entries.len());
        let mut kept_tables = Vec::new();
        for s in entries {
            let prior = old.iter().find(|o| o.name == s.name && o.usable());
            let live = preallocate && s.recording && !s.in_use;
            let (written, extra, compatible) = match (s.data, prior) {
                (StoreData::Keep, Some(_)) if disk_size != self.disk_size() => {
                    // A resize rewrites every bitmap: a table sized for the old disk is wrong.
                    return Err(DirectoryError::NothingToKeep(s.name.to_string()).into());
                }
                (StoreData::Keep, Some(p)) => {
                    let (written, kept) = self.keep_bitmap(meta, p, live)?;
                    if kept {
                        kept_tables.push(p.table_offset);
                    }
                    (
                        written,
                        p.extra.clone(),
                        p.flags & FLAG_EXTRA_DATA_COMPATIBLE,
                    )
                }
                (StoreData::Keep, None) => {
                    return Err(DirectoryError::NothingToKeep(s.name.to_string()).into())
                }
                (StoreData::Data(d), p) => {
                    let written =
                        self.write_bitmap_data(meta, d, s.granularity_bits, live, disk_size)?;
                    let extra = p.map(|p| p.extra.clone()).unwrap_or_default();
                    let compatible = p.map_or(0, |p| p.flags & FLAG_EXTRA_DATA_COMPATIBLE);
                    (written, extra, compatible)
                }
            };
            let mut flags = compatible;
            if s.in_use {
                flags |= FLAG_IN_USE;
            }
            if s.recording {
                flags |= FLAG_AUTO;
            }
            new.push(DirEntry {
                table_offset: written.table_offset,
                table_size: written.table_size,
                flags,
                kind: TYPE_DIRTY_TRACKING,
                granularity_bits: s.granularity_bits as u8,
                extra,
                name: s.name.to_string(),
            });
            layouts.push(if live { written.clusters } else { Vec::new() });
        }
        // Bitmaps vubd cannot use stay as they are.
        for o in old.iter().filter(|o| !o.usable()) {
            kept_tables.push(o.table_offset);
            new.push(o.clone());
        }

        let old_dir = meta
            .header
            .extension(extension::BITMAPS)
            .and_then(|ext| Some((be64(ext, 16)?, be64(ext, 8)?)));
        if new.is_empty() {
            meta.header.set_extension(extension::BITMAPS, None);
            meta.header.autoclear_features &= !autoclear::BITMAPS;
        } else {
            self.meta_file.event("bitmap_directory")?;
            let mut dir = Vec::new();
            for e in &new {
                e.encode(&mut dir);
            }
            let cs = self.cluster_size();
            let clusters = (dir.len() as u64).div_ceil(cs);
            let dir_offset =
                meta.refcounts
                    .allocate(&self.meta_file, clusters, Kind::BitmapDirectory)?;
            let mut padded = dir.clone();
            padded.resize((clusters * cs) as usize, 0);
            self.meta_file.write_all_at(&padded, dir_offset.0)?;
            let mut ext = Vec::with_capacity(24);
            ext.extend_from_slice(&(new.len() as u32).to_be_bytes());
            ext.extend_from_slice(&0u32.to_be_bytes());
            ext.extend_from_slice(&(dir.len() as u64).to_be_bytes());
            ext.extend_from_slice(&dir_offset.0.to_be_bytes());
            meta.header.set_extension(extension::BITMAPS, Some(ext));
            meta.header.autoclear_features |= autoclear::BITMAPS;
        }
        Ok(StagedBitmaps {
            layouts,
            old,
            old_dir,
            kept_tables,
        })
    }

    /// Free what the switched-away bitmap set held and the new one does not keep; returns
    /// the new set's layouts.
    pub(super) fn free_replaced_bitmaps(
        &self,
        meta: &mut Meta,
        staged: StagedBitmaps,
    ) -> Result<Vec<Vec<u64>>, Qcow2Error> {
        if let Some((offset, size)) = staged.old_dir.filter(|(_, size)| *size > 0) {
            meta.refcounts
                .map_mut()
                .unregister(HostOffset(offset), size);
            for c in HostOffset(offset).clusters(size, self.cluster_bits) {
                meta.refcounts.adjust(&self.meta_file, c, -1)?;
            }
        }
        for o in staged
            .old
            .iter()
            .filter(|o| !staged.kept_tables.contains(&o.table_offset))
        {
            self.free_bitmap(meta, o)?;
        }
        Ok(staged.layouts)
    }

    /// Write a data cluster of a live bitmap in place.
    fn write_live_cluster(&self, offset: u64, data: &[u8]) -> Result<(), Qcow2Error> {
        let meta = self.lock();
        // Only a cluster registered as bitmap data may be written this way.
        self.check_metadata_write(
            &meta,
            HostOffset(offset),
            data.len() as u64,
            Kind::BitmapData,
        )?;
        if meta
            .refcounts
            .map()
            .kind(HostOffset(offset).cluster(self.cluster_bits))
            != Kind::BitmapData
        {
            return Err(DirectoryError::NotBitmapData(offset).into());
        }
        drop(meta);
        self.meta_file.event("bitmap_commit")?;
        self.meta_file.write_all_at(data, offset)?;
        Ok(())
    }
}

fn to_bitmap_error(e: Qcow2Error) -> BitmapError {
    BitmapError::Io(crate::error::Chain(&e).to_string())
}

impl BitmapStore for Qcow2Node {
    fn load_bitmaps(&self) -> Result<Vec<StoredBitmap>, BitmapError> {
        let meta = self.lock();
        let (entries, consistent) = self.read_directory(&meta).map_err(to_bitmap_error)?;
        drop(meta);
        let mut out = Vec::new();
        for e in entries.iter().filter(|e| e.usable()) {
            let inconsistent = !consistent || e.flags & FLAG_IN_USE != 0;
            let data = if inconsistent {
                None
            } else {
                match self.read_bitmap_data(e) {
                    Ok(d) => Some(d),
                    Err(err) => {
                        log::warn!("{}: bitmap '{}': {err}", self.path.display(), e.name);
                        None
                    }
                }
            };
            out.push(StoredBitmap {
                name: e.name.clone(),
                granularity_bits: u32::from(e.granularity_bits),
                recording: e.flags & FLAG_AUTO != 0,
                inconsistent: data.is_none(),
                data,
            });
        }
        Ok(out)
    }

    fn store_bitmaps(
        &self,
        entries: &[StoreEntry],
        preallocate: bool,
    ) -> Result<Vec<Vec<u64>>, BitmapError> {
        self.store(entries, preallocate).map_err(to_bitmap_error)
    }

    fn grow_with_bitmaps(
        &self,
        disk_size: u64,
        entries: &[StoreEntry],
        preallocate: bool,
    ) -> Result<Vec<Vec<u64>>, BitmapError> {
        self.grow_disk(disk_size, Some((entries, preallocate)))
            .map_err(to_bitmap_error)
    }

    fn write_data_cluster(&self, offset: u64, data: &[u8]) -> Result<(), BitmapError> {
        self.write_live_cluster(offset, data)
            .map_err(to_bitmap_error)
    }

    fn sync_bitmaps(&self) -> Result<(), BitmapError> {
        self.meta_file
            .sync_data()
            .map_err(|e| BitmapError::Io(format!("{}: {e}", self.path.display())))
    }

    fn cannot_store(&self) -> Option<String> {
        if self.read_only {
            Some("the image is read-only".into())
        } else if self.format.version < 3 {
            Some("version 2 images cannot hold bitmaps (compat=0.10)".into())
        } else {
            None
        }
    }

    fn cluster_size(&self) -> u64 {
        Qcow2Node::cluster_size(self)
    }
}
