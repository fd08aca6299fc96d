//! Transfers between guest buffers and a file outside the engines' normal course: building the
//! operation, finishing one the kernel cut short, and direct I/O from unaligned buffers.

use std::io;
use std::os::fd::RawFd;

use super::{run_sync, Op};
use crate::block::file::AlignedBuf;
use crate::block::GuestIo;
use crate::iov::Cursor;

/// Where a read or write goes.
#[derive(Clone, Copy, Debug)]
pub struct Transfer {
    pub fd: RawFd,
    pub offset: u64,
    pub write: bool,
}

impl Transfer {
    /// The operation moving `iov`'s bytes. `iov` must outlive the operation.
    pub fn op(self, iov: &[libc::iovec]) -> Op {
        let (fd, offset) = (self.fd, self.offset);
        let (iov, iovcnt) = (iov.as_ptr(), iov.len() as u32);
        if self.write {
            Op::Writev {
                fd,
                offset,
                iov,
                iovcnt,
            }
        } else {
            Op::Readv {
                fd,
                offset,
                iov,
                iovcnt,
            }
        }
    }

    /// The transfer an operation performs, and its iovecs; `None` for other operations.
    ///
    /// # Safety
    /// The iovec array `op` points to must be valid for `'a`.
    unsafe fn of<'a>(op: Op) -> Option<(Transfer, &'a [libc::iovec])> {
        let (fd, offset, iov, iovcnt, write) = match op {
            Op::Readv {
                fd,
                offset,
                iov,
                iovcnt,
            } => (fd, offset, iov, iovcnt, false),
            Op::Writev {
                fd,
                offset,
                iov,
                iovcnt,
            } => (fd, offset, iov, iovcnt, true),
            _ => return None,
        };
        // SAFETY: the caller guarantees the iovec array is valid for 'a.
        let iovecs = unsafe { std::slice::from_raw_parts(iov, iovcnt as usize) };
        Some((Transfer { fd, offset, write }, iovecs))
    }
}

/// Whether every buffer of `iovecs` starts and ends on an `align` boundary.
pub fn is_aligned(iovecs: &[libc::iovec], align: u64) -> bool {
    let align = align as usize;
    iovecs.iter().all(|iov| {
        (iov.iov_base as usize).is_multiple_of(align) && iov.iov_len.is_multiple_of(align)
    })
}

/// Zero the guest buffers a read of an unallocated range targets.
///
/// # Safety
/// Every iovec must name memory valid for writes that nothing else accesses meanwhile.
pub unsafe fn fill_zero(iovecs: &[libc::iovec]) {
    // SAFETY: forwarded contract.
    unsafe { fill_zero_from(iovecs, 0) }
}

/// Zero the bytes of `iovecs` from byte `from` of them on (the tail of a short read).
///
/// # Safety
/// As for [`fill_zero`].
pub unsafe fn fill_zero_from(iovecs: &[libc::iovec], from: usize) {
    let mut skip = from;
    for iov in iovecs {
        if skip >= iov.iov_len {
            skip -= iov.iov_len;
            continue;
        }
        // SAFETY: the caller guarantees the buffer is valid for `iov_len` bytes of writes;
        // `skip < iov_len`.
        unsafe {
            libc::memset(
                iov.iov_base.cast::<u8>().add(skip).cast(),
                0,
                iov.iov_len - skip,
            )
        };
        skip = 0;
    }
}

/// Carry out a direct-I/O transfer whose guest buffers are not aligned through an aligned
/// bounce buffer, synchronously (guests normally align their buffers).
///
/// # Safety
/// `iovecs` must name `len` bytes of memory valid for reads and writes during the call, which
/// nothing else accesses meanwhile.
pub unsafe fn bounce_transfer(
    transfer: Transfer,
    iovecs: &[libc::iovec],
    len: u64,
    align: u64,
) -> io::Result<()> {
    let mut buf = AlignedBuf::zeroed(len as usize, align as usize)?;
    // SAFETY: forwarded contract.
    let guest = unsafe { GuestIo::new(iovecs) };
    let bytes = &mut buf.as_mut_slice()[..len as usize];
    if transfer.write {
        guest.read(0, bytes);
    }
    let bounce = [libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: bytes.len(),
    }];
    let op = transfer.op(&bounce);
    // SAFETY: `bounce` points into `buf`, both alive for the call.
    let ret = unsafe { run_sync(op) };
    if ret < 0 {
        return Err(io::Error::from_raw_os_error(-ret));
    }
    if (ret as u64) < len {
        // SAFETY: as above.
        unsafe { finish_short_transfer(op, ret as u64, len)? };
    }
    if !transfer.write {
        guest.write(0, bytes);
    }
    Ok(())
}

/// Finish, synchronously, a transfer the kernel cut short after `done` of `expected` bytes.
///
/// # Safety
/// The iovecs `op` points to, and the buffers they name, must be valid for the call.
pub unsafe fn finish_short_transfer(op: Op, mut done: u64, expected: u64) -> io::Result<()> {
    // SAFETY: forwarded contract.
    let Some((transfer, iovecs)) = (unsafe { Transfer::of(op) }) else {
        return Ok(());
    };
    let mut rest = Vec::with_capacity(iovecs.len());
    while done < expected {
        rest.clear();
        let mut cursor = Cursor::new(iovecs);
        cursor.skip(done);
        cursor.take(expected - done, |iov| rest.push(iov));
        let op = Transfer {
            offset: transfer.offset + done,
            ..transfer
        }
        .op(&rest);
        // SAFETY: `rest` names the unfinished part of the same live buffers.
        let ret = unsafe { run_sync(op) };
        if ret < 0 {
            return Err(io::Error::from_raw_os_error(-ret));
        }
        if ret == 0 {
            // End of file inside the disk: the file shrank under us.
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        done += ret as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn iovecs(bufs: &mut [Vec<u8>]) -> Vec<libc::iovec> {
        bufs.iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect()
    }

    fn temp_file(name: &str, content: &[u8]) -> (std::fs::File, std::path::PathBuf) {
        let path =
            std::env::temp_dir().join(format!("vubd-transfer-{}-{name}", std::process::id()));
        std::fs::write(&path, content).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (file, path)
    }

    #[test]
    fn a_short_read_is_finished_where_it_stopped() {
        let data: Vec<u8> = (0..100u8).collect();
        let (file, path) = temp_file("short", &data);
        let mut bufs = vec![vec![0u8; 30], vec![0u8; 70]];
        let iov = iovecs(&mut bufs);
        let op = Transfer {
            fd: file.as_raw_fd(),
            offset: 0,
            write: false,
        }
        .op(&iov);
        // As if the kernel had moved the first 45 bytes.
        bufs_prefill(&iov, &data[..45]);
        // SAFETY: the iovecs name `bufs`, alive for the call.
        unsafe { finish_short_transfer(op, 45, 100) }.unwrap();
        assert_eq!([&bufs[0][..], &bufs[1][..]].concat(), data);
        let _ = std::fs::remove_file(path);
    }

    fn bufs_prefill(iov: &[libc::iovec], bytes: &[u8]) {
        // SAFETY: the iovecs name live test buffers.
        unsafe { GuestIo::new(iov) }.write(0, bytes);
    }

    #[test]
    fn bounce_transfers_move_unaligned_buffers_both_ways() {
        let (file, path) = temp_file("bounce", &[0u8; 4096]);
        let mut bufs = vec![vec![7u8; 1000], vec![9u8; 3096]];
        let iov = iovecs(&mut bufs);
        let t = Transfer {
            fd: file.as_raw_fd(),
            offset: 0,
            write: true,
        };
        // SAFETY: the iovecs name `bufs`, alive for the calls.
        unsafe { bounce_transfer(t, &iov, 4096, 512) }.unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[..1000], &[7u8; 1000][..]);
        assert_eq!(&on_disk[1000..], &[9u8; 3096][..]);
        let mut back = vec![vec![0u8; 4000], vec![0u8; 96]];
        let iov = iovecs(&mut back);
        let t = Transfer { write: false, ..t };
        // SAFETY: as above.
        unsafe { bounce_transfer(t, &iov, 4096, 512) }.unwrap();
        assert_eq!([&back[0][..], &back[1][..]].concat(), on_disk);
        assert!(!is_aligned(&iov, 512));
        let _ = std::fs::remove_file(path);
    }
}
