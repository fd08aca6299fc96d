//! A minimal vhost-user-blk frontend that owns a split virtqueue in shared memory and can put
//! any descriptor chain on it — the way a buggy or hostile guest driver would.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVringAddrFlags,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion,
};
use vmm_sys_util::eventfd::EventFd;

pub type Mem = GuestMemoryMmap<()>;

/// Size of the shared guest memory (of its first region, when there are several).
pub const MEM_SIZE: u64 = 16 << 20;
/// Where the descriptor table, the available ring and the used ring of queue 0 are.
pub const DESC: u64 = 0x0;
pub const AVAIL: u64 = 0x4000;
pub const USED: u64 = 0x8000;
/// Where tests may put request headers, data and status bytes.
pub const DATA: u64 = 0x10_0000;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
pub const VRING_DESC_F_INDIRECT: u16 = 4;

/// One descriptor of a chain: guest address, length, device-writable or not.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

pub fn r(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: false,
    }
}

pub fn w(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: true,
    }
}

/// A used-ring element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    pub id: u32,
    pub len: u32,
}

/// How long a frontend made by [`RawFrontend::connect_inflight`] waits for any reply.
pub const REPLY_DEADLINE: Duration = Duration::from_secs(20);

/// The in-flight tracking file a frontend keeps across backend restarts, and how the backend
/// described it in its `GET_INFLIGHT_FD` reply (what `SET_INFLIGHT_FD` sends back).
pub struct InflightFd {
    pub file: File,
    pub info: VhostUserInflight,
}

pub struct RawFrontend {
    pub frontend: Frontend,
    pub mem: Mem,
    pub features: u64,
    queue_size: u16,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
    used_seen: u16,
    next_desc: u16,
}

impl RawFrontend {
    /// Connect and set up queue 0 with `queue_size` entries, offering `extra_features` on top
    /// of VERSION_1 and the protocol features.
    pub fn connect(socket: &Path, queue_size: u16, extra_features: u64) -> RawFrontend {
        Self::connect_regions(socket, queue_size, extra_features, &[(0, MEM_SIZE)])
    }

    /// Like [`RawFrontend::connect`], with guest memory made of one memfd per `(guest address,
    /// size)` region; the first region must start at 0 and hold the rings and [`DATA`].
    pub fn connect_regions(
        socket: &Path,
        queue_size: u16,
        extra_features: u64,
        regions: &[(u64, u64)],
    ) -> RawFrontend {
        let mem = shared_memory(regions);
        Self::try_connect_memory(socket, queue_size, extra_features, mem).expect("set_mem_table")
    }

    /// Connect with guest memory `mem` (from [`shared_memory`], possibly tampered with); an
    /// error if vubd refuses the memory table.
    pub fn try_connect_memory(
        socket: &Path,
        queue_size: u16,
        extra_features: u64,
        mem: Mem,
    ) -> vhost::Result<RawFrontend> {
        let frontend = Frontend::connect(socket, 1).expect("connect");
        Self::set_up(frontend, queue_size, extra_features, mem)
    }

    /// The usual set-up over a connection something else has already used (raw messages sent
    /// before it, see `vhost_msg`), with one memory region.
    pub fn over_stream(stream: UnixStream, queue_size: u16, extra_features: u64) -> RawFrontend {
        let frontend = Frontend::from_stream(stream, 1);
        let mem = shared_memory(&[(0, MEM_SIZE)]);
        Self::set_up(frontend, queue_size, extra_features, mem).expect("set_mem_table")
    }

    fn set_up(
        mut frontend: Frontend,
        queue_size: u16,
        extra_features: u64,
        mem: Mem,
    ) -> vhost::Result<RawFrontend> {
        let features = negotiate(&mut frontend, extra_features, false);
        let host = set_memory(&mut frontend, &mem)?;
        Ok(Self::started(frontend, mem, features, queue_size, host))
    }

    /// Start queue 0 on a connection whose memory table is set (at `host`), from ring index 0.
    fn started(
        mut frontend: Frontend,
        mem: Mem,
        features: u64,
        queue_size: u16,
        host: u64,
    ) -> Self {
        let call = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let kick = EventFd::new(0).expect("eventfd");
        start_ring(&mut frontend, queue_size, host, 0, &call, &kick);
        frontend
            .set_vring_enable(0, true)
            .expect("set_vring_enable");
        RawFrontend {
            frontend,
            mem,
            features,
            queue_size,
            kick,
            call,
            avail_idx: 0,
            used_seen: 0,
            next_desc: 0,
        }
    }

    /// Like [`RawFrontend::connect`], with the protocol features `extra_protocol` negotiated
    /// too (the backend must offer them), and every reply awaited for at most
    /// [`REPLY_DEADLINE`].
    pub fn connect_protocol(
        socket: &Path,
        queue_size: u16,
        extra_features: u64,
        extra_protocol: VhostUserProtocolFeatures,
    ) -> RawFrontend {
        let mut frontend = connect_with_deadline(socket);
        let features = negotiate_protocol(&mut frontend, extra_features, extra_protocol);
        let mem = shared_memory(&[(0, MEM_SIZE)]);
        let host = set_memory(&mut frontend, &mem).expect("set_mem_table");
        Self::started(frontend, mem, features, queue_size, host)
    }

    /// Send queue 0's ring addresses again ([`DESC`], [`AVAIL`], [`USED`]), as QEMU does when
    /// migration starts or ends: with `log`, `VHOST_VRING_F_LOG` and that guest address for
    /// the used ring's log. Waits for the backend's ack.
    pub fn set_ring_addr(&mut self, log: Option<u64>) -> vhost::Result<()> {
        let host = self
            .mem
            .get_host_address(GuestAddress(0))
            .expect("region at 0") as u64;
        let config = VringConfigData {
            queue_max_size: self.queue_size,
            queue_size: self.queue_size,
            flags: if log.is_some() {
                VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits()
            } else {
                0
            },
            desc_table_addr: host + DESC,
            used_ring_addr: host + USED,
            avail_ring_addr: host + AVAIL,
            log_addr: log,
        };
        self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let applied = self.frontend.set_vring_addr(0, &config);
        self.frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
        applied
    }

    /// SET_FEATURES with `features` (on a running device, as QEMU sets and clears `LOG_ALL`
    /// around a migration), waiting for the backend's ack.
    pub fn set_features(&mut self, features: u64) -> vhost::Result<()> {
        self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let applied = self.frontend.set_features(features);
        self.frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
        applied?;
        self.features = features;
        Ok(())
    }

    /// Connect the way QEMU starts a vhost-user-blk device with
    /// `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`: negotiate it, `GET_INFLIGHT_FD` for queue 0, then
    /// `SET_INFLIGHT_FD` with what came back, before the memory table and the ring. `inspect`
    /// sees the file as the backend handed it over, before the backend may use it. Returns the
    /// frontend and the file it must keep for [`RawFrontend::reconnect`]. Every reply is awaited
    /// for at most [`REPLY_DEADLINE`], so a stuck backend fails the test instead of hanging it.
    pub fn connect_inflight(
        socket: &Path,
        queue_size: u16,
        extra_features: u64,
        mem: Mem,
        inspect: impl FnOnce(&InflightFd),
    ) -> (RawFrontend, InflightFd) {
        let mut frontend = connect_with_deadline(socket);
        let features = negotiate(&mut frontend, extra_features, true);
        let asked = VhostUserInflight::new(0, 0, 1, queue_size);
        let (info, file) = frontend.get_inflight_fd(&asked).expect("GET_INFLIGHT_FD");
        let inflight = InflightFd { file, info };
        inspect(&inflight);
        set_inflight(&mut frontend, &inflight).expect("SET_INFLIGHT_FD");
        let host = set_memory(&mut frontend, &mem).expect("set_mem_table");
        let fe = Self::started(frontend, mem, features, queue_size, host);
        (fe, inflight)
    }

    /// Reconnect after the backend died, as QEMU does: a new connection with the same guest
    /// memory, ring addresses and eventfds, `SET_INFLIGHT_FD` with the kept file (no
    /// `GET_INFLIGHT_FD`), and the ring resuming at `base` — QEMU's choice, the used ring's
    /// index, when `GET_VRING_BASE` could not reach the dead backend. Leaves the ring started
    /// but not yet enabled (call [`RawFrontend::enable`]), and does not kick.
    pub fn reconnect(&mut self, socket: &Path, inflight: &InflightFd, base: u16) {
        let mut frontend = connect_with_deadline(socket);
        let features = negotiate(&mut frontend, self.features, true);
        assert_eq!(
            features, self.features,
            "the new backend offers the same features"
        );
        set_inflight(&mut frontend, inflight).expect("SET_INFLIGHT_FD on reconnect");
        let host = set_memory(&mut frontend, &self.mem).expect("set_mem_table on reconnect");
        start_ring(
            &mut frontend,
            self.queue_size,
            host,
            base,
            &self.call,
            &self.kick,
        );
        self.frontend = frontend;
    }

    /// Read `size` bytes of config space at `offset`.
    pub fn config(&mut self, offset: u32, size: u32) -> Vec<u8> {
        let buf = vec![0u8; size as usize];
        let (_, data) = self
            .frontend
            .get_config(offset, size, VhostUserConfigFlags::WRITABLE, &buf)
            .expect("get_config");
        data
    }

    /// Write `data` into config space at `offset`.
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> vhost::Result<()> {
        self.frontend
            .set_config(offset, VhostUserConfigFlags::WRITABLE, data)
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Write a raw 16-byte descriptor at table index `index`.
    pub fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.write_desc_in(DESC, index, addr, len, flags, next);
    }

    /// Write a raw 16-byte descriptor at index `index` of the table at guest address `table`
    /// (the queue's own, or an indirect one).
    pub fn write_desc_in(
        &self,
        table: u64,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = table + 16 * u64::from(index);
        self.mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
        self.mem
            .write_obj(len.to_le(), GuestAddress(at + 8))
            .unwrap();
        self.mem
            .write_obj(flags.to_le(), GuestAddress(at + 12))
            .unwrap();
        self.mem
            .write_obj(next.to_le(), GuestAddress(at + 14))
            .unwrap();
    }

    /// Make `head` available and kick.
    pub fn push_avail(&mut self, head: u16) {
        self.add_avail(head);
        self.publish_avail();
    }

    /// Put `head` in the next avail ring slot, not yet visible to the device.
    pub fn add_avail(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % self.queue_size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Make every added slot visible with one index update, and kick once.
    pub fn publish_avail(&mut self) {
        self.mem
            .store(
                self.avail_idx.to_le(),
                GuestAddress(AVAIL + 2),
                Ordering::Release,
            )
            .unwrap();
        self.kick.write(1).unwrap();
    }

    /// Set the avail index to any value and kick, as a hostile driver might.
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mem
            .store(idx.to_le(), GuestAddress(AVAIL + 2), Ordering::Release)
            .unwrap();
        self.kick.write(1).unwrap();
    }

    /// Put `chain` on the ring as a linked list of descriptors; returns the head index.
    pub fn submit(&mut self, chain: &[Desc]) -> u16 {
        let head = self.write_chain(chain);
        self.push_avail(head);
        head
    }

    /// Make all `chains` available at once, with one index update and one kick, as a driver
    /// batching its requests does.
    pub fn submit_batch(&mut self, chains: &[Vec<Desc>]) {
        for chain in chains {
            let head = self.write_chain(chain);
            self.add_avail(head);
        }
        self.publish_avail();
    }

    /// Write `chain` into the descriptor table; returns its head index.
    pub fn write_chain(&mut self, chain: &[Desc]) -> u16 {
        let head = self.next_desc;
        self.write_chain_at(head, chain);
        self.next_desc = (head + chain.len() as u16) % self.queue_size;
        head
    }

    /// Write `chain` into consecutive descriptors from `head` (wrapping at the table's end),
    /// as a driver reusing descriptors the device has returned does.
    pub fn write_chain_at(&self, head: u16, chain: &[Desc]) {
        assert!(
            chain.len() <= usize::from(self.queue_size),
            "a chain longer than the queue would overwrite itself"
        );
        for (i, d) in chain.iter().enumerate() {
            let index = (head + i as u16) % self.queue_size;
            let last = i + 1 == chain.len();
            let mut flags = if d.write { VRING_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT;
            }
            let next = (index + 1) % self.queue_size;
            self.write_desc(index, d.addr, d.len, flags, next);
        }
    }

    /// The driver's next available ring position (the avail index once published).
    pub fn next_avail(&self) -> u16 {
        self.avail_idx
    }

    /// Notify the device without changing the ring.
    pub fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    /// `SET_VRING_ENABLE` of queue 0.
    pub fn enable(&mut self) {
        self.frontend
            .set_vring_enable(0, true)
            .expect("set_vring_enable");
    }

    /// The used ring's index, as the device last published it.
    pub fn used_idx(&self) -> u16 {
        u16::from_le(
            self.mem
                .load::<u16>(GuestAddress(USED + 2), Ordering::Acquire)
                .unwrap(),
        )
    }

    /// The used ring element at position `pos` (a free-running index, taken modulo the size).
    pub fn used_at(&self, pos: u16) -> Used {
        let at = USED + 4 + 8 * u64::from(pos % self.queue_size);
        let id = u32::from_le(self.mem.read_obj(GuestAddress(at)).unwrap());
        let len = u32::from_le(self.mem.read_obj(GuestAddress(at + 4)).unwrap());
        Used { id, len }
    }

    /// Wait until the device has used `count` more elements, leaving notifications unread.
    pub fn wait_used_count(&mut self, count: u16) {
        let target = self.used_seen.wrapping_add(count);
        let deadline = Instant::now() + Duration::from_secs(10);
        while u16::from_le(
            self.mem
                .load::<u16>(GuestAddress(USED + 2), Ordering::Acquire)
                .unwrap(),
        ) != target
        {
            assert!(Instant::now() < deadline, "requests not used within 10 s");
            std::thread::sleep(Duration::from_millis(1));
        }
        self.used_seen = target;
    }

    /// How many times the device signalled the call eventfd since the last look.
    pub fn take_notifications(&mut self) -> u64 {
        self.call.read().unwrap_or(0)
    }

    /// Wait for the next used element, up to `timeout`.
    pub fn wait_used_for(&mut self, timeout: Duration) -> Option<Used> {
        let deadline = Instant::now() + timeout;
        loop {
            let idx = u16::from_le(
                self.mem
                    .load::<u16>(GuestAddress(USED + 2), Ordering::Acquire)
                    .unwrap(),
            );
            if idx != self.used_seen {
                let at = USED + 4 + 8 * u64::from(self.used_seen % self.queue_size);
                let id = u32::from_le(self.mem.read_obj(GuestAddress(at)).unwrap());
                let len = u32::from_le(self.mem.read_obj(GuestAddress(at + 4)).unwrap());
                self.used_seen = self.used_seen.wrapping_add(1);
                return Some(Used { id, len });
            }
            if Instant::now() > deadline {
                return None;
            }
            // Consume notifications so the eventfd does not saturate; polling does the rest.
            let _ = self.call.read();
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn wait_used(&mut self) -> Used {
        self.wait_used_for(Duration::from_secs(10))
            .expect("no used element within 10 s")
    }

    /// Submit `chain` and wait for it; returns the used element and the byte at `status`.
    pub fn request(&mut self, chain: &[Desc], status: u64) -> (Used, u8) {
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let head = self.submit(chain);
        let used = self.wait_used();
        assert_eq!(
            used.id,
            u32::from(head),
            "completions come back for the request sent"
        );
        (used, self.mem.read_obj(GuestAddress(status)).unwrap())
    }

    pub fn write_header(&self, addr: u64, request_type: u32, sector: u64) {
        self.mem
            .write_obj(request_type.to_le(), GuestAddress(addr))
            .unwrap();
        self.mem.write_obj(0u32, GuestAddress(addr + 4)).unwrap();
        self.mem
            .write_obj(sector.to_le(), GuestAddress(addr + 8))
            .unwrap();
    }
}

/// A connection whose replies are awaited for at most [`REPLY_DEADLINE`]: the socket's own
/// timeouts, since the `vhost` crate's `Frontend` would otherwise block forever on a backend
/// that stopped answering.
pub fn connect_with_deadline(socket: &Path) -> Frontend {
    let stream = UnixStream::connect(socket).expect("connect");
    stream
        .set_read_timeout(Some(REPLY_DEADLINE))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(REPLY_DEADLINE))
        .expect("write timeout");
    Frontend::from_stream(stream, 1)
}

/// SET_OWNER and feature negotiation: VERSION_1, the protocol features and `extra_features`
/// as far as offered; CONFIG, MQ and REPLY_ACK, plus INFLIGHT_SHMFD with `inflight` (which the
/// backend must offer). Returns the features set.
pub fn negotiate(frontend: &mut Frontend, extra_features: u64, inflight: bool) -> u64 {
    let extra_protocol = if inflight {
        VhostUserProtocolFeatures::INFLIGHT_SHMFD
    } else {
        VhostUserProtocolFeatures::empty()
    };
    negotiate_protocol(frontend, extra_features, extra_protocol)
}

/// Like [`negotiate`], with `extra_protocol` (which the backend must offer) on top of CONFIG,
/// MQ and REPLY_ACK.
pub fn negotiate_protocol(
    frontend: &mut Frontend,
    extra_features: u64,
    extra_protocol: VhostUserProtocolFeatures,
) -> u64 {
    frontend.set_owner().expect("set_owner");
    let offered = frontend.get_features().expect("get_features");
    let features = (VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | extra_features) & offered;
    frontend.set_features(features).expect("set_features");
    let protocol = frontend
        .get_protocol_features()
        .expect("get_protocol_features");
    assert!(
        protocol.contains(extra_protocol),
        "the backend does not offer {:?} (offers {protocol:?})",
        extra_protocol - protocol
    );
    let wanted = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | extra_protocol;
    frontend
        .set_protocol_features(protocol & wanted)
        .expect("set_protocol_features");
    features
}

/// SET_INFLIGHT_FD with `inflight`, waiting for the backend's ack (REPLY_ACK is negotiated),
/// so that a refused file is an error here.
pub fn set_inflight(frontend: &mut Frontend, inflight: &InflightFd) -> vhost::Result<()> {
    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let applied = frontend.set_inflight_fd(&inflight.info, inflight.file.as_raw_fd());
    frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
    applied
}

/// SET_MEM_TABLE with every region of `mem`; returns the host address of the region at guest
/// address 0, which the ring addresses are given in.
fn set_memory(frontend: &mut Frontend, mem: &Mem) -> vhost::Result<u64> {
    let infos: Vec<VhostUserMemoryRegionInfo> = mem
        .iter()
        .map(|region| VhostUserMemoryRegionInfo::from_guest_region(region).expect("region"))
        .collect();
    // Ask for the ack (REPLY_ACK is negotiated), so that a refused table is an error here
    // rather than a connection found closed later.
    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let applied = frontend.set_mem_table(&infos);
    frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
    applied?;
    let first = infos
        .iter()
        .find(|i| i.guest_phys_addr == 0)
        .expect("region at 0");
    Ok(first.userspace_addr)
}

/// Set up and start queue 0 at [`DESC`], [`AVAIL`] and [`USED`] of the region mapped at
/// `host`, the device resuming the available ring at `base`, in QEMU's order (kick, then
/// call); the caller enables it.
fn start_ring(
    frontend: &mut Frontend,
    queue_size: u16,
    host: u64,
    base: u16,
    call: &EventFd,
    kick: &EventFd,
) {
    frontend
        .set_vring_num(0, queue_size)
        .expect("set_vring_num");
    frontend
        .set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: queue_size,
                queue_size,
                flags: 0,
                desc_table_addr: host + DESC,
                used_ring_addr: host + USED,
                avail_ring_addr: host + AVAIL,
                log_addr: None,
            },
        )
        .expect("set_vring_addr");
    frontend.set_vring_base(0, base).expect("set_vring_base");
    frontend.set_vring_kick(0, kick).expect("set_vring_kick");
    frontend.set_vring_call(0, call).expect("set_vring_call");
}

/// Guest memory in memfds, one per `(guest address, size)` region, shareable with the backend.
pub fn shared_memory(regions: &[(u64, u64)]) -> Mem {
    let regions = regions
        .iter()
        .map(|&(addr, size)| {
            let file = memfd(size);
            let mapping =
                MmapRegion::<()>::from_file(FileOffset::new(file, 0), size as usize).expect("mmap");
            GuestRegionMmap::new(mapping, GuestAddress(addr)).expect("region")
        })
        .collect();
    GuestMemoryMmap::from_regions(regions).expect("guest memory")
}

/// An anonymous shareable file of `size` bytes.
pub fn memfd(size: u64) -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"raw-frontend".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).expect("size memfd");
    file
}
