//! `query-blockstats` in QEMU's shape (`BlockStats`, `BlockDeviceStats`), so that collectors
//! written for QEMU and qemu-storage-daemon read vubd's export as they read a QEMU node.
//!
//! As QEMU's virtio-blk does, a write-zeroes counts as a write (and moves
//! `wr_highest_offset`). QEMU does not count discards at all; vubd counts them as unmaps.
//! vubd counts at the export: `query-nodes: true` gives the same entries, one per export. Per-queue figures
//! and write-zeroes on their own are on the Prometheus endpoint.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::export::Export;
use crate::stats::{OpKind, OpSnapshot, QueueSnapshot, LATENCY_BOUNDS_US};

/// A latency histogram as QEMU's `BlockLatencyHistogramInfo` (boundaries in nanoseconds).
fn histogram(op: &OpSnapshot) -> Value {
    let boundaries: Vec<u64> = LATENCY_BOUNDS_US.iter().map(|us| us * 1000).collect();
    json!({ "boundaries": boundaries, "bins": op.latency.to_vec() })
}

/// `BlockDeviceStats` of `total`.
pub fn device_stats(total: &QueueSnapshot) -> Value {
    let rd = total.op(OpKind::Read);
    let mut wr = *total.op(OpKind::Write);
    wr.add(total.op(OpKind::WriteZeroes));
    let flush = total.op(OpKind::Flush);
    let unmap = total.op(OpKind::Discard);
    json!({
        "rd_bytes": rd.bytes,
        "wr_bytes": wr.bytes,
        "zone_append_bytes": 0,
        "unmap_bytes": unmap.bytes,
        "rd_operations": rd.ops,
        "wr_operations": wr.ops,
        "zone_append_operations": 0,
        "flush_operations": flush.ops,
        "unmap_operations": unmap.ops,
        "rd_total_time_ns": rd.total_ns,
        "wr_total_time_ns": wr.total_ns,
        "zone_append_total_time_ns": 0,
        "flush_total_time_ns": flush.total_ns,
        "unmap_total_time_ns": unmap.total_ns,
        "wr_highest_offset": total.highest_write_end,
        "rd_merged": 0,
        "wr_merged": 0,
        "zone_append_merged": 0,
        "unmap_merged": 0,
        "failed_rd_operations": rd.failed,
        "failed_wr_operations": wr.failed,
        "failed_zone_append_operations": 0,
        "failed_flush_operations": flush.failed,
        "failed_unmap_operations": unmap.failed,
        "invalid_rd_operations": rd.invalid,
        "invalid_wr_operations": wr.invalid,
        "invalid_zone_append_operations": 0,
        "invalid_flush_operations": flush.invalid,
        "invalid_unmap_operations": unmap.invalid,
        "account_invalid": true,
        "account_failed": true,
        "timed_stats": [],
        "rd_latency_histogram": histogram(rd),
        "wr_latency_histogram": histogram(&wr),
        "flush_latency_histogram": histogram(flush),
    })
}

/// The reply to `query-blockstats`: each export's format node.
pub fn query(exports: &[Arc<Export>]) -> Value {
    Value::Array(
        exports
            .iter()
            .map(|export| {
                json!({
                    "device": "",
                    "node-name": export.node_names().format,
                    "stats": device_stats(&export.stats().total()),
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::ExportStats;
    use std::time::Duration;

    #[test]
    fn writes_and_write_zeroes_are_writes_discards_are_unmaps() {
        let stats = ExportStats::default();
        let q = stats.register(0);
        for (kind, bytes) in [
            (OpKind::Write, 4096),
            (OpKind::WriteZeroes, 1 << 20),
            (OpKind::Discard, 65536),
            (OpKind::Read, 512),
        ] {
            q.start();
            q.finish(kind, bytes, false, Duration::from_micros(50));
        }
        q.wrote_up_to(8192);
        let v = device_stats(&stats.total());
        assert_eq!(v["wr_operations"], 2);
        assert_eq!(v["wr_bytes"], 4096 + (1 << 20));
        assert_eq!(v["unmap_operations"], 1);
        assert_eq!(v["unmap_bytes"], 65536);
        assert_eq!(v["rd_bytes"], 512);
        assert_eq!(v["rd_total_time_ns"], 50_000);
        assert_eq!(v["wr_highest_offset"], 8192);
        let bins = v["rd_latency_histogram"]["bins"].as_array().unwrap();
        assert_eq!(bins.len(), LATENCY_BOUNDS_US.len() + 1);
        assert_eq!(bins[3], 1, "50 µs is in the ≤ 64 µs bucket");
    }
}
