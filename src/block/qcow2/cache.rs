//! A bounded LRU cache of cluster-sized metadata tables (L2 tables, refcount blocks), keyed by
//! their offset in the image file, with dirty tracking for write-back.
//!
//! Tables are kept as the raw big-endian bytes of the cluster, so writing one back is a plain
//! copy; accessors convert entries on the way in and out.

use std::collections::HashMap;

use crate::block::file::FileNode;

use super::units::HostOffset;
use super::Qcow2Error;

/// Writes back a dirty table being evicted (offset, bytes), after whatever it depends on.
pub type EvictFn<'a> = dyn FnMut(HostOffset, &[u8]) -> Result<(), Qcow2Error> + 'a;

struct Slot {
    offset: HostOffset,
    data: Vec<u8>,
    dirty: bool,
    last_use: u64,
}

/// An LRU cache of at most `capacity` tables of `table_size` bytes.
pub struct TableCache {
    table_size: usize,
    /// The named metadata step of writing one back (QEMU blkdebug's name for it).
    event: &'static str,
    capacity: usize,
    slots: Vec<Slot>,
    index: HashMap<HostOffset, usize>,
    clock: u64,
}

impl TableCache {
    pub fn new(table_size: usize, capacity: usize, event: &'static str) -> Self {
        TableCache {
            table_size,
            event,
            capacity: capacity.max(2),
            slots: Vec::new(),
            index: HashMap::new(),
            clock: 0,
        }
    }

    /// Make the table at `offset` resident, reading it from `file` unless `fresh` (a newly
    /// allocated table, which starts zeroed). Writes back an evicted dirty table first via
    /// `evict`, which must make the write safe (ordering) before doing it.
    ///
    /// Returns the slot index, valid until the next call that loads a table.
    pub fn load(
        &mut self,
        file: &FileNode,
        offset: HostOffset,
        fresh: bool,
        evict: &mut EvictFn,
    ) -> Result<usize, Qcow2Error> {
        self.clock += 1;
        if let Some(&i) = self.index.get(&offset) {
            self.slots[i].last_use = self.clock;
            if fresh {
                self.slots[i].data.fill(0);
                self.slots[i].dirty = true;
            }
            return Ok(i);
        }
        let mut data = vec![0u8; self.table_size];
        if !fresh {
            file.read_exact_at(&mut data, offset.0)?;
        }
        let slot = Slot {
            offset,
            data,
            dirty: fresh,
            last_use: self.clock,
        };
        let i = if self.slots.len() < self.capacity {
            self.slots.push(slot);
            self.slots.len() - 1
        } else {
            let victim = self
                .slots
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.last_use)
                .map(|(i, _)| i)
                .unwrap_or(0);
            let old = &self.slots[victim];
            if old.dirty {
                file.event(self.event)?;
                evict(old.offset, &old.data)?;
            }
            self.index.remove(&old.offset);
            self.slots[victim] = slot;
            victim
        };
        self.index.insert(offset, i);
        Ok(i)
    }

    /// Entry `index` of the table in `slot` (callers keep `index` below table_size / 8).
    pub fn get_u64(&self, slot: usize, index: usize) -> u64 {
        u64::from_be_bytes(self.slots[slot].data.as_chunks::<8>().0[index])
    }

    pub fn set_u64(&mut self, slot: usize, index: usize, value: u64) {
        let s = &mut self.slots[slot];
        s.data[index * 8..index * 8 + 8].copy_from_slice(&value.to_be_bytes());
        s.dirty = true;
    }

    pub fn bytes(&self, slot: usize) -> &[u8] {
        &self.slots[slot].data
    }

    pub fn bytes_mut(&mut self, slot: usize) -> &mut [u8] {
        let s = &mut self.slots[slot];
        s.dirty = true;
        &mut s.data
    }

    pub fn any_dirty(&self) -> bool {
        self.slots.iter().any(|s| s.dirty)
    }

    /// Write every dirty table to `file` and mark it clean.
    pub fn write_back(&mut self, file: &FileNode) -> Result<(), Qcow2Error> {
        for s in self.slots.iter_mut().filter(|s| s.dirty) {
            file.event(self.event)?;
            file.write_all_at(&s.data, s.offset.0)?;
            s.dirty = false;
        }
        Ok(())
    }

    /// Forget the table at `offset` (its cluster was freed), dropping unsaved changes.
    pub fn discard(&mut self, offset: HostOffset) {
        if let Some(i) = self.index.remove(&offset) {
            self.slots.swap_remove(i);
            if i < self.slots.len() {
                let moved = self.slots[i].offset;
                self.index.insert(moved, i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::file::FileOptions;

    #[test]
    fn evicts_least_recently_used_and_writes_back_dirty_tables() {
        let dir = std::env::temp_dir().join(format!("vubd-cache-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, vec![0u8; 4096 * 4]).unwrap();
        let file = FileNode::open(&path, FileOptions::default()).unwrap();
        let mut cache = TableCache::new(4096, 2, "test");
        let evicted = std::cell::RefCell::new(Vec::new());
        let mut evict = |off: HostOffset, _: &[u8]| {
            evicted.borrow_mut().push(off);
            Ok(())
        };
        let a = cache.load(&file, HostOffset(0), false, &mut evict).unwrap();
        cache.set_u64(a, 3, 0xdead_beef);
        let _b = cache
            .load(&file, HostOffset(4096), false, &mut evict)
            .unwrap();
        // Touch a again so that b is the least recently used.
        let a = cache.load(&file, HostOffset(0), false, &mut evict).unwrap();
        assert_eq!(cache.get_u64(a, 3), 0xdead_beef);
        let _c = cache
            .load(&file, HostOffset(8192), true, &mut evict)
            .unwrap();
        assert!(evicted.borrow().is_empty(), "b was clean");
        let _d = cache
            .load(&file, HostOffset(12288), false, &mut evict)
            .unwrap();
        assert_eq!(
            *evicted.borrow(),
            vec![HostOffset(0)],
            "a was dirty and least recently used"
        );
        cache.write_back(&file).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
