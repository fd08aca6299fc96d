//! The reader side of a connection: replies parsed as they come and matched to commands by
//! cookie (proto.md, "Simple reply message", "Structured reply chunk message", "Structured
//! reply types"); read data lands directly in the command's buffers.
//!
//! Anything that breaks the protocol (an unknown cookie, a chunk outside its request, a
//! length that cannot be right) ends the connection, as proto.md requires ("the client MUST
//! initiate a hard disconnect"); its commands are then re-sent after a reconnection or fail,
//! like those of a connection that dropped.

use std::io;

use super::conn::Conn;
use super::error::{errno, printable};
use super::transport::Receiver;
use crate::nbd::wire::{
    CHUNK_HEADER, CMD_READ, REPLY_FLAG_DONE, REPLY_TYPE_ERROR_OFFSET, REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, SIMPLE_HEADER, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
};

/// Error chunks carry an errno, a message of at most 4096 bytes and maybe an offset: longer
/// ones are refused rather than read.
const MAX_ERROR_CHUNK: u32 = 6 + 4096 + 8;
/// Error chunk types have bit 15 set (proto.md, "Structured reply types").
const ERROR_CHUNK: u16 = 1 << 15;

/// Why a connection ended.
#[derive(Debug)]
pub(super) enum Break {
    /// Reading failed: the server hung up, reset, or the socket was shut down.
    Io(io::Error),
    /// The server broke the protocol.
    Protocol(String),
    /// The server answered `NBD_ESHUTDOWN`: it is going away, and the client must
    /// disconnect (proto.md, "Terminating the transmission phase").
    Shutdown,
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Break::Io(e) => write!(f, "{e}"),
            Break::Protocol(why) => write!(f, "protocol error: {why}"),
            Break::Shutdown => f.write_str("the server is shutting down (NBD_ESHUTDOWN)"),
        }
    }
}

impl From<io::Error> for Break {
    fn from(e: io::Error) -> Break {
        Break::Io(e)
    }
}

fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

impl Conn {
    /// Read replies until the connection ends; returns why it did.
    pub fn receive(&self, rx: &mut Receiver) -> Break {
        loop {
            if let Err(why) = self.receive_one(rx) {
                return why;
            }
        }
    }

    fn receive_one(&self, rx: &mut Receiver) -> Result<(), Break> {
        let mut head = [0u8; CHUNK_HEADER];
        rx.read_exact(&mut head[..SIMPLE_HEADER])?;
        match be32(&head) {
            SIMPLE_REPLY_MAGIC => self.simple(rx, be32(&head[4..]), be64(&head[8..])),
            STRUCTURED_REPLY_MAGIC => {
                rx.read_exact(&mut head[SIMPLE_HEADER..])?;
                let flags = u16::from_be_bytes([head[4], head[5]]);
                let kind = u16::from_be_bytes([head[6], head[7]]);
                self.chunk(rx, flags, kind, be64(&head[8..]), be32(&head[16..]))
            }
            other => Err(Break::Protocol(format!(
                "reply magic {other:#010x} is neither a simple nor a structured reply"
            ))),
        }
    }

    fn unknown_cookie(cookie: u64) -> Break {
        Break::Protocol(format!(
            "reply for cookie {cookie:#x}, which no request in flight has"
        ))
    }

    /// A simple reply: an error, and a read's data if there is no error.
    fn simple(&self, rx: &mut Receiver, error: u32, cookie: u64) -> Result<(), Break> {
        let cmd = self
            .lookup(cookie)
            .ok_or_else(|| Self::unknown_cookie(cookie))?;
        if cmd.kind == CMD_READ && self.info.structured {
            return Err(Break::Protocol(
                "a simple reply to a read, after structured replies were negotiated".into(),
            ));
        }
        if error == 0 && cmd.kind == CMD_READ {
            self.receive_data(rx, cookie, 0, cmd.len.into())?;
        }
        self.settle_reply(cookie, errno(error))
    }

    /// Finish the command of `cookie`, unless the server is shutting down: then it is left
    /// in flight, to be re-sent after a reconnection.
    fn settle_reply(&self, cookie: u64, errno: i32) -> Result<(), Break> {
        if errno == libc::ESHUTDOWN {
            return Err(Break::Shutdown);
        }
        self.settle(cookie, errno);
        Ok(())
    }

    /// Receive `len` bytes of read data for `cookie`, `rel` bytes into its command's range.
    /// The caller checked `rel + len` against the command's length.
    fn receive_data(
        &self,
        rx: &mut Receiver,
        cookie: u64,
        rel: u64,
        len: u64,
    ) -> Result<(), Break> {
        let cmd = self
            .lookup(cookie)
            .ok_or_else(|| Self::unknown_cookie(cookie))?;
        let mut pieces = Vec::new();
        // SAFETY: the command is in flight (just looked up) and only this thread removes
        // commands, so it stays unfinished while we fill its range; a read's buffers are
        // the submitter's to be written.
        unsafe {
            cmd.parent.pieces(cmd.at + rel, len, |p| pieces.push(p));
            rx.read_into(&mut pieces)?;
        }
        Ok(())
    }

    /// Where `[offset, offset + len)` falls in the read of `cookie`: its distance from the
    /// read's start, if the range lies inside the read, else a protocol error.
    fn inside(&self, cookie: u64, offset: u64, len: u64) -> Result<u64, Break> {
        let cmd = self
            .lookup(cookie)
            .ok_or_else(|| Self::unknown_cookie(cookie))?;
        let start = cmd.offset;
        let end = start + u64::from(cmd.len);
        match offset.checked_add(len) {
            Some(e) if offset >= start && e <= end && len > 0 => Ok(offset - start),
            _ => Err(Break::Protocol(format!(
                "a chunk for {len} bytes at {offset}, outside the read of {} bytes at {start}",
                cmd.len
            ))),
        }
    }

    /// Count `len` bytes of a read as received; more than the read asked for means chunks
    /// overlap.
    fn received(&self, cookie: u64, len: u64) -> Result<(), Break> {
        let over = self.with_entry(cookie, |e| {
            e.got += len;
            e.got > u64::from(e.cmd.len)
        });
        match over {
            Some(false) => Ok(()),
            _ => Err(Break::Protocol("overlapping read chunks".into())),
        }
    }

    /// One structured reply chunk.
    fn chunk(
        &self,
        rx: &mut Receiver,
        flags: u16,
        kind: u16,
        cookie: u64,
        len: u32,
    ) -> Result<(), Break> {
        let cmd = self
            .lookup(cookie)
            .ok_or_else(|| Self::unknown_cookie(cookie))?;
        if !self.info.structured {
            return Err(Break::Protocol(
                "a structured reply chunk, without structured replies negotiated".into(),
            ));
        }
        let read = cmd.kind == CMD_READ;
        match kind {
            REPLY_TYPE_NONE if len == 0 && flags & REPLY_FLAG_DONE != 0 => {}
            REPLY_TYPE_OFFSET_DATA if read && len > 8 => {
                let mut off = [0u8; 8];
                rx.read_exact(&mut off)?;
                let n = u64::from(len - 8);
                let rel = self.inside(cookie, be64(&off), n)?;
                self.receive_data(rx, cookie, rel, n)?;
                self.received(cookie, n)?;
            }
            REPLY_TYPE_OFFSET_HOLE if read && len == 12 => {
                let mut b = [0u8; 12];
                rx.read_exact(&mut b)?;
                let n = u64::from(be32(&b[8..]));
                let rel = self.inside(cookie, be64(&b), n)?;
                // SAFETY: as in `receive_data`: in flight, ours to write, range checked.
                unsafe {
                    cmd.parent.pieces(cmd.at + rel, n, |p| {
                        std::ptr::write_bytes(p.iov_base.cast::<u8>(), 0, p.iov_len)
                    })
                };
                self.received(cookie, n)?;
            }
            k if k & ERROR_CHUNK != 0 => self.error_chunk(rx, kind, cookie, len)?,
            _ => {
                return Err(Break::Protocol(format!(
                    "unexpected chunk type {kind} of {len} bytes for command type {}",
                    cmd.kind
                )))
            }
        }
        if flags & REPLY_FLAG_DONE == 0 {
            return Ok(());
        }
        let outcome = self.with_entry(cookie, |e| {
            if e.error != 0 {
                e.error
            } else if read && e.got != u64::from(e.cmd.len) {
                log::warn!(
                    "NBD server claimed success for a read of {} bytes and sent {}",
                    e.cmd.len,
                    e.got
                );
                libc::EIO
            } else {
                0
            }
        });
        self.settle_reply(cookie, outcome.unwrap_or(0))
    }

    /// An error chunk (`NBD_REPLY_TYPE_ERROR`, `NBD_REPLY_TYPE_ERROR_OFFSET`, or one we do not
    /// know): the command fails with its errno; the first error of a reply wins.
    fn error_chunk(
        &self,
        rx: &mut Receiver,
        kind: u16,
        cookie: u64,
        len: u32,
    ) -> Result<(), Break> {
        if !(6..=MAX_ERROR_CHUNK).contains(&len) {
            return Err(Break::Protocol(format!("an error chunk of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        rx.read_exact(&mut data)?;
        let value = be32(&data);
        let msg_len = usize::from(u16::from_be_bytes([data[4], data[5]]));
        let tail = if kind == REPLY_TYPE_ERROR_OFFSET {
            8
        } else {
            0
        };
        if msg_len + tail > data.len() - 6 {
            return Err(Break::Protocol(format!(
                "an error chunk of {len} bytes with a {msg_len}-byte message"
            )));
        }
        let message = printable(&data[6..6 + msg_len]);
        // An error chunk's value MUST be nonzero; a zero still means the command failed.
        let e = if value == 0 { libc::EIO } else { errno(value) };
        log::debug!("NBD server error {value} (chunk type {kind}): {message}");
        self.with_entry(cookie, |entry| {
            if entry.error == 0 {
                entry.error = e;
            }
        });
        Ok(())
    }
}
