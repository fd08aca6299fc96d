//! Block status: what a guest range holds (data, zeroes, nothing), cluster by cluster from the
//! L2 tables and, for unallocated clusters, from the backing node — the answer NBD's
//! `base:allocation` context gives a backup client, so that it skips what reads as zeroes.

use super::entry::L2Entry;
use super::map::pieces;
use super::Qcow2Node;
use crate::block::{Allocation, BlockError};

/// Clusters looked at per call: a bound on the time the metadata lock is held.
const MAX_CLUSTERS: usize = 1024;

/// Where a cluster's answer comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Own(Allocation),
    /// The backing node, from this guest offset on.
    Backing,
}

impl Qcow2Node {
    /// [`crate::block::BlockDriver::block_status`] for qcow2.
    pub(super) fn status(&self, offset: u64, len: u64) -> Result<(u64, Allocation), BlockError> {
        let len = len.min(self.disk_size().saturating_sub(offset));
        if len == 0 {
            return Ok((0, Allocation::Hole));
        }
        let (first, run) = {
            let mut meta = self.lock();
            let mut first = None;
            let mut run = 0u64;
            for p in pieces(offset, len, self.cluster_bits).take(MAX_CLUSTERS) {
                let source = match self
                    .l2_entry(&mut meta, p.cluster)
                    .map_err(|e| self.err(e))?
                {
                    L2Entry::Normal { .. } | L2Entry::Compressed { .. } => {
                        Source::Own(Allocation::Data)
                    }
                    L2Entry::Zero { host: Some(_), .. } => Source::Own(Allocation::Zero),
                    L2Entry::Zero { host: None, .. } => Source::Own(Allocation::Hole),
                    L2Entry::Unallocated if self.backing.is_some() => Source::Backing,
                    L2Entry::Unallocated => Source::Own(Allocation::Hole),
                };
                match first {
                    None => first = Some(source),
                    Some(f) if f != source => break,
                    Some(_) => {}
                }
                run += p.len;
            }
            (first, run)
        };
        match first {
            Some(Source::Own(allocation)) => Ok((run, allocation)),
            Some(Source::Backing) => self.backing_status(offset, run),
            // `len > 0` gives at least one piece.
            None => Ok((len, Allocation::Hole)),
        }
    }

    /// The status of unallocated clusters: the backing node's, zeroes past its end.
    fn backing_status(&self, offset: u64, run: u64) -> Result<(u64, Allocation), BlockError> {
        match &self.backing {
            Some(b) if offset < b.size => b.node.block_status(offset, run.min(b.size - offset)),
            _ => Ok((run, Allocation::Hole)),
        }
    }
}
