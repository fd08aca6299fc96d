//! Image locking, compatible with QEMU's (`block/file-posix.c`), so that vubd, QEMU,
//! qemu-storage-daemon and qemu-img refuse to write an image another of them is using.
//!
//! QEMU describes a user of a file by two sets of permissions: those it holds and those it
//! shares with other users. Each permission `i` has two lock bytes, taken as shared
//! (read) open-file-description locks, which several processes can hold at once:
//! byte `100 + i` says "I hold permission i", byte `200 + i` says "I do not share it". A new
//! user conflicts with the file's current users when a byte it needs free is locked: for each
//! permission it holds, `200 + i` (someone refuses to share it); for each permission it does
//! not share, `100 + i` (someone holds it). The test is `F_OFD_GETLK` for a write lock, which
//! reports any other open file description's lock.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

/// Byte of "holds permission i" (QEMU's `RAW_LOCK_PERM_BASE`).
const PERM_BASE: i64 = 100;
/// Byte of "does not share permission i" (QEMU's `RAW_LOCK_SHARED_BASE`).
const SHARED_BASE: i64 = 200;

/// QEMU's block permissions (`BLK_PERM_*`), as bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permissions(u8);

impl Permissions {
    pub const CONSISTENT_READ: Permissions = Permissions(1 << 0);
    pub const WRITE: Permissions = Permissions(1 << 1);
    pub const WRITE_UNCHANGED: Permissions = Permissions(1 << 2);
    pub const RESIZE: Permissions = Permissions(1 << 3);
    const COUNT: u8 = 4;
    const NAMES: [&'static str; Self::COUNT as usize] =
        ["consistent read", "write", "write unchanged", "resize"];

    const fn union(self, other: Permissions) -> Permissions {
        Permissions(self.0 | other.0)
    }

    fn has(self, bit: u8) -> bool {
        self.0 & (1 << bit) != 0
    }
}

/// How a node uses its file: the permissions it holds and those it lets others hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockRequest {
    pub hold: Permissions,
    pub share: Permissions,
}

impl LockRequest {
    /// A node that writes the file and may grow it, as QEMU's writable images and data files
    /// do: other readers are fine, other writers and resizers are not.
    pub const WRITER: LockRequest = LockRequest {
        hold: Permissions::CONSISTENT_READ
            .union(Permissions::WRITE)
            .union(Permissions::RESIZE),
        share: Permissions::CONSISTENT_READ.union(Permissions::WRITE_UNCHANGED),
    };

    /// A node that only reads the file and needs it not to change underneath it (read-only
    /// devices, backing files, image inspection): other readers are fine, writers are not.
    pub const READER: LockRequest = LockRequest {
        hold: Permissions::CONSISTENT_READ,
        share: Permissions::CONSISTENT_READ.union(Permissions::WRITE_UNCHANGED),
    };

    pub fn for_access(read_only: bool) -> LockRequest {
        if read_only {
            Self::READER
        } else {
            Self::WRITER
        }
    }
}

/// Why a lock could not be taken.
#[derive(Debug)]
pub enum LockError {
    /// Another process uses the file in a way this request cannot coexist with.
    Conflict {
        what: String,
    },
    Io(io::Error),
}

/// Take `request`'s locks on `file`, then check that no other user conflicts with it. The
/// locks last as long as the open file description (closing it releases them).
///
/// Locks are taken before the check, as QEMU does: of two processes opening at once, at
/// least one sees the other. A file system without OFD locks leaves the file unlocked, with a
/// warning, as QEMU's `locking=auto` does.
pub fn acquire(file: &File, path: &Path, request: LockRequest) -> Result<(), LockError> {
    let fd = file.as_raw_fd();
    for bit in 0..Permissions::COUNT {
        let mut bytes = Vec::with_capacity(2);
        if request.hold.has(bit) {
            bytes.push(PERM_BASE + i64::from(bit));
        }
        if !request.share.has(bit) {
            bytes.push(SHARED_BASE + i64::from(bit));
        }
        for byte in bytes {
            if let Err(e) = set_read_lock(fd, byte) {
                if unsupported(&e) {
                    log::warn!(
                        "{}: the file system does not support OFD locks; the image is not \
                         locked against other users",
                        path.display()
                    );
                    return Ok(());
                }
                return Err(LockError::Io(e));
            }
        }
    }
    // A process killed while its I/O was in flight keeps its locks until the kernel has
    // finished that I/O (io_uring holds the file until then; a few milliseconds were seen
    // after SIGKILL). A vubd restarted at once by a supervisor would refuse the image: give a
    // dying holder a moment before calling it a conflict.
    let started = Instant::now();
    loop {
        match conflict(fd, request)? {
            None => return Ok(()),
            Some(what) if started.elapsed() >= CONFLICT_GRACE => {
                return Err(LockError::Conflict { what })
            }
            Some(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// How long a conflicting lock may take to go away before it is an error.
const CONFLICT_GRACE: Duration = Duration::from_millis(500);

/// What another user holds that conflicts with `request`, if anything.
fn conflict(fd: i32, request: LockRequest) -> Result<Option<String>, LockError> {
    for bit in 0..Permissions::COUNT {
        let name = Permissions::NAMES[usize::from(bit)];
        if request.hold.has(bit) && locked_by_other(fd, SHARED_BASE + i64::from(bit))? {
            return Ok(Some(format!(
                "another process does not share the \"{name}\" permission"
            )));
        }
        if !request.share.has(bit) && locked_by_other(fd, PERM_BASE + i64::from(bit))? {
            return Ok(Some(format!(
                "another process holds the \"{name}\" permission"
            )));
        }
    }
    Ok(None)
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS)
    )
}

fn flock_at(byte: i64, kind: libc::c_int) -> libc::flock {
    // SAFETY: `flock` is plain old data; all-zero is a valid value (l_pid must be 0 for OFD
    // locks).
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = byte;
    lock.l_len = 1;
    lock
}

fn set_read_lock(fd: i32, byte: i64) -> io::Result<()> {
    let lock = flock_at(byte, libc::F_RDLCK);
    // SAFETY: `lock` is a valid flock for the duration of the call; `fd` is an open file.
    if unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &lock) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file description holds a lock on `byte`.
fn locked_by_other(fd: i32, byte: i64) -> Result<bool, LockError> {
    let mut lock = flock_at(byte, libc::F_WRLCK);
    // SAFETY: as in `set_read_lock`; the kernel writes the conflicting lock, if any, back
    // into `lock`.
    if unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut lock) } < 0 {
        return Err(LockError::Io(io::Error::last_os_error()));
    }
    Ok(lock.l_type != libc::F_UNLCK as libc::c_short)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn open(path: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap()
    }

    #[test]
    fn writers_exclude_each_other_and_readers_but_readers_share() {
        let dir = std::env::temp_dir().join(format!("vubd-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("image");
        // Separate open file descriptions behave like separate processes.
        let (a, b, c) = (open(&path), open(&path), open(&path));

        acquire(&a, &path, LockRequest::READER).unwrap();
        acquire(&b, &path, LockRequest::READER).unwrap();
        assert!(matches!(
            acquire(&c, &path, LockRequest::WRITER),
            Err(LockError::Conflict { .. })
        ));
        drop((a, b, c));

        let (a, b) = (open(&path), open(&path));
        acquire(&a, &path, LockRequest::WRITER).unwrap();
        for request in [LockRequest::WRITER, LockRequest::READER] {
            let other = open(&path);
            assert!(matches!(
                acquire(&other, &path, request),
                Err(LockError::Conflict { .. })
            ));
        }
        drop(a);
        // Closing the writer releases its locks.
        acquire(&b, &path, LockRequest::WRITER).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
