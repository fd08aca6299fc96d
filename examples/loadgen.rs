//! A load generator for vhost-user-blk backends, built on libblkio's Rust implementation (the
//! `blkio` crate), an independent vhost-user-blk frontend. It is how to benchmark vubd, or any
//! other vhost-user-blk backend, without a VM:
//!
//! ```text
//! cargo run --release --example loadgen -- --socket demo/vubd.sock --rw randread --bs 4k \
//!     --iodepth 32 --queues 1 --runtime 10
//! ```
//!
//! It prints IOPS, bandwidth and completion latency percentiles like fio, or one JSON object
//! with `--json`.

use std::mem::MaybeUninit;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pattern {
    RandRead,
    RandWrite,
    Read,
    Write,
}

impl Pattern {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "randread" => Pattern::RandRead,
            "randwrite" => Pattern::RandWrite,
            "read" => Pattern::Read,
            "write" => Pattern::Write,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::Read => "read",
            Pattern::Write => "write",
        }
    }

    fn is_write(self) -> bool {
        matches!(self, Pattern::RandWrite | Pattern::Write)
    }

    fn is_random(self) -> bool {
        matches!(self, Pattern::RandRead | Pattern::RandWrite)
    }
}

#[derive(Clone, Debug)]
struct Options {
    socket: String,
    pattern: Pattern,
    bs: u64,
    iodepth: usize,
    queues: usize,
    runtime: Duration,
    /// Bytes of the disk to use, from offset 0 (default: all of it).
    size: Option<u64>,
    /// Distance between the starts of consecutive blocks (default: `bs`): with a larger
    /// stride, each request lands in a block of its own, e.g. a clean bitmap granule.
    stride: Option<u64>,
    /// Keep the connection open, idle, this long after the run (an idle VM's disk).
    hold: Duration,
    /// Stop each queue after this many I/Os (instead of, or before, the runtime).
    ios: Option<u64>,
    json: bool,
}

const USAGE: &str = "usage: loadgen --socket PATH [--rw randread|randwrite|read|write] [--bs 4k] \
[--iodepth 32] [--queues 1] [--runtime 10] [--ios N] [--size BYTES] [--stride BYTES] [--hold SECS] \
[--json]";

fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1 << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("bad size '{s}'"))
}

fn parse_args() -> Result<Options, String> {
    let mut opts = Options {
        socket: String::new(),
        pattern: Pattern::RandRead,
        bs: 4096,
        iodepth: 32,
        queues: 1,
        runtime: Duration::from_secs(10),
        size: None,
        stride: None,
        ios: None,
        hold: Duration::ZERO,
        json: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--json" {
            opts.json = true;
            continue;
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{arg} needs a value\n{USAGE}"))?;
        let number = |v: &str| v.parse::<usize>().ok().filter(|n| *n > 0);
        match arg.as_str() {
            "--socket" => opts.socket = value,
            "--rw" => opts.pattern = Pattern::parse(&value).ok_or(format!("bad --rw '{value}'"))?,
            "--bs" => opts.bs = parse_size(&value)?,
            "--iodepth" => opts.iodepth = number(&value).ok_or("bad --iodepth")?,
            "--queues" => opts.queues = number(&value).ok_or("bad --queues")?,
            "--runtime" => {
                let secs: f64 = value.parse().map_err(|_| "bad --runtime")?;
                opts.runtime = Duration::try_from_secs_f64(secs).map_err(|_| "bad --runtime")?;
            }
            "--size" => opts.size = Some(parse_size(&value)?),
            "--stride" => opts.stride = Some(parse_size(&value)?),
            "--ios" => opts.ios = Some(number(&value).ok_or("bad --ios")? as u64),
            "--hold" => {
                let secs: f64 = value.parse().map_err(|_| "bad --hold")?;
                opts.hold = Duration::try_from_secs_f64(secs).map_err(|_| "bad --hold")?;
            }
            _ => return Err(format!("unknown option {arg}\n{USAGE}")),
        }
    }
    if opts.socket.is_empty() {
        return Err(format!("--socket is required\n{USAGE}"));
    }
    Ok(opts)
}

/// Latencies and counts of one queue's run.
struct QueueResult {
    ios: u64,
    latencies_ns: Vec<u64>,
}

/// A tiny xorshift generator: offsets only need to be spread, not secret.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn run_queue(
    mut q: Blkioq,
    buf: *mut u8,
    opts: &Options,
    index: usize,
    blocks: u64,
    deadline: Instant,
) -> Result<QueueResult, String> {
    let bs = opts.bs;
    let unit = opts.stride.unwrap_or(bs);
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ (index as u64 + 1));
    // Sequential streams of different queues start at different places.
    let mut next_block = (blocks / opts.queues as u64) * index as u64;
    let mut pick = || {
        if opts.pattern.is_random() {
            rng.next() % blocks
        } else {
            let b = next_block % blocks;
            next_block += 1;
            b
        }
    };
    let mut started = vec![Instant::now(); opts.iodepth];
    let submit = |q: &mut Blkioq, slot: usize, block: u64| {
        // SAFETY: each slot owns its own `bs`-byte piece of the mapped buffer.
        let ptr = unsafe { buf.add(slot * bs as usize) };
        if opts.pattern.is_write() {
            q.write(block * unit, ptr, bs as usize, slot, ReqFlags::empty());
        } else {
            q.read(block * unit, ptr, bs as usize, slot, ReqFlags::empty());
        }
    };
    for (slot, start) in started.iter_mut().enumerate() {
        *start = Instant::now();
        submit(&mut q, slot, pick());
    }
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..opts.iodepth).map(|_| MaybeUninit::uninit()).collect();
    let mut result = QueueResult {
        ios: 0,
        latencies_ns: Vec::with_capacity(1 << 20),
    };
    let mut outstanding = opts.iodepth;
    let mut submitted = opts.iodepth as u64;
    let limit = opts.ios.unwrap_or(u64::MAX);
    while outstanding > 0 {
        let n = q
            .do_io(&mut completions, 1, None, None)
            .map_err(|e| format!("queue {index}: {e}"))?;
        let now = Instant::now();
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_ref() };
            if c.ret != 0 {
                return Err(format!("queue {index}: I/O failed with {}", c.ret));
            }
            let slot = c.user_data;
            result.ios += 1;
            result
                .latencies_ns
                .push(now.duration_since(started[slot]).as_nanos() as u64);
            if now < deadline && submitted < limit {
                started[slot] = now;
                submitted += 1;
                submit(&mut q, slot, pick());
            } else {
                outstanding -= 1;
            }
        }
    }
    Ok(result)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn run(opts: Options) -> Result<(), String> {
    fn err(what: &str) -> impl Fn(blkio::Error) -> String + '_ {
        move |e| format!("{what}: {e}")
    }
    let mut blkio = Blkio::new("virtio-blk-vhost-user").map_err(err("blkio"))?;
    blkio.set_str("path", &opts.socket).map_err(err("path"))?;
    let connect = format!("connect to {}", opts.socket);
    blkio.connect().map_err(err(&connect))?;
    blkio
        .set_i32("num-queues", opts.queues as i32)
        .map_err(err("num-queues"))?;
    let read_only = blkio.get_bool("read-only").unwrap_or(false);
    if opts.pattern.is_write() && read_only {
        return Err("the device is read-only".into());
    }
    let mut outcome = blkio.start().map_err(err("start"))?;
    let capacity = blkio.get_u64("capacity").map_err(err("capacity"))?;
    let size = opts.size.unwrap_or(capacity).min(capacity);
    if opts.stride.is_some_and(|s| s < opts.bs) {
        return Err("--stride must be at least --bs".into());
    }
    let blocks = size.saturating_sub(opts.bs) / opts.stride.unwrap_or(opts.bs) + 1;
    let blocks = if size < opts.bs { 0 } else { blocks };
    if blocks == 0 {
        return Err(format!(
            "--bs {} is larger than the disk ({capacity} bytes)",
            opts.bs
        ));
    }
    let align = blkio
        .get_u64("mem-region-alignment")
        .map_err(err("alignment"))?;
    let per_queue = opts.bs * opts.iodepth as u64;
    let len = (per_queue * opts.queues as u64).div_ceil(align) * align;
    let region = blkio.alloc_mem_region(len as usize).map_err(err("alloc"))?;
    blkio.map_mem_region(&region).map_err(err("map"))?;
    let base = region.addr;
    if opts.pattern.is_write() {
        // Write data that is not all zeroes, so that no layer can shortcut it.
        // SAFETY: the region is `len` bytes of mapped memory owned by this process.
        let bytes = unsafe { std::slice::from_raw_parts_mut(base as *mut u8, len as usize) };
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(7);
        }
    }

    let start = Instant::now();
    let deadline = start + opts.runtime;
    let results: Vec<Result<QueueResult, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = outcome
            .queues
            .drain(..)
            .enumerate()
            .map(|(i, q)| {
                let opts = &opts;
                let buf = base + i * per_queue as usize;
                s.spawn(move || run_queue(q, buf as *mut u8, opts, i, blocks, deadline))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("queue thread panicked".into()))
            })
            .collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut ios = 0;
    let mut lat = Vec::new();
    for r in results {
        let r = r?;
        ios += r.ios;
        lat.extend(r.latencies_ns);
    }
    lat.sort_unstable();
    let iops = ios as f64 / elapsed;
    let bw = iops * opts.bs as f64;
    let avg = lat.iter().sum::<u64>() as f64 / lat.len().max(1) as f64;
    let us = |ns: u64| ns as f64 / 1000.0;
    let (p50, p99, p999) = (
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        percentile(&lat, 99.9),
    );
    if opts.json {
        println!(
            "{{\"rw\":\"{}\",\"bs\":{},\"iodepth\":{},\"queues\":{},\"runtime_s\":{:.3},\
\"ios\":{},\"iops\":{:.1},\"bw_bytes\":{:.0},\"lat_us\":{{\"avg\":{:.2},\"p50\":{:.2},\
\"p99\":{:.2},\"p99.9\":{:.2},\"max\":{:.2}}}}}",
            opts.pattern.name(),
            opts.bs,
            opts.iodepth,
            opts.queues,
            elapsed,
            ios,
            iops,
            bw,
            avg / 1000.0,
            us(p50),
            us(p99),
            us(p999),
            us(lat.last().copied().unwrap_or(0)),
        );
    } else {
        println!(
            "{}: bs={} iodepth={} queues={} runtime={:.2}s",
            opts.pattern.name(),
            opts.bs,
            opts.iodepth,
            opts.queues,
            elapsed
        );
        println!(
            "  IOPS={:.0}, BW={:.1}MiB/s ({:.1}MB/s), ios={}",
            iops,
            bw / (1 << 20) as f64,
            bw / 1e6,
            ios
        );
        println!(
            "  clat (usec): avg={:.2}, p50={:.2}, p99={:.2}, p99.9={:.2}, max={:.2}",
            avg / 1000.0,
            us(p50),
            us(p99),
            us(p999),
            us(lat.last().copied().unwrap_or(0))
        );
    }
    if !opts.hold.is_zero() {
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        // Connected, queues set up, nothing submitted: what an idle guest's disk looks like.
        std::thread::sleep(opts.hold);
    }
    Ok(())
}

fn main() -> ExitCode {
    match parse_args().and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
