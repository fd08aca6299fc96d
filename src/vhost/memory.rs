//! The guest memory a frontend shares: its regions mapped, with the frontend's addresses for
//! them, and checked before vubd's queues may touch them.
//!
//! vubd reads rings, descriptors, request headers and segments and writes used entries and
//! status bytes with plain loads and stores into the frontend's mappings. A region mapped from
//! a file that is shorter than the region has pages with nothing behind them, and touching one
//! raises SIGBUS, which kills the daemon: a frontend that shares a 64 KiB memfd as 16 MiB of
//! guest memory could take vubd down with one request. So vubd checks every map it builds
//! (`SET_MEM_TABLE`, `ADD_MEM_REG`, `REM_MEM_REG`) and refuses it (the frontend gets a NACK and
//! the connection ends) before its queues ever see it.
//!
//! What cannot be checked here: a frontend that shrinks the file later, after vubd accepted
//! it. Memory a frontend shares with F_SEAL_SHRINK (QEMU's memfd backend seals by default) is
//! safe from that; other files are as trustworthy as the frontend.

use std::fs::File;
use std::io;
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

use crate::virtio_blk::request::GuestMemory;

/// The frontend's memory regions as vubd mapped them, and where each sits in the frontend's
/// own address space: ring addresses arrive as frontend virtual addresses.
#[derive(Clone, Default)]
pub(super) struct MemoryTable {
    regions: Vec<Mapped>,
}

#[derive(Clone)]
struct Mapped {
    user_addr: u64,
    region: Arc<GuestRegionMmap>,
}

impl MemoryTable {
    /// `SET_MEM_TABLE`: a table of `regions` backed by `files`, and the guest memory it makes.
    pub fn new(
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> io::Result<(MemoryTable, GuestMemory)> {
        if regions.len() != files.len() {
            return Err(invalid("memory table: one file per region expected".into()));
        }
        let table = MemoryTable {
            regions: regions
                .iter()
                .zip(files)
                .map(|(region, file)| map(region, file))
                .collect::<io::Result<_>>()?,
        };
        let mem = table.guest_memory()?;
        Ok((table, mem))
    }

    /// `ADD_MEM_REG`.
    pub fn with(
        &self,
        region: &VhostUserMemoryRegion,
        file: File,
    ) -> io::Result<(MemoryTable, GuestMemory)> {
        let mut table = self.clone();
        table.regions.push(map(region, file)?);
        let mem = table.guest_memory()?;
        Ok((table, mem))
    }

    /// `REM_MEM_REG`: the region at `guest_addr` of `size` bytes goes.
    pub fn without(&self, guest_addr: u64, size: u64) -> io::Result<(MemoryTable, GuestMemory)> {
        let mut table = self.clone();
        let before = table.regions.len();
        table
            .regions
            .retain(|m| !(m.region.start_addr().0 == guest_addr && m.region.len() == size));
        if table.regions.len() == before {
            return Err(invalid(format!(
                "no guest memory region of {size} bytes at {guest_addr:#x} to remove"
            )));
        }
        let mem = table.guest_memory()?;
        Ok((table, mem))
    }

    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// The guest address of the frontend's virtual address `user_addr`.
    pub fn guest_address(&self, user_addr: u64) -> Option<GuestAddress> {
        self.regions.iter().find_map(|m| {
            let offset = user_addr.checked_sub(m.user_addr)?;
            (offset < m.region.len()).then(|| GuestAddress(m.region.start_addr().0 + offset))
        })
    }

    fn guest_memory(&self) -> io::Result<GuestMemory> {
        let mut regions: Vec<_> = self.regions.iter().map(|m| m.region.clone()).collect();
        // vm-memory wants them in address order (and refuses overlaps).
        regions.sort_by_key(|r| r.start_addr());
        let mem = GuestMemory::from_arc_regions(regions)
            .map_err(|e| invalid(format!("guest memory regions: {e}")))?;
        check_backing(&mem)?;
        Ok(mem)
    }
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

/// Map one region the frontend shares.
fn map(region: &VhostUserMemoryRegion, file: File) -> io::Result<Mapped> {
    // The message is packed: copy its fields out before use.
    let (guest_addr, size, user_addr, mmap_offset) = (
        region.guest_phys_addr,
        region.memory_size,
        region.user_addr,
        region.mmap_offset,
    );
    let describe = || format!("guest memory region of {size} bytes at {guest_addr:#x}");
    let len = usize::try_from(size)
        .ok()
        .filter(|len| *len > 0)
        .ok_or_else(|| invalid(describe()))?;
    let fits = |start: u64| start.checked_add(size).is_some();
    if !fits(guest_addr) || !fits(user_addr) || !fits(mmap_offset) {
        return Err(invalid(describe()));
    }
    let mapping = MmapRegion::from_file(FileOffset::new(file, mmap_offset), len)
        .map_err(|e| invalid(format!("{}: {e}", describe())))?;
    let region_mmap = GuestRegionMmap::new(mapping, GuestAddress(guest_addr))
        .ok_or_else(|| invalid(describe()))?;
    Ok(Mapped {
        user_addr,
        region: Arc::new(region_mmap),
    })
}

/// Refuse a memory map with a region that extends past the end of its backing file.
fn check_backing(mem: &GuestMemory) -> io::Result<()> {
    for region in mem.iter() {
        let Some(file_offset) = region.file_offset() else {
            continue;
        };
        let meta = file_offset.file().metadata()?;
        // Devices (a DAX character device, say) have no size to check against.
        if !meta.file_type().is_file() {
            continue;
        }
        let end = file_offset.start().checked_add(region.len());
        if end.is_none_or(|end| end > meta.len()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "guest memory at {:#x}: {} bytes at offset {} of a file of {} bytes",
                    region.start_addr().0,
                    region.len(),
                    file_offset.start(),
                    meta.len()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhost::shared_file::test_memfd;

    fn memfd(len: u64) -> File {
        test_memfd(c"memory-test", len)
    }

    fn map(file: File, offset: u64, len: usize) -> GuestMemory {
        let mapping = MmapRegion::from_file(FileOffset::new(file, offset), len).unwrap();
        let region = GuestRegionMmap::new(mapping, GuestAddress(0)).unwrap();
        GuestMemory::from_regions(vec![region]).unwrap()
    }

    #[test]
    fn regions_within_their_files_pass() {
        assert!(check_backing(&map(memfd(1 << 20), 0, 1 << 20)).is_ok());
        assert!(check_backing(&map(memfd(1 << 20), 4096, (1 << 20) - 4096)).is_ok());
        let anonymous = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(check_backing(&anonymous).is_ok());
        assert!(check_backing(&GuestMemory::new()).is_ok());
    }

    #[test]
    fn regions_past_the_end_of_their_files_are_refused() {
        let short = check_backing(&map(memfd(64 << 10), 0, 1 << 20)).unwrap_err();
        assert_eq!(short.kind(), io::ErrorKind::InvalidInput);
        assert!(check_backing(&map(memfd(1 << 20), 4096, 1 << 20)).is_err());
    }
}
