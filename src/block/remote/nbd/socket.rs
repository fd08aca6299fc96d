//! The client's socket: connecting to a UNIX or TCP server, and the zero-copy transfers of
//! the plain (non-TLS) transport, `sendmsg` and `readv` loops over iovecs that point into
//! guest memory.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::block::remote::location::NbdServer;
pub(super) use crate::nbd::socket::Socket;
use crate::nbd::socket::{sendmsg, IOV_MAX};

/// How long one TCP connect may take before the next address (or attempt) is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connect to `server`: a TCP host is tried at each of its addresses in turn.
pub(super) fn connect(server: &NbdServer) -> io::Result<Socket> {
    match server {
        NbdServer::Unix(path) => UnixStream::connect(path).map(Socket::Unix),
        NbdServer::Inet { host, port } => {
            let mut last = None;
            for addr in (host.as_str(), *port).to_socket_addrs()? {
                match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                    Ok(s) => {
                        // Requests are small and latency-bound: never wait to coalesce.
                        s.set_nodelay(true)?;
                        keepalive(s.as_raw_fd());
                        return Ok(Socket::Tcp(s));
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "the host has no address")
            }))
        }
    }
}

/// TCP keep-alive, which QEMU's NBD client also turns on, with shorter timings than Linux's
/// (a first probe after 2 hours idle): a server whose host vanished without a reset is
/// noticed after about a minute of silence (30 s idle, then 3 probes 10 s apart) and the
/// reconnection starts. (With requests unacknowledged the kernel's retransmission timeout
/// applies instead, about 15 minutes; `TCP_USER_TIMEOUT` would cut that short but would also
/// drop a server that is merely slow to read, so it is left alone.) Best effort.
fn keepalive(fd: RawFd) {
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
        // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live local.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
}

/// Drop the first `n` bytes of `iov`: whole iovecs from the front, then part of the next.
fn advance(iov: &mut &mut [libc::iovec], mut n: usize) {
    while let Some(first) = iov.first_mut() {
        if n < first.iov_len {
            first.iov_base = first.iov_base.cast::<u8>().wrapping_add(n).cast();
            first.iov_len -= n;
            return;
        }
        n -= first.iov_len;
        let rest = std::mem::take(iov);
        *iov = &mut rest[1..];
    }
}

/// Send every byte `iov` describes, however the kernel cuts the writes. `iov` is consumed
/// (its entries are advanced past what was sent).
///
/// # Safety
/// Every iovec must describe memory valid for reading until this returns.
pub(super) unsafe fn send_all(fd: RawFd, mut iov: &mut [libc::iovec]) -> io::Result<()> {
    advance(&mut iov, 0);
    while !iov.is_empty() {
        // SAFETY: forwarded contract.
        let n = unsafe { sendmsg(fd, iov) }?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        advance(&mut iov, n);
    }
    Ok(())
}

/// Fill every byte `iov` describes from the socket (`readv` loop).
///
/// # Safety
/// Every iovec must describe memory valid for writing until this returns, not aliased by
/// anything the caller reads meanwhile.
pub(super) unsafe fn recv_all(fd: RawFd, mut iov: &mut [libc::iovec]) -> io::Result<()> {
    advance(&mut iov, 0);
    while !iov.is_empty() {
        let cnt = iov.len().min(IOV_MAX) as libc::c_int;
        // SAFETY: the iovecs are valid for writing per the caller's contract.
        let n = unsafe { libc::readv(fd, iov.as_ptr(), cnt) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        advance(&mut iov, n as usize);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfers_survive_partial_writes_and_many_iovecs() {
        let (a, b) = UnixStream::pair().unwrap();
        // 3000 iovecs of 7 bytes: more than IOV_MAX, and more bytes than one write moves
        // once the receiver is slow.
        let data: Vec<u8> = (0..21_000u32).map(|i| (i % 251) as u8).collect();
        let mut iov: Vec<libc::iovec> = data
            .chunks(7)
            .map(|c| libc::iovec {
                iov_base: c.as_ptr().cast_mut().cast(),
                iov_len: c.len(),
            })
            .collect();
        let reader = std::thread::spawn(move || {
            let mut out = vec![0u8; 21_000];
            let mut iov: Vec<libc::iovec> = out
                .chunks_mut(1000)
                .map(|c| libc::iovec {
                    iov_base: c.as_mut_ptr().cast(),
                    iov_len: c.len(),
                })
                .collect();
            // SAFETY: the iovecs point into `out`, untouched until this returns.
            unsafe { recv_all(b.as_raw_fd(), &mut iov) }.unwrap();
            out
        });
        // SAFETY: the iovecs point into `data`, alive until this returns.
        unsafe { send_all(a.as_raw_fd(), &mut iov) }.unwrap();
        assert_eq!(reader.join().unwrap(), data);
    }

    #[test]
    fn tcp_connections_probe_an_idle_peer() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = NbdServer::Inet {
            host: "127.0.0.1".into(),
            port: listener.local_addr().unwrap().port(),
        };
        let sock = connect(&server).unwrap();
        let get = |level, name| {
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into a live local.
            let r = unsafe {
                libc::getsockopt(
                    sock.fd(),
                    level,
                    name,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(r, 0);
            v
        };
        assert_eq!(get(libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 30);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_NODELAY), 1);
    }

    #[test]
    fn a_closed_peer_is_an_error_not_a_signal() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let buf = [1u8; 16];
        let mut iov = [libc::iovec {
            iov_base: buf.as_ptr().cast_mut().cast(),
            iov_len: 16,
        }];
        // SAFETY: `iov` points into `buf`.
        let err = unsafe { send_all(a.as_raw_fd(), &mut iov) }.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPIPE));
        let mut out = [0u8; 4];
        let mut iov = [libc::iovec {
            iov_base: out.as_mut_ptr().cast(),
            iov_len: 4,
        }];
        // SAFETY: `iov` points into `out`.
        let err = unsafe { recv_all(a.as_raw_fd(), &mut iov) }.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
