//! Micro-benchmarks of the per-request fast path, so that regressions show in nanoseconds:
//! parsing a request, mapping it through the block graph (raw, and qcow2 over a raw data
//! file), and marking dirty bitmaps.
//!
//! `cargo bench --bench fast_path`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use vubd::bitmap::{Action, BitmapManager, Persistence, WriteGate};
use vubd::block::qcow2::create::{create, CreateOptions};
use vubd::block::{open_image, Format, GuestIo, OpenOptions};
use vubd::virtio_blk::request::{parse, GuestMemory, RequestBuffers};
use vubd::virtio_blk::DeviceLimits;

const DISK: u64 = 1 << 30;

fn limits() -> DeviceLimits {
    DeviceLimits {
        capacity_bytes: DISK,
        logical_block_size: 512,
        seg_max: 254,
        max_discard_sectors: 1 << 21,
        max_discard_seg: 32,
        discard_sector_alignment: 8,
        read_only: false,
    }
}

fn bench_parse(c: &mut Criterion) {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    mem.write_obj(1u32.to_le(), GuestAddress(0x10_0000))
        .unwrap(); // VIRTIO_BLK_T_OUT
    mem.write_obj(4096u64.to_le(), GuestAddress(0x10_0008))
        .unwrap();
    let queue = MockSplitQueue::new(&mem, 256);
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(0x10_0000, 16, 0, 0)),
        RawDescriptor::from(SplitDescriptor::new(0x20_0000, 4096, 0, 0)),
        RawDescriptor::from(SplitDescriptor::new(
            0x30_0000,
            1,
            VRING_DESC_F_WRITE as u16,
            0,
        )),
    ];
    let chain = queue.build_desc_chain(&descs).unwrap();
    let limits = limits();
    let mut bufs = RequestBuffers::with_limits(&limits);
    c.bench_function("parse 4k write", |b| {
        b.iter_batched(
            || chain.clone(),
            |chain| black_box(parse(&mut { chain }, &mem, &limits, &mut bufs).is_ok()),
            BatchSize::SmallInput,
        )
    });
}

fn bench_map(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("vubd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let raw = dir.join("disk.raw");
    std::fs::File::create(&raw).unwrap().set_len(DISK).unwrap();
    let meta = dir.join("meta.qcow2");
    create(
        &meta,
        &CreateOptions {
            size: None,
            cluster_size: 65536,
            data_file: Some(raw.clone()),
        },
    )
    .unwrap();
    // One node at a time: both use disk.raw, and each locks it as a writer.
    for (name, image, format) in [
        ("map 4k write, raw", &raw, Format::Raw),
        (
            "map 4k write, qcow2 over raw data file",
            &meta,
            Format::Qcow2,
        ),
    ] {
        let node = open_image(image, format, &OpenOptions::default()).unwrap();
        let mut extents = Vec::with_capacity(4);
        let mut offset = 0u64;
        c.bench_function(name, |b| {
            b.iter(|| {
                extents.clear();
                offset = (offset + 7 * 4096 * 1021) % (DISK - 4096);
                let ticket = node
                    .map_write(black_box(offset), 4096, GuestIo::none(), &mut extents)
                    .unwrap();
                node.release(ticket, true);
                black_box(&extents);
            })
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn bench_mark(c: &mut Criterion) {
    for n in [0usize, 1, 8] {
        let m = BitmapManager::open(
            "disk",
            DISK,
            None,
            false,
            Persistence::default(),
            Arc::new(WriteGate::new(1)),
        )
        .unwrap();
        for i in 0..n {
            m.apply(Action::Add {
                name: format!("b{i}"),
                granularity: None,
                persistent: false,
                disabled: false,
            })
            .unwrap();
        }
        let mut cursor = m.cursor();
        let mut offset = 0u64;
        c.bench_function(&format!("mark 4k write, {n} bitmaps"), |b| {
            b.iter(|| {
                offset = (offset + 7 * 4096 * 1021) % (DISK - 4096);
                black_box(m.mark(&mut cursor, black_box(offset), 4096))
            })
        });
    }
}

criterion_group!(fast_path, bench_parse, bench_map, bench_mark);
criterion_main!(fast_path);
