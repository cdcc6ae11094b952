//! The frame runtime: bounded queues with policies ([`queue`]), the threads that run a graph
//! ([`pipeline`]), nodes running as several instances in order (`replicas`) and the metrics
//! they keep ([`metrics`]).

pub mod metrics;
pub mod pipeline;
pub mod queue;
mod replicas;

pub use metrics::{MetricsReport, NodeReport, SinkReport, SourceReport};
pub use pipeline::{NodeFailure, Pipeline, RunMode, RunOutcome, StartError, StopHandle};
