//! I/O statistics of an export, per queue: requests, bytes, failures, requests refused as
//! invalid, requests in flight, and latency histograms, for each kind of request.
//!
//! Counting costs the request path no shared atomic: each queue worker owns its
//! [`QueueStats`] and is its only writer (a relaxed load and store per counter, no locked
//! instruction, no cache line shared with another queue). Readers (QMP `query-blockstats`, the
//! Prometheus endpoint) sum what the workers publish, plus what workers of connections that
//! ended left behind ([`ExportStats`]).

pub mod endpoint;
pub mod prometheus;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// When a request started, for its latency. Built with `--cfg vubd_no_stats` (the baseline
/// `make bench` measures counting against) it is nothing, and counting compiles away.
#[derive(Clone, Copy, Debug)]
pub struct Stamp(#[cfg(not(vubd_no_stats))] u64);

#[cfg(not(vubd_no_stats))]
impl Stamp {
    #[inline]
    pub fn now() -> Stamp {
        Stamp(clock::ticks())
    }

    #[inline]
    pub fn elapsed(self) -> Duration {
        clock::duration(clock::ticks().saturating_sub(self.0))
    }
}

/// The clock of request latencies: two reads per request, so it must be cheap. On x86-64
/// with an invariant TSC (the same rate on every core, in every power state: `constant_tsc`
/// and `nonstop_tsc`), the time-stamp counter, a few instructions where `clock_gettime` costs
/// about a hundred (callgrind); its rate is measured once against the monotonic clock.
/// Elsewhere, the monotonic clock in nanoseconds.
#[cfg(not(vubd_no_stats))]
mod clock {
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    /// Nanoseconds per tick, or `None` to read the monotonic clock.
    fn scale() -> Option<f64> {
        static SCALE: OnceLock<Option<f64>> = OnceLock::new();
        *SCALE.get_or_init(calibrate)
    }

    #[cfg(target_arch = "x86_64")]
    fn calibrate() -> Option<f64> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
        let has = |f: &str| flags.split_whitespace().any(|x| x == f);
        if !has("constant_tsc") || !has("nonstop_tsc") {
            return None;
        }
        // 2 ms: what reading the two clocks apart costs (tens of ns) is then a few parts in
        // 100 000, and starting a disk waits no longer (20 ms was a third of the time to
        // serve a 1 TiB disk with 8 bitmaps).
        let (t0, c0) = (Instant::now(), tsc());
        std::thread::sleep(Duration::from_millis(2));
        let (t1, c1) = (Instant::now(), tsc());
        let ticks = c1.checked_sub(c0).filter(|t| *t > 0)?;
        Some(t1.duration_since(t0).as_nanos() as f64 / ticks as f64)
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn calibrate() -> Option<f64> {
        None
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    fn tsc() -> u64 {
        // SAFETY: RDTSC has no preconditions; it reads the time-stamp counter.
        unsafe { core::arch::x86_64::_rdtsc() }
    }

    #[cfg(not(target_arch = "x86_64"))]
    #[inline]
    fn tsc() -> u64 {
        0
    }

    /// Now, in the clock's ticks.
    #[inline]
    pub fn ticks() -> u64 {
        match scale() {
            Some(_) => tsc(),
            None => monotonic_ns(),
        }
    }

    /// `ticks` as a duration.
    #[inline]
    pub fn duration(ticks: u64) -> Duration {
        match scale() {
            Some(scale) => Duration::from_nanos((ticks as f64 * scale) as u64),
            None => Duration::from_nanos(ticks),
        }
    }

    fn monotonic_ns() -> u64 {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        let origin = *ORIGIN.get_or_init(Instant::now);
        u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Start calibrating now, in the background: off the request path, and off the way to
    /// serving (2 ms, and reading `/proc/cpuinfo`: 4 ms in all on a 2-CPU VM, a sixth of the
    /// time to open a 1 TiB disk with 8 bitmaps). A request before it ends waits for it once.
    pub fn prepare() {
        static STARTED: std::sync::Once = std::sync::Once::new();
        STARTED.call_once(|| {
            if crate::thread::spawn_quiet("vubd-clock", scale).is_err() {
                let _ = scale();
            }
        });
    }
}

#[cfg(vubd_no_stats)]
impl Stamp {
    #[inline]
    pub fn now() -> Stamp {
        Stamp()
    }

    #[inline]
    pub fn elapsed(self) -> Duration {
        Duration::ZERO
    }
}

/// Whether this build counts (see [`Stamp`]).
const COUNTING: bool = !cfg!(vubd_no_stats);

/// The kinds of request counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

impl OpKind {
    pub const ALL: [OpKind; 5] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Flush,
        OpKind::Discard,
        OpKind::WriteZeroes,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Discard => "discard",
            OpKind::WriteZeroes => "write_zeroes",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Bounds of the latency histogram's buckets, in microseconds: bucket `i` holds latencies
/// below bound `i` and not below bound `i - 1` (QEMU's half-open bins), a last bucket the
/// rest. Powers of two from 8 µs to about 1 s cover a memory copy to a stalled disk.
pub const LATENCY_BOUNDS_US: [u64; 18] = [
    8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131_072, 262_144,
    524_288, 1_048_576,
];
const BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1;

fn bucket(latency: Duration) -> usize {
    // Bound i is 8 µs << i: the bucket is the bit length of the latency in 8 µs units.
    let units = u64::try_from(latency.as_nanos() / 8000).unwrap_or(u64::MAX);
    (64 - units.leading_zeros() as usize).min(LATENCY_BOUNDS_US.len())
}

/// A counter with one writer: adding is a relaxed load and store, which needs no locked
/// instruction; readers see every update eventually, never a torn value.
#[derive(Default)]
struct Counter(AtomicU64);

impl Counter {
    #[inline]
    fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
struct OpCounters {
    ops: Counter,
    bytes: Counter,
    failed: Counter,
    invalid: Counter,
    total_ns: Counter,
    latency: [Counter; BUCKETS],
}

/// One queue worker's counters. Only that worker writes them.
#[derive(Default)]
#[repr(align(64))]
pub struct QueueStats {
    ops: [OpCounters; 5],
    started: Counter,
    finished: Counter,
    /// The highest byte offset written, plus one (QEMU's `wr_highest_offset`).
    highest_write_end: AtomicU64,
}

impl QueueStats {
    /// A request was started.
    #[inline]
    pub fn start(&self) {
        if !COUNTING {
            return;
        }
        self.started.add(1);
    }

    /// A started request finished: `bytes` moved (asked for, for failed requests), after
    /// `latency`.
    #[inline]
    pub fn finish(&self, kind: OpKind, bytes: u64, failed: bool, latency: Duration) {
        if !COUNTING {
            return;
        }
        let c = &self.ops[kind.index()];
        if failed {
            c.failed.add(1);
        } else {
            c.ops.add(1);
            c.bytes.add(bytes);
            c.total_ns
                .add(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
            c.latency[bucket(latency)].add(1);
        }
        self.finished.add(1);
    }

    /// A write ending at byte `end` succeeded.
    #[inline]
    pub fn wrote_up_to(&self, end: u64) {
        if COUNTING && end > self.highest_write_end.load(Ordering::Relaxed) {
            self.highest_write_end.store(end, Ordering::Relaxed);
        }
    }

    /// A request was refused before it started (invalid in the guest's making).
    #[inline]
    pub fn invalid(&self, kind: Option<OpKind>) {
        if let (Some(kind), true) = (kind, COUNTING) {
            self.ops[kind.index()].invalid.add(1);
        }
    }

    fn snapshot(&self) -> QueueSnapshot {
        let mut s = QueueSnapshot::default();
        for kind in OpKind::ALL {
            let c = &self.ops[kind.index()];
            let o = &mut s.ops[kind.index()];
            o.ops = c.ops.get();
            o.bytes = c.bytes.get();
            o.failed = c.failed.get();
            o.invalid = c.invalid.get();
            o.total_ns = c.total_ns.get();
            for (bin, counter) in o.latency.iter_mut().zip(&c.latency) {
                *bin = counter.get();
            }
        }
        // Finished is read first: a request finishing meanwhile cannot make in-flight negative.
        let finished = self.finished.get();
        s.in_flight = self.started.get().saturating_sub(finished);
        s.highest_write_end = self.highest_write_end.load(Ordering::Relaxed);
        s
    }
}

/// Counts of one kind of request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpSnapshot {
    /// Requests that succeeded.
    pub ops: u64,
    pub bytes: u64,
    pub failed: u64,
    pub invalid: u64,
    /// Time the successful requests took, in all.
    pub total_ns: u64,
    /// Successful requests per latency bucket ([`LATENCY_BOUNDS_US`], then the rest).
    pub latency: [u64; BUCKETS],
}

impl OpSnapshot {
    /// Add `other`'s counts.
    pub fn add(&mut self, other: &OpSnapshot) {
        self.ops += other.ops;
        self.bytes += other.bytes;
        self.failed += other.failed;
        self.invalid += other.invalid;
        self.total_ns += other.total_ns;
        for (a, b) in self.latency.iter_mut().zip(&other.latency) {
            *a += b;
        }
    }
}

/// A queue's counts at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueSnapshot {
    ops: [OpSnapshot; 5],
    pub in_flight: u64,
    pub highest_write_end: u64,
}

impl QueueSnapshot {
    pub fn op(&self, kind: OpKind) -> &OpSnapshot {
        &self.ops[kind.index()]
    }

    /// Add `other`'s counts (in-flight requests included).
    pub fn add(&mut self, other: &QueueSnapshot) {
        for (a, b) in self.ops.iter_mut().zip(&other.ops) {
            a.add(b);
        }
        self.in_flight += other.in_flight;
        self.highest_write_end = self.highest_write_end.max(other.highest_write_end);
    }
}

/// Every queue worker's counters of one export, for as long as the export is served: workers
/// come and go with frontend connections, their counts stay.
#[derive(Default)]
pub struct ExportStats {
    inner: Mutex<Registry>,
}

impl ExportStats {
    /// Statistics of an export with `queues` queues: each is reported, at zero, from the start.
    pub fn with_queues(queues: usize) -> ExportStats {
        #[cfg(not(vubd_no_stats))]
        clock::prepare();
        ExportStats {
            inner: Mutex::new(Registry {
                live: Vec::new(),
                retired: vec![QueueSnapshot::default(); queues],
            }),
        }
    }
}

impl std::fmt::Debug for ExportStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportStats").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Registry {
    live: Vec<(usize, Weak<QueueStats>)>,
    /// What ended workers counted, per queue index.
    retired: Vec<QueueSnapshot>,
}

impl ExportStats {
    /// Counters for a new worker of queue `index`.
    pub fn register(&self, index: usize) -> Arc<QueueStats> {
        let stats = Arc::new(QueueStats::default());
        let mut registry = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        registry.collect_ended();
        registry.live.push((index, Arc::downgrade(&stats)));
        stats
    }

    /// A worker ends (its counters are final): keep its counts.
    pub fn retire(&self, index: usize, stats: &Arc<QueueStats>) {
        let mut registry = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        registry
            .live
            .retain(|(_, w)| !std::ptr::eq(w.as_ptr(), Arc::as_ptr(stats)));
        let mut snapshot = stats.snapshot();
        // An ended worker has nothing in flight.
        snapshot.in_flight = 0;
        registry.retire_snapshot(index, &snapshot);
    }

    /// Each queue's counts now, by queue index.
    pub fn per_queue(&self) -> Vec<QueueSnapshot> {
        let mut registry = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        registry.collect_ended();
        let mut queues = registry.retired.clone();
        for (index, weak) in &registry.live {
            if let Some(stats) = weak.upgrade() {
                if queues.len() <= *index {
                    queues.resize(index + 1, QueueSnapshot::default());
                }
                queues[*index].add(&stats.snapshot());
            }
        }
        queues
    }

    /// The whole export's counts now.
    pub fn total(&self) -> QueueSnapshot {
        let mut total = QueueSnapshot::default();
        for queue in self.per_queue() {
            total.add(&queue);
        }
        total
    }
}

impl Registry {
    /// Forget workers dropped without `retire` (their counts are lost only if nobody retired
    /// them, which the executor always does).
    fn collect_ended(&mut self) {
        self.live.retain(|(_, w)| w.strong_count() > 0);
    }

    fn retire_snapshot(&mut self, index: usize, snapshot: &QueueSnapshot) {
        if self.retired.len() <= index {
            self.retired.resize(index + 1, QueueSnapshot::default());
        }
        self.retired[index].add(snapshot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_kind_with_bytes_failures_and_latency() {
        let stats = ExportStats::default();
        let q = stats.register(0);
        q.start();
        q.finish(OpKind::Read, 4096, false, Duration::from_micros(5));
        q.start();
        q.finish(OpKind::Read, 8192, false, Duration::from_micros(100));
        q.start();
        q.finish(OpKind::Write, 512, true, Duration::from_micros(1));
        q.wrote_up_to(1 << 20);
        q.invalid(Some(OpKind::Discard));
        q.start();
        let total = stats.total();
        let read = total.op(OpKind::Read);
        assert_eq!((read.ops, read.bytes, read.failed), (2, 12288, 0));
        assert_eq!(read.total_ns, 105_000);
        assert_eq!(read.latency[0], 1, "5 µs is in the first bucket (< 8 µs)");
        assert_eq!(read.latency[4], 1, "100 µs is in the [64, 128) µs bucket");
        assert_eq!(
            bucket(Duration::from_micros(8)),
            1,
            "bins are half-open, as QEMU's"
        );
        assert_eq!(bucket(Duration::from_nanos(7999)), 0);
        let write = total.op(OpKind::Write);
        assert_eq!((write.ops, write.bytes, write.failed), (0, 0, 1));
        assert_eq!(total.op(OpKind::Discard).invalid, 1);
        assert_eq!(total.in_flight, 1);
        assert_eq!(total.highest_write_end, 1 << 20);
        assert_eq!(bucket(Duration::from_secs(5)), BUCKETS - 1);
        // Every bound starts the next bucket, and the nanosecond before it is in its own.
        for (i, bound) in LATENCY_BOUNDS_US.iter().enumerate() {
            assert_eq!(bucket(Duration::from_micros(*bound)), i + 1, "{bound} µs");
            assert_eq!(
                bucket(Duration::from_nanos(bound * 1000 - 1)),
                i,
                "just under {bound} µs"
            );
            assert_eq!(*bound, 8 << i, "the bounds are 8 µs << i");
        }
    }

    #[test]
    #[cfg(not(vubd_no_stats))]
    fn stamps_measure_time() {
        let start = Stamp::now();
        std::thread::sleep(Duration::from_millis(30));
        let elapsed = start.elapsed();
        // Whatever the clock (TSC calibrated against the monotonic clock, or that clock), a
        // sleep of 30 ms takes at least about that long; the upper bound only catches a wrong
        // scale by orders of magnitude.
        assert!(elapsed >= Duration::from_millis(25), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");
    }

    #[test]
    fn counts_outlive_the_workers_that_made_them() {
        let stats = ExportStats::default();
        for connection in 0..3 {
            let q0 = stats.register(0);
            let q1 = stats.register(1);
            q0.start();
            q0.finish(OpKind::Flush, 0, false, Duration::from_micros(10));
            q1.start();
            q1.finish(OpKind::Write, 4096, false, Duration::from_micros(10));
            q1.start(); // left in flight when the connection ends
            let per_queue = stats.per_queue();
            assert_eq!(per_queue[0].op(OpKind::Flush).ops, connection + 1);
            assert_eq!(per_queue[1].in_flight, 1);
            stats.retire(0, &q0);
            stats.retire(1, &q1);
        }
        let per_queue = stats.per_queue();
        assert_eq!(per_queue.len(), 2);
        assert_eq!(per_queue[0].op(OpKind::Flush).ops, 3);
        assert_eq!(per_queue[1].op(OpKind::Write).bytes, 3 * 4096);
        assert_eq!(per_queue[1].in_flight, 0);
    }
}
