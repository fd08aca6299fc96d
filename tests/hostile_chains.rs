//! Hostile descriptor chains: loops (direct and through indirect tables), nested and oversized
//! indirect tables, and the same head made available twice while it is in flight.
//!
//! A chain virtio-queue cannot follow to a deliberate end (a loop, an index outside its table,
//! a nested or malformed indirect table) has no trustworthy status byte: vubd returns its head
//! with used length 0 and writes nothing. Every case checks that, byte for byte, against a
//! snapshot of guest memory taken just before the chain was published, and the disk against
//! its model; every test ends with a new frontend served correctly.

mod common;

use common::hostile::{
    assert_answered, assert_dropped, assert_guest, assert_refused, prime, span, Served, Snapshot,
};
use common::raw_frontend::{
    r, w, Desc, RawFrontend, Used, DATA, MEM_SIZE, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use vm_memory::{Bytes, GuestAddress};

const IN: u32 = 0;
const OUT: u32 = 1;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;

const HDR: u64 = DATA;
/// Data buffers: up to `TABLE`.
const BUF: u64 = DATA + 0x1000;
/// Indirect tables: up to 1 MiB (65536 entries).
const TABLE: u64 = DATA + 0x40_0000;
const TABLE2: u64 = DATA + 0x60_0000;
const STATUS: u64 = DATA + 0xC0_0000;

/// One indirect-table entry: address, length, flags, next.
type Entry = (u64, u32, u16, u16);

/// Entries for `chain`, each linked to the next with NEXT, as a driver writes them.
fn linked(chain: &[Desc]) -> Vec<Entry> {
    chain
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut flags = if d.write { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < chain.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            (d.addr, d.len, flags, i as u16 + 1)
        })
        .collect()
}

/// The used element for `head` with length `len`.
fn used(head: u16, len: u32) -> Used {
    Used {
        id: u32::from(head),
        len,
    }
}

fn write_table(fe: &RawFrontend, at: u64, entries: &[Entry]) {
    for (i, &(addr, len, flags, next)) in entries.iter().enumerate() {
        fe.write_desc_in(at, i as u16, addr, len, flags, next);
    }
}

#[test]
fn looping_direct_chains_are_returned_untouched() {
    let mut s = Served::start("loop-direct", &[]);
    let mut fe = s.frontend();
    prime(&fe);
    fe.write_header(HDR, IN, 0);
    // header -> data -> status -> header ...: every descriptor a driver would use, and the
    // status byte writable, but the chain never ends.
    fe.write_desc(10, HDR, 16, VRING_DESC_F_NEXT, 11);
    fe.write_desc(11, BUF, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 12);
    fe.write_desc(12, STATUS, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 10);
    assert_dropped(&mut fe, 10, "three-descriptor loop");
    // The loop closes on a later descriptor, not on the head.
    fe.write_desc(12, STATUS, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 11);
    assert_dropped(&mut fe, 10, "loop back to the second descriptor");
    // A writable descriptor chained to itself.
    fe.write_desc(20, STATUS, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 20);
    assert_dropped(&mut fe, 20, "writable self-loop");
    // A next index outside the table.
    fe.write_desc(12, STATUS, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 300);
    assert_dropped(&mut fe, 10, "next index past the queue size");
    fe.write_desc(
        12,
        STATUS,
        1,
        VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
        u16::MAX,
    );
    assert_dropped(&mut fe, 10, "next index 65535");
    // The same chain ended properly is a good read.
    fe.write_desc(12, STATUS, 1, VRING_DESC_F_WRITE, 0);
    let ok = (STATUS, S_OK);
    assert_answered(&mut fe, 10, ok, 513, &[span(BUF, 512)], "loop ended");
    assert_guest(&fe, BUF, &s.model[..512], "data read");
    drop(fe);
    s.assert_disk("after looping chains");
    s.assert_serves("after looping chains");
    s.finish();
}

#[test]
fn loops_and_nesting_in_indirect_tables_are_returned_untouched() {
    let mut s = Served::start("loop-indirect", &[]);
    let mut fe = s.frontend();
    prime(&fe);
    fe.write_header(HDR, IN, 0);
    let good = linked(&[r(HDR, 16), w(BUF, 512), w(STATUS, 1)]);

    // The table's last entry chains back to its first.
    let mut looping = good.clone();
    looping[2] = (STATUS, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0);
    write_table(&fe, TABLE, &looping);
    fe.write_desc(30, TABLE, 48, VRING_DESC_F_INDIRECT, 0);
    assert_dropped(&mut fe, 30, "loop inside an indirect table");

    // An entry whose next index is past the end of its table.
    looping[2].3 = 3;
    write_table(&fe, TABLE, &looping);
    assert_dropped(&mut fe, 30, "indirect next index past the table");

    // A direct header, then an indirect table whose only entry loops on itself.
    write_table(
        &fe,
        TABLE,
        &[(STATUS, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0)],
    );
    fe.write_desc(31, HDR, 16, VRING_DESC_F_NEXT, 32);
    fe.write_desc(32, TABLE, 16, VRING_DESC_F_INDIRECT, 0);
    assert_dropped(&mut fe, 31, "direct head into a self-looping table");

    // Nested tables: an indirect entry inside an indirect table (after a first entry, and as
    // the very first entry) is refused by virtio-queue, and the chain with it.
    write_table(&fe, TABLE2, &good);
    let nested = [
        (HDR, 16, VRING_DESC_F_NEXT, 1),
        (TABLE2, 32, VRING_DESC_F_INDIRECT, 0),
    ];
    write_table(&fe, TABLE, &nested);
    fe.write_desc(33, TABLE, 32, VRING_DESC_F_INDIRECT, 0);
    assert_dropped(&mut fe, 33, "indirect table nested after a first entry");
    write_table(&fe, TABLE, &[(TABLE2, 48, VRING_DESC_F_INDIRECT, 0)]);
    fe.write_desc(33, TABLE, 16, VRING_DESC_F_INDIRECT, 0);
    assert_dropped(&mut fe, 33, "indirect table nested as the first entry");

    // Tables virtio-queue refuses outright: empty, not a whole number of entries, outside
    // guest memory, wrapping the address space.
    for (addr, len, what) in [
        (TABLE, 0, "empty indirect table"),
        (TABLE, 40, "indirect table of 2.5 entries"),
        (MEM_SIZE - 16, 48, "indirect table past the end of memory"),
        (
            u64::MAX - 15,
            48,
            "indirect table wrapping the address space",
        ),
    ] {
        fe.write_desc(34, addr, len, VRING_DESC_F_INDIRECT, 0);
        assert_dropped(&mut fe, 34, what);
    }

    // INDIRECT and NEXT together (which a driver must not set) pointing back at the head:
    // virtio-queue ignores NEXT on an indirect descriptor, so the chain is the head and the
    // table, which ends properly, and it is served as written.
    write_table(&fe, TABLE, &linked(&[w(BUF, 512), w(STATUS, 1)]));
    fe.write_desc(35, HDR, 16, VRING_DESC_F_NEXT, 36);
    fe.write_desc(36, TABLE, 32, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 35);
    let ok = (STATUS, S_OK);
    assert_answered(&mut fe, 35, ok, 513, &[span(BUF, 512)], "INDIRECT|NEXT");
    assert_guest(&fe, BUF, &s.model[..512], "data read");

    drop(fe);
    s.assert_disk("after indirect loops");
    s.assert_serves("after indirect loops");
    s.finish();
}

#[test]
fn indirect_tables_longer_than_the_queue_are_bounded() {
    let mut s = Served::start("long-indirect", &[]);
    let mut fe = s.frontend();
    prime(&fe);

    // 300 entries, more than the queue's 256: a well-formed read of 298 sectors. vubd takes
    // it (its bound is the 1024 iovecs one preadv accepts, not the queue size).
    fe.write_header(HDR, IN, 0);
    let mut chain = vec![r(HDR, 16)];
    chain.extend((0..298u64).map(|i| w(BUF + 512 * i, 512)));
    chain.push(w(STATUS, 1));
    write_table(&fe, TABLE, &linked(&chain));
    fe.write_desc(40, TABLE, 16 * chain.len() as u32, VRING_DESC_F_INDIRECT, 0);
    let data = span(BUF, 298 * 512);
    assert_answered(
        &mut fe,
        40,
        (STATUS, S_OK),
        298 * 512 + 1,
        &[data],
        "300 entries",
    );
    assert_guest(&fe, BUF, &s.model[..298 * 512], "data read");

    // 2000 entries, more than 1024 buffers: refused with IOERR before any I/O, for a read
    // (nothing read into guest memory) and for a write (nothing written to the disk).
    for (request_type, write) in [(IN, true), (OUT, false)] {
        prime(&fe);
        fe.write_header(HDR, request_type, 0);
        let mut chain = vec![r(HDR, 16)];
        chain.extend((0..1998u64).map(|i| Desc {
            addr: BUF + 512 * i,
            len: 512,
            write,
        }));
        chain.push(w(STATUS, 1));
        write_table(&fe, TABLE, &linked(&chain));
        fe.write_desc(41, TABLE, 16 * chain.len() as u32, VRING_DESC_F_INDIRECT, 0);
        assert_refused(&mut fe, 41, STATUS, S_IOERR, "2000-entry table");
        s.assert_disk("2000-entry table");
    }

    // 65535 entries, the most a table can have, every one chained to the next and the last
    // back to the first: walked once (65535 descriptors), then returned untouched.
    prime(&fe);
    fe.write_header(HDR, IN, 0);
    let mut entries: Vec<Entry> = (0..65535u32)
        .map(|i| {
            (
                BUF,
                0,
                VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
                (i + 1) as u16,
            )
        })
        .collect();
    entries[0] = (HDR, 16, VRING_DESC_F_NEXT, 1);
    entries[65534] = (STATUS, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0);
    write_table(&fe, TABLE, &entries);
    fe.write_desc(42, TABLE, 16 * 65535, VRING_DESC_F_INDIRECT, 0);
    assert_dropped(&mut fe, 42, "65535-entry looping table");
    // The same table ended properly is a good (empty-data) request: a flush.
    fe.write_header(HDR, 4, 0);
    fe.write_desc_in(TABLE, 65534, STATUS, 1, VRING_DESC_F_WRITE, 0);
    assert_refused(&mut fe, 42, STATUS, S_OK, "65535-entry flush");
    // 65536 entries do not fit a table's 16-bit index: refused by virtio-queue.
    fe.write_desc(43, TABLE, 16 * 65536, VRING_DESC_F_INDIRECT, 0);
    assert_dropped(&mut fe, 43, "65536-entry table");

    drop(fe);
    s.assert_disk("after long tables");
    s.assert_serves("after long tables");
    s.finish();
}

#[test]
fn a_head_made_available_twice_is_answered_twice() {
    let mut s = Served::start("dup-heads", &[]);
    let mut fe = s.frontend();
    prime(&fe);

    // A read made available twice in one publication: both are popped before either is
    // answered, so the same head is in flight twice. Each is served and returned.
    fe.write_header(HDR, IN, 8);
    let head = fe.write_chain(&[r(HDR, 16), w(BUF, 4096), w(STATUS, 1)]);
    fe.add_avail(head);
    fe.add_avail(head);
    let snap = Snapshot::take(&fe);
    fe.publish_avail();
    for _ in 0..2 {
        assert_eq!(fe.wait_used(), used(head, 4097));
    }
    let third = fe.wait_used_for(std::time::Duration::from_millis(100));
    assert_eq!(third, None, "each copy answered once");
    assert_eq!(fe.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
    assert_guest(&fe, BUF, &s.model[4096..8192], "data read");
    snap.assert_unchanged_except(&fe, &[span(BUF, 4096), span(STATUS, 1)], "duplicate read");

    // A write made available three times lands (three times, identically).
    let data = common::pattern(8192, 5);
    fe.mem.write_slice(&data, GuestAddress(BUF)).unwrap();
    fe.write_header(HDR, OUT, 64);
    let head = fe.write_chain(&[r(HDR, 16), r(BUF, 8192), w(STATUS, 1)]);
    for _ in 0..3 {
        fe.add_avail(head);
    }
    let snap = Snapshot::take(&fe);
    fe.publish_avail();
    for _ in 0..3 {
        assert_eq!(fe.wait_used(), used(head, 1));
    }
    snap.assert_unchanged_except(&fe, &[span(STATUS, 1)], "duplicate write");
    s.model[64 * 512..64 * 512 + 8192].copy_from_slice(&data);
    s.assert_disk("duplicate write");

    // The whole avail ring holding one head: 256 requests in flight on one descriptor chain.
    fe.write_header(HDR, IN, 0);
    let head = fe.write_chain(&[r(HDR, 16), w(BUF, 512), w(STATUS, 1)]);
    for _ in 0..fe.queue_size() {
        fe.add_avail(head);
    }
    fe.publish_avail();
    for _ in 0..fe.queue_size() {
        assert_eq!(fe.wait_used(), used(head, 513));
    }
    assert_guest(&fe, BUF, &s.model[..512], "data read");

    // An indirect head twice, then the ring still serves ordinary requests.
    write_table(
        &fe,
        TABLE,
        &linked(&[r(HDR, 16), w(BUF, 1024), w(STATUS, 1)]),
    );
    fe.write_desc(50, TABLE, 48, VRING_DESC_F_INDIRECT, 0);
    fe.add_avail(50);
    fe.add_avail(50);
    fe.publish_avail();
    for _ in 0..2 {
        assert_eq!(fe.wait_used(), used(50, 1025));
    }
    assert_guest(&fe, BUF, &s.model[..1024], "data read");
    let (answer, status) = fe.request(&[r(HDR, 16), w(BUF, 512), w(STATUS, 1)], STATUS);
    assert_eq!((answer.len, status), (513, S_OK));

    drop(fe);
    s.assert_serves("after duplicate heads");
    s.finish();
}
