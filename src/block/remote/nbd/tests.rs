//! The client against scripted servers: a thread with a UNIX listener speaking the protocol by
//! hand, well or badly. Real servers (qemu-nbd, nbdkit) are in tests/nbd_client*.rs.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::*;
use crate::block::remote::location::NbdServer;
use crate::block::remote::nbd::info::{FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES};
use crate::block::remote::Waiter;
use crate::nbd::wire::*;

const SIZE: u64 = 16 << 20;
const FLAGS: u16 = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;

/// One connection's server side.
struct Peer(UnixStream);

impl Peer {
    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.0.read_exact(&mut b).unwrap();
        b
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn greet(&mut self) {
        let mut g = Vec::new();
        g.extend_from_slice(&NBDMAGIC.to_be_bytes());
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        self.0.write_all(&g).unwrap();
        let flags = Self::u32_at(&self.read_n(4), 0);
        assert_eq!(flags, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    }

    /// The next option: its code and data.
    fn option(&mut self) -> (u32, Vec<u8>) {
        let h = self.read_n(16);
        assert_eq!(&h[..8], &IHAVEOPT.to_be_bytes());
        let len = Self::u32_at(&h, 12) as usize;
        (Self::u32_at(&h, 8), self.read_n(len))
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) {
        self.reply_claiming(option, kind, data, data.len() as u32);
    }

    fn reply_claiming(&mut self, option: u32, kind: u32, data: &[u8], len: u32) {
        let mut r = Vec::new();
        put_option_reply(&mut r, option, kind, len);
        r.extend_from_slice(data);
        self.0.write_all(&r).unwrap();
    }

    /// Accept STRUCTURED_REPLY (if `structured`) and GO, with `max_block` as the maximum
    /// payload if given. Returns the export name asked for.
    fn negotiate(&mut self, structured: bool, flags: u16, max_block: Option<u32>) -> String {
        self.greet();
        loop {
            let (opt, data) = self.option();
            match opt {
                OPT_STRUCTURED_REPLY if structured => self.reply(opt, REP_ACK, &[]),
                OPT_GO => {
                    let len = Self::u32_at(&data, 0) as usize;
                    let name = String::from_utf8(data[4..4 + len].to_vec()).unwrap();
                    let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                    info.extend_from_slice(&SIZE.to_be_bytes());
                    info.extend_from_slice(&flags.to_be_bytes());
                    self.reply(opt, REP_INFO, &info);
                    if let Some(max) = max_block {
                        let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                        for v in [512u32, 4096, max] {
                            b.extend_from_slice(&v.to_be_bytes());
                        }
                        self.reply(opt, REP_INFO, &b);
                    }
                    self.reply(opt, REP_ACK, &[]);
                    return name;
                }
                _ => self.reply(opt, REP_ERR_UNSUP, &[]),
            }
        }
    }

    /// The next request, and a write's payload.
    fn request(&mut self) -> (Request, Vec<u8>) {
        let b: [u8; Request::SIZE] = self.read_n(Request::SIZE).try_into().unwrap();
        let r = Request::decode(&b);
        assert_eq!(r.magic, REQUEST_MAGIC);
        let data = if r.kind == CMD_WRITE {
            self.read_n(r.length as usize)
        } else {
            Vec::new()
        };
        (r, data)
    }

    fn simple(&mut self, error: u32, cookie: u64, data: &[u8]) {
        let mut r = Vec::new();
        put_simple_reply(&mut r, error, cookie);
        r.extend_from_slice(data);
        self.0.write_all(&r).unwrap();
    }

    fn chunk(&mut self, flags: u16, kind: u16, cookie: u64, payload: &[u8]) {
        let mut r = Vec::new();
        put_chunk(&mut r, flags, kind, cookie, payload.len() as u32);
        r.extend_from_slice(payload);
        self.0.write_all(&r).unwrap();
    }

    fn data_chunk(&mut self, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(data);
        self.chunk(flags, REPLY_TYPE_OFFSET_DATA, cookie, &p);
    }

    fn error_chunk(&mut self, cookie: u64, error: u32, msg: &str) {
        let mut p = error.to_be_bytes().to_vec();
        p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        p.extend_from_slice(msg.as_bytes());
        self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, &p);
    }
}

/// A scripted server: `script` runs for the connections accepted, in turn (with their
/// number), on a thread the returned handle joins.
struct Fake {
    path: PathBuf,
    thread: Option<JoinHandle<()>>,
}

impl Fake {
    fn start(conns: usize, script: impl Fn(Peer, usize) + Send + 'static) -> Fake {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "vubd-nbdc-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let thread = std::thread::spawn(move || {
            for i in 0..conns {
                let (s, _) = listener.accept().unwrap();
                script(Peer(s), i);
            }
        });
        Fake {
            path,
            thread: Some(thread),
        }
    }

    fn spec(&self, reconnect_delay: u64) -> NbdSpec {
        NbdSpec {
            server: NbdServer::Unix(self.path.clone()),
            export: "disk".into(),
            tls_creds: None,
            tls_hostname: None,
            reconnect_delay: Duration::from_secs(reconnect_delay),
            open_timeout: Duration::ZERO,
        }
    }

    /// Wait for the script to finish, failing the test if it panicked.
    fn join(mut self) {
        if let Some(t) = self.thread.take() {
            t.join().expect("the scripted server failed");
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn connect(fake: &Fake, delay: u64) -> NbdClient {
    NbdClient::connect(&fake.spec(delay), false, None).unwrap()
}

/// Submit a read of `bufs` at `offset`; the buffers must outlive the returned waiter's wait.
fn read_async(
    c: &NbdClient,
    offset: u64,
    bufs: &mut [Vec<u8>],
    iov: &mut Vec<libc::iovec>,
) -> Waiter {
    *iov = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let (done, waiter) = Completion::oneshot();
    let op = RemoteOp::Readv {
        offset,
        iov: iov.as_ptr(),
        iovcnt: iov.len() as u32,
    };
    // SAFETY: the callers wait before touching `bufs` or `iov` again.
    unsafe { c.submit(op, done) };
    waiter
}

fn store(c: &NbdClient) -> &(dyn RemoteStore + 'static) {
    c
}

#[test]
fn simple_replies_carry_reads_and_writes() {
    let fake = Fake::start(1, |mut p, _| {
        assert_eq!(p.negotiate(false, FLAGS, None), "disk");
        let (w, data) = p.request();
        assert_eq!(
            (w.kind, w.offset, data.as_slice()),
            (CMD_WRITE, 4096, &[7u8; 512][..])
        );
        p.simple(0, w.cookie, &[]);
        let (r, _) = p.request();
        assert_eq!((r.kind, r.offset, r.length), (CMD_READ, 512, 1024));
        p.simple(0, r.cookie, &[9u8; 1024]);
        let (f, _) = p.request();
        assert_eq!(f.kind, CMD_FLUSH);
        p.simple(0, f.cookie, &[]);
        let (d, _) = p.request();
        assert_eq!(d.kind, CMD_DISC);
    });
    let c = connect(&fake, 0);
    assert_eq!(store(&c).size().unwrap(), SIZE);
    store(&c).write_at(&[7u8; 512], 4096).unwrap();
    let mut buf = vec![0u8; 1024];
    store(&c).read_at(&mut buf, 512).unwrap();
    assert_eq!(buf, vec![9u8; 1024]);
    store(&c).flush().unwrap();
    drop(c);
    fake.join();
}

#[test]
fn structured_chunks_are_reassembled_across_iovecs() {
    let fake = Fake::start(1, |mut p, _| {
        p.negotiate(true, FLAGS, None);
        let (r, _) = p.request();
        assert_eq!((r.offset, r.length), (8192, 3000));
        // Out of order: the data of the second half first, then a hole, then NONE.
        p.data_chunk(0, r.cookie, 8192 + 1000, &[5u8; 2000]);
        let mut hole = (8192u64).to_be_bytes().to_vec();
        hole.extend_from_slice(&1000u32.to_be_bytes());
        p.chunk(0, REPLY_TYPE_OFFSET_HOLE, r.cookie, &hole);
        p.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, r.cookie, &[]);
        p.request();
    });
    let c = connect(&fake, 0);
    let mut bufs = vec![vec![0xaau8; 700], vec![0xaau8; 1300], vec![0xaau8; 1000]];
    let mut iov = Vec::new();
    assert_eq!(read_async(&c, 8192, &mut bufs, &mut iov).wait(), 3000);
    let all: Vec<u8> = bufs.concat();
    assert!(all[..1000].iter().all(|&b| b == 0));
    assert!(all[1000..].iter().all(|&b| b == 5));
    drop(c);
    fake.join();
}

#[test]
fn an_absurd_option_reply_length_is_refused_before_reading() {
    let fake = Fake::start(1, |mut p, _| {
        p.greet();
        let (opt, _) = p.option();
        p.reply_claiming(opt, REP_ACK, &[], 0xffff_fff0);
    });
    let err = NbdClient::connect(&fake.spec(0), false, None).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("4294967280-byte reply"), "{msg}");
    assert!(msg.starts_with("nbd+unix:///disk?socket="), "{msg}");
    fake.join();
}

#[test]
fn inconsistent_export_information_is_refused() {
    // Block sizes that are not powers of two, and an export information reply without the
    // export's size and flags.
    let fake = Fake::start(2, |mut p, i| {
        p.greet();
        let (opt, _) = p.option();
        p.reply(opt, REP_ACK, &[]);
        let (opt, _) = p.option();
        assert_eq!(opt, OPT_GO);
        if i == 0 {
            let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
            for v in [3u32, 4096, 1 << 20] {
                b.extend_from_slice(&v.to_be_bytes());
            }
            p.reply(opt, REP_INFO, &b);
        } else {
            p.reply(opt, REP_INFO, &INFO_EXPORT.to_be_bytes());
        }
        // No ACK: the client hangs up on what it got (writing more could race with that).
        assert_eq!(p.0.read(&mut [0u8; 1]).unwrap_or(0), 0);
    });
    let msg = NbdClient::connect(&fake.spec(0), false, None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("invalid block sizes: minimum 3"), "{msg}");
    let msg = NbdClient::connect(&fake.spec(0), false, None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("malformed NBD_INFO_EXPORT"), "{msg}");
    fake.join();
}

#[test]
fn refusals_say_what_to_do() {
    let fake = Fake::start(3, |mut p, i| {
        p.greet();
        let (opt, _) = p.option();
        match i {
            0 => p.reply(opt, REP_ERR_TLS_REQD, b"TLS first"),
            _ => {
                p.reply(opt, REP_ERR_UNSUP, &[]);
                let (opt, _) = p.option();
                assert_eq!(opt, OPT_GO);
                if i == 1 {
                    p.reply(opt, REP_ERR_UNKNOWN, b"no\nsuch export");
                } else {
                    // A server without NBD_OPT_GO: the client falls back to EXPORT_NAME.
                    p.reply(opt, REP_ERR_UNSUP, &[]);
                    let (opt, name) = p.option();
                    assert_eq!((opt, name.as_slice()), (OPT_EXPORT_NAME, &b"disk"[..]));
                    let mut r = SIZE.to_be_bytes().to_vec();
                    r.extend_from_slice(&(FLAG_HAS_FLAGS | FLAG_READ_ONLY).to_be_bytes());
                    p.0.write_all(&r).unwrap();
                    let (d, _) = p.request();
                    assert_eq!(d.kind, CMD_DISC);
                }
            }
        }
    });
    let msg = NbdClient::connect(&fake.spec(0), false, None)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("requires TLS") && msg.contains("tls-creds"),
        "{msg}"
    );
    let msg = NbdClient::connect(&fake.spec(0), false, None)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("no export 'disk'") && msg.contains("(server: no such export)"),
        "{msg}"
    );
    let c = NbdClient::connect(&fake.spec(0), false, None).unwrap();
    assert!(c.read_only());
    let err = store(&c).write_at(&[1], 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    drop(c);
    fake.join();
}

#[test]
fn names_the_protocol_cannot_carry_are_refused_before_connecting() {
    let fake = Fake::start(0, |_, _| {});
    let spec = NbdSpec {
        export: "x".repeat(4097),
        ..fake.spec(0)
    };
    let msg = NbdClient::connect(&spec, false, None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("4097 bytes long"), "{msg}");
    fake.join();
}

#[test]
fn a_reply_with_an_unknown_cookie_ends_the_connection() {
    let fake = Fake::start(1, |mut p, _| {
        p.negotiate(true, FLAGS, None);
        let (r, _) = p.request();
        p.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, r.cookie ^ 0xdead, &[]);
        // The client hangs up: nothing more comes.
        assert_eq!(p.0.read(&mut [0u8; 1]).unwrap(), 0);
    });
    let c = connect(&fake, 0);
    let err = store(&c).flush().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    fake.join();
}

#[test]
fn a_data_chunk_outside_the_request_never_lands() {
    let fake = Fake::start(1, |mut p, _| {
        p.negotiate(true, FLAGS, None);
        let (r, _) = p.request();
        // 16 bytes past the read's end.
        p.data_chunk(REPLY_FLAG_DONE, r.cookie, r.offset + 16, &[0xee; 512]);
        assert_eq!(p.0.read(&mut [0u8; 1]).unwrap_or(0), 0);
    });
    let c = connect(&fake, 0);
    // One buffer with canaries around the 512 bytes read.
    let mut bufs = vec![vec![0x11u8; 512]];
    let mut iov = Vec::new();
    assert_eq!(read_async(&c, 0, &mut bufs, &mut iov).wait(), -libc::EIO);
    assert!(
        bufs[0].iter().all(|&b| b == 0x11),
        "nothing of the chunk was written"
    );
    drop(c);
    fake.join();
}

#[test]
fn hostile_chunk_lengths_end_the_connection() {
    // A data chunk claiming 4 GiB, and an error chunk whose message overruns it. A server
    // each: a client that lost its connection reconnects to whatever listens.
    for case in 0..2 {
        let fake = Fake::start(1, move |mut p, _| {
            p.negotiate(true, FLAGS, None);
            let (r, _) = p.request();
            let mut head = Vec::new();
            if case == 0 {
                put_chunk(
                    &mut head,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    r.cookie,
                    u32::MAX,
                );
                head.extend_from_slice(&r.offset.to_be_bytes());
            } else {
                put_chunk(&mut head, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, r.cookie, 8);
                head.extend_from_slice(&EIO.to_be_bytes());
                head.extend_from_slice(&1000u16.to_be_bytes());
                head.extend_from_slice(b"ab");
            }
            p.0.write_all(&head).unwrap();
            assert_eq!(p.0.read(&mut [0u8; 1]).unwrap_or(0), 0);
        });
        let c = connect(&fake, 0);
        let mut buf = vec![0u8; 4096];
        let err = store(&c).read_at(&mut buf, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "case {case}");
        drop(c);
        fake.join();
    }
}

#[test]
fn an_error_reply_fails_its_request_and_the_connection_stays() {
    let fake = Fake::start(1, |mut p, _| {
        p.negotiate(true, FLAGS, None);
        let (w, _) = p.request();
        p.error_chunk(w.cookie, ENOSPC, "disk full");
        let (z, _) = p.request();
        assert_eq!((z.kind, z.flags), (CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE));
        p.simple(0, z.cookie, &[]);
        let (t, _) = p.request();
        assert_eq!((t.kind, t.flags), (CMD_WRITE_ZEROES, 0));
        p.simple(EPERM, t.cookie, &[]);
        let (d, _) = p.request();
        assert_eq!(d.kind, CMD_TRIM);
        p.simple(0, d.cookie, &[]);
        p.request();
    });
    let c = connect(&fake, 0);
    let s = store(&c);
    let err = s.write_at(&[1u8; 4096], 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    s.zeroes(0, 4096, ZeroOp::WriteZeroes { unmap: false })
        .unwrap();
    let err = s
        .zeroes(0, 4096, ZeroOp::WriteZeroes { unmap: true })
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    s.zeroes(0, 4096, ZeroOp::Discard).unwrap();
    drop(c);
    fake.join();
}

#[test]
fn large_requests_are_split_and_complete_once_with_the_first_error() {
    let fake = Fake::start(1, |mut p, _| {
        p.negotiate(true, FLAGS, Some(4096));
        let mut reqs: Vec<Request> = (0..4).map(|_| p.request().0).collect();
        reqs.sort_by_key(|r| r.offset);
        assert_eq!(
            reqs.iter()
                .map(|r| (r.offset, r.length))
                .collect::<Vec<_>>(),
            [(0, 4096), (4096, 4096), (8192, 4096), (12288, 4096)]
        );
        for (i, r) in reqs.iter().enumerate().rev() {
            if i == 2 {
                p.error_chunk(r.cookie, EPERM, "");
            } else if i == 1 {
                p.error_chunk(r.cookie, EIO, "");
            } else {
                p.data_chunk(REPLY_FLAG_DONE, r.cookie, r.offset, &[1u8; 4096]);
            }
        }
        p.request();
    });
    let c = connect(&fake, 0);
    assert_eq!(c.block_sizes(), (512, 4096, 4096));
    let mut buf = vec![0u8; 16384];
    let err = store(&c).read_at(&mut buf, 0).unwrap_err();
    // Replies came last part first: the third part's EPERM is the first error.
    assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    // Unaligned and out-of-range requests never reach the server.
    let e = store(&c).read_at(&mut buf[..100], 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    let e = store(&c).read_at(&mut buf[..512], SIZE).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    let e = store(&c).write_at(&buf[..512], SIZE).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    drop(c);
    fake.join();
}

#[test]
fn a_write_answered_before_its_payload_is_read_completes_after_the_send() {
    // 8 MiB cannot fit in the socket's buffer: the sender is still sending when the early
    // reply comes, so the reader must leave the completion to it.
    const LEN: usize = 8 << 20;
    let fake = Fake::start(1, |mut p, _| {
        p.negotiate(true, FLAGS, None);
        let b: [u8; Request::SIZE] = p.read_n(Request::SIZE).try_into().unwrap();
        let w = Request::decode(&b);
        assert_eq!((w.kind, w.length as usize), (CMD_WRITE, LEN));
        p.simple(0, w.cookie, &[]);
        assert!(p.read_n(LEN).iter().all(|&b| b == 0x42));
        p.request();
    });
    let c = connect(&fake, 0);
    store(&c).write_at(&vec![0x42u8; LEN], 0).unwrap();
    drop(c);
    fake.join();
}

#[test]
fn a_server_shutting_down_has_its_requests_sent_again_after_reconnecting() {
    let fake = Fake::start(2, |mut p, i| {
        p.negotiate(true, FLAGS, None);
        let (r, _) = p.request();
        if i == 0 {
            p.error_chunk(r.cookie, ESHUTDOWN, "going away");
            // The client disconnects softly.
            assert_eq!(p.request().0.kind, CMD_DISC);
        } else {
            assert_eq!((r.kind, r.offset), (CMD_READ, 4096));
            p.data_chunk(REPLY_FLAG_DONE, r.cookie, 4096, &[3u8; 512]);
            p.request();
        }
    });
    let c = connect(&fake, 30);
    let mut buf = vec![0u8; 512];
    store(&c).read_at(&mut buf, 4096).unwrap();
    assert_eq!(buf, vec![3u8; 512]);
    drop(c);
    fake.join();
}

#[test]
fn dropping_the_client_fails_what_is_in_flight_and_says_goodbye() {
    let fake = Fake::start(1, |mut p, _| {
        p.negotiate(true, FLAGS, None);
        let (r, _) = p.request();
        assert_eq!(r.kind, CMD_READ);
        // Never answered; the client leaves with NBD_CMD_DISC.
        assert_eq!(p.request().0.kind, CMD_DISC);
    });
    let c = connect(&fake, 30);
    let mut bufs = vec![vec![0u8; 512]];
    let mut iov = Vec::new();
    let waiter = read_async(&c, 0, &mut bufs, &mut iov);
    // The request is in flight once the server has it; dropping does not wait for it.
    drop(c);
    assert_eq!(waiter.wait(), -libc::EIO);
    fake.join();
}
