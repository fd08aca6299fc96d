//! Hostile discard and write-zeroes requests: segment lists of 0, 1, 32, 33 and 65536
//! segments, the most a chain can express and the 2^32 - 1 it cannot, unknown segment flags,
//! and segments out of range.
//!
//! The virtio spec (5.2.6.2) wants UNSUPP for a discard with the unmap flag and for a write
//! zeroes with an unknown flag; vubd answers UNSUPP for any flag it does not implement, and
//! IOERR for a segment list it does not accept (empty, not whole segments, more than
//! `max_discard_seg`, a segment too long or out of range). Every segment is validated before
//! the first is carried out, so a refused list changes nothing on the disk.

mod common;

use std::fs;
use std::ops::Range;

use common::hostile::{assert_dropped, assert_refused, prime, Served};
use common::raw_frontend::{r, w, Desc, RawFrontend, DATA, MEM_SIZE};
use vm_memory::{Bytes, GuestAddress};

const DISCARD: u32 = 11;
const WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const UNMAP: u32 = 1;

const HDR: u64 = DATA;
const SEGS: u64 = DATA + 0x1000;
const STATUS: u64 = DATA + 0xC0_0000;
const SECTORS: u64 = (common::hostile::DISK / 512) as u64;

/// `struct virtio_blk_discard_write_zeroes`.
#[derive(Clone, Copy, Debug)]
struct Seg {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}

fn seg(sector: u64, num_sectors: u32, flags: u32) -> Seg {
    Seg {
        sector,
        num_sectors,
        flags,
    }
}

fn write_segs(fe: &RawFrontend, at: u64, segs: &[Seg]) {
    let mut bytes = Vec::with_capacity(16 * segs.len());
    for s in segs {
        bytes.extend_from_slice(&s.sector.to_le_bytes());
        bytes.extend_from_slice(&s.num_sectors.to_le_bytes());
        bytes.extend_from_slice(&s.flags.to_le_bytes());
    }
    fe.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
}

/// A `request_type` request carrying `segs` in one descriptor after the header; returns the
/// head.
fn segments(fe: &mut RawFrontend, request_type: u32, segs: &[Seg]) -> u16 {
    fe.write_header(HDR, request_type, 0);
    write_segs(fe, SEGS, segs);
    let len = 16 * segs.len() as u32;
    fe.write_chain(&[r(HDR, 16), r(SEGS, len), w(STATUS, 1)])
}

/// A request whose chain is `descs` after the header, then the status byte.
fn raw_chain(fe: &mut RawFrontend, request_type: u32, descs: &[Desc]) -> u16 {
    fe.write_header(HDR, request_type, 0);
    let mut chain = vec![r(HDR, 16)];
    chain.extend_from_slice(descs);
    chain.push(w(STATUS, 1));
    fe.write_chain(&chain)
}

fn sectors(first: u64, count: u64) -> Range<usize> {
    (first * 512) as usize..((first + count) * 512) as usize
}

#[test]
fn segment_counts_from_0_to_2_pow_32() {
    let mut s = Served::start("segment-counts", &[]);
    let mut fe = s.frontend();
    prime(&fe);
    for request_type in [DISCARD, WRITE_ZEROES] {
        let what = |n: &str| format!("type {request_type}, {n}");
        // No segment at all.
        let head = raw_chain(&mut fe, request_type, &[]);
        assert_refused(&mut fe, head, STATUS, S_IOERR, &what("0 segments"));
        // Not a whole number of segments.
        let head = raw_chain(&mut fe, request_type, &[r(SEGS, 24)]);
        assert_refused(&mut fe, head, STATUS, S_IOERR, &what("1.5 segments"));
        // One more than max_discard_seg (32), and 65536, every one of them valid: refused
        // as a whole, none carried out.
        for count in [33u64, 65536] {
            let list: Vec<Seg> = (0..count).map(|i| seg(i % SECTORS, 1, 0)).collect();
            let head = segments(&mut fe, request_type, &list);
            assert_refused(&mut fe, head, STATUS, S_IOERR, &what(&format!("{count}")));
            s.assert_disk(&what(&format!("{count} segments")));
        }
        // The most segments a chain can express: 2^32 - 1 bytes minus the header and the
        // status byte is 268435454 segments. Refused on the count, without reading them.
        let most = (u32::MAX - 17) / 16;
        assert_eq!(most, 268_435_454);
        let head = raw_chain(&mut fe, request_type, &[r(SEGS, 16 * most)]);
        assert_refused(&mut fe, head, STATUS, S_IOERR, &what("2^28 - 2 segments"));
        // 2^32 - 1 segments are 64 GiB: no chain can carry them. virtio-queue cuts the chain
        // at 4 GiB, and the chain is returned untouched.
        let total = 16 * u64::from(u32::MAX);
        // The largest descriptor length that is a whole number of segments.
        let piece = u64::from(u32::MAX - 15);
        let descs: Vec<Desc> = (0..total.div_ceil(piece))
            .map(|i| r(SEGS, piece.min(total - i * piece) as u32))
            .collect();
        let head = raw_chain(&mut fe, request_type, &descs);
        assert_dropped(&mut fe, head, &what("2^32 - 1 segments"));
    }
    s.assert_disk("after refused segment lists");

    // One segment: carried out. Write zeroes zeroes (with and without unmap); discard leaves
    // the range unspecified, each byte either what it was or zero.
    let head = segments(&mut fe, WRITE_ZEROES, &[seg(16, 8, 0)]);
    assert_refused(&mut fe, head, STATUS, S_OK, "write zeroes");
    s.model[sectors(16, 8)].fill(0);
    let head = segments(&mut fe, WRITE_ZEROES, &[seg(40, 16, UNMAP)]);
    assert_refused(&mut fe, head, STATUS, S_OK, "write zeroes, unmap");
    s.model[sectors(40, 16)].fill(0);
    s.assert_disk("after write zeroes");
    let head = segments(&mut fe, DISCARD, &[seg(128, 64, 0)]);
    assert_refused(&mut fe, head, STATUS, S_OK, "discard");
    assert_discarded(&mut s, &[sectors(128, 64)]);

    // max_discard_seg segments, each cut across two descriptors: all carried out.
    let list: Vec<Seg> = (0..32u64).map(|i| seg(300 + 3 * i, 2, 0)).collect();
    fe.write_header(HDR, WRITE_ZEROES, 0);
    write_segs(&fe, SEGS, &list);
    let head = fe.write_chain(&[
        r(HDR, 16),
        r(SEGS, 7),
        r(SEGS + 7, 16 * 32 - 7),
        w(STATUS, 1),
    ]);
    assert_refused(&mut fe, head, STATUS, S_OK, "32 segments, cut");
    for i in 0..32u64 {
        s.model[sectors(300 + 3 * i, 2)].fill(0);
    }
    drop(fe);
    s.assert_disk("after 32 segments");
    s.assert_serves("after segment counts");
    s.finish();
}

/// Bytes in `ranges` are each what the model says or zero (a discard's unspecified result);
/// everything else is exactly the model. The model takes what the disk now holds.
fn assert_discarded(s: &mut Served, ranges: &[Range<usize>]) {
    let disk = fs::read(&s.image).unwrap();
    for (i, (got, want)) in disk.iter().zip(&s.model).enumerate() {
        let discarded = ranges.iter().any(|r| r.contains(&i));
        let ok = got == want || (discarded && *got == 0);
        assert!(
            ok,
            "byte {i}: {got:#04x}, expected {want:#04x} (discarded: {discarded})"
        );
    }
    s.model = disk;
}

#[test]
fn unknown_flags_and_bad_segments_change_nothing() {
    let mut s = Served::start("segment-flags", &[]);
    let mut fe = s.frontend();
    prime(&fe);
    let valid = seg(8, 8, 0);

    // Flags: unmap on a discard, anything but unmap on a write zeroes. UNSUPP whatever else
    // is wrong with the request, and the valid segment before it is not carried out.
    let unsupported: &[(u32, u32)] = &[
        (DISCARD, UNMAP),
        (DISCARD, 2),
        (DISCARD, 0x8000_0000),
        (DISCARD, u32::MAX),
        (WRITE_ZEROES, 2),
        (WRITE_ZEROES, 3),
        (WRITE_ZEROES, 0x8000_0001),
        (WRITE_ZEROES, u32::MAX - 1),
    ];
    for &(request_type, flags) in unsupported {
        let what = format!("type {request_type}, flags {flags:#x}");
        let head = segments(&mut fe, request_type, &[seg(0, 8, flags)]);
        assert_refused(&mut fe, head, STATUS, S_UNSUPP, &what);
        let head = segments(&mut fe, request_type, &[valid, seg(16, 8, flags)]);
        assert_refused(&mut fe, head, STATUS, S_UNSUPP, &format!("{what}, second"));
        let head = segments(&mut fe, request_type, &[seg(u64::MAX, u32::MAX, flags)]);
        assert_refused(
            &mut fe,
            head,
            STATUS,
            S_UNSUPP,
            &format!("{what}, bad range"),
        );
        s.assert_disk(&what);
    }

    // Segments the device cannot carry out: IOERR, and the valid one before is not done.
    let bad: &[(&str, Seg)] = &[
        ("longer than max_discard_sectors", seg(0, (1 << 21) + 1, 0)),
        ("2^32 - 1 sectors", seg(0, u32::MAX, 0)),
        ("one sector past the end", seg(SECTORS - 7, 8, 0)),
        ("starting at the end", seg(SECTORS, 1, 0)),
        ("sector 2^64 - 1", seg(u64::MAX, 1, 0)),
        ("sector overflowing bytes", seg(u64::MAX / 256, 8, 0)),
        ("empty, past the end", seg(SECTORS + 1, 0, 0)),
    ];
    for request_type in [DISCARD, WRITE_ZEROES] {
        for (what, bad) in bad {
            let what = format!("type {request_type}: {what}");
            let head = segments(&mut fe, request_type, &[valid, *bad]);
            assert_refused(&mut fe, head, STATUS, S_IOERR, &what);
            s.assert_disk(&what);
        }
        // The second segment's bytes outside guest memory.
        fe.write_header(HDR, request_type, 0);
        write_segs(&fe, MEM_SIZE - 16, &[valid]);
        let descs = [r(MEM_SIZE - 16, 16), r(MEM_SIZE, 16)];
        let head = raw_chain(&mut fe, request_type, &descs);
        assert_refused(&mut fe, head, STATUS, S_IOERR, "segment outside memory");
        s.assert_disk("segment outside memory");
    }

    // An empty segment inside the disk asks for nothing: done, nothing changes.
    for request_type in [DISCARD, WRITE_ZEROES] {
        let head = segments(&mut fe, request_type, &[seg(8, 0, 0), seg(SECTORS, 0, 0)]);
        assert_refused(&mut fe, head, STATUS, S_OK, "empty segments");
        s.assert_disk("empty segments");
    }
    drop(fe);
    s.assert_serves("after bad segments");
    s.finish();
}
