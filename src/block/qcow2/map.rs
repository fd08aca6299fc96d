//! Mapping guest ranges to extents: reads (allocated, zero, backing, compressed clusters) and
//! writes to clusters that can be written in place. Everything here runs under the metadata
//! lock; the data I/O of the extents it returns happens after, without it.

use std::io;
use std::sync::atomic::Ordering;

use super::compress;
use super::entry::L2Entry;
use super::units::{GuestCluster, HostCluster, HostOffset};
use super::{Meta, Qcow2Error, Qcow2Node};
use crate::block::file::FileNode;
use crate::block::{Extent, GuestIo, IoTicket, Mapping};

/// One piece of a request within a single guest cluster.
#[derive(Clone, Copy, Debug)]
pub(super) struct Piece {
    pub cluster: GuestCluster,
    /// Offset inside the cluster.
    pub within: u64,
    pub len: u64,
    /// Offset of the piece inside the request.
    pub at: u64,
}

/// Cut `[offset, offset + len)` at guest cluster boundaries.
pub(super) fn pieces(offset: u64, len: u64, cluster_bits: u32) -> impl Iterator<Item = Piece> {
    let cluster_size = 1u64 << cluster_bits;
    let mut at = 0u64;
    std::iter::from_fn(move || {
        if at >= len {
            return None;
        }
        let pos = offset + at;
        let within = pos & (cluster_size - 1);
        let n = (cluster_size - within).min(len - at);
        let piece = Piece {
            cluster: GuestCluster::containing(pos, cluster_bits),
            within,
            len: n,
            at,
        };
        at += n;
        Some(piece)
    })
}

/// Append `extent`, merging it into the previous one when they continue each other.
pub(super) fn push_extent(out: &mut Vec<Extent>, extent: Extent) {
    if let Some(last) = out.last_mut() {
        let merged = match (last.mapping, extent.mapping) {
            (Mapping::Data { file: a, offset: o }, Mapping::Data { file: b, offset: p }) => {
                a == b && o + last.len == p
            }
            (Mapping::Zero, Mapping::Zero) | (Mapping::Filled, Mapping::Filled) => true,
            _ => false,
        };
        if merged {
            last.len += extent.len;
            return;
        }
    }
    out.push(extent);
}

/// Read into `buf` at `offset`, zero-filling what lies past the end of the file.
fn read_up_to(file: &FileNode, buf: &mut [u8], offset: HostOffset) -> io::Result<()> {
    let end = file.current_size()?;
    let n = end.saturating_sub(offset.0).min(buf.len() as u64) as usize;
    file.read_exact_at(&mut buf[..n], offset.0)?;
    buf[n..].fill(0);
    Ok(())
}

impl Qcow2Node {
    /// Read the whole guest-visible content of a cluster whose L2 entry is `entry`.
    pub(super) fn read_cluster(
        &self,
        entry: L2Entry,
        cluster: GuestCluster,
        buf: &mut [u8],
    ) -> Result<(), Qcow2Error> {
        let guest_offset = cluster.offset(self.cluster_bits);
        match entry {
            L2Entry::Normal { host, .. } => read_up_to(&self.data_file, buf, host)?,
            L2Entry::Zero { .. } => buf.fill(0),
            L2Entry::Unallocated => match &self.backing {
                Some(b) if guest_offset < b.size => {
                    let n = (b.size - guest_offset).min(buf.len() as u64) as usize;
                    b.node.read_at(guest_offset, &mut buf[..n])?;
                    buf[n..].fill(0);
                }
                _ => buf.fill(0),
            },
            L2Entry::Compressed { host, len } => {
                let mut input = vec![0u8; len as usize];
                read_up_to(&self.meta_file, &mut input, host)?;
                compress::decompress(self.compression, &input, buf)
                    .ok_or(Qcow2Error::BadCompressedCluster(host))?;
            }
        }
        Ok(())
    }

    /// Host clusters of the image file an entry holds a reference to (data file clusters are
    /// not refcounted).
    pub(super) fn referenced_clusters(&self, entry: L2Entry) -> Vec<HostCluster> {
        if self.format.external_data {
            return Vec::new();
        }
        match entry {
            L2Entry::Compressed { host, len } => host.clusters(len, self.cluster_bits).collect(),
            _ => entry
                .allocated_host()
                .map(|host| host.cluster(self.cluster_bits))
                .into_iter()
                .collect(),
        }
    }

    /// Map reads of unallocated clusters to the backing node (zeroes past its end).
    fn map_backing(
        &self,
        offset: u64,
        len: u64,
        guest: GuestIo,
        out: &mut Vec<Extent>,
    ) -> Result<(), Qcow2Error> {
        let Some(b) = self.backing.as_ref().filter(|b| offset < b.size) else {
            push_extent(
                out,
                Extent {
                    len,
                    mapping: Mapping::Zero,
                },
            );
            return Ok(());
        };
        let n = (b.size - offset).min(len);
        let mut mapped = Vec::new();
        let ticket = b.node.map_read(offset, n, guest, &mut mapped)?;
        b.node.release(ticket, true);
        for mut extent in mapped {
            if let Mapping::Data { file, offset } = extent.mapping {
                extent.mapping = Mapping::Data {
                    file: file + b.first_file,
                    offset,
                };
            }
            push_extent(out, extent);
        }
        if n < len {
            push_extent(
                out,
                Extent {
                    len: len - n,
                    mapping: Mapping::Zero,
                },
            );
        }
        Ok(())
    }

    /// Map a read; returns whether the request must be tracked until its I/O is over.
    pub(super) fn map_read_locked(
        &self,
        meta: &mut Meta,
        offset: u64,
        len: u64,
        guest: GuestIo,
        out: &mut Vec<Extent>,
    ) -> Result<bool, Qcow2Error> {
        let mut tracked = false;
        for p in pieces(offset, len, self.cluster_bits) {
            match self.l2_entry(meta, p.cluster)? {
                L2Entry::Normal { host, .. } => {
                    tracked |= self.map_allocated(&p, host, out);
                }
                L2Entry::Zero { .. } => push_extent(
                    out,
                    Extent {
                        len: p.len,
                        mapping: Mapping::Zero,
                    },
                ),
                L2Entry::Unallocated => {
                    self.map_backing(offset + p.at, p.len, guest.offset(p.at), out)?
                }
                entry @ L2Entry::Compressed { .. } => {
                    let mut buf = vec![0u8; self.cluster_size() as usize];
                    self.read_cluster(entry, p.cluster, &mut buf)?;
                    guest.write(p.at, &buf[p.within as usize..(p.within + p.len) as usize]);
                    push_extent(
                        out,
                        Extent {
                            len: p.len,
                            mapping: Mapping::Filled,
                        },
                    );
                }
            }
        }
        Ok(tracked)
    }

    /// Map a write: in place where the cluster allows it, through an allocating write
    /// otherwise. Returns whether the request must be tracked until its I/O is over.
    pub(super) fn map_write_locked(
        &self,
        meta: &mut Meta,
        offset: u64,
        len: u64,
        guest: GuestIo,
        out: &mut Vec<Extent>,
    ) -> Result<bool, Qcow2Error> {
        let mut tracked = false;
        for p in pieces(offset, len, self.cluster_bits) {
            let entry = self.l2_entry(meta, p.cluster)?;
            let in_place = match entry {
                L2Entry::Normal { host, copied } if copied || self.format.external_data => {
                    Some(host)
                }
                _ => None,
            };
            if let Some(host) = in_place {
                self.check_data_write(meta, host.add(p.within), p.len)?;
                tracked |= self.map_allocated(&p, host, out);
                continue;
            }
            let mapping = self.allocating_write(meta, entry, p, guest.offset(p.at))?;
            push_extent(
                out,
                Extent {
                    len: p.len,
                    mapping,
                },
            );
        }
        Ok(tracked)
    }

    /// Map a piece to its allocated cluster at `host`, noting identity-mapped clusters for the
    /// fast path. Returns whether the request must be tracked (internal data: the cluster
    /// could be freed while the I/O runs).
    fn map_allocated(&self, p: &Piece, host: HostOffset, out: &mut Vec<Extent>) -> bool {
        self.note_identity(p.cluster, host);
        let mapping = Mapping::Data {
            file: self.data_fid,
            offset: host.0 + p.within,
        };
        push_extent(
            out,
            Extent {
                len: p.len,
                mapping,
            },
        );
        !self.format.external_data
    }

    /// The ticket of a request, counting it as in flight if `tracked`.
    pub(super) fn ticket(&self, tracked: bool) -> IoTicket {
        if tracked {
            self.in_flight.fetch_add(1, Ordering::AcqRel);
        }
        IoTicket {
            tracked,
            written: None,
        }
    }

    /// A tracked request's I/O is over.
    pub(super) fn untrack(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_at_cluster_boundaries() {
        let p: Vec<_> = pieces(1000, 70_000, 16)
            .map(|p| (p.cluster.0, p.within, p.len, p.at))
            .collect();
        assert_eq!(p, vec![(0, 1000, 64536, 0), (1, 0, 5464, 64536)]);
    }
}
