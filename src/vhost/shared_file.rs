//! Files a frontend shares besides guest memory (the in-flight region, the dirty log), mapped
//! after checking that they hold what the frontend claims: touching a page past the end of a
//! file raises SIGBUS, which would kill the daemon.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `size` bytes at `offset` of a frontend's file, mapped shared and writable; unmapped on drop.
pub struct SharedMapping {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by this value; its users access the shared bytes only through
// atomics.
unsafe impl Send for SharedMapping {}
// SAFETY: as above.
unsafe impl Sync for SharedMapping {}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

impl SharedMapping {
    /// Map `size` bytes at `offset` of `file`, which must hold them; `what` names the file in
    /// errors ("dirty log", "inflight region").
    pub fn new(file: &File, offset: u64, size: u64, what: &str) -> io::Result<SharedMapping> {
        let len = usize::try_from(size)
            .ok()
            .filter(|len| *len > 0)
            .ok_or_else(|| invalid(format!("{what} of {size} bytes")))?;
        let file_len = file.metadata()?.len();
        if offset.checked_add(size).is_none_or(|end| end > file_len) {
            return Err(invalid(format!(
                "{what} of {size} bytes at offset {offset} of a file of {file_len} bytes"
            )));
        }
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| invalid(format!("{what} at offset {offset}")))?;
        // SAFETY: a new shared mapping of a file we hold, owned and unmapped by the returned
        // value; the kernel checks the offset's alignment.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedMapping {
            base: base.cast(),
            len,
        })
    }

    /// Refuse `file` unless it is sealed against shrinking: a file the frontend could still
    /// shrink would raise SIGBUS later, whatever was checked when it was mapped.
    pub fn require_shrink_seal(file: &File, what: &str) -> io::Result<()> {
        // SAFETY: F_GET_SEALS on a descriptor we hold.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(invalid(format!(
                "{what} file is not sealed against shrinking (F_SEAL_SHRINK)"
            )));
        }
        Ok(())
    }

    pub fn base(&self) -> *mut u8 {
        self.base
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this value created and solely owns.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// A memfd of `len` bytes, for the tests of the modules that map frontend files.
#[cfg(test)]
pub fn test_memfd(name: &std::ffi::CStr, len: u64) -> File {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a new descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    file
}
