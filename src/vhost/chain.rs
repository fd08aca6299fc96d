//! Walking a split virtqueue's descriptor chain from any head (VIRTIO 1.2, 2.7.5), for the
//! requests resubmitted after a restart: virtio-queue only builds chains for the heads it pops
//! from the available ring, and a request in flight when the old backend died may no longer be
//! there (the driver reuses available-ring slots as soon as the used ring lets it).
//!
//! The walker keeps virtio-queue's limits, so a resubmitted chain is parsed exactly as it was
//! when first popped: at most `queue_size` descriptors from the descriptor table (from an
//! indirect table, its length), one level of indirection, at most 4 GiB in all. A chain it
//! cannot follow ends early with a last descriptor that still says "next", which the request
//! parser refuses.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use crate::virtio_blk::request::GuestMemory;

/// Bytes of one split-ring descriptor.
const DESC_SIZE: u64 = 16;

/// The descriptors of the chain that starts at one head.
pub struct ChainWalker<'a> {
    mem: &'a GuestMemory,
    table: GuestAddress,
    table_len: u16,
    next: u16,
    /// Descriptors left before a looping chain is cut.
    ttl: u16,
    indirect: bool,
    bytes: u32,
}

impl<'a> ChainWalker<'a> {
    /// The chain at `head` of the queue whose descriptor table is at `desc_table`.
    pub fn new(mem: &'a GuestMemory, desc_table: GuestAddress, queue_size: u16, head: u16) -> Self {
        ChainWalker {
            mem,
            table: desc_table,
            table_len: queue_size,
            next: head,
            ttl: queue_size,
            indirect: false,
            bytes: 0,
        }
    }

    fn read(&self, index: u16) -> Option<Descriptor> {
        let addr = self.table.0.checked_add(u64::from(index) * DESC_SIZE)?;
        self.mem.read_obj(GuestAddress(addr)).ok()
    }

    /// Continue in the indirect table `desc` describes; `None` if it is not a valid one.
    fn enter_indirect(&mut self, desc: &Descriptor) -> Option<()> {
        if self.indirect || u64::from(desc.len()) % DESC_SIZE != 0 {
            return None;
        }
        let len = u16::try_from(u64::from(desc.len()) / DESC_SIZE).ok()?;
        self.table = desc.addr();
        self.table_len = len;
        self.next = 0;
        self.ttl = len;
        self.indirect = true;
        Some(())
    }
}

impl Iterator for ChainWalker<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next >= self.table_len {
                return None;
            }
            let desc = self.read(self.next)?;
            if desc.refers_to_indirect_table() {
                self.enter_indirect(&desc)?;
                continue;
            }
            self.bytes = self.bytes.checked_add(desc.len())?;
            if desc.has_next() {
                self.next = desc.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(desc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor as D;
    use vm_memory::GuestAddress as A;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    const TABLE: u64 = 0x1000;

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(A(0), 1 << 20)]).unwrap()
    }

    fn put(mem: &GuestMemory, table: u64, index: u16, desc: D) {
        mem.write_obj(desc, A(table + u64::from(index) * 16))
            .unwrap();
    }

    fn walk(mem: &GuestMemory, queue_size: u16, head: u16) -> Vec<(u64, u32, u16)> {
        ChainWalker::new(mem, A(TABLE), queue_size, head)
            .map(|d| (d.addr().0, d.len(), d.flags()))
            .collect()
    }

    #[test]
    fn follows_next_links_from_any_head() {
        let mem = memory();
        put(&mem, TABLE, 5, D::new(0x10000, 16, NEXT, 2));
        put(&mem, TABLE, 2, D::new(0x20000, 512, NEXT | WRITE, 7));
        put(&mem, TABLE, 7, D::new(0x30000, 1, WRITE, 0));
        assert_eq!(
            walk(&mem, 8, 5),
            vec![
                (0x10000, 16, NEXT),
                (0x20000, 512, NEXT | WRITE),
                (0x30000, 1, WRITE)
            ]
        );
    }

    #[test]
    fn follows_one_indirect_table() {
        let mem = memory();
        let indirect = 0x8000;
        put(&mem, TABLE, 3, D::new(indirect, 48, INDIRECT, 0));
        put(&mem, indirect, 0, D::new(0x10000, 16, NEXT, 1));
        put(&mem, indirect, 1, D::new(0x20000, 4096, NEXT | WRITE, 2));
        put(&mem, indirect, 2, D::new(0x30000, 1, WRITE, 0));
        assert_eq!(walk(&mem, 8, 3).len(), 3);
    }

    #[test]
    fn loops_and_bad_tables_end_the_walk_with_next_still_set() {
        let mem = memory();
        // A loop is cut after queue_size descriptors; the last one still says "next".
        put(&mem, TABLE, 0, D::new(0x10000, 16, NEXT, 1));
        put(&mem, TABLE, 1, D::new(0x20000, 16, NEXT, 0));
        let looped = walk(&mem, 4, 0);
        assert_eq!(looped.len(), 4);
        assert_eq!(looped.last().unwrap().2 & NEXT, NEXT);
        // A next index past the table ends the walk.
        put(&mem, TABLE, 2, D::new(0x10000, 16, NEXT, 9));
        assert_eq!(walk(&mem, 4, 2).len(), 1);
        // A head past the table yields nothing.
        assert!(walk(&mem, 4, 4).is_empty());
        // An indirect table whose length is not whole descriptors, or nested, yields nothing.
        put(&mem, TABLE, 3, D::new(0x8000, 40, INDIRECT, 0));
        assert!(walk(&mem, 4, 3).is_empty());
        put(&mem, TABLE, 3, D::new(0x8000, 32, INDIRECT, 0));
        put(&mem, 0x8000, 0, D::new(0x9000, 16, INDIRECT, 0));
        assert!(walk(&mem, 4, 3).is_empty());
        // More than 4 GiB in all ends the walk.
        put(&mem, TABLE, 0, D::new(0x10000, u32::MAX, NEXT, 1));
        put(&mem, TABLE, 1, D::new(0x20000, 16, 0, 0));
        assert_eq!(walk(&mem, 4, 0).len(), 1);
    }
}
