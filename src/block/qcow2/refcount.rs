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
use super::overlap::{Kind, MetadataMap};
use super::units::{be64_entries, HostCluster, HostOffset};
use super::Qcow2Error;

/// Header bytes holding `refcount_table_offset` (8) and `refcount_table_clusters` (4).
const HEADER_REFTABLE_FIELDS: u64 = 48;

/// A refcount table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockEntry {
    /// No block: every refcount in its range is zero.
    Absent,
    At(HostOffset),
    /// Not cluster aligned, or outside the file: the range's refcounts cannot be known.
    Invalid(u64),
}

/// The refcounts of an image's host clusters, and the allocator that hands out free ones.
///
/// The allocator consults the image's [`MetadataMap`] (which it owns, since every allocation
/// must be registered in it): it never returns cluster 0 or a cluster that holds metadata,
/// whatever the refcounts claim.
pub struct Refcounts {
    cluster_bits: u32,
    order: u32,
    table: Vec<BlockEntry>,
    table_offset: HostOffset,
    table_clusters: u64,
    cache: TableCache,
    /// No cluster below this one is free.
    free_hint: HostCluster,
    /// Past every cluster allocated in this session.
    high_water: u64,
    map: MetadataMap,
}

impl Refcounts {
    /// Load the refcount table of `table_clusters` clusters at `table_offset` and register it
    /// and its blocks in `map`. The table must lie inside the file; entries that are not
    /// aligned or point outside it are kept as [`BlockEntry::Invalid`].
    pub fn load(
        file: &FileNode,
        cluster_bits: u32,
        order: u32,
        table_offset: HostOffset,
        table_clusters: u64,
        cache_tables: usize,
        mut map: MetadataMap,
    ) -> Result<Refcounts, Qcow2Error> {
        let cluster_size = 1u64 << cluster_bits;
        let file_size = file.current_size()?;
        let table_bytes = table_clusters * cluster_size;
        if table_offset.0.saturating_add(table_bytes) > file_size {
            return Err(Qcow2Error::RefcountTableOutside(table_offset.0));
        }
        let mut raw = vec![0u8; table_bytes as usize];
        file.read_exact_at(&mut raw, table_offset.0)?;
        map.register(table_offset, table_bytes, Kind::RefcountTable);
        let table: Vec<BlockEntry> = be64_entries(&raw)
            .map(|entry| {
                let offset = entry & OFFSET_MASK;
                if offset == 0 {
                    BlockEntry::Absent
                } else if !offset.is_multiple_of(cluster_size) || offset + cluster_size > file_size
                {
                    BlockEntry::Invalid(offset)
                } else {
                    BlockEntry::At(HostOffset(offset))
                }
            })
            .collect();
        for entry in &table {
            if let BlockEntry::At(offset) = entry {
                map.register(*offset, cluster_size, Kind::RefcountBlock);
            }
        }
        Ok(Refcounts {
            cluster_bits,
            order,
            table,
            table_offset,
            table_clusters,
            cache: TableCache::new(cluster_size as usize, cache_tables, "refblock_update"),
            free_hint: HostCluster(1),
            high_water: 0,
            map,
        })
    }

    /// The metadata map the allocator avoids.
    pub fn map(&self) -> &MetadataMap {
        &self.map
    }

    pub fn map_mut(&mut self) -> &mut MetadataMap {
        &mut self.map
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

    pub fn order(&self) -> u32 {
        self.order
    }

    /// Where the refcount table is, and how many clusters it takes.
    pub fn table_location(&self) -> (HostOffset, u64) {
        (self.table_offset, self.table_clusters)
    }

    /// The refcount table's entries.
    pub fn entries(&self) -> &[BlockEntry] {
        &self.table
    }

    /// How many host clusters the table (with all its blocks) can describe.
    pub fn covered_clusters(&self) -> u64 {
        self.table.len() as u64 * self.block_entries()
    }

    /// The refcount of `cluster` (zero where no block describes it).
    pub fn get(&mut self, file: &FileNode, cluster: HostCluster) -> Result<u64, Qcow2Error> {
        let entries = self.block_entries();
        let offset = match self.table.get((cluster.0 / entries) as usize) {
            None | Some(BlockEntry::Absent) => return Ok(0),
            Some(BlockEntry::Invalid(raw)) => return Err(Qcow2Error::InvalidRefcountBlock(*raw)),
            Some(BlockEntry::At(offset)) => *offset,
        };
        let slot = self.cache.load(file, offset, false, &mut |off, data| {
            file.write_all_at(data, off.0).map_err(Qcow2Error::from)
        })?;
        Ok(read_entry(
            self.cache.bytes(slot),
            self.order,
            cluster.0 % entries,
        ))
    }

    /// Set the refcount of `cluster`, creating its refcount block if needed.
    pub fn set(
        &mut self,
        file: &FileNode,
        cluster: HostCluster,
        value: u64,
    ) -> Result<(), Qcow2Error> {
        if value > self.max_refcount() {
            return Err(Qcow2Error::RefcountOverflow(cluster));
        }
        let entries = self.block_entries();
        let offset = self.ensure_block(file, cluster.0 / entries)?;
        // A block that another structure claims too must not be written (it would damage
        // the other).
        if let Some((at, other)) =
            self.map
                .metadata_overlap(offset, self.cluster_size(), Kind::RefcountBlock)
        {
            return Err(Qcow2Error::MetadataOverlap {
                offset: at.offset(self.cluster_bits).0,
                kind: other,
            });
        }
        let slot = self.cache.load(file, offset, false, &mut |off, data| {
            file.write_all_at(data, off.0).map_err(Qcow2Error::from)
        })?;
        write_entry(
            self.cache.bytes_mut(slot),
            self.order,
            cluster.0 % entries,
            value,
        );
        if value == 0 && cluster < self.free_hint && cluster.0 > 0 {
            self.free_hint = cluster;
        }
        Ok(())
    }

    /// Add `delta` to the refcount of `cluster`; returns the new count.
    pub fn adjust(
        &mut self,
        file: &FileNode,
        cluster: HostCluster,
        delta: i64,
    ) -> Result<u64, Qcow2Error> {
        let current = self.get(file, cluster)?;
        let new = current
            .checked_add_signed(delta)
            .ok_or(Qcow2Error::RefcountUnderflow(cluster))?;
        self.set(file, cluster, new)?;
        Ok(new)
    }

    /// Allocate `count` contiguous free clusters (refcount 1) for metadata of `kind` (or guest
    /// data, `Kind::Free`), registering them in the map; returns the first one's offset.
    pub fn allocate(
        &mut self,
        file: &FileNode,
        count: u64,
        kind: Kind,
    ) -> Result<HostOffset, Qcow2Error> {
        file.event("cluster_alloc")?;
        // Each round that has to create refcount blocks for the run creates at least one, and
        // a run of `count` clusters needs at most `count / block_entries + 2` of them.
        let max_rounds = count / self.block_entries() + 3;
        for _ in 0..max_rounds {
            let start = self.find_free_run(file, count)?;
            let entries = self.block_entries();
            let mut created = false;
            for block in start / entries..=(start + count - 1) / entries {
                if !matches!(self.table.get(block as usize), Some(BlockEntry::At(_))) {
                    self.ensure_block(file, block)?;
                    created = true;
                }
            }
            if created {
                // New blocks took clusters of their own range: look again.
                continue;
            }
            for c in start..start + count {
                self.set(file, HostCluster(c), 1)?;
            }
            self.free_hint = HostCluster(start + count);
            self.high_water = self.high_water.max(start + count);
            let offset = HostCluster(start).offset(self.cluster_bits);
            if kind != Kind::Free {
                self.map.register(offset, count << self.cluster_bits, kind);
            }
            return Ok(offset);
        }
        Err(Qcow2Error::AllocationFailed(count))
    }

    /// The first cluster index of a run of `count` free clusters at or after the hint: zero
    /// refcount and no metadata.
    ///
    /// Past the end of the file (and of what this session allocated) nothing can be in use, so
    /// every cluster there that holds no metadata is free, whatever a corrupt refcount block
    /// claims: the search reads refcounts for the file's clusters at most, never for the whole
    /// range the refcount table could describe.
    fn find_free_run(&mut self, file: &FileNode, count: u64) -> Result<u64, Qcow2Error> {
        let in_use_end = file
            .current_size()?
            .div_ceil(self.cluster_size())
            .max(self.high_water);
        let mut start = self.free_hint.0.max(1);
        let mut len = 0;
        let mut c = start;
        while len < count {
            let free = self.map.is_allocatable(HostCluster(c))
                && (c >= in_use_end || self.get(file, HostCluster(c))? == 0);
            if free {
                len += 1;
            } else {
                len = 0;
                start = c + 1;
            }
            c += 1;
        }
        Ok(start)
    }

    /// The offset of refcount block `block`, creating it (self-describing) if missing.
    fn ensure_block(&mut self, file: &FileNode, block: u64) -> Result<HostOffset, Qcow2Error> {
        if block >= self.table.len() as u64 {
            self.grow_table(file, block + 1)?;
        }
        match self.table[block as usize] {
            BlockEntry::At(existing) => return Ok(existing),
            BlockEntry::Invalid(raw) => return Err(Qcow2Error::InvalidRefcountBlock(raw)),
            BlockEntry::Absent => {}
        }
        file.event("refblock_alloc")?;
        let entries = self.block_entries();
        let first = block * entries;
        // A range without a block has no cluster in use (its refcounts are all zero), so the
        // block goes in the first of its clusters that holds no metadata.
        let cluster = (first..first + entries)
            .find(|c| self.map.is_allocatable(HostCluster(*c)))
            .ok_or(Qcow2Error::NoRoomForRefcountBlock(block))?;
        let offset = HostCluster(cluster).offset(self.cluster_bits);
        self.high_water = self.high_water.max(cluster + 1);
        let slot = self.cache.load(file, offset, true, &mut |off, data| {
            file.write_all_at(data, off.0).map_err(Qcow2Error::from)
        })?;
        write_entry(self.cache.bytes_mut(slot), self.order, cluster - first, 1);
        self.cache.write_back(file)?;
        file.sync_data()?;
        self.map
            .register(offset, self.cluster_size(), Kind::RefcountBlock);
        self.table[block as usize] = BlockEntry::At(offset);
        let entry_at = self.table_offset.0 + block * 8;
        file.write_all_at(&offset.0.to_be_bytes(), entry_at)?;
        Ok(offset)
    }

    /// Move the table to a fresh area at the end of the file, large enough for `min_blocks`
    /// blocks, together with the blocks that describe the area itself.
    fn grow_table(&mut self, file: &FileNode, min_blocks: u64) -> Result<(), Qcow2Error> {
        let cluster_size = self.cluster_size();
        let entries = self.block_entries();
        let per_cluster = cluster_size / 8;
        if min_blocks * 8 > super::header::MAX_REFTABLE_BYTES {
            return Err(Qcow2Error::RefcountTableFull);
        }
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
        if total_blocks * 8 > super::header::MAX_REFTABLE_BYTES {
            return Err(Qcow2Error::RefcountTableFull);
        }
        let mut table = self.table.clone();
        table.resize(total_blocks as usize, BlockEntry::Absent);
        for i in 0..new_blocks {
            let block_offset = HostCluster(area + i).offset(self.cluster_bits);
            table[(first_area_block + i) as usize] = BlockEntry::At(block_offset);
            let mut data = vec![0u8; cluster_size as usize];
            let range_first = (first_area_block + i) * entries;
            for c in area..area + new_blocks + table_clusters {
                if (range_first..range_first + entries).contains(&c) {
                    write_entry(&mut data, self.order, c - range_first, 1);
                }
            }
            file.write_all_at(&data, block_offset.0)?;
        }
        let table_offset = HostCluster(area + new_blocks).offset(self.cluster_bits);
        let mut raw = Vec::with_capacity((table_clusters * cluster_size) as usize);
        for e in &table {
            let value = match e {
                BlockEntry::At(o) => o.0,
                BlockEntry::Invalid(raw) => *raw,
                BlockEntry::Absent => 0,
            };
            raw.extend_from_slice(&value.to_be_bytes());
        }
        raw.resize((table_clusters * cluster_size) as usize, 0);
        file.write_all_at(&raw, table_offset.0)?;
        file.sync_data()?;
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&table_offset.0.to_be_bytes());
        fields[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        file.event("refblock_alloc_switch_table")?;
        file.write_all_at(&fields, HEADER_REFTABLE_FIELDS)?;
        file.sync_data()?;
        for i in 0..new_blocks {
            let block_offset = HostCluster(area + i).offset(self.cluster_bits);
            self.map
                .register(block_offset, cluster_size, Kind::RefcountBlock);
        }
        self.map.register(
            table_offset,
            table_clusters * cluster_size,
            Kind::RefcountTable,
        );
        let (old_offset, old_clusters) = (self.table_offset, self.table_clusters);
        self.table = table;
        self.table_offset = table_offset;
        self.table_clusters = table_clusters;
        self.map.unregister(old_offset, old_clusters * cluster_size);
        let old_first = old_offset.cluster(self.cluster_bits).0;
        for c in old_first..old_first + old_clusters {
            self.adjust(file, HostCluster(c), -1)?;
        }
        Ok(())
    }

    pub fn any_dirty(&self) -> bool {
        self.cache.any_dirty()
    }

    /// Write every changed refcount block to the file.
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
