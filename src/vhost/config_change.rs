//! Telling frontends that the device's configuration changed (a disk grown online):
//! `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on each connection's backend channel, after which
//! the frontend reads the config space again (`GET_CONFIG`) and raises the guest's
//! configuration interrupt; Linux's virtio-blk then revalidates the capacity.
//!
//! The `vhost` crate takes the channel from `SET_BACKEND_REQ_FD` but has no way to send this
//! message on it, so each connection's thread peeks at the next message before handing it to
//! the crate: when it is `SET_BACKEND_REQ_FD`, peeking with room for one descriptor has the
//! kernel install a duplicate of it (`MSG_PEEK` duplicates passed descriptors), which vubd
//! keeps. The crate's own copy is never used by vubd, so only one side writes the channel.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

/// `VHOST_USER_SET_BACKEND_REQ_FD` (frontend to backend).
const SET_BACKEND_REQ_FD: u32 = 21;
/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` (backend to frontend).
const CONFIG_CHANGE_MSG: u32 = 2;
/// The protocol version in a message's flags.
const VERSION: u32 = 0x1;
/// How long a notice may wait for room in a frontend's socket buffer: a frontend that does not
/// read its channel must not hold up a resize.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// The backend channels of a device's connections that can take configuration notices.
#[derive(Debug, Default)]
pub struct ConfigNotifier {
    channels: Mutex<BTreeMap<u64, UnixStream>>,
}

impl ConfigNotifier {
    /// Send notices to connection `id` on `channel` from now on.
    pub fn add(&self, id: u64, channel: UnixStream) {
        if channel.set_write_timeout(Some(SEND_TIMEOUT)).is_ok() {
            self.lock().insert(id, channel);
        }
    }

    /// Connection `id` ended (or replaced its channel).
    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Tell every connection the configuration changed; returns how many were told. A
    /// channel that fails is dropped (its frontend is gone or stuck), and the failure logged.
    pub fn notify_all(&self) -> usize {
        let header = message_header(CONFIG_CHANGE_MSG, VERSION, 0);
        let mut channels = self.lock();
        channels.retain(|id, channel| match channel.write_all(&header) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("connection {id}: sending a configuration change: {e}");
                false
            }
        });
        channels.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, UnixStream>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A vhost-user message header: request, flags, payload size, in native byte order.
fn message_header(request: u32, flags: u32, size: u32) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0..4].copy_from_slice(&request.to_ne_bytes());
    h[4..8].copy_from_slice(&flags.to_ne_bytes());
    h[8..12].copy_from_slice(&size.to_ne_bytes());
    h
}

/// Wait for the next message on `stream` without taking it. If it is `SET_BACKEND_REQ_FD`,
/// return a duplicate of the descriptor it carries; otherwise (or once the frontend has gone)
/// `None`. Descriptors other messages carry are never installed: the first peek leaves no
/// room for them.
pub fn peek_backend_channel(stream: &UnixStream) -> io::Result<Option<UnixStream>> {
    let mut header = [0u8; 12];
    // SAFETY: `header` is a valid buffer of its length; no control buffer is given, so no
    // descriptor is installed.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            header.as_mut_ptr().cast(),
            header.len(),
            libc::MSG_PEEK | libc::MSG_WAITALL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let request = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]);
    if n as usize != header.len() || request != SET_BACKEND_REQ_FD {
        return Ok(None);
    }
    let fd = peek_one_fd(stream)?;
    // SAFETY: `fd` was just installed in this process for us, and nothing else owns it.
    Ok(fd.map(|fd| UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) })))
}

/// Peek at the next message with room for one passed descriptor, and return the duplicate
/// the kernel installs for it, if any.
fn peek_one_fd(stream: &UnixStream) -> io::Result<Option<i32>> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: byte.len(),
    };
    // Room for one descriptor, aligned as a cmsghdr needs.
    let mut control = [0u64; 4];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(mem::size_of::<i32>() as u32) } as usize;
    debug_assert!(space <= mem::size_of_val(&control));
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` describes valid buffers for the duration of the call.
    let n = unsafe {
        libc::recvmsg(
            stream.as_raw_fd(),
            &mut msg,
            libc::MSG_PEEK | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR checks msg_controllen.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    if cmsg.is_null() {
        return Ok(None);
    }
    // SAFETY: `cmsg` points into `control`, within msg_controllen, as CMSG_FIRSTHDR checked.
    let (level, kind, len) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len) };
    // SAFETY: CMSG_LEN only computes a size.
    let one = unsafe { libc::CMSG_LEN(mem::size_of::<i32>() as u32) } as usize;
    if level != libc::SOL_SOCKET || kind != libc::SCM_RIGHTS || len < one {
        return Ok(None);
    }
    // SAFETY: the control message holds at least one descriptor (checked above); CMSG_DATA
    // points at it, possibly unaligned.
    let fd = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>()) };
    Ok((fd >= 0).then_some(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    /// Send `header` with `fd` attached, as a frontend sends SET_BACKEND_REQ_FD.
    fn send_with_fd(stream: &UnixStream, header: &[u8], fd: i32) {
        let mut iov = libc::iovec {
            iov_base: header.as_ptr().cast_mut().cast(),
            iov_len: header.len(),
        };
        let mut control = [0u64; 4];
        // SAFETY: test code building a valid SCM_RIGHTS message on local buffers.
        unsafe {
            let mut msg: libc::msghdr = mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(4) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(4) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd);
            assert_eq!(
                libc::sendmsg(stream.as_raw_fd(), &msg, 0),
                header.len() as isize
            );
        }
    }

    #[test]
    fn the_backend_channel_is_duplicated_and_the_message_left_in_place() {
        let (frontend, backend) = UnixStream::pair().unwrap();
        let (channel_frontend, channel_backend) = UnixStream::pair().unwrap();
        let mut msg = message_header(SET_BACKEND_REQ_FD, VERSION, 8).to_vec();
        msg.extend_from_slice(&0u64.to_ne_bytes());
        send_with_fd(&frontend, &msg, channel_backend.as_raw_fd());
        drop(channel_backend);

        let dup = peek_backend_channel(&backend)
            .unwrap()
            .expect("a duplicate of the channel");
        // The message is still there, whole, for the crate to read.
        let mut whole = vec![0u8; msg.len()];
        (&backend).read_exact(&mut whole).unwrap();
        assert_eq!(whole, msg);

        let notifier = ConfigNotifier::default();
        notifier.add(7, dup);
        assert_eq!(notifier.notify_all(), 1);
        let mut notice = [0u8; 12];
        (&channel_frontend).read_exact(&mut notice).unwrap();
        assert_eq!(notice, message_header(CONFIG_CHANGE_MSG, VERSION, 0));
        notifier.remove(7);
        assert_eq!(notifier.notify_all(), 0);
    }

    #[test]
    fn other_messages_are_left_alone() {
        let (frontend, backend) = UnixStream::pair().unwrap();
        let msg = message_header(1, VERSION, 0);
        (&frontend).write_all(&msg).unwrap();
        assert!(peek_backend_channel(&backend).unwrap().is_none());
        drop(frontend);
        let mut whole = [0u8; 12];
        (&backend).read_exact(&mut whole).unwrap();
        assert_eq!(whole, msg);
        // The frontend gone: nothing to peek.
        assert!(peek_backend_channel(&backend).unwrap().is_none());
    }

    #[test]
    fn a_channel_nobody_reads_is_dropped() {
        let notifier = ConfigNotifier::default();
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        notifier.add(1, a);
        assert_eq!(notifier.notify_all(), 0);
    }
}
