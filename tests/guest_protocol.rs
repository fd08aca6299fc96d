//! The virtio-blk protocol seen from a guest driver, including hostile ones: a raw split-ring
//! frontend sends chains libblkio never would, and every test checks that vubd answers with the
//! right status, touches nothing outside the request and keeps serving.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::blkio_client::BlkioClient;
use common::raw_frontend::{r, w, Desc, RawFrontend, Used, DATA, MEM_SIZE, VRING_DESC_F_INDIRECT};
use common::{create_image, TempDir, Vubd};
use vm_memory::{Bytes, GuestAddress};

const IN: u32 = 0;
const OUT: u32 = 1;
const FLUSH: u32 = 4;
const GET_ID: u32 = 8;
const DISCARD: u32 = 11;
const WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const HDR: u64 = DATA;
const BUF: u64 = DATA + 0x1000;
const STATUS: u64 = DATA + 0x80_0000;
const DISK: usize = 1 << 20;

struct Setup {
    _dir: TempDir,
    vubd: Vubd,
    image: std::path::PathBuf,
    model: Vec<u8>,
}

fn setup(name: &str, extra: &[&str]) -> Setup {
    let dir = TempDir::new(name);
    let image = dir.join("disk.raw");
    let model = create_image(&image, DISK, 21);
    let mut args = vec!["--image", image.to_str().unwrap(), "--queue-size", "256"];
    args.extend_from_slice(extra);
    let vubd = Vubd::start(&dir.join("s"), &args);
    Setup {
        _dir: dir,
        vubd,
        image,
        model,
    }
}

impl Setup {
    fn frontend(&self) -> RawFrontend {
        RawFrontend::connect(&self.vubd.socket, 256, 0)
    }

    /// Stop vubd and check the image is exactly `self.model`.
    fn finish(mut self) {
        self.vubd.stop();
        assert!(
            fs::read(&self.image).unwrap() == self.model,
            "image changed"
        );
    }
}

fn read_guest(fe: &RawFrontend, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    fe.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

#[test]
fn get_id_returns_the_serial_bounded_by_the_buffer() {
    let s = setup("get-id", &["--serial", "vubd-test-serial-01"]);
    let mut fe = s.frontend();
    fe.write_header(HDR, GET_ID, 0);
    fe.mem.write_slice(&[0xee; 64], GuestAddress(BUF)).unwrap();
    let (used, status) = fe.request(&[r(HDR, 16), w(BUF, 20), w(STATUS, 1)], STATUS);
    assert_eq!(status, S_OK);
    assert_eq!(used.len, 21);
    let mut expected = b"vubd-test-serial-01".to_vec();
    expected.resize(20, 0);
    assert_eq!(read_guest(&fe, BUF, 20), expected);

    // A 4-byte buffer gets 4 bytes and not one more.
    fe.mem.write_slice(&[0xee; 64], GuestAddress(BUF)).unwrap();
    let (used, status) = fe.request(&[r(HDR, 16), w(BUF, 4), w(STATUS, 1)], STATUS);
    assert_eq!((status, used.len), (S_OK, 5));
    assert_eq!(read_guest(&fe, BUF, 8), b"vubd\xee\xee\xee\xee");
    drop(fe);
    s.finish();
}

#[test]
fn default_serial_is_derived_from_the_image() {
    let s = setup("serial-default", &[]);
    let mut fe = s.frontend();
    fe.write_header(HDR, GET_ID, 0);
    let (_, status) = fe.request(&[r(HDR, 16), w(BUF, 20), w(STATUS, 1)], STATUS);
    assert_eq!(status, S_OK);
    let id = read_guest(&fe, BUF, 20);
    assert!(id.starts_with(b"vubd-"), "{id:?}");
    assert!(id.iter().all(u8::is_ascii_alphanumeric_or_dash), "{id:?}");
    drop(fe);
    s.finish();
}

trait AsciiDash {
    fn is_ascii_alphanumeric_or_dash(&self) -> bool;
}

impl AsciiDash for u8 {
    fn is_ascii_alphanumeric_or_dash(&self) -> bool {
        self.is_ascii_alphanumeric() || *self == b'-'
    }
}

#[test]
fn config_space_answers_exactly_the_window_asked() {
    let s = setup(
        "config",
        &["--num-queues", "3", "--logical-block-size", "4096"],
    );
    let mut fe = s.frontend();
    let cfg = fe.config(0, 60);
    assert_eq!(cfg.len(), 60);
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        DISK as u64 / 512
    );
    assert_eq!(
        u32::from_le_bytes(cfg[12..16].try_into().unwrap()),
        254,
        "seg_max"
    );
    assert_eq!(
        u32::from_le_bytes(cfg[20..24].try_into().unwrap()),
        4096,
        "blk_size"
    );
    assert_eq!(cfg[32], 1, "writeback");
    assert_eq!(
        u16::from_le_bytes(cfg[34..36].try_into().unwrap()),
        3,
        "num_queues"
    );
    let window = fe.config(20, 4);
    assert_eq!(window, cfg[20..24]);
    drop(fe);
    s.finish();
}

#[test]
fn requests_are_served_and_status_lands_in_the_last_byte() {
    let mut s = setup("basic", &[]);
    let mut fe = s.frontend();
    // A write whose header and data share one descriptor.
    let data = common::pattern(4096, 3);
    fe.write_header(HDR, OUT, 16);
    fe.mem.write_slice(&data, GuestAddress(HDR + 16)).unwrap();
    let (used, status) = fe.request(&[r(HDR, 16 + 4096), w(STATUS, 1)], STATUS);
    assert_eq!((status, used.len), (S_OK, 1));
    s.model[16 * 512..16 * 512 + 4096].copy_from_slice(&data);

    // A read whose last data descriptor also holds the status byte, with the header cut in
    // three descriptors.
    fe.write_header(HDR, IN, 16);
    let mut hdr = vec![0u8; 16];
    fe.mem.read_slice(&mut hdr, GuestAddress(HDR)).unwrap();
    fe.mem
        .write_slice(&hdr[5..11], GuestAddress(HDR + 0x100))
        .unwrap();
    fe.mem
        .write_slice(&hdr[11..], GuestAddress(HDR + 0x200))
        .unwrap();
    let status_at = BUF + 4096;
    let (used, status) = fe.request(
        &[
            r(HDR, 5),
            r(HDR + 0x100, 6),
            r(HDR + 0x200, 5),
            w(BUF, 2048),
            w(BUF + 2048, 2049),
        ],
        status_at,
    );
    assert_eq!((status, used.len), (S_OK, 4097));
    assert_eq!(read_guest(&fe, BUF, 4096), data);

    fe.write_header(HDR, FLUSH, 0);
    let (_, status) = fe.request(&[r(HDR, 16), w(STATUS, 1)], STATUS);
    assert_eq!(status, S_OK);
    drop(fe);
    s.finish();
}

#[test]
fn invalid_requests_get_ioerr_or_unsupp_and_touch_nothing() {
    let s = setup("invalid", &[]);
    let mut fe = s.frontend();
    let sectors = DISK as u64 / 512;
    let cases: Vec<(&str, u32, u64, Vec<common::raw_frontend::Desc>, u8)> = vec![
        (
            "write past the end",
            OUT,
            sectors - 1,
            vec![r(HDR, 16), r(BUF, 1024), w(STATUS, 1)],
            S_IOERR,
        ),
        (
            "write at u64::MAX sector",
            OUT,
            u64::MAX,
            vec![r(HDR, 16), r(BUF, 512), w(STATUS, 1)],
            S_IOERR,
        ),
        (
            "read of a partial sector",
            IN,
            0,
            vec![r(HDR, 16), w(BUF, 100), w(STATUS, 1)],
            S_IOERR,
        ),
        (
            "write from outside guest memory",
            OUT,
            0,
            vec![r(HDR, 16), r(MEM_SIZE - 512, 1024), w(STATUS, 1)],
            S_IOERR,
        ),
        (
            "read into outside guest memory",
            IN,
            0,
            vec![r(HDR, 16), w(MEM_SIZE, 512), w(STATUS, 1)],
            S_IOERR,
        ),
        (
            "write with writable data",
            OUT,
            0,
            vec![r(HDR, 16), w(BUF, 512), w(STATUS, 1)],
            S_IOERR,
        ),
        (
            "short header",
            IN,
            0,
            vec![r(HDR, 8), w(BUF, 512), w(STATUS, 1)],
            S_IOERR,
        ),
        (
            "readable after writable",
            IN,
            0,
            vec![r(HDR, 16), w(BUF, 512), r(BUF + 4096, 512), w(STATUS, 1)],
            S_IOERR,
        ),
        (
            "unknown type",
            99,
            0,
            vec![r(HDR, 16), w(STATUS, 1)],
            S_UNSUPP,
        ),
        (
            "secure erase",
            14,
            0,
            vec![r(HDR, 16), r(BUF, 16), w(STATUS, 1)],
            S_UNSUPP,
        ),
    ];
    // Fill the write source with a pattern so a write that wrongly happened would show.
    fe.mem
        .write_slice(&[0x5a; 8192], GuestAddress(BUF))
        .unwrap();
    for (what, request_type, sector, chain, expected) in cases {
        fe.write_header(HDR, request_type, sector);
        let (used, status) = fe.request(&chain, STATUS);
        assert_eq!(status, expected, "{what}");
        assert_eq!(used.len, 1, "{what}: only the status byte is written");
    }

    // Discard with the unmap flag, and write-zeroes with a reserved flag: UNSUPP.
    for (request_type, flags) in [(DISCARD, 1u32), (WRITE_ZEROES, 2)] {
        fe.write_header(HDR, request_type, 0);
        fe.mem.write_obj(0u64, GuestAddress(BUF)).unwrap();
        fe.mem
            .write_obj(8u32.to_le(), GuestAddress(BUF + 8))
            .unwrap();
        fe.mem
            .write_obj(flags.to_le(), GuestAddress(BUF + 12))
            .unwrap();
        let (_, status) = fe.request(&[r(HDR, 16), r(BUF, 16), w(STATUS, 1)], STATUS);
        assert_eq!(status, S_UNSUPP, "type {request_type} flags {flags}");
    }
    // A discard segment past the end: IOERR.
    fe.write_header(HDR, DISCARD, 0);
    fe.mem
        .write_obj((sectors - 4).to_le(), GuestAddress(BUF))
        .unwrap();
    fe.mem
        .write_obj(8u32.to_le(), GuestAddress(BUF + 8))
        .unwrap();
    fe.mem.write_obj(0u32, GuestAddress(BUF + 12)).unwrap();
    let (_, status) = fe.request(&[r(HDR, 16), r(BUF, 16), w(STATUS, 1)], STATUS);
    assert_eq!(status, S_IOERR);
    drop(fe);
    s.finish();
}

#[test]
fn a_long_batch_hands_its_first_half_back_early() {
    // On a memory-backed file transfers are copies done in the queue thread: of eight requests
    // made available at once, the first four are put on the used ring and notified before the
    // last four are copied, so the driver can refill meanwhile. Without EVENT_IDX every
    // publication notifies, so the eventfd counts them.
    let dir = TempDir::new_in(Path::new("/dev/shm"), "early-publish");
    let image = dir.join("disk.raw");
    let model = create_image(&image, DISK, 22);
    let mut vubd = Vubd::start(&dir.join("s"), &["--image", image.to_str().unwrap()]);
    let mut fe = RawFrontend::connect(&vubd.socket, 256, 0);
    let chains: Vec<Vec<Desc>> = (0..8u64)
        .map(|i| {
            let hdr = HDR + 16 * i;
            fe.write_header(hdr, IN, 8 * i);
            vec![r(hdr, 16), w(BUF + 4096 * i, 4096), w(STATUS + i, 1)]
        })
        .collect();
    fe.take_notifications();
    fe.submit_batch(&chains);
    fe.wait_used_count(8);
    assert_eq!(fe.take_notifications(), 2, "first half, then the rest");
    for i in 0..8usize {
        let at = i * 4096;
        assert_eq!(read_guest(&fe, BUF + at as u64, 4096), model[at..at + 4096]);
        assert_eq!(read_guest(&fe, STATUS + i as u64, 1), [S_OK]);
    }
    drop(fe);
    vubd.stop();
}

#[test]
fn chains_without_a_status_byte_are_returned_and_the_queue_goes_on() {
    let s = setup("no-status", &[]);
    let mut fe = s.frontend();
    fe.write_header(HDR, IN, 0);
    // Nothing writable: dropped, but the descriptors come back with length 0.
    let head = fe.submit(&[r(HDR, 16), r(BUF, 512)]);
    assert_eq!(
        fe.wait_used(),
        Used {
            id: u32::from(head),
            len: 0
        }
    );
    // Status outside guest memory: same.
    let head = fe.submit(&[r(HDR, 16), w(MEM_SIZE + 4096, 1)]);
    assert_eq!(
        fe.wait_used(),
        Used {
            id: u32::from(head),
            len: 0
        }
    );
    // The queue still serves requests.
    fe.write_header(HDR, FLUSH, 0);
    let (_, status) = fe.request(&[r(HDR, 16), w(STATUS, 1)], STATUS);
    assert_eq!(status, S_OK);
    drop(fe);
    s.finish();
}

#[test]
fn writes_to_a_read_only_device_fail_with_ioerr() {
    let s = setup("ro-write", &["--readonly"]);
    let mut fe = s.frontend();
    fe.mem
        .write_slice(&[0x77; 4096], GuestAddress(BUF))
        .unwrap();
    fe.write_header(HDR, OUT, 0);
    let (_, status) = fe.request(&[r(HDR, 16), r(BUF, 4096), w(STATUS, 1)], STATUS);
    assert_eq!(status, S_IOERR);
    fe.write_header(HDR, WRITE_ZEROES, 0);
    fe.mem.write_obj(0u64, GuestAddress(BUF)).unwrap();
    fe.mem
        .write_obj(8u32.to_le(), GuestAddress(BUF + 8))
        .unwrap();
    fe.mem.write_obj(0u32, GuestAddress(BUF + 12)).unwrap();
    let (_, status) = fe.request(&[r(HDR, 16), r(BUF, 16), w(STATUS, 1)], STATUS);
    assert_eq!(status, S_IOERR);
    // Reads work.
    fe.write_header(HDR, IN, 0);
    let (_, status) = fe.request(&[r(HDR, 16), w(BUF, 4096), w(STATUS, 1)], STATUS);
    assert_eq!(status, S_OK);
    assert_eq!(read_guest(&fe, BUF, 4096), s.model[..4096]);
    drop(fe);
    s.finish();
}

#[test]
fn indirect_descriptors_are_followed() {
    let mut s = setup("indirect", &[]);
    let mut fe = RawFrontend::connect(&s.vubd.socket, 256, 1 << 28);
    assert!(
        fe.features & (1 << 28) != 0,
        "VIRTIO_RING_F_INDIRECT_DESC is offered"
    );
    let table = DATA + 0x40_0000;
    let data = common::pattern(8192, 12);
    fe.mem.write_slice(&data, GuestAddress(BUF)).unwrap();
    fe.write_header(HDR, OUT, 8);
    // An indirect table of header, two data buffers and status.
    let entries = [
        (HDR, 16, 0u16),
        (BUF, 4096, 0),
        (BUF + 4096, 4096, 0),
        (STATUS, 1, 2),
    ];
    for (i, (addr, len, flags)) in entries.iter().enumerate() {
        let at = table + 16 * i as u64;
        let next_flag = if i + 1 < entries.len() { 1 } else { 0 };
        fe.mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
        fe.mem
            .write_obj((*len as u32).to_le(), GuestAddress(at + 8))
            .unwrap();
        fe.mem
            .write_obj((flags | next_flag).to_le(), GuestAddress(at + 12))
            .unwrap();
        fe.mem
            .write_obj((i as u16 + 1).to_le(), GuestAddress(at + 14))
            .unwrap();
    }
    fe.write_desc(
        0,
        table,
        16 * entries.len() as u32,
        VRING_DESC_F_INDIRECT,
        0,
    );
    fe.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    fe.push_avail(0);
    assert_eq!(fe.wait_used(), Used { id: 0, len: 1 });
    assert_eq!(read_guest(&fe, STATUS, 1), [S_OK]);
    s.model[4096..4096 + 8192].copy_from_slice(&data);
    drop(fe);
    s.finish();
}

#[test]
fn a_looping_chain_or_a_broken_ring_does_not_hang_the_daemon() {
    broken_rings(&[]);
}

#[test]
fn a_broken_ring_does_not_keep_a_polling_queue_spinning() {
    broken_rings(&["--poll-us", "1000"]);
}

/// CPU time (user + system) the process has used.
fn cpu_time(pid: i32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

fn broken_rings(extra: &[&str]) {
    let s = setup("loop", extra);
    {
        let mut fe = s.frontend();
        // Descriptor 0 chains to itself forever.
        fe.write_header(HDR, IN, 0);
        fe.write_desc(0, HDR, 16, 1, 0);
        fe.push_avail(0);
        // It is cut at the queue size and answered (as a chain without status, dropped).
        let used = fe.wait_used();
        assert_eq!(used.id, 0);
        // A head index outside the ring, then an avail index far ahead of the ring.
        fe.push_avail(4000);
        assert!(fe.wait_used_for(Duration::from_millis(300)).is_none());
        fe.set_avail_idx(1000);
        assert!(fe.wait_used_for(Duration::from_millis(300)).is_none());
        // The queue waits for the next kick rather than spinning on the ring: a spinning
        // thread would use the whole second (or, on a crowded machine, a good share of it).
        let before = cpu_time(s.vubd.pid());
        std::thread::sleep(Duration::from_secs(1));
        let used = cpu_time(s.vubd.pid()) - before;
        assert!(
            used < Duration::from_millis(200),
            "vubd used {used:?} of CPU while idle"
        );
    }
    // The daemon is alive and serves the next frontend.
    let mut client = BlkioClient::connect(&s.vubd.socket, 1).unwrap();
    assert_eq!(client.read(0, 0, 4096).unwrap(), s.model[..4096]);
    drop(client);
    s.finish();
}

#[test]
fn the_guest_can_switch_to_writethrough() {
    let mut s = setup("writethrough", &[]);
    let mut fe = s.frontend();
    fe.set_config(32, &[0]).expect("SET_CONFIG writeback=0");
    assert_eq!(fe.config(32, 1), [0], "writeback reads back as 0");
    // Writes still complete (each is made stable before it does).
    let data = common::pattern(8192, 40);
    fe.mem.write_slice(&data, GuestAddress(BUF)).unwrap();
    fe.write_header(HDR, OUT, 64);
    let (_, status) = fe.request(&[r(HDR, 16), r(BUF, 8192), w(STATUS, 1)], STATUS);
    assert_eq!(status, S_OK);
    s.model[64 * 512..64 * 512 + 8192].copy_from_slice(&data);
    // Only the writeback byte is writable: writes elsewhere change nothing.
    let before = fe.config(0, 60);
    fe.set_config(0, &[0; 8]).unwrap();
    fe.set_config(33, &[0xff; 8]).unwrap();
    assert_eq!(fe.config(0, 60), before);
    fe.set_config(30, &[0, 0, 1, 0]).unwrap();
    assert_eq!(fe.config(32, 1), [1], "writeback set back to 1");
    drop(fe);
    s.finish();
}
