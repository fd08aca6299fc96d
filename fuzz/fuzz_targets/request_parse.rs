//! `request::parse` over arbitrary descriptor tables.
//!
//! The input describes what a hostile driver can control: the queue size, the head it makes
//! available, the descriptor table, up to eight indirect tables, and bytes (request headers,
//! discard / write-zeroes segments, anything) written anywhere in guest memory, plus the
//! device's limits. Guest memory is three regions: two adjacent ones, a hole, a third one, so
//! that buffers can cross regions, fall into the hole or run off the end.
//!
//! On every outcome the result is checked against a reference model built from the same chain
//! (walked again, independently of the parser): a refusal reports the status byte exactly when
//! the chain has a usable one, and a request that passes has the shape its header asks for,
//! within the limits, and iovecs that cover exactly the right guest bytes, inside guest memory.

#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{
    ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

use vubd::virtio_blk::request::{
    parse, GuestMemory, Request, RequestBuffers, RequestError, RequestKind, HEADER_SIZE,
};
use vubd::virtio_blk::{request_type, DeviceLimits, ID_BYTES, SECTOR_SIZE, SEGMENT_FLAG_UNMAP};

const MIB: u64 = 1 << 20;
/// (start, length) of the guest memory regions: two adjacent, a hole, one more.
const REGIONS: [(u64, u64); 3] = [(0, MIB), (MIB, MIB), (3 * MIB, MIB)];
/// End of the last region: `Addr::Mem` offsets are taken modulo this (the hole included).
const SPAN: u64 = 4 * MIB;
/// Where the indirect tables go (region 0, above the rings of the largest queue).
const TABLES: u64 = 0xE_0000;
const TABLE_STRIDE: u64 = 0x1000;
const MAX_TABLES: usize = 8;
/// Entries of one indirect table (4 KiB, so neighbouring tables may overlap).
const MAX_TABLE_ENTRIES: usize = 256;

/// A guest address, in ways that reach interesting places without guessing 64-bit numbers.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    Raw(u64),
    /// Anywhere in the first `SPAN` bytes, the hole included.
    Mem(u32),
    /// Just after the start or just before the end of a region.
    Edge {
        region: u8,
        from_end: bool,
        delta: u16,
    },
    /// The start of an indirect table.
    Table(u8),
    /// One of a few buffer places: 64 KiB apart in region 1, or across a region boundary, at
    /// the edge of the hole, at the end of memory.
    Slot(u8),
}

const SLOTS: usize = 16;

fn slot(k: u8) -> u64 {
    match usize::from(k) % SLOTS {
        k @ 0..=11 => REGIONS[1].0 + k as u64 * 0x1_0000,
        12 => REGIONS[0].1 - 8,
        13 => REGIONS[1].0 + REGIONS[1].1 - 8,
        14 => REGIONS[2].0,
        _ => REGIONS[2].0 + REGIONS[2].1 - 16,
    }
}

impl Addr {
    fn resolve(self) -> u64 {
        match self {
            Addr::Raw(a) => a,
            Addr::Mem(a) => u64::from(a) % SPAN,
            Addr::Edge {
                region,
                from_end,
                delta,
            } => {
                let (start, len) = REGIONS[usize::from(region) % REGIONS.len()];
                if from_end {
                    (start + len).wrapping_sub(u64::from(delta))
                } else {
                    start + u64::from(delta)
                }
            }
            Addr::Table(i) => TABLES + (u64::from(i) % MAX_TABLES as u64) * TABLE_STRIDE,
            Addr::Slot(k) => slot(k),
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Len {
    Raw(u32),
    Bytes(u8),
    /// The status byte alone.
    Status,
    /// The header alone.
    Header,
    /// Sectors of data, possibly with the header before them and the status byte after them
    /// in the same descriptor.
    Sectors {
        sectors: u16,
        header: bool,
        status: bool,
    },
    /// A multiple of a descriptor's size (indirect tables) or a segment's size.
    Entries(u8),
}

impl Len {
    fn resolve(self) -> u32 {
        match self {
            Len::Raw(n) => n,
            Len::Bytes(n) => n.into(),
            Len::Status => 1,
            Len::Header => HEADER_SIZE as u32,
            Len::Sectors {
                sectors,
                header,
                status,
            } => {
                u32::from(sectors) * 512
                    + if header { HEADER_SIZE as u32 } else { 0 }
                    + u32::from(status)
            }
            Len::Entries(n) => u32::from(n) * 16,
        }
    }
}

/// How a descriptor continues the chain.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Link {
    /// NEXT to the following entry, unless it is the last one given.
    Chain,
    /// No NEXT: the chain ends here.
    End,
    /// Flags and next index exactly as given (NEXT = 1, WRITE = 2, INDIRECT = 4).
    Raw { flags: u16, next: u16 },
}

/// One descriptor table entry; laid out at index `i` of its table.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct Desc {
    addr: Addr,
    len: Len,
    write: bool,
    indirect: bool,
    link: Link,
}

impl Desc {
    fn raw(&self, i: usize, count: usize) -> RawDescriptor {
        let (flags, next) = match self.link {
            Link::Raw { flags, next } => (flags, next),
            link => {
                let mut flags = 0;
                if self.write {
                    flags |= VRING_DESC_F_WRITE as u16;
                }
                if self.indirect {
                    flags |= VRING_DESC_F_INDIRECT as u16;
                }
                if matches!(link, Link::Chain) && i + 1 < count {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                (flags, (i + 1) as u16)
            }
        };
        RawDescriptor::from(SplitDescriptor::new(
            self.addr.resolve(),
            self.len.resolve(),
            flags,
            next,
        ))
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum ReqType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Raw(u32),
}

impl ReqType {
    fn value(self) -> u32 {
        match self {
            ReqType::In => request_type::IN,
            ReqType::Out => request_type::OUT,
            ReqType::Flush => request_type::FLUSH,
            ReqType::GetId => request_type::GET_ID,
            ReqType::Discard => request_type::DISCARD,
            ReqType::WriteZeroes => request_type::WRITE_ZEROES,
            ReqType::Raw(t) => t,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Content {
    Header {
        request_type: ReqType,
        reserved: u32,
        sector: u64,
    },
    Segments(Vec<(u64, u32, u32)>),
    Bytes(Vec<u8>),
}

impl Content {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Content::Header {
                request_type,
                reserved,
                sector,
            } => {
                let mut b = Vec::with_capacity(16);
                b.extend_from_slice(&request_type.value().to_le_bytes());
                b.extend_from_slice(&reserved.to_le_bytes());
                b.extend_from_slice(&sector.to_le_bytes());
                b
            }
            Content::Segments(segs) => segs
                .iter()
                .take(64)
                .flat_map(|(sector, n, flags)| {
                    let mut b = sector.to_le_bytes().to_vec();
                    b.extend_from_slice(&n.to_le_bytes());
                    b.extend_from_slice(&flags.to_le_bytes());
                    b
                })
                .collect(),
            Content::Bytes(b) => b.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Limits {
    /// Capacity in logical blocks (made non-zero).
    blocks: u64,
    lbs_4k: bool,
    discard_granularity_bits: u8,
    queue_size: u16,
    read_only: bool,
    max_discard_sectors: u32,
    max_discard_seg: u8,
}

impl Limits {
    /// Limits as `DeviceLimits::new` makes them (a non-zero capacity, a multiple of the block
    /// size), with the discard bounds anywhere from 1 to the device's own.
    fn device(&self) -> DeviceLimits {
        let lbs: u32 = if self.lbs_4k { 4096 } else { 512 };
        let blocks = self.blocks % (u64::MAX / u64::from(lbs)) + 1;
        let granularity = 1u64 << (self.discard_granularity_bits % 32);
        let mut limits = DeviceLimits::new(
            blocks * u64::from(lbs),
            lbs,
            granularity,
            self.queue_size,
            self.read_only,
        );
        limits.max_discard_sectors =
            self.max_discard_sectors % DeviceLimits::MAX_DISCARD_SECTORS + 1;
        limits.max_discard_seg =
            u32::from(self.max_discard_seg) % DeviceLimits::MAX_DISCARD_SEG + 1;
        limits
    }
}

/// A buffer of a well-formed request.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct Buf {
    addr: Addr,
    len: Len,
}

#[derive(Arbitrary, Debug)]
enum Shape {
    /// Descriptor table entries as given.
    Table(Vec<Desc>),
    /// Header (with `segments` after it), readable then writable data buffers, status byte:
    /// in the descriptor table, or in an indirect table the head points to. Each piece may
    /// lie anywhere, so checks fail one at a time rather than all at once.
    Request {
        request_type: ReqType,
        sector: u64,
        header_at: Addr,
        segments: Vec<(u64, u32, u32)>,
        readable: Vec<Buf>,
        writable: Vec<Buf>,
        status_at: Addr,
        indirect: bool,
    },
}

/// Where a shape puts things.
struct Layout {
    /// The descriptor table's entries.
    table: Vec<Desc>,
    /// The indirect table the request uses, if any.
    indirect: Option<Vec<Desc>>,
    /// The header, with its segments, and where to write it.
    header: Option<(u64, Vec<u8>)>,
}

impl Shape {
    /// The descriptor table's entries, the indirect table the request uses (if any), and the
    /// header with its segments to write at the header's address.
    fn layout(&self) -> Layout {
        let (request_type, sector, header_at, segments, readable, writable, status_at, indirect) =
            match self {
                Shape::Table(descs) => {
                    return Layout {
                        table: descs.clone(),
                        indirect: None,
                        header: None,
                    }
                }
                Shape::Request {
                    request_type,
                    sector,
                    header_at,
                    segments,
                    readable,
                    writable,
                    status_at,
                    indirect,
                } => (
                    request_type,
                    sector,
                    header_at,
                    segments,
                    readable,
                    writable,
                    status_at,
                    indirect,
                ),
            };
        let segments = Content::Segments(segments.clone()).bytes();
        let mut header = Content::Header {
            request_type: *request_type,
            reserved: 0,
            sector: *sector,
        }
        .bytes();
        header.extend(&segments);
        let desc = |addr, len, write| Desc {
            addr,
            len,
            write,
            indirect: false,
            link: Link::Chain,
        };
        let mut chain = vec![desc(*header_at, Len::Raw(header.len() as u32), false)];
        chain.extend(readable.iter().take(32).map(|b| desc(b.addr, b.len, false)));
        chain.extend(writable.iter().take(32).map(|b| desc(b.addr, b.len, true)));
        chain.push(desc(*status_at, Len::Status, true));
        let header = Some((header_at.resolve(), header));
        if *indirect {
            let head = Desc {
                indirect: true,
                link: Link::End,
                ..desc(Addr::Table(0), Len::Raw(16 * chain.len() as u32), false)
            };
            Layout {
                table: vec![head],
                indirect: Some(chain),
                header,
            }
        } else {
            Layout {
                table: chain,
                indirect: None,
                header,
            }
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Head {
    First,
    Raw(u16),
}

#[derive(Arbitrary, Debug)]
struct Input {
    limits: Limits,
    /// Queue size 2^(n % 16).
    queue_size_bits: u8,
    head: Head,
    /// The head's chain: a table as given, or a well-formed request laid out by the target.
    shape: Shape,
    /// Further indirect tables (a well-formed request in an indirect table takes the first).
    tables: Vec<Vec<Desc>>,
    /// A header, and segments after it, written where the head descriptor points (if that is
    /// in memory): requests that get past the header's checks without luck.
    header: Option<(ReqType, u64)>,
    segments: Vec<(u64, u32, u32)>,
    writes: Vec<(Addr, Content)>,
}

fn memory() -> &'static GuestMemory {
    static MEM: OnceLock<GuestMemory> = OnceLock::new();
    MEM.get_or_init(|| {
        let ranges: Vec<_> = REGIONS
            .iter()
            .map(|&(start, len)| (GuestAddress(start), len as usize))
            .collect();
        GuestMemory::from_ranges(&ranges).expect("guest memory")
    })
}

/// Remembers what an iteration wrote, to zero it before the next one: every input starts from
/// zeroed memory.
struct Scribbles(Vec<(GuestAddress, usize)>);

impl Scribbles {
    fn write(&mut self, mem: &GuestMemory, addr: u64, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        // Only what lands in memory: a write into the hole or past the end is dropped.
        if mem.write_slice(bytes, GuestAddress(addr)).is_ok() {
            self.0.push((GuestAddress(addr), bytes.len()));
        }
    }
}

impl Drop for Scribbles {
    fn drop(&mut self) {
        let mem = memory();
        for &(addr, len) in &self.0 {
            mem.write_slice(&vec![0u8; len], addr)
                .expect("zeroing what was written");
        }
    }
}

/// Host runs `(pointer, length)` of `len` guest bytes at `addr`, merged where contiguous, or
/// `None` if any byte is outside guest memory. Translated region by region here, not with the
/// helpers the parser uses.
fn host_runs(mem: &GuestMemory, addr: u64, len: u64, out: &mut Vec<(usize, usize)>) -> Option<()> {
    let mut at = addr;
    let end = addr.checked_add(len)?;
    while at < end {
        let region = mem
            .iter()
            .find(|r| r.start_addr().0 <= at && at - r.start_addr().0 < r.len())?;
        let off = at - region.start_addr().0;
        let n = (region.len() - off).min(end - at);
        let base = region.get_host_address(MemoryRegionAddress(0)).ok()? as usize;
        push_run(out, base + off as usize, n as usize);
        at += n;
    }
    Some(())
}

fn push_run(out: &mut Vec<(usize, usize)>, ptr: usize, len: usize) {
    if len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.0 + last.1 == ptr {
            last.1 += len;
            return;
        }
    }
    out.push((ptr, len));
}

/// A byte stream of the chain: its guest ranges, in order.
type Stream<'a> = &'a [(u64, u64)];

/// The chain as the reference model sees it: non-empty descriptors, in order.
struct Model {
    readable: Vec<(u64, u64)>,
    writable: Vec<(u64, u64)>,
    misordered: bool,
    /// The chain was cut short (its last descriptor still says "next").
    cut: bool,
    /// The last byte of the chain, if the last non-empty descriptor is device-writable.
    status: Option<u64>,
}

impl Model {
    fn new(chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>) -> Model {
        let mut m = Model {
            readable: Vec::new(),
            writable: Vec::new(),
            misordered: false,
            cut: false,
            status: None,
        };
        for d in chain {
            m.cut = d.has_next();
            if d.len() == 0 {
                continue;
            }
            let range = (d.addr().0, u64::from(d.len()));
            if d.is_write_only() {
                m.writable.push(range);
                m.status = d.addr().0.checked_add(range.1 - 1);
            } else {
                m.misordered |= !m.writable.is_empty();
                m.readable.push(range);
                m.status = None;
            }
        }
        m
    }

    /// `len` bytes of a stream starting `skip` bytes in, as guest ranges.
    fn slice(stream: &[(u64, u64)], mut skip: u64, mut len: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for &(addr, n) in stream {
            if len == 0 {
                break;
            }
            if skip >= n {
                skip -= n;
                continue;
            }
            let take = (n - skip).min(len);
            out.push((addr + skip, take));
            len -= take;
            skip = 0;
        }
        assert_eq!(len, 0, "stream shorter than the request says");
        out
    }

    fn read(mem: &GuestMemory, stream: &[(u64, u64)], skip: u64, buf: &mut [u8]) {
        let mut at = 0;
        for (addr, n) in Self::slice(stream, skip, buf.len() as u64) {
            mem.read_slice(&mut buf[at..at + n as usize], GuestAddress(addr))
                .expect("bytes the parser read are in memory");
            at += n as usize;
        }
    }
}

fn total(stream: &[(u64, u64)]) -> u64 {
    stream.iter().map(|r| r.1).sum()
}

fn check_refusal(mem: &GuestMemory, model: &Model, err: &RequestError) {
    let usable = model
        .status
        .filter(|&s| !model.cut && mem.check_range(GuestAddress(s), 1));
    assert_eq!(
        err.status.map(|a| a.0),
        usable,
        "a refusal reports the status byte exactly when the chain has a usable one: {err:?}"
    );
}

fn check_request(
    mem: &GuestMemory,
    limits: &DeviceLimits,
    model: &Model,
    req: &Request,
    bufs: &RequestBuffers,
) {
    assert!(!model.cut && !model.misordered);
    assert_eq!(
        Some(req.status.0),
        model.status,
        "status is the chain's last byte"
    );
    assert!(
        mem.check_range(req.status, 1),
        "status byte in guest memory"
    );
    assert!(bufs.iovecs.len() <= DeviceLimits::MAX_IOVECS);
    assert!(model.readable.len() + model.writable.len() <= 2 * DeviceLimits::MAX_IOVECS);

    let readable = total(&model.readable);
    let writable = total(&model.writable);
    assert!(readable >= HEADER_SIZE as u64 && writable >= 1);
    let mut header = [0u8; HEADER_SIZE];
    Model::read(mem, &model.readable, 0, &mut header);
    let rtype = u32::from_le_bytes(header[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
    let lbs = u64::from(limits.logical_block_size);

    // (stream, skip, length) of the data the iovecs must cover.
    let data: Option<(Stream, u64, u64)> = match req.kind {
        RequestKind::Read { offset, len } => {
            assert_eq!(rtype, request_type::IN);
            assert_eq!(
                readable, HEADER_SIZE as u64,
                "a read carries no data to the device"
            );
            assert_eq!(len, writable - 1);
            assert_eq!(u64::from(req.used_len), len + 1);
            check_range(limits, sector, offset, len);
            Some((&model.writable, 0, len))
        }
        RequestKind::Write { offset, len } => {
            assert_eq!(rtype, request_type::OUT);
            assert!(!limits.read_only);
            assert_eq!(
                writable, 1,
                "a write has no data buffer for the device to fill"
            );
            assert_eq!(len, readable - HEADER_SIZE as u64);
            assert_eq!(req.used_len, 1);
            check_range(limits, sector, offset, len);
            Some((&model.readable, HEADER_SIZE as u64, len))
        }
        RequestKind::Flush => {
            assert_eq!(rtype, request_type::FLUSH);
            assert_eq!(req.used_len, 1);
            None
        }
        RequestKind::GetId => {
            assert_eq!(rtype, request_type::GET_ID);
            assert_eq!(readable, HEADER_SIZE as u64);
            let len = (writable - 1).min(ID_BYTES as u64);
            assert!(len > 0);
            assert_eq!(u64::from(req.used_len), len + 1);
            Some((&model.writable, 0, len))
        }
        RequestKind::Discard | RequestKind::WriteZeroes => {
            let discard = req.kind == RequestKind::Discard;
            let expected = if discard {
                request_type::DISCARD
            } else {
                request_type::WRITE_ZEROES
            };
            assert_eq!(rtype, expected);
            assert!(!limits.read_only);
            assert_eq!(writable, 1);
            assert_eq!(req.used_len, 1);
            let data = readable - HEADER_SIZE as u64;
            assert_eq!(data % 16, 0);
            let count = data / 16;
            assert!(count >= 1 && count <= u64::from(limits.max_discard_seg));
            assert_eq!(bufs.segments.len() as u64, count);
            for (i, seg) in bufs.segments.iter().enumerate() {
                let mut wire = [0u8; 16];
                Model::read(
                    mem,
                    &model.readable,
                    HEADER_SIZE as u64 + 16 * i as u64,
                    &mut wire,
                );
                let w_sector = u64::from_le_bytes(wire[0..8].try_into().unwrap());
                let w_sectors = u32::from_le_bytes(wire[8..12].try_into().unwrap());
                let w_flags = u32::from_le_bytes(wire[12..16].try_into().unwrap());
                assert!(w_sectors <= limits.max_discard_sectors);
                assert_eq!(seg.len, u64::from(w_sectors) * SECTOR_SIZE);
                assert_eq!(seg.unmap, w_flags & SEGMENT_FLAG_UNMAP != 0);
                assert!(!seg.unmap || !discard, "discard takes no flags");
                assert_eq!(w_flags & !SEGMENT_FLAG_UNMAP, 0, "unknown segment flags");
                check_range(limits, w_sector, seg.offset, seg.len);
                assert_eq!(seg.len % lbs, 0);
            }
            None
        }
    };
    if !matches!(req.kind, RequestKind::Discard | RequestKind::WriteZeroes) {
        assert!(bufs.segments.is_empty());
    }

    // The iovecs cover exactly the data's guest bytes, in order, inside guest memory.
    let mut expected = Vec::new();
    if let Some((stream, skip, len)) = data {
        for (addr, n) in Model::slice(stream, skip, len) {
            host_runs(mem, addr, n, &mut expected).expect("data buffer outside guest memory");
        }
    }
    let mut got = Vec::new();
    for iov in bufs.iovecs.iter() {
        assert!(iov.iov_len > 0, "empty iovec");
        let p = iov.iov_base as usize;
        let inside = mem.iter().any(|r| {
            let base = r.get_host_address(MemoryRegionAddress(0)).unwrap() as usize;
            p >= base && p - base < r.len() as usize && iov.iov_len <= r.len() as usize - (p - base)
        });
        assert!(inside, "iovec {p:#x}+{} outside guest memory", iov.iov_len);
        push_run(&mut got, p, iov.iov_len);
    }
    assert_eq!(got, expected, "iovecs do not cover the request's data");
}

/// A data range: `sector` in bytes is `offset`, aligned, within the disk.
fn check_range(limits: &DeviceLimits, sector: u64, offset: u64, len: u64) {
    let lbs = u64::from(limits.logical_block_size);
    assert_eq!(Some(offset), sector.checked_mul(SECTOR_SIZE));
    assert_eq!(offset % lbs, 0);
    assert_eq!(len % lbs, 0);
    assert!(offset
        .checked_add(len)
        .is_some_and(|end| end <= limits.capacity_bytes));
}

fuzz_target!(|input: Input| {
    if vubd_fuzz::tracing() {
        eprintln!("request_parse: {input:?}");
    }
    let mem = memory();
    let mut scribbles = Scribbles(Vec::new());
    let limits = input.limits.device();
    let size = 1u16 << (input.queue_size_bits % 16);

    let mock = MockSplitQueue::create(mem, GuestAddress(0), size);
    // The rings (descriptor table, avail, used) are zeroed after the iteration.
    scribbles.0.push((GuestAddress(0), mock.end().0 as usize));
    assert!(mock.end().0 <= TABLES);
    let Layout {
        table,
        indirect: request_table,
        header: request_header,
    } = input.shape.layout();
    let count = table.len().min(usize::from(size));
    for (i, d) in table.iter().take(count).enumerate() {
        scribbles.write(mem, 16 * i as u64, d.raw(i, count).as_slice());
    }
    let tables = request_table.iter().chain(input.tables.iter());
    for (t, table) in tables.take(MAX_TABLES).enumerate() {
        let base = TABLES + t as u64 * TABLE_STRIDE;
        let count = table.len().min(MAX_TABLE_ENTRIES);
        for (i, d) in table.iter().take(count).enumerate() {
            scribbles.write(mem, base + 16 * i as u64, d.raw(i, count).as_slice());
        }
    }
    if let Some((addr, bytes)) = request_header {
        scribbles.write(mem, addr, &bytes);
    }
    if let (Some((request_type, sector)), Some(first)) = (input.header, table.first()) {
        let mut bytes = Content::Header {
            request_type,
            reserved: 0,
            sector,
        }
        .bytes();
        bytes.extend(Content::Segments(input.segments.clone()).bytes());
        scribbles.write(mem, first.addr.resolve(), &bytes);
    }
    for (addr, content) in input.writes.iter().take(64) {
        scribbles.write(mem, addr.resolve(), &content.bytes());
    }
    // Make `head` available.
    let avail = mock.avail_addr().0;
    let head = match input.head {
        Head::First => 0,
        Head::Raw(h) => h,
    };
    mem.write_obj(head.to_le(), GuestAddress(avail + 4))
        .unwrap();
    mem.write_obj(1u16.to_le(), GuestAddress(avail + 2))
        .unwrap();

    let mut queue: Queue = mock.create_queue().expect("queue");
    let Some(chain) = queue.iter(mem).expect("queue ready").next() else {
        panic!("the head made available is not popped");
    };
    let model = Model::new(chain.clone());
    let mut bufs = RequestBuffers::with_limits(&limits);
    let result = parse(&mut { chain }, mem, &limits, &mut bufs);
    if vubd_fuzz::tracing() {
        match &result {
            Ok(req) => eprintln!("request_parse: ok {:?}", req.kind),
            Err(err) => eprintln!("request_parse: refused ({:?}) {}", err.status, err.reason),
        }
    }
    match result {
        Ok(req) => check_request(mem, &limits, &model, &req, &bufs),
        Err(err) => check_refusal(mem, &model, &err),
    }
});
