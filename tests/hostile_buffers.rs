//! Hostile buffers: descriptors that run past the end of a guest memory region or wrap the
//! 64-bit address space (as header, data or status), and requests whose descriptors add up to
//! more than 4 GiB.
//!
//! vubd checks every buffer before any I/O: a request with a bad header or data buffer and a
//! usable status byte is answered IOERR with used length 1 and nothing else written (not even
//! the part of a read buffer that is inside guest memory); a chain whose status byte is not
//! inside guest memory, or that virtio-queue cut at 4 GiB, is returned with used length 0 and
//! nothing written at all.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::hostile::{
    assert_answered, assert_dropped, assert_guest, assert_refused, prime, read_guest, span, Served,
    INDIRECT_DESC, QUEUE_SIZE,
};
use common::raw_frontend::{
    r, w, Desc, RawFrontend, DATA, MEM_SIZE, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use common::{TempDir, Vubd};
use vm_memory::{Bytes, GuestAddress};

const IN: u32 = 0;
const OUT: u32 = 1;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;

const HDR: u64 = DATA;
const BUF: u64 = DATA + 0x1000;
const TABLE: u64 = DATA + 0x40_0000;
const STATUS: u64 = DATA + 0xC0_0000;

/// The header at `at` for `request_type` at `sector`, and `chain` written to the descriptor
/// table; returns the head.
fn chain(fe: &mut RawFrontend, request_type: u32, sector: u64, chain: &[Desc]) -> u16 {
    fe.write_header(HDR, request_type, sector);
    fe.write_chain(chain)
}

#[test]
fn buffers_past_guest_memory_or_the_address_space_are_refused() {
    let mut s = Served::start("wrap", &[]);
    let mut fe = s.frontend();
    prime(&fe);
    let end = MEM_SIZE;
    let top = u64::MAX;

    // Data, header or status descriptors that leave guest memory, with a good status byte:
    // IOERR, and nothing but the status byte written. A read whose buffer starts inside guest
    // memory gets none of its data there either: every buffer is checked before I/O starts.
    let refused: &[(&str, u32, Vec<Desc>)] = &[
        (
            "read running past the end of memory",
            IN,
            vec![r(HDR, 16), w(end - 512, 1024)],
        ),
        (
            "read wrapping 2^64",
            IN,
            vec![r(HDR, 16), w(top - 511, 1024)],
        ),
        (
            "read ending exactly at 2^64",
            IN,
            vec![r(HDR, 16), w(top - 511, 512)],
        ),
        (
            "read at the top byte",
            IN,
            vec![r(HDR, 16), w(BUF, 511), w(top, 1)],
        ),
        (
            "write wrapping 2^64",
            OUT,
            vec![r(HDR, 16), r(top - 511, 1024)],
        ),
        (
            "write from past the end of memory",
            OUT,
            vec![r(HDR, 16), r(end - 4, 512)],
        ),
        (
            "header wrapping 2^64",
            IN,
            vec![r(top - 7, 16), w(BUF, 512)],
        ),
        (
            "header past the end of memory",
            IN,
            vec![r(end - 8, 16), w(BUF, 512)],
        ),
        (
            "header cut, second half outside",
            IN,
            vec![r(HDR, 8), r(end - 4, 8), w(BUF, 512)],
        ),
        ("header and data wrapping", OUT, vec![r(top - 15, 16 + 512)]),
    ];
    for (what, request_type, descs) in refused {
        let mut descs = descs.clone();
        descs.push(w(STATUS, 1));
        let head = chain(&mut fe, *request_type, 0, &descs);
        assert_refused(&mut fe, head, STATUS, S_IOERR, what);
    }
    s.assert_disk("after refused buffers");

    // Status descriptors whose last byte is not in guest memory: nowhere to report, so the
    // chain is returned and nothing written — not the byte before the end of memory, and not
    // the descriptor table that an address wrapping past 2^64 would land in.
    let dropped: &[(&str, Desc)] = &[
        ("status one byte past the end of memory", w(end - 1, 2)),
        ("status at the top byte", w(top, 1)),
        (
            "status wrapping 2^64 into the descriptor table",
            w(top - 15, 0x20),
        ),
        ("status and data wrapping 2^64", w(top - 511, 1024)),
        ("status far past memory", w(1 << 40, 1)),
    ];
    for (what, status) in dropped {
        let head = chain(&mut fe, IN, 0, &[r(HDR, 16), w(BUF, 512), *status]);
        assert_dropped(&mut fe, head, what);
        let head = chain(&mut fe, IN, 0, &[r(HDR, 16), *status]);
        assert_dropped(&mut fe, head, what);
    }

    // The last byte of guest memory is a fine status byte, and a read may end there.
    let head = chain(&mut fe, IN, 1, &[r(HDR, 16), w(end - 513, 513)]);
    let data = span(end - 513, 512);
    assert_answered(
        &mut fe,
        head,
        (end - 1, S_OK),
        513,
        &[data],
        "read to the last byte",
    );
    assert_guest(&fe, end - 513, &s.model[512..1024], "data read");
    drop(fe);
    s.assert_disk("after wrapping buffers");
    s.assert_serves("after wrapping buffers");
    s.finish();
}

#[test]
fn buffers_across_memory_regions_and_holes() {
    let mut s = Served::start("regions", &[]);
    // Two regions back to back, then a hole, then a third.
    let second = MEM_SIZE;
    let third = 3 * MEM_SIZE;
    let regions = [(0, MEM_SIZE), (second, MEM_SIZE), (third, MEM_SIZE)];
    let mut fe = RawFrontend::connect_regions(s.socket(), QUEUE_SIZE, INDIRECT_DESC, &regions);
    prime(&fe);

    // A read and a write whose buffers cross from one region into the next: legal, and
    // split where the regions meet.
    let across = second - 2048;
    let head = chain(
        &mut fe,
        IN,
        8,
        &[r(HDR, 16), w(across, 4096), w(second + 0x8000, 1)],
    );
    let data = span(across, 4096);
    assert_answered(
        &mut fe,
        head,
        (second + 0x8000, S_OK),
        4097,
        &[data],
        "read across",
    );
    assert_guest(&fe, across, &s.model[4096..8192], "read across");
    let new = common::pattern(4096, 99);
    fe.mem.write_slice(&new, GuestAddress(across)).unwrap();
    let head = chain(
        &mut fe,
        OUT,
        16,
        &[r(HDR, 16), r(across, 4096), w(STATUS, 1)],
    );
    assert_refused(&mut fe, head, STATUS, S_OK, "write across");
    s.model[8192..12288].copy_from_slice(&new);
    s.assert_disk("write across regions");

    // Into the hole after the second region: refused (read and write), or, for the status
    // byte, dropped.
    let hole = 2 * MEM_SIZE;
    let head = chain(
        &mut fe,
        IN,
        0,
        &[r(HDR, 16), w(hole - 512, 1024), w(STATUS, 1)],
    );
    assert_refused(&mut fe, head, STATUS, S_IOERR, "read into the hole");
    let head = chain(
        &mut fe,
        OUT,
        0,
        &[r(HDR, 16), r(hole - 512, 1024), w(STATUS, 1)],
    );
    assert_refused(&mut fe, head, STATUS, S_IOERR, "write from the hole");
    let head = chain(
        &mut fe,
        IN,
        0,
        &[r(HDR, 16), w(hole - 512, 1024), w(hole, 1)],
    );
    assert_dropped(&mut fe, head, "status in the hole");
    let head = chain(
        &mut fe,
        IN,
        0,
        &[r(HDR, 16), w(BUF, 512), w(hole + 4096, 1)],
    );
    assert_dropped(&mut fe, head, "status inside the hole");

    // The region after the hole is guest memory like any other.
    let head = chain(
        &mut fe,
        IN,
        0,
        &[r(HDR, 16), w(third, 512), w(third + 512, 1)],
    );
    let data = span(third, 512);
    assert_answered(
        &mut fe,
        head,
        (third + 512, S_OK),
        513,
        &[data],
        "third region",
    );
    assert_guest(&fe, third, &s.model[..512], "data read");

    drop(fe);
    s.assert_serves("after region crossings");
    s.finish();
}

#[test]
fn chains_over_4_gib_are_cut_and_returned() {
    let mut s = Served::start("over-4g", &[]);
    let mut fe = s.frontend();
    prime(&fe);
    let half = 0x8000_0000u32;

    // Data descriptors adding up to 4 GiB and more: virtio-queue stops at the descriptor that
    // crosses 2^32 bytes, so the chain's end (and its status byte) is never seen.
    let cut: &[(&str, u32, Vec<Desc>)] = &[
        ("read of 2 x 2 GiB", IN, vec![w(BUF, half), w(BUF, half)]),
        ("write of 2 x 2 GiB", OUT, vec![r(BUF, half), r(BUF, half)]),
        (
            "read of 4 GiB - 1 after the header",
            IN,
            vec![w(BUF, u32::MAX)],
        ),
        (
            "write of 4 GiB - 16 after the header",
            OUT,
            vec![r(BUF, u32::MAX - 15)],
        ),
        ("read of 4 x 1 GiB", IN, vec![w(BUF, half / 2); 4]),
    ];
    for (what, request_type, data) in cut {
        let mut descs = vec![r(HDR, 16)];
        descs.extend_from_slice(data);
        descs.push(w(STATUS, 1));
        let head = chain(&mut fe, *request_type, 0, &descs);
        assert_dropped(&mut fe, head, what);
    }
    // The same through an indirect table.
    let entries = [
        (HDR, 16, VRING_DESC_F_NEXT, 1u16),
        (BUF, half, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2),
        (BUF, half, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 3),
        (STATUS, 1, VRING_DESC_F_WRITE, 0),
    ];
    for (i, (addr, len, flags, next)) in entries.iter().enumerate() {
        fe.write_desc_in(TABLE, i as u16, *addr, *len, *flags, *next);
    }
    fe.write_header(HDR, IN, 0);
    fe.write_desc(200, TABLE, 64, VRING_DESC_F_INDIRECT, 0);
    assert_dropped(&mut fe, 200, "indirect read of 2 x 2 GiB");

    // Exactly 2^32 - 1 bytes is a chain virtio-queue follows to its end: the read it asks for
    // (4 GiB - 512 bytes) is past the end of the disk, IOERR, nothing read.
    let head = chain(
        &mut fe,
        IN,
        0,
        &[
            r(HDR, 16),
            w(BUF, u32::MAX - 16 - 511),
            w(BUF, 510),
            w(STATUS, 1),
        ],
    );
    assert_refused(&mut fe, head, STATUS, S_IOERR, "read of 4 GiB - 512");
    drop(fe);
    s.assert_disk("after 4 GiB chains");
    s.assert_serves("after 4 GiB chains");
    s.finish();
}

/// The largest read a chain can carry, 2^32 - 512 bytes, on an 8 GiB sparse image in memory:
/// served in full, its used length (2^32 - 511) exact, on a device that cannot write.
#[test]
fn the_largest_read_a_chain_can_carry_is_served() {
    let dir = TempDir::new_in(Path::new("/dev/shm"), "largest-read");
    let image = dir.join("sparse.raw");
    let size = 8u64 << 30;
    fs::File::create(&image).unwrap().set_len(size).unwrap();
    let args = [
        "--image",
        image.to_str().unwrap(),
        "--readonly",
        "--queue-size",
        "256",
    ];
    let mut vubd = Vubd::start(&dir.join("vubd.sock"), &args);
    let mut fe = RawFrontend::connect(&vubd.socket, QUEUE_SIZE, INDIRECT_DESC);
    prime(&fe);

    // The data buffers are all of guest memory above the rings, over and over: 273 times
    // 15 MiB and a last 1 MiB - 512, in an indirect table below DATA.
    let hdr = 0x9000;
    let status = 0x9100;
    let table = 0xA000;
    let len = (1u64 << 32) - 512;
    let piece = MEM_SIZE - DATA;
    let mut descs = vec![r(hdr, 16)];
    let mut left = len;
    while left > 0 {
        let n = left.min(piece);
        descs.push(w(DATA, n as u32));
        left -= n;
    }
    descs.push(w(status, 1));
    assert!(descs.len() < 1024);
    for (i, d) in descs.iter().enumerate() {
        let mut flags = if d.write { VRING_DESC_F_WRITE } else { 0 };
        if i + 1 < descs.len() {
            flags |= VRING_DESC_F_NEXT;
        }
        fe.write_desc_in(table, i as u16, d.addr, d.len, flags, i as u16 + 1);
    }
    fe.write_header(hdr, IN, 8);
    fe.write_desc(0, table, 16 * descs.len() as u32, VRING_DESC_F_INDIRECT, 0);
    let used_len = (len + 1) as u32;
    let data = span(DATA, piece);
    assert_answered(
        &mut fe,
        0,
        (status, S_OK),
        used_len,
        &[data],
        "largest read",
    );
    assert!(
        read_guest(&fe, DATA, piece as usize)
            .iter()
            .all(|b| *b == 0),
        "the sparse image reads as zeroes"
    );

    drop(fe);
    let stderr = vubd.stop();
    assert!(!stderr.contains("panicked"), "{stderr}");
    let meta = fs::metadata(&image).unwrap();
    assert_eq!((meta.len(), meta.blocks()), (size, 0), "image untouched");
}
