//! Host cluster reference counts (docs/interop/qcow2.txt, "Host cluster management").
//!
//! A refcount table (contiguous, in memory here) points to refcount blocks (one cluster each,
//! cached). Entries are `1 << refcount_order` bits wide: big-endian for widths of 8 bits and
//! more, least significant bits first within a byte below that.
//!
//! New refcount blocks describe themselves: a block created for the range of clusters it covers
//! is placed in the first free cluster of that range (a range without a block has no cluster in
//! use), so creating one never needs another. When the table itself is too small it moves to a
//! fresh area at the end of the file together with the blocks that cover it.

use crate::block::file::FileNode;

use super::cache::TableCache;
use super::entry::OFFSET_MASK;
use super::Qcow2Error;

/// Header bytes holding `refcount_table_offset` (8) and `refcount_table_clusters` (4).
const HEADER_REFTABLE_FIELDS: u64 = 48;

pub struct Refcounts {
    cluster_bits: u32,
    order: u32,
    /// Refcount block offsets, indexed by block number (0: no block yet).
    table: Vec<u64>,
    table_offset: u64,
    table_clusters: u64,
    cache: TableCache,
    /// No cluster below this index is free (a search starts here).
    free_hint: u64,
}

impl Refcounts {
    /// Load the refcount table described by the header fields.
    pub fn load(
        file: &FileNode,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u64,
        cache_tables: usize,
    ) -> Result<Refcounts, Qcow2Error> {
        let cluster_size = 1u64 << cluster_bits;
        let mut raw = vec![0u8; (table_clusters * cluster_size) as usize];
        file.read_exact_at(&mut raw, table_offset)?;
        let table = raw
            .chunks_exact(8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
            .map(|e| e & OFFSET_MASK)
            .collect::<Vec<_>>();
        if table.iter().any(|off| off % cluster_size != 0) {
            return Err(Qcow2Error::corrupt(
                "refcount block offset not cluster aligned",
            ));
        }
        Ok(Refcounts {
            cluster_bits,
            order,
            table,
            table_offset,
            table_clusters,
            cache: TableCache::new(cluster_size as usize, cache_tables),
            free_hint: 0,
        })
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcounts per block.
    pub fn block_entries(&self) -> u64 {
        (self.cluster_size() * 8) >> self.order
    }

    pub fn max_refcount(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << self.order)) - 1
        }
    }

    pub fn table_location(&self) -> (u64, u64) {
        (self.table_offset, self.table_clusters)
    }

    /// Offsets of every refcount block (for consistency checks).
    pub fn block_offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.table.iter().copied().filter(|o| *o != 0)
    }

    /// The cluster ranges that existing refcount blocks describe.
    pub fn described_ranges(&self) -> Vec<std::ops::Range<u64>> {
        let entries = self.block_entries();
        self.table
            .iter()
            .enumerate()
            .filter(|(_, off)| **off != 0)
            .map(|(i, _)| i as u64 * entries..(i as u64 + 1) * entries)
            .collect()
    }

    /// Number of clusters the table can describe.
    pub fn covered_clusters(&self) -> u64 {
        self.table.len() as u64 * self.block_entries()
    }

    /// The refcount of cluster `cluster` (an index, not an offset).
    pub fn get(&mut self, file: &FileNode, cluster: u64) -> Result<u64, Qcow2Error> {
        let entries = self.block_entries();
        let block = (cluster / entries) as usize;
        let Some(&offset) = self.table.get(block) else {
            return Ok(0);
        };
        if offset == 0 {
            return Ok(0);
        }
        let slot = self.cache.load(file, offset, false, &mut |off, data| {
            file.write_all_at(data, off).map_err(Qcow2Error::from)
        })?;
        Ok(read_entry(
            self.cache.bytes(slot),
            self.order,
            cluster % entries,
        ))
    }

    /// Set the refcount of cluster `cluster` to `value`, creating refcount blocks (and growing
    /// the table) as needed.
    pub fn set(&mut self, file: &FileNode, cluster: u64, value: u64) -> Result<(), Qcow2Error> {
        if value > self.max_refcount() {
            return Err(Qcow2Error::corrupt("refcount overflow"));
        }
        let entries = self.block_entries();
        let block = cluster / entries;
        let offset = self.ensure_block(file, block)?;
        let slot = self.cache.load(file, offset, false, &mut |off, data| {
            file.write_all_at(data, off).map_err(Qcow2Error::from)
        })?;
        write_entry(
            self.cache.bytes_mut(slot),
            self.order,
            cluster % entries,
            value,
        );
        if value == 0 && cluster < self.free_hint {
            self.free_hint = cluster;
        }
        Ok(())
    }

    /// Change the refcount of `cluster` by `delta`.
    pub fn adjust(&mut self, file: &FileNode, cluster: u64, delta: i64) -> Result<u64, Qcow2Error> {
        let current = self.get(file, cluster)?;
        let new = current
            .checked_add_signed(delta)
            .ok_or_else(|| Qcow2Error::corrupt("refcount underflow"))?;
        self.set(file, cluster, new)?;
        Ok(new)
    }

    /// Allocate `count` contiguous free clusters (refcount set to 1); returns the first offset.
    pub fn allocate(&mut self, file: &FileNode, count: u64) -> Result<u64, Qcow2Error> {
        loop {
            let start = self.find_free_run(file, count)?;
            // Creating a missing block may use a cluster of the run: look again if it did.
            let entries = self.block_entries();
            let mut created = false;
            for block in start / entries..=(start + count - 1) / entries {
                let exists = self.table.get(block as usize).is_some_and(|o| *o != 0);
                if !exists {
                    self.ensure_block(file, block)?;
                    created = true;
                }
            }
            if created {
                continue;
            }
            for c in start..start + count {
                self.set(file, c, 1)?;
            }
            self.free_hint = start + count;
            return Ok(start << self.cluster_bits);
        }
    }

    fn find_free_run(&mut self, file: &FileNode, count: u64) -> Result<u64, Qcow2Error> {
        let mut start = self.free_hint;
        let mut len = 0;
        let mut c = start;
        while len < count {
            if self.get(file, c)? == 0 {
                len += 1;
            } else {
                len = 0;
                start = c + 1;
            }
            c += 1;
        }
        Ok(start)
    }

    /// The offset of refcount block `block`, creating it (and growing the table) if needed.
    fn ensure_block(&mut self, file: &FileNode, block: u64) -> Result<u64, Qcow2Error> {
        if block >= self.table.len() as u64 {
            self.grow_table(file, block + 1)?;
        }
        let existing = self.table[block as usize];
        if existing != 0 {
            return Ok(existing);
        }
        // No block means no cluster of this range is in use: the block takes the first one and
        // counts itself. The table may have moved into the range when it grew, so skip the
        // clusters it occupies.
        let entries = self.block_entries();
        let first = block * entries;
        let table_first = self.table_offset >> self.cluster_bits;
        let table_range = table_first..table_first + self.table_clusters;
        let cluster = (first..first + entries)
            .find(|c| !table_range.contains(c))
            .ok_or_else(|| Qcow2Error::corrupt("no room for a refcount block"))?;
        let offset = cluster << self.cluster_bits;
        let slot = self.cache.load(file, offset, true, &mut |off, data| {
            file.write_all_at(data, off).map_err(Qcow2Error::from)
        })?;
        write_entry(self.cache.bytes_mut(slot), self.order, cluster - first, 1);
        for c in table_range.filter(|c| (first..first + entries).contains(c)) {
            write_entry(self.cache.bytes_mut(slot), self.order, c - first, 1);
        }
        // The block must be on disk before the table points to it.
        self.cache.write_back(file)?;
        file.sync_data()?;
        self.table[block as usize] = offset;
        let entry_at = self.table_offset + block * 8;
        file.write_all_at(&offset.to_be_bytes(), entry_at)?;
        Ok(offset)
    }

    /// Move the table to a fresh area at the end of the file with room for `min_blocks`
    /// blocks, together with new blocks covering that area.
    fn grow_table(&mut self, file: &FileNode, min_blocks: u64) -> Result<(), Qcow2Error> {
        let cluster_size = self.cluster_size();
        let entries = self.block_entries();
        let per_cluster = cluster_size / 8;
        // The area starts on a block boundary past everything covered so far and past the end
        // of the file, so that its own blocks cover nothing else.
        let file_end = file.current_size()?.div_ceil(cluster_size);
        let area = (self.covered_clusters().max(file_end)).div_ceil(entries) * entries;
        let first_area_block = area / entries;
        let mut new_blocks = 1u64;
        let (table_clusters, total_blocks) = loop {
            let total_blocks = min_blocks
                .max(self.table.len() as u64 * 2)
                .max(first_area_block + new_blocks);
            let table_clusters = total_blocks.div_ceil(per_cluster);
            let needed = (new_blocks + table_clusters).div_ceil(entries);
            if needed <= new_blocks {
                break (table_clusters, table_clusters * per_cluster);
            }
            new_blocks = needed;
        };
        // Layout: [new blocks][new table] starting at `area`.
        let mut table = self.table.clone();
        table.resize(total_blocks as usize, 0);
        for i in 0..new_blocks {
            let block_offset = (area + i) << self.cluster_bits;
            table[(first_area_block + i) as usize] = block_offset;
            let mut data = vec![0u8; cluster_size as usize];
            // Count every cluster of the area that falls in this block's range.
            let range_first = (first_area_block + i) * entries;
            for c in area..area + new_blocks + table_clusters {
                if (range_first..range_first + entries).contains(&c) {
                    write_entry(&mut data, self.order, c - range_first, 1);
                }
            }
            file.write_all_at(&data, block_offset)?;
        }
        let table_offset = (area + new_blocks) << self.cluster_bits;
        let mut raw = Vec::with_capacity((table_clusters * cluster_size) as usize);
        for e in &table {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        raw.resize((table_clusters * cluster_size) as usize, 0);
        file.write_all_at(&raw, table_offset)?;
        file.sync_data()?;
        // Switch the header over, then free the old table.
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&table_offset.to_be_bytes());
        fields[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        file.write_all_at(&fields, HEADER_REFTABLE_FIELDS)?;
        file.sync_data()?;
        let (old_offset, old_clusters) = (self.table_offset, self.table_clusters);
        self.table = table;
        self.table_offset = table_offset;
        self.table_clusters = table_clusters;
        for c in 0..old_clusters {
            self.adjust(file, (old_offset >> self.cluster_bits) + c, -1)?;
        }
        Ok(())
    }

    pub fn any_dirty(&self) -> bool {
        self.cache.any_dirty()
    }

    /// Write every modified refcount block to the file (not synced).
    pub fn write_back(&mut self, file: &FileNode) -> Result<(), Qcow2Error> {
        self.cache.write_back(file)
    }
}

/// Read entry `index` of a refcount block of width `1 << order` bits.
pub fn read_entry(block: &[u8], order: u32, index: u64) -> u64 {
    let bits = 1u64 << order;
    if bits >= 8 {
        let bytes = (bits / 8) as usize;
        let at = index as usize * bytes;
        block[at..at + bytes]
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
    } else {
        let per_byte = 8 / bits;
        let byte = block[(index / per_byte) as usize];
        let shift = (index % per_byte) * bits;
        (u64::from(byte) >> shift) & ((1 << bits) - 1)
    }
}

/// Write entry `index` of a refcount block of width `1 << order` bits.
pub fn write_entry(block: &mut [u8], order: u32, index: u64, value: u64) {
    let bits = 1u64 << order;
    if bits >= 8 {
        let bytes = (bits / 8) as usize;
        let at = index as usize * bytes;
        let be = value.to_be_bytes();
        block[at..at + bytes].copy_from_slice(&be[8 - bytes..]);
    } else {
        let per_byte = 8 / bits;
        let byte = &mut block[(index / per_byte) as usize];
        let shift = (index % per_byte) * bits;
        let mask = ((1u64 << bits) - 1) << shift;
        *byte = ((u64::from(*byte) & !mask) | ((value << shift) & mask)) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width() {
        for order in 0..=6u32 {
            let bits = 1u64 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let entries = 512 * 8 / bits;
            for i in 0..entries {
                write_entry(&mut block, order, i, (i * 7) & max);
            }
            for i in 0..entries {
                assert_eq!(
                    read_entry(&block, order, i),
                    (i * 7) & max,
                    "order {order} entry {i}"
                );
            }
            write_entry(&mut block, order, 1, max);
            assert_eq!(read_entry(&block, order, 1), max);
            assert_eq!(read_entry(&block, order, 0), 0);
            assert_eq!(read_entry(&block, order, 2), 14 & max);
        }
        // 16-bit entries are big-endian; 1-bit entries fill bytes from the low bit.
        let mut block = vec![0u8; 8];
        write_entry(&mut block, 4, 1, 0x0102);
        assert_eq!(block[2..4], [1, 2]);
        let mut block = vec![0u8; 1];
        write_entry(&mut block, 0, 0, 1);
        write_entry(&mut block, 0, 3, 1);
        assert_eq!(block[0], 0b1001);
    }
}
