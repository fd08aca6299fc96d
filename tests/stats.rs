//! I/O statistics: QMP `query-blockstats` and the Prometheus endpoint (`--metrics`).
//!
//! * The same libblkio sequence on vubd and on qemu-storage-daemon, both started with the same
//!   qemu-storage-daemon command line over the mission graph (qcow2 metadata over a raw data
//!   file, one persistent bitmap, two queues): vubd reports what the sequence implies, and what
//!   qemu-storage-daemon reports of it too.
//! * `GET /metrics` on `--metrics unix:PATH` and `tcp:ADDR:PORT` agrees with QMP, per queue,
//!   per kind of request, with histograms that add up, and with the bitmap's dirty count.
//! * Counts outlive the frontend connection that made them.
//! * Requests past the end of the disk are counted invalid, not failed.
//! * A bad `--metrics` is refused with an error naming it.
//!
//! What qemu-storage-daemon can tell (QEMU 10): its vhost-user-blk export accounts nothing
//! (block/export/virtio-blk-handler.c calls no `block_acct_*`), and the export's BlockBackend
//! has neither a name nor a device, so `query-blockstats` returns `[]`. With `query-nodes:
//! true` it lists every node with node-level statistics, where only `wr_highest_offset` moves
//! (for every tracked write, write-zeroes included): that, and the set of keys, are what vubd
//! is compared with. The counters' oracle is QEMU's virtio-blk device model
//! (hw/block/virtio-blk.c): reads and writes by the bytes asked for, write-zeroes as writes,
//! flushes; out-of-range reads, writes and write-zeroes counted invalid. QEMU's virtio-blk does
//! not account discards at all; vubd counts them as unmaps, as it documents, and that is what
//! is checked for them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::bitmaps::vubd_bitmap;
use common::blkio_client::{BlkioClient, Errno};
use common::cli::one_line_error;
use common::qmp::Qmp;
use common::qsd::{Daemon, Export};
use common::{create_image, pattern, raw_with_metadata, vubd_bin, TempDir};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const DISK: u64 = 32 * MIB;
const QUEUES: usize = 2;
const BITMAP: &str = "b0";
const GRANULE: u64 = 64 * KIB;
/// How long one step (a libblkio sequence, a daemon's exit) may take before the test calls it
/// stuck.
const DEADLINE: Duration = Duration::from_secs(20);
/// EIO, as libblkio returns a request the device answered with `VIRTIO_BLK_S_IOERR`.
const EIO: Errno = -libc::EIO;

// ---------------------------------------------------------------------------------------------
// The graph, the daemons and the I/O.

/// `disk.raw` with `meta.qcow2` beside it (made by `vubd create`) and the persistent bitmap
/// [`BITMAP`] (by `vubd bitmap add`), in a new scratch directory.
fn graph(name: &str) -> TempDir {
    let dir = TempDir::new(name);
    raw_with_metadata(&dir, DISK as usize, 7);
    vubd_bitmap(&dir, &["add", BITMAP]);
    dir
}

/// The qemu-storage-daemon command line both daemons get: qcow2 node `fmt` over `meta` with
/// data file `data`, `discard=unmap`, a vhost-user-blk export with [`QUEUES`] queues and a QMP
/// monitor.
fn export(dir: &TempDir) -> Export {
    Export::new(
        &dir.join("meta.qcow2"),
        Some(&dir.join("disk.raw")),
        &dir.join("blk.sock"),
    )
    .monitor(&dir.join("qmp.sock"))
    .discard_unmap()
    .queues(QUEUES)
}

/// Run `f` on a thread; fail if it does not finish within [`DEADLINE`] (a daemon that stopped
/// answering leaves libblkio waiting forever; the daemon guards kill it as the test unwinds).
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(value) => value,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: not done within {DEADLINE:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: failed (see above)"),
    }
}

/// A libblkio client of `socket` with [`QUEUES`] queues.
fn connect(socket: &Path, who: &str) -> BlkioClient {
    let socket = socket.to_path_buf();
    within(&format!("{who}: libblkio connect"), move || {
        BlkioClient::connect(&socket, QUEUES).expect("libblkio connect")
    })
}

#[derive(Clone, Copy, Debug)]
enum Req {
    Read { offset: u64, len: u64 },
    Write { offset: u64, len: u64 },
    Flush,
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64 },
}

impl Req {
    /// The `op` label vubd gives it.
    fn op(self) -> &'static str {
        match self {
            Req::Read { .. } => "read",
            Req::Write { .. } => "write",
            Req::Flush => "flush",
            Req::Discard { .. } => "discard",
            Req::WriteZeroes { .. } => "write_zeroes",
        }
    }

    fn bytes(self) -> u64 {
        match self {
            Req::Read { len, .. }
            | Req::Write { len, .. }
            | Req::Discard { len, .. }
            | Req::WriteZeroes { len, .. } => len,
            Req::Flush => 0,
        }
    }
}

const OPS: [&str; 5] = ["read", "write", "flush", "discard", "write_zeroes"];

/// The sequence both daemons get, as (queue, request): 10 reads of 4 KiB and 3 of 64 KiB,
/// 7 writes of 8 KiB (ending at most at 7 MiB + 12 KiB), 2 flushes, a discard of 1 MiB at
/// 16 MiB and a write-zeroes of 64 KiB at 20 MiB — the highest write of all — spread over both
/// queues.
fn sequence() -> Vec<(usize, Req)> {
    let mut seq = Vec::new();
    for i in 0..10u64 {
        let read = Req::Read {
            offset: i * 256 * KIB,
            len: 4 * KIB,
        };
        seq.push(((i % 2) as usize, read));
        if (1..=7).contains(&i) {
            let write = Req::Write {
                offset: i * MIB + 4 * KIB,
                len: 8 * KIB,
            };
            seq.push(((i % 2) as usize, write));
        }
    }
    for i in 0..3u64 {
        let read = Req::Read {
            offset: 4 * MIB + i * 128 * KIB,
            len: 64 * KIB,
        };
        seq.push((((i + 1) % 2) as usize, read));
    }
    seq.push((0, Req::Flush));
    seq.push((
        1,
        Req::Discard {
            offset: 16 * MIB,
            len: MIB,
        },
    ));
    seq.push((
        0,
        Req::WriteZeroes {
            offset: 20 * MIB,
            len: 64 * KIB,
        },
    ));
    seq.push((1, Req::Flush));
    seq
}

/// Send `seq` through `client`, one request at a time; returns each request's result.
fn run(
    mut client: BlkioClient,
    seq: Vec<(usize, Req)>,
    who: &str,
) -> (BlkioClient, Vec<Result<(), Errno>>) {
    within(&format!("{who}: libblkio sequence"), move || {
        let mut results = Vec::new();
        for (i, &(q, req)) in seq.iter().enumerate() {
            results.push(match req {
                Req::Read { offset, len } => client.read(q, offset, len as usize).map(|_| ()),
                Req::Write { offset, len } => {
                    client.write(q, offset, &pattern(len as usize, i as u64))
                }
                Req::Flush => client.flush(q),
                Req::Discard { offset, len } => client.discard(q, offset, len),
                Req::WriteZeroes { offset, len } => client.write_zeroes(q, offset, len, false),
            });
        }
        (client, results)
    })
}

/// [`run`], every request expected to succeed.
fn run_ok(client: BlkioClient, seq: &[(usize, Req)], who: &str) -> BlkioClient {
    let (client, results) = run(client, seq.to_vec(), who);
    for ((q, req), r) in seq.iter().zip(&results) {
        assert_eq!(*r, Ok(()), "{who}: {req:?} on queue {q}");
    }
    client
}

/// Requests and bytes of one kind of request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Count {
    ops: u64,
    bytes: u64,
}

/// What `seq` implies per (queue, op), every pair present.
fn implied_per_queue(seq: &[(usize, Req)]) -> BTreeMap<(usize, &'static str), Count> {
    let mut map: BTreeMap<_, Count> = (0..QUEUES)
        .flat_map(|q| OPS.iter().map(move |op| ((q, *op), Count::default())))
        .collect();
    for &(q, req) in seq {
        let c = map.get_mut(&(q, req.op())).unwrap();
        c.ops += 1;
        c.bytes += req.bytes();
    }
    map
}

/// The `BlockDeviceStats` counters `seq` implies, all requests successful: QEMU's virtio-blk
/// accounting (write-zeroes are writes; `wr_highest_offset` is the end of the highest write,
/// write-zeroes included, as QEMU's block layer tracks it), and discards as unmaps (vubd's
/// documented rule; QEMU's virtio-blk leaves `unmap_*` at 0).
fn implied_blockstats(seq: &[(usize, Req)]) -> BTreeMap<&'static str, u64> {
    let mut s: BTreeMap<&'static str, u64> = [
        "rd_operations",
        "rd_bytes",
        "wr_operations",
        "wr_bytes",
        "flush_operations",
        "unmap_operations",
        "unmap_bytes",
        "wr_highest_offset",
        "failed_rd_operations",
        "failed_wr_operations",
        "failed_flush_operations",
        "failed_unmap_operations",
        "invalid_rd_operations",
        "invalid_wr_operations",
        "invalid_flush_operations",
        "invalid_unmap_operations",
    ]
    .into_iter()
    .map(|k| (k, 0))
    .collect();
    for &(_, req) in seq {
        let (ops, bytes) = match req {
            Req::Read { .. } => ("rd_operations", Some("rd_bytes")),
            Req::Write { .. } | Req::WriteZeroes { .. } => ("wr_operations", Some("wr_bytes")),
            Req::Flush => ("flush_operations", None),
            Req::Discard { .. } => ("unmap_operations", Some("unmap_bytes")),
        };
        *s.get_mut(ops).unwrap() += 1;
        if let Some(bytes) = bytes {
            *s.get_mut(bytes).unwrap() += req.bytes();
        }
    }
    s.insert("wr_highest_offset", highest_write_end(seq, true));
    s
}

/// The end of the highest write in `seq`, write-zeroes counted or not.
fn highest_write_end(seq: &[(usize, Req)], with_write_zeroes: bool) -> u64 {
    seq.iter()
        .filter_map(|&(_, req)| match req {
            Req::Write { offset, len } => Some(offset + len),
            Req::WriteZeroes { offset, len } if with_write_zeroes => Some(offset + len),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// The 64 KiB granules `seq` dirties: writes, write-zeroes and discards.
fn implied_dirty_bytes(seq: &[(usize, Req)]) -> u64 {
    let mut granules = BTreeSet::new();
    for &(_, req) in seq {
        if let Req::Write { offset, len }
        | Req::WriteZeroes { offset, len }
        | Req::Discard { offset, len } = req
        {
            granules.extend(offset / GRANULE..(offset + len).div_ceil(GRANULE));
        }
    }
    granules.len() as u64 * GRANULE
}

// ---------------------------------------------------------------------------------------------
// QMP.

/// vubd's `query-blockstats` entry: there is exactly one, for the export's format node.
fn vubd_blockstats(qmp: &mut Qmp) -> Value {
    let reply = qmp.ok("query-blockstats", json!({}));
    let list = reply.as_array().expect("query-blockstats returns a list");
    assert_eq!(list.len(), 1, "one entry, the export's node: {reply}");
    let entry = list[0].clone();
    assert_eq!(entry["node-name"], "fmt", "{entry}");
    assert_eq!(entry["device"], "", "{entry}");
    entry
}

fn stat(entry: &Value, key: &str) -> u64 {
    entry["stats"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {key} in {entry}"))
}

/// The `query-blockstats` entry of node `node` among every node's (`query-nodes`).
fn node_blockstats(qmp: &mut Qmp, node: &str) -> Value {
    let reply = qmp.ok("query-blockstats", json!({"query-nodes": true}));
    reply
        .as_array()
        .expect("list")
        .iter()
        .find(|e| e["node-name"] == node)
        .unwrap_or_else(|| panic!("no node {node} in {reply}"))
        .clone()
}

/// The dirty count of [`BITMAP`] in vubd's `query-block` (`inserted.dirty-bitmaps`).
fn query_block_dirty(qmp: &mut Qmp) -> u64 {
    let block = qmp.ok("query-block", json!({}));
    block[0]["inserted"]["dirty-bitmaps"]
        .as_array()
        .unwrap_or_else(|| panic!("no inserted.dirty-bitmaps in {block}"))
        .iter()
        .find(|b| b["name"] == BITMAP)
        .unwrap_or_else(|| panic!("no bitmap {BITMAP} in {block}"))["count"]
        .as_u64()
        .expect("count")
}

// ---------------------------------------------------------------------------------------------
// HTTP and the Prometheus text format.

struct Response {
    status: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Send `request` and read the answer to EOF (the endpoint closes after each answer).
fn exchange(mut stream: impl Read + Write, request: &str) -> Response {
    stream.write_all(request.as_bytes()).expect("send request");
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .expect("read the answer to EOF");
    let raw = String::from_utf8(raw).expect("UTF-8 answer");
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {raw:?}"));
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default().to_string();
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap_or_else(|| panic!("header {l:?}"));
            (n.trim().to_string(), v.trim().to_string())
        })
        .collect();
    Response {
        status,
        headers,
        body: body.to_string(),
    }
}

fn get_request(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")
}

fn http_unix(socket: &Path, request: &str) -> Response {
    let stream =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.set_write_timeout(Some(DEADLINE)).unwrap();
    exchange(stream, request)
}

fn http_tcp(addr: SocketAddr, request: &str) -> Response {
    let stream = TcpStream::connect_timeout(&addr, DEADLINE)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.set_write_timeout(Some(DEADLINE)).unwrap();
    exchange(stream, request)
}

/// A 200 answer in the Prometheus text format, parsed.
fn metrics_of(response: Response) -> Metrics {
    assert_eq!(response.status, "HTTP/1.1 200 OK", "{}", response.body);
    let content_type = response.header("Content-Type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain") && content_type.contains("version=0.0.4"),
        "Content-Type {content_type:?}"
    );
    assert_eq!(
        response.header("Content-Length"),
        Some(response.body.len().to_string().as_str()),
        "Content-Length is the body's length"
    );
    Metrics::parse(&response.body)
}

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

struct Metrics {
    text: String,
    samples: Vec<Sample>,
}

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(parse_sample)
            .collect();
        Metrics {
            text: text.to_string(),
            samples,
        }
    }

    /// Samples of `name` whose labels include `labels`.
    fn select<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The one sample of `name` with `labels`, as a whole number.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let found: Vec<&Sample> = self.select(name, labels).collect();
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
        whole(found[0])
    }

    /// The sum of the samples of `name` with `labels`, as a whole number.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.select(name, labels).map(whole).sum()
    }
}

fn whole(s: &Sample) -> u64 {
    assert!(
        s.value >= 0.0 && s.value.fract() == 0.0,
        "{} {:?} = {} is not a count",
        s.name,
        s.labels,
        s.value
    );
    s.value as u64
}

/// `name{k="v",...} value`, with the text format's escapes in label values.
fn parse_sample(line: &str) -> Sample {
    let (series, value) = line
        .rsplit_once(' ')
        .unwrap_or_else(|| panic!("sample {line:?}"));
    let value: f64 = value
        .parse()
        .unwrap_or_else(|_| panic!("value in {line:?}"));
    let (name, mut rest) = match series.split_once('{') {
        Some((name, rest)) => (
            name,
            rest.strip_suffix('}')
                .unwrap_or_else(|| panic!("labels in {line:?}")),
        ),
        None => (series, ""),
    };
    let mut labels = BTreeMap::new();
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("label in {line:?}"));
        let mut val = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => val.push('\n'),
                    Some((_, c)) => val.push(c),
                    None => panic!("escape at the end of {line:?}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => val.push(c),
                None => panic!("unterminated label value in {line:?}"),
            }
        };
        labels.insert(key.to_string(), val);
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    Sample {
        name: name.to_string(),
        labels,
        value,
    }
}

/// The QMP counter family that a Prometheus `op` adds to.
fn qmp_prefix(op: &str) -> &'static str {
    match op {
        "read" => "rd",
        "write" | "write_zeroes" => "wr",
        "flush" => "flush",
        "discard" => "unmap",
        _ => unreachable!("{op}"),
    }
}

/// A scrape agrees with QMP (`entry`, `query-block`'s dirty count) and with the per-queue counts
/// `per_queue`, and is well formed: families typed, histograms cumulative and complete,
/// nothing in flight.
fn check_scrape(
    m: &Metrics,
    entry: &Value,
    dirty: u64,
    per_queue: &BTreeMap<(usize, &'static str), Count>,
) {
    for (family, kind) in [
        ("vubd_requests_total", "counter"),
        ("vubd_request_bytes_total", "counter"),
        ("vubd_request_failures_total", "counter"),
        ("vubd_requests_invalid_total", "counter"),
        ("vubd_requests_in_flight", "gauge"),
        ("vubd_request_duration_seconds", "histogram"),
        ("vubd_bitmap_dirty_bytes", "gauge"),
    ] {
        assert!(
            m.text.contains(&format!("\n# TYPE {family} {kind}\n")),
            "# TYPE {family} {kind}"
        );
    }
    for s in &m.samples {
        if s.name != "vubd_bitmap_dirty_bytes" {
            assert_eq!(
                s.labels.get("export").map(String::as_str),
                Some("fmt"),
                "{s:?}"
            );
        }
    }

    // Per queue and kind: exactly what was sent where, and nothing failed, invalid or pending.
    for (&(q, op), want) in per_queue {
        let queue = q.to_string();
        let l = [("queue", queue.as_str()), ("op", op)];
        let got = Count {
            ops: m.get("vubd_requests_total", &l),
            bytes: m.get("vubd_request_bytes_total", &l),
        };
        assert_eq!(got, *want, "queue {q} {op}");
        assert_eq!(
            m.get("vubd_request_failures_total", &l),
            0,
            "queue {q} {op}"
        );
    }
    for q in 0..QUEUES {
        let queue = q.to_string();
        assert_eq!(
            m.get("vubd_requests_in_flight", &[("queue", queue.as_str())]),
            0,
            "queue {q}: nothing in flight at rest"
        );
    }

    // Summed over queues: QMP's counters (write-zeroes among writes, discards as unmaps).
    for prefix in ["rd", "wr", "flush", "unmap"] {
        let ops: Vec<&str> = OPS
            .iter()
            .copied()
            .filter(|op| qmp_prefix(op) == prefix)
            .collect();
        let total =
            |family: &str| -> u64 { ops.iter().map(|op| m.sum(family, &[("op", op)])).sum() };
        assert_eq!(
            total("vubd_requests_total"),
            stat(entry, &format!("{prefix}_operations")),
            "{prefix}_operations"
        );
        if prefix != "flush" {
            assert_eq!(
                total("vubd_request_bytes_total"),
                stat(entry, &format!("{prefix}_bytes")),
                "{prefix}_bytes"
            );
        }
        assert_eq!(
            total("vubd_request_failures_total"),
            stat(entry, &format!("failed_{prefix}_operations")),
            "failed_{prefix}_operations"
        );
        assert_eq!(
            total("vubd_requests_invalid_total"),
            stat(entry, &format!("invalid_{prefix}_operations")),
            "invalid_{prefix}_operations"
        );
    }

    // The latency histograms: per queue and kind, cumulative buckets ending in +Inf = _count =
    // requests_total, bounds those of QMP's histograms; their increments summed over queues are
    // QMP's bins, their _sum QMP's total time.
    let hist = "vubd_request_duration_seconds";
    let boundaries: Vec<u64> = entry["stats"]["rd_latency_histogram"]["boundaries"]
        .as_array()
        .expect("rd_latency_histogram.boundaries")
        .iter()
        .map(|b| b.as_u64().unwrap())
        .collect();
    let mut bins: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut seconds: BTreeMap<&str, f64> = BTreeMap::new();
    for q in 0..QUEUES {
        let queue = q.to_string();
        for op in OPS {
            let l = [("queue", queue.as_str()), ("op", op)];
            let mut buckets: Vec<(f64, u64)> = m
                .select(&format!("{hist}_bucket"), &l)
                .map(|s| {
                    let le = &s.labels["le"];
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap_or_else(|_| panic!("le {le:?}"))
                    };
                    (le, whole(s))
                })
                .collect();
            // Order by bound, whatever the order of the lines.
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            let les: Vec<f64> = buckets.iter().map(|b| b.0).collect();
            let want_les: Vec<f64> = boundaries
                .iter()
                .map(|ns| *ns as f64 / 1e9)
                .chain([f64::INFINITY])
                .collect();
            assert_eq!(les.len(), want_les.len(), "queue {q} {op}: buckets {les:?}");
            for (le, want) in les.iter().zip(&want_les) {
                assert!(
                    le == want || (le - want).abs() <= want * 1e-9,
                    "queue {q} {op}: bucket bounds {les:?}, QMP's boundaries {boundaries:?}"
                );
            }
            let counts: Vec<u64> = buckets.iter().map(|b| b.1).collect();
            assert!(
                counts.windows(2).all(|w| w[0] <= w[1]),
                "queue {q} {op}: buckets not cumulative: {counts:?}"
            );
            let count = m.get(&format!("{hist}_count"), &l);
            assert_eq!(
                *counts.last().unwrap(),
                count,
                "queue {q} {op}: +Inf = _count"
            );
            assert_eq!(
                count,
                m.get("vubd_requests_total", &l),
                "queue {q} {op}: _count = requests_total"
            );
            let sum = m
                .select(&format!("{hist}_sum"), &l)
                .map(|s| s.value)
                .collect::<Vec<_>>();
            assert_eq!(sum.len(), 1, "queue {q} {op}: one _sum");
            assert!(
                sum[0] >= 0.0 && (count == 0) == (sum[0] == 0.0),
                "queue {q} {op}: _sum {} for {count}",
                sum[0]
            );
            let prefix = qmp_prefix(op);
            *seconds.entry(prefix).or_default() += sum[0];
            let acc = bins.entry(prefix).or_insert_with(|| vec![0; counts.len()]);
            let mut below = 0;
            for (i, c) in counts.iter().enumerate() {
                acc[i] += c - below;
                below = *c;
            }
        }
    }
    for prefix in ["rd", "wr", "flush"] {
        let qmp_bins: Vec<u64> = entry["stats"][format!("{prefix}_latency_histogram")]["bins"]
            .as_array()
            .unwrap_or_else(|| panic!("{prefix}_latency_histogram in {entry}"))
            .iter()
            .map(|b| b.as_u64().unwrap())
            .collect();
        assert_eq!(
            bins[prefix], qmp_bins,
            "{prefix}: Prometheus buckets against QMP bins"
        );
    }
    for prefix in ["rd", "wr", "flush", "unmap"] {
        let qmp_seconds = stat(entry, &format!("{prefix}_total_time_ns")) as f64 / 1e9;
        assert!(
            (seconds[prefix] - qmp_seconds).abs() <= 1e-9 + qmp_seconds * 1e-9,
            "{prefix}: _sum {} s against {prefix}_total_time_ns {qmp_seconds} s",
            seconds[prefix]
        );
    }

    assert_eq!(
        m.get(
            "vubd_bitmap_dirty_bytes",
            &[("export", "fmt"), ("bitmap", BITMAP)]
        ),
        dirty,
        "vubd_bitmap_dirty_bytes against query-block's count"
    );
}

/// A TCP port nobody listens on now.
fn free_port() -> u16 {
    let probe = TcpListener::bind("127.0.0.1:0").expect("bind a probe");
    probe.local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------------------------
// 1. The same I/O on vubd and qemu-storage-daemon.

#[test]
fn the_same_io_gives_the_same_counts_on_vubd_and_qemu_storage_daemon() {
    let seq = sequence();
    let implied = implied_blockstats(&seq);
    let (vubd_dir, qsd_dir) = (graph("stats-vubd"), graph("stats-qsd"));
    let vubd = Daemon::vubd(vubd_dir.path(), &export(&vubd_dir));
    let qsd = Daemon::qsd(qsd_dir.path(), &export(&qsd_dir));
    let vubd_client = run_ok(connect(vubd.socket(), "vubd"), &seq, "vubd");
    let qsd_client = run_ok(
        connect(qsd.socket(), "qemu-storage-daemon"),
        &seq,
        "qemu-storage-daemon",
    );
    let (mut vq, mut qq) = (vubd.qmp(), qsd.qmp());
    let v = vubd_blockstats(&mut vq);
    let qsd_blk = qq.ok("query-blockstats", json!({}));
    let qsd_fmt = node_blockstats(&mut qq, "fmt");

    let mut differences = Vec::new();
    let mut table = String::from("counter: implied / vubd / qemu-storage-daemon (node fmt)\n");
    for (key, want) in &implied {
        let got = stat(&v, key);
        let q = qsd_fmt["stats"][key].as_u64();
        table.push_str(&format!("  {key}: {want} / {got} / {q:?}\n"));
        // wr_highest_offset is compared with qemu-storage-daemon's, below.
        if got != *want && *key != "wr_highest_offset" {
            differences.push(format!("{key}: vubd {got}, the sequence implies {want}"));
        }
    }
    // What qemu-storage-daemon accounts, vubd must agree with. QEMU 10 accounts nothing at the
    // export (an empty list); should it ever, every counter is compared.
    for entry in qsd_blk.as_array().expect("list") {
        for key in implied.keys() {
            if entry["stats"][key] != v["stats"][key] {
                differences.push(format!(
                    "{key}: vubd {}, qemu-storage-daemon's blk-level {}",
                    v["stats"][key], entry["stats"][key]
                ));
            }
        }
    }
    // Node level: QEMU's block layer tracks the highest write, write-zeroes included.
    let qsd_highest = qsd_fmt["stats"]["wr_highest_offset"].as_u64().unwrap();
    assert_eq!(
        qsd_highest, implied["wr_highest_offset"],
        "the oracle: qemu-storage-daemon's wr_highest_offset on fmt is the end of the highest write"
    );
    let highest = stat(&v, "wr_highest_offset");
    if highest != qsd_highest {
        let plain = highest_write_end(&seq, false);
        differences.push(format!(
            "wr_highest_offset: vubd {highest}, qemu-storage-daemon {qsd_highest} (the sequence's \
             highest write is its write-zeroes, a write in QEMU's accounting; the end of its \
             highest plain write is {plain}{})",
            if highest == plain {
                ", which vubd reports: vubd leaves write-zeroes out"
            } else {
                ""
            },
        ));
    }
    // Every key qemu-storage-daemon has under "stats", vubd has.
    let keys = |e: &Value| -> BTreeSet<String> {
        e["stats"]
            .as_object()
            .expect("stats object")
            .keys()
            .cloned()
            .collect()
    };
    let (vubd_keys, qsd_keys) = (keys(&v), keys(&qsd_fmt));
    let missing: Vec<&String> = qsd_keys.difference(&vubd_keys).collect();
    if !missing.is_empty() {
        differences.push(format!(
            "keys qemu-storage-daemon has and vubd lacks: {missing:?}"
        ));
    }
    let extra: Vec<&String> = vubd_keys.difference(&qsd_keys).collect();
    table.push_str(&format!(
        "  keys only vubd has: {extra:?}; qemu-storage-daemon's blk-level reply: {qsd_blk}\n"
    ));
    // vubd's own reply is consistent: histograms count the successful requests, times move.
    for prefix in ["rd", "wr", "flush"] {
        let bins: u64 = v["stats"][format!("{prefix}_latency_histogram")]["bins"]
            .as_array()
            .unwrap_or_else(|| panic!("{prefix}_latency_histogram in {v}"))
            .iter()
            .map(|b| b.as_u64().unwrap())
            .sum();
        assert_eq!(
            bins,
            stat(&v, &format!("{prefix}_operations")),
            "{prefix} bins"
        );
    }
    for prefix in ["rd", "wr", "flush", "unmap"] {
        assert!(
            stat(&v, &format!("{prefix}_total_time_ns")) > 0,
            "{prefix}_total_time_ns"
        );
    }
    // The bitmap dirtied the same on both, as the sequence implies.
    let vubd_dirty = query_block_dirty(&mut vq);
    let qsd_dirty = qq
        .bitmaps("fmt")
        .iter()
        .find(|b| b["name"] == BITMAP)
        .expect("qemu-storage-daemon's bitmap")["count"]
        .as_u64()
        .unwrap();
    table.push_str(&format!(
        "  {BITMAP} dirty: implied {} / vubd {vubd_dirty} / qemu-storage-daemon {qsd_dirty}\n",
        implied_dirty_bytes(&seq)
    ));
    assert_eq!(
        qsd_dirty,
        implied_dirty_bytes(&seq),
        "qemu-storage-daemon's bitmap"
    );
    assert_eq!(
        vubd_dirty, qsd_dirty,
        "vubd's bitmap against qemu-storage-daemon's"
    );
    eprintln!("{table}");

    drop((vubd_client, qsd_client));
    for (daemon, who) in [(vubd, "vubd"), (qsd, "qemu-storage-daemon")] {
        let (status, stderr) = within(&format!("{who}: SIGTERM"), move || daemon.stop());
        assert!(status.success(), "{who}: {status}: {stderr}");
    }
    assert!(
        differences.is_empty(),
        "vubd differs:\n  {}\n{table}",
        differences.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------
// 2. The Prometheus endpoint on a UNIX socket.

#[test]
fn the_metrics_endpoint_agrees_with_query_blockstats() {
    let seq = sequence();
    let dir = graph("stats-prom");
    let metrics = dir.join("metrics.sock");
    let option = format!("unix:{}", metrics.display());
    let vubd = Daemon::vubd_with(dir.path(), &export(&dir), &["--metrics", &option]);
    let mode = std::fs::metadata(&metrics)
        .expect("the metrics socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "metrics socket mode {mode:o}");
    // Before any frontend: whatever is there is zero. (vubd shows no per-queue series until a
    // frontend has started the queues; only the bitmap's gauge.)
    let m = metrics_of(http_unix(&metrics, &get_request("/metrics")));
    for s in &m.samples {
        assert_eq!(s.value, 0.0, "before any I/O: {s:?}");
    }
    assert_eq!(
        m.get(
            "vubd_bitmap_dirty_bytes",
            &[("export", "fmt"), ("bitmap", BITMAP)]
        ),
        0
    );
    let mut qmp = vubd.qmp();

    let client = run_ok(connect(vubd.socket(), "vubd"), &seq, "vubd");
    let entry = vubd_blockstats(&mut qmp);
    let dirty = query_block_dirty(&mut qmp);
    assert_eq!(dirty, implied_dirty_bytes(&seq));
    let m = metrics_of(http_unix(&metrics, &get_request("/metrics")));
    check_scrape(&m, &entry, dirty, &implied_per_queue(&seq));
    assert_eq!(
        m.sum("vubd_requests_total", &[("op", "read")]),
        stat(&entry, "rd_operations")
    );
    // Scraping twice at rest gives the same counts.
    let again = metrics_of(http_unix(&metrics, &get_request("/metrics")));
    check_scrape(&again, &entry, dirty, &implied_per_queue(&seq));

    // Other paths and methods.
    let other = http_unix(&metrics, &get_request("/"));
    assert!(other.status.starts_with("HTTP/1.1 404"), "{}", other.status);
    let other = http_unix(&metrics, &get_request("/metricsx"));
    assert!(other.status.starts_with("HTTP/1.1 404"), "{}", other.status);
    let post = http_unix(&metrics, "POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(post.status.starts_with("HTTP/1.1 405"), "{}", post.status);

    drop(client);
    let (status, stderr) = within("vubd: SIGTERM", move || vubd.stop());
    assert!(status.success(), "{status}: {stderr}");
    assert!(!metrics.exists(), "vubd left its metrics socket behind");
}

// ---------------------------------------------------------------------------------------------
// 3. Counts survive reconnects; the endpoint on TCP.

#[test]
fn counts_survive_a_reconnect_and_are_served_over_tcp() {
    let seq = sequence();
    let dir = graph("stats-reconnect");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let option = format!("tcp:{addr}");
    let vubd = Daemon::vubd_with(dir.path(), &export(&dir), &["--metrics", &option]);
    let mut qmp = vubd.qmp();

    let first = run_ok(connect(vubd.socket(), "vubd"), &seq, "first frontend");
    let before = vubd_blockstats(&mut qmp);
    let m = metrics_of(http_tcp(addr, &get_request("/metrics")));
    check_scrape(
        &m,
        &before,
        query_block_dirty(&mut qmp),
        &implied_per_queue(&seq),
    );
    drop(first);

    let one_more = [(
        1,
        Req::Read {
            offset: 3 * MIB,
            len: 4 * KIB,
        },
    )];
    let second = run_ok(connect(vubd.socket(), "vubd"), &one_more, "second frontend");
    let after = vubd_blockstats(&mut qmp);
    assert_eq!(
        stat(&after, "rd_operations"),
        stat(&before, "rd_operations") + 1,
        "one more read, counted once, on top of the first frontend's"
    );
    assert_eq!(
        stat(&after, "rd_bytes"),
        stat(&before, "rd_bytes") + 4 * KIB
    );
    for key in [
        "wr_operations",
        "wr_bytes",
        "flush_operations",
        "unmap_operations",
        "unmap_bytes",
        "wr_highest_offset",
        "failed_rd_operations",
        "invalid_rd_operations",
    ] {
        assert_eq!(
            stat(&after, key),
            stat(&before, key),
            "{key}: unchanged by the reconnect (no flush of vubd's own counted)"
        );
    }
    let all: Vec<(usize, Req)> = seq.iter().chain(&one_more).copied().collect();
    let m = metrics_of(http_tcp(addr, &get_request("/metrics")));
    check_scrape(
        &m,
        &after,
        query_block_dirty(&mut qmp),
        &implied_per_queue(&all),
    );

    let other = http_tcp(addr, &get_request("/other"));
    assert!(other.status.starts_with("HTTP/1.1 404"), "{}", other.status);

    drop(second);
    let (status, stderr) = within("vubd: SIGTERM", move || vubd.stop());
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(),
        "the endpoint is gone with vubd"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Requests past the end of the disk.

/// Requests libblkio passes to the device unchecked, each beyond the end of the disk.
fn out_of_range() -> Vec<(usize, Req)> {
    vec![
        (
            0,
            Req::Read {
                offset: DISK,
                len: 4 * KIB,
            },
        ),
        (
            0,
            Req::Read {
                offset: DISK - 512,
                len: 4 * KIB,
            },
        ),
        (
            1,
            Req::Write {
                offset: DISK,
                len: 512,
            },
        ),
        (
            1,
            Req::WriteZeroes {
                offset: DISK,
                len: 4 * KIB,
            },
        ),
        (
            0,
            Req::Discard {
                offset: DISK,
                len: 4 * KIB,
            },
        ),
    ]
}

#[test]
fn requests_past_the_end_are_counted_invalid() {
    let bad = out_of_range();
    let (vubd_dir, qsd_dir) = (graph("stats-inv-vubd"), graph("stats-inv-qsd"));
    let metrics = vubd_dir.join("metrics.sock");
    let option = format!("unix:{}", metrics.display());
    let vubd = Daemon::vubd_with(vubd_dir.path(), &export(&vubd_dir), &["--metrics", &option]);
    let qsd = Daemon::qsd(qsd_dir.path(), &export(&qsd_dir));

    // libblkio does not check ranges: every request reaches the device, and both daemons
    // answer each with VIRTIO_BLK_S_IOERR.
    let (vubd_client, vubd_results) = run(connect(vubd.socket(), "vubd"), bad.clone(), "vubd");
    let (qsd_client, qsd_results) = run(
        connect(qsd.socket(), "qemu-storage-daemon"),
        bad.clone(),
        "qemu-storage-daemon",
    );
    for (((q, req), v), s) in bad.iter().zip(&vubd_results).zip(&qsd_results) {
        assert_eq!(*s, Err(EIO), "qemu-storage-daemon: {req:?} on queue {q}");
        assert_eq!(
            v, s,
            "vubd answers {req:?} on queue {q} as qemu-storage-daemon does"
        );
    }

    // vubd: QEMU's virtio-blk counts out-of-range reads, writes and write-zeroes invalid, and
    // discards not at all; vubd counts every refused request by kind, discards as unmaps.
    let mut qmp = vubd.qmp();
    let v = vubd_blockstats(&mut qmp);
    for (key, want) in [
        ("invalid_rd_operations", 2),
        ("invalid_wr_operations", 2),
        ("invalid_unmap_operations", 1),
        ("invalid_flush_operations", 0),
        ("rd_operations", 0),
        ("wr_operations", 0),
        ("unmap_operations", 0),
        ("failed_rd_operations", 0),
        ("failed_wr_operations", 0),
        ("failed_unmap_operations", 0),
        ("wr_highest_offset", 0),
    ] {
        assert_eq!(stat(&v, key), want, "vubd {key}: {v}");
    }
    assert_eq!(v["stats"]["account_invalid"], true);
    // Refused before any I/O: qemu-storage-daemon's block layer saw no write either.
    let mut qq = qsd.qmp();
    assert_eq!(
        node_blockstats(&mut qq, "fmt")["stats"]["wr_highest_offset"],
        0,
        "qemu-storage-daemon"
    );
    let m = metrics_of(http_unix(&metrics, &get_request("/metrics")));
    for (q, op, want) in [
        (0, "read", 2),
        (1, "write", 1),
        (1, "write_zeroes", 1),
        (0, "discard", 1),
        (1, "read", 0),
        (0, "write", 0),
        (0, "flush", 0),
    ] {
        let queue = q.to_string();
        let l = [("queue", queue.as_str()), ("op", op)];
        assert_eq!(
            m.get("vubd_requests_invalid_total", &l),
            want,
            "queue {q} {op}"
        );
        assert_eq!(m.get("vubd_requests_total", &l), 0, "queue {q} {op}");
        assert_eq!(
            m.get("vubd_request_failures_total", &l),
            0,
            "queue {q} {op}"
        );
    }
    check_scrape(&m, &v, 0, &implied_per_queue(&[]));

    // The queues still serve, and count, what is valid.
    let valid = [(
        0,
        Req::Read {
            offset: 0,
            len: 4 * KIB,
        },
    )];
    let vubd_client = run_ok(vubd_client, &valid, "vubd");
    let v = vubd_blockstats(&mut qmp);
    assert_eq!(stat(&v, "rd_operations"), 1);
    assert_eq!(stat(&v, "invalid_rd_operations"), 2);

    drop((vubd_client, qsd_client));
    for (daemon, who) in [(vubd, "vubd"), (qsd, "qemu-storage-daemon")] {
        let (status, stderr) = within(&format!("{who}: SIGTERM"), move || daemon.stop());
        assert!(status.success(), "{who}: {status}: {stderr}");
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Bad --metrics.

/// Run `vubd serve ARGS...`, which must exit within [`DEADLINE`]; returns its exit code and
/// stderr.
fn serve_exits(args: &[&str]) -> (i32, String) {
    let mut child = Command::new(vubd_bin())
        .arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vubd");
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.try_wait().expect("wait vubd") {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code().unwrap_or(-1), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vubd serve {args:?} still running after {DEADLINE:?}; it should refuse");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn a_bad_metrics_option_fails_with_an_error_naming_it() {
    let dir = TempDir::new("stats-errors");
    let image = dir.join("disk.raw");
    create_image(&image, MIB as usize, 3);
    let socket = dir.join("blk.sock");
    let base = |metrics: &str| -> Vec<String> {
        vec![
            "--socket".into(),
            socket.to_str().unwrap().into(),
            "--image".into(),
            image.to_str().unwrap().into(),
            "--metrics".into(),
            metrics.into(),
        ]
    };

    // Malformed addresses: refused by the argument parser, before anything is opened. Its one
    // error line names the option; clap adds its usual hint line, as for every option.
    for bad in [
        "bogus",
        "tcp:nowhere",
        "tcp:127.0.0.1",
        "unix:",
        "http://127.0.0.1:9100",
    ] {
        let args = base(bad);
        let (code, stderr) = serve_exits(&strs(&args));
        assert_ne!(code, 0, "--metrics {bad}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let errors: Vec<&&str> = lines
            .iter()
            .filter(|l| **l != "For more information, try '--help'.")
            .collect();
        assert_eq!(errors.len(), 1, "--metrics {bad}: one error line: {stderr}");
        assert!(
            errors[0].contains("--metrics"),
            "--metrics {bad}: the error names the option: {stderr}"
        );
        assert!(!socket.exists(), "--metrics {bad}: no socket left behind");
    }

    // Well-formed but unusable: vubd's own one-line error. A TCP address in use is named with
    // the option; a UNIX path that cannot be bound is named as the file (docs/usage.md: "one
    // line on stderr naming the file or option"), without the option.
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = format!("tcp:{}", busy.local_addr().unwrap());
    let no_dir = dir.join("no/such/dir/m.sock");
    let nowhere = format!("unix:{}", no_dir.display());
    for (bad, named) in [
        (busy_addr.as_str(), "--metrics".to_string()),
        (nowhere.as_str(), no_dir.display().to_string()),
    ] {
        let args = base(bad);
        let (code, stderr) = serve_exits(&strs(&args));
        assert_ne!(code, 0, "--metrics {bad}: {stderr}");
        let line = one_line_error(&stderr);
        assert!(line.contains(&named), "--metrics {bad}: {line}");
        assert!(!socket.exists(), "--metrics {bad}: no socket left behind");
        eprintln!("--metrics {bad}: {line}");
    }
    drop(busy);
}
