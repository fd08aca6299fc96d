//! The statistics in the Prometheus text exposition format (version 0.0.4): one family per
//! metric, labelled by export, queue and kind of request.

use std::fmt::Write as _;

use super::{OpKind, QueueSnapshot, LATENCY_BOUNDS_US};

/// What is reported of one export.
pub struct ExportMetrics {
    /// The export's id.
    pub name: String,
    /// Its format node's name.
    pub node: String,
    pub queues: Vec<QueueSnapshot>,
    /// Its dirty bitmaps: name and dirty bytes.
    pub bitmaps: Vec<(String, u64)>,
}

/// A counter family: name, help, and the count it takes from each kind of request.
type CounterFamily = (&'static str, &'static str, fn(&super::OpSnapshot) -> u64);

/// A label value, escaped as the format asks.
fn label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// One family: `# HELP`, `# TYPE`, then `sample` for each export and queue.
fn family(
    out: &mut String,
    exports: &[ExportMetrics],
    name: &str,
    kind: &str,
    help: &str,
    mut sample: impl FnMut(&mut String, &str, &str, &QueueSnapshot),
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for export in exports {
        let e = label(&export.name);
        for (index, queue) in export.queues.iter().enumerate() {
            let labels = format!("export=\"{e}\",queue=\"{index}\"");
            sample(out, name, &labels, queue);
        }
    }
}

/// The text of the `/metrics` page.
pub fn render(exports: &[ExportMetrics]) -> String {
    let mut out = String::new();
    let counters: [CounterFamily; 4] = [
        (
            "vubd_requests_total",
            "Requests completed successfully.",
            |o| o.ops,
        ),
        (
            "vubd_request_bytes_total",
            "Bytes moved by successful requests.",
            |o| o.bytes,
        ),
        (
            "vubd_request_failures_total",
            "Requests that failed with an I/O error.",
            |o| o.failed,
        ),
        (
            "vubd_requests_invalid_total",
            "Requests refused before any I/O (malformed or out of range).",
            |o| o.invalid,
        ),
    ];
    for (name, help, value) in counters {
        family(
            &mut out,
            exports,
            name,
            "counter",
            help,
            |out, name, labels, q| {
                for kind in OpKind::ALL {
                    let _ = writeln!(
                        out,
                        "{name}{{{labels},op=\"{}\"}} {}",
                        kind.name(),
                        value(q.op(kind))
                    );
                }
            },
        );
    }
    family(
        &mut out,
        exports,
        "vubd_requests_in_flight",
        "gauge",
        "Requests started and not finished.",
        |out, name, labels, q| {
            let _ = writeln!(out, "{name}{{{labels}}} {}", q.in_flight);
        },
    );
    family(
        &mut out,
        exports,
        "vubd_request_duration_seconds",
        "histogram",
        "Time from a request's start to its completion, successful requests.",
        |out, name, labels, q| {
            for kind in OpKind::ALL {
                let op = q.op(kind);
                let labels = format!("{labels},op=\"{}\"", kind.name());
                let mut cumulative = 0;
                for (bound, count) in LATENCY_BOUNDS_US.iter().zip(&op.latency) {
                    cumulative += count;
                    let le = *bound as f64 / 1e6;
                    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
                }
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", op.ops);
                let _ = writeln!(out, "{name}_sum{{{labels}}} {}", op.total_ns as f64 / 1e9);
                let _ = writeln!(out, "{name}_count{{{labels}}} {}", op.ops);
            }
        },
    );
    let _ = writeln!(
        out,
        "# HELP vubd_bitmap_dirty_bytes Bytes a dirty bitmap records as changed.\n\
         # TYPE vubd_bitmap_dirty_bytes gauge"
    );
    for export in exports {
        for (bitmap, dirty) in &export.bitmaps {
            let _ = writeln!(
                out,
                "vubd_bitmap_dirty_bytes{{export=\"{}\",bitmap=\"{}\"}} {dirty}",
                label(&export.name),
                label(bitmap)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP vubd_export_info A served export: its id and the node it serves.\n\
         # TYPE vubd_export_info gauge"
    );
    for export in exports {
        let _ = writeln!(
            out,
            "vubd_export_info{{export=\"{}\",node=\"{}\"}} 1",
            label(&export.name),
            label(&export.node)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::ExportStats;
    use std::time::Duration;

    #[test]
    fn families_with_labels_buckets_and_escaping() {
        let stats = ExportStats::default();
        let q = stats.register(1);
        q.start();
        q.finish(OpKind::Read, 4096, false, Duration::from_micros(20));
        let text = render(&[ExportMetrics {
            name: "disk\"0".into(),
            node: "fmt".into(),
            queues: stats.per_queue(),
            bitmaps: vec![("b0".into(), 65536)],
        }]);
        assert!(text.contains("# TYPE vubd_requests_total counter"));
        assert!(
            text.contains("vubd_requests_total{export=\"disk\\\"0\",queue=\"1\",op=\"read\"} 1")
        );
        assert!(text.contains(
            "vubd_request_bytes_total{export=\"disk\\\"0\",queue=\"1\",op=\"read\"} 4096"
        ));
        assert!(
            text.contains("vubd_requests_total{export=\"disk\\\"0\",queue=\"0\",op=\"read\"} 0")
        );
        // 20 µs: not in the ≤ 16 µs bucket, in the ≤ 32 µs one and every one after.
        assert!(text.contains("op=\"read\",le=\"0.000016\"} 0"));
        assert!(text.contains("op=\"read\",le=\"0.000032\"} 1"));
        assert!(text.contains("op=\"read\",le=\"+Inf\"} 1"));
        assert!(text.contains(
            "vubd_request_duration_seconds_count{export=\"disk\\\"0\",queue=\"1\",op=\"read\"} 1"
        ));
        assert!(text.contains("vubd_bitmap_dirty_bytes{export=\"disk\\\"0\",bitmap=\"b0\"} 65536"));
        assert!(text.contains("vubd_export_info{export=\"disk\\\"0\",node=\"fmt\"} 1"));
        // Every sample line is `name{labels} value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
