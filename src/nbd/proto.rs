//! NBD wire format: magic numbers, option and command codes, flags, and the big-endian headers
//! of the handshake and transmission phases (proto.md, "Protocol phases" and "Values").
//!
//! Everything here is pure: encoders append to a `Vec<u8>`, decoders take a fixed-size array
//! already read off the wire, so the connection code decides how many bytes it reads.

/// "NBDMAGIC", the first 8 bytes the server sends (proto.md, "Newstyle negotiation").
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": the server's second magic, and the start of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of every option reply ("Option reply" in proto.md).
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Request magic (transmission phase, compact headers).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply chunk magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags ("Transmission flags").
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;

// Options ("Option types").
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types ("Option reply types"); errors have bit 31 set.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// Information types for NBD_OPT_INFO / NBD_OPT_GO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands ("Request types").
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// Block status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:` contexts: the one flag QEMU defines.
pub const STATE_DIRTY: u32 = 1 << 0;

// Errors ("Error values"): Linux errno values, which NBD adopted.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// The block size constraints every export advertises (NBD_INFO_BLOCK_SIZE): any byte is
/// addressable, 4 KiB is what the graph below prefers, and 32 MiB is the largest payload
/// (proto.md, "Block size constraints": 2^25 is what every client accepts).
pub const MIN_BLOCK: u32 = 1;
pub const PREFERRED_BLOCK: u32 = 4096;
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Longest string (export name, query, message) the spec allows ("Conventions").
pub const MAX_STRING: usize = 4096;
/// Longest option payload we accept: more than enough for a name, a description request and
/// many meta-context queries. Longer options are answered NBD_REP_ERR_TOO_BIG and the
/// connection is closed, without reading (or allocating) what the client claims.
pub const MAX_OPTION: u32 = 64 << 10;
/// Most meta-context queries in one option (proto.md allows NBD_REP_ERR_TOO_BIG beyond a
/// server's limit).
pub const MAX_QUERIES: u32 = 1024;
/// Most extents per NBD_REPLY_TYPE_BLOCK_STATUS chunk: proto.md says servers SHOULD NOT send
/// more than 2^20; QEMU caps at 2^17. Ours keeps a reply under 512 KiB.
pub const MAX_EXTENTS: usize = 1 << 16;

/// Errno values NBD defines; anything else a source reports becomes EIO.
pub fn nbd_errno(e: &std::io::Error) -> u32 {
    match e.raw_os_error() {
        Some(n) => match u32::try_from(n) {
            Ok(v @ (EPERM | EIO | ENOMEM | EINVAL | ENOSPC | EOVERFLOW | ENOTSUP | ESHUTDOWN)) => v,
            _ => EIO,
        },
        None => EIO,
    }
}

/// The server's first 18 bytes: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// An option header as the client sends it (after its 8-byte IHAVEOPT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub magic: u64,
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub const SIZE: usize = 16;

    pub fn decode(b: &[u8; Self::SIZE]) -> OptionHeader {
        OptionHeader {
            magic: u64::from_be_bytes(arr(&b[0..8])),
            option: u32::from_be_bytes(arr(&b[8..12])),
            length: u32::from_be_bytes(arr(&b[12..16])),
        }
    }
}

/// Append an option reply header (data follows, `len` bytes).
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, len: u32) {
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// A transmission request (compact header, proto.md "Request message").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub magic: u32,
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub const SIZE: usize = 28;

    pub fn decode(b: &[u8; Self::SIZE]) -> Request {
        Request {
            magic: u32::from_be_bytes(arr(&b[0..4])),
            flags: u16::from_be_bytes(arr(&b[4..6])),
            kind: u16::from_be_bytes(arr(&b[6..8])),
            cookie: u64::from_be_bytes(arr(&b[8..16])),
            offset: u64::from_be_bytes(arr(&b[16..24])),
            length: u32::from_be_bytes(arr(&b[24..28])),
        }
    }

    pub fn encode(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&self.magic.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Append a simple reply header (read data, if any, follows).
pub fn put_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Append a structured reply chunk header (`len` payload bytes follow).
pub fn put_chunk(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Size of a structured reply chunk header.
pub const CHUNK_HEADER: usize = 20;
/// Size of a simple reply header.
pub const SIMPLE_HEADER: usize = 16;

/// A fixed-size array from a slice of exactly that length (callers slice with constant
/// bounds inside a fixed-size array, so the length always matches).
fn arr<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(s);
    a
}

/// A cursor over an option's payload: every read checks the remaining length, so a payload
/// whose inner lengths disagree with the option length is refused, never over-read.
pub struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { data }
    }

    pub fn remaining(&self) -> usize {
        self.data.len()
    }

    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.data.len() {
            return None;
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Some(head)
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes(arr(b)))
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes(arr(b)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let r = Request {
            magic: REQUEST_MAGIC,
            flags: CMD_FLAG_REQ_ONE,
            kind: CMD_BLOCK_STATUS,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        assert_eq!(Request::decode(&r.encode()), r);
        assert_eq!(&r.encode()[0..4], &[0x25, 0x60, 0x95, 0x13]);
    }

    #[test]
    fn greeting_bytes() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(
            nbd_errno(&std::io::Error::from_raw_os_error(libc::ENOSPC)),
            ENOSPC
        );
        assert_eq!(
            nbd_errno(&std::io::Error::from_raw_os_error(libc::EBADF)),
            EIO
        );
        assert_eq!(nbd_errno(&std::io::Error::other("x")), EIO);
    }

    #[test]
    fn cursor_bounds() {
        let mut c = Cursor::new(&[0, 0, 0, 5, 1]);
        assert_eq!(c.u32(), Some(5));
        assert_eq!(c.u16(), None);
        assert_eq!(c.take(1), Some(&[1u8][..]));
        assert_eq!(c.remaining(), 0);
    }
}
