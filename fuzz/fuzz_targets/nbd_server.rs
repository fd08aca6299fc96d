//! The NBD server's connection code (src/nbd/): a client's bytes, whatever they are, through
//! the handshake and the transmission phase of one connection over an in-memory stream, as
//! every connection thread runs them (`vubd::nbd::serve_stream`, no TLS).
//!
//! Input: a first byte of options (bit 0: a misbehaving source whose reads fail past 32 KiB
//! and whose extent lists are empty, zero-length or longer than asked), then the bytes a
//! client sends. The export is 64 KiB + 5 bytes with data, holes and two dirty bitmaps, so
//! that every request the server accepts is small.
//!
//! Checked, beyond no panic or hang: the server's bytes are exactly a greeting, then for each
//! complete option the client sent (in order, until the connection ends) a well-formed group
//! of option replies echoing that option and ending in an ACK or an error, then for each
//! complete request exactly one reply (simple or structured as negotiated) carrying its
//! cookie: read data equal to the export's bytes and covering the request exactly on
//! success, block status chunks one per negotiated context with non-empty extents inside the
//! request (exactly one with REQ_ONE), errors with a known errno and a bounded message —
//! and nothing else.
//!
//! Seeds (fuzz/seeds/nbd_server): a structured session (meta contexts, GO, reads, block
//! status, a write), a simple one through NBD_OPT_EXPORT_NAME, and LIST/INFO/ABORT.

#![no_main]

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use vubd::nbd::wire::*;
use vubd::nbd::{serve_stream, ExportSource, Transcript};

const SIZE: u64 = 65536 + 5;

fn byte(o: u64) -> u8 {
    // Data in the first 16 KiB and from 48 KiB on; a hole in between.
    if (16384..49152).contains(&o) {
        0
    } else {
        (o.wrapping_mul(31) >> 3) as u8 | 1
    }
}

struct Source {
    bad: bool,
}

impl ExportSource for Source {
    fn size(&self) -> u64 {
        SIZE
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        assert!(offset + buf.len() as u64 <= SIZE, "read past the end");
        if self.bad && offset + buf.len() as u64 > 32768 {
            return Err(io::Error::from_raw_os_error(if offset.is_multiple_of(2) {
                libc::ENOSPC
            } else {
                libc::EBADF
            }));
        }
        for (i, b) in buf.iter_mut().enumerate() {
            *b = byte(offset + i as u64);
        }
        Ok(())
    }
    fn allocation(&self, offset: u64, len: u64, out: &mut Vec<(u64, u32)>) -> io::Result<()> {
        assert!(len > 0 && offset + len <= SIZE, "allocation outside the export");
        if self.bad {
            match offset % 3 {
                0 => {}                           // nothing at all
                1 => out.push((0, 3)),            // an empty extent
                _ => out.push((len + 4096, 0xff)), // longer than asked, unknown flags
            }
            return Ok(());
        }
        let boundaries = [0, 16384, 49152, SIZE];
        for w in boundaries.windows(2) {
            let (a, b) = (w[0].max(offset), w[1].min(offset + len));
            if a < b {
                let flags = if w[0] == 16384 { STATE_HOLE | STATE_ZERO } else { 0 };
                // In 1000-byte pieces, so that merging and the extent limit are exercised.
                let mut p = a;
                while p < b {
                    let n = (b - p).min(1000);
                    out.push((n, flags));
                    p += n;
                }
            }
        }
        Ok(())
    }
    fn bitmaps(&self) -> Vec<String> {
        vec!["b0".into(), "b1".into()]
    }
    fn dirty(&self, index: usize, offset: u64, len: u64, out: &mut Vec<(u64, u32)>) -> io::Result<()> {
        assert!(index < 2 && len > 0 && offset + len <= SIZE);
        if self.bad && index == 1 {
            return Err(io::Error::other("bitmap gone"));
        }
        // Bitmap 0: every other 4 KiB dirty; bitmap 1: all clean.
        let mut p = offset;
        while p < offset + len {
            let n = (4096 - p % 4096).min(offset + len - p);
            out.push((n, u32::from(index == 0 && (p / 4096).is_multiple_of(2))));
            p += n;
        }
        Ok(())
    }
}

/// The client's side of the connection: its bytes in, the server's bytes out.
struct Stream {
    input: Vec<u8>,
    pos: usize,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.input.len() - self.pos);
        buf[..n].copy_from_slice(&self.input[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A reader over bytes that says None past the end.
struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        (n <= self.0.len()).then(|| {
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            a
        })
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes(b.try_into().unwrap()))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes(b.try_into().unwrap()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_be_bytes(b.try_into().unwrap()))
    }
}

fn check_handshake(input: &[u8], output: &[u8], t: &Transcript) {
    let mut out = Bytes(output);
    let mut inp = Bytes(input);
    assert_eq!(out.take(18), Some(&greeting()[..]), "greeting");
    let Some(flags) = inp.u32() else {
        assert!(out.0.is_empty());
        return;
    };
    let no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
    let flags_ok = flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) == 0
        && flags & FLAG_C_FIXED_NEWSTYLE != 0;
    if !flags_ok {
        assert!(out.0.is_empty() && t.transmission.is_none());
        return;
    }
    // Each complete option the client sent, in order, and the replies to it.
    while !out.0.is_empty() {
        let (Some(magic), Some(option), Some(length)) = (inp.u64(), inp.u32(), inp.u32()) else {
            panic!("a reply to an option never sent");
        };
        assert_eq!(magic, IHAVEOPT, "a reply after a bad option magic");
        if length > MAX_OPTION {
            // Refused unread, then closed.
            assert_ne!(option, OPT_EXPORT_NAME);
            expect_reply(&mut out, option, &[REP_ERR_TOO_BIG]);
            assert!(out.0.is_empty() && t.transmission.is_none());
            return;
        }
        assert!(inp.take(length as usize).is_some(), "a reply to an incomplete option");
        if option == OPT_EXPORT_NAME {
            let tx = t.transmission.as_ref().expect("EXPORT_NAME answered without transmission");
            assert_eq!(out.u64(), Some(tx.size));
            assert_eq!(out.u16(), Some(tx.flags));
            if !no_zeroes {
                assert!(out.take(124).is_some_and(|z| z.iter().all(|&b| b == 0)));
            }
            assert!(out.0.is_empty());
            return;
        }
        let intermediate: &[u32] = match option {
            OPT_LIST => &[REP_SERVER],
            OPT_INFO | OPT_GO => &[REP_INFO],
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => &[REP_META_CONTEXT],
            _ => &[],
        };
        loop {
            let kind = expect_reply(&mut out, option, intermediate);
            if !intermediate.contains(&kind) {
                break;
            }
        }
    }
    // Every reply accounted for; the rest of the input may hold options never answered (the
    // connection ended, or the input stops in the middle of one).
}

/// Parse one option reply for `option`; returns its type. Intermediate replies must be of
/// the `allowed` kinds; final ones are ACK or an error.
fn expect_reply(out: &mut Bytes<'_>, option: u32, allowed: &[u32]) -> u32 {
    assert_eq!(out.u64(), Some(REPLY_MAGIC), "option reply magic");
    assert_eq!(out.u32(), Some(option), "reply echoes the option");
    let kind = out.u32().expect("reply type");
    let len = out.u32().expect("reply length") as usize;
    let data = out.take(len).expect("reply data");
    let mut d = Bytes(data);
    match kind {
        REP_ACK => assert!(data.is_empty()),
        REP_SERVER => {
            assert!(allowed.contains(&kind));
            let n = d.u32().unwrap() as usize;
            assert!(n <= MAX_STRING && d.take(n).is_some());
        }
        REP_INFO => {
            assert!(allowed.contains(&kind));
            match d.u16().unwrap() {
                INFO_EXPORT => assert_eq!(len, 12),
                INFO_BLOCK_SIZE => {
                    assert_eq!(len, 14);
                    let (min, pref, max) = (d.u32().unwrap(), d.u32().unwrap(), d.u32().unwrap());
                    assert!(min <= pref && pref <= max);
                }
                INFO_NAME | INFO_DESCRIPTION => assert!(len - 2 <= MAX_STRING),
                other => panic!("unknown info {other}"),
            }
        }
        REP_META_CONTEXT => {
            assert!(allowed.contains(&kind));
            d.u32().unwrap();
            let name = std::str::from_utf8(d.0).expect("context name is UTF-8");
            assert!(name == "base:allocation" || name.starts_with("qemu:dirty-bitmap:"), "{name}");
        }
        k if k & REP_FLAG_ERROR != 0 => {
            assert!(matches!(
                k,
                REP_ERR_UNSUP
                    | REP_ERR_POLICY
                    | REP_ERR_INVALID
                    | REP_ERR_TLS_REQD
                    | REP_ERR_UNKNOWN
                    | REP_ERR_TOO_BIG
            ));
            assert!(len <= MAX_STRING);
        }
        other => panic!("unknown reply type {other:#x}"),
    }
    kind
}

fn check_error(d: &mut Bytes<'_>) {
    let errno = d.u32().unwrap();
    assert!(matches!(errno, EPERM | EIO | EINVAL | ENOSPC | EOVERFLOW), "errno {errno}");
    let n = d.u16().unwrap() as usize;
    assert!(n <= MAX_STRING);
    assert!(d.take(n).is_some() && d.0.is_empty());
}

fn check_transmission(input: &[u8], output: &[u8], t: &Transcript) {
    let Some(tx) = &t.transmission else {
        assert!(output.is_empty());
        return;
    };
    let mut out = Bytes(output);
    let mut inp = Bytes(input);
    while !out.0.is_empty() {
        let header = inp.take(28).expect("a reply to a request never sent");
        let r = Request::decode(header.try_into().unwrap());
        assert_eq!(r.magic, REQUEST_MAGIC, "a reply after a bad request magic");
        assert_ne!(r.kind, CMD_DISC, "a reply to NBD_CMD_DISC");
        if r.kind == CMD_WRITE && r.length <= MAX_PAYLOAD {
            assert!(inp.take(r.length as usize).is_some(), "a reply to an incomplete write");
        }
        if !tx.structured {
            assert_eq!(out.u32(), Some(SIMPLE_REPLY_MAGIC));
            let error = out.u32().unwrap();
            assert_eq!(out.u64(), Some(r.cookie));
            if error == 0 {
                assert!(matches!(r.kind, CMD_READ | CMD_FLUSH | CMD_CACHE));
                if r.kind == CMD_READ {
                    let data = out.take(r.length as usize).expect("read data");
                    for (i, &b) in data.iter().enumerate() {
                        assert_eq!(b, byte(r.offset + i as u64));
                    }
                }
            } else {
                assert!(matches!(error, EPERM | EIO | EINVAL | ENOSPC | EOVERFLOW));
            }
            continue;
        }
        let mut covered = 0u64;
        let mut contexts_seen = Vec::new();
        let mut failed = false;
        loop {
            assert_eq!(out.u32(), Some(STRUCTURED_REPLY_MAGIC));
            let flags = out.u16().unwrap();
            let kind = out.u16().unwrap();
            assert_eq!(out.u64(), Some(r.cookie));
            let len = out.u32().unwrap() as usize;
            let mut d = Bytes(out.take(len).expect("chunk payload"));
            assert_eq!(flags & !REPLY_FLAG_DONE, 0);
            match kind {
                REPLY_TYPE_NONE => assert_eq!(len, 0),
                REPLY_TYPE_OFFSET_DATA => {
                    assert_eq!(r.kind, CMD_READ);
                    let offset = d.u64().unwrap();
                    assert!(offset >= r.offset);
                    assert!(offset + d.0.len() as u64 <= r.offset + u64::from(r.length));
                    for (i, &b) in d.0.iter().enumerate() {
                        assert_eq!(b, byte(offset + i as u64));
                    }
                    covered += d.0.len() as u64;
                }
                REPLY_TYPE_BLOCK_STATUS => {
                    assert_eq!(r.kind, CMD_BLOCK_STATUS);
                    let id = d.u32().unwrap();
                    assert!(tx.contexts.iter().any(|c| c.0 == id), "unknown context {id}");
                    assert!(!contexts_seen.contains(&id), "context {id} twice");
                    contexts_seen.push(id);
                    assert!(!d.0.is_empty() && d.0.len() % 8 == 0);
                    let n = d.0.len() / 8;
                    if r.flags & CMD_FLAG_REQ_ONE != 0 {
                        assert_eq!(n, 1);
                    }
                    assert!(n <= MAX_EXTENTS);
                    let mut sum = 0u64;
                    while let Some(l) = d.u32() {
                        let f = d.u32().unwrap();
                        assert!(l > 0);
                        assert_eq!(f & !(STATE_HOLE | STATE_ZERO), 0);
                        sum += u64::from(l);
                    }
                    assert!(sum <= u64::from(r.length));
                }
                REPLY_TYPE_ERROR => {
                    check_error(&mut d);
                    failed = true;
                }
                other => panic!("unexpected chunk type {other}"),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if !failed {
            match r.kind {
                CMD_READ => assert_eq!(covered, u64::from(r.length), "read not covered"),
                CMD_BLOCK_STATUS => assert_eq!(contexts_seen.len(), tx.contexts.len()),
                CMD_FLUSH | CMD_CACHE => {}
                other => panic!("command {other} succeeded"),
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&options, client)) = data.split_first() else {
        return;
    };
    let output = Arc::new(Mutex::new(Vec::new()));
    let stream = Stream {
        input: client.to_vec(),
        pos: 0,
        output: output.clone(),
    };
    let source: Arc<dyn ExportSource> = Arc::new(Source {
        bad: options & 1 != 0,
    });
    let exports = vec![
        ("disk".to_string(), Some("fuzz".to_string()), source.clone()),
        (String::new(), None, source),
    ];
    let t = serve_stream(stream, exports, None);
    if vubd_fuzz::tracing() {
        eprintln!("{t:?}");
    }
    let output = output.lock().unwrap();
    let (hr, hw) = (t.handshake_read as usize, t.handshake_written as usize);
    assert!(hr <= client.len() && hw <= output.len());
    check_handshake(&client[..hr], &output[..hw], &t);
    check_transmission(&client[hr..], &output[hw..], &t);
});
