//! Exports A and B in one vubd. While a libblkio client runs a verified write/read loop on B,
//! A gets garbage, protocol violations, descriptor loops, frontends that leave in the middle of
//! their set-up or with requests in flight, and both of its frontend places taken with a third
//! frontend waiting. B's loop must see no error and no wrong byte, B must keep making progress
//! while A's places are taken, and A must serve a good frontend correctly afterwards.
//!
//! Not covered: a disk whose storage fails underneath while served. The tests run as root
//! (permissions do not stop reads) and an open descriptor survives chmod or unlink, so there
//! is no deterministic way to make A's image fail without a device-mapper error target.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::*;
use common::blkio_client::BlkioClient;
use common::data::assert_same;
use common::pattern;
use common::raw_frontend::{memfd, r, w, RawFrontend, DATA, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use common::vhost_msg::{
    header, req, u64_payload, vring_state, RawConn, Reply, NEED_REPLY, VERSION,
};

const BLOCK: usize = 4096;
/// Iterations (a write and a read each) B's loop makes at least, hostile or not.
const MIN_ITERATIONS: u64 = 1500;
/// How long vubd has to close a connection it refuses.
const CLOSE: Duration = Duration::from_secs(5);

/// B's loop: write a 4 KiB block, read it back, compare, until `stop` and at least
/// [`MIN_ITERATIONS`]; then the whole disk must read back as the model. Returns the model.
fn verified_loop(
    socket: PathBuf,
    mut model: Vec<u8>,
    done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Result<Vec<u8>, String> {
    let mut c = BlkioClient::connect(&socket, 1).map_err(|e| format!("connect: {e}"))?;
    let blocks = (model.len() / BLOCK) as u64;
    let mut i = 0u64;
    while i < MIN_ITERATIONS || !stop.load(Ordering::Acquire) {
        let offset = (i * 7919 % blocks) * BLOCK as u64;
        let data = pattern(BLOCK, 1000 + i);
        c.write(0, offset, &data)
            .map_err(|e| format!("write {i}: {e}"))?;
        let got = c
            .read(0, offset, BLOCK)
            .map_err(|e| format!("read {i}: {e}"))?;
        if got != data {
            return Err(format!("iteration {i}: block at {offset} reads back wrong"));
        }
        model[offset as usize..offset as usize + BLOCK].copy_from_slice(&data);
        i += 1;
        done.store(i, Ordering::Release);
    }
    let disk = c
        .read_all(0, model.len())
        .map_err(|e| format!("read all: {e}"))?;
    if disk != model {
        return Err("the whole disk differs from the model".into());
    }
    Ok(model)
}

/// Wait until B's loop has made `n` more iterations than it had made when called.
fn b_progresses(done: &AtomicU64, n: u64, what: &str) {
    let target = done.load(Ordering::Acquire) + n;
    let deadline = Instant::now() + DEADLINE;
    while done.load(Ordering::Acquire) < target {
        assert!(Instant::now() < deadline, "{what}: B made no progress");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// SET_OWNER, GET_FEATURES and GET_PROTOCOL_FEATURES answered: the connection is served.
fn served(conn: &mut RawConn) {
    conn.request(req::SET_OWNER, &[], &[]);
    assert_ne!(conn.get(req::GET_FEATURES, &[]).u64(), 0);
    conn.get(req::GET_PROTOCOL_FEATURES, &[]);
}

type Case = (&'static str, Box<dyn Fn(&mut RawConn)>);

#[test]
fn a_hostile_frontend_on_one_export_does_not_disturb_another() {
    let dir = TempDir::new("many-isolation");
    let model_a = create_image(&dir.join("a.raw"), DISK, 21);
    let model_b = create_image(&dir.join("b.raw"), DISK, 22);
    let mut vubd = Proc::vubd(
        &dir,
        &[
            "--disk",
            "image=a.raw,socket=a.sock,id=hostile",
            "--disk",
            "image=b.raw,socket=b.sock,id=victim",
            "--control",
            "qmp.sock",
        ],
        &["a.sock", "b.sock", "qmp.sock"],
    );
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let (done, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let load = {
        let (b, model, done, stop) = (b.clone(), model_b.clone(), done.clone(), stop.clone());
        std::thread::spawn(move || verified_loop(b, model, done, stop))
    };
    // The hostile phase starts once B's loop runs, and B's loop ends only after it.
    b_progresses(&done, 1, "B's first iteration");

    let region = memfd(16 << 20);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&region);
    let cases: Vec<Case> = vec![
        (
            "4 KiB of garbage",
            Box::new(|c| c.send_bytes(&pattern(4096, 9), &[])),
        ),
        (
            "version 2",
            Box::new(|c| c.send(req::GET_FEATURES, 2, &[], &[])),
        ),
        (
            "unknown request 1000",
            Box::new(|c| c.request(1000, &[0; 8], &[])),
        ),
        (
            "header announcing 4 GiB",
            Box::new(|c| c.send_bytes(&header(req::SET_FEATURES, VERSION, u32::MAX), &[])),
        ),
        (
            "SET_OWNER twice",
            Box::new(|c| {
                c.request(req::SET_OWNER, &[], &[]);
                c.request(req::SET_OWNER, &[], &[]);
            }),
        ),
        (
            "SET_VRING_ENABLE before SET_FEATURES",
            Box::new(|c| c.request(req::SET_VRING_ENABLE, &vring_state(0, 1), &[])),
        ),
        (
            "SET_VRING_KICK with 2 descriptors",
            Box::new(move |c| c.request(req::SET_VRING_KICK, &u64_payload(0), &[fd, fd])),
        ),
        (
            "SET_VRING_NUM of queue 9 after negotiation",
            Box::new(|c| {
                served(c);
                c.request(req::SET_VRING_NUM, &vring_state(9, 256), &[]);
            }),
        ),
    ];
    for (what, send) in &cases {
        let mut conn = RawConn::connect(&a);
        send(&mut conn);
        assert!(conn.closed_within(CLOSE), "{what}: connection not closed");
    }
    b_progresses(&done, 50, "after the protocol violations");

    // Frontends that leave abruptly: at once, within a header, after negotiation, and with
    // their rings running and requests in flight (after a descriptor loop was dropped).
    drop(RawConn::connect(&a));
    let mut conn = RawConn::connect(&a);
    conn.send_bytes(&header(req::GET_FEATURES, VERSION, 0)[..5], &[]);
    drop(conn);
    let mut conn = RawConn::connect(&a);
    served(&mut conn);
    drop(conn);
    let mut fe = within("a raw frontend on A", {
        let a = a.clone();
        move || RawFrontend::connect(&a, 256, 0)
    });
    fe.write_desc(0, DATA, 16, VRING_DESC_F_NEXT, 1);
    fe.write_desc(1, DATA + 512, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 0);
    fe.push_avail(0);
    let used = fe.wait_used();
    assert_eq!((used.id, used.len), (0, 0), "a descriptor loop is dropped");
    fe.write_header(DATA, 0, 0);
    let (_, status) = fe.request(
        &[r(DATA, 16), w(DATA + 4096, 4096), w(DATA + 512, 1)],
        DATA + 512,
    );
    assert_eq!(status, 0, "a good read on the same connection");
    let got = common::hostile::read_guest(&fe, DATA + 4096, 4096);
    assert_same(
        &got,
        &model_a[..4096],
        "A's first block, read by the raw frontend",
    );
    for k in 0..32u16 {
        let hdr = DATA + 0x1000 * (4 + u64::from(k));
        fe.write_header(hdr, 0, u64::from(k) * 8);
        fe.submit(&[r(hdr, 16), w(hdr + 512, 512), w(hdr + 16, 1)]);
    }
    drop(fe);
    b_progresses(&done, 50, "after the abrupt disconnects");

    // Both places taken (one frontend stopped in the middle of a message): a third waits, B
    // goes on; the third is served once a place is free.
    let mut first = RawConn::connect(&a);
    served(&mut first);
    let mut second = RawConn::connect(&a);
    served(&mut second);
    second.send_bytes(&header(req::SET_MEM_TABLE, VERSION | NEED_REPLY, 64), &[]);
    let mut third = RawConn::connect(&a);
    third.request(req::GET_FEATURES, &[], &[]);
    assert_eq!(
        third.recv(Duration::from_millis(300)),
        Reply::Silent,
        "a third frontend waits"
    );
    b_progresses(&done, 200, "with both of A's places taken");
    drop(first);
    match third.recv(DEADLINE) {
        Reply::Msg(m) => assert_eq!(m.request, req::GET_FEATURES, "{m:?}"),
        other => panic!("the third frontend is not served once a place is free: {other:?}"),
    }
    drop((second, third));
    b_progresses(&done, 50, "after the places were freed");
    assert!(vubd.running(), "vubd is running");

    stop.store(true, Ordering::Release);
    let model_b = within("B's loop", move || load.join())
        .expect("B's loop thread")
        .unwrap_or_else(|e| panic!("B's loop: {e}"));
    assert!(done.load(Ordering::Acquire) >= MIN_ITERATIONS);

    // A serves a good frontend correctly now.
    let written = pattern(BLOCK, 77);
    let model_a = within("a good frontend on A", {
        let (a, mut model, written) = (a.clone(), model_a.clone(), written.clone());
        move || {
            let mut c = BlkioClient::connect(&a, 1).expect("libblkio connects to A");
            assert_same(
                &c.read_all(0, DISK).expect("read A"),
                &model,
                "A through libblkio",
            );
            c.write(0, 5 * BLOCK as u64, &written).expect("write A");
            assert_eq!(c.read(0, 5 * BLOCK as u64, BLOCK).expect("read A"), written);
            model[5 * BLOCK..6 * BLOCK].copy_from_slice(&written);
            model
        }
    });
    drop(region);
    vubd.stop_ok();
    assert_same(
        &std::fs::read(dir.join("a.raw")).unwrap(),
        &model_a,
        "a.raw",
    );
    assert_same(
        &std::fs::read(dir.join("b.raw")).unwrap(),
        &model_b,
        "b.raw",
    );
}
