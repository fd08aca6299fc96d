//! Protocol edge cases with a hand-written client over a socket pair, against `serve_stream`
//! (the code every connection thread runs). The real clients are in tests/nbd_server.rs.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::proto::*;
use super::{serve_stream, ExportSource, Transcript};

/// 1 MiB + 3 bytes: the first 4 KiB hold data, the rest is a hole; extents come back in
/// 512-byte pieces (the server merges them). Bitmap "a": the first 512 bytes dirty; "b": clean.
/// Reads at 64 KiB and beyond fail with ENOSPC (to check errno mapping).
struct Src;

const SIZE: u64 = (1 << 20) + 3;

fn byte(o: u64) -> u8 {
    if o < 4096 {
        (o % 251) as u8 + 1
    } else {
        0
    }
}

impl ExportSource for Src {
    fn size(&self) -> u64 {
        SIZE
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if offset + buf.len() as u64 > 65536 {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        for (i, b) in buf.iter_mut().enumerate() {
            *b = byte(offset + i as u64);
        }
        Ok(())
    }
    fn allocation(&self, offset: u64, len: u64, out: &mut Vec<(u64, u32)>) -> io::Result<()> {
        let mut pos = offset;
        while pos < offset + len && out.len() < 8 {
            let piece = (512 - pos % 512).min(offset + len - pos);
            out.push((
                piece,
                if pos < 4096 {
                    0
                } else {
                    STATE_HOLE | STATE_ZERO
                },
            ));
            pos += piece;
        }
        Ok(())
    }
    fn bitmaps(&self) -> Vec<String> {
        vec!["a".into(), "b".into()]
    }
    fn dirty(
        &self,
        index: usize,
        offset: u64,
        len: u64,
        out: &mut Vec<(u64, u32)>,
    ) -> io::Result<()> {
        if index == 0 && offset < 512 {
            out.push(((512 - offset).min(len), STATE_DIRTY | 0x80));
            if len > 512 - offset {
                out.push((len - (512 - offset), 0));
            }
        } else {
            out.push((len, 0));
        }
        Ok(())
    }
}

struct Client {
    s: UnixStream,
    server: Option<JoinHandle<Transcript>>,
}

impl Client {
    /// Start a server on one end of a socket pair, with exports "disk" and "".
    fn new() -> Client {
        let (s, server) = UnixStream::pair().unwrap();
        let src: Arc<dyn ExportSource> = Arc::new(Src);
        let exports = vec![
            (
                "disk".to_string(),
                Some("a test disk".to_string()),
                src.clone(),
            ),
            (String::new(), None, src),
        ];
        let server = std::thread::spawn(move || serve_stream(server, exports, None));
        Client {
            s,
            server: Some(server),
        }
    }

    fn hello_with(&mut self, flags: u32) {
        let mut g = [0u8; 18];
        self.s.read_exact(&mut g).unwrap();
        assert_eq!(g, greeting());
        self.send(&flags.to_be_bytes());
    }

    fn hello() -> Client {
        let mut c = Client::new();
        c.hello_with(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        c
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    fn reply(&mut self, opt: u32) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(h[..8], REPLY_MAGIC.to_be_bytes());
        assert_eq!(h[8..12], opt.to_be_bytes(), "reply to another option");
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).unwrap();
        (u32::from_be_bytes(h[12..16].try_into().unwrap()), data)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    fn structured(&mut self) {
        self.option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(self.reply(OPT_STRUCTURED_REPLY).0, REP_ACK);
    }

    /// LIST/SET_META_CONTEXT: the context names (and ids) replied, then the final reply type.
    fn meta(&mut self, opt: u32, export: &str, queries: &[&str]) -> (Vec<(u32, String)>, u32) {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        self.option(opt, &d);
        let mut out = Vec::new();
        loop {
            let (kind, data) = self.reply(opt);
            if kind != REP_META_CONTEXT {
                return (out, kind);
            }
            let id = u32::from_be_bytes(data[..4].try_into().unwrap());
            out.push((id, String::from_utf8(data[4..].to_vec()).unwrap()));
        }
    }

    fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    /// INFO or GO: the NBD_REP_INFO payloads, then the final reply type.
    fn info(&mut self, opt: u32, name: &str, requests: &[u16]) -> (Vec<Vec<u8>>, u32) {
        self.option(opt, &Self::info_data(name, requests));
        let mut infos = Vec::new();
        loop {
            let (kind, data) = self.reply(opt);
            if kind != REP_INFO {
                return (infos, kind);
            }
            infos.push(data);
        }
    }

    fn go(&mut self, name: &str) {
        assert_eq!(self.info(OPT_GO, name, &[]).1, REP_ACK);
    }

    fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        let r = Request {
            magic: REQUEST_MAGIC,
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        self.send(&r.encode());
    }

    fn simple(&mut self, cookie: u64) -> u32 {
        let h = self.bytes(16);
        assert_eq!(h[..4], SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(h[8..16], cookie.to_be_bytes());
        u32::from_be_bytes(h[4..8].try_into().unwrap())
    }

    /// One structured chunk: (flags, type, payload).
    fn chunk(&mut self, cookie: u64) -> (u16, u16, Vec<u8>) {
        let h = self.bytes(20);
        assert_eq!(h[..4], STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(h[8..16], cookie.to_be_bytes());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let payload = self.bytes(len as usize);
        (
            u16::from_be_bytes(h[4..6].try_into().unwrap()),
            u16::from_be_bytes(h[6..8].try_into().unwrap()),
            payload,
        )
    }

    /// A structured error reply's errno.
    fn chunk_error(&mut self, cookie: u64) -> u32 {
        let (flags, kind, p) = self.chunk(cookie);
        assert_eq!((flags, kind), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR));
        let msg_len = u16::from_be_bytes(p[4..6].try_into().unwrap()) as usize;
        assert_eq!(p.len(), 6 + msg_len);
        u32::from_be_bytes(p[..4].try_into().unwrap())
    }

    /// The server closed the connection; returns how it says the connection ended.
    fn closed(mut self) -> String {
        let mut b = [0u8; 1];
        assert!(matches!(self.s.read(&mut b), Ok(0) | Err(_)), "still open");
        drop(self.s);
        self.server.take().unwrap().join().unwrap().end
    }

    /// Parse block status descriptors: (context id, [(length, flags)]).
    fn extents(p: &[u8]) -> (u32, Vec<(u32, u32)>) {
        let id = u32::from_be_bytes(p[..4].try_into().unwrap());
        let ext = p[4..]
            .chunks(8)
            .map(|d| {
                (
                    u32::from_be_bytes(d[..4].try_into().unwrap()),
                    u32::from_be_bytes(d[4..].try_into().unwrap()),
                )
            })
            .collect();
        (id, ext)
    }
}

#[test]
fn client_flags_are_checked() {
    let mut c = Client::new();
    c.hello_with(FLAG_C_FIXED_NEWSTYLE | 4);
    assert!(c.closed().contains("unknown client flags"));
    let mut c = Client::new();
    c.hello_with(0);
    assert!(c.closed().contains("fixed newstyle"));
}

#[test]
fn bad_option_magic_closes() {
    let mut c = Client::hello();
    c.send(&[0u8; 16]);
    assert!(c.closed().contains("bad option magic"));
}

#[test]
fn unknown_options_are_unsupported_and_haggling_goes_on() {
    let mut c = Client::hello();
    for opt in [OPT_EXTENDED_HEADERS, 4, 99, 0x8000_0000] {
        c.option(opt, b"xyz");
        assert_eq!(c.reply(opt).0, REP_ERR_UNSUP);
    }
    // STARTTLS without TLS configured is a policy refusal.
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.reply(OPT_STARTTLS).0, REP_ERR_POLICY);
    c.structured();
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.reply(OPT_STRUCTURED_REPLY).0, REP_ERR_INVALID);
    c.go("disk");
    c.request(CMD_DISC, 0, 0, 0, 0);
    assert_eq!(c.closed(), "client disconnected");
}

#[test]
fn abort_and_list() {
    let mut c = Client::hello();
    c.option(OPT_LIST, &[]);
    let (k, d) = c.reply(OPT_LIST);
    assert_eq!(k, REP_SERVER);
    assert_eq!(d, b"\0\0\0\x04diska test disk");
    let (k, d) = c.reply(OPT_LIST);
    assert_eq!((k, d), (REP_SERVER, vec![0, 0, 0, 0]));
    assert_eq!(c.reply(OPT_LIST).0, REP_ACK);
    c.option(OPT_LIST, b"x");
    assert_eq!(c.reply(OPT_LIST).0, REP_ERR_INVALID);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.reply(OPT_ABORT).0, REP_ACK);
    assert_eq!(c.closed(), "client disconnected");
}

#[test]
fn info_and_go() {
    let mut c = Client::hello();
    let (infos, k) = c.info(OPT_INFO, "disk", &[INFO_NAME, INFO_DESCRIPTION, 77]);
    assert_eq!(k, REP_ACK);
    let mut export = INFO_EXPORT.to_be_bytes().to_vec();
    export.extend_from_slice(&SIZE.to_be_bytes());
    let flags = FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_CACHE | FLAG_CAN_MULTI_CONN;
    export.extend_from_slice(&flags.to_be_bytes());
    let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [1u32, 4096, 32 << 20] {
        sizes.extend_from_slice(&v.to_be_bytes());
    }
    assert_eq!(
        infos,
        [
            export,
            b"\0\x01disk".to_vec(),
            b"\0\x02a test disk".to_vec(),
            sizes
        ]
    );
    assert_eq!(c.info(OPT_INFO, "nope", &[]), (vec![], REP_ERR_UNKNOWN));
    // Lengths that disagree with the option length, and an overlong name.
    let mut d = Client::info_data("disk", &[INFO_NAME]);
    d.push(0);
    c.option(OPT_GO, &d);
    assert_eq!(c.reply(OPT_GO).0, REP_ERR_INVALID);
    d.truncate(d.len() - 2);
    c.option(OPT_GO, &d);
    assert_eq!(c.reply(OPT_GO).0, REP_ERR_INVALID);
    let long = "x".repeat(MAX_STRING + 1);
    assert_eq!(c.info(OPT_GO, &long, &[]).1, REP_ERR_INVALID);
    // The empty name is the export named "" (as in QEMU), not a default.
    let (infos, k) = c.info(OPT_GO, "", &[]);
    assert_eq!(k, REP_ACK);
    assert_eq!(infos[0][..2], INFO_EXPORT.to_be_bytes());
    c.request(CMD_READ, 0, 5, 0, 3);
    assert_eq!(c.simple(5), 0);
    assert_eq!(c.bytes(3), [1, 2, 3]);
}

#[test]
fn export_name_option() {
    // Without NO_ZEROES: 124 bytes of padding after size and flags.
    let mut c = Client::new();
    c.hello_with(FLAG_C_FIXED_NEWSTYLE);
    c.option(OPT_EXPORT_NAME, b"disk");
    let r = c.bytes(134);
    assert_eq!(r[..8], SIZE.to_be_bytes());
    assert!(r[10..].iter().all(|&b| b == 0));
    c.request(CMD_FLUSH, 0, 1, 0, 0);
    assert_eq!(c.simple(1), 0);
    // An unknown name has no error reply: the connection is closed.
    let mut c = Client::hello();
    c.option(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed().contains("unknown export"));
}

#[test]
fn oversized_option_is_refused_unread() {
    let mut c = Client::hello();
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_LIST.to_be_bytes());
    b.extend_from_slice(&(MAX_OPTION + 1).to_be_bytes());
    c.send(&b);
    assert_eq!(c.reply(OPT_LIST).0, REP_ERR_TOO_BIG);
    assert!(c.closed().contains("bytes (at most"));
}

#[test]
fn meta_context_queries() {
    let mut c = Client::hello();
    let all = |ids: [u32; 3]| {
        vec![
            (ids[0], "base:allocation".to_string()),
            (ids[1], "qemu:dirty-bitmap:a".to_string()),
            (ids[2], "qemu:dirty-bitmap:b".to_string()),
        ]
    };
    // LIST: no query lists everything; namespaces list all of theirs; ids are 0.
    assert_eq!(
        c.meta(OPT_LIST_META_CONTEXT, "disk", &[]),
        (all([0; 3]), REP_ACK)
    );
    assert_eq!(
        c.meta(
            OPT_LIST_META_CONTEXT,
            "disk",
            &["base:", "qemu:dirty-bitmap:"]
        ),
        (all([0; 3]), REP_ACK)
    );
    assert_eq!(
        c.meta(OPT_LIST_META_CONTEXT, "disk", &["qemu:"]).0,
        all([0; 3])[1..]
    );
    assert_eq!(
        c.meta(
            OPT_LIST_META_CONTEXT,
            "disk",
            &[
                "x-unknown:thing",
                "nocolon",
                "qemu:dirty-bitmap:zz",
                "qemu:dirty-bitmap:b"
            ]
        ),
        (vec![(0, "qemu:dirty-bitmap:b".to_string())], REP_ACK)
    );
    assert_eq!(
        c.meta(OPT_LIST_META_CONTEXT, "nope", &[]),
        (vec![], REP_ERR_UNKNOWN)
    );
    // SET needs structured replies.
    assert_eq!(
        c.meta(OPT_SET_META_CONTEXT, "disk", &["base:allocation"]),
        (vec![], REP_ERR_INVALID)
    );
    c.structured();
    // SET takes full names only; ids are unique.
    assert_eq!(
        c.meta(
            OPT_SET_META_CONTEXT,
            "disk",
            &["base:", "qemu:dirty-bitmap:"]
        ),
        (vec![], REP_ACK)
    );
    assert_eq!(
        c.meta(
            OPT_SET_META_CONTEXT,
            "disk",
            &[
                "qemu:dirty-bitmap:b",
                "base:allocation",
                "qemu:dirty-bitmap:a"
            ]
        ),
        (all([0, 1, 2]), REP_ACK)
    );
    // Too many queries; a query longer than its option.
    let many: Vec<&str> = vec!["a:"; MAX_QUERIES as usize + 1];
    assert_eq!(
        c.meta(OPT_LIST_META_CONTEXT, "disk", &many),
        (vec![], REP_ERR_TOO_BIG)
    );
    let mut d = 4u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"disk");
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&100u32.to_be_bytes());
    c.option(OPT_LIST_META_CONTEXT, &d);
    assert_eq!(c.reply(OPT_LIST_META_CONTEXT).0, REP_ERR_INVALID);
}

#[test]
fn block_status_per_context_and_req_one() {
    let mut c = Client::hello();
    c.structured();
    c.meta(
        OPT_SET_META_CONTEXT,
        "disk",
        &["base:allocation", "qemu:dirty-bitmap:a"],
    );
    c.go("disk");
    c.request(CMD_BLOCK_STATUS, 0, 1, 0, 8192);
    let (flags, kind, p) = c.chunk(1);
    assert_eq!((flags, kind), (0, REPLY_TYPE_BLOCK_STATUS));
    // 512-byte pieces merged; the source's 8 pieces a call end at 4096, then the rest.
    assert_eq!(Client::extents(&p), (0, vec![(4096, 0), (4096, 3)]));
    let (flags, kind, p) = c.chunk(1);
    assert_eq!((flags, kind), (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS));
    // Unknown flag bits from the source are masked out.
    assert_eq!(Client::extents(&p), (1, vec![(512, 1), (7680, 0)]));

    c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 2, 100, 8192);
    let (_, _, p) = c.chunk(2);
    assert_eq!(Client::extents(&p), (0, vec![(3996, 0)]));
    let (_, _, p) = c.chunk(2);
    assert_eq!(Client::extents(&p), (1, vec![(412, 1)]));

    // The last bytes of an odd-sized export.
    c.request(CMD_BLOCK_STATUS, 0, 3, SIZE - 3, 3);
    let (_, _, p) = c.chunk(3);
    assert_eq!(Client::extents(&p), (0, vec![(3, 3)]));
    c.chunk(3);

    for (cookie, flags, offset, len) in [(4, 0, 0, 0), (5, 0, SIZE - 1, 2), (6, CMD_FLAG_DF, 0, 1)]
    {
        c.request(CMD_BLOCK_STATUS, flags, cookie, offset, len);
        assert_eq!(c.chunk_error(cookie), EINVAL);
    }
}

#[test]
fn block_status_needs_contexts_for_the_export_used() {
    // Contexts set for "disk" do not apply to "".
    let mut c = Client::hello();
    c.structured();
    let (ctx, k) = c.meta(OPT_SET_META_CONTEXT, "disk", &["base:allocation"]);
    assert_eq!((ctx.len(), k), (1, REP_ACK));
    c.go("");
    c.request(CMD_BLOCK_STATUS, 0, 1, 0, 512);
    assert_eq!(c.chunk_error(1), EINVAL);
    // And without structured replies there is no block status at all.
    let mut c = Client::hello();
    c.go("disk");
    c.request(CMD_BLOCK_STATUS, 0, 2, 0, 512);
    assert_eq!(c.simple(2), EINVAL);
}

#[test]
fn simple_replies() {
    let mut c = Client::hello();
    c.go("disk");
    c.request(CMD_READ, 0, 1, 4090, 10);
    assert_eq!(c.simple(1), 0);
    let want: Vec<u8> = (4090..4100).map(byte).collect();
    assert_eq!(c.bytes(10), want);
    c.request(CMD_READ, 0, 2, SIZE - 1, 2);
    assert_eq!(c.simple(2), EINVAL);
    c.request(CMD_READ, 0, 3, u64::MAX, 1);
    assert_eq!(c.simple(3), EINVAL);
    c.request(CMD_READ, CMD_FLAG_DF, 4, 0, 1);
    assert_eq!(c.simple(4), EINVAL, "DF needs structured replies");
    c.request(CMD_READ, 0, 5, 65536, 1);
    assert_eq!(c.simple(5), ENOSPC, "the source's errno");
    c.request(CMD_READ, 0, 6, 0, MAX_PAYLOAD + 1);
    assert_eq!(c.simple(6), EINVAL);
    // Writes: payload consumed, EPERM, connection in step.
    c.request(CMD_WRITE, 0, 7, 0, 5);
    c.send(b"hello");
    assert_eq!(c.simple(7), EPERM);
    for kind in [CMD_TRIM, CMD_WRITE_ZEROES] {
        c.request(kind, 0, 8, 0, 512);
        assert_eq!(c.simple(8), EPERM);
    }
    c.request(CMD_CACHE, 0, 9, 0, 1 << 20);
    assert_eq!(c.simple(9), 0);
    c.request(CMD_CACHE, 0, 9, SIZE, 1);
    assert_eq!(c.simple(9), EINVAL);
    c.request(CMD_FLUSH, CMD_FLAG_FUA, 10, 0, 0);
    assert_eq!(c.simple(10), EINVAL);
    c.request(42, 0, 11, 0, 0);
    assert_eq!(c.simple(11), EINVAL);
    c.request(CMD_READ, 0, 12, 0, 0);
    assert_eq!(c.simple(12), 0);
    // Bad request magic: hard disconnect.
    c.send(&[0u8; 28]);
    assert!(c.closed().contains("bad request magic"));
}

#[test]
fn structured_replies() {
    let mut c = Client::hello();
    c.structured();
    c.go("disk");
    c.request(CMD_READ, CMD_FLAG_DF, 1, 4090, 10);
    let (flags, kind, p) = c.chunk(1);
    assert_eq!((flags, kind), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA));
    assert_eq!(p[..8], 4090u64.to_be_bytes());
    assert_eq!(p[8..], (4090..4100).map(byte).collect::<Vec<_>>());
    c.request(CMD_READ, 0, 2, 0, 0);
    assert_eq!(c.chunk(2), (REPLY_FLAG_DONE, REPLY_TYPE_NONE, vec![]));
    c.request(CMD_READ, 0, 3, 65536, 1);
    assert_eq!(c.chunk_error(3), ENOSPC);
    c.request(CMD_READ, 0, 4, 0, 1 << 30);
    assert_eq!(c.chunk_error(4), EOVERFLOW);
    c.request(CMD_READ, CMD_FLAG_REQ_ONE, 5, 0, 1);
    assert_eq!(c.chunk_error(5), EINVAL);
    c.request(CMD_FLUSH, 0, 6, 0, 0);
    assert_eq!(c.chunk(6), (REPLY_FLAG_DONE, REPLY_TYPE_NONE, vec![]));
    c.request(CMD_WRITE, 0, 7, 0, 3);
    c.send(b"abc");
    assert_eq!(c.chunk_error(7), EPERM);
    c.request(CMD_DISC, 0, 8, 0, 0);
    assert_eq!(c.closed(), "client disconnected");
}

#[test]
fn transcript_counts_the_handshake() {
    let mut c = Client::hello();
    c.go("disk");
    c.request(CMD_DISC, 0, 0, 0, 0);
    drop(c.s);
    let t = c.server.take().unwrap().join().unwrap();
    // 4 flag bytes + a GO option of 16 + 10 bytes.
    assert_eq!(t.handshake_read, 4 + 16 + 10);
    let tx = t.transmission.unwrap();
    assert_eq!(
        (tx.export.as_str(), tx.size, tx.structured),
        ("disk", SIZE, false)
    );
}
