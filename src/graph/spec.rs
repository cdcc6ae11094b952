//! The graph file model: what users write in YAML or JSON. One model, two syntaxes; the JSON
//! Schema in `schemas/graph.schema.json` is generated from these types.

use serde::{Deserialize, Serialize};

/// A pipeline: operator nodes and the edges between their ports.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GraphSpec {
    /// Name of the pipeline (metrics and logs use it); the file name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Free text for people reading the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The operators.
    #[schemars(length(min = 1))]
    pub nodes: Vec<NodeSpec>,
    /// Connections from output ports to input ports.
    #[serde(default)]
    pub edges: Vec<EdgeSpec>,
}

/// One operator instance.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Unique name of the node: letters, digits, `_` and `-`.
    #[schemars(length(min = 1), regex(pattern = r"^[A-Za-z0-9_-]+$"))]
    pub id: String,
    /// Operator name, e.g. `source.synthetic` (see `inspectflow operators`).
    #[schemars(length(min = 1))]
    pub op: String,
    /// Operator parameters; each operator's schema is in `schemas/operators/`.
    #[serde(default = "empty_object")]
    #[schemars(with = "serde_json::Map<String, serde_json::Value>")]
    pub params: serde_json::Value,
    /// What to do when the operator fails.
    #[serde(default)]
    pub restart: RestartSpec,
    /// Hand the operator batches (operators that support it only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchSpec>,
    /// Instances of the operator running side by side, each on its own thread, taking packets
    /// from the node's one input queue; results leave in arrival order. For a per-frame stage
    /// that one core cannot keep up with (a JPEG encoder at 1080p) on a machine with cores to
    /// spare. Only operators without state between packets (`inspectflow operators` says which)
    /// and not with `batch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub replicas: Option<usize>,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

/// Restart policy: `never` stops the graph on the first error (the error is reported);
/// `on_failure` rebuilds the operator and goes on with the next packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    /// Stop the graph on the first error.
    Never,
    /// Rebuild the operator and go on, up to `max_restarts` times.
    OnFailure,
}

/// When and how often a failing node is restarted.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestartSpec {
    /// `never` or `on_failure`.
    #[serde(default = "default_restart_policy")]
    pub policy: RestartPolicy,
    /// Restarts allowed over the run; one more failure stops the graph.
    #[serde(default = "default_max_restarts")]
    #[schemars(range(min = 0, max = 1000000))]
    pub max_restarts: u32,
    /// Pause before a restart, in milliseconds.
    #[serde(default = "default_backoff_ms")]
    #[schemars(range(min = 0, max = 600000))]
    pub backoff_ms: u64,
}

impl Default for RestartSpec {
    fn default() -> Self {
        Self {
            policy: default_restart_policy(),
            max_restarts: default_max_restarts(),
            backoff_ms: default_backoff_ms(),
        }
    }
}

fn default_restart_policy() -> RestartPolicy {
    RestartPolicy::Never
}
fn default_max_restarts() -> u32 {
    3
}
fn default_backoff_ms() -> u64 {
    100
}

/// Batching: the operator receives up to `max_size` packets at once, or fewer when `max_wait_ms`
/// passes after the first packet of a batch arrived.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchSpec {
    /// Most packets in one batch.
    #[schemars(range(min = 1, max = 1024))]
    pub max_size: usize,
    /// Longest wait for a batch to fill, in milliseconds.
    #[serde(default = "default_max_wait_ms")]
    #[schemars(range(min = 0.0, max = 60000.0))]
    pub max_wait_ms: f64,
}

fn default_max_wait_ms() -> f64 {
    10.0
}

/// A connection `from` an output port `to` an input port: `node` (its only port) or `node.port`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EdgeSpec {
    /// Output: `node` or `node.port`.
    #[schemars(length(min = 1))]
    pub from: String,
    /// Input: `node` or `node.port`.
    #[schemars(length(min = 1))]
    pub to: String,
    /// The queue in front of the input; defaults depend on the upstream source (see `QueueSpec`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueSpec>,
}

/// A bounded queue. Defaults: capacity 4; policy `drop_oldest` when a live source (camera,
/// realtime synthetic) feeds the edge, `block` otherwise (files, folders), so live pipelines never
/// build up lag and recorded input never loses a frame.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QueueSpec {
    /// Packets the queue holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub capacity: Option<usize>,
    /// What a full queue does with a new packet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<QueuePolicy>,
}

/// What a full queue does: `block` makes the producer wait (nothing is lost), `drop_oldest`
/// discards the oldest queued packet (latest data wins, for live input), `drop_newest` discards
/// the new packet. Every drop is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum QueuePolicy {
    /// The producer waits for room.
    Block,
    /// The oldest queued packet is dropped.
    DropOldest,
    /// The new packet is dropped.
    DropNewest,
}

impl QueuePolicy {
    /// Name as written in graph files.
    pub const fn name(self) -> &'static str {
        match self {
            QueuePolicy::Block => "block",
            QueuePolicy::DropOldest => "drop_oldest",
            QueuePolicy::DropNewest => "drop_newest",
        }
    }
}

/// Queue capacity when a graph file does not set one.
pub const DEFAULT_QUEUE_CAPACITY: usize = 4;
