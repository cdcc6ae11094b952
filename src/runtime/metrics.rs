//! Run-time metrics: lock-free counters and latency histograms per operator, turned on demand into
//! a [`MetricsReport`] (JSON via serde, a summary table, or Prometheus text).
//!
//! Recording costs a handful of relaxed atomic operations; nothing allocates per packet.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use inspectflow_operators::EndpointHealth;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Sub-buckets per power of two: values are kept to within 1/16 (about 6%).
const SUB_BUCKETS: usize = 16;
const BUCKETS: usize = 64 * SUB_BUCKETS;

/// A log-linear histogram of durations in nanoseconds, safe to record from any thread.
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
    max_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
        }
    }
}

fn bucket_of(value: u64) -> usize {
    if value < SUB_BUCKETS as u64 {
        return value as usize;
    }
    let magnitude = 63 - value.leading_zeros() as usize; // >= 4
    let shift = magnitude - 4;
    let mantissa = ((value >> shift) as usize) & (SUB_BUCKETS - 1);
    (shift + 1) * SUB_BUCKETS + mantissa
}

/// The largest value that falls in `bucket` (so percentiles never under-report).
fn bucket_upper(bucket: usize) -> u64 {
    if bucket < SUB_BUCKETS {
        return bucket as u64;
    }
    let shift = bucket / SUB_BUCKETS - 1;
    let mantissa = (bucket % SUB_BUCKETS + SUB_BUCKETS) as u64;
    ((mantissa + 1) << shift) - 1
}

impl Histogram {
    /// Records one duration.
    pub fn record(&self, duration: Duration) {
        self.record_n(duration, 1);
    }

    /// Records the same duration `n` times (every packet of a batch waited as long).
    pub fn record_n(&self, duration: Duration, n: u64) {
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(nanos)].fetch_add(n, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(nanos.saturating_mul(n), Ordering::Relaxed);
        self.max_ns.fetch_max(nanos, Ordering::Relaxed);
    }

    /// Summary in milliseconds, or `None` when nothing was recorded.
    pub fn summary(&self) -> Option<LatencySummary> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let max_ns = self.max_ns.load(Ordering::Relaxed);
        let quantile = |q: f64| -> f64 {
            let rank = ((q * total as f64).ceil() as u64).max(1);
            let mut seen = 0;
            for (bucket, count) in counts.iter().enumerate() {
                seen += count;
                if seen >= rank {
                    return bucket_upper(bucket).min(max_ns) as f64 / 1e6;
                }
            }
            max_ns as f64 / 1e6
        };
        Some(LatencySummary {
            p50: quantile(0.50),
            p95: quantile(0.95),
            p99: quantile(0.99),
            max: max_ns as f64 / 1e6,
            mean: self.sum_ns.load(Ordering::Relaxed) as f64 / total as f64 / 1e6,
            count: total,
        })
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq, schemars::JsonSchema)]
pub struct LatencySummary {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest value.
    pub max: f64,
    /// Arithmetic mean.
    pub mean: f64,
    /// Values recorded.
    pub count: u64,
}

/// Counters of one node, updated by its thread.
#[derive(Default)]
pub struct NodeMetrics {
    /// Packets taken from the input queue.
    pub packets_in: AtomicU64,
    /// Packets emitted (sources and transforms).
    pub packets_out: AtomicU64,
    /// Operator calls that failed.
    pub errors: AtomicU64,
    /// Times the operator was rebuilt after a failure.
    pub restarts: AtomicU64,
    /// Calls that handled a batch.
    pub batches: AtomicU64,
    /// Time spent in the operator per packet.
    pub latency: Histogram,
    /// Capture to completion at this sink.
    pub end_to_end: Histogram,
    /// Whether a source's camera or server delivers (sources only).
    pub endpoint_health: Arc<EndpointHealth>,
    first_activity_ns: AtomicU64,
    last_activity_ns: AtomicU64,
    activity_count: AtomicU64,
}

impl NodeMetrics {
    /// Notes that the node finished handling `packets` packets at `now`.
    pub fn mark_activity(&self, started: Instant, now: Instant, packets: u64) {
        let since_start =
            u64::try_from(now.saturating_duration_since(started).as_nanos()).unwrap_or(u64::MAX);
        let _ = self.first_activity_ns.compare_exchange(
            0,
            since_start.max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        self.last_activity_ns
            .store(since_start.max(1), Ordering::Relaxed);
        self.activity_count.fetch_add(packets, Ordering::Relaxed);
    }

    /// Packets per second between the first and the last packet.
    pub fn rate(&self) -> Option<f64> {
        let first = self.first_activity_ns.load(Ordering::Relaxed);
        let last = self.last_activity_ns.load(Ordering::Relaxed);
        let count = self.activity_count.load(Ordering::Relaxed);
        (count > 1 && last > first).then(|| (count - 1) as f64 / ((last - first) as f64 / 1e9))
    }
}

/// Queue state of a node's input.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, schemars::JsonSchema)]
pub struct QueueReport {
    /// Capacity in packets.
    pub capacity: usize,
    /// Full-queue policy.
    pub policy: String,
    /// Packets waiting when the report was made.
    pub depth: usize,
    /// Most packets ever waiting.
    pub max_depth: u64,
}

/// One node in a report.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, schemars::JsonSchema)]
pub struct NodeReport {
    /// Node id.
    pub id: String,
    /// Operator name.
    pub op: String,
    /// source, transform or sink.
    pub kind: String,
    /// Packets taken in.
    pub packets_in: u64,
    /// Packets emitted.
    pub packets_out: u64,
    /// Packets per second handled (emitted by sources, taken in by others).
    pub fps: Option<f64>,
    /// Time in the operator per packet (not for sources, whose time includes waiting for frames).
    pub latency_ms: Option<LatencySummary>,
    /// The input queue (not for sources).
    pub queue: Option<QueueReport>,
    /// Packets dropped by the edges into this node.
    pub drops: u64,
    /// Failed operator calls.
    pub errors: u64,
    /// Restarts after failures.
    pub restarts: u64,
    /// Batched calls (nodes with `batch` only).
    pub batches: u64,
    /// Capture-to-sink latency (sinks only).
    pub end_to_end_ms: Option<LatencySummary>,
    /// Whether the source's camera or server delivers (sources only).
    pub source: Option<SourceReport>,
    /// The sink's receiver or broker, and results it gave up on or skipped (sinks only).
    pub sink: Option<SinkReport>,
}

/// The outside end of a sink (a webhook receiver, an MQTT broker; always online for local sinks).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, schemars::JsonSchema)]
pub struct SinkReport {
    /// `online` while results go through, `offline` while the receiver is unreachable.
    pub state: String,
    /// Outages so far.
    pub outages: u64,
    /// Why the receiver last went offline.
    pub last_error: Option<String>,
    /// Results given up after every retry failed.
    pub failed: u64,
    /// Results left out on purpose (`rate_limit`, `only_anomalous`).
    pub skipped: u64,
}

/// The outside end of a source: online or not, and its outages.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, schemars::JsonSchema)]
pub struct SourceReport {
    /// `online` while frames flow, `offline` during an outage.
    pub state: String,
    /// Outages so far (a camera that dropped, a server that went away).
    pub outages: u64,
    /// Why the source last went offline.
    pub last_error: Option<String>,
    /// Frames the camera sent that the source let go, keeping the newest, because the graph
    /// fell behind (live cameras only; frames dropped later are counted on the edges).
    #[serde(default)]
    pub dropped: u64,
}

/// One edge in a report.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, schemars::JsonSchema)]
pub struct EdgeReport {
    /// `node.port` of the producer.
    pub from: String,
    /// `node.port` of the consumer.
    pub to: String,
    /// Full-queue policy.
    pub policy: String,
    /// Queue capacity.
    pub capacity: usize,
    /// Packets offered.
    pub sent: u64,
    /// Packets dropped.
    pub dropped: u64,
}

/// A snapshot of a pipeline's metrics.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, schemars::JsonSchema)]
pub struct MetricsReport {
    /// Pipeline name.
    pub pipeline: String,
    /// `running`, `completed`, `stopped` or `failed`.
    pub state: String,
    /// `running` (inspecting) or `active` (sources previewed, no inference).
    #[serde(default)]
    pub mode: super::pipeline::RunMode,
    /// Seconds since start.
    pub elapsed_s: f64,
    /// Per node, in graph order.
    pub nodes: Vec<NodeReport>,
    /// Per edge, in graph order.
    pub edges: Vec<EdgeReport>,
}

fn ms(value: Option<f64>) -> String {
    value
        .map(|v| format!("{v:.2}"))
        .unwrap_or_else(|| "-".into())
}

impl MetricsReport {
    /// The node called `id`.
    pub fn node(&self, id: &str) -> Option<&NodeReport> {
        self.nodes.iter().find(|node| node.id == id)
    }

    /// Human-readable summary table.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "pipeline '{}' {} after {:.2} s",
            self.pipeline, self.state, self.elapsed_s
        );
        let _ = writeln!(
            out,
            "{:<16} {:<18} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8} {:>9} {:>7} {:>6} {:>20}",
            "node",
            "op",
            "in",
            "out",
            "fps",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "queue",
            "drops",
            "errors",
            "e2e p50/p95/p99 ms"
        );
        for node in &self.nodes {
            let latency = node.latency_ms;
            let queue = node
                .queue
                .as_ref()
                .map(|q| format!("{}/{}", q.max_depth, q.capacity))
                .unwrap_or_else(|| "-".into());
            let e2e = node
                .end_to_end_ms
                .map(|e| format!("{:.1}/{:.1}/{:.1}", e.p50, e.p95, e.p99))
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "{:<16} {:<18} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8} {:>9} {:>7} {:>6} {:>20}",
                node.id,
                node.op,
                node.packets_in,
                node.packets_out,
                node.fps
                    .map(|f| format!("{f:.1}"))
                    .unwrap_or_else(|| "-".into()),
                ms(latency.map(|l| l.p50)),
                ms(latency.map(|l| l.p95)),
                ms(latency.map(|l| l.p99)),
                queue,
                node.drops + node.source.as_ref().map_or(0, |s| s.dropped),
                node.errors,
                e2e
            );
        }
        out.push_str(
            "(queue: most packets waiting / capacity; drops: by the edges into the node, and for \
             a live camera the frames it let go)\n",
        );
        out
    }

    /// Prometheus text exposition format (version 0.0.4).
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        let pipeline = escape_label(&self.pipeline);
        let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{{pipeline=\"{pipeline}\",{labels}}} {value}");
            }
        };
        let node_labels =
            |node: &NodeReport| format!("node=\"{}\",op=\"{}\"", escape_label(&node.id), node.op);
        let per_node = |value: fn(&NodeReport) -> Option<f64>| -> Vec<(String, f64)> {
            self.nodes
                .iter()
                .filter_map(|node| value(node).map(|v| (node_labels(node), v)))
                .collect()
        };
        family(
            "inspectflow_pipeline_mode",
            "gauge",
            "1 for the pipeline's current mode: running (inspecting) or active (previewed only).",
            super::pipeline::RunMode::ALL
                .into_iter()
                .map(|mode| {
                    (
                        format!("mode=\"{}\"", mode.name()),
                        f64::from(u8::from(self.mode == mode)),
                    )
                })
                .collect(),
        );
        family(
            "inspectflow_packets_in_total",
            "counter",
            "Packets taken in by a node.",
            per_node(|n| Some(n.packets_in as f64)),
        );
        family(
            "inspectflow_packets_out_total",
            "counter",
            "Packets emitted by a node.",
            per_node(|n| Some(n.packets_out as f64)),
        );
        family(
            "inspectflow_errors_total",
            "counter",
            "Failed operator calls.",
            per_node(|n| Some(n.errors as f64)),
        );
        family(
            "inspectflow_restarts_total",
            "counter",
            "Operator restarts after failures.",
            per_node(|n| Some(n.restarts as f64)),
        );
        family(
            "inspectflow_source_online",
            "gauge",
            "1 while a source's camera or server delivers, 0 during an outage.",
            per_node(|n| {
                n.source
                    .as_ref()
                    .map(|s| f64::from(u8::from(s.state == "online")))
            }),
        );
        family(
            "inspectflow_source_outages_total",
            "counter",
            "Outages of a source's camera or server.",
            per_node(|n| n.source.as_ref().map(|s| s.outages as f64)),
        );
        family(
            "inspectflow_source_dropped_total",
            "counter",
            "Frames a live camera sent that its source let go because the graph fell behind.",
            per_node(|n| n.source.as_ref().map(|s| s.dropped as f64)),
        );
        family(
            "inspectflow_sink_online",
            "gauge",
            "1 while a sink's receiver or broker is reachable, 0 during an outage.",
            per_node(|n| {
                n.sink
                    .as_ref()
                    .map(|s| f64::from(u8::from(s.state == "online")))
            }),
        );
        family(
            "inspectflow_sink_outages_total",
            "counter",
            "Outages of a sink's receiver or broker.",
            per_node(|n| n.sink.as_ref().map(|s| s.outages as f64)),
        );
        family(
            "inspectflow_sink_failed_total",
            "counter",
            "Results a sink gave up on after every retry failed.",
            per_node(|n| n.sink.as_ref().map(|s| s.failed as f64)),
        );
        family(
            "inspectflow_sink_skipped_total",
            "counter",
            "Results a sink left out on purpose (rate limit, anomalous only).",
            per_node(|n| n.sink.as_ref().map(|s| s.skipped as f64)),
        );
        family(
            "inspectflow_fps",
            "gauge",
            "Packets per second handled by a node.",
            per_node(|n| n.fps),
        );
        family(
            "inspectflow_queue_depth",
            "gauge",
            "Packets waiting in a node's input queue.",
            per_node(|n| n.queue.as_ref().map(|q| q.depth as f64)),
        );
        family(
            "inspectflow_queue_capacity",
            "gauge",
            "Capacity of a node's input queue.",
            per_node(|n| n.queue.as_ref().map(|q| q.capacity as f64)),
        );
        let quantiles = |pick: fn(&NodeReport) -> Option<LatencySummary>| -> Vec<(String, f64)> {
            let mut samples = Vec::new();
            for node in &self.nodes {
                if let Some(summary) = pick(node) {
                    for (q, v) in [
                        ("0.5", summary.p50),
                        ("0.95", summary.p95),
                        ("0.99", summary.p99),
                    ] {
                        samples.push((format!("{},quantile=\"{q}\"", node_labels(node)), v / 1e3));
                    }
                }
            }
            samples
        };
        family(
            "inspectflow_operator_latency_seconds",
            "summary",
            "Time in the operator per packet.",
            quantiles(|n| n.latency_ms),
        );
        family(
            "inspectflow_end_to_end_latency_seconds",
            "summary",
            "Capture-to-sink latency.",
            quantiles(|n| n.end_to_end_ms),
        );
        let edges = |value: fn(&EdgeReport) -> u64| -> Vec<(String, f64)> {
            self.edges
                .iter()
                .map(|e| {
                    (
                        format!(
                            "from=\"{}\",to=\"{}\"",
                            escape_label(&e.from),
                            escape_label(&e.to)
                        ),
                        value(e) as f64,
                    )
                })
                .collect()
        };
        family(
            "inspectflow_edge_sent_total",
            "counter",
            "Packets offered to an edge.",
            edges(|e| e.sent),
        );
        family(
            "inspectflow_edge_dropped_total",
            "counter",
            "Packets an edge dropped by its policy.",
            edges(|e| e.dropped),
        );
        out
    }
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Joins Prometheus texts, keeping each family's HELP and TYPE once and its samples together.
pub fn merge_prometheus(texts: &[String]) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut families: std::collections::HashMap<String, (Vec<String>, Vec<String>)> =
        std::collections::HashMap::new();
    for text in texts {
        for line in text.lines() {
            let name = if let Some(rest) = line
                .strip_prefix("# HELP ")
                .or_else(|| line.strip_prefix("# TYPE "))
            {
                rest.split_whitespace().next().unwrap_or_default()
            } else {
                line.split(['{', ' ']).next().unwrap_or_default()
            }
            .to_string();
            if name.is_empty() {
                continue;
            }
            let family = families.entry(name.clone()).or_insert_with(|| {
                order.push(name.clone());
                (Vec::new(), Vec::new())
            });
            if line.starts_with('#') {
                if !family.0.iter().any(|l| l == line) {
                    family.0.push(line.to_string());
                }
            } else {
                family.1.push(line.to_string());
            }
        }
    }
    let mut out = String::new();
    for name in order {
        if let Some((header, samples)) = families.get(&name) {
            for line in header.iter().chain(samples) {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut previous = 0;
        for value in [
            0u64,
            1,
            15,
            16,
            17,
            100,
            1_000,
            123_456,
            10_000_000,
            u64::MAX / 2,
        ] {
            let bucket = bucket_of(value);
            assert!(bucket >= previous);
            previous = bucket;
            let upper = bucket_upper(bucket);
            assert!(
                upper >= value,
                "{value} above its bucket's upper bound {upper}"
            );
            assert!(
                upper as f64 <= value as f64 * 1.07 + 1.0,
                "bucket of {value} too wide: {upper}"
            );
        }
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let histogram = Histogram::default();
        for ms in 1..=100u64 {
            histogram.record(Duration::from_millis(ms));
        }
        let summary = histogram.summary().expect("recorded");
        assert_eq!(summary.count, 100);
        assert!(
            (summary.p50 - 50.0).abs() / 50.0 < 0.07,
            "p50 {}",
            summary.p50
        );
        assert!(
            (summary.p99 - 99.0).abs() / 99.0 < 0.07,
            "p99 {}",
            summary.p99
        );
        assert_eq!(summary.max, 100.0);
        assert!((summary.mean - 50.5).abs() < 1e-9);
    }

    #[test]
    fn families_of_several_pipelines_are_merged_under_one_header() {
        let a =
            "# HELP x_total X.\n# TYPE x_total counter\nx_total{pipeline=\"a\"} 1\n".to_string();
        let b =
            "# HELP x_total X.\n# TYPE x_total counter\nx_total{pipeline=\"b\"} 2\n".to_string();
        assert_eq!(
            merge_prometheus(&[a, b]),
            "# HELP x_total X.\n# TYPE x_total counter\nx_total{pipeline=\"a\"} 1\nx_total{pipeline=\"b\"} 2\n"
        );
    }
}
