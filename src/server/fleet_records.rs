//! What the fleet's engines share through NATS (see [`super::fleet`]): the settings `serve`
//! joins with, and the records of the four buckets: a desired pipeline, a lease, an engine's
//! report of itself, and the outcome of a generation that ended.

use serde::{Deserialize, Serialize};

use crate::runtime::metrics::MetricsReport;

/// How `serve` joins a fleet.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetSettings {
    /// NATS server(s) of the fleet (`nats://host:4222`, comma-separated); fleet mode is on when
    /// given. The server needs JetStream (`nats-server -js`).
    #[arg(long = "fleet-nats", env = "INSPECTFLOW_FLEET_NATS")]
    pub nats: Option<String>,
    /// This engine's name in the fleet (letters, digits, `-`, `_`); the host name when not given
    /// (a StatefulSet's pod name), its dots made `-`.
    #[arg(long = "engine-id", env = "INSPECTFLOW_ENGINE_ID")]
    pub engine_id: Option<String>,
    /// Pipelines this engine runs at once.
    #[arg(long = "fleet-capacity", default_value_t = 4)]
    pub capacity: usize,
    /// Seconds a lease lasts without renewal: an engine that dies hands its pipelines over
    /// after at most this long (plus one tick).
    #[arg(long = "fleet-lease-s", default_value_t = 6)]
    pub lease_s: u64,
    /// Prefix of the fleet's bucket names (several fleets may share one NATS).
    #[arg(long = "fleet-name", default_value = "inspectflow")]
    pub name: String,
}

/// A pipeline the fleet should run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct DesiredPipeline {
    /// The graph: YAML text or a JSON object (its `name` is replaced by the pipeline id).
    pub graph: serde_json::Value,
    /// When it was last put.
    pub updated_at: String,
}

/// Who runs a pipeline.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Lease {
    /// The engine holding it.
    pub engine: String,
    /// The generation it runs.
    pub generation: u64,
    /// When the engine claimed it.
    pub claimed_at: String,
}

/// One engine of the fleet, as it last reported itself.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct EngineRecord {
    /// Its id.
    pub engine: String,
    /// Where its REST API listens.
    pub api: String,
    /// Pipelines it runs at once at most.
    pub capacity: usize,
    /// When it joined.
    pub started_at: String,
    /// When it wrote this record (every tick).
    pub updated_at: String,
    /// What it runs now.
    pub runs: Vec<EngineRun>,
}

/// A pipeline an engine runs.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct EngineRun {
    /// The pipeline.
    pub pipeline_id: String,
    /// Its generation.
    pub generation: u64,
    /// When this engine started it.
    pub started_at: String,
    /// Its metrics now.
    pub metrics: Option<MetricsReport>,
}

/// How a generation of a pipeline ended by itself.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Outcome {
    /// The generation that ended.
    pub generation: u64,
    /// `completed` or `failed`.
    pub state: FleetState,
    /// The engine it ended on.
    pub engine: String,
    /// When.
    pub finished_at: String,
    /// Why it failed.
    pub failure: Option<String>,
    /// Its final metrics.
    pub metrics: Option<MetricsReport>,
    /// Failed starts or runs of this generation so far.
    #[serde(default)]
    pub attempts: u32,
    /// A failed generation is tried again from this time on (milliseconds since the Unix
    /// epoch); none when it is not tried again.
    #[serde(default)]
    pub retry_after_unix_ms: Option<u64>,
}

impl Outcome {
    /// Whether the generation may be started again at `now_unix_ms`.
    pub fn may_retry(&self, now_unix_ms: u64) -> bool {
        self.state == FleetState::Failed
            && self
                .retry_after_unix_ms
                .is_some_and(|after| now_unix_ms >= after)
    }
}

/// Where a fleet pipeline stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FleetState {
    /// Nobody runs it yet (or its engine's lease lapsed and nobody took it over yet).
    Pending,
    /// An engine holds its lease.
    Running,
    /// Its source ended; it is not started again until its graph changes.
    Completed,
    /// It failed (a graph that cannot start here, an operator's error).
    Failed,
}
