//! Pipelines: stored definitions (`/api/projects/{project_id}/pipelines`) and the ones running
//! (`/api/active-pipelines`), several at once, each with its own metrics.
//!
//! A pipeline is either a graph (a YAML string or a JSON object in `graph`, validated exactly
//! as `inspectflow validate` validates a file; errors answer 422 with every problem's node and
//! field) or is assembled from a stored source, one of the project's models and stored sinks:
//! `source -> preprocess -> infer.openvino -> anomaly -> heatmap -> encode.jpeg -> sinks`.
//! Every file and folder parameter of every node must lie under the server's path roots (links
//! resolved).
//!
//! Starting one resolves its definition against the current records (so a model's threshold
//! change applies at the next start), starts the runtime's threads and returns at once; a
//! batch source (a video file, a folder) ends by itself and shows `completed`. Stopping drains
//! queued frames (aborting after 10 s) and answers the final metrics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::api::{ApiError, AppState, Page, blocking, json_body, now, paginate, put_in_project};
use super::endpoints::{Endpoint, EndpointKind, endpoint};
use super::models::{Model, model_of};
use super::store::PIPELINES;
use crate::graph::{GraphErrors, ValidatedGraph};
use crate::runtime::metrics::MetricsReport;
use crate::runtime::pipeline::Pipeline;

/// A stored pipeline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PipelineRecord {
    /// UUID.
    pub id: String,
    /// The project it belongs to.
    pub project_id: String,
    /// Display name.
    pub name: String,
    /// A graph: YAML text or a JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graph: Option<Value>,
    /// Assembled form: the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_id: Option<String>,
    /// Assembled form: the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_id: Option<String>,
    /// Assembled form: the sinks.
    #[serde(default)]
    pub sink_ids: Vec<String>,
    /// Creation time.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
    /// Whether the pipeline should be running: set when it is started, cleared when it is
    /// stopped through the API or ends by itself (its source ended, or it failed). A server that
    /// restarts (after a crash or a power cut) starts these pipelines again.
    #[serde(default)]
    pub keep_running: bool,
}

/// Body of create and update.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PipelineBody {
    name: String,
    #[serde(default)]
    graph: Option<Value>,
    #[serde(default)]
    source_id: Option<String>,
    #[serde(default)]
    model_id: Option<String>,
    #[serde(default)]
    sink_ids: Vec<String>,
}

/// What a running pipeline holds on to, for the 409s of sources, sinks and models.
#[derive(Debug, Default, Clone)]
struct Uses {
    source_id: Option<String>,
    model_id: Option<String>,
    sink_ids: Vec<String>,
}

/// One started pipeline.
struct Active {
    pipeline_id: String,
    project_id: String,
    name: String,
    started_at: String,
    uses: Uses,
    /// Taken when the pipeline is stopped and joined.
    pipeline: Mutex<Option<Pipeline>>,
}

impl Active {
    fn is_running(&self) -> bool {
        self.pipeline
            .lock()
            .ok()
            .and_then(|p| p.as_ref().map(|p| !p.is_finished()))
            .unwrap_or(false)
    }

    fn report(&self) -> Option<MetricsReport> {
        self.pipeline.lock().ok()?.as_ref().map(Pipeline::report)
    }

    fn status(&self) -> Value {
        let report = self.report();
        let status = match &report {
            Some(_) if self.is_running() => "running",
            Some(report) if report.state == "failed" => "failed",
            Some(_) => "completed",
            None => "stopped",
        };
        json!({
            "pipeline_id": self.pipeline_id,
            "project_id": self.project_id,
            "name": self.name,
            "status": status,
            "started_at": self.started_at,
            "metrics": report,
        })
    }
}

/// A request to the launcher thread: a graph to start, and where to send the result.
type Launch = (
    ValidatedGraph,
    tokio::sync::oneshot::Sender<Result<Pipeline, String>>,
);

/// The running pipelines.
pub struct ActivePipelines {
    active: Mutex<HashMap<String, Arc<Active>>>,
    /// Pipelines between the start request and their entry in `active` (resolving the graph,
    /// building operators). Taken only while `active` is locked, so that checking for a run and
    /// claiming the start is one step: two concurrent starts of one pipeline give one run.
    starting: Mutex<std::collections::HashSet<String>>,
    /// Starts pipelines on a thread of normal priority (see [`ActivePipelines::new`]).
    launcher: Mutex<std::sync::mpsc::Sender<Launch>>,
    /// Set by [`ActivePipelines::stop_all`]: pipelines stopped by a server shutdown keep their
    /// `keep_running`, so the next start brings them back.
    shutting_down: std::sync::atomic::AtomicBool,
}

impl ActivePipelines {
    /// Call from a thread of normal scheduling priority: pipelines are started by a launcher
    /// thread spawned here, and their node threads inherit its priority. The API's own threads
    /// run at a lower priority (see `serve`), so that on a busy machine the inspection line gets
    /// the CPU before the control plane does.
    pub fn new() -> Result<Self, String> {
        let (launcher, requests) = std::sync::mpsc::channel::<Launch>();
        std::thread::Builder::new()
            .name("if-launcher".into())
            .spawn(move || {
                for (graph, reply) in requests {
                    // A panic while building operators fails this start, not the launcher.
                    let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        Pipeline::start(&graph).map_err(|error| error.to_string())
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
    fn claim_start(&self, id: &str) -> Result<StartClaim<'_>, String> {
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

    /// Starts `graph` on the launcher thread.
    async fn launch(&self, graph: ValidatedGraph) -> Result<Pipeline, String> {
        let (reply, started) = tokio::sync::oneshot::channel();
        self.launcher
            .lock()
            .map_err(|_| "the pipeline launcher is gone".to_string())?
            .send((graph, reply))
            .map_err(|_| "the pipeline launcher is gone".to_string())?;
        started
            .await
            .map_err(|_| "the pipeline launcher is gone".to_string())?
    }

    fn all(&self) -> Vec<Arc<Active>> {
        let mut all: Vec<Arc<Active>> = self
            .active
            .lock()
            .map(|a| a.values().cloned().collect())
            .unwrap_or_default();
        all.sort_by(|a, b| (&a.started_at, &a.pipeline_id).cmp(&(&b.started_at, &b.pipeline_id)));
        all
    }

    fn get(&self, id: &str) -> Option<Arc<Active>> {
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

    /// Prometheus text of every started pipeline, one HELP/TYPE per family.
    pub fn prometheus(&self) -> String {
        let texts: Vec<String> = self
            .all()
            .iter()
            .filter_map(|a| a.report())
            .map(|report| report.to_prometheus())
            .collect();
        merge_prometheus(&texts)
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
struct StartClaim<'a> {
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

/// Joins Prometheus texts, keeping each family's HELP and TYPE once and its samples together.
fn merge_prometheus(texts: &[String]) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut families: HashMap<String, (Vec<String>, Vec<String>)> = HashMap::new();
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

/// The routes of stored and active pipelines, and `/metrics`.
pub fn routes(state: Arc<AppState>) -> BoxedFilter<(Response,)> {
    let with_state = warp::any().map(move || Arc::clone(&state));
    let list = warp::path!("api" / "projects" / String / "pipelines")
        .and(warp::get())
        .and(warp::query::<Page>())
        .and(with_state.clone())
        .and_then(list);
    let create = warp::path!("api" / "projects" / String / "pipelines")
        .and(warp::post())
        .and(json_body::<PipelineBody>())
        .and(with_state.clone())
        .and_then(create);
    let get = warp::path!("api" / "projects" / String / "pipelines" / String)
        .and(warp::get())
        .and(with_state.clone())
        .and_then(get);
    let update = warp::path!("api" / "projects" / String / "pipelines" / String)
        .and(warp::put())
        .and(json_body::<PipelineBody>())
        .and(with_state.clone())
        .and_then(update);
    let delete = warp::path!("api" / "projects" / String / "pipelines" / String)
        .and(warp::delete())
        .and(with_state.clone())
        .and_then(delete);
    let active_list = warp::path!("api" / "active-pipelines")
        .and(warp::get())
        .and(with_state.clone())
        .and_then(active_list);
    let start = warp::path!("api" / "active-pipelines")
        .and(warp::post())
        .and(json_body::<StartBody>())
        .and(with_state.clone())
        .and_then(start);
    let status = warp::path!("api" / "active-pipelines" / String)
        .and(warp::get())
        .and(with_state.clone())
        .and_then(status);
    let stop = warp::path!("api" / "active-pipelines" / String)
        .and(warp::delete())
        .and(with_state.clone())
        .and_then(stop);
    let prometheus = warp::path!("metrics")
        .and(warp::get())
        .and(with_state)
        .and_then(prometheus);
    list.or(create)
        .unify()
        .or(get)
        .unify()
        .or(update)
        .unify()
        .or(delete)
        .unify()
        .or(active_list)
        .unify()
        .or(start)
        .unify()
        .or(status)
        .unify()
        .or(stop)
        .unify()
        .or(prometheus)
        .unify()
        .boxed()
}

/// `GET /metrics`: every running pipeline's metrics and the job counts, in Prometheus' text
/// format. The job counts read the store, so the text is put together off the async workers.
async fn prometheus(state: Arc<AppState>) -> Result<Response, Rejection> {
    let text = tokio::task::spawn_blocking(move || {
        let mut text = state.pipelines.prometheus();
        text.push_str(&state.jobs_prometheus());
        text
    })
    .await
    .map_err(|e| ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(warp::reply::with_header(text, "content-type", "text/plain; version=0.0.4").into_response())
}

async fn list(project_id: String, page: Page, state: Arc<AppState>) -> Result<Response, Rejection> {
    super::media::project_exists(&state, &project_id).await?;
    let mut items: Vec<PipelineRecord> = blocking(&state, |store| store.all(PIPELINES)).await?;
    items.retain(|p| p.project_id == project_id);
    items.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
    let (items, pagination) = paginate(items, &page)?;
    let items: Vec<Value> = items.into_iter().map(|p| with_status(&state, p)).collect();
    Ok(warp::reply::json(&json!({"pipelines": items, "pagination": pagination})).into_response())
}

/// The record with its run status (`running` or `idle`).
fn with_status(state: &AppState, record: PipelineRecord) -> Value {
    let running = state.pipelines.is_running(&record.id);
    let mut value = serde_json::to_value(record).unwrap_or_default();
    value["status"] = json!(if running { "running" } else { "idle" });
    value
}

async fn pipeline_of(
    state: &Arc<AppState>,
    project_id: &str,
    id: &str,
) -> Result<PipelineRecord, Rejection> {
    super::media::project_exists(state, project_id).await?;
    let key = id.to_string();
    match blocking(state, move |store| {
        store.get::<PipelineRecord>(PIPELINES, &key)
    })
    .await?
    {
        Some(record) if record.project_id == project_id => Ok(record),
        _ => Err(ApiError::not_found("pipeline", id)),
    }
}

async fn create(
    project_id: String,
    body: PipelineBody,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    super::media::project_exists(&state, &project_id).await?;
    let now = now();
    let record = PipelineRecord {
        id: uuid::Uuid::new_v4().to_string(),
        project_id,
        name: body.name.trim().to_string(),
        graph: body.graph,
        source_id: body.source_id,
        model_id: body.model_id,
        sink_ids: body.sink_ids,
        created_at: now.clone(),
        updated_at: now,
        keep_running: false,
    };
    save(&state, &record).await?;
    Ok(warp::reply::with_status(
        warp::reply::json(&with_status(&state, record)),
        StatusCode::CREATED,
    )
    .into_response())
}

/// Checks a record (its graph, or what it assembles) and stores it, if its project still exists.
async fn save(state: &Arc<AppState>, record: &PipelineRecord) -> Result<(), Rejection> {
    resolve(state, record).await?;
    put_in_project(
        state,
        &record.project_id,
        PIPELINES,
        &record.id,
        record.clone(),
    )
    .await
}

async fn get(project_id: String, id: String, state: Arc<AppState>) -> Result<Response, Rejection> {
    let record = pipeline_of(&state, &project_id, &id).await?;
    Ok(warp::reply::json(&with_status(&state, record)).into_response())
}

async fn update(
    project_id: String,
    id: String,
    body: PipelineBody,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    let mut record = pipeline_of(&state, &project_id, &id).await?;
    refuse_running(&state, &id)?;
    record.name = body.name.trim().to_string();
    record.graph = body.graph;
    record.source_id = body.source_id;
    record.model_id = body.model_id;
    record.sink_ids = body.sink_ids;
    record.updated_at = now();
    save(&state, &record).await?;
    Ok(warp::reply::json(&with_status(&state, record)).into_response())
}

async fn delete(
    project_id: String,
    id: String,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    pipeline_of(&state, &project_id, &id).await?;
    refuse_running(&state, &id)?;
    let key = id.clone();
    blocking(&state, move |store| store.remove(PIPELINES, &key)).await?;
    if let Ok(mut active) = state.pipelines.active.lock() {
        active.remove(&id);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn refuse_running(state: &AppState, id: &str) -> Result<(), Rejection> {
    if state.pipelines.is_running(id) {
        return Err(ApiError::reject(
            StatusCode::CONFLICT,
            format!("pipeline {id} is running; stop it first"),
        ));
    }
    Ok(())
}

/// Turns a record into a validated graph (named after the pipeline's id, which labels its
/// metrics and messages) and what it uses.
async fn resolve(
    state: &Arc<AppState>,
    record: &PipelineRecord,
) -> Result<(ValidatedGraph, Uses), Rejection> {
    let invalid = |message: String| ApiError::reject(StatusCode::UNPROCESSABLE_ENTITY, message);
    if record.name.is_empty() || record.name.len() > 200 {
        return Err(invalid("name: must be 1 to 200 characters".into()));
    }
    let assembled =
        record.source_id.is_some() || record.model_id.is_some() || !record.sink_ids.is_empty();
    let (text, is_json, uses) = match (&record.graph, assembled) {
        (Some(_), true) => {
            return Err(invalid(
                "graph: give either a graph or source_id, model_id and sink_ids, not both".into(),
            ));
        }
        (Some(Value::String(yaml)), false) => (yaml.clone(), false, Uses::default()),
        (Some(graph @ Value::Object(_)), false) => (graph.to_string(), true, Uses::default()),
        (Some(_), false) => {
            return Err(invalid(
                "graph: must be YAML text or a JSON object of a graph".into(),
            ));
        }
        (None, _) => {
            let (graph, uses) = assemble(state, record).await?;
            (graph.to_string(), true, uses)
        }
    };
    let file = format!("pipeline '{}'", record.name);
    let mut graph = crate::graph::load_str(
        &file,
        &text,
        is_json,
        &super::api::registry(),
        &state.graph_limits,
    )
    .map_err(graph_errors)?;
    state.roots.confine(&graph).map_err(graph_errors)?;
    graph.name = record.id.clone();
    Ok((graph, uses))
}

/// 422 with every problem, each with its node, field, line and column.
fn graph_errors(errors: GraphErrors) -> Rejection {
    ApiError::with_errors(
        StatusCode::UNPROCESSABLE_ENTITY,
        errors.to_string(),
        serde_json::to_value(&errors.0).unwrap_or_default(),
    )
}

/// The graph of an assembled pipeline.
async fn assemble(
    state: &Arc<AppState>,
    record: &PipelineRecord,
) -> Result<(Value, Uses), Rejection> {
    let invalid = |message: String| ApiError::reject(StatusCode::UNPROCESSABLE_ENTITY, message);
    let (Some(source_id), Some(model_id)) = (&record.source_id, &record.model_id) else {
        return Err(invalid(
            "graph: give a graph, or source_id and model_id (and sink_ids)".into(),
        ));
    };
    if record.sink_ids.is_empty() {
        return Err(invalid("sink_ids: give at least one sink".into()));
    }
    let source: Endpoint = endpoint(state, EndpointKind::Source, source_id)
        .await
        .map_err(|_| invalid(format!("source_id: source {source_id} does not exist")))?;
    let model: Model = model_of(state, &record.project_id, model_id)
        .await
        .map_err(|_| {
            invalid(format!(
                "model_id: model {model_id} does not exist in this project"
            ))
        })?;
    let mut sinks = Vec::new();
    for sink_id in &record.sink_ids {
        sinks.push(
            endpoint(state, EndpointKind::Sink, sink_id)
                .await
                .map_err(|_| invalid(format!("sink_ids: sink {sink_id} does not exist")))?,
        );
    }
    let model_dir = Model::dir(&state.data_dir, &model.id);
    let op =
        |kind: EndpointKind, e: &Endpoint| kind.operator(&e.endpoint_type).unwrap_or("invalid");
    let mut nodes = vec![
        json!({"id": "source", "op": op(EndpointKind::Source, &source), "params": source.config}),
        json!({"id": "preprocess", "op": "preprocess", "params": {"width": model.input_size, "height": model.input_size}}),
        json!({"id": "model", "op": "infer.openvino", "params": {"model": model_dir.join("model.xml"), "device": "CPU"}}),
        json!({"id": "verdict", "op": "anomaly", "params": {"model": model_dir, "threshold": model.threshold}}),
        json!({"id": "heatmap", "op": "heatmap", "params": {}}),
        json!({"id": "jpeg", "op": "encode.jpeg", "params": {}}),
    ];
    let mut edges = vec![
        json!({"from": "source", "to": "preprocess"}),
        json!({"from": "preprocess", "to": "model"}),
        json!({"from": "model", "to": "verdict"}),
        json!({"from": "verdict", "to": "heatmap"}),
        json!({"from": "heatmap", "to": "jpeg"}),
    ];
    for (index, sink) in sinks.iter().enumerate() {
        let id = format!("sink{}", index + 1);
        nodes.push(json!({"id": id, "op": op(EndpointKind::Sink, sink), "params": sink.config}));
        edges.push(json!({"from": "jpeg", "to": id}));
    }
    let uses = Uses {
        source_id: Some(source.id),
        model_id: Some(model.id),
        sink_ids: record.sink_ids.clone(),
    };
    Ok((
        json!({"name": record.name, "nodes": nodes, "edges": edges}),
        uses,
    ))
}

/// Body of `POST /api/active-pipelines`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StartBody {
    pipeline_id: String,
}

async fn active_list(state: Arc<AppState>) -> Result<Response, Rejection> {
    let items: Vec<Value> = state.pipelines.all().iter().map(|a| a.status()).collect();
    Ok(warp::reply::json(&json!({"active_pipelines": items})).into_response())
}

async fn start(body: StartBody, state: Arc<AppState>) -> Result<Response, Rejection> {
    let key = body.pipeline_id.clone();
    let record = blocking(&state, move |store| {
        store.get::<PipelineRecord>(PIPELINES, &key)
    })
    .await?
    .ok_or_else(|| {
        ApiError::reject(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("pipeline_id: pipeline {} does not exist", body.pipeline_id),
        )
    })?;
    let active = launch(&state, &record).await?;
    Ok(
        warp::reply::with_status(warp::reply::json(&active.status()), StatusCode::CREATED)
            .into_response(),
    )
}

/// Starts the pipelines that were running when the server went down (their records say
/// `keep_running`). One that cannot start any more (its model was deleted, its file is gone)
/// is logged and left stopped.
pub async fn restart_kept(state: &Arc<AppState>) {
    let records: Vec<PipelineRecord> = match blocking(state, |store| store.all(PIPELINES)).await {
        Ok(records) => records,
        Err(_) => {
            tracing::error!("cannot read the pipelines to restart");
            return;
        }
    };
    for record in records.into_iter().filter(|r| r.keep_running) {
        match launch(state, &record).await {
            Ok(_) => tracing::info!(pipeline = %record.id, "restarted after a server restart"),
            Err(rejection) => {
                let reason = rejection
                    .find::<ApiError>()
                    .map_or_else(|| format!("{rejection:?}"), |e| e.detail().to_string());
                tracing::error!(pipeline = %record.id, "cannot restart: {reason}");
                set_keep_running(state, &record.id, false).await;
            }
        }
    }
}

/// Records whether pipeline `id` should be running.
async fn set_keep_running(state: &Arc<AppState>, id: &str, keep_running: bool) {
    let key = id.to_string();
    let updated = blocking(state, move |store| {
        if let Some(mut record) = store.get::<PipelineRecord>(PIPELINES, &key)?
            && record.keep_running != keep_running
        {
            record.keep_running = keep_running;
            store.put(PIPELINES, &key, &record)?;
        }
        Ok(())
    })
    .await;
    if updated.is_err() {
        tracing::error!(pipeline = %id, "cannot record keep_running = {keep_running}");
    }
}

/// Resolves and starts a stored pipeline, records that it should keep running, and watches it
/// end by itself.
async fn launch(state: &Arc<AppState>, record: &PipelineRecord) -> Result<Arc<Active>, Rejection> {
    let _claim = state
        .pipelines
        .claim_start(&record.id)
        .map_err(|message| ApiError::reject(StatusCode::CONFLICT, message))?;
    if state
        .pipelines
        .shutting_down
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        return Err(ApiError::reject(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        ));
    }
    let (graph, uses) = resolve(state, record).await?;
    let pipeline = state
        .pipelines
        .launch(graph)
        .await
        .map_err(|error| ApiError::reject(StatusCode::UNPROCESSABLE_ENTITY, error))?;
    let active = Arc::new(Active {
        pipeline_id: record.id.clone(),
        project_id: record.project_id.clone(),
        name: record.name.clone(),
        started_at: now(),
        uses,
        pipeline: Mutex::new(Some(pipeline)),
    });
    let replaced = state
        .pipelines
        .active
        .lock()
        .ok()
        .and_then(|mut all| all.insert(record.id.clone(), Arc::clone(&active)));
    if let Some(previous) = replaced {
        // A finished earlier run: join its threads off the request path.
        tokio::task::spawn_blocking(move || {
            if let Some(pipeline) = previous.pipeline.lock().ok().and_then(|mut p| p.take()) {
                pipeline.wait();
            }
        });
    }
    tracing::info!(pipeline = %record.id, "started");
    set_keep_running(state, &record.id, true).await;
    tokio::spawn(watch_until_ended(Arc::clone(state), Arc::clone(&active)));
    Ok(active)
}

/// Clears `keep_running` once a run ends by itself (a finished file, a failure); a stop through
/// the API clears it itself, and a server shutdown keeps it.
async fn watch_until_ended(state: Arc<AppState>, active: Arc<Active>) {
    while active.is_running() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let shutting_down = state
        .pipelines
        .shutting_down
        .load(std::sync::atomic::Ordering::SeqCst);
    if !shutting_down && !state.pipelines.is_running(&active.pipeline_id) {
        set_keep_running(&state, &active.pipeline_id, false).await;
    }
}

async fn status(id: String, state: Arc<AppState>) -> Result<Response, Rejection> {
    let active = state
        .pipelines
        .get(&id)
        .ok_or_else(|| ApiError::not_found("active pipeline", &id))?;
    Ok(warp::reply::json(&active.status()).into_response())
}

/// Stops a pipeline: drains its queues (aborting after 10 s), joins its threads and answers
/// the final status and metrics.
async fn stop(id: String, state: Arc<AppState>) -> Result<Response, Rejection> {
    let active = state
        .pipelines
        .get(&id)
        .ok_or_else(|| ApiError::not_found("active pipeline", &id))?;
    let Some(pipeline) = active.pipeline.lock().ok().and_then(|mut p| p.take()) else {
        return Err(ApiError::not_found("active pipeline", &id));
    };
    let was_running = !pipeline.is_finished();
    let handle = pipeline.stop_handle();
    handle.stop();
    let outcome = tokio::task::spawn_blocking(move || {
        let (done, finished) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                finished.recv_timeout(Duration::from_secs(10))
            {
                handle.abort();
            }
        });
        let outcome = pipeline.wait();
        let _ = done.send(());
        outcome
    })
    .await
    .map_err(|e| ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if let Ok(mut all) = state.pipelines.active.lock()
        && all
            .get(&id)
            .is_some_and(|entry| Arc::ptr_eq(entry, &active))
    {
        all.remove(&id);
    }
    set_keep_running(&state, &id, false).await;
    tracing::info!(pipeline = %id, "stopped");
    Ok(warp::reply::json(&json!({
        "pipeline_id": id,
        "status": if was_running { "stopped" } else { "completed" },
        "failure": outcome.failure.map(|f| f.to_string()),
        "metrics": outcome.report,
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::merge_prometheus;

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
