//! vhost-user abuse around guest memory and ring set-up: rings configured and kicked before
//! there is any memory, memory files too short for their regions or not mappable at all, the
//! memory table swapped under a running queue, and configuration space windows anywhere.
//!
//! vubd must never touch memory it cannot back (a page past the end of a shared file is a
//! SIGBUS), must not crash or spin on rings that point nowhere, and must serve the next
//! frontend — or, where the protocol allows, the same one once it gets its set-up right.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::Duration;

use common::hostile::{assert_answered, assert_guest, span, Served, INDIRECT_DESC, QUEUE_SIZE};
use common::raw_frontend::{
    memfd, r, shared_memory, w, RawFrontend, DATA, MEM_SIZE, USED, VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
};
use common::vhost_msg::{
    mem_table, req, single_region, u64_payload, vring_state, RawConn, Region, Reply,
    PROTOCOL_F_CONFIG, PROTOCOL_F_REPLY_ACK,
};
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

const IN: u32 = 0;
const S_OK: u8 = 0;
const CLOSE: Duration = Duration::from_secs(5);
const PROTOCOL_F_CONFIGURE_MEM_SLOTS: u64 = 1 << 15;

/// SET_OWNER and features, with REPLY_ACK and CONFIG (and `extra`) negotiated.
fn negotiate(conn: &mut RawConn, extra: u64) {
    conn.request(req::SET_OWNER, &[], &[]);
    let features = conn.get(req::GET_FEATURES, &[]).u64();
    let wanted = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES;
    conn.request(req::SET_FEATURES, &u64_payload(features & wanted), &[]);
    let protocol = conn.get(req::GET_PROTOCOL_FEATURES, &[]).u64();
    let acked = protocol & (PROTOCOL_F_REPLY_ACK | PROTOCOL_F_CONFIG | extra);
    conn.request(req::SET_PROTOCOL_FEATURES, &u64_payload(acked), &[]);
}

/// The reply is a NACK, and vubd then ends the connection.
fn assert_nacked_and_closed(conn: &mut RawConn, reply: Reply, what: &str) {
    match reply {
        Reply::Msg(msg) => assert_ne!(msg.u64(), 0, "{what}: refused"),
        other => panic!("{what}: expected a NACK, got {other:?}"),
    }
    assert!(conn.closed_within(CLOSE), "{what}: connection not closed");
}

fn region(size: u64, mmap_offset: u64) -> Region {
    Region {
        guest_addr: 0,
        size,
        user_addr: 0x7f00_0000_0000,
        mmap_offset,
    }
}

#[test]
fn memory_vubd_cannot_back_is_refused() {
    let mut s = Served::start("vu-short-memory", &[]);

    // The raw frontend's memory, its file cut to 64 KiB after mapping it for itself: before
    // vubd checked regions, its first request past 64 KiB killed vubd with SIGBUS.
    let mem = shared_memory(&[(0, MEM_SIZE)]);
    let file = mem.iter().next().unwrap().file_offset().unwrap().file();
    file.set_len(64 << 10).unwrap();
    let refused = RawFrontend::try_connect_memory(s.socket(), QUEUE_SIZE, INDIRECT_DESC, mem);
    assert!(
        refused.is_err(),
        "a 16 MiB region over a 64 KiB file is refused"
    );
    drop(refused);
    s.assert_serves("after a short memory file");

    // The same by hand: a region that starts 4 KiB into a file of exactly its size; an
    // added region over a short file; descriptors that cannot be mapped at all.
    let size = 16u64 << 20;
    let exact = memfd(size);
    let short = memfd(4096);
    let (pipe_read, _pipe_write) = std::io::pipe().unwrap();
    let event = EventFd::new(0).unwrap();
    let dir = File::open(s.dir.path()).unwrap();
    let read_only = File::open(&s.image).unwrap();
    let cases: Vec<(&str, Region, i32, bool)> = vec![
        (
            "region running 4 KiB past its file",
            region(size, 4096),
            exact.as_raw_fd(),
            false,
        ),
        (
            "region over a 4 KiB file",
            region(size, 0),
            short.as_raw_fd(),
            false,
        ),
        (
            "added region over a 4 KiB file",
            region(size, 0),
            short.as_raw_fd(),
            true,
        ),
        (
            "region over a pipe",
            region(size, 0),
            pipe_read.as_raw_fd(),
            false,
        ),
        (
            "region over an eventfd",
            region(size, 0),
            event.as_raw_fd(),
            false,
        ),
        (
            "region over a directory",
            region(size, 0),
            dir.as_raw_fd(),
            false,
        ),
        (
            "region over a read-only file",
            region(1 << 20, 0),
            read_only.as_raw_fd(),
            false,
        ),
    ];
    for (what, region, fd, add) in cases {
        let mut conn = RawConn::connect(s.socket());
        negotiate(&mut conn, PROTOCOL_F_CONFIGURE_MEM_SLOTS);
        let reply = if add {
            conn.ack(req::ADD_MEM_REG, &single_region(&region), &[fd])
        } else {
            conn.ack(req::SET_MEM_TABLE, &mem_table(1, &[region]), &[fd])
        };
        assert_nacked_and_closed(&mut conn, reply, what);
        drop(conn);
        s.assert_serves(what);
    }
    s.finish();
}

#[test]
fn rings_set_up_and_kicked_before_any_memory() {
    let mut s = Served::start("vu-rings-first", &[]);
    let mut conn = RawConn::connect(s.socket());
    // Features, then the whole ring set-up and kicks, with no memory table (and no ring
    // addresses, which cannot be given without one).
    let features = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES;
    conn.request(req::SET_FEATURES, &u64_payload(features), &[]);
    conn.request(
        req::SET_VRING_NUM,
        &vring_state(0, u32::from(QUEUE_SIZE)),
        &[],
    );
    conn.request(req::SET_VRING_BASE, &vring_state(0, 0), &[]);
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kick = EventFd::new(0).unwrap();
    conn.request(req::SET_VRING_CALL, &u64_payload(0), &[call.as_raw_fd()]);
    conn.request(req::SET_VRING_KICK, &u64_payload(0), &[kick.as_raw_fd()]);
    conn.request(req::SET_VRING_ENABLE, &vring_state(0, 1), &[]);
    for _ in 0..100 {
        kick.write(1).unwrap();
    }
    // vubd still answers on this connection, and stopping the ring reports it untouched.
    let answered = conn.get(req::GET_FEATURES, &[]).u64();
    assert_ne!(answered & VIRTIO_F_VERSION_1, 0);
    let base = conn.get(req::GET_VRING_BASE, &vring_state(0, 0));
    assert_eq!(base.payload, vring_state(0, 0), "nothing was popped");
    assert!(call.read().is_err(), "nothing was signalled");
    s.assert_running("after kicks with no memory");

    // The same connection, set up properly now, serves requests.
    let mut fe = RawFrontend::over_stream(conn.stream, QUEUE_SIZE, INDIRECT_DESC);
    fe.write_header(DATA, IN, 0);
    let head = fe.write_chain(&[r(DATA, 16), w(DATA + 4096, 4096), w(DATA + 8192, 1)]);
    let data = [span(DATA + 4096, 4096)];
    assert_answered(
        &mut fe,
        head,
        (DATA + 8192, S_OK),
        4097,
        &data,
        "late set-up",
    );
    assert_guest(&fe, DATA + 4096, &s.model[..4096], "data read");
    drop(fe);
    s.assert_serves("after rings before memory");
    s.finish();
}

/// SET_MEM_TABLE through the raw frontend's own connection, acked.
fn replace_memory(fe: &mut RawFrontend, regions: &[(u64, u64)]) -> common::raw_frontend::Mem {
    let mem = shared_memory(regions);
    let infos: Vec<VhostUserMemoryRegionInfo> = mem
        .iter()
        .map(|region| VhostUserMemoryRegionInfo::from_guest_region(region).unwrap())
        .collect();
    fe.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.frontend
        .set_mem_table(&infos)
        .expect("memory table accepted");
    fe.frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
    mem
}

#[test]
fn memory_swapped_under_a_running_queue() {
    let mut s = Served::start("vu-swap-memory", &[]);
    let mut fe = s.frontend();
    fe.write_header(DATA, IN, 0);
    let (used, status) = fe.request(
        &[r(DATA, 16), w(DATA + 4096, 512), w(DATA + 8192, 1)],
        DATA + 8192,
    );
    assert_eq!((used.len, status), (513, S_OK));

    // New, empty memory at the same guest addresses: the rings vubd reads are now all zero,
    // and the avail index (0) is behind the one vubd has reached (1). A kick finds nothing it
    // can take, and nothing is written into the new memory but the used ring's flags (the
    // device's own field, where it asks not to be kicked while it looks).
    let fresh = replace_memory(&mut fe, &[(0, MEM_SIZE)]);
    fe.write_header(DATA, IN, 0);
    let head = fe.write_chain(&[r(DATA, 16), w(DATA + 4096, 512), w(DATA + 8192, 1)]);
    fe.push_avail(head);
    assert_eq!(fe.wait_used_for(Duration::from_millis(300)), None);
    let mut now = vec![0u8; MEM_SIZE as usize];
    fresh.read_slice(&mut now, GuestAddress(0)).unwrap();
    let used_ring = USED as usize..USED as usize + 6 + 8 * usize::from(QUEUE_SIZE);
    let written = now
        .iter()
        .enumerate()
        .find(|(i, b)| **b != 0 && !used_ring.contains(i));
    assert_eq!(written, None, "nothing written into the new memory");
    let entries = &now[used_ring.start + 2..used_ring.end];
    assert!(
        entries.iter().all(|b| *b == 0),
        "no used entry, no used index"
    );

    // Memory that no longer holds the rings at all.
    let _far = replace_memory(&mut fe, &[(64 << 20, MEM_SIZE)]);
    fe.push_avail(head);
    assert_eq!(fe.wait_used_for(Duration::from_millis(300)), None);
    s.assert_running("after the rings lost their memory");

    // Stopping the queue reports the position reached before the swap.
    assert_eq!(fe.frontend.get_vring_base(0).expect("GET_VRING_BASE"), 1);
    drop(fe);
    s.assert_serves("after memory swaps");
    s.finish();
}

/// GET_CONFIG / SET_CONFIG payload: offset, size, flags, then `size` bytes of `fill`.
fn config_msg(offset: u32, size: u32, fill: u8) -> Vec<u8> {
    let mut payload = vring_state(offset, size);
    payload.extend_from_slice(&0u32.to_le_bytes());
    payload.extend(std::iter::repeat_n(fill, size as usize));
    payload
}

#[test]
fn config_space_windows_at_the_edges() {
    let mut s = Served::start("vu-config", &[]);
    let mut conn = RawConn::connect(s.socket());
    negotiate(&mut conn, 0);
    let config = |conn: &mut RawConn, offset: u32, size: u32| {
        let reply = conn.get(req::GET_CONFIG, &config_msg(offset, size, 0));
        assert_eq!(
            reply.payload.len(),
            12 + size as usize,
            "{size} at {offset}"
        );
        reply.payload[12..].to_vec()
    };
    let fields = config(&mut conn, 0, 60);
    let capacity = u64::from_le_bytes(fields[..8].try_into().unwrap());
    assert_eq!(capacity, common::hostile::DISK as u64 / 512);
    // Windows past the fields, at the end of the space, and as large as a message carries:
    // zeroes past the fields, the fields where they are.
    assert_eq!(config(&mut conn, 60, 4), vec![0; 4]);
    assert_eq!(config(&mut conn, 4096 - 16, 16), vec![0; 16]);
    let big = config(&mut conn, 0, 4096 - 12);
    assert_eq!(big[..60], fields[..]);
    assert!(big[60..].iter().all(|b| *b == 0));
    // Writes anywhere but `writeback` are ignored.
    for (offset, len) in [(4096 - 8, 8), (0, 60), (33, 27), (0, 32)] {
        let reply = conn.ack(req::SET_CONFIG, &config_msg(offset, len, 0xff), &[]);
        let Reply::Msg(msg) = reply else {
            panic!("SET_CONFIG at {offset}: {reply:?}")
        };
        assert_eq!(msg.u64(), 0, "SET_CONFIG of {len} at {offset} accepted");
    }
    let after = config(&mut conn, 0, 60);
    assert_eq!((&after[..32], &after[33..]), (&fields[..32], &fields[33..]));
    assert_eq!(
        after[32], 1,
        "the (0, 60) write turned writeback on, as a boolean"
    );
    drop(conn);

    // Windows vhost 0.18 refuses before vubd sees them (empty, past the 4 KiB space, or
    // wrapping the offset): the connection ends, the next frontend is served.
    for (offset, size) in [(0, 0), (4096, 8), (0xffff_fff0, 16), (u32::MAX, 8)] {
        let mut conn = RawConn::connect(s.socket());
        negotiate(&mut conn, 0);
        conn.request(req::GET_CONFIG, &config_msg(offset, size, 0), &[]);
        assert!(
            conn.closed_within(CLOSE),
            "GET_CONFIG of {size} at {offset}"
        );
        drop(conn);
        s.assert_serves("after a refused config window");
    }
    s.finish();
}
