//! Malformed vhost-user messages, written by hand on the socket: wrong payload sizes, unknown
//! or unnegotiated request codes, too many file descriptors, missing ones, requests out of
//! order.
//!
//! vhost-user-backend answers each of these with an error (a NACK first, when the frontend
//! negotiated REPLY_ACK and asked for one) and ends the connection. What vubd must do is
//! survive it: no crash, no hang, no file descriptor kept, and the next frontend accepted and
//! served correctly. Every case checks all of that.

mod common;

use std::fs;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use common::hostile::Served;
use common::raw_frontend::{memfd, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1};
use common::vhost_msg::{
    header, mem_table, req, u64_payload, vring_addr, vring_state, RawConn, Region, Reply,
    NEED_REPLY, PROTOCOL_F_CONFIG, PROTOCOL_F_MQ, PROTOCOL_F_REPLY_ACK, REPLY, VERSION,
};
use vmm_sys_util::eventfd::EventFd;

/// How long vubd has to close a connection it refuses.
const CLOSE: Duration = Duration::from_secs(5);
const PROTOCOL_F_CONFIGURE_MEM_SLOTS: u64 = 1 << 15;

/// SET_OWNER and feature negotiation, REPLY_ACK included, as a frontend starts.
fn negotiate(conn: &mut RawConn, extra_protocol: u64) {
    conn.request(req::SET_OWNER, &[], &[]);
    let features = conn.get(req::GET_FEATURES, &[]).u64();
    let wanted = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES;
    conn.request(req::SET_FEATURES, &u64_payload(features & wanted), &[]);
    let protocol = conn.get(req::GET_PROTOCOL_FEATURES, &[]).u64();
    let wanted = PROTOCOL_F_REPLY_ACK | PROTOCOL_F_CONFIG | PROTOCOL_F_MQ | extra_protocol;
    let acked = u64_payload(protocol & wanted);
    assert_eq!(conn.ack(req::SET_PROTOCOL_FEATURES, &acked, &[]), ack(0));
}

fn ack(value: u64) -> Reply {
    Reply::Msg(common::vhost_msg::Msg {
        request: req::SET_PROTOCOL_FEATURES,
        flags: VERSION | REPLY,
        payload: u64_payload(value),
    })
}

/// A 16 MiB memory region and the memfd behind it.
fn region() -> (Region, fs::File) {
    let region = Region {
        guest_addr: 0,
        size: 16 << 20,
        user_addr: 0x7f00_0000_0000,
        mmap_offset: 0,
    };
    (region, memfd(region.size))
}

/// Open file descriptors of process `pid`.
fn fd_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// Wait until vubd has no more descriptors open than `baseline` (a connection's are closed a
/// moment after its socket). `baseline` is taken just after vubd started, when its probe
/// connection may not be entirely gone yet, hence "no more than" rather than "as many as": a
/// descriptor kept per connection still shows within a few connections.
fn assert_fds_back_to(s: &Served, baseline: usize, what: &str) {
    let deadline = Instant::now() + CLOSE;
    loop {
        let now = fd_count(s.vubd.pid());
        if now <= baseline {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: vubd holds {now} descriptors, {baseline} before"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A case: what the frontend sends on a fresh connection.
type Case = (&'static str, Box<dyn Fn(&mut RawConn)>);

/// Run each case on its own connection: vubd must close it, give back every descriptor it
/// received, and then serve a new frontend.
fn run_cases(s: &mut Served, cases: Vec<Case>) {
    run_cases_expecting(s, cases, true);
}

/// Like [`run_cases`]; with `must_close` false, vubd may also keep the connection open
/// (waiting for the rest of a message), and the frontend is the one to leave.
fn run_cases_expecting(s: &mut Served, cases: Vec<Case>, must_close: bool) {
    let baseline = fd_count(s.vubd.pid());
    for (what, send) in cases {
        let mut conn = RawConn::connect(s.socket());
        send(&mut conn);
        if must_close {
            assert!(conn.closed_within(CLOSE), "{what}: connection not closed");
        } else {
            let _ = conn.closed_within(Duration::from_millis(200));
            s.assert_running(what);
        }
        drop(conn);
        assert_fds_back_to(s, baseline, what);
        s.assert_serves(what);
        assert_fds_back_to(s, baseline, what);
    }
}

/// Send `request` with `payload` and no descriptors.
fn plain(request: u32, payload: Vec<u8>) -> Box<dyn Fn(&mut RawConn)> {
    Box::new(move |conn| conn.request(request, &payload, &[]))
}

#[test]
fn wrong_sizes_and_malformed_headers_end_the_connection() {
    let mut s = Served::start("vu-sizes", &[]);
    let (good, file) = region();
    let fd = file.as_raw_fd();
    let one = mem_table(1, &[good]);
    let cases: Vec<Case> = vec![
        (
            "GET_FEATURES with a payload",
            plain(req::GET_FEATURES, vec![0; 8]),
        ),
        (
            "SET_FEATURES of 4 bytes",
            plain(req::SET_FEATURES, vec![0; 4]),
        ),
        (
            "SET_FEATURES of 16 bytes",
            plain(req::SET_FEATURES, vec![0; 16]),
        ),
        (
            "SET_VRING_NUM of 4 bytes",
            plain(req::SET_VRING_NUM, vec![0; 4]),
        ),
        (
            "SET_VRING_ADDR of 8 bytes",
            plain(req::SET_VRING_ADDR, vring_state(0, 0)),
        ),
        (
            "SET_VRING_BASE of 12 bytes",
            plain(req::SET_VRING_BASE, vec![0; 12]),
        ),
        (
            "SET_MEM_TABLE saying 2 regions, carrying 1",
            Box::new(move |c| c.request(req::SET_MEM_TABLE, &mem_table(2, &[good]), &[fd])),
        ),
        (
            "SET_MEM_TABLE of 0 regions",
            Box::new(move |c| c.request(req::SET_MEM_TABLE, &mem_table(0, &[]), &[fd])),
        ),
        (
            "SET_MEM_TABLE saying 33 regions",
            Box::new(move |c| c.request(req::SET_MEM_TABLE, &mem_table(33, &[good; 33]), &[])),
        ),
        (
            "SET_MEM_TABLE with a trailing byte",
            Box::new(move |c| {
                let mut payload = one.clone();
                payload.push(0);
                c.request(req::SET_MEM_TABLE, &payload, &[fd]);
            }),
        ),
        (
            "SET_VRING_KICK of 4 bytes",
            Box::new(move |c| c.request(req::SET_VRING_KICK, &[0; 4], &[fd])),
        ),
        (
            "GET_CONFIG whose size disagrees with its payload",
            Box::new(|c| {
                negotiate(c, 0);
                let mut payload = vring_state(0, 60);
                payload.extend_from_slice(&[0; 4 + 8]);
                c.request(req::GET_CONFIG, &payload, &[]);
            }),
        ),
        (
            "header announcing 4097 bytes",
            Box::new(|c| c.send_bytes(&header(req::GET_FEATURES, VERSION, 4097), &[])),
        ),
        (
            "header announcing 4 GiB",
            Box::new(|c| c.send_bytes(&header(req::SET_FEATURES, VERSION, u32::MAX), &[])),
        ),
        (
            "header announcing 64 bytes, 8 sent, then end of stream",
            Box::new(|c| {
                let mut bytes = header(req::SET_MEM_TABLE, VERSION, 64);
                bytes.extend_from_slice(&[0; 8]);
                c.send_bytes(&bytes, &[]);
                c.stream.shutdown(std::net::Shutdown::Write).unwrap();
            }),
        ),
        (
            "5 bytes of a header, then end of stream",
            Box::new(|c| {
                c.send_bytes(&header(req::GET_FEATURES, VERSION, 0)[..5], &[]);
                c.stream.shutdown(std::net::Shutdown::Write).unwrap();
            }),
        ),
        (
            "version 0",
            Box::new(|c| c.send(req::GET_FEATURES, 0, &[], &[])),
        ),
        (
            "version 2",
            Box::new(|c| c.send(req::GET_FEATURES, 2, &[], &[])),
        ),
        (
            "a request flagged as a reply",
            Box::new(|c| c.send(req::SET_OWNER, VERSION | REPLY, &[], &[])),
        ),
        (
            "reserved header flags",
            Box::new(|c| c.send(req::GET_FEATURES, VERSION | 0x100, &[], &[])),
        ),
    ];
    run_cases(&mut s, cases);
    drop(file);
    s.finish();
}

#[test]
fn unknown_and_unnegotiated_requests_end_the_connection() {
    let mut s = Served::start("vu-unknown", &[]);
    let mut cases: Vec<Case> = Vec::new();
    for code in [0u32, 45, 1000, 0x7fff_ffff, u32::MAX] {
        cases.push(("unknown request code", plain(code, vec![])));
        cases.push((
            "unknown request code with a payload",
            plain(code, vec![0; 8]),
        ));
    }
    // Known to the protocol, never offered by vubd.
    cases.push(("SEND_RARP", plain(req::SEND_RARP, vec![0; 8])));
    cases.push((
        "SET_LOG_BASE without LOG_SHMFD",
        plain(req::SET_LOG_BASE, vec![0; 16]),
    ));
    cases.push(("GET_INFLIGHT_FD", plain(req::GET_INFLIGHT_FD, vec![0; 24])));
    cases.push((
        "GET_INFLIGHT_FD after negotiation",
        Box::new(|c| {
            negotiate(c, 0);
            c.request(req::GET_INFLIGHT_FD, &[0; 24], &[]);
        }),
    ));
    cases.push((
        "RESET_DEVICE, not negotiated",
        plain(req::RESET_DEVICE, vec![]),
    ));
    cases.push((
        "ADD_MEM_REG, not negotiated",
        plain(req::ADD_MEM_REG, vec![0; 40]),
    ));
    run_cases(&mut s, cases);
    s.finish();
}

#[test]
fn too_many_or_too_few_descriptors_end_the_connection() {
    let mut s = Served::start("vu-fds", &[]);
    let (good, file) = region();
    let fd = file.as_raw_fd();
    let events: Vec<EventFd> = (0..40).map(|_| EventFd::new(0).unwrap()).collect();
    let many: Vec<RawFd> = events.iter().map(|e| e.as_raw_fd()).collect();
    let one = mem_table(1, &[good]);
    let two = mem_table(
        2,
        &[
            good,
            Region {
                guest_addr: 32 << 20,
                ..good
            },
        ],
    );
    let mut with_memfd = vec![fd];
    with_memfd.extend_from_slice(&many);
    let cases: Vec<Case> = vec![
        (
            "GET_FEATURES carrying a descriptor",
            Box::new(move |c| c.request(req::GET_FEATURES, &[], &[fd])),
        ),
        (
            "SET_MEM_TABLE of 1 region with 2 descriptors",
            with(req::SET_MEM_TABLE, one.clone(), vec![fd, fd]),
        ),
        (
            "SET_VRING_KICK with 2 descriptors",
            with(req::SET_VRING_KICK, u64_payload(0), many[..2].to_vec()),
        ),
        (
            "SET_MEM_TABLE of 1 region, no descriptor",
            with(req::SET_MEM_TABLE, one.clone(), vec![]),
        ),
        (
            "SET_MEM_TABLE of 2 regions, 1 descriptor",
            with(req::SET_MEM_TABLE, two, vec![fd]),
        ),
        (
            "SET_VRING_KICK promising a descriptor, without one",
            with(req::SET_VRING_KICK, u64_payload(0), vec![]),
        ),
        (
            "SET_VRING_KICK saying 'no descriptor', with one",
            with(req::SET_VRING_KICK, u64_payload(0x100), vec![many[0]]),
        ),
        (
            "ADD_MEM_REG without a descriptor",
            Box::new(move |c| {
                negotiate(c, PROTOCOL_F_CONFIGURE_MEM_SLOTS);
                let payload = common::vhost_msg::single_region(&good);
                c.request(req::ADD_MEM_REG, &payload, &[]);
            }),
        ),
        (
            "ADD_MEM_REG with 2 descriptors",
            Box::new(move |c| {
                negotiate(c, PROTOCOL_F_CONFIGURE_MEM_SLOTS);
                let payload = common::vhost_msg::single_region(&good);
                c.request(req::ADD_MEM_REG, &payload, &[fd, fd]);
            }),
        ),
    ];
    run_cases(&mut s, cases);

    // More descriptors than a message may carry (32): the kernel truncates the control data,
    // and vhost 0.18 takes the truncation for a transient error: it closes the descriptors
    // and reads on, the message's first bytes lost. vubd may end the connection (when what
    // follows does not parse) or wait for bytes that never come; either way it must hold no
    // descriptor afterwards and serve the next frontend.
    let truncated: Vec<Case> = vec![
        (
            "SET_MEM_TABLE of 1 region with 41 descriptors",
            with(req::SET_MEM_TABLE, one, with_memfd),
        ),
        (
            "SET_VRING_CALL with 40 descriptors",
            with(req::SET_VRING_CALL, u64_payload(0), many.clone()),
        ),
        (
            "GET_FEATURES with 40 descriptors, then a good GET_FEATURES",
            Box::new(move |c| {
                c.request(req::GET_FEATURES, &[], &many);
                c.request(req::GET_FEATURES, &[], &[]);
            }),
        ),
    ];
    run_cases_expecting(&mut s, truncated, false);
    drop(events);
    drop(file);
    s.finish();
}

/// Send `request` with `payload` and `fds`.
fn with(request: u32, payload: Vec<u8>, fds: Vec<RawFd>) -> Box<dyn Fn(&mut RawConn)> {
    Box::new(move |conn| conn.request(request, &payload, &fds))
}

#[test]
fn requests_out_of_order_end_the_connection() {
    let mut s = Served::start("vu-order", &[]);
    let (good, file) = region();
    let fd = file.as_raw_fd();
    let addr = vring_addr(
        0,
        good.user_addr,
        good.user_addr + 0x8000,
        good.user_addr + 0x4000,
    );
    let cases: Vec<Case> = vec![
        (
            "SET_VRING_ADDR before SET_MEM_TABLE (NACKed)",
            Box::new({
                let addr = addr.clone();
                move |c| {
                    negotiate(c, 0);
                    let reply = c.ack(req::SET_VRING_ADDR, &addr, &[]);
                    let Reply::Msg(msg) = reply else {
                        panic!("no NACK: {reply:?}")
                    };
                    assert_ne!(msg.u64(), 0, "SET_VRING_ADDR without memory is refused");
                }
            }),
        ),
        (
            "SET_VRING_ADDR outside the memory table",
            Box::new(move |c| {
                negotiate(c, 0);
                c.request(req::SET_MEM_TABLE, &mem_table(1, &[good]), &[fd]);
                let far = vring_addr(0, 0x1000, 0x9000, 0x5000);
                c.request(req::SET_VRING_ADDR, &far, &[]);
            }),
        ),
        (
            "SET_VRING_ENABLE before SET_FEATURES",
            plain(req::SET_VRING_ENABLE, vring_state(0, 1)),
        ),
        (
            "SET_VRING_ENABLE of 2",
            Box::new(|c| {
                negotiate(c, 0);
                c.request(req::SET_VRING_ENABLE, &vring_state(0, 2), &[]);
            }),
        ),
        (
            "SET_OWNER twice",
            Box::new(|c| {
                c.request(req::SET_OWNER, &[], &[]);
                c.request(req::SET_OWNER, &[], &[]);
            }),
        ),
        (
            "SET_VRING_NUM of 0",
            plain(req::SET_VRING_NUM, vring_state(0, 0)),
        ),
        (
            "SET_VRING_NUM of 1024",
            plain(req::SET_VRING_NUM, vring_state(0, 1024)),
        ),
        (
            "SET_VRING_NUM of queue 9",
            plain(req::SET_VRING_NUM, vring_state(9, 256)),
        ),
        (
            "SET_VRING_BASE of queue 9",
            plain(req::SET_VRING_BASE, vring_state(9, 0)),
        ),
        (
            "GET_VRING_BASE of queue 9",
            plain(req::GET_VRING_BASE, vring_state(9, 0)),
        ),
        (
            "SET_VRING_KICK of queue 200",
            with(req::SET_VRING_KICK, u64_payload(200), vec![fd]),
        ),
        (
            "GET_VRING_BASE of queue 0 twice, never started, then SET_VRING_ADDR",
            Box::new(move |c| {
                let base = c.get(req::GET_VRING_BASE, &vring_state(0, 0));
                assert_eq!(base.payload, vring_state(0, 0));
                let base = c.get(req::GET_VRING_BASE, &vring_state(0, 0));
                assert_eq!(base.payload, vring_state(0, 0));
                c.request(req::SET_VRING_ADDR, &addr, &[]);
            }),
        ),
    ];
    run_cases(&mut s, cases);
    drop(file);
    s.finish();
}

/// A frontend that stops in the middle of a message keeps its connection (vubd waits for the
/// rest, as it must), but cannot keep vubd from shutting down.
#[test]
fn a_frontend_silent_mid_message_does_not_block_shutdown() {
    let s = Served::start("vu-silent", &[]);
    let mut conn = RawConn::connect(s.socket());
    // The header announces 64 bytes; none follow.
    conn.send_bytes(&header(req::SET_MEM_TABLE, VERSION | NEED_REPLY, 64), &[]);
    assert!(!conn.closed_within(Duration::from_millis(200)));
    // Served::finish sends SIGTERM and fails if vubd has not exited cleanly within 30 s.
    s.finish();
    assert!(conn.closed_within(CLOSE), "connection closed on shutdown");
}

/// A frontend that connects and leaves, over and over, costs vubd nothing. vhost-user-backend
/// leaks one descriptor per queue thread and connection; before vubd closed them, a 4-queue
/// device kept 400 descriptors after this loop, and vubd under a 64-descriptor limit exited
/// after 49 connections ("Too many open files").
#[test]
fn reconnecting_in_a_loop_keeps_no_descriptor() {
    let mut s = Served::start("vu-reconnect", &["--num-queues", "4"]);
    let baseline = fd_count(s.vubd.pid());
    for _ in 0..100 {
        drop(RawConn::connect(s.socket()));
    }
    let mut conn = RawConn::connect(s.socket());
    negotiate(&mut conn, 0);
    drop(conn);
    // vubd serves one connection at a time: this one is served after the 101 before.
    s.assert_serves("after 101 connections");
    assert_fds_back_to(&s, baseline, "after 102 connections");
    s.finish();
}
