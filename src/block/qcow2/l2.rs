//! L1 and L2 tables: finding a guest cluster's L2 entry, changing it, and allocating (or
//! copying, when shared with a snapshot) the L2 table that holds it. Tables live in the
//! node's [`super::cache::TableCache`]; a dirty table evicted from it is written back after
//! the refcounts and data it may depend on.

use super::entry::{decode_l1, L2Entry, COPIED};
use super::overlap::Kind;
use super::units::{GuestCluster, HostOffset};
use super::{Meta, Qcow2Error, Qcow2Node};

impl Qcow2Node {
    /// Load the L2 table at `offset` into the cache (zeroed, for a `fresh` table); returns
    /// its cache slot.
    pub(super) fn load_l2(
        &self,
        meta: &mut Meta,
        offset: HostOffset,
        fresh: bool,
    ) -> Result<usize, Qcow2Error> {
        let Meta {
            l2,
            refcounts,
            unsynced,
            ..
        } = meta;
        let meta_file = &self.meta_file;
        let data_file = &self.data_file;
        l2.load(meta_file, offset, fresh, &mut |off, data| {
            if refcounts.any_dirty() || *unsynced {
                refcounts.write_back(meta_file)?;
                data_file.sync_data()?;
                meta_file.sync_data()?;
                *unsynced = false;
            }
            meta_file.write_all_at(data, off.0)?;
            Ok(())
        })
    }

    /// The cache slot of the L2 table for `l1_index`: `None` if there is none and `allocate`
    /// is false. With `allocate`, a missing or shared table is (copied and) replaced by a new
    /// one owned by this L1 entry.
    fn l2_slot(
        &self,
        meta: &mut Meta,
        l1_index: u64,
        allocate: bool,
    ) -> Result<Option<usize>, Qcow2Error> {
        let raw = *meta
            .l1
            .get(l1_index as usize)
            .ok_or(Qcow2Error::BeyondL1(l1_index))?;
        let entry =
            decode_l1(raw, self.cluster_bits).map_err(|e| Qcow2Error::InvalidL1Entry(e.0))?;
        match entry.table {
            Some(table) if !allocate => return self.load_l2(meta, table, false).map(Some),
            Some(table) if entry.copied => {
                // About to be changed: it must not be a structure another one claims too.
                self.check_metadata_write(meta, table, self.cluster_size(), Kind::ActiveL2)?;
                return self.load_l2(meta, table, false).map(Some);
            }
            None if !allocate => return Ok(None),
            _ => {}
        }
        let l1_at = meta.header.l1_table_offset + l1_index * 8;
        self.check_metadata_write(meta, HostOffset(l1_at), 8, Kind::ActiveL1)?;
        let old = match entry.table {
            Some(table) => {
                let slot = self.load_l2(meta, table, false)?;
                Some(meta.l2.bytes(slot).to_vec())
            }
            None => None,
        };
        let new = meta
            .refcounts
            .allocate(&self.meta_file, 1, Kind::ActiveL2)?;
        let slot = self.load_l2(meta, new, true)?;
        if let Some(old) = &old {
            meta.l2.bytes_mut(slot).copy_from_slice(old);
        }
        // The table and its refcount reach the disk before the L1 entry points to it.
        self.meta_file.event("l2_alloc_write")?;
        self.meta_file.write_all_at(meta.l2.bytes(slot), new.0)?;
        meta.refcounts.write_back(&self.meta_file)?;
        self.meta_file.sync_data()?;
        meta.l1[l1_index as usize] = new.0 | COPIED;
        self.meta_file.event("l1_update")?;
        self.meta_file
            .write_all_at(&(new.0 | COPIED).to_be_bytes(), l1_at)?;
        if let Some(table) = entry.table {
            meta.pending_free
                .push((table.cluster(self.cluster_bits), Kind::ActiveL2));
        }
        self.load_l2(meta, new, false).map(Some)
    }

    /// Refuse to write a `kind` structure at `[offset, offset + len)` that another structure
    /// claims too (a corrupt image): the write would damage the other.
    pub(super) fn check_metadata_write(
        &self,
        meta: &Meta,
        offset: HostOffset,
        len: u64,
        kind: Kind,
    ) -> Result<(), Qcow2Error> {
        match meta.refcounts.map().metadata_overlap(offset, len, kind) {
            Some((cluster, other)) => Err(Qcow2Error::MetadataOverlap {
                offset: cluster.offset(self.cluster_bits).0,
                kind: other,
            }),
            None => Ok(()),
        }
    }

    /// The L2 entry of guest cluster `cluster`.
    pub(super) fn l2_entry(
        &self,
        meta: &mut Meta,
        cluster: GuestCluster,
    ) -> Result<L2Entry, Qcow2Error> {
        let entries = self.l2_entries();
        let Some(slot) = self.l2_slot(meta, cluster.l1_index(entries), false)? else {
            return Ok(L2Entry::Unallocated);
        };
        let raw = meta.l2.get_u64(slot, cluster.l2_index(entries));
        let entry = self
            .format
            .decode_l2(raw)
            .map_err(|e| Qcow2Error::InvalidL2Entry { raw: e.0, cluster })?;
        // In an external data file every cluster lives at its own guest offset.
        if let Some(host) = entry.allocated_host() {
            if self.format.external_data && host != cluster.identity(self.cluster_bits) {
                return Err(Qcow2Error::MisplacedExternalData { raw, cluster });
            }
        }
        Ok(entry)
    }

    /// Set the raw L2 entry of guest cluster `cluster` (in the cache; written back later),
    /// allocating its L2 table if needed.
    pub(super) fn set_l2_entry(
        &self,
        meta: &mut Meta,
        cluster: GuestCluster,
        raw: u64,
    ) -> Result<(), Qcow2Error> {
        let entries = self.l2_entries();
        let slot = self
            .l2_slot(meta, cluster.l1_index(entries), true)?
            .ok_or(Qcow2Error::BeyondL1(cluster.l1_index(entries)))?;
        meta.l2.set_u64(slot, cluster.l2_index(entries), raw);
        Ok(())
    }
}
