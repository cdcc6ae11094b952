//! Running pipelines (`/api/active-pipelines`), several at once, each with its own metrics, and
//! `/metrics` for all of them.
//!
//! Starting one resolves its stored definition ([`super::pipelines`]), starts the runtime's
//! threads and returns at once; a batch source (a video file, a folder) ends by itself and
//! shows `completed`. Stopping drains queued frames (aborting after 10 s) and answers the final
//! metrics. Pipelines that were running when the server went down start again with it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::http::{ApiError, blocking, json_body, json_reply, now, ok};
use super::openapi::{Content, RouteDoc, schema_of};
use super::pipelines::{PipelineRecord, Purpose, resolve};
use super::running::Active;
use super::state::AppState;
use super::store::PIPELINES;
use crate::runtime::metrics::MetricsReport;
use crate::runtime::pipeline::{Pipeline, RunMode};

/// Where a started pipeline is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ActiveState {
    /// Frames go through.
    Running,
    /// Its source ended and everything drained.
    Completed,
    /// A node failed.
    Failed,
    /// Stopped through the API.
    Stopped,
}

/// A started pipeline and its metrics.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ActiveStatus {
    /// The stored pipeline.
    pub pipeline_id: String,
    /// Its project.
    pub project_id: String,
    /// Its display name.
    pub name: String,
    /// Where it is.
    pub status: ActiveState,
    /// While its threads are held: `running` (inspecting) or `active` (its sources run and are
    /// previewed, no inference).
    pub mode: Option<RunMode>,
    /// When it started.
    pub started_at: String,
    /// Per-node and per-edge metrics, while its threads are held.
    pub metrics: Option<MetricsReport>,
}

/// The answer of `GET /api/active-pipelines`.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ActivePipelineList {
    /// Every started pipeline.
    pub active_pipelines: Vec<ActiveStatus>,
}

/// The answer of `DELETE /api/active-pipelines/{id}`.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StopAnswer {
    /// The stored pipeline.
    pub pipeline_id: String,
    /// `stopped` when it was running, `completed` when it had already ended.
    pub status: ActiveState,
    /// Why it failed, if it did.
    pub failure: Option<String>,
    /// The final metrics.
    pub metrics: MetricsReport,
}

/// The routes of running pipelines, and `/metrics`.
pub fn routes(state: Arc<AppState>) -> BoxedFilter<(Response,)> {
    let with_state = warp::any().map(move || Arc::clone(&state));
    let list = warp::path!("api" / "active-pipelines")
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
    let switch = warp::path!("api" / "active-pipelines" / String / "mode")
        .and(warp::put())
        .and(json_body::<ModeBody>())
        .and(with_state.clone())
        .and_then(switch_mode);
    let prometheus = warp::path!("metrics")
        .and(warp::get())
        .and(with_state)
        .and_then(prometheus);
    list.or(start)
        .unify()
        .or(status)
        .unify()
        .or(stop)
        .unify()
        .or(switch)
        .unify()
        .or(prometheus)
        .unify()
        .boxed()
}

/// The routes' documentation.
pub const DOCS: &[RouteDoc] = &[
    RouteDoc {
        method: "get",
        path: "/api/active-pipelines",
        summary: "Started pipelines with status and metrics.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<ActivePipelineList>)),
        errors: &[401],
    },
    RouteDoc {
        method: "post",
        path: "/api/active-pipelines",
        summary: "Start a pipeline (several may run at once, each at most once: 409 names the run when this one runs or is being started or stopped; 503 while the server shuts down).",
        body: Content::Json(schema_of::<StartBody>),
        ok: (201, Content::Json(schema_of::<ActiveStatus>)),
        errors: &[401, 409, 413, 415, 422, 503],
    },
    RouteDoc {
        method: "get",
        path: "/api/active-pipelines/{pipeline_id}",
        summary: "A started pipeline's status and metrics: per-node FPS, latency percentiles, queue depths, drops, end-to-end latency.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<ActiveStatus>)),
        errors: &[401, 404],
    },
    RouteDoc {
        method: "delete",
        path: "/api/active-pipelines/{pipeline_id}",
        summary: "Stop a pipeline (drain, then abort after 10 s) and answer its final metrics.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<StopAnswer>)),
        errors: &[401, 404],
    },
    RouteDoc {
        method: "put",
        path: "/api/active-pipelines/{pipeline_id}/mode",
        summary: "Switch a started pipeline between `running` (inspecting) and `active` (its sources run and are previewed, no inference) without restarting its camera; 409 when its run has ended.",
        body: Content::Json(schema_of::<ModeBody>),
        ok: (200, Content::Json(schema_of::<ActiveStatus>)),
        errors: &[401, 404, 409, 413, 415, 422],
    },
    RouteDoc {
        method: "get",
        path: "/metrics",
        summary: "Prometheus text: every started pipeline's metrics and jobs by status.",
        body: Content::None,
        ok: (200, Content::Text),
        errors: &[401],
    },
];

/// `GET /metrics`: every running pipeline's metrics (fleet runs included) and the job counts, in Prometheus' text
/// format. The job counts read the store, so the text is put together off the async workers.
async fn prometheus(state: Arc<AppState>) -> Result<Response, Rejection> {
    let text = tokio::task::spawn_blocking(move || {
        let fleet_runs = state
            .fleet
            .get()
            .map(|fleet| fleet.prometheus_texts())
            .unwrap_or_default();
        let mut text = state.pipelines.prometheus(fleet_runs);
        text.push_str(&state.jobs_prometheus());
        text
    })
    .await
    .map_err(|e| ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(warp::reply::with_header(text, "content-type", "text/plain; version=0.0.4").into_response())
}

/// Body of `POST /api/active-pipelines`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StartBody {
    pipeline_id: String,
    /// `running` (default: inspecting) or `active` (its sources run and are previewed only).
    #[serde(default)]
    mode: RunMode,
}

/// Body of `PUT /api/active-pipelines/{pipeline_id}/mode`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ModeBody {
    /// `running` (inspecting) or `active` (previewed only).
    mode: RunMode,
}

/// Switches a started pipeline's mode; its sources keep running.
async fn switch_mode(
    id: String,
    body: ModeBody,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    let active = state
        .pipelines
        .get(&id)
        .ok_or_else(|| ApiError::not_found("active pipeline", &id))?;
    {
        let held = active.pipeline.lock().map_err(|_| {
            ApiError::reject(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the pipeline table is unusable",
            )
        })?;
        match held.as_ref() {
            Some(pipeline) if !pipeline.is_finished() => pipeline.set_mode(body.mode),
            _ => {
                return Err(ApiError::reject(
                    StatusCode::CONFLICT,
                    format!("pipeline {id} is not running; start it first"),
                ));
            }
        }
    }
    Ok(ok(&active.status()))
}

async fn active_list(state: Arc<AppState>) -> Result<Response, Rejection> {
    let active_pipelines = state.pipelines.all().iter().map(|a| a.status()).collect();
    Ok(ok(&ActivePipelineList { active_pipelines }))
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
    let active = launch(&state, &record, body.mode).await?;
    Ok(json_reply(StatusCode::CREATED, &active.status()))
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
        match launch(state, &record, RunMode::Running).await {
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
async fn launch(
    state: &Arc<AppState>,
    record: &PipelineRecord,
    mode: RunMode,
) -> Result<Arc<Active>, Rejection> {
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
    let (graph, uses) = resolve(state, record, Purpose::Run).await?;
    let pipeline = state
        .pipelines
        .launch(graph, mode)
        .await
        .map_err(|error| ApiError::reject(StatusCode::UNPROCESSABLE_ENTITY, error))?;
    let active = Arc::new(Active {
        pipeline_id: record.id.clone(),
        project_id: record.project_id.clone(),
        name: record.name.clone(),
        started_at: now(),
        uses,
        pipeline: Mutex::new(Some(pipeline)),
        draining: AtomicBool::new(false),
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
    let ended = active
        .pipeline
        .lock()
        .ok()
        .and_then(|p| p.as_ref().map(Pipeline::ended));
    if let Some(mut ended) = ended {
        let _ = ended.wait_for(|ended| *ended).await;
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
    Ok(ok(&active.status()))
}

/// Stops a pipeline: drains its queues (aborting after 10 s), joins its threads and answers
/// the final status and metrics.
async fn stop(id: String, state: Arc<AppState>) -> Result<Response, Rejection> {
    let active = state
        .pipelines
        .get(&id)
        .ok_or_else(|| ApiError::not_found("active pipeline", &id))?;
    // Draining counts as running until the pipeline is joined (see `Active::is_running`).
    let taken = active.pipeline.lock().ok().and_then(|mut pipeline| {
        let taken = pipeline.take();
        if taken.is_some() {
            active.draining.store(true, Ordering::SeqCst);
        }
        taken
    });
    let Some(pipeline) = taken else {
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
    .await;
    active.draining.store(false, Ordering::SeqCst);
    let outcome =
        outcome.map_err(|e| ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if let Ok(mut all) = state.pipelines.active.lock()
        && all
            .get(&id)
            .is_some_and(|entry| Arc::ptr_eq(entry, &active))
    {
        all.remove(&id);
    }
    set_keep_running(&state, &id, false).await;
    tracing::info!(pipeline = %id, "stopped");
    Ok(ok(&StopAnswer {
        pipeline_id: id,
        status: if was_running {
            ActiveState::Stopped
        } else {
            ActiveState::Completed
        },
        failure: outcome.failure.map(|f| f.to_string()),
        metrics: outcome.report,
    }))
}
