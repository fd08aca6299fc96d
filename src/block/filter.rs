//! Filter nodes: a node that sits on one child, passes every request through, and may act
//! around the child's writes: read the old data first (copy-before-write for point-in-time
//! backup), fail or delay a request (fault injection), or learn when a write is over.
//!
//! A [`FilterNode`] implements [`BlockDriver`] by delegating to its child; what it adds comes
//! from a [`Filter`]. Filters do not remap offsets, so the extents the child maps are the
//! filter's own, and the fast path through a filter is one indirect call per hook.

use std::fmt::Debug;
use std::sync::Arc;

use super::file::FileNode;
use super::{Allocation, BlockDriver, BlockError, Extent, GuestIo, HostZeroOp, IoTicket, ZeroOp};

/// What a filter does around its child's requests. Every hook has a pass-through default.
pub trait Filter: Send + Sync + Debug {
    /// The filter's driver name, as QEMU spells it where QEMU has one (`copy-before-write`,
    /// `blkdebug`).
    fn name(&self) -> &'static str;

    /// Before a read of `[offset, offset + len)` is mapped on `child`. An error fails the read.
    fn before_read(
        &self,
        _child: &dyn BlockDriver,
        _offset: u64,
        _len: u64,
    ) -> Result<(), BlockError> {
        Ok(())
    }

    /// Before a write, write-zeroes or discard of `[offset, offset + len)` is mapped on
    /// `child`: the last moment the old data can be read. An error fails the request before
    /// anything reaches the child.
    fn before_write(
        &self,
        _child: &dyn BlockDriver,
        _offset: u64,
        _len: u64,
    ) -> Result<(), BlockError> {
        Ok(())
    }

    /// Whether [`Filter::after_write`] must be called (asked once per write, so filters
    /// without it cost nothing after the write).
    fn wants_after_write(&self) -> bool {
        false
    }

    /// The data I/O of a write of `[offset, offset + len)` is over; `ok` says whether all of
    /// it succeeded. Not called for write-zeroes and discards, which complete when mapped.
    fn after_write(&self, _offset: u64, _len: u64, _ok: bool) {}
}

/// A shared filter filters the same way: the node holds one reference, its owner another
/// (a backup job keeps its copy-before-write state to serve readers of the view).
impl<F: Filter + ?Sized> Filter for Arc<F> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn before_read(
        &self,
        child: &dyn BlockDriver,
        offset: u64,
        len: u64,
    ) -> Result<(), BlockError> {
        (**self).before_read(child, offset, len)
    }

    fn before_write(
        &self,
        child: &dyn BlockDriver,
        offset: u64,
        len: u64,
    ) -> Result<(), BlockError> {
        (**self).before_write(child, offset, len)
    }

    fn wants_after_write(&self) -> bool {
        (**self).wants_after_write()
    }

    fn after_write(&self, offset: u64, len: u64, ok: bool) {
        (**self).after_write(offset, len, ok)
    }
}

/// A node that runs a [`Filter`] over one child.
#[derive(Debug)]
pub struct FilterNode<F> {
    filter: F,
    child: Arc<dyn BlockDriver>,
}

impl<F: Filter> FilterNode<F> {
    pub fn new(filter: F, child: Arc<dyn BlockDriver>) -> Self {
        FilterNode { filter, child }
    }

    pub fn filter(&self) -> &F {
        &self.filter
    }

    pub fn child(&self) -> &Arc<dyn BlockDriver> {
        &self.child
    }
}

impl<F: Filter> BlockDriver for FilterNode<F> {
    fn format(&self) -> &'static str {
        self.filter.name()
    }

    fn size(&self) -> u64 {
        self.child.size()
    }

    fn read_only(&self) -> bool {
        self.child.read_only()
    }

    fn files(&self) -> &[Arc<FileNode>] {
        self.child.files()
    }

    fn map_read(
        &self,
        offset: u64,
        len: u64,
        guest: GuestIo,
        out: &mut Vec<Extent>,
    ) -> Result<IoTicket, BlockError> {
        self.filter.before_read(&*self.child, offset, len)?;
        self.child.map_read(offset, len, guest, out)
    }

    fn map_write(
        &self,
        offset: u64,
        len: u64,
        guest: GuestIo,
        out: &mut Vec<Extent>,
    ) -> Result<IoTicket, BlockError> {
        self.filter.before_write(&*self.child, offset, len)?;
        let mut ticket = self.child.map_write(offset, len, guest, out)?;
        if self.filter.wants_after_write() {
            ticket.written = Some((offset, len));
        }
        Ok(ticket)
    }

    fn release(&self, ticket: IoTicket, ok: bool) {
        if let Some((offset, len)) = ticket.written {
            self.filter.after_write(offset, len, ok);
        }
        self.child.release(ticket, ok);
    }

    fn map_zeroes(
        &self,
        offset: u64,
        len: u64,
        op: ZeroOp,
        out: &mut Vec<HostZeroOp>,
    ) -> Result<(), BlockError> {
        self.filter.before_write(&*self.child, offset, len)?;
        self.child.map_zeroes(offset, len, op, out)
    }

    fn flush_metadata(&self) -> Result<(), BlockError> {
        self.child.flush_metadata()
    }

    fn discard_granularity(&self) -> u64 {
        self.child.discard_granularity()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<(u64, Allocation), BlockError> {
        self.child.block_status(offset, len)
    }

    fn allocation_unit(&self) -> Option<u64> {
        self.child.allocation_unit()
    }

    fn data_file(&self) -> Option<&Arc<FileNode>> {
        self.child.data_file()
    }

    fn bitmap_store(self: Arc<Self>) -> Option<Arc<dyn crate::bitmap::BitmapStore>> {
        // Bitmaps live in the format node below; a filter is transparent to them.
        self.child.clone().bitmap_store()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::block::file::FileOptions;
    use crate::block::raw::RawNode;
    use crate::block::{Mapping, ZeroOp};

    /// Counts what passes through and can be told to refuse writes.
    #[derive(Debug, Default)]
    struct Counting {
        reads: AtomicU64,
        writes: AtomicU64,
        after: Mutex<Vec<(u64, u64, bool)>>,
        refuse_writes: bool,
    }

    impl Filter for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }

        fn before_read(&self, _: &dyn BlockDriver, _: u64, _: u64) -> Result<(), BlockError> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }

        fn before_write(
            &self,
            child: &dyn BlockDriver,
            offset: u64,
            len: u64,
        ) -> Result<(), BlockError> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            if self.refuse_writes {
                return Err(BlockError::from(std::io::Error::from_raw_os_error(
                    libc::EIO,
                )));
            }
            // Reading the old data through the child works at this point.
            let mut old = vec![0u8; len as usize];
            child.read_at(offset, &mut old)
        }

        fn wants_after_write(&self) -> bool {
            true
        }

        fn after_write(&self, offset: u64, len: u64, ok: bool) {
            self.after.lock().unwrap().push((offset, len, ok));
        }
    }

    fn raw_node(name: &str, len: usize) -> (Arc<dyn BlockDriver>, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("vubd-filter-{}-{name}", std::process::id()));
        std::fs::write(&path, vec![0xaau8; len]).unwrap();
        let file = FileNode::open(
            &path,
            FileOptions {
                read_only: false,
                direct: false,
                lock: None,
            },
        )
        .unwrap();
        (Arc::new(RawNode::new(Arc::new(file))), path)
    }

    #[test]
    fn a_pass_through_filter_maps_like_its_child_and_hears_both_sides_of_a_write() {
        let (raw, path) = raw_node("pass", 8192);
        let node = Arc::new(FilterNode::new(Counting::default(), raw.clone()));
        assert_eq!(node.format(), "counting");
        assert_eq!(node.size(), 8192);
        assert_eq!(node.files().len(), 1);

        let mut buf = [0u8; 512];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec names `buf`, alive and unused elsewhere meanwhile.
        let guest = unsafe { GuestIo::new(&iov) };
        let (mut via_filter, mut direct) = (Vec::new(), Vec::new());
        let ticket = node.map_write(1024, 512, guest, &mut via_filter).unwrap();
        let raw_ticket = raw.map_write(1024, 512, guest, &mut direct).unwrap();
        assert_eq!(via_filter, direct);
        assert_eq!(
            via_filter[0].mapping,
            Mapping::Data {
                file: 0,
                offset: 1024
            }
        );
        assert_eq!(ticket.written, Some((1024, 512)));
        assert!(
            node.filter().after.lock().unwrap().is_empty(),
            "not before the I/O is over"
        );
        node.release(ticket, true);
        raw.release(raw_ticket, true);
        assert_eq!(
            *node.filter().after.lock().unwrap(),
            vec![(1024, 512, true)]
        );

        node.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [0xaa; 512]);
        let mut zero_ops = Vec::new();
        node.map_zeroes(0, 4096, ZeroOp::Discard, &mut zero_ops)
            .unwrap();
        assert_eq!(zero_ops.len(), 1);
        assert_eq!(node.filter().reads.load(Ordering::Relaxed), 1);
        assert_eq!(node.filter().writes.load(Ordering::Relaxed), 2);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_filter_that_refuses_fails_the_write_before_the_child_maps_it() {
        let (raw, path) = raw_node("refuse", 4096);
        let node = FilterNode::new(
            Counting {
                refuse_writes: true,
                ..Counting::default()
            },
            raw,
        );
        let mut out = Vec::new();
        assert!(node.map_write(0, 512, GuestIo::none(), &mut out).is_err());
        assert!(out.is_empty());
        let mut zero_ops = Vec::new();
        assert!(node
            .map_zeroes(0, 512, ZeroOp::WriteZeroes { unmap: false }, &mut zero_ops)
            .is_err());
        assert!(zero_ops.is_empty());
        let _ = std::fs::remove_file(path);
    }
}
