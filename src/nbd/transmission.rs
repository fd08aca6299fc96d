//! The transmission phase: requests in order, one reply each (proto.md, "Transmission",
//! "Request types", "Structured reply chunk message").
//!
//! Requests are handled one at a time, in the order they arrive; a client that pipelines
//! reads simply finds its replies in order. Every request is validated before the source is
//! touched, and the only buffer sized by a client value is the read buffer, bounded by the
//! 32 MiB maximum payload.

use log::debug;

use super::conn::{Conn, End};
use super::handshake::{Context, Session};
use super::proto::*;
use super::ExportSource;

/// Serve requests until the client disconnects or breaks the protocol.
pub(crate) fn serve(conn: &mut Conn, session: &Session) -> Result<(), End> {
    let mut t = Transmission {
        source: &*session.export.source,
        size: session.export.source.size(),
        structured: session.structured,
        contexts: &session.contexts,
        buf: Vec::new(),
        extents: Vec::new(),
    };
    loop {
        let mut header = [0u8; Request::SIZE];
        if !conn.read_msg(&mut header)? {
            return Err(End::Done);
        }
        let req = Request::decode(&header);
        if req.magic != REQUEST_MAGIC {
            // proto.md: the stream cannot be trusted any more; hard disconnect.
            return Err(End::Protocol(format!("bad request magic {:#x}", req.magic)));
        }
        if req.kind == CMD_DISC {
            return Err(End::Done);
        }
        t.handle(conn, &req)?;
    }
}

struct Transmission<'a> {
    source: &'a dyn ExportSource,
    size: u64,
    structured: bool,
    contexts: &'a [Context],
    /// Read buffer, reused; at most MAX_PAYLOAD bytes.
    buf: Vec<u8>,
    /// Extents of the context being answered, reused.
    extents: Vec<(u64, u32)>,
}

/// A request refused before it does anything: errno and a message for structured replies.
type Refusal = (u32, &'static str);

impl Transmission<'_> {
    fn handle(&mut self, conn: &mut Conn, req: &Request) -> Result<(), End> {
        match req.kind {
            CMD_WRITE => {
                // The payload follows the header whatever we answer; skip it to stay in step.
                // Beyond the maximum payload a client is misbehaving (proto.md allows a hard
                // disconnect): answer, then close rather than read gigabytes.
                if req.length > MAX_PAYLOAD {
                    self.error(conn, req.cookie, EOVERFLOW, "write payload too large")?;
                    return Err(End::Protocol(format!(
                        "write of {} bytes (at most {MAX_PAYLOAD})",
                        req.length
                    )));
                }
                conn.discard(u64::from(req.length))?;
                self.error(conn, req.cookie, EPERM, "export is read-only")
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                self.error(conn, req.cookie, EPERM, "export is read-only")
            }
            CMD_READ => match self.check_read(req) {
                Err((errno, msg)) => self.error(conn, req.cookie, errno, msg),
                Ok(()) => self.read(conn, req),
            },
            CMD_FLUSH => match self.check(req, 0, false) {
                // Nothing is ever written: a flush has nothing to do.
                Ok(()) => self.ok(conn, req.cookie),
                Err((errno, msg)) => self.error(conn, req.cookie, errno, msg),
            },
            CMD_CACHE => match self.check(req, 0, true) {
                // A hint; the source reads what it needs when it is asked.
                Ok(()) => self.ok(conn, req.cookie),
                Err((errno, msg)) => self.error(conn, req.cookie, errno, msg),
            },
            CMD_BLOCK_STATUS => match self.check_block_status(req) {
                Err((errno, msg)) => self.error(conn, req.cookie, errno, msg),
                Ok(()) => self.block_status(conn, req),
            },
            other => {
                debug!("nbd: unknown command {other}");
                self.error(conn, req.cookie, EINVAL, "unknown command")
            }
        }
    }

    /// Flags outside `allowed`, and (when `range`) a range past the end of the export.
    fn check(&self, req: &Request, allowed: u16, range: bool) -> Result<(), Refusal> {
        if req.flags & !allowed != 0 {
            return Err((EINVAL, "unsupported command flags"));
        }
        if range {
            let end = req.offset.checked_add(u64::from(req.length));
            if end.is_none_or(|end| end > self.size) {
                return Err((EINVAL, "request past the end of the export"));
            }
        }
        Ok(())
    }

    fn check_read(&self, req: &Request) -> Result<(), Refusal> {
        let allowed = if self.structured { CMD_FLAG_DF } else { 0 };
        self.check(req, allowed, false)?;
        if req.length > MAX_PAYLOAD {
            // proto.md: a structured server may refuse large reads with EOVERFLOW; a simple
            // client broke the advertised maximum, which is EINVAL.
            let errno = if self.structured { EOVERFLOW } else { EINVAL };
            return Err((errno, "read larger than the maximum payload"));
        }
        self.check(req, allowed, true)
    }

    fn check_block_status(&self, req: &Request) -> Result<(), Refusal> {
        if !self.structured || self.contexts.is_empty() {
            return Err((EINVAL, "no metadata context negotiated"));
        }
        if req.length == 0 {
            return Err((EINVAL, "empty block status request"));
        }
        self.check(req, CMD_FLAG_REQ_ONE, true)
    }

    /// Success without payload.
    fn ok(&mut self, conn: &mut Conn, cookie: u64) -> Result<(), End> {
        if self.structured {
            put_chunk(&mut conn.out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
        } else {
            put_simple_reply(&mut conn.out, 0, cookie);
        }
        Ok(conn.send()?)
    }

    /// A failed request: a structured error chunk with a message when structured replies are
    /// on (proto.md prefers them), else a simple reply.
    fn error(&mut self, conn: &mut Conn, cookie: u64, errno: u32, msg: &str) -> Result<(), End> {
        if self.structured {
            let msg = &msg.as_bytes()[..msg.len().min(MAX_STRING)];
            put_chunk(
                &mut conn.out,
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                cookie,
                (6 + msg.len()) as u32,
            );
            conn.out.extend_from_slice(&errno.to_be_bytes());
            conn.out
                .extend_from_slice(&(msg.len() as u16).to_be_bytes());
            conn.out.extend_from_slice(msg);
        } else {
            put_simple_reply(&mut conn.out, errno, cookie);
        }
        Ok(conn.send()?)
    }

    /// NBD_CMD_READ, already validated. The data is read whole before anything is sent, so
    /// an error is always reported before any content: the content chunk can carry the DONE
    /// flag (proto.md allows it when no error can follow), and a simple reply never has to
    /// be cut off.
    fn read(&mut self, conn: &mut Conn, req: &Request) -> Result<(), End> {
        let len = req.length as usize;
        if len == 0 {
            return self.ok(conn, req.cookie);
        }
        // Keep a big buffer only while big reads come; a client that once read 32 MiB does
        // not pin it for the rest of its connection.
        if self.buf.capacity() > len.max(1 << 20) {
            self.buf = Vec::new();
        }
        self.buf.resize(len, 0);
        if let Err(e) = self.source.read(req.offset, &mut self.buf[..len]) {
            debug!("nbd: read of {len} bytes at {} failed: {e}", req.offset);
            return self.error(conn, req.cookie, nbd_errno(&e), "read failed");
        }
        if self.structured {
            put_chunk(
                &mut conn.out,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                8 + req.length,
            );
            conn.out.extend_from_slice(&req.offset.to_be_bytes());
        } else {
            put_simple_reply(&mut conn.out, 0, req.cookie);
        }
        Ok(conn.send_with(&self.buf[..len])?)
    }

    /// NBD_CMD_BLOCK_STATUS, already validated: one chunk per selected context, the last
    /// with DONE. All contexts are gathered before anything is sent, so a source error is a
    /// single error chunk.
    fn block_status(&mut self, conn: &mut Conn, req: &Request) -> Result<(), End> {
        let req_one = req.flags & CMD_FLAG_REQ_ONE != 0;
        let mut payload = Vec::new();
        for (n, ctx) in self.contexts.iter().enumerate() {
            let Some(id) = ctx.id() else { continue };
            if let Err(e) = self.extents(*ctx, req.offset, req.length, req_one) {
                debug!("nbd: block status at {} failed: {e}", req.offset);
                return self.error(conn, req.cookie, nbd_errno(&e), "block status failed");
            }
            let flags = if n + 1 == self.contexts.len() {
                REPLY_FLAG_DONE
            } else {
                0
            };
            let len = 4 + 8 * self.extents.len();
            put_chunk(
                &mut payload,
                flags,
                REPLY_TYPE_BLOCK_STATUS,
                req.cookie,
                len as u32,
            );
            payload.extend_from_slice(&id.to_be_bytes());
            for &(length, state) in &self.extents {
                // Each extent is within the request, whose length is a u32.
                payload.extend_from_slice(&(length as u32).to_be_bytes());
                payload.extend_from_slice(&state.to_be_bytes());
            }
        }
        conn.out.extend_from_slice(&payload);
        Ok(conn.send()?)
    }

    /// Collect the extents of one context over `[offset, offset + length)` into
    /// `self.extents`: clipped to the request, adjacent equal flags merged, unknown flags
    /// dropped, at most MAX_EXTENTS (one with REQ_ONE). The source is trusted to make
    /// progress but checked anyway: an answer covering nothing is an error, not a loop.
    fn extents(
        &mut self,
        ctx: Context,
        offset: u64,
        length: u32,
        req_one: bool,
    ) -> std::io::Result<()> {
        let (mask, limit) = match ctx {
            Context::Allocation => (STATE_HOLE | STATE_ZERO, MAX_EXTENTS),
            Context::Bitmap(_) => (STATE_DIRTY, MAX_EXTENTS),
        };
        let limit = if req_one { 1 } else { limit };
        self.extents.clear();
        let mut pos = offset;
        let end = offset + u64::from(length);
        let mut calls = 0;
        let mut got = Vec::new();
        while pos < end && calls < MAX_EXTENTS {
            calls += 1;
            got.clear();
            match ctx {
                Context::Allocation => self.source.allocation(pos, end - pos, &mut got)?,
                Context::Bitmap(i) => self.source.dirty(i, pos, end - pos, &mut got)?,
            }
            let before = pos;
            for &(len, flags) in &got {
                let len = len.min(end - pos);
                if len == 0 {
                    break;
                }
                let flags = flags & mask;
                let full = self.extents.len() == limit;
                match self.extents.last_mut() {
                    Some((l, f)) if *f == flags => *l += len,
                    _ if full => {
                        pos = end; // full: stop here, the client asks again from the end
                        break;
                    }
                    _ => self.extents.push((len, flags)),
                }
                pos += len;
                if pos >= end {
                    break;
                }
            }
            if pos == before {
                if self.extents.is_empty() {
                    return Err(std::io::Error::other("source returned no extent"));
                }
                break;
            }
        }
        Ok(())
    }
}
