//! Changing what a guest cluster maps to: allocating writes (copy-on-write of the rest of the
//! cluster), write-zeroes and discards, and the crash-ordered write-back of the metadata they
//! change.
//!
//! Ordering (as QEMU's): new refcounts and copied data are synced before the L2 entries that
//! use them are written; an L2 change that drops a cluster is synced before the cluster's
//! refcount falls, and only once no request can still be doing I/O to it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::entry::{self, encode_normal, encode_zero, L2Entry};
use super::map::{pieces, Piece};
use super::overlap::Kind;
use super::units::{HostCluster, HostOffset};
use super::{Meta, Qcow2Error, Qcow2Node};
use crate::block::{GuestIo, HostZeroOp, Mapping, ZeroOp};

impl Qcow2Node {
    /// Write one piece to a guest cluster that cannot be written in place, allocating its host
    /// cluster (copy-on-write of the rest of the cluster included).
    pub(super) fn allocating_write(
        &self,
        meta: &mut Meta,
        entry: L2Entry,
        p: Piece,
        guest: GuestIo,
    ) -> Result<Mapping, Qcow2Error> {
        let cluster_size = self.cluster_size();
        let guest_offset = p.cluster.offset(self.cluster_bits);
        if self.fast.is_some() {
            // A raw data file already holds the disk's content at this offset: map it and let
            // the guest's write go there directly.
            let host = p.cluster.identity(self.cluster_bits);
            self.set_l2_entry(meta, p.cluster, encode_normal(host, true))?;
            self.note_identity(p.cluster, host);
            return Ok(Mapping::Data {
                file: self.data_fid,
                offset: host.0 + p.within,
            });
        }
        // The valid part of the cluster: the last one may extend past the disk's end.
        let valid = cluster_size.min(self.disk_size() - guest_offset) as usize;
        let mut buf = vec![0u8; cluster_size as usize];
        if p.len < valid as u64 {
            self.read_cluster(entry, p.cluster, &mut buf)?;
        }
        guest.read(0, &mut buf[p.within as usize..(p.within + p.len) as usize]);
        let (host, reused) = match entry {
            _ if self.format.external_data => (p.cluster.identity(self.cluster_bits), true),
            L2Entry::Zero {
                host: Some(host),
                copied: true,
            } => {
                self.check_data_write(meta, host, cluster_size)?;
                (host, true)
            }
            _ => (
                meta.refcounts.allocate(&self.meta_file, 1, Kind::Free)?,
                false,
            ),
        };
        self.meta_file.event("cow_write")?;
        if self.format.external_data {
            self.data_file.write_all_at(&buf[..valid], host.0)?;
        } else {
            // Copy-on-write data goes through the (buffered) image file handle: direct I/O
            // would need aligned buffers, and the kernel keeps both handles coherent.
            self.meta_file.write_all_at(&buf, host.0)?;
        }
        meta.unsynced = true;
        self.set_l2_entry(meta, p.cluster, encode_normal(host, true))?;
        if !reused {
            let freed = self.referenced_clusters(entry);
            meta.pending_free
                .extend(freed.into_iter().map(|c| (c, Kind::Free)));
        }
        Ok(Mapping::Filled)
    }

    /// Map a discard or write-zeroes: whole clusters become zero (or unallocated) entries,
    /// the rest becomes operations on the data file (or allocating writes of zeroes).
    pub(super) fn map_zeroes_locked(
        &self,
        meta: &mut Meta,
        offset: u64,
        len: u64,
        op: ZeroOp,
        out: &mut Vec<HostZeroOp>,
    ) -> Result<(), Qcow2Error> {
        let cluster_size = self.cluster_size();
        for p in pieces(offset, len, self.cluster_bits) {
            let entry = self.l2_entry(meta, p.cluster)?;
            let guest_offset = p.cluster.offset(self.cluster_bits);
            if self.fast.is_some() {
                // Raw data file: the data file itself must read as the disk does.
                if let L2Entry::Normal { host, .. } = entry {
                    out.push(HostZeroOp {
                        file: self.data_fid,
                        offset: host.0 + p.within,
                        len: p.len,
                        op,
                    });
                }
                continue;
            }
            let whole = p.within == 0 && p.len == cluster_size.min(self.disk_size() - guest_offset);
            if whole && (self.format.version >= 3 || self.backing.is_none()) {
                self.zero_whole_cluster(meta, entry, p, op)?;
                continue;
            }
            let reads_zero = match entry {
                L2Entry::Zero { .. } => true,
                L2Entry::Unallocated => self.backing.is_none(),
                _ => false,
            };
            match op {
                // Discarding part of a cluster is advisory: leave it.
                ZeroOp::Discard => {}
                ZeroOp::WriteZeroes { .. } if reads_zero => {}
                ZeroOp::WriteZeroes { .. } => match entry {
                    L2Entry::Normal { host, copied } if copied || self.format.external_data => {
                        self.check_data_write(meta, host.add(p.within), p.len)?;
                        out.push(HostZeroOp {
                            file: self.data_fid,
                            offset: host.0 + p.within,
                            len: p.len,
                            op,
                        });
                    }
                    _ => {
                        let zeroes = vec![0u8; p.len as usize];
                        let iov = [libc::iovec {
                            iov_base: zeroes.as_ptr() as *mut libc::c_void,
                            iov_len: zeroes.len(),
                        }];
                        // SAFETY: the iovec names `zeroes`, alive and only read for the call.
                        let source = unsafe { GuestIo::new(&iov) };
                        self.allocating_write(meta, entry, p, source)?;
                    }
                },
            }
        }
        Ok(())
    }

    /// Zero or discard a whole cluster through its L2 entry alone.
    fn zero_whole_cluster(
        &self,
        meta: &mut Meta,
        entry: L2Entry,
        p: Piece,
        op: ZeroOp,
    ) -> Result<(), Qcow2Error> {
        let has_zero_flag = self.format.version >= 3;
        let raw = match (op, entry) {
            (ZeroOp::Discard, _) if self.backing.is_none() => 0,
            (ZeroOp::Discard, _) => encode_zero(None, false),
            (ZeroOp::WriteZeroes { unmap: false }, L2Entry::Normal { host, copied: true })
            | (
                ZeroOp::WriteZeroes { unmap: false },
                L2Entry::Zero {
                    host: Some(host),
                    copied: true,
                },
            ) if has_zero_flag => {
                // Keep the allocation, as a write-zeroes without unmap promises.
                encode_zero(Some(host), true)
            }
            _ if has_zero_flag => encode_zero(None, false),
            _ => 0,
        };
        let kept = (raw != 0).then_some(HostOffset(raw & entry::OFFSET_MASK));
        let freed: Vec<HostCluster> = self
            .referenced_clusters(entry)
            .into_iter()
            .filter(|c| kept.map(|h| h.cluster(self.cluster_bits)) != Some(*c))
            .collect();
        self.set_l2_entry(meta, p.cluster, raw)?;
        meta.pending_free
            .extend(freed.into_iter().map(|c| (c, Kind::Free)));
        Ok(())
    }

    /// Write back the metadata caches in crash-safe order; frees dropped clusters once no I/O
    /// can still reach them.
    pub(crate) fn write_back(&self, meta: &mut Meta) -> Result<(), Qcow2Error> {
        if meta.refcounts.any_dirty() || meta.unsynced {
            meta.refcounts.write_back(&self.meta_file)?;
            if !Arc::ptr_eq(&self.data_file, &self.meta_file) {
                self.data_file.sync_data()?;
            }
            self.meta_file.sync_data()?;
            meta.unsynced = false;
        }
        if meta.l2.any_dirty() {
            meta.l2.write_back(&self.meta_file)?;
        }
        if !meta.pending_free.is_empty() && self.in_flight.load(Ordering::Acquire) == 0 {
            // The L2 entries that dropped these clusters are on disk before their refcounts
            // fall: a crash in between leaks them, it never leaves them doubly used.
            self.meta_file.sync_data()?;
            self.meta_file.event("cluster_free")?;
            for (cluster, kind) in std::mem::take(&mut meta.pending_free) {
                let offset = cluster.offset(self.cluster_bits);
                if kind == Kind::ActiveL2 {
                    meta.l2.discard(offset);
                    meta.refcounts
                        .map_mut()
                        .unregister(offset, self.cluster_size());
                }
                meta.refcounts.adjust(&self.meta_file, cluster, -1)?;
            }
            meta.refcounts.write_back(&self.meta_file)?;
        }
        Ok(())
    }
}
