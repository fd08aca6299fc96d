//! In-flight I/O tracking across backend crashes (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`,
//! vhost-user.rst "Inflight I/O tracking", split rings), driven the way QEMU drives it: one
//! `GET_INFLIGHT_FD` when the device starts, the file kept by the frontend, and after vubd dies
//! a new connection with `SET_INFLIGHT_FD` of that file and the ring resumed at the used ring's
//! index (what QEMU sets when `GET_VRING_BASE` cannot reach the dead backend).
//!
//! Each round makes one batch available with a single index update: a large write `S` first,
//! then small reads of known disk ranges. As soon as anything is on the used ring, vubd gets
//! SIGKILL — ideally with `S` still running and later reads done, the case where a backend that
//! only remembered "everything after the last used entry" would lose or repeat requests. With
//! vubd dead the test checks that the region and the used ring agree on every head of the
//! batch, then does what a driver may: overwrites the completed reads' buffers with a canary and
//! reuses their descriptor heads for new requests. A new vubd must then finish exactly what was
//! in flight, once, and the new requests, once: the canaries survive, `S` is on disk, every read
//! returns the disk's bytes and every status is OK.

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::data::assert_same;
use common::hostile::{self, Served};
use common::raw_frontend::{
    connect_with_deadline, memfd, negotiate, r, set_inflight, shared_memory, w, InflightFd,
    RawFrontend, Used, VhostUserInflight, DATA, MEM_SIZE,
};
use common::{create_image, pattern, wait_unlocked, TempDir, Vubd};
use vm_memory::{Bytes, GuestAddress};

const DISK: usize = 64 << 20;
const QUEUE_SIZE: u16 = 128;
const ROUNDS: u16 = 8;
/// Small reads made available after `S` in each batch.
const READS: usize = 16;
/// `S`: long enough that the reads after it finish first.
const BIG: usize = 8 << 20;
/// How long vubd may take to put everything on the used ring, or to tidy its region.
const DEADLINE: Duration = Duration::from_secs(10);

const IN: u32 = 0;
const OUT: u32 = 1;
const S_OK: u8 = 0;
const CANARY: u8 = 0xEE;

/// Guest memory: 32 MiB, the rings below `DATA`; then per request slot a 16-byte header, a
/// status byte and (slots 1..) a 4 KiB buffer; `S`'s buffer (slot 0) in the upper half.
const MEM: u64 = 32 << 20;
const HDRS: u64 = DATA;
const STATUS: u64 = DATA + 0x1000;
const BUFS: u64 = DATA + 0x10_0000;
const BIG_BUF: u64 = 16 << 20;

/// libvhost-user's bytes per queue in the in-flight file: 16 per descriptor plus 2, rounded
/// up to 64 (always room for the 16-byte header).
fn queue_stride(queue_size: u16) -> u64 {
    (16 * u64::from(queue_size) + 2).next_multiple_of(64)
}

/// One queue's in-flight region as the frontend reads it from the kept file.
struct Region {
    version: u16,
    desc_num: u16,
    used_idx: u16,
    /// Per head: its `inflight` flag and its `counter`.
    desc: Vec<(bool, u64)>,
}

impl Region {
    fn read(inflight: &InflightFd) -> Region {
        let mut raw = vec![0u8; 16 + 16 * usize::from(QUEUE_SIZE)];
        let at = inflight.info.mmap_offset;
        inflight
            .file
            .read_exact_at(&mut raw, at)
            .expect("read the in-flight region");
        let u16_at = |at: usize| u16::from_le_bytes([raw[at], raw[at + 1]]);
        let desc = raw[16..].chunks(16);
        let desc = desc.map(|d| (d[0] != 0, u64::from_le_bytes(d[8..].try_into().unwrap())));
        Region {
            version: u16_at(8),
            desc_num: u16_at(10),
            used_idx: u16_at(14),
            desc: desc.collect(),
        }
    }

    fn marked(&self, head: u16) -> bool {
        self.desc[usize::from(head)].0
    }

    fn marked_heads(&self) -> Vec<u16> {
        (0..QUEUE_SIZE).filter(|h| self.marked(*h)).collect()
    }
}

#[derive(Clone, Debug)]
enum Kind {
    Write(Vec<u8>),
    Read(usize),
}

/// One request: its descriptor head, its slot of guest memory, and what it does at `offset`.
#[derive(Clone, Debug)]
struct Req {
    head: u16,
    slot: u64,
    offset: u64,
    kind: Kind,
}

impl Req {
    fn new(head: u16, slot: u64, offset: u64, kind: Kind) -> Req {
        Req {
            head,
            slot,
            offset,
            kind,
        }
    }

    fn hdr(&self) -> u64 {
        HDRS + 16 * self.slot
    }

    fn status(&self) -> u64 {
        STATUS + self.slot
    }

    fn buf(&self) -> u64 {
        if self.slot == 0 {
            BIG_BUF
        } else {
            BUFS + 4096 * self.slot
        }
    }

    fn len(&self) -> usize {
        match &self.kind {
            Kind::Write(data) => data.len(),
            Kind::Read(len) => *len,
        }
    }

    fn is_read(&self) -> bool {
        matches!(self.kind, Kind::Read(_))
    }

    /// What the used ring must say for it: the status byte, plus the data for a read.
    fn used(&self) -> Used {
        let data = if self.is_read() { self.len() as u32 } else { 0 };
        Used {
            id: u32::from(self.head),
            len: data + 1,
        }
    }

    /// Write header, data and chain (header, data, status) and put the head in the next
    /// avail slot, unpublished.
    fn add(&self, fe: &mut RawFrontend) {
        let (kind, data) = match &self.kind {
            Kind::Write(data) => {
                fe.mem.write_slice(data, GuestAddress(self.buf())).unwrap();
                (OUT, r(self.buf(), data.len() as u32))
            }
            Kind::Read(len) => (IN, w(self.buf(), *len as u32)),
        };
        fe.write_header(self.hdr(), kind, self.offset / 512);
        fe.mem
            .write_obj(0xffu8, GuestAddress(self.status()))
            .unwrap();
        fe.write_chain_at(self.head, &[r(self.hdr(), 16), data, w(self.status(), 1)]);
        fe.add_avail(self.head);
    }

    fn status_byte(&self, fe: &RawFrontend) -> u8 {
        fe.mem.read_obj(GuestAddress(self.status())).unwrap()
    }

    fn assert_ok(&self, fe: &RawFrontend, round: u16) {
        let status = self.status_byte(fe);
        assert_eq!(status, S_OK, "round {round}: status of {self:?}");
    }
}

/// Deterministic choices for a round.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A read of 512 B to 4 KiB at a sector outside `avoid` (byte ranges being written).
    fn read(&mut self, avoid: &[(u64, usize)]) -> (u64, usize) {
        loop {
            let len = 512 * (1 + self.next() % 8) as usize;
            let offset = 512 * (self.next() % (DISK as u64 / 512 - 8));
            let clear = avoid
                .iter()
                .all(|&(at, n)| offset + len as u64 <= at || at + n as u64 <= offset);
            if clear {
                return (offset, len);
            }
        }
    }
}

/// Start vubd on `socket` serving `image`; the same arguments every time.
fn start(socket: &Path, image: &Path) -> Vubd {
    let image = image.to_str().expect("utf-8 path");
    // QUEUE_SIZE, one queue.
    Vubd::start(
        socket,
        &["--image", image, "--queue-size", "128", "--num-queues", "1"],
    )
}

/// The image file's bytes at `offset`.
fn file_bytes(image: &File, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    image.read_exact_at(&mut buf, offset).expect("read image");
    buf
}

/// Spin on the used ring until it moves past `from`, then SIGKILL vubd and wait for it to be
/// gone (only then can nothing change the ring or the region any more).
fn kill_at_first_completion(fe: &RawFrontend, vubd: &mut Vubd, from: u16, round: u16) {
    let deadline = Instant::now() + DEADLINE;
    while fe.used_idx() == from {
        assert!(
            Instant::now() < deadline,
            "round {round}: nothing used in {DEADLINE:?}"
        );
        std::hint::spin_loop();
    }
    let (status, stderr) = vubd.stop_with(libc::SIGKILL);
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "round {round}: vubd ended on its own ({status}): {stderr}"
    );
}

/// What vubd left of a round's batch when it was killed.
struct Crash {
    /// Heads on the used ring.
    done: Vec<u16>,
    /// Heads on the used ring that the region still marks in flight (see below).
    done_marked: Vec<u16>,
    /// Heads the region marks in flight and the used ring does not have, in avail order.
    in_flight: Vec<u16>,
    /// Heads vubd never popped, in avail order.
    unpopped: Vec<u16>,
}

/// Check the region against the used ring's entries `used` (from position `from`) after the
/// kill, and sort the batch's heads by what became of them.
///
/// Every head vubd popped is on the used ring or marked in flight, and not both — except in
/// the publish window the specification allows for: a batch of heads is put on the used ring
/// first, cleared in the region next, and the region's `used_idx` catches up last, so a head
/// on the ring at or after the region's `used_idx` may still be marked (recovery clears it by
/// walking the batch list). Heads are popped in avail order, so the popped ones are a prefix of
/// the batch; the rest must be untouched (vubd resumes at used idx + heads in flight, which is
/// exactly where they are). Counters of heads in flight increase in avail order.
fn check_crash(batch: &[Req], used: &[Used], from: u16, region: &Region, round: u16) -> Crash {
    let ring = from.wrapping_add(used.len() as u16);
    assert_eq!(region.version, 1, "round {round}: region version");
    assert_eq!(
        region.desc_num, QUEUE_SIZE,
        "round {round}: region desc_num"
    );
    let behind = ring.wrapping_sub(region.used_idx);
    assert!(
        usize::from(behind) <= used.len(),
        "round {round}: region used_idx {} outside the round's used entries {from}..={ring}",
        region.used_idx
    );
    // Used ring entries from `window` on are not yet covered by the region's `used_idx`.
    let window = used.len() - usize::from(behind);
    let mut on_ring = HashMap::new();
    for (pos, entry) in used.iter().enumerate() {
        let req = batch.iter().find(|q| u32::from(q.head) == entry.id);
        let req = req.unwrap_or_else(|| panic!("round {round}: {entry:?} is not in the batch"));
        assert_eq!(*entry, req.used(), "round {round}: used element");
        let again = on_ring.insert(req.head, pos);
        assert!(
            again.is_none(),
            "round {round}: head {} used twice",
            req.head
        );
    }
    for head in region.marked_heads() {
        assert!(
            batch.iter().any(|q| q.head == head),
            "round {round}: head {head} marked in flight but not made available this round"
        );
    }
    let mut crash = Crash {
        done: on_ring.keys().copied().collect(),
        done_marked: Vec::new(),
        in_flight: Vec::new(),
        unpopped: Vec::new(),
    };
    let mut popped = 0;
    for (i, req) in batch.iter().enumerate() {
        let marked = region.marked(req.head);
        match on_ring.get(&req.head) {
            Some(&pos) if marked => {
                assert!(
                    pos >= window,
                    "round {round}: head {} is used (entry {}) and still marked in flight, \
                     though the region's used_idx {} says its publish completed",
                    req.head,
                    from.wrapping_add(pos as u16),
                    region.used_idx
                );
                crash.done_marked.push(req.head);
            }
            Some(_) => {}
            None if marked => crash.in_flight.push(req.head),
            None => {
                crash.unpopped.push(req.head);
                continue;
            }
        }
        assert_eq!(
            popped, i,
            "round {round}: popped heads are not a prefix of the batch"
        );
        popped += 1;
    }
    let counters: Vec<u64> = crash
        .in_flight
        .iter()
        .map(|h| region.desc[usize::from(*h)].1)
        .collect();
    assert!(
        counters.windows(2).all(|c| c[0] < c[1]),
        "round {round}: counters of heads in flight {:?} not in avail order: {counters:?}",
        crash.in_flight
    );
    crash
}

/// Poll `done` until it holds, or fail after [`DEADLINE`] saying `what` is not so.
fn wait_until(mut done: impl FnMut() -> bool, what: impl Fn() -> String) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "{} after {DEADLINE:?}", what());
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Wait until the used ring reaches `target` and stays there a moment: a request run twice
/// would take it further.
fn wait_used(fe: &RawFrontend, target: u16, outstanding: u16, round: u16) {
    let missing = || {
        let missing = target.wrapping_sub(fe.used_idx());
        assert!(
            missing <= outstanding,
            "round {round}: used index past {target}: more completions than requests"
        );
        missing
    };
    let what = || format!("round {round}: {} of {outstanding} not used", missing());
    wait_until(|| missing() == 0, what);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        missing(),
        0,
        "round {round}: completions after the last request"
    );
}

#[test]
fn sigkilled_backend_resubmits_exactly_what_was_in_flight() {
    let dir = TempDir::new("inflight-restart");
    let image_path = dir.join("disk.raw");
    let socket = dir.join("vubd.sock");
    let mut model = create_image(&image_path, DISK, 0x1f1);
    let image = File::open(&image_path).expect("open image");
    let mut vubd = start(&socket, &image_path);

    let mem = shared_memory(&[(0, MEM)]);
    let (mut fe, inflight) = RawFrontend::connect_inflight(&socket, QUEUE_SIZE, 0, mem, |got| {
        let info = got.info;
        let reply = (info.mmap_size, info.mmap_offset, info.num_queues);
        let expected = (queue_stride(QUEUE_SIZE), 0, 1);
        assert_eq!(reply, expected, "GET_INFLIGHT_FD reply");
        assert_eq!(info.queue_size, QUEUE_SIZE, "GET_INFLIGHT_FD reply");
        let mut bytes = vec![0xffu8; info.mmap_size as usize];
        got.file.read_exact_at(&mut bytes, 0).expect("region");
        assert!(bytes.iter().all(|b| *b == 0), "a new region is zeroed");
    });

    let mut out_of_order = 0;
    for round in 0..ROUNDS {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ u64::from(round + 1));
        let seed = u64::from(round);
        let big = (seed % 4 * BIG as u64, pattern(BIG, 0xb16 + seed));
        let small = ((32 << 20) + seed * 8192, pattern(4096, 0x5a1 + seed));
        let avoid = [(big.0, BIG), (small.0, 4096)];
        // Heads move each round, so each round's batch starts in another part of the table.
        let head = |i: u16| (round * 37 + 3 * i) % QUEUE_SIZE;
        // `S`, then reads outside what the round writes.
        let mut batch = vec![Req::new(head(0), 0, big.0, Kind::Write(big.1.clone()))];
        for i in 1..=READS as u16 {
            let (offset, len) = rng.read(&avoid);
            batch.push(Req::new(head(i), i.into(), offset, Kind::Read(len)));
        }

        // 1. One batch, one index update; kill vubd at its first completion.
        let from = fe.used_idx();
        assert_eq!(from, fe.next_avail(), "round {round}: the ring is idle");
        for req in &batch {
            req.add(&mut fe);
        }
        fe.publish_avail();
        kill_at_first_completion(&fe, &mut vubd, from, round);
        let ring = fe.used_idx();
        let used: Vec<Used> = (0..ring.wrapping_sub(from))
            .map(|i| fe.used_at(from.wrapping_add(i)))
            .collect();

        // 2. The region and the used ring agree.
        let crash = check_crash(&batch, &used, from, &Region::read(&inflight), round);
        let done: Vec<&Req> = batch
            .iter()
            .filter(|q| crash.done.contains(&q.head))
            .collect();
        for req in &done {
            req.assert_ok(&fe, round);
        }
        let s_in_flight = !crash.done.contains(&batch[0].head);
        out_of_order += u32::from(s_in_flight);

        // 3. The driver owns what is used: canaries in completed reads' buffers, and their
        // heads reused for new requests — heads still marked (the publish window) first.
        for req in done.iter().filter(|q| q.is_read()) {
            let canary = vec![CANARY; req.len()];
            fe.mem
                .write_slice(&canary, GuestAddress(req.buf()))
                .unwrap();
        }
        let mut free = crash.done_marked.clone();
        free.extend(crash.done.iter().filter(|h| !crash.done_marked.contains(h)));
        free.extend((0..2).map(|i| head(READS as u16 + 1 + i)));
        let (offset, len) = rng.read(&avoid);
        let slot = READS as u64 + 1;
        let new = [
            Req::new(free[0], slot, small.0, Kind::Write(small.1.clone())),
            Req::new(free[1], slot + 1, offset, Kind::Read(len)),
        ];
        for req in &new {
            req.add(&mut fe);
        }
        fe.publish_avail();

        // 4. A new vubd on the kept region, resuming at the used index.
        let lingered = wait_unlocked(&image);
        vubd = start(&socket, &image_path);
        fe.reconnect(&socket, &inflight, ring);
        // A started ring that is not enabled passes nothing, resubmissions included (they
        // would complete before the guest could be told, as with QEMU's order of messages).
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            fe.used_idx(),
            ring,
            "round {round}: the ring moved before it was enabled"
        );
        fe.enable();
        fe.kick();
        let target = fe.next_avail();
        let pending: Vec<u16> = crash
            .in_flight
            .iter()
            .chain(&crash.unpopped)
            .copied()
            .collect();
        let outstanding = (pending.len() + new.len()) as u16;
        wait_used(&fe, target, outstanding, round);

        // 5. Exactly the pending and the new requests completed after the restart, once each.
        let mut after: Vec<(u32, u32)> = (0..outstanding)
            .map(|i| fe.used_at(ring.wrapping_add(i)))
            .map(|u| (u.id, u.len))
            .collect();
        let mut expected: Vec<(u32, u32)> = batch
            .iter()
            .filter(|q| pending.contains(&q.head))
            .chain(&new)
            .map(|q| (q.used().id, q.used().len))
            .collect();
        after.sort_unstable();
        expected.sort_unstable();
        assert_eq!(
            after, expected,
            "round {round}: used (head, length) after the restart"
        );
        for req in batch.iter().chain(&new) {
            req.assert_ok(&fe, round);
            let got = hostile::read_guest(&fe, req.buf(), req.len());
            let what = format!("round {round}: head {} at {:#x}", req.head, req.offset);
            match &req.kind {
                Kind::Read(len) if done.iter().any(|q| q.slot == req.slot) => {
                    assert_same(&got, &vec![CANARY; *len], &format!("{what}: canary"));
                }
                Kind::Read(len) => {
                    let at = req.offset as usize;
                    assert_same(&got, &model[at..at + len], &format!("{what}: read"));
                }
                Kind::Write(data) => {
                    let on_disk = file_bytes(&image, req.offset, data.len());
                    assert_same(&on_disk, data, &format!("{what}: written"));
                }
            }
        }
        for (offset, data) in [&big, &small] {
            model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
        }
        // What an idle backend leaves once its last publish is complete.
        let idle = || {
            let region = Region::read(&inflight);
            (region.used_idx, region.marked_heads())
        };
        let what = || {
            format!(
                "round {round}: idle, yet (used_idx, in flight) is {:?}",
                idle()
            )
        };
        wait_until(|| idle() == (target, Vec::new()), what);
        eprintln!(
            "round {round}: at the kill {} done ({} of them still marked), S {}, {} in flight, \
             {} not popped; image lock held {lingered:?} after the kill",
            crash.done.len(),
            crash.done_marked.len(),
            if s_in_flight { "in flight" } else { "done" },
            crash.in_flight.len(),
            crash.unpopped.len(),
        );
    }

    drop(fe);
    let stderr = vubd.stop();
    assert!(!stderr.contains("panicked"), "vubd panicked: {stderr}");
    let disk = std::fs::read(&image_path).expect("read image");
    assert_same(&disk, &model, "disk after the last round");
    assert!(
        out_of_order > 0,
        "no round of {ROUNDS} was killed with S in flight and a later request done"
    );
}

/// A `SET_INFLIGHT_FD` whose file cannot hold what it claims (or what one queue needs) is
/// refused — the frontend is untrusted, and mapping past a file's end would kill vubd with
/// SIGBUS at the first access — and vubd goes on serving the next frontend.
#[test]
fn set_inflight_fd_with_a_short_file_is_refused() {
    let mut s = Served::start("inflight-short", &["--num-queues", "1"]);
    let queue_size = hostile::QUEUE_SIZE;
    let stride = queue_stride(queue_size);
    // (what, file length, mmap_size, mmap_offset)
    let cases = [
        ("file shorter than mmap_size", stride - 64, stride, 0),
        ("mmap_size below one queue", stride - 64, stride - 64, 0),
        ("region past the end of the file", stride, stride, 4096),
        ("empty file", 0, stride, 0),
    ];
    for (what, file_len, mmap_size, mmap_offset) in cases {
        let mut frontend = connect_with_deadline(s.socket());
        negotiate(&mut frontend, 0, true);
        let info = VhostUserInflight::new(mmap_size, mmap_offset, 1, queue_size);
        let file = memfd(file_len);
        let refused = set_inflight(&mut frontend, &InflightFd { file, info });
        assert!(refused.is_err(), "{what}: SET_INFLIGHT_FD accepted");
        drop(frontend);
        s.assert_running(what);
        s.assert_serves(what);
    }

    // A frontend that does it right is still served with in-flight tracking.
    let mem = shared_memory(&[(0, MEM_SIZE)]);
    let (mut fe, _inflight) = RawFrontend::connect_inflight(s.socket(), queue_size, 0, mem, |_| ());
    fe.write_header(DATA, 0, 8);
    let chain = [r(DATA, 16), w(DATA + 4096, 4096), w(DATA + 16, 1)];
    let (used, status) = fe.request(&chain, DATA + 16);
    assert_eq!(
        (used.len, status),
        (4097, S_OK),
        "read with in-flight tracking"
    );
    let got = hostile::read_guest(&fe, DATA + 4096, 4096);
    assert_same(&got, &s.model[4096..8192], "read with in-flight tracking");
    drop(fe);
    s.finish();
}
