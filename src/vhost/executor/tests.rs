//! The executor driven by `MockSplitQueue` chains over a raw file, with the synchronous engine.

use std::fs;
use std::path::PathBuf;

use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::Bytes;

use super::*;
use crate::bitmap::Action;
use crate::block::fault::{Action as Fault, FaultInjector, Rule, Trigger};
use crate::block::file::{FileNode, FileOptions};
use crate::block::filter::{Filter, FilterNode};
use crate::block::io::EngineKind;
use crate::block::qcow2::create::{create, CreateOptions};
use crate::block::raw::RawNode;
use crate::block::{open_image, BlockDriver, Format, Locking, NodeNames, OpenOptions};
use crate::export::{Export, ExportOptions};
use crate::vhost::device::DeviceOptions;
use crate::virtio_blk::request_type;

const MEM_SIZE: u64 = 0x10_0000;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x8_0000;
const DISK: usize = 1 << 20;

/// A disk file removed when dropped.
struct Disk(PathBuf);

impl Disk {
    fn new(name: &str) -> Disk {
        let path =
            std::env::temp_dir().join(format!("vubd-executor-{}-{name}.raw", std::process::id()));
        fs::write(&path, vec![0u8; DISK]).unwrap();
        Disk(path)
    }

    fn bytes(&self) -> Vec<u8> {
        fs::read(&self.0).unwrap()
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn raw(disk: &Disk) -> Arc<dyn BlockDriver> {
    let file = FileNode::open(
        &disk.0,
        FileOptions {
            read_only: false,
            direct: false,
            lock: None,
        },
    )
    .unwrap();
    Arc::new(RawNode::new(Arc::new(file)))
}

fn executor(root: Arc<dyn BlockDriver>) -> Executor {
    let export = Export::new(
        root,
        ExportOptions {
            id: "disk".into(),
            read_only: false,
            writers: 1,
            engine: EngineKind::Sync,
            poll: crate::vhost::poll::PollPolicy::OFF,
            node_names: NodeNames::derived("disk"),
            bitmaps: Default::default(),
        },
    )
    .unwrap();
    let device = BlkDevice::new(
        Arc::new(export),
        DeviceOptions {
            num_queues: 1,
            queue_size: 16,
            serial: b"executor-test".to_vec(),
            logical_block_size: 512,
        },
    )
    .unwrap();
    // The synchronous engine signals no eventfd.
    Executor::new(
        0,
        Arc::new(device),
        Arc::new(AtomicBool::new(true)),
        -1,
        Arc::new(DirtyLog::default()),
    )
    .unwrap()
}

fn memory() -> Arc<GuestMemory> {
    Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap())
}

fn readable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
}

fn writable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(
        addr,
        len,
        VRING_DESC_F_WRITE as u16,
        0,
    ))
}

fn header(mem: &GuestMemory, request_type: u32, sector: u64) {
    let mut bytes = [0u8; 16];
    bytes[..4].copy_from_slice(&request_type.to_le_bytes());
    bytes[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&bytes, GuestAddress(HDR)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
}

/// Start one request made of `descs` and run it as far as the engine allows.
fn run(exec: &mut Executor, mem: &Arc<GuestMemory>, descs: &[RawDescriptor]) {
    let queue = MockSplitQueue::new(&**mem, 16);
    let chain = queue.build_desc_chain(descs).unwrap();
    assert!(exec.has_free_slot());
    exec.start(chain.head_index(), chain, mem);
    exec.complete_ready();
}

fn done(exec: &mut Executor) -> Vec<(u16, u32)> {
    exec.take_done().collect()
}

fn status(mem: &GuestMemory) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

fn write(exec: &mut Executor, mem: &Arc<GuestMemory>, sector: u64, data: &[u8]) {
    header(mem, request_type::OUT, sector);
    mem.write_slice(data, GuestAddress(DATA)).unwrap();
    let len = data.len() as u32;
    run(
        exec,
        mem,
        &[readable(HDR, 16), readable(DATA, len), writable(STATUS, 1)],
    );
}

#[test]
fn a_write_then_a_read_round_trip_with_statuses_and_used_lengths() {
    let disk = Disk::new("round-trip");
    let mut exec = executor(raw(&disk));
    let mem = memory();
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    write(&mut exec, &mem, 8, &data);
    assert_eq!(done(&mut exec), vec![(0, 1)]);
    assert_eq!(status(&mem), Status::Ok as u8);
    assert_eq!(&disk.bytes()[4096..8192], &data[..]);
    assert_eq!(exec.in_flight(), 0);

    header(&mem, request_type::IN, 8);
    mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
    // The data cut in two descriptors.
    run(
        &mut exec,
        &mem,
        &[
            readable(HDR, 16),
            writable(DATA, 1000),
            writable(DATA + 1000, 3096),
            writable(STATUS, 1),
        ],
    );
    assert_eq!(done(&mut exec), vec![(0, 4097)]);
    assert_eq!(status(&mem), Status::Ok as u8);
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, data);
}

#[test]
fn refused_and_dropped_chains_are_answered_at_once_and_touch_nothing() {
    let disk = Disk::new("refused");
    let mut exec = executor(raw(&disk));
    let mem = memory();
    // Beyond the end of the disk: IOERR, one byte used.
    header(&mem, request_type::OUT, (DISK / 512) as u64);
    run(
        &mut exec,
        &mem,
        &[readable(HDR, 16), readable(DATA, 512), writable(STATUS, 1)],
    );
    assert_eq!(done(&mut exec), vec![(0, 1)]);
    assert_eq!(status(&mem), Status::IoErr as u8);
    // No status byte: returned with nothing written.
    header(&mem, request_type::OUT, 0);
    run(&mut exec, &mem, &[readable(HDR, 16), readable(DATA, 512)]);
    assert_eq!(done(&mut exec), vec![(0, 0)]);
    assert_eq!(status(&mem), 0xff, "no status byte to write");
    assert!(disk.bytes().iter().all(|&b| b == 0));
    assert_eq!(exec.in_flight(), 0);
}

#[test]
fn get_id_writes_the_serial_bounded_by_the_buffer() {
    let disk = Disk::new("get-id");
    let mut exec = executor(raw(&disk));
    let mem = memory();
    header(&mem, request_type::GET_ID, 0);
    mem.write_slice(&[0xee; 32], GuestAddress(DATA)).unwrap();
    run(
        &mut exec,
        &mem,
        &[readable(HDR, 16), writable(DATA, 8), writable(STATUS, 1)],
    );
    assert_eq!(done(&mut exec), vec![(0, 9)]);
    let mut id = [0u8; 10];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"executor\xee\xee");
}

#[test]
fn writes_mark_bitmaps_and_wait_while_the_write_gate_is_closed() {
    let disk = Disk::new("gate");
    let mut exec = executor(raw(&disk));
    let export = exec.device.export().clone();
    export
        .bitmaps()
        .apply(Action::Add {
            name: "b".into(),
            granularity: Some(65536),
            persistent: false,
            disabled: false,
        })
        .unwrap();
    let mem = memory();
    let drained = export
        .bitmaps()
        .gate()
        .drain(std::time::Duration::from_secs(1))
        .unwrap();
    write(&mut exec, &mem, 256, &[1u8; 512]);
    assert!(exec.has_deferred());
    assert_eq!(done(&mut exec), vec![]);
    assert_eq!(exec.in_flight(), 1);
    assert!(!exec.run_deferred(), "the gate is still closed");
    assert_eq!(export.bitmaps().infos()[0].count, 0);
    // Reads are not held back.
    header(&mem, request_type::IN, 0);
    run(
        &mut exec,
        &mem,
        &[
            readable(HDR, 16),
            writable(DATA + 4096, 512),
            writable(STATUS, 1),
        ],
    );
    assert_eq!(done(&mut exec), vec![(0, 513)]);

    drop(drained);
    assert!(exec.run_deferred());
    exec.complete_ready();
    assert_eq!(done(&mut exec), vec![(0, 1)]);
    assert_eq!(&disk.bytes()[256 * 512..257 * 512], &[1u8; 512][..]);
    assert_eq!(export.bitmaps().infos()[0].count, 65536);
}

/// Fails every write before it reaches the disk, or notes the writes that get through.
#[derive(Debug, Default)]
struct FailWrites {
    fail: bool,
    after: std::sync::Mutex<Vec<(u64, bool)>>,
}

impl Filter for FailWrites {
    fn name(&self) -> &'static str {
        "fail-writes"
    }

    fn before_write(&self, _: &dyn BlockDriver, _: u64, _: u64) -> Result<(), BlockError> {
        if self.fail {
            return Err(BlockError::from(std::io::Error::from_raw_os_error(
                libc::EIO,
            )));
        }
        Ok(())
    }

    fn wants_after_write(&self) -> bool {
        true
    }

    fn after_write(&self, offset: u64, _: u64, ok: bool) {
        self.after.lock().unwrap().push((offset, ok));
    }
}

#[test]
fn a_filter_in_the_graph_acts_around_queue_writes() {
    let disk = Disk::new("filter");
    let passing = Arc::new(FilterNode::new(FailWrites::default(), raw(&disk)));
    let mut exec = executor(passing.clone());
    let mem = memory();
    write(&mut exec, &mem, 2, &[5u8; 1024]);
    assert_eq!(done(&mut exec), vec![(0, 1)]);
    assert_eq!(status(&mem), Status::Ok as u8);
    assert_eq!(*passing.filter().after.lock().unwrap(), vec![(1024, true)]);
    drop(exec);

    let failing = FailWrites {
        fail: true,
        ..FailWrites::default()
    };
    let mut exec = executor(Arc::new(FilterNode::new(failing, raw(&disk))));
    write(&mut exec, &mem, 4, &[6u8; 512]);
    assert_eq!(done(&mut exec), vec![(0, 1)]);
    assert_eq!(status(&mem), Status::IoErr as u8);
    let bytes = disk.bytes();
    assert_eq!(&bytes[1024..2048], &[5u8; 1024][..]);
    assert_eq!(
        &bytes[2048..2560],
        &[0u8; 512][..],
        "the failed write never landed"
    );
}

/// qcow2 metadata in place of `meta` over the raw `disk`, served with a persistent recording
/// bitmap of 4 KiB granules, its files watched by `fault`.
fn qcow2_with_bitmap(meta: &Disk, disk: &Disk, fault: Arc<FaultInjector>) -> Executor {
    fs::remove_file(&meta.0).unwrap();
    create(
        &meta.0,
        &CreateOptions {
            size: None,
            cluster_size: 65536,
            data_file: Some(disk.0.clone()),
        },
    )
    .unwrap();
    let root = open_image(
        &meta.0,
        Format::Qcow2,
        &OpenOptions {
            locking: Locking::Off,
            fault: Some(fault),
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let exec = executor(root);
    exec.device
        .export()
        .bitmaps()
        .apply(Action::Add {
            name: "b".into(),
            granularity: Some(4096),
            persistent: true,
            disabled: false,
        })
        .unwrap();
    exec
}

/// Run deferred requests until one is done.
fn wait_done(exec: &mut Executor) -> Vec<(u16, u32)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        exec.run_deferred();
        exec.complete_ready();
        let d = done(exec);
        if !d.is_empty() {
            return d;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the group commit never completed"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn a_first_touch_reaches_the_disk_only_after_its_mark_is_committed() {
    let disk = Disk::new("commit-data");
    let meta = Disk::new("commit-meta");
    let fault = FaultInjector::counting();
    let mut exec = qcow2_with_bitmap(&meta, &disk, fault.clone());
    let syncs = fault.counts().syncs;
    let mem = memory();
    write(&mut exec, &mem, 8, &[0xab; 4096]);
    assert!(done(&mut exec).is_empty(), "waits for the group commit");
    assert!(
        disk.bytes().iter().all(|&b| b == 0),
        "no data before the mark"
    );
    assert_eq!(wait_done(&mut exec), vec![(0, 1)]);
    assert_eq!(status(&mem), Status::Ok as u8);
    assert_eq!(&disk.bytes()[4096..8192], &[0xab; 4096][..]);
    assert_eq!(fault.counts().syncs, syncs + 1, "one sync: the commit");
    // The granule is durable now: the next write to it goes straight through.
    write(&mut exec, &mem, 8, &[0xcd; 4096]);
    assert_eq!(done(&mut exec), vec![(0, 1)]);
    assert_eq!(fault.counts().syncs, syncs + 1);
}

#[test]
fn a_write_whose_mark_cannot_be_committed_fails_and_writes_nothing() {
    let disk = Disk::new("commit-fail-data");
    let meta = Disk::new("commit-fail-meta");
    let fault = FaultInjector::new(Rule {
        trigger: Trigger::Event("bitmap_commit", 1),
        action: Fault::Fail,
    });
    let mut exec = qcow2_with_bitmap(&meta, &disk, fault.clone());
    let mem = memory();
    write(&mut exec, &mem, 0, &[0xab; 4096]);
    assert_eq!(wait_done(&mut exec), vec![(0, 1)]);
    assert!(fault.fired());
    assert_eq!(status(&mem), Status::IoErr as u8);
    assert!(
        disk.bytes().iter().all(|&b| b == 0),
        "the data never reached the disk"
    );
    // The next commit succeeds: the same write goes through.
    write(&mut exec, &mem, 0, &[0xab; 4096]);
    assert_eq!(wait_done(&mut exec), vec![(0, 1)]);
    assert_eq!(status(&mem), Status::Ok as u8);
    assert_eq!(&disk.bytes()[..4096], &[0xab; 4096][..]);
}
