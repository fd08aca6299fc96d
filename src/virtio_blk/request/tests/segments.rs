//! Discard and write-zeroes segment lists.

use super::*;

fn segment_request(
    mem: &GuestMemory,
    request: u32,
    segments: &[(u64, u32, u32)],
) -> (Result<Request, RequestError>, RequestBuffers) {
    write_header(mem, HDR, request, 0);
    for (i, (sector, n, flags)) in segments.iter().enumerate() {
        write_segment(mem, DATA + 16 * i as u64, *sector, *n, *flags);
    }
    let len = 16 * segments.len() as u32;
    parse_with(
        mem,
        &[readable(HDR, 16), readable(DATA, len), writable(STATUS, 1)],
        &limits(),
    )
}

#[test]
fn discard_and_write_zeroes_segments_are_validated() {
    let mem = memory();
    let (result, bufs) = segment_request(&mem, request_type::DISCARD, &[(0, 8, 0), (100, 16, 0)]);
    assert_eq!(result.unwrap().kind, RequestKind::Discard);
    assert_eq!(
        bufs.segments,
        vec![
            Segment {
                offset: 0,
                len: 4096,
                unmap: false
            },
            Segment {
                offset: 51200,
                len: 8192,
                unmap: false
            }
        ]
    );

    let (result, bufs) = segment_request(
        &mem,
        request_type::WRITE_ZEROES,
        &[(8, 8, SEGMENT_FLAG_UNMAP)],
    );
    assert_eq!(result.unwrap().kind, RequestKind::WriteZeroes);
    assert!(bufs.segments[0].unmap);
}

#[test]
fn discard_with_unmap_or_reserved_flags_is_unsupported() {
    let mem = memory();
    let (result, _) = segment_request(&mem, request_type::DISCARD, &[(0, 8, SEGMENT_FLAG_UNMAP)]);
    assert_refused(result, Status::Unsupp, Invalid::UnsupportedSegmentFlags(1));
    let (result, _) = segment_request(&mem, request_type::WRITE_ZEROES, &[(0, 8, 0), (0, 8, 2)]);
    assert_refused(result, Status::Unsupp, Invalid::UnsupportedSegmentFlags(2));
}

#[test]
fn segment_count_length_and_range_are_checked() {
    let mem = memory();
    // Five segments where four are allowed.
    let (result, _) = segment_request(&mem, request_type::DISCARD, &[(0, 8, 0); 5]);
    assert_refused(result, Status::IoErr, Invalid::BadSegmentCount(80));
    // No segment at all.
    write_header(&mem, HDR, request_type::DISCARD, 0);
    assert_refused(
        parse_descs(&mem, &[readable(HDR, 16), writable(STATUS, 1)]),
        Status::IoErr,
        Invalid::BadSegmentCount(0),
    );
    // A partial segment.
    assert_refused(
        parse_descs(
            &mem,
            &[readable(HDR, 16), readable(DATA, 20), writable(STATUS, 1)],
        ),
        Status::IoErr,
        Invalid::BadSegmentCount(20),
    );
    // Longer than max_discard_sectors.
    let (result, _) = segment_request(&mem, request_type::WRITE_ZEROES, &[(0, 2048, 0)]);
    assert_refused(result, Status::IoErr, Invalid::SegmentTooLong(2048));
    // Past the end of the disk, and overflowing.
    let end = CAPACITY / 512;
    let (result, _) = segment_request(&mem, request_type::DISCARD, &[(end - 4, 8, 0)]);
    assert_refused(
        result,
        Status::IoErr,
        Invalid::OutOfRange {
            sector: end - 4,
            len: 4096,
        },
    );
    let (result, _) = segment_request(&mem, request_type::DISCARD, &[(u64::MAX, 8, 0)]);
    assert!(matches!(
        result.unwrap_err().reason,
        Invalid::OutOfRange { .. }
    ));
}

#[test]
fn segments_split_across_descriptors_are_gathered() {
    let mem = memory();
    write_header(&mem, HDR, request_type::WRITE_ZEROES, 0);
    // One segment whose first 4 bytes follow the header and whose other 12 are elsewhere.
    write_segment(&mem, DATA, 16, 8, 0);
    let mut seg = [0u8; 16];
    mem.read_slice(&mut seg, GuestAddress(DATA)).unwrap();
    mem.write_slice(&seg[..4], GuestAddress(HDR + 16)).unwrap();
    mem.write_slice(&seg[4..], GuestAddress(DATA + 0x1000))
        .unwrap();
    let (result, bufs) = parse_with(
        &mem,
        &[
            readable(HDR, 20),
            readable(DATA + 0x1000, 12),
            writable(STATUS, 1),
        ],
        &limits(),
    );
    assert_eq!(result.unwrap().kind, RequestKind::WriteZeroes);
    assert_eq!(
        bufs.segments,
        vec![Segment {
            offset: 8192,
            len: 4096,
            unmap: false
        }]
    );
}
