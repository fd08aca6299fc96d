//! Harness for the hostile-frontend suites: a vubd serving a small raw image beside the model
//! of what the image must hold, snapshots of guest memory to prove that a refused request wrote
//! nothing outside its device-writable buffers, and the check that vubd still serves a
//! well-behaved frontend afterwards — with deadlines, since a stuck vubd must fail the test
//! rather than hang it.

use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::blkio_client::BlkioClient;
use super::data::assert_same;
use super::raw_frontend::{RawFrontend, Used, AVAIL, DATA, USED};
use super::{create_image, pattern, TempDir, Vubd};

/// Size of the image the suites serve.
pub const DISK: usize = 1 << 20;
/// Queue size vubd offers and the raw frontend sets up.
pub const QUEUE_SIZE: u16 = 256;
/// VIRTIO_RING_F_INDIRECT_DESC.
pub const INDIRECT_DESC: u64 = 1 << 28;

/// A vubd serving `disk.raw`, and what the disk must contain.
pub struct Served {
    pub dir: TempDir,
    pub vubd: Vubd,
    pub image: PathBuf,
    pub model: Vec<u8>,
}

impl Served {
    /// Serve a `DISK`-byte image of pseudo-random bytes with `extra` options.
    pub fn start(name: &str, extra: &[&str]) -> Served {
        let dir = TempDir::new(name);
        let image = dir.join("disk.raw");
        let model = create_image(&image, DISK, 0x5eed);
        let queue_size = QUEUE_SIZE.to_string();
        let mut args = vec![
            "--image",
            image.to_str().expect("utf-8 path"),
            "--queue-size",
            &queue_size,
        ];
        args.extend_from_slice(extra);
        let vubd = Vubd::start(&dir.join("vubd.sock"), &args);
        Served {
            dir,
            vubd,
            image,
            model,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.vubd.socket
    }

    /// A raw frontend on queue 0, with indirect descriptors negotiated.
    pub fn frontend(&self) -> RawFrontend {
        let fe = RawFrontend::connect(self.socket(), QUEUE_SIZE, INDIRECT_DESC);
        assert!(fe.features & INDIRECT_DESC != 0, "indirect descriptors");
        fe
    }

    /// The image file holds exactly the model (vubd caches nothing: `--cache writeback` is
    /// the page cache, which a read of the file sees).
    pub fn assert_disk(&self, what: &str) {
        let disk = fs::read(&self.image).expect("read image");
        assert_same(&disk, &self.model, &format!("{what}: disk image"));
    }

    /// vubd is alive, accepts a new frontend and serves it: the whole disk reads back as the
    /// model, and a write lands where it should. Fails after `DEADLINE` instead of hanging.
    pub fn assert_serves(&mut self, what: &str) {
        self.assert_running(what);
        let socket = self.socket().to_path_buf();
        let model = self.model.clone();
        let offset = 3 * 4096;
        let data = pattern(4096, model[0] as u64 + 7);
        let written = data.clone();
        within(what, move || {
            let mut client = BlkioClient::connect(&socket, 1).expect("libblkio connects");
            let disk = client.read_all(0, DISK).expect("read the whole disk");
            assert_same(&disk, &model, "disk read through a new frontend");
            client.write(0, offset as u64, &written).expect("write");
            assert_eq!(client.read(0, offset as u64, 4096).expect("read"), written);
        });
        self.model[offset..offset + 4096].copy_from_slice(&data);
        self.assert_disk(what);
    }

    /// The vubd process has not exited.
    pub fn assert_running(&mut self, what: &str) {
        assert!(
            self.vubd.running(),
            "{what}: vubd exited: {}",
            self.vubd.take_stderr()
        );
    }

    /// Stop vubd (it must exit cleanly and without a panic) and compare the image with the
    /// model one last time.
    pub fn finish(mut self) {
        let stderr = self.vubd.stop();
        assert!(!stderr.contains("panicked"), "vubd panicked: {stderr}");
        self.assert_disk("after shutdown");
    }
}

/// How long a frontend may wait for vubd to answer before the test calls it stuck.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Run `f` on a thread and fail if it does not finish within [`DEADLINE`]. A thread stuck on
/// a vubd that no longer answers is released when the test's `Vubd` is dropped (killed).
pub fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(value) => value,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: vubd did not serve a new frontend within {DEADLINE:?}")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            panic!("{what}: the new frontend failed (see its panic above)")
        }
    }
}

/// Guest memory as it was before a request was made available.
pub struct Snapshot {
    regions: Vec<(u64, Vec<u8>)>,
}

impl Snapshot {
    /// Take it after the chain and its avail ring slot are written, before publishing.
    pub fn take(fe: &RawFrontend) -> Snapshot {
        let regions = fe
            .mem
            .iter()
            .map(|region| {
                let start = region.start_addr().0;
                let mut bytes = vec![0u8; region.len() as usize];
                fe.mem
                    .read_slice(&mut bytes, GuestAddress(start))
                    .expect("read guest memory");
                (start, bytes)
            })
            .collect();
        Snapshot { regions }
    }

    /// Panic if any byte of guest memory changed outside `allowed` (guest address ranges: the
    /// request's device-writable buffers, or less), the used ring (the device's to write) and
    /// the avail index (the driver's own publication).
    pub fn assert_unchanged_except(&self, fe: &RawFrontend, allowed: &[Range<u64>], what: &str) {
        let qs = u64::from(fe.queue_size());
        let mut allowed = allowed.to_vec();
        allowed.push(USED..USED + 6 + 8 * qs);
        allowed.push(AVAIL + 2..AVAIL + 4);
        let now = Snapshot::take(fe);
        for ((start, before), (_, after)) in self.regions.iter().zip(&now.regions) {
            const CHUNK: usize = 4096;
            for (i, (b, a)) in before.chunks(CHUNK).zip(after.chunks(CHUNK)).enumerate() {
                if a == b {
                    continue;
                }
                for (j, (x, y)) in b.iter().zip(a).enumerate() {
                    let addr = start + (i * CHUNK + j) as u64;
                    if x != y && !allowed.iter().any(|r| r.contains(&addr)) {
                        panic!(
                            "{what}: guest byte {addr:#x} changed from {x:#04x} to {y:#04x} \
                             outside the request's writable buffers"
                        );
                    }
                }
            }
        }
    }
}

/// `len` bytes at `addr` as a range, for [`Snapshot::assert_unchanged_except`].
pub fn span(addr: u64, len: u64) -> Range<u64> {
    addr..addr + len
}

/// Fill guest memory above the rings with a pattern, so that any byte the device writes, even
/// a zero, shows in a snapshot.
pub fn prime(fe: &RawFrontend) {
    for region in fe.mem.iter() {
        let start = region.start_addr().0.max(DATA);
        let end = region.start_addr().0 + region.len();
        if start < end {
            let fill = pattern((end - start) as usize, start ^ 77);
            fe.mem.write_slice(&fill, GuestAddress(start)).unwrap();
        }
    }
}

/// `len` bytes of guest memory at `addr`.
pub fn read_guest(fe: &RawFrontend, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    fe.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

/// Guest memory at `addr` holds `expected`.
pub fn assert_guest(fe: &RawFrontend, addr: u64, expected: &[u8], what: &str) {
    let got = read_guest(fe, addr, expected.len());
    assert_same(
        &got,
        expected,
        &format!("{what}: guest memory at {addr:#x}"),
    );
}

/// Make `head` available and check it comes back with used length 0 and that guest memory
/// did not change at all: what vubd does with a chain that has no trustworthy status byte.
pub fn assert_dropped(fe: &mut RawFrontend, head: u16, what: &str) {
    fe.add_avail(head);
    let snap = Snapshot::take(fe);
    fe.publish_avail();
    let used = fe.wait_used();
    let expected = Used {
        id: u32::from(head),
        len: 0,
    };
    assert_eq!(used, expected, "{what}: returned with nothing written");
    snap.assert_unchanged_except(fe, &[], what);
}

/// Make `head` available and check it is answered with `code` in the byte at `status`, used
/// length `used_len`, and no byte written outside `status` and `allowed`.
pub fn assert_answered(
    fe: &mut RawFrontend,
    head: u16,
    (status, code): (u64, u8),
    used_len: u32,
    allowed: &[Range<u64>],
    what: &str,
) {
    fe.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
    fe.add_avail(head);
    let snap = Snapshot::take(fe);
    fe.publish_avail();
    let used = fe.wait_used();
    assert_eq!(used.id, u32::from(head), "{what}: head");
    assert_eq!(used.len, used_len, "{what}: used length");
    let got: u8 = fe.mem.read_obj(GuestAddress(status)).unwrap();
    assert_eq!(got, code, "{what}: status");
    let mut allowed = allowed.to_vec();
    allowed.push(span(status, 1));
    snap.assert_unchanged_except(fe, &allowed, what);
}

/// A refused request: `code` in the status byte, used length 1, nothing else written.
pub fn assert_refused(fe: &mut RawFrontend, head: u16, status: u64, code: u8, what: &str) {
    assert_answered(fe, head, (status, code), 1, &[], what);
}
