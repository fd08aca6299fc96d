//! HTTP to the metrics endpoint, the Prometheus text format, and the check of one scrape
//! against QMP.

use super::*;

// HTTP and the Prometheus text format.

pub(crate) struct Response {
    pub(crate) status: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: String,
}

impl Response {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Send `request` and read the answer to EOF (the endpoint closes after each answer).
pub(crate) fn exchange(mut stream: impl Read + Write, request: &str) -> Response {
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

pub(crate) fn get_request(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")
}

pub(crate) fn http_unix(socket: &Path, request: &str) -> Response {
    let stream =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.set_write_timeout(Some(DEADLINE)).unwrap();
    exchange(stream, request)
}

pub(crate) fn http_tcp(addr: SocketAddr, request: &str) -> Response {
    let stream = TcpStream::connect_timeout(&addr, DEADLINE)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.set_write_timeout(Some(DEADLINE)).unwrap();
    exchange(stream, request)
}

/// A 200 answer in the Prometheus text format, parsed.
pub(crate) fn metrics_of(response: Response) -> Metrics {
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
pub(crate) struct Sample {
    pub(crate) name: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) value: f64,
}

pub(crate) struct Metrics {
    pub(crate) text: String,
    pub(crate) samples: Vec<Sample>,
}

impl Metrics {
    pub(crate) fn parse(text: &str) -> Metrics {
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
    pub(crate) fn select<'a>(
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
    pub(crate) fn get(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let found: Vec<&Sample> = self.select(name, labels).collect();
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
        whole(found[0])
    }

    /// The sum of the samples of `name` with `labels`, as a whole number.
    pub(crate) fn sum(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.select(name, labels).map(whole).sum()
    }
}

pub(crate) fn whole(s: &Sample) -> u64 {
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
pub(crate) fn parse_sample(line: &str) -> Sample {
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
pub(crate) fn qmp_prefix(op: &str) -> &'static str {
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
pub(crate) fn check_scrape(
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
                Some("exp"),
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
            &[("export", "exp"), ("bitmap", BITMAP)]
        ),
        dirty,
        "vubd_bitmap_dirty_bytes against query-block's count"
    );
}
