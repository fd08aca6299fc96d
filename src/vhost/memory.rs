//! Checks on the guest memory a frontend shares before vubd's queues may touch it.
//!
//! vubd reads rings, descriptors, request headers and segments and writes used entries and
//! status bytes with plain loads and stores into the frontend's mappings. A region mapped from
//! a file that is shorter than the region has pages with nothing behind them, and touching one
//! raises SIGBUS, which kills the daemon: a frontend that shares a 64 KiB memfd as 16 MiB of
//! guest memory could take vubd down with one request. vhost-user-backend maps whatever the
//! frontend describes, so vubd checks the map it is handed (`update_memory`) and refuses it
//! (the frontend gets a NACK and the connection ends) before its queues ever see it.
//!
//! What cannot be checked here: a frontend that shrinks the file later, after vubd accepted
//! it. Memory a frontend shares with F_SEAL_SHRINK (QEMU's memfd backend seals by default) is
//! safe from that; other files are as trustworthy as the frontend.

use std::io;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::virtio_blk::request::GuestMemory;

/// Refuse a memory map with a region that extends past the end of its backing file.
pub(super) fn check_backing(mem: &GuestMemory) -> io::Result<()> {
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
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

    fn memfd(len: u64) -> File {
        // SAFETY: memfd_create with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"memory-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        file
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
