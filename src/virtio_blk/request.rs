//! Parsing and validation of virtio-blk requests (VIRTIO 1.2, 5.2.6).
//!
//! A request is a descriptor chain whose device-readable bytes start with a 16-byte header and
//! whose device-writable bytes end with a one-byte status. The specification lets the driver cut
//! those bytes into descriptors however it likes (`VIRTIO_F_VERSION_1` implies any layout), so
//! the parser treats the chain as two byte streams and never assumes a descriptor boundary.
//!
//! The guest is untrusted. [`parse`] checks everything before any I/O happens: the chain's shape,
//! the header, the data length and range, every data buffer being inside guest memory, and the
//! discard/write-zeroes segments. A request that fails a check and still has a usable status byte
//! is answered `IOERR` or `UNSUPP`; one without a status byte is dropped.

use std::ops::Deref;

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{request_type, DeviceLimits, Status, ID_BYTES, SECTOR_SIZE, SEGMENT_FLAG_UNMAP};
use crate::iov::{total_len, Cursor, GuestRange};

/// The guest memory type the daemon maps. vm-memory's own dirty tracking is not used: vubd
/// writes guest memory through raw pointers too, and logs every write itself (`vhost::dirty_log`).
pub type GuestMemory = GuestMemoryMmap<()>;

/// Size of `struct virtio_blk_req`'s header (`type`, `reserved`, `sector`).
pub const HEADER_SIZE: usize = 16;

/// Wire layout of the request header.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct RequestHeader {
    request_type: u32,
    reserved: u32,
    sector: u64,
}
// SAFETY: plain integers, no padding (4 + 4 + 8 bytes, 8-byte aligned).
unsafe impl ByteValued for RequestHeader {}

/// Wire layout of `struct virtio_blk_discard_write_zeroes`.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct SegmentWire {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}
// SAFETY: plain integers, no padding (8 + 4 + 4 bytes, 8-byte aligned).
unsafe impl ByteValued for SegmentWire {}
const SEGMENT_SIZE: u64 = std::mem::size_of::<SegmentWire>() as u64;

/// One validated discard or write-zeroes range, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub len: u64,
    /// Write zeroes only: the device may deallocate the range.
    pub unmap: bool,
}

/// What a validated request asks for. Data buffers and segments are in [`RequestBuffers`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `len` bytes at byte `offset` into the data iovecs.
    Read {
        offset: u64,
        len: u64,
    },
    /// Write `len` bytes from the data iovecs at byte `offset`.
    Write {
        offset: u64,
        len: u64,
    },
    Flush,
    /// Copy the device ID into the data iovecs (at most [`ID_BYTES`] long).
    GetId,
    /// Deallocate the segments; reads of them afterwards return unspecified data.
    Discard,
    /// Zero the segments, deallocating those with `unmap`.
    WriteZeroes,
}

/// A request that passed every check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    /// Guest address of the status byte.
    pub status: GuestAddress,
    /// Bytes the device writes into the chain if the request succeeds, status byte included:
    /// the used ring's `len` (a `u32`, so the parser refuses requests that would exceed it).
    pub used_len: u32,
}

/// Why a chain was refused.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    #[error("chain has no device-writable status byte")]
    NoStatus,
    #[error(
        "chain is cut short: a descriptor loops, points outside its table, nests an \
         indirect table, or takes the chain past 4 GiB"
    )]
    Truncated,
    #[error("status byte outside guest memory")]
    StatusOutsideMemory,
    #[error("device-readable descriptor after a device-writable one")]
    Misordered,
    #[error("chain uses more than {} buffers", DeviceLimits::MAX_IOVECS)]
    TooManyBuffers,
    #[error("header shorter than 16 bytes")]
    ShortHeader,
    #[error("header outside guest memory")]
    HeaderOutsideMemory,
    #[error("request type {0} is not supported")]
    UnsupportedType(u32),
    #[error("data buffer has the wrong direction for the request type")]
    WrongDirection,
    #[error("data length {0} is not a multiple of the logical block size")]
    UnalignedLength(u64),
    #[error("sector {0} is not aligned to the logical block size")]
    UnalignedSector(u64),
    #[error("range at sector {sector} of {len} bytes is beyond the end of the disk")]
    OutOfRange { sector: u64, len: u64 },
    #[error("data buffer outside guest memory")]
    BufferOutsideMemory,
    #[error("read of {0} bytes does not fit the used ring's 32-bit length")]
    TooLong(u64),
    #[error("write to a read-only device")]
    ReadOnly,
    #[error("GET_ID without a data buffer")]
    EmptyIdBuffer,
    #[error("segment list of {0} bytes is not a whole number of 1 to max_discard_seg segments")]
    BadSegmentCount(u64),
    #[error("segment flags {0:#x} are not supported for this request type")]
    UnsupportedSegmentFlags(u32),
    #[error("segment of {0} sectors exceeds max_discard_sectors")]
    SegmentTooLong(u32),
}

/// A refused chain: `status` is where to report `code`, or `None` if the chain has no usable
/// status byte and must be dropped.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error("{reason}")]
pub struct RequestError {
    pub status: Option<GuestAddress>,
    pub code: Status,
    pub reason: Invalid,
}

/// Per-request storage the parser fills, reused from request to request so that parsing does
/// not allocate once warmed up.
#[derive(Default)]
pub struct RequestBuffers {
    /// Host addresses of the request's data buffers, in order.
    pub iovecs: IoVecs,
    /// Discard / write-zeroes segments.
    pub segments: Vec<Segment>,
    readable: Vec<GuestRange>,
    writable: Vec<GuestRange>,
}

impl RequestBuffers {
    /// The device-writable ranges of the last parsed chain, in order (the data, then the
    /// status byte): what the device may write into guest memory for it.
    pub fn writable(&self) -> &[GuestRange] {
        &self.writable
    }

    /// Buffers sized for common requests; they grow, at most to what `limits` allow, when a
    /// larger request comes, and keep that size for the next one.
    pub fn with_limits(limits: &DeviceLimits) -> Self {
        RequestBuffers {
            iovecs: IoVecs(Vec::with_capacity(8)),
            segments: Vec::with_capacity(limits.max_discard_seg.min(4) as usize),
            readable: Vec::with_capacity(4),
            writable: Vec::with_capacity(4),
        }
    }
}

/// A list of `iovec`s pointing into guest memory.
#[derive(Default)]
pub struct IoVecs(pub Vec<libc::iovec>);

// SAFETY: the pointers name guest memory mapped by this process. The queue that owns the list
// keeps that mapping alive (it holds the `GuestMemory` the pointers were taken from) for as
// long as the list is in use, whichever thread uses it.
unsafe impl Send for IoVecs {}

impl Deref for IoVecs {
    type Target = [libc::iovec];
    fn deref(&self) -> &[libc::iovec] {
        &self.0
    }
}

/// Parse and validate one descriptor chain.
///
/// On success the data buffers are in `bufs.iovecs` and the segments in `bufs.segments`.
///
/// `chain` yields the chain's descriptors in order: a virtio-queue `DescriptorChain` for a
/// popped request, vubd's own walker for one resubmitted after a restart.
pub fn parse(
    chain: &mut dyn Iterator<Item = Descriptor>,
    mem: &GuestMemory,
    limits: &DeviceLimits,
    bufs: &mut RequestBuffers,
) -> Result<Request, RequestError> {
    let status = collect_descriptors(chain, mem, bufs)?;
    let fail = |code, reason| RequestError {
        status: Some(status),
        code,
        reason,
    };
    let ioerr = |reason| fail(Status::IoErr, reason);

    let header = read_header(mem, &bufs.readable).map_err(ioerr)?;
    let readable_data = total_len(&bufs.readable) - HEADER_SIZE as u64;
    // The last writable byte is the status; everything before it is data.
    let writable_data = total_len(&bufs.writable) - 1;
    bufs.iovecs.0.clear();
    bufs.segments.clear();

    let request_type = u32::from_le(header.request_type);
    let sector = u64::from_le(header.sector);
    let (kind, used_len) = match request_type {
        request_type::IN => {
            if readable_data != 0 {
                return Err(ioerr(Invalid::WrongDirection));
            }
            let offset = data_range(sector, writable_data, limits).map_err(ioerr)?;
            let used_len = read_used_len(writable_data).map_err(ioerr)?;
            map_buffers(mem, &bufs.writable, 0, writable_data, &mut bufs.iovecs).map_err(ioerr)?;
            let kind = RequestKind::Read {
                offset,
                len: writable_data,
            };
            (kind, used_len)
        }
        request_type::OUT => {
            if writable_data != 0 {
                return Err(ioerr(Invalid::WrongDirection));
            }
            if limits.read_only {
                return Err(ioerr(Invalid::ReadOnly));
            }
            let offset = data_range(sector, readable_data, limits).map_err(ioerr)?;
            map_buffers(
                mem,
                &bufs.readable,
                HEADER_SIZE as u64,
                readable_data,
                &mut bufs.iovecs,
            )
            .map_err(ioerr)?;
            let kind = RequestKind::Write {
                offset,
                len: readable_data,
            };
            (kind, 1)
        }
        // A flush carries no data; the driver SHOULD NOT send any, and any it sends is ignored.
        request_type::FLUSH => (RequestKind::Flush, 1),
        request_type::GET_ID => {
            if readable_data != 0 {
                return Err(ioerr(Invalid::WrongDirection));
            }
            if writable_data == 0 {
                return Err(ioerr(Invalid::EmptyIdBuffer));
            }
            let len = writable_data.min(ID_BYTES as u64);
            map_buffers(mem, &bufs.writable, 0, len, &mut bufs.iovecs).map_err(ioerr)?;
            (RequestKind::GetId, len as u32 + 1)
        }
        request_type::DISCARD | request_type::WRITE_ZEROES => {
            let discard = request_type == request_type::DISCARD;
            if writable_data != 0 {
                return Err(ioerr(Invalid::WrongDirection));
            }
            if limits.read_only {
                return Err(ioerr(Invalid::ReadOnly));
            }
            read_segments(
                mem,
                &bufs.readable,
                readable_data,
                discard,
                limits,
                &mut bufs.segments,
            )
            .map_err(|reason| match reason {
                Invalid::UnsupportedSegmentFlags(_) => fail(Status::Unsupp, reason),
                _ => ioerr(reason),
            })?;
            let kind = if discard {
                RequestKind::Discard
            } else {
                RequestKind::WriteZeroes
            };
            (kind, 1)
        }
        other => return Err(fail(Status::Unsupp, Invalid::UnsupportedType(other))),
    };
    Ok(Request {
        kind,
        status,
        used_len,
    })
}

/// Sort the chain's descriptors into readable and writable ranges and locate the status byte.
fn collect_descriptors(
    chain: &mut dyn Iterator<Item = Descriptor>,
    mem: &GuestMemory,
    bufs: &mut RequestBuffers,
) -> Result<GuestAddress, RequestError> {
    bufs.readable.clear();
    bufs.writable.clear();
    let mut misordered = false;
    let mut too_many = false;
    // A descriptor whose end lies past the top of the address space.
    let mut wraps = false;
    // The last non-empty descriptor, and whether it is device-writable.
    let mut last: Option<(GuestRange, bool)> = None;
    // virtio-queue ends a chain it cannot follow (a loop cut at the table size, a next index
    // or indirect table it refuses, 4 GiB exceeded) without saying so; what gives it away is a
    // last descriptor that still says "next".
    let mut cut = false;
    for desc in chain {
        cut = desc.has_next();
        if desc.len() == 0 {
            continue;
        }
        let range = GuestRange {
            addr: desc.addr(),
            len: u64::from(desc.len()),
        };
        wraps |= range.addr.0.checked_add(range.len).is_none();
        last = Some((range, desc.is_write_only()));
        if desc.is_write_only() {
            push_bounded(&mut bufs.writable, range, &mut too_many);
        } else {
            misordered |= !bufs.writable.is_empty();
            push_bounded(&mut bufs.readable, range, &mut too_many);
        }
    }

    // The status byte is the last byte of the chain, which must be device-writable.
    let drop = |reason| RequestError {
        status: None,
        code: Status::IoErr,
        reason,
    };
    if cut {
        // Where the status byte would be is unknown: touch nothing, return the head.
        return Err(drop(Invalid::Truncated));
    }
    let last = match last {
        Some((range, true)) => range,
        _ => return Err(drop(Invalid::NoStatus)),
    };
    let status = last
        .addr
        .checked_add(last.len - 1)
        .filter(|addr| GuestMemoryBackend::check_range(mem, *addr, 1))
        .ok_or(drop(Invalid::StatusOutsideMemory))?;
    let fail = |reason| RequestError {
        status: Some(status),
        code: Status::IoErr,
        reason,
    };
    if too_many {
        return Err(fail(Invalid::TooManyBuffers));
    }
    if misordered {
        return Err(fail(Invalid::Misordered));
    }
    if total_len(&bufs.readable) < HEADER_SIZE as u64 {
        return Err(fail(Invalid::ShortHeader));
    }
    if wraps {
        return Err(fail(Invalid::BufferOutsideMemory));
    }
    Ok(status)
}

fn push_bounded(ranges: &mut Vec<GuestRange>, range: GuestRange, too_many: &mut bool) {
    if ranges.len() >= DeviceLimits::MAX_IOVECS {
        *too_many = true;
    } else {
        ranges.push(range);
    }
}

/// Fill `buf` from guest memory at the cursor, wherever the bytes are cut; `err` if they run
/// out or lie outside guest memory.
fn read_bytes(
    mem: &GuestMemory,
    cursor: &mut Cursor<GuestRange>,
    buf: &mut [u8],
    err: Invalid,
) -> Result<(), Invalid> {
    let mut filled = 0usize;
    let n = cursor.try_take(buf.len() as u64, |range| {
        let end = filled + range.len as usize;
        mem.read_slice(&mut buf[filled..end], range.addr)
            .map_err(|_| err)?;
        filled = end;
        Ok(())
    })?;
    if n < buf.len() as u64 {
        return Err(err);
    }
    Ok(())
}

/// Gather the 16-byte header from the start of the readable ranges, wherever it is cut.
#[inline]
/// The request type of the last chain parsed into `bufs`, if its header can be read: what a
/// refused request asked for, for the statistics.
pub fn request_type(mem: &GuestMemory, bufs: &RequestBuffers) -> Option<u32> {
    read_header(mem, &bufs.readable)
        .ok()
        .map(|h| u32::from_le(h.request_type))
}

fn read_header(mem: &GuestMemory, readable: &[GuestRange]) -> Result<RequestHeader, Invalid> {
    // Drivers put the header in a descriptor of its own: one read, no cursor.
    if let Some(first) = readable.first().filter(|r| r.len >= HEADER_SIZE as u64) {
        let mut header = RequestHeader::default();
        mem.read_slice(header.as_mut_slice(), first.addr)
            .map_err(|_| Invalid::HeaderOutsideMemory)?;
        return Ok(header);
    }
    let mut header = RequestHeader::default();
    read_bytes(
        mem,
        &mut Cursor::new(readable),
        header.as_mut_slice(),
        Invalid::HeaderOutsideMemory,
    )?;
    Ok(header)
}

/// The used length of a read of `data` bytes: the data and the status byte, which must fit the
/// used ring's 32-bit field.
fn read_used_len(data: u64) -> Result<u32, Invalid> {
    data.checked_add(1)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or(Invalid::TooLong(data))
}

/// Check a data transfer's range against the disk; returns its byte offset.
fn data_range(sector: u64, len: u64, limits: &DeviceLimits) -> Result<u64, Invalid> {
    let lbs = u64::from(limits.logical_block_size);
    if !len.is_multiple_of(lbs) {
        return Err(Invalid::UnalignedLength(len));
    }
    checked_byte_range(sector, len, limits)
}

/// Byte offset of `len` bytes at `sector`, checked for overflow, alignment and capacity.
fn checked_byte_range(sector: u64, len: u64, limits: &DeviceLimits) -> Result<u64, Invalid> {
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(Invalid::OutOfRange { sector, len })?;
    if offset % u64::from(limits.logical_block_size) != 0 {
        return Err(Invalid::UnalignedSector(sector));
    }
    match offset.checked_add(len) {
        Some(end) if end <= limits.capacity_bytes => Ok(offset),
        _ => Err(Invalid::OutOfRange { sector, len }),
    }
}

/// Translate `len` bytes of `ranges`, starting `skip` bytes in, to host iovecs.
fn map_buffers(
    mem: &GuestMemory,
    ranges: &[GuestRange],
    skip: u64,
    len: u64,
    out: &mut IoVecs,
) -> Result<(), Invalid> {
    let mut cursor = Cursor::new(ranges);
    cursor.skip(skip);
    let mut left = len;
    while left > 0 {
        let Some(range) = cursor.next_piece(left) else {
            break;
        };
        left -= range.len;
        for slice in GuestMemoryBackend::get_slices(mem, range.addr, range.len as usize) {
            let slice = slice.map_err(|_| Invalid::BufferOutsideMemory)?;
            if out.0.len() >= DeviceLimits::MAX_IOVECS {
                return Err(Invalid::TooManyBuffers);
            }
            out.0.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Ok(())
}

/// Read and validate the discard / write-zeroes segments that follow the header.
fn read_segments(
    mem: &GuestMemory,
    readable: &[GuestRange],
    data_len: u64,
    discard: bool,
    limits: &DeviceLimits,
    out: &mut Vec<Segment>,
) -> Result<(), Invalid> {
    let count = data_len / SEGMENT_SIZE;
    if !data_len.is_multiple_of(SEGMENT_SIZE)
        || count == 0
        || count > u64::from(limits.max_discard_seg)
    {
        return Err(Invalid::BadSegmentCount(data_len));
    }
    let mut wire = Vec::with_capacity(count as usize);
    let mut cursor = Cursor::new(readable);
    cursor.skip(HEADER_SIZE as u64);
    for _ in 0..count {
        let mut seg = SegmentWire::default();
        read_bytes(
            mem,
            &mut cursor,
            seg.as_mut_slice(),
            Invalid::BufferOutsideMemory,
        )?;
        wire.push(seg);
    }
    // Flags first: the specification demands UNSUPP for them whatever else is wrong.
    let allowed = if discard { 0 } else { SEGMENT_FLAG_UNMAP };
    if let Some(seg) = wire.iter().find(|s| u32::from_le(s.flags) & !allowed != 0) {
        return Err(Invalid::UnsupportedSegmentFlags(u32::from_le(seg.flags)));
    }
    for seg in wire {
        let sectors = u32::from_le(seg.num_sectors);
        if sectors > limits.max_discard_sectors {
            return Err(Invalid::SegmentTooLong(sectors));
        }
        let len = u64::from(sectors) * SECTOR_SIZE;
        let sector = u64::from_le(seg.sector);
        let offset = data_range(sector, len, limits)?;
        out.push(Segment {
            offset,
            len,
            unmap: u32::from_le(seg.flags) & SEGMENT_FLAG_UNMAP != 0,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
