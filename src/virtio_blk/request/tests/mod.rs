//! Request parsing against malformed and well-formed chains built with `MockSplitQueue`.

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::*;

mod segments;

pub(super) const MEM_SIZE: u64 = 0x100_0000;
pub(super) const HDR: u64 = 0x10_0000;
pub(super) const DATA: u64 = 0x20_0000;
pub(super) const STATUS: u64 = 0x30_0000;
pub(super) const CAPACITY: u64 = 1 << 20;

pub(super) fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

pub(super) fn limits() -> DeviceLimits {
    DeviceLimits {
        capacity_bytes: CAPACITY,
        logical_block_size: 512,
        seg_max: 254,
        max_discard_sectors: 1024,
        max_discard_seg: 4,
        discard_sector_alignment: 1,
        read_only: false,
    }
}

pub(super) fn readable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
}

pub(super) fn writable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(
        addr,
        len,
        VRING_DESC_F_WRITE as u16,
        0,
    ))
}

pub(super) fn write_header(mem: &GuestMemory, addr: u64, request_type: u32, sector: u64) {
    let header = RequestHeader {
        request_type: request_type.to_le(),
        reserved: 0,
        sector: sector.to_le(),
    };
    mem.write_obj(header, GuestAddress(addr)).unwrap();
}

pub(super) fn write_segment(
    mem: &GuestMemory,
    addr: u64,
    sector: u64,
    num_sectors: u32,
    flags: u32,
) {
    let seg = SegmentWire {
        sector: sector.to_le(),
        num_sectors: num_sectors.to_le(),
        flags: flags.to_le(),
    };
    mem.write_obj(seg, GuestAddress(addr)).unwrap();
}

pub(super) fn parse_with(
    mem: &GuestMemory,
    descs: &[RawDescriptor],
    limits: &DeviceLimits,
) -> (Result<Request, RequestError>, RequestBuffers) {
    let queue = MockSplitQueue::new(mem, 2048);
    let chain = queue.build_desc_chain(descs).unwrap();
    let mut bufs = RequestBuffers::with_limits(limits);
    (parse(&mut { chain }, mem, limits, &mut bufs), bufs)
}

pub(super) fn parse_descs(
    mem: &GuestMemory,
    descs: &[RawDescriptor],
) -> Result<Request, RequestError> {
    parse_with(mem, descs, &limits()).0
}

pub(super) fn assert_refused(result: Result<Request, RequestError>, code: Status, reason: Invalid) {
    let err = result.expect_err("request must be refused");
    assert_eq!(err.status, Some(GuestAddress(STATUS)));
    assert_eq!(err.code, code);
    assert_eq!(err.reason, reason);
}

pub(super) fn assert_dropped(result: Result<Request, RequestError>, reason: Invalid) {
    let err = result.expect_err("request must be dropped");
    assert_eq!(err.status, None);
    assert_eq!(err.reason, reason);
}

pub(super) fn iov_lens(bufs: &RequestBuffers) -> Vec<usize> {
    bufs.iovecs.iter().map(|iov| iov.iov_len).collect()
}

#[test]
fn read_request_maps_data_and_status() {
    let mem = memory();
    write_header(&mem, HDR, request_type::IN, 8);
    let (result, bufs) = parse_with(
        &mem,
        &[readable(HDR, 16), writable(DATA, 4096), writable(STATUS, 1)],
        &limits(),
    );
    let req = result.unwrap();
    assert_eq!(
        req.kind,
        RequestKind::Read {
            offset: 4096,
            len: 4096
        }
    );
    assert_eq!(req.status, GuestAddress(STATUS));
    assert_eq!(iov_lens(&bufs), vec![4096]);
    let host = mem.get_host_address(GuestAddress(DATA)).unwrap();
    assert_eq!(bufs.iovecs[0].iov_base.cast::<u8>(), host);
}

#[test]
fn header_split_across_descriptors_is_gathered() {
    let mem = memory();
    write_header(&mem, HDR, request_type::OUT, 2);
    // Move the second half of the header elsewhere and split the chain there.
    let mut tail = [0u8; 8];
    mem.read_slice(&mut tail, GuestAddress(HDR + 8)).unwrap();
    mem.write_slice(&tail, GuestAddress(HDR + 0x1000)).unwrap();
    let req = parse_descs(
        &mem,
        &[
            readable(HDR, 8),
            readable(HDR + 0x1000, 8),
            readable(DATA, 1024),
            writable(STATUS, 1),
        ],
    )
    .unwrap();
    assert_eq!(
        req.kind,
        RequestKind::Write {
            offset: 1024,
            len: 1024
        }
    );
}

#[test]
fn header_and_data_may_share_a_descriptor() {
    let mem = memory();
    write_header(&mem, HDR, request_type::OUT, 0);
    let (result, bufs) = parse_with(
        &mem,
        &[readable(HDR, 16 + 512), writable(STATUS, 1)],
        &limits(),
    );
    assert_eq!(
        result.unwrap().kind,
        RequestKind::Write {
            offset: 0,
            len: 512
        }
    );
    let host = mem.get_host_address(GuestAddress(HDR + 16)).unwrap();
    assert_eq!(bufs.iovecs[0].iov_base.cast::<u8>(), host);
    assert_eq!(iov_lens(&bufs), vec![512]);
}

#[test]
fn status_may_share_the_last_data_descriptor() {
    let mem = memory();
    write_header(&mem, HDR, request_type::IN, 0);
    let (result, bufs) = parse_with(
        &mem,
        &[readable(HDR, 16), writable(STATUS - 512, 513)],
        &limits(),
    );
    let req = result.unwrap();
    assert_eq!(req.status, GuestAddress(STATUS));
    assert_eq!(iov_lens(&bufs), vec![512]);
}

#[test]
fn chain_without_writable_status_is_dropped() {
    let mem = memory();
    write_header(&mem, HDR, request_type::IN, 0);
    assert_dropped(parse_descs(&mem, &[readable(HDR, 16)]), Invalid::NoStatus);
    assert_dropped(
        parse_descs(&mem, &[readable(HDR, 16), readable(DATA, 512)]),
        Invalid::NoStatus,
    );
}

#[test]
fn status_outside_guest_memory_is_dropped() {
    let mem = memory();
    write_header(&mem, HDR, request_type::FLUSH, 0);
    assert_dropped(
        parse_descs(&mem, &[readable(HDR, 16), writable(MEM_SIZE + 0x1000, 1)]),
        Invalid::StatusOutsideMemory,
    );
    // A status descriptor whose end overflows the address space.
    assert_dropped(
        parse_descs(&mem, &[readable(HDR, 16), writable(u64::MAX - 1, 4)]),
        Invalid::StatusOutsideMemory,
    );
}

#[test]
fn readable_after_writable_is_refused() {
    let mem = memory();
    write_header(&mem, HDR, request_type::IN, 0);
    assert_refused(
        parse_descs(
            &mem,
            &[
                readable(HDR, 16),
                writable(DATA, 512),
                readable(DATA + 4096, 512),
                writable(STATUS, 1),
            ],
        ),
        Status::IoErr,
        Invalid::Misordered,
    );
}

#[test]
fn short_header_is_refused() {
    let mem = memory();
    write_header(&mem, HDR, request_type::IN, 0);
    assert_refused(
        parse_descs(&mem, &[readable(HDR, 8), writable(STATUS, 1)]),
        Status::IoErr,
        Invalid::ShortHeader,
    );
    assert_refused(
        parse_descs(&mem, &[writable(STATUS, 1)]),
        Status::IoErr,
        Invalid::ShortHeader,
    );
}

#[test]
fn header_outside_guest_memory_is_refused() {
    let mem = memory();
    assert_refused(
        parse_descs(&mem, &[readable(MEM_SIZE, 16), writable(STATUS, 1)]),
        Status::IoErr,
        Invalid::HeaderOutsideMemory,
    );
}

#[test]
fn data_length_must_be_a_multiple_of_the_block_size() {
    let mem = memory();
    write_header(&mem, HDR, request_type::IN, 0);
    let descs = [readable(HDR, 16), writable(DATA, 100), writable(STATUS, 1)];
    assert_refused(
        parse_descs(&mem, &descs),
        Status::IoErr,
        Invalid::UnalignedLength(100),
    );

    let big_blocks = DeviceLimits {
        logical_block_size: 4096,
        ..limits()
    };
    let descs = [readable(HDR, 16), writable(DATA, 512), writable(STATUS, 1)];
    assert_refused(
        parse_with(&mem, &descs, &big_blocks).0,
        Status::IoErr,
        Invalid::UnalignedLength(512),
    );
    write_header(&mem, HDR, request_type::IN, 1);
    let descs = [readable(HDR, 16), writable(DATA, 4096), writable(STATUS, 1)];
    assert_refused(
        parse_with(&mem, &descs, &big_blocks).0,
        Status::IoErr,
        Invalid::UnalignedSector(1),
    );
}

#[test]
fn ranges_beyond_capacity_or_overflowing_are_refused() {
    let mem = memory();
    let last_sector = CAPACITY / 512 - 1;
    for (sector, len) in [
        (last_sector, 1024u32),
        (CAPACITY / 512, 512),
        (u64::MAX, 512),
        (u64::MAX / 512, 512),
    ] {
        write_header(&mem, HDR, request_type::OUT, sector);
        let descs = [readable(HDR, 16), readable(DATA, len), writable(STATUS, 1)];
        assert_refused(
            parse_descs(&mem, &descs),
            Status::IoErr,
            Invalid::OutOfRange {
                sector,
                len: u64::from(len),
            },
        );
    }
    // The very last sector is fine.
    write_header(&mem, HDR, request_type::OUT, last_sector);
    let descs = [readable(HDR, 16), readable(DATA, 512), writable(STATUS, 1)];
    assert!(parse_descs(&mem, &descs).is_ok());
}

#[test]
fn data_outside_guest_memory_is_refused() {
    let mem = memory();
    write_header(&mem, HDR, request_type::IN, 0);
    let descs = [
        readable(HDR, 16),
        writable(MEM_SIZE - 512, 1024),
        writable(STATUS, 1),
    ];
    assert_refused(
        parse_descs(&mem, &descs),
        Status::IoErr,
        Invalid::BufferOutsideMemory,
    );
    write_header(&mem, HDR, request_type::OUT, 0);
    let descs = [
        readable(HDR, 16),
        readable(u64::MAX - 511, 512),
        writable(STATUS, 1),
    ];
    assert_refused(
        parse_descs(&mem, &descs),
        Status::IoErr,
        Invalid::BufferOutsideMemory,
    );
}

#[test]
fn data_crossing_memory_regions_is_split() {
    let mem = GuestMemory::from_ranges(&[
        (GuestAddress(0), DATA as usize + 512),
        (GuestAddress(DATA + 512), (MEM_SIZE - DATA - 512) as usize),
    ])
    .unwrap();
    write_header(&mem, HDR, request_type::IN, 0);
    let (result, bufs) = parse_with(
        &mem,
        &[readable(HDR, 16), writable(DATA, 1024), writable(STATUS, 1)],
        &limits(),
    );
    result.unwrap();
    assert_eq!(iov_lens(&bufs), vec![512, 512]);
}

#[test]
fn writes_to_a_read_only_device_are_refused() {
    let mem = memory();
    let ro = DeviceLimits {
        read_only: true,
        ..limits()
    };
    write_header(&mem, HDR, request_type::OUT, 0);
    let descs = [readable(HDR, 16), readable(DATA, 512), writable(STATUS, 1)];
    assert_refused(
        parse_with(&mem, &descs, &ro).0,
        Status::IoErr,
        Invalid::ReadOnly,
    );

    for t in [request_type::DISCARD, request_type::WRITE_ZEROES] {
        write_header(&mem, HDR, t, 0);
        write_segment(&mem, DATA, 0, 8, 0);
        let descs = [readable(HDR, 16), readable(DATA, 16), writable(STATUS, 1)];
        assert_refused(
            parse_with(&mem, &descs, &ro).0,
            Status::IoErr,
            Invalid::ReadOnly,
        );
    }

    // Reads still work.
    write_header(&mem, HDR, request_type::IN, 0);
    let descs = [readable(HDR, 16), writable(DATA, 512), writable(STATUS, 1)];
    assert!(parse_with(&mem, &descs, &ro).0.is_ok());
}

#[test]
fn data_in_the_wrong_direction_is_refused() {
    let mem = memory();
    write_header(&mem, HDR, request_type::IN, 0);
    let descs = [readable(HDR, 16), readable(DATA, 512), writable(STATUS, 1)];
    assert_refused(
        parse_descs(&mem, &descs),
        Status::IoErr,
        Invalid::WrongDirection,
    );
    write_header(&mem, HDR, request_type::OUT, 0);
    let descs = [readable(HDR, 16), writable(DATA, 512), writable(STATUS, 1)];
    assert_refused(
        parse_descs(&mem, &descs),
        Status::IoErr,
        Invalid::WrongDirection,
    );
}

#[test]
fn flush_ignores_stray_data() {
    let mem = memory();
    write_header(&mem, HDR, request_type::FLUSH, 0);
    let req = parse_descs(&mem, &[readable(HDR, 16), writable(STATUS, 1)]).unwrap();
    assert_eq!(req.kind, RequestKind::Flush);
    let req = parse_descs(&mem, &[readable(HDR, 32), writable(STATUS, 1)]).unwrap();
    assert_eq!(req.kind, RequestKind::Flush);
}

#[test]
fn get_id_copy_is_bounded_by_the_buffer_and_the_id_size() {
    let mem = memory();
    write_header(&mem, HDR, request_type::GET_ID, 0);
    for (buf_len, mapped) in [(20u32, 20usize), (64, 20), (4, 4)] {
        let (result, bufs) = parse_with(
            &mem,
            &[
                readable(HDR, 16),
                writable(DATA, buf_len),
                writable(STATUS, 1),
            ],
            &limits(),
        );
        assert_eq!(result.unwrap().kind, RequestKind::GetId);
        assert_eq!(iov_lens(&bufs).iter().sum::<usize>(), mapped);
    }
    assert_refused(
        parse_descs(&mem, &[readable(HDR, 16), writable(STATUS, 1)]),
        Status::IoErr,
        Invalid::EmptyIdBuffer,
    );
}

#[test]
fn unknown_request_types_are_unsupported() {
    let mem = memory();
    for t in [2u32, 10, 14, 15, 16, 0xdead] {
        write_header(&mem, HDR, t, 0);
        assert_refused(
            parse_descs(&mem, &[readable(HDR, 16), writable(STATUS, 1)]),
            Status::Unsupp,
            Invalid::UnsupportedType(t),
        );
    }
}

#[test]
fn chains_with_too_many_buffers_are_refused() {
    let mem = memory();
    write_header(&mem, HDR, request_type::IN, 0);
    let mut descs = vec![readable(HDR, 16)];
    descs.extend((0..DeviceLimits::MAX_IOVECS as u64 + 1).map(|i| writable(DATA + 512 * i, 512)));
    descs.push(writable(STATUS, 1));
    assert_refused(
        parse_descs(&mem, &descs),
        Status::IoErr,
        Invalid::TooManyBuffers,
    );
}

#[test]
fn zero_length_descriptors_are_skipped() {
    let mem = memory();
    write_header(&mem, HDR, request_type::IN, 0);
    let (result, bufs) = parse_with(
        &mem,
        &[
            readable(HDR, 16),
            readable(DATA, 0),
            writable(DATA, 512),
            writable(DATA + 4096, 0),
            writable(STATUS, 1),
        ],
        &limits(),
    );
    assert!(result.is_ok());
    assert_eq!(iov_lens(&bufs), vec![512]);
}

#[test]
fn read_and_get_id_report_the_bytes_they_write() {
    let mem = memory();
    write_header(&mem, HDR, request_type::IN, 0);
    let descs = [readable(HDR, 16), writable(DATA, 4096), writable(STATUS, 1)];
    assert_eq!(parse_descs(&mem, &descs).unwrap().used_len, 4097);
    write_header(&mem, HDR, request_type::GET_ID, 0);
    let descs = [readable(HDR, 16), writable(DATA, 512), writable(STATUS, 1)];
    assert_eq!(parse_descs(&mem, &descs).unwrap().used_len, 21);
    write_header(&mem, HDR, request_type::OUT, 0);
    let descs = [readable(HDR, 16), readable(DATA, 4096), writable(STATUS, 1)];
    assert_eq!(parse_descs(&mem, &descs).unwrap().used_len, 1);
}

#[test]
fn a_read_longer_than_the_used_ring_can_report_is_refused() {
    assert_eq!(read_used_len(4096), Ok(4097));
    assert_eq!(read_used_len(u64::from(u32::MAX) - 1), Ok(u32::MAX));
    assert_eq!(
        read_used_len(u64::from(u32::MAX)),
        Err(Invalid::TooLong(u64::from(u32::MAX)))
    );
    // Through a queue, such a chain never even parses: virtio-queue stops yielding
    // descriptors past 4 GiB, so the chain ends early and is refused.
    let mem = memory();
    let huge = DeviceLimits {
        capacity_bytes: 1 << 40,
        ..limits()
    };
    write_header(&mem, HDR, request_type::IN, 0);
    let descs = [
        readable(HDR, 16),
        writable(DATA, u32::MAX - 511),
        writable(DATA, u32::MAX - 511),
        writable(STATUS, 1),
    ];
    assert!(parse_with(&mem, &descs, &huge).0.is_err());
}

#[test]
fn descriptors_wrapping_past_the_address_space_are_refused() {
    let mem = memory();
    write_header(&mem, HDR, request_type::OUT, 0);
    // The data descriptor ends past 2^64: cutting it must never wrap to low addresses.
    let descs = [
        readable(HDR, 16),
        readable(u64::MAX - 255, 512),
        writable(STATUS, 1),
    ];
    assert_refused(
        parse_descs(&mem, &descs),
        Status::IoErr,
        Invalid::BufferOutsideMemory,
    );
}

#[test]
fn chains_cut_short_are_dropped_not_answered() {
    let mem = memory();
    write_header(&mem, HDR, request_type::IN, 0);
    // A direct loop: descriptor 1 points back to descriptor 0.
    let queue = MockSplitQueue::new(&mem, 16);
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
        RawDescriptor::from(SplitDescriptor::new(
            STATUS,
            1,
            (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
            0,
        )),
    ];
    queue.add_desc_chains(&descs, 0).unwrap();
    let mut q = queue.create_queue::<virtio_queue::Queue>().unwrap();
    let chain = q.pop_descriptor_chain(&mem).unwrap();
    let mut bufs = RequestBuffers::with_limits(&limits());
    assert_dropped(
        parse(&mut { chain }, &mem, &limits(), &mut bufs),
        Invalid::Truncated,
    );
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);

    // A loop inside an indirect table: entry 1 chains back to entry 0.
    let table = 0x50_0000;
    let entries = [
        SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
        SplitDescriptor::new(
            STATUS,
            1,
            (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
            0,
        ),
    ];
    for (i, e) in entries.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let queue = MockSplitQueue::new(&mem, 16);
    let head = [RawDescriptor::from(SplitDescriptor::new(
        table,
        32,
        VRING_DESC_F_INDIRECT as u16,
        0,
    ))];
    queue.add_desc_chains(&head, 0).unwrap();
    let mut q = queue.create_queue::<virtio_queue::Queue>().unwrap();
    let chain = q.pop_descriptor_chain(&mem).unwrap();
    assert_dropped(
        parse(&mut { chain }, &mem, &limits(), &mut bufs),
        Invalid::Truncated,
    );
}
