//! The byte stream of a connection in transmission: a plain socket, or a TLS session over one.
//!
//! Plain sockets are zero-copy: a write's header and guest iovecs go out in one `sendmsg`
//! loop, a read's data comes in with `readv` straight into the guest's buffers.
//!
//! TLS cannot be zero-copy (records are encrypted in user space). One rustls
//! `ClientConnection` is shared behind a mutex that is only ever held to encrypt or decrypt,
//! never across a blocking socket call:
//!
//! * senders (serialised by the connection's send lock) encrypt at most one buffer limit's
//!   worth (64 KiB) under the session lock, take the records out, and write them to the
//!   socket after letting go of it;
//! * the reader thread blocks in `read(2)` on the socket without the lock, then decrypts what
//!   came under it into its own plaintext buffer, and copies from there into guest buffers.
//!
//! So a sender blocked on a full socket never keeps the reader from draining replies (which a
//! server may need before it reads more requests), and records leave in the order they were
//! made, since only the holder of the send lock makes and writes them. Records rustls queues
//! itself while reading (a TLS 1.3 key update answer) leave with the next request.

use std::io::{self, Read, Write};
use std::sync::{Mutex, MutexGuard, PoisonError};

use rustls::ClientConnection;

use super::socket::{recv_all, send_all, Socket};

/// How much a TLS reader takes off the socket at once.
const TLS_READ: usize = 64 << 10;

pub(super) enum Wire {
    Plain(Socket),
    Tls {
        sock: Socket,
        session: Box<Mutex<ClientConnection>>,
    },
}

fn lock(session: &Mutex<ClientConnection>) -> MutexGuard<'_, ClientConnection> {
    session.lock().unwrap_or_else(PoisonError::into_inner)
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

impl Wire {
    pub fn socket(&self) -> &Socket {
        match self {
            Wire::Plain(s) | Wire::Tls { sock: s, .. } => s,
        }
    }

    /// Send `header` then the bytes `pieces` describe. The caller holds the connection's send
    /// lock (`scratch` is what it guards: room for TLS records).
    ///
    /// # Safety
    /// Every piece must describe memory valid for reading until this returns.
    pub unsafe fn send(
        &self,
        scratch: &mut Vec<u8>,
        header: &[u8],
        pieces: &[libc::iovec],
    ) -> io::Result<()> {
        match self {
            Wire::Plain(sock) => {
                let mut iov = Vec::with_capacity(pieces.len() + 1);
                iov.push(libc::iovec {
                    iov_base: header.as_ptr().cast_mut().cast(),
                    iov_len: header.len(),
                });
                iov.extend_from_slice(pieces);
                // SAFETY: the header is a live local, the pieces valid per the contract.
                unsafe { send_all(sock.fd(), &mut iov) }
            }
            Wire::Tls { sock, session } => {
                tls_send(sock, session, scratch, header)?;
                for p in pieces {
                    // SAFETY: valid for reading per the contract. Guest memory may change
                    // under a write in flight if the guest races with its own request; that
                    // only changes what is sent, as it would on a local disk.
                    let bytes =
                        unsafe { std::slice::from_raw_parts(p.iov_base as *const u8, p.iov_len) };
                    tls_send(sock, session, scratch, bytes)?;
                }
                Ok(())
            }
        }
    }

    /// End a TLS session cleanly (close_notify), best effort; the caller holds the send lock.
    pub fn close_notify(&self, scratch: &mut Vec<u8>) {
        if let Wire::Tls { sock, session } = self {
            scratch.clear();
            {
                let mut s = lock(session);
                s.send_close_notify();
                while s.wants_write() {
                    if s.write_tls(scratch).is_err() {
                        break;
                    }
                }
            }
            let _ = (&*sock).write_all(scratch);
            scratch.clear();
        }
    }
}

/// Encrypt and send all of `bytes`, a buffer limit at a time.
fn tls_send(
    sock: &Socket,
    session: &Mutex<ClientConnection>,
    out: &mut Vec<u8>,
    mut bytes: &[u8],
) -> io::Result<()> {
    while !bytes.is_empty() {
        out.clear();
        let taken = {
            let mut s = lock(session);
            let n = s.writer().write(bytes)?;
            while s.wants_write() {
                s.write_tls(out)?;
            }
            n
        };
        if taken == 0 && out.is_empty() {
            return Err(io::Error::other("the TLS session takes no more data"));
        }
        (&*sock).write_all_nosignal(out)?;
        bytes = &bytes[taken..];
    }
    out.clear();
    Ok(())
}

/// Writing a whole buffer through the no-SIGPIPE path.
trait WriteAllNoSignal {
    fn write_all_nosignal(&mut self, buf: &[u8]) -> io::Result<()>;
}

impl WriteAllNoSignal for &Socket {
    fn write_all_nosignal(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut iov = [libc::iovec {
            iov_base: buf.as_ptr().cast_mut().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: `iov` points into `buf`, live for the call.
        unsafe { send_all(self.fd(), &mut iov) }
    }
}

/// The receiving side of a connection, owned by its reader thread.
pub(super) struct Receiver<'a> {
    wire: &'a Wire,
    /// TLS: decrypted bytes not consumed yet (`plain[pos..]`).
    plain: Vec<u8>,
    pos: usize,
    /// TLS: what one socket read brought.
    raw: Vec<u8>,
}

impl<'a> Receiver<'a> {
    pub fn new(wire: &'a Wire) -> Receiver<'a> {
        let tls = matches!(wire, Wire::Tls { .. });
        Receiver {
            wire,
            plain: Vec::new(),
            pos: 0,
            raw: if tls { vec![0; TLS_READ] } else { Vec::new() },
        }
    }

    /// Fill `out` exactly.
    pub fn read_exact(&mut self, out: &mut [u8]) -> io::Result<()> {
        match self.wire {
            Wire::Plain(sock) => (&*sock).read_exact(out).map_err(eof_message),
            Wire::Tls { .. } => {
                let mut done = 0;
                while done < out.len() {
                    let n = self.take_plain(out.len() - done)?;
                    out[done..done + n].copy_from_slice(&self.plain[self.pos - n..self.pos]);
                    done += n;
                }
                Ok(())
            }
        }
    }

    /// Fill the memory `pieces` describe, in order.
    ///
    /// # Safety
    /// Every piece must describe memory valid for writing until this returns.
    pub unsafe fn read_into(&mut self, pieces: &mut [libc::iovec]) -> io::Result<()> {
        match self.wire {
            // SAFETY: forwarded contract.
            Wire::Plain(sock) => unsafe { recv_all(sock.fd(), pieces) },
            Wire::Tls { .. } => {
                for p in pieces.iter() {
                    let mut done = 0;
                    while done < p.iov_len {
                        let n = self.take_plain(p.iov_len - done)?;
                        // SAFETY: `done + n <= iov_len`, within the piece (valid for writing
                        // per the contract); the source is our own buffer, never guest memory.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                self.plain[self.pos - n..].as_ptr(),
                                p.iov_base.cast::<u8>().add(done),
                                n,
                            )
                        };
                        done += n;
                    }
                }
                Ok(())
            }
        }
    }

    /// TLS: consume up to `max` decrypted bytes (at least one), reading the socket if none is
    /// buffered; they are `plain[pos - n..pos]` afterwards.
    fn take_plain(&mut self, max: usize) -> io::Result<usize> {
        if self.pos == self.plain.len() {
            self.refill()?;
        }
        let n = max.min(self.plain.len() - self.pos);
        self.pos += n;
        Ok(n)
    }

    fn refill(&mut self) -> io::Result<()> {
        let Wire::Tls { sock, session } = self.wire else {
            return Err(io::Error::other("not a TLS connection"));
        };
        self.plain.clear();
        self.pos = 0;
        // What the handshake left decrypted comes first.
        drain_plaintext(&mut lock(session), &mut self.plain)?;
        while self.plain.is_empty() {
            let n = (&*sock).read(&mut self.raw).map_err(eof_message)?;
            if n == 0 {
                return Err(eof_message(io::ErrorKind::UnexpectedEof.into()));
            }
            let mut s = lock(session);
            let mut raw = &self.raw[..n];
            while !raw.is_empty() {
                s.read_tls(&mut raw)?;
                s.process_new_packets().map_err(tls_error)?;
                drain_plaintext(&mut s, &mut self.plain)?;
            }
        }
        Ok(())
    }
}

/// Move what `session` has decrypted into `out`. A close_notify from the server is the end of
/// the stream.
fn drain_plaintext(session: &mut ClientConnection, out: &mut Vec<u8>) -> io::Result<()> {
    loop {
        let old = out.len();
        out.resize(old + 16384, 0);
        let got = session.reader().read(&mut out[old..]);
        match got {
            Ok(0) => {
                out.truncate(old);
                return if old == 0 {
                    Err(eof_message(io::ErrorKind::UnexpectedEof.into()))
                } else {
                    Ok(())
                };
            }
            Ok(n) => out.truncate(old + n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                out.truncate(old);
                return Ok(());
            }
            Err(e) => {
                out.truncate(old);
                return Err(e);
            }
        }
    }
}

fn eof_message(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the server closed the connection",
        )
    } else {
        e
    }
}
