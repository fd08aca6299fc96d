//! The I/O sequence both daemons run, what it implies under QEMU's accounting rules, and
//! the QMP queries that report it.

use super::*;

#[derive(Clone, Copy, Debug)]
pub(crate) enum Req {
    Read { offset: u64, len: u64 },
    Write { offset: u64, len: u64 },
    Flush,
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64 },
}

impl Req {
    /// The `op` label vubd gives it.
    pub(crate) fn op(self) -> &'static str {
        match self {
            Req::Read { .. } => "read",
            Req::Write { .. } => "write",
            Req::Flush => "flush",
            Req::Discard { .. } => "discard",
            Req::WriteZeroes { .. } => "write_zeroes",
        }
    }

    pub(crate) fn bytes(self) -> u64 {
        match self {
            Req::Read { len, .. }
            | Req::Write { len, .. }
            | Req::Discard { len, .. }
            | Req::WriteZeroes { len, .. } => len,
            Req::Flush => 0,
        }
    }
}

pub(crate) const OPS: [&str; 5] = ["read", "write", "flush", "discard", "write_zeroes"];

/// The sequence both daemons get, as (queue, request): 10 reads of 4 KiB and 3 of 64 KiB,
/// 7 writes of 8 KiB (ending at most at 7 MiB + 12 KiB), 2 flushes, a discard of 1 MiB at
/// 16 MiB and a write-zeroes of 64 KiB at 20 MiB — the highest write of all — spread over both
/// queues.
pub(crate) fn sequence() -> Vec<(usize, Req)> {
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
pub(crate) fn run(
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
pub(crate) fn run_ok(client: BlkioClient, seq: &[(usize, Req)], who: &str) -> BlkioClient {
    let (client, results) = run(client, seq.to_vec(), who);
    for ((q, req), r) in seq.iter().zip(&results) {
        assert_eq!(*r, Ok(()), "{who}: {req:?} on queue {q}");
    }
    client
}

/// Requests and bytes of one kind of request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Count {
    pub(crate) ops: u64,
    pub(crate) bytes: u64,
}

/// What `seq` implies per (queue, op), every pair present.
pub(crate) fn implied_per_queue(seq: &[(usize, Req)]) -> BTreeMap<(usize, &'static str), Count> {
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
pub(crate) fn implied_blockstats(seq: &[(usize, Req)]) -> BTreeMap<&'static str, u64> {
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
pub(crate) fn highest_write_end(seq: &[(usize, Req)], with_write_zeroes: bool) -> u64 {
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
pub(crate) fn implied_dirty_bytes(seq: &[(usize, Req)]) -> u64 {
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
pub(crate) fn vubd_blockstats(qmp: &mut Qmp) -> Value {
    let reply = qmp.ok("query-blockstats", json!({}));
    let list = reply.as_array().expect("query-blockstats returns a list");
    assert_eq!(list.len(), 1, "one entry, the export's node: {reply}");
    let entry = list[0].clone();
    assert_eq!(entry["node-name"], "fmt", "{entry}");
    assert_eq!(entry["device"], "", "{entry}");
    entry
}

pub(crate) fn stat(entry: &Value, key: &str) -> u64 {
    entry["stats"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {key} in {entry}"))
}

/// The `query-blockstats` entry of node `node` among every node's (`query-nodes`).
pub(crate) fn node_blockstats(qmp: &mut Qmp, node: &str) -> Value {
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
pub(crate) fn query_block_dirty(qmp: &mut Qmp) -> u64 {
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
