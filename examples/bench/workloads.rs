//! What the bench measures: the workloads with the targets the issue sets for each, and the
//! backends that run them.

/// One I/O pattern, in fio's terms (`rw`, `bs`, `iodepth`, one job per queue).
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub label: &'static str,
    pub rw: &'static str,
    pub bs: &'static str,
    pub iodepth: u32,
    pub queues: u32,
    /// Options vubd runs this workload with, beyond the bench's own.
    pub vubd_args: &'static [&'static str],
    /// What vubd must reach against qemu-storage-daemon on this workload.
    pub targets: &'static [Target],
}

/// A target of the issue: a ratio of vubd's figure to qemu-storage-daemon's, or to fio's.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    IopsAtLeast(f64),
    P50AtMost(f64),
    CpuAtMost(f64),
    /// MB/s against fio with `ioengine=psync` on the same file: the memory-copy ceiling on
    /// tmpfs.
    PsyncMbsAtLeast(f64),
}

pub const fn workload(
    label: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
    targets: &'static [Target],
) -> Workload {
    Workload {
        label,
        rw,
        bs,
        iodepth,
        queues: 1,
        vubd_args: &[],
        targets,
    }
}

/// Issue 15's targets at depth 1, with vubd's default (adaptive) polling.
const DEPTH_1: &[Target] = &[Target::P50AtMost(0.6), Target::CpuAtMost(1.0)];
const DEPTH_32: &[Target] = &[Target::IopsAtLeast(2.5), Target::CpuAtMost(0.5)];
/// Issue 15: near the copy ceiling. (Issue 5's 1.5x qemu-storage-daemon was out of reach: qsd
/// already reaches about two thirds of that ceiling.)
const SEQUENTIAL: &[Target] = &[Target::PsyncMbsAtLeast(0.85)];

pub const RANDREAD_QD1: Workload = workload("4k randread qd1", "randread", "4k", 1, DEPTH_1);
const RANDWRITE_QD1: Workload = workload("4k randwrite qd1", "randwrite", "4k", 1, DEPTH_1);
pub const RANDWRITE_QD32: Workload = workload("4k randwrite qd32", "randwrite", "4k", 32, DEPTH_32);
const READ_64K: Workload = workload("64k read qd8", "read", "64k", 8, SEQUENTIAL);
const WRITE_64K: Workload = workload("64k write qd8", "write", "64k", 8, SEQUENTIAL);

/// The workloads, every one with default options: vubd polls adaptively up to 32 µs, as
/// qemu-storage-daemon's iothread does.
pub const WORKLOADS: [Workload; 7] = [
    RANDREAD_QD1,
    workload("4k randread qd32", "randread", "4k", 32, DEPTH_32),
    RANDWRITE_QD1,
    RANDWRITE_QD32,
    READ_64K,
    WRITE_64K,
    Workload {
        queues: 2,
        ..workload("4k randread qd32 2q", "randread", "4k", 32, &[])
    },
];

/// What serves the disk in a run, or for fio, what the virtio path is measured against.
/// Bookkeeping a baseline build leaves out (`overhead.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Baseline {
    NoDirtyMarks,
    NoStats,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Backend {
    Vubd,
    /// vubd built without some bookkeeping, a baseline of the overhead section.
    VubdWithout(Baseline),
    Qsd,
    /// fio with io_uring straight on the data file: the limit the issue names.
    FioUring,
    /// fio with synchronous preadv/pwritev: on tmpfs, io_uring hands most transfers to kernel
    /// worker threads, and plain system calls are the faster way to the same memory.
    FioSync,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Vubd => "vubd",
            Backend::VubdWithout(Baseline::NoDirtyMarks) => "vubd without dirty-log marks",
            Backend::VubdWithout(Baseline::NoStats) => "vubd without statistics",
            Backend::Qsd => "qemu-storage-daemon",
            Backend::FioUring => "fio io_uring",
            Backend::FioSync => "fio psync",
        }
    }
}
