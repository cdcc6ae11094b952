//! What every handler shares: the [`AppState`] (store, settings, the training worker, loaded
//! models, running pipelines). The bottom layer of the server with [`super::http`]; no module
//! here imports from the router.

use super::jobs::{Job, JobStatus};
use super::models::LoadedModels;
use super::running::ActivePipelines;
use super::store::{JOBS, Store};
use super::training::JobRunner;
use crate::roots::PathRoots;

/// What every handler shares.
pub struct AppState {
    /// The metadata store.
    pub store: Store,
    /// When set, every route needs `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Where files (media, models) live.
    pub data_dir: std::path::PathBuf,
    /// Folders clients may name in sources, sinks and graphs.
    pub roots: PathRoots,
    /// Limits on the graph documents clients send.
    pub graph_limits: crate::graph::GraphLimits,
    /// The training worker.
    pub jobs: JobRunner,
    /// Compiled models for `:predict`.
    pub models: LoadedModels,
    /// Uploaded images decoded at once, at most: one per core (each may take up to
    /// [`super::media::MAX_DECODED_BYTES`] twice, image and mask).
    pub image_decodes: tokio::sync::Semaphore,
    /// Running pipelines.
    pub pipelines: ActivePipelines,
    /// This engine's part of the fleet, once joined (`serve --fleet-nats`).
    pub fleet: std::sync::OnceLock<std::sync::Arc<super::fleet::Fleet>>,
    /// WebRTC viewers of running pipelines.
    #[cfg(feature = "gstreamer")]
    pub webrtc: std::sync::Arc<super::broadcast::WebRtc>,
}

impl AppState {
    /// `inspectflow_jobs{status}`: how many jobs are in each status.
    pub fn jobs_prometheus(&self) -> String {
        let jobs: Vec<Job> = self.store.all(JOBS).unwrap_or_default();
        let mut text = String::from(
            "# HELP inspectflow_jobs Training jobs by status.\n# TYPE inspectflow_jobs gauge\n",
        );
        for status in JobStatus::ALL {
            let count = jobs.iter().filter(|job| job.status == status).count();
            text.push_str(&format!(
                "inspectflow_jobs{{status=\"{}\"}} {count}\n",
                status.name()
            ));
        }
        text
    }
}

/// The operators graphs may use, built once per process.
pub(crate) fn registry() -> &'static inspectflow_operators::Registry {
    inspectflow_operators::Registry::shared()
}
