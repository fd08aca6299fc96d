//! vhost-user messages written by hand on a `UnixStream`, for what the `vhost` crate's
//! `Frontend` cannot be made to send: messages out of order, wrong payload sizes, unknown
//! request codes, too many or too few file descriptors.
//!
//! Wire format (vhost-user spec, "Message Specification"): a 12-byte header `{request: u32,
//! flags: u32, size: u32}` in native (little) endianness, `flags` holding the version (1) and
//! the REPLY / NEED_REPLY bits, then `size` bytes of payload; file descriptors travel as
//! `SCM_RIGHTS` ancillary data with the header.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Request codes (the `FrontendReq` numbering of the spec).
pub mod req {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const SEND_RARP: u32 = 19;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const RESET_DEVICE: u32 = 34;
    pub const ADD_MEM_REG: u32 = 37;
}

/// Header flags: protocol version 1, and "the sender wants an ack".
pub const VERSION: u32 = 0x1;
pub const REPLY: u32 = 0x4;
pub const NEED_REPLY: u32 = 0x8;
/// Protocol feature bits.
pub const PROTOCOL_F_MQ: u64 = 1 << 0;
pub const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;
pub const PROTOCOL_F_CONFIG: u64 = 1 << 9;

/// A message received from the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub request: u32,
    pub flags: u32,
    pub payload: Vec<u8>,
}

impl Msg {
    /// The payload as the u64 most replies (and every ack) carry.
    pub fn u64(&self) -> u64 {
        u64::from_le_bytes(self.payload[..8].try_into().expect("8-byte payload"))
    }
}

/// What came back when a reply was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Msg(Msg),
    /// The backend closed the connection.
    Closed,
    /// Nothing within the timeout, the connection still open.
    Silent,
}

/// One raw frontend connection.
pub struct RawConn {
    pub stream: UnixStream,
}

impl RawConn {
    pub fn connect(socket: &Path) -> RawConn {
        let stream = UnixStream::connect(socket).expect("connect to vubd");
        RawConn { stream }
    }

    /// Send a message whose header says `payload.len()` bytes follow.
    pub fn send(&mut self, request: u32, flags: u32, payload: &[u8], fds: &[RawFd]) {
        let mut bytes = header(request, flags, payload.len() as u32);
        bytes.extend_from_slice(payload);
        self.send_bytes(&bytes, fds);
    }

    /// Send a version-1 request without NEED_REPLY.
    pub fn request(&mut self, request: u32, payload: &[u8], fds: &[RawFd]) {
        self.send(request, VERSION, payload, fds);
    }

    /// Send a request with NEED_REPLY and wait for what comes back.
    pub fn ack(&mut self, request: u32, payload: &[u8], fds: &[RawFd]) -> Reply {
        self.send(request, VERSION | NEED_REPLY, payload, fds);
        self.recv(Duration::from_secs(5))
    }

    /// Send a request that has a reply (GET_*) and return it; panics on anything else.
    pub fn get(&mut self, request: u32, payload: &[u8]) -> Msg {
        self.request(request, payload, &[]);
        match self.recv(Duration::from_secs(5)) {
            Reply::Msg(msg) => {
                assert_eq!(msg.request, request, "reply to the request sent");
                assert_eq!(msg.flags & REPLY, REPLY, "reply flag");
                msg
            }
            other => panic!("request {request}: expected a reply, got {other:?}"),
        }
    }

    /// Send `bytes` as they are, with `fds` attached, in one `sendmsg`. A peer that has gone
    /// is not an error here: what the backend did is found out by reading.
    pub fn send_bytes(&mut self, bytes: &[u8], fds: &[RawFd]) {
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) } as usize;
        let mut control = vec![0u64; space.div_ceil(8)];
        // SAFETY: all-zero is a valid msghdr; the pointers set below outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: the control buffer has room for one header and `fds`, as sized above.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr(),
                    libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                    fds.len(),
                );
            }
        }
        // SAFETY: a valid msghdr on our own socket; MSG_NOSIGNAL: no SIGPIPE if vubd is gone.
        let _ = unsafe { libc::sendmsg(self.stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    }

    /// Read one message, waiting at most `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Reply {
        let mut hdr = [0u8; 12];
        match self.read_exact_within(&mut hdr, timeout) {
            Ok(true) => {}
            Ok(false) => return Reply::Closed,
            Err(e) if is_timeout(&e) => return Reply::Silent,
            Err(_) => return Reply::Closed,
        }
        let word = |i: usize| u32::from_le_bytes(hdr[4 * i..4 * i + 4].try_into().unwrap());
        let mut payload = vec![0u8; word(2) as usize];
        match self.read_exact_within(&mut payload, timeout) {
            Ok(true) => Reply::Msg(Msg {
                request: word(0),
                flags: word(1),
                payload,
            }),
            _ => Reply::Closed,
        }
    }

    /// Whether the backend closes the connection within `timeout` (replies it sends meanwhile
    /// are read and dropped).
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if is_timeout(&e) => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
    }

    /// Fill `buf`; `Ok(false)` on a clean end of stream before the first byte.
    fn read_exact_within(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<bool> {
        self.stream.set_read_timeout(Some(timeout))?;
        let mut filled = 0;
        while filled < buf.len() {
            match self.stream.read(&mut buf[filled..]) {
                Ok(0) if filled == 0 => return Ok(false),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A message header.
pub fn header(request: u32, flags: u32, size: u32) -> Vec<u8> {
    [request, flags, size]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

/// A u64 payload (features, SET_VRING_KICK/CALL's index and flags).
pub fn u64_payload(value: u64) -> Vec<u8> {
    value.to_le_bytes().to_vec()
}

/// `struct vhost_vring_state`: index and number.
pub fn vring_state(index: u32, num: u32) -> Vec<u8> {
    [index, num].iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// `struct vhost_vring_addr`: index, flags, then the descriptor table, used ring, available
/// ring and log addresses (frontend virtual addresses).
pub fn vring_addr(index: u32, desc: u64, used: u64, avail: u64) -> Vec<u8> {
    let mut out = vring_state(index, 0);
    for a in [desc, used, avail, 0] {
        out.extend_from_slice(&a.to_le_bytes());
    }
    out
}

/// One `VhostUserMemoryRegion`: guest address, size, frontend virtual address, offset in fd.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    pub guest_addr: u64,
    pub size: u64,
    pub user_addr: u64,
    pub mmap_offset: u64,
}

impl Region {
    fn bytes(&self) -> Vec<u8> {
        [self.guest_addr, self.size, self.user_addr, self.mmap_offset]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect()
    }
}

/// SET_MEM_TABLE's payload: a region count (`num_regions`, which may lie) and the regions.
pub fn mem_table(num_regions: u32, regions: &[Region]) -> Vec<u8> {
    let mut out = vring_state(num_regions, 0);
    for r in regions {
        out.extend_from_slice(&r.bytes());
    }
    out
}

/// ADD_MEM_REG's payload: 8 bytes of padding and one region.
pub fn single_region(region: &Region) -> Vec<u8> {
    let mut out = vec![0u8; 8];
    out.extend_from_slice(&region.bytes());
    out
}
