//! The table of started pipelines: who may start one (one start at a time per pipeline), the
//! launcher thread that starts them at normal priority, lookups for the API's conflict checks
//! (a source, sink, model or project in use), metrics, captures' frames, and the stop of every
//! run at shutdown. [`super::active`] is the HTTP resource over it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::active::{ActiveState, ActiveStatus};
use super::endpoints::EndpointKind;
use crate::graph::ValidatedGraph;
use crate::runtime::metrics::MetricsReport;
use crate::runtime::pipeline::{Pipeline, RunMode};

/// What a running pipeline holds on to, for the 409s of sources, sinks and models.
#[derive(Debug, Default, Clone)]
pub(crate) struct Uses {
    pub(crate) source_id: Option<String>,
    pub(crate) model_id: Option<String>,
    pub(crate) sink_ids: Vec<String>,
}

/// One started pipeline.
pub(crate) struct Active {
    pub(crate) pipeline_id: String,
    pub(crate) project_id: String,
    pub(crate) name: String,
    pub(crate) started_at: String,
    pub(crate) uses: Uses,
    /// Taken when the pipeline is stopped and joined.
    pub(crate) pipeline: Mutex<Option<Pipeline>>,
    /// Set while a stop drains and joins the pipeline (up to 10 s), after it was taken from
    /// `pipeline`: it still writes its files and uses its model, sources and sinks then.
    pub(crate) draining: AtomicBool,
}

impl Active {
    /// Whether the pipeline runs or still drains after a stop: what it uses must stay.
    pub(crate) fn is_running(&self) -> bool {
        // Read under the lock that a stop takes the pipeline under, so no moment shows it as
        // neither running nor draining.
        self.pipeline
            .lock()
            .is_ok_and(|pipeline| match pipeline.as_ref() {
                Some(pipeline) => !pipeline.is_finished(),
                None => self.draining.load(Ordering::SeqCst),
            })
    }

    pub(crate) fn report(&self) -> Option<MetricsReport> {
        self.pipeline.lock().ok()?.as_ref().map(Pipeline::report)
    }

    pub(crate) fn status(&self) -> ActiveStatus {
        let report = self.report();
        let status = match &report {
            Some(_) if self.is_running() => ActiveState::Running,
            Some(report) if report.state == "failed" => ActiveState::Failed,
            Some(_) => ActiveState::Completed,
            None => ActiveState::Stopped,
        };
        ActiveStatus {
            pipeline_id: self.pipeline_id.clone(),
            project_id: self.project_id.clone(),
            name: self.name.clone(),
            status,
            mode: report.as_ref().map(|report| report.mode),
            started_at: self.started_at.clone(),
            metrics: report,
        }
    }
}

/// A request to the launcher thread: a graph to start, its run id (a fresh one when None), and
/// where to send the result.
type Launch = (
    ValidatedGraph,
    RunMode,
    Option<String>,
    tokio::sync::oneshot::Sender<Result<Pipeline, String>>,
);

/// The running pipelines.
pub struct ActivePipelines {
    pub(crate) active: Mutex<HashMap<String, Arc<Active>>>,
    /// Pipelines between the start request and their entry in `active` (resolving the graph,
    /// building operators). Taken only while `active` is locked, so that checking for a run and
    /// claiming the start is one step: two concurrent starts of one pipeline give one run.
    starting: Mutex<std::collections::HashSet<String>>,
    /// Starts pipelines on a thread of normal priority (see [`ActivePipelines::new`]).
    launcher: Mutex<std::sync::mpsc::Sender<Launch>>,
    /// Set by [`ActivePipelines::stop_all`]: pipelines stopped by a server shutdown keep their
    /// `keep_running`, so the next start brings them back.
    pub(crate) shutting_down: std::sync::atomic::AtomicBool,
}

impl ActivePipelines {
    /// Drops the entry of an ended run of pipeline `id` (its record is being deleted).
    pub(crate) fn forget(&self, id: &str) {
        if let Ok(mut active) = self.active.lock() {
            active.remove(id);
        }
    }

    /// Call from a thread of normal scheduling priority: pipelines are started by a launcher
    /// thread spawned here, and their node threads inherit its priority. The API's own threads
    /// run at a lower priority (see `serve`), so that on a busy machine the inspection line gets
    /// the CPU before the control plane does.
    pub fn new() -> Result<Self, String> {
        let (launcher, requests) = std::sync::mpsc::channel::<Launch>();
        std::thread::Builder::new()
            .name("if-launcher".into())
            .spawn(move || {
                for (graph, mode, run_id, reply) in requests {
                    // A panic while building operators fails this start, not the launcher.
                    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        match &run_id {
                            Some(run_id) => Pipeline::start_run(&graph, mode, run_id),
                            None => Pipeline::start_in(&graph, mode),
                        }
                        .map_err(|error| error.to_string())
                    }))
                    .unwrap_or_else(|_| {
                        Err(format!("starting pipeline '{}' panicked", graph.name))
                    });
                    let _ = reply.send(started);
                }
            })
            .map_err(|e| format!("cannot start the pipeline launcher thread: {e}"))?;
        Ok(Self {
            active: Mutex::new(HashMap::new()),
            starting: Mutex::new(std::collections::HashSet::new()),
            launcher: Mutex::new(launcher),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Claims the start of pipeline `id`: refused (naming the run) while it runs or another
    /// request is starting it. The claim ends when the returned guard is dropped, by which time
    /// the new run, if any, is in `active`.
    pub(crate) fn claim_start(&self, id: &str) -> Result<StartClaim<'_>, String> {
        let active = self
            .active
            .lock()
            .map_err(|_| "the pipeline table is unusable".to_string())?;
        if let Some(run) = active.get(id) {
            if run.is_running() {
                return Err(format!(
                    "pipeline {id} is already running (run started at {}); stop it first",
                    run.started_at
                ));
            }
            if run.pipeline.lock().map_or(true, |p| p.is_none()) {
                return Err(format!(
                    "pipeline {id} is being stopped (run started at {}); start it again once stopped",
                    run.started_at
                ));
            }
        }
        let mut starting = self
            .starting
            .lock()
            .map_err(|_| "the pipeline table is unusable".to_string())?;
        if !starting.insert(id.to_string()) {
            return Err(format!("pipeline {id} is being started by another request"));
        }
        Ok(StartClaim {
            pipelines: self,
            id: id.to_string(),
        })
    }

    /// Starts `graph` in `mode` on the launcher thread.
    pub(crate) async fn launch(
        &self,
        graph: ValidatedGraph,
        mode: RunMode,
    ) -> Result<Pipeline, String> {
        self.launch_run(graph, mode, None).await
    }

    /// [`ActivePipelines::launch`] under run id `run_id` (a fresh one when None; see
    /// [`Pipeline::start_run`]). Fleet runs are started this way and kept by the fleet, not in
    /// this table.
    pub(crate) async fn launch_run(
        &self,
        graph: ValidatedGraph,
        mode: RunMode,
        run_id: Option<String>,
    ) -> Result<Pipeline, String> {
        let (reply, started) = tokio::sync::oneshot::channel();
        self.launcher
            .lock()
            .map_err(|_| "the pipeline launcher is gone".to_string())?
            .send((graph, mode, run_id, reply))
            .map_err(|_| "the pipeline launcher is gone".to_string())?;
        started
            .await
            .map_err(|_| "the pipeline launcher is gone".to_string())?
    }

    pub(crate) fn all(&self) -> Vec<Arc<Active>> {
        let mut all: Vec<Arc<Active>> = self
            .active
            .lock()
            .map(|a| a.values().cloned().collect())
            .unwrap_or_default();
        all.sort_by(|a, b| (&a.started_at, &a.pipeline_id).cmp(&(&b.started_at, &b.pipeline_id)));
        all
    }

    pub(crate) fn get(&self, id: &str) -> Option<Arc<Active>> {
        self.active.lock().ok()?.get(id).cloned()
    }

    /// The running pipeline that uses model `id`, if any.
    pub fn using_model(&self, id: &str) -> Option<String> {
        self.all()
            .into_iter()
            .find(|a| a.is_running() && a.uses.model_id.as_deref() == Some(id))
            .map(|a| a.pipeline_id.clone())
    }

    /// The running pipeline that uses source or sink `id`, if any.
    pub fn using_endpoint(&self, kind: EndpointKind, id: &str) -> Option<String> {
        self.all()
            .into_iter()
            .find(|a| {
                a.is_running()
                    && match kind {
                        EndpointKind::Source => a.uses.source_id.as_deref() == Some(id),
                        EndpointKind::Sink => a.uses.sink_ids.iter().any(|s| s == id),
                    }
            })
            .map(|a| a.pipeline_id.clone())
    }

    /// A running pipeline of project `id`, if any.
    pub fn running_in_project(&self, id: &str) -> Option<String> {
        self.all()
            .into_iter()
            .find(|a| a.is_running() && a.project_id == id)
            .map(|a| a.pipeline_id.clone())
    }

    /// Whether pipeline `id` is running.
    pub fn is_running(&self, id: &str) -> bool {
        self.get(id).is_some_and(|a| a.is_running())
    }

    /// Prometheus text of every started pipeline and of `others` (the fleet's runs), one
    /// HELP/TYPE per family.
    pub fn prometheus(&self, others: Vec<String>) -> String {
        let mut texts: Vec<String> = self
            .all()
            .iter()
            .filter_map(|a| a.report())
            .map(|report| report.to_prometheus())
            .collect();
        texts.extend(others);
        crate::runtime::metrics::merge_prometheus(&texts)
    }

    /// The current frame of running pipeline `id` for a capture: from source node `node`, or
    /// from the first source with a frame.
    pub(crate) fn latest_frame(&self, id: &str, node: Option<&str>) -> Latest {
        let Some(active) = self.get(id).filter(|a| a.is_running()) else {
            return Latest::NotRunning;
        };
        let Ok(guard) = active.pipeline.lock() else {
            return Latest::NotRunning;
        };
        let Some(pipeline) = guard.as_ref() else {
            return Latest::NotRunning;
        };
        let sources = pipeline.source_nodes();
        if let Some(node) = node
            && !sources.iter().any(|s| s == node)
        {
            return Latest::NotASource(sources);
        }
        match pipeline.latest_frame(node) {
            Some((node, frame)) => Latest::Frame {
                project_id: active.project_id.clone(),
                node,
                frame,
            },
            None => Latest::NoFrameYet,
        }
    }

    /// Stops every pipeline for a server shutdown: no new start is accepted, every run drains
    /// its queued frames, and one still running after `drain` is aborted. Returns once every
    /// run has ended.
    pub fn stop_all(&self, drain: Duration) {
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let runs: Vec<Pipeline> = self
            .all()
            .iter()
            .filter_map(|active| active.pipeline.lock().ok().and_then(|mut p| p.take()))
            .collect();
        for run in &runs {
            run.stop_handle().stop();
        }
        let deadline = std::time::Instant::now() + drain;
        while runs.iter().any(|run| !run.is_finished()) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for run in runs {
            if !run.is_finished() {
                run.stop_handle().abort();
            }
            run.wait();
        }
    }
}

/// A claimed start of one pipeline (see [`ActivePipelines::claim_start`]).
pub(crate) struct StartClaim<'a> {
    pipelines: &'a ActivePipelines,
    id: String,
}

impl Drop for StartClaim<'_> {
    fn drop(&mut self) {
        if let Ok(mut starting) = self.pipelines.starting.lock() {
            starting.remove(&self.id);
        }
    }
}

/// What a capture finds in a pipeline.
pub(crate) enum Latest {
    /// The pipeline is not running.
    NotRunning,
    /// The node asked for is not one of these sources.
    NotASource(Vec<String>),
    /// No source has produced a frame yet.
    NoFrameYet,
    /// The frame, its source node and the pipeline's project.
    Frame {
        project_id: String,
        node: String,
        frame: inspectflow_operators::Frame,
    },
}
