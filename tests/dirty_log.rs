//! Live migration's dirty log (vhost-user.rst, "Migration"): `VHOST_F_LOG_ALL` and
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD`, driven the way QEMU drives them. The frontend hands vubd a
//! shared bitmap with `SET_LOG_BASE` (one bit per 4 KiB guest page: byte `page / 8`, bit
//! `page % 8`); while `LOG_ALL` is acked, vubd must set the bit of every guest page it writes —
//! a request's device-writable buffers and status byte, and the used ring (at the ring's log
//! address when `SET_VRING_ADDR` carries `VHOST_VRING_F_LOG`) — and of no page it only reads.
//!
//! Every check compares the whole log with the exact set of pages expected, so a missing mark
//! and a page marked that vubd never wrote both fail, each named. The raw frontend's rings are
//! on pages of their own (queue size 256: descriptor table page 0, available ring page 4, used
//! ring page 8), as are the request headers, each status byte, and each data buffer.

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::hostile::{Served, QUEUE_SIZE};
use common::raw_frontend::{
    memfd, negotiate_protocol, r, w, RawFrontend, AVAIL, DESC, MEM_SIZE, USED,
};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Frontend;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};
use vm_memory::{Bytes, GuestAddress};

const IN: u32 = 0;
const OUT: u32 = 1;
const GET_ID: u32 = 8;
const S_OK: u8 = 0;

/// `VHOST_F_LOG_ALL`.
const LOG_ALL: u64 = 1 << 26;
const PAGE: u64 = 4096;
/// The log for `MEM_SIZE` of guest memory: one bit per page.
const LOG_BYTES: u64 = MEM_SIZE / PAGE / 8;

/// Request headers (the device only reads them): one page for all.
const HDRS: u64 = 0x10_0000;
/// Status bytes: one page each, at an odd offset.
const STATUS: u64 = 0x11_0000;
/// Phase 1 (logging off): a read buffer and a write buffer.
const OFF_READ: u64 = 0x30_0000;
const OFF_WRITE: u64 = 0x31_0000;
/// Phase 2: a 3-page read at a page-unaligned address (it spans 4 pages: 0x200..=0x203)...
const READ_BUF: u64 = 0x20_0123;
const READ_LEN: u32 = 3 * PAGE as u32;
/// ... a GET_ID buffer straddling a page boundary (pages 0x400 and 0x401) ...
const ID_BUF: u64 = 0x40_0FF6;
const ID_LEN: u32 = 20;
/// ... and a write, whose data the device only reads (pages 0x600, 0x601).
const WRITE_BUF: u64 = 0x60_0000;
const WRITE_LEN: u32 = 2 * PAGE as u32;
/// Phase 3 (second log): a read straddling pages 0x700 and 0x701, and a write.
const READ2_BUF: u64 = 0x70_0800;
const WRITE2_BUF: u64 = 0x78_0000;
/// Phase 4: a used-ring log address other than the used ring's own.
const USED_LOG_ELSEWHERE: u64 = 0x90_0000;
/// Pages nobody writes.
const UNTOUCHED: [u64; 2] = [0x500, MEM_SIZE / PAGE - 1];

/// How long vubd may take to set a bit after the request is on the used ring (the used ring's
/// own mark follows its publication).
const MARK_DEADLINE: Duration = Duration::from_secs(5);

fn page(addr: u64) -> u64 {
    addr / PAGE
}

/// The pages of `len` bytes at `addr`.
fn pages(addr: u64, len: u64) -> Vec<u64> {
    (page(addr)..=page(addr + len - 1)).collect()
}

fn status_addr(n: u64) -> u64 {
    STATUS + n * PAGE + 0x7ff
}

/// A zeroed log for the whole guest memory, in a memfd of exactly its size.
fn new_log() -> File {
    memfd(LOG_BYTES)
}

fn log_bytes(log: &File) -> Vec<u8> {
    let mut buf = vec![0u8; LOG_BYTES as usize];
    log.read_exact_at(&mut buf, 0).expect("read log");
    buf
}

/// The pages whose bit is set.
fn marked(log: &File) -> BTreeSet<u64> {
    let bytes = log_bytes(log);
    (0..MEM_SIZE / PAGE)
        .filter(|p| bytes[(p / 8) as usize] & (1 << (p % 8)) != 0)
        .collect()
}

/// SET_LOG_BASE with `size` bytes at `offset` of `file`.
fn set_log_base(frontend: &Frontend, file: &File, offset: u64, size: u64) -> vhost::Result<()> {
    frontend.set_log_base(
        0,
        Some(VhostUserDirtyLogRegion {
            mmap_size: size,
            mmap_offset: offset,
            mmap_handle: file.as_raw_fd(),
        }),
    )
}

/// Wait until `log`'s bit for `page` is set (the last mark of a batch is the used ring's, made
/// just after the used index is published), then compare the whole log with `expected`.
fn assert_log(log: &File, wait_for: Option<u64>, expected: &BTreeSet<u64>, what: &str) {
    if let Some(p) = wait_for {
        let deadline = Instant::now() + MARK_DEADLINE;
        while !marked(log).contains(&p) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let got = marked(log);
    let missing: Vec<String> = expected
        .difference(&got)
        .map(|p| format!("{p:#x}"))
        .collect();
    let extra: Vec<String> = got
        .difference(expected)
        .map(|p| format!("{p:#x}"))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: pages written but not marked: {missing:?}; pages marked but never written \
         by the device: {extra:?} (descriptor table page {:#x}, avail ring page {:#x}, used \
         ring page {:#x}, headers page {:#x})",
        page(DESC),
        page(AVAIL),
        page(USED),
        page(HDRS),
    );
}

/// Submit a read of `len` bytes at `sector` into `buf`, status at `status`; check its data.
fn read(s: &Served, fe: &mut RawFrontend, n: u64, sector: u64, buf: u64, len: u32) {
    let hdr = HDRS + 16 * n;
    let status = status_addr(n);
    fe.write_header(hdr, IN, sector);
    let (used, st) = fe.request(&[r(hdr, 16), w(buf, len), w(status, 1)], status);
    assert_eq!((st, used.len), (S_OK, len + 1), "read {n}");
    let mut data = vec![0u8; len as usize];
    fe.mem.read_slice(&mut data, GuestAddress(buf)).unwrap();
    let at = (sector * 512) as usize;
    assert!(
        data == s.model[at..at + len as usize],
        "read {n} returned the disk"
    );
}

/// Submit a write of `len` bytes of a pattern from `buf` at `sector`; update the model.
fn write(s: &mut Served, fe: &mut RawFrontend, n: u64, sector: u64, buf: u64, len: u32) {
    let hdr = HDRS + 16 * n;
    let status = status_addr(n);
    let data = common::pattern(len as usize, 0xd1 + n);
    fe.mem.write_slice(&data, GuestAddress(buf)).unwrap();
    fe.write_header(hdr, OUT, sector);
    let (_, st) = fe.request(&[r(hdr, 16), r(buf, len), w(status, 1)], status);
    assert_eq!(st, S_OK, "write {n}");
    let at = (sector * 512) as usize;
    s.model[at..at + len as usize].copy_from_slice(&data);
}

fn get_id(fe: &mut RawFrontend, n: u64) {
    let hdr = HDRS + 16 * n;
    let status = status_addr(n);
    fe.write_header(hdr, GET_ID, 0);
    let (used, st) = fe.request(&[r(hdr, 16), w(ID_BUF, ID_LEN), w(status, 1)], status);
    assert_eq!((st, used.len), (S_OK, ID_LEN + 1), "GET_ID");
}

#[test]
fn marks_exactly_the_pages_vubd_writes_while_log_all_is_acked() {
    let started = Instant::now();
    let mut s = Served::start("dirty-log", &[]);
    let mut fe = RawFrontend::connect_protocol(
        s.socket(),
        QUEUE_SIZE,
        0,
        VhostUserProtocolFeatures::LOG_SHMFD,
    );
    let offered = fe.frontend.get_features().expect("get_features");
    assert!(offered & LOG_ALL != 0, "vubd offers VHOST_F_LOG_ALL");
    assert_eq!(fe.features & LOG_ALL, 0, "LOG_ALL not acked yet");
    let used_pages: Vec<u64> = pages(USED, 4 + 8 * u64::from(QUEUE_SIZE) + 2);
    assert_eq!(used_pages, [page(USED)], "the used ring fits one page");

    // 1. A log, but LOG_ALL not acked: nothing is marked.
    let log1 = new_log();
    set_log_base(&fe.frontend, &log1, 0, LOG_BYTES).expect("SET_LOG_BASE");
    read(&s, &mut fe, 0, 0, OFF_READ, PAGE as u32);
    write(&mut s, &mut fe, 1, 64, OFF_WRITE, PAGE as u32);
    std::thread::sleep(Duration::from_millis(50));
    assert_log(&log1, None, &BTreeSet::new(), "LOG_ALL not acked");

    // 2. Migration starts: LOG_ALL acked, the ring's used-ring log address set.
    let features = fe.features | LOG_ALL;
    fe.set_features(features)
        .expect("SET_FEATURES with LOG_ALL");
    fe.set_ring_addr(Some(USED))
        .expect("SET_VRING_ADDR with VHOST_VRING_F_LOG");
    read(&s, &mut fe, 2, 8, READ_BUF, READ_LEN);
    get_id(&mut fe, 3);
    write(&mut s, &mut fe, 4, 128, WRITE_BUF, WRITE_LEN);
    let mut expected: BTreeSet<u64> = pages(READ_BUF, READ_LEN.into()).into_iter().collect();
    assert_eq!(
        expected.len(),
        4,
        "a 3-page read at an unaligned address spans 4 pages"
    );
    expected.extend(pages(ID_BUF, ID_LEN.into()));
    expected.extend([2, 3, 4].map(|n| page(status_addr(n))));
    expected.extend(&used_pages);
    for p in UNTOUCHED
        .into_iter()
        .chain(pages(WRITE_BUF, WRITE_LEN.into()))
        .chain([page(DESC), page(AVAIL), page(HDRS)])
    {
        assert!(!expected.contains(&p), "layout: page {p:#x} is not written");
    }
    assert_log(&log1, Some(page(USED)), &expected, "LOG_ALL acked");
    let log1_then = log_bytes(&log1);

    // 3. A new log (QEMU replaces it when memory changes): later writes land in it only.
    let log2 = new_log();
    set_log_base(&fe.frontend, &log2, 0, LOG_BYTES).expect("second SET_LOG_BASE");
    read(&s, &mut fe, 5, 16, READ2_BUF, PAGE as u32);
    write(&mut s, &mut fe, 6, 192, WRITE2_BUF, PAGE as u32);
    let mut expected2: BTreeSet<u64> = pages(READ2_BUF, PAGE).into_iter().collect();
    expected2.extend([5, 6].map(|n| page(status_addr(n))));
    expected2.extend(&used_pages);
    assert_log(&log2, Some(page(USED)), &expected2, "second log");
    assert!(
        log_bytes(&log1) == log1_then,
        "the first log changed after the second SET_LOG_BASE: now {:x?}",
        marked(&log1)
    );

    // 4. The used ring logged at the address SET_VRING_ADDR gives, not at the ring's own.
    let log3 = new_log();
    set_log_base(&fe.frontend, &log3, 0, LOG_BYTES).expect("third SET_LOG_BASE");
    fe.set_ring_addr(Some(USED_LOG_ELSEWHERE))
        .expect("SET_VRING_ADDR with another log address");
    read(&s, &mut fe, 7, 24, READ2_BUF, PAGE as u32);
    let mut expected3: BTreeSet<u64> = pages(READ2_BUF, PAGE).into_iter().collect();
    expected3.insert(page(status_addr(7)));
    expected3.insert(page(USED_LOG_ELSEWHERE));
    assert_log(
        &log3,
        Some(page(USED_LOG_ELSEWHERE)),
        &expected3,
        "used ring log address elsewhere",
    );

    // 5. Without VHOST_VRING_F_LOG, at the used ring's guest address.
    let log4 = new_log();
    set_log_base(&fe.frontend, &log4, 0, LOG_BYTES).expect("fourth SET_LOG_BASE");
    fe.set_ring_addr(None)
        .expect("SET_VRING_ADDR without VHOST_VRING_F_LOG");
    get_id(&mut fe, 8);
    let mut expected4: BTreeSet<u64> = pages(ID_BUF, ID_LEN.into()).into_iter().collect();
    expected4.insert(page(status_addr(8)));
    expected4.extend(&used_pages);
    assert_log(&log4, Some(page(USED)), &expected4, "no VHOST_VRING_F_LOG");

    // 6. Migration cancelled: LOG_ALL cleared again, nothing more is marked.
    let log4_then = log_bytes(&log4);
    fe.set_features(features & !LOG_ALL)
        .expect("SET_FEATURES without LOG_ALL");
    read(&s, &mut fe, 9, 32, READ_BUF, READ_LEN);
    write(&mut s, &mut fe, 10, 256, WRITE_BUF, PAGE as u32);
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        log_bytes(&log4) == log4_then && log_bytes(&log1) == log1_then,
        "marks made after LOG_ALL was cleared: {:x?}",
        marked(&log4)
    );
    assert_log(&log2, None, &expected2, "second log at the end");
    assert_log(&log3, None, &expected3, "third log at the end");

    drop(fe);
    s.finish();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}

/// A connection with LOG_SHMFD negotiated, whose replies are awaited for at most 5 s.
fn log_connection(socket: &std::path::Path) -> Frontend {
    let stream = UnixStream::connect(socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut frontend = Frontend::from_stream(stream, 1);
    negotiate_protocol(&mut frontend, 0, VhostUserProtocolFeatures::LOG_SHMFD);
    frontend
}

#[test]
fn logs_that_do_not_fit_their_file_are_refused() {
    let started = Instant::now();
    let mut s = Served::start("dirty-log-hostile", &[]);
    let file = new_log();
    let cases: [(&str, u64, u64); 4] = [
        ("size past the end of the file", 0, LOG_BYTES + PAGE),
        ("offset past the end of the file", PAGE, LOG_BYTES),
        ("offset + size overflows", u64::MAX - 100, LOG_BYTES),
        ("size overflows", 0, u64::MAX),
    ];
    for (what, offset, size) in cases {
        let frontend = log_connection(s.socket());
        let before = Instant::now();
        let result = set_log_base(&frontend, &file, offset, size);
        assert!(
            result.is_err(),
            "{what}: SET_LOG_BASE of {size} bytes at {offset} of a {LOG_BYTES}-byte file \
             was accepted"
        );
        assert!(
            before.elapsed() < Duration::from_secs(5),
            "{what}: refused by timing out, not by a NACK or a close"
        );
        s.assert_running(what);
    }
    // Nothing was written into the file the frontend offered.
    assert!(
        log_bytes(&file).iter().all(|b| *b == 0),
        "refused log written"
    );

    // vubd serves a new frontend, and logs for it.
    let mut fe = RawFrontend::connect_protocol(
        s.socket(),
        QUEUE_SIZE,
        LOG_ALL,
        VhostUserProtocolFeatures::LOG_SHMFD,
    );
    assert!(fe.features & LOG_ALL != 0, "LOG_ALL acked");
    let log = new_log();
    set_log_base(&fe.frontend, &log, 0, LOG_BYTES).expect("valid SET_LOG_BASE after refusals");
    read(&s, &mut fe, 0, 0, READ2_BUF, PAGE as u32);
    let mut expected: BTreeSet<u64> = pages(READ2_BUF, PAGE).into_iter().collect();
    expected.insert(page(status_addr(0)));
    expected.insert(page(USED));
    assert_log(&log, Some(page(USED)), &expected, "after refusals");
    drop(fe);
    s.assert_serves("after refused logs");
    s.finish();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}
