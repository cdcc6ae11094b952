//! The fleet's routes (the fleet itself is [`super::fleet`]); any engine answers for the whole
//! fleet:
//!
//! - `GET /api/fleet`: the live engines, and every desired pipeline with the engine that runs
//!   it and its metrics;
//! - `PUT /api/fleet/pipelines/{id}` puts a pipeline (a graph) into the desired state; an
//!   unchanged graph keeps its generation, a changed one restarts it;
//! - `GET /api/fleet/pipelines/{id}` gives one; `DELETE` takes it out (its engine stops it).
//!
//! An engine started without `--fleet-nats` answers 409; one that cannot reach NATS, 503.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::fleet::{
    DesiredPipeline, EngineRecord, Fleet, FleetError, FleetState, Lease, Outcome, live_entry,
};
use super::http::{ApiError, json_body, json_reply, now, ok};
use super::openapi::{Content, RouteDoc, schema_of};
use super::state::AppState;
use crate::runtime::metrics::MetricsReport;

/// The body of `PUT /api/fleet/pipelines/{id}`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PutFleetPipeline {
    /// The graph: YAML text or a JSON object, checked as a pipeline's graph is (its `name` is
    /// replaced by the pipeline id).
    pub graph: serde_json::Value,
}

/// One live engine.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct EngineView {
    /// Its id.
    pub engine: String,
    /// Where its REST API listens.
    pub api: String,
    /// Pipelines it runs at once at most.
    pub capacity: usize,
    /// The pipelines it runs now, by id.
    pub pipelines: Vec<String>,
    /// When it joined.
    pub started_at: String,
    /// When it last reported (every tick).
    pub updated_at: String,
}

/// One desired pipeline and where it stands.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct FleetPipelineView {
    /// Its id.
    pub pipeline_id: String,
    /// Its generation (the desired state's revision; a changed graph is a new one).
    pub generation: u64,
    /// `pending`, `running`, `completed` or `failed`.
    pub state: FleetState,
    /// The engine running it, or the one it ended on.
    pub engine: Option<String>,
    /// When its desired state was last put.
    pub updated_at: String,
    /// Why it failed.
    pub failure: Option<String>,
    /// Its metrics (running: as its engine last reported them; ended: final).
    pub metrics: Option<MetricsReport>,
}

/// The answer of `GET /api/fleet`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct FleetView {
    /// The engine that answered.
    pub engine: String,
    /// The live engines.
    pub engines: Vec<EngineView>,
    /// Every desired pipeline, by id.
    pub pipelines: Vec<FleetPipelineView>,
}

/// The fleet routes.
pub fn routes(state: Arc<AppState>) -> BoxedFilter<(Response,)> {
    let with_state = warp::any().map(move || Arc::clone(&state));
    let view = warp::path!("api" / "fleet")
        .and(warp::get())
        .and(with_state.clone())
        .and_then(view);
    let put = warp::path!("api" / "fleet" / "pipelines" / String)
        .and(warp::put())
        .and(json_body::<PutFleetPipeline>())
        .and(with_state.clone())
        .and_then(put);
    let get = warp::path!("api" / "fleet" / "pipelines" / String)
        .and(warp::get())
        .and(with_state.clone())
        .and_then(get);
    let delete = warp::path!("api" / "fleet" / "pipelines" / String)
        .and(warp::delete())
        .and(with_state)
        .and_then(delete);
    view.or(put)
        .unify()
        .or(get)
        .unify()
        .or(delete)
        .unify()
        .boxed()
}

/// The routes' documentation.
pub const DOCS: &[RouteDoc] = &[
    RouteDoc {
        method: "get",
        path: "/api/fleet",
        summary: "The fleet (serve --fleet-nats): live engines, and every desired pipeline with its state, the engine running it and its metrics.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<FleetView>)),
        errors: &[401, 409, 503],
    },
    RouteDoc {
        method: "put",
        path: "/api/fleet/pipelines/{pipeline_id}",
        summary: "Put a pipeline (a graph) into the fleet's desired state; an engine with capacity claims and runs it. An unchanged graph keeps its generation; a changed one restarts it.",
        body: Content::Json(schema_of::<PutFleetPipeline>),
        ok: (200, Content::Json(schema_of::<FleetPipelineView>)),
        errors: &[400, 401, 409, 413, 422, 503],
    },
    RouteDoc {
        method: "get",
        path: "/api/fleet/pipelines/{pipeline_id}",
        summary: "One desired pipeline: its generation, state, engine and metrics.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<FleetPipelineView>)),
        errors: &[401, 404, 409, 503],
    },
    RouteDoc {
        method: "delete",
        path: "/api/fleet/pipelines/{pipeline_id}",
        summary: "Take a pipeline out of the desired state; the engine running it stops it.",
        body: Content::None,
        ok: (204, Content::None),
        errors: &[401, 404, 409, 503],
    },
];

fn fleet(state: &AppState) -> Result<Arc<Fleet>, Rejection> {
    state.fleet.get().cloned().ok_or_else(|| {
        ApiError::reject(
            StatusCode::CONFLICT,
            "fleet mode is off on this engine (start `inspectflow serve` with --fleet-nats)",
        )
    })
}

fn unavailable(error: FleetError) -> Rejection {
    ApiError::reject(StatusCode::SERVICE_UNAVAILABLE, error.to_string())
}

fn check_id(id: &str) -> Result<(), Rejection> {
    if super::fleet::valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::reject(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "pipeline_id: '{id}' is not a fleet pipeline id (1-64 letters, digits, - or _)"
            ),
        ))
    }
}

async fn view(state: Arc<AppState>) -> Result<Response, Rejection> {
    let fleet = fleet(&state)?;
    let engines = fleet.buckets.engine_records().await.map_err(unavailable)?;
    let desired = fleet
        .buckets
        .desired_pipelines()
        .await
        .map_err(unavailable)?;
    let mut ids: Vec<&String> = desired.keys().collect();
    ids.sort();
    let mut pipelines = Vec::with_capacity(ids.len());
    for id in ids {
        let (generation, pipeline) = &desired[id];
        pipelines.push(pipeline_view(&fleet, &engines, id, *generation, pipeline).await?);
    }
    Ok(ok(&FleetView {
        engine: fleet.engine.clone(),
        engines: engines
            .iter()
            .map(|e| EngineView {
                engine: e.engine.clone(),
                api: e.api.clone(),
                capacity: e.capacity,
                pipelines: e.runs.iter().map(|r| r.pipeline_id.clone()).collect(),
                started_at: e.started_at.clone(),
                updated_at: e.updated_at.clone(),
            })
            .collect(),
        pipelines,
    }))
}

/// Where pipeline `id` of `generation` stands: its lease, else its outcome, else pending.
async fn pipeline_view(
    fleet: &Fleet,
    engines: &[EngineRecord],
    id: &str,
    generation: u64,
    pipeline: &DesiredPipeline,
) -> Result<FleetPipelineView, Rejection> {
    let mut view = FleetPipelineView {
        pipeline_id: id.to_string(),
        generation,
        state: FleetState::Pending,
        engine: None,
        updated_at: pipeline.updated_at.clone(),
        failure: None,
        metrics: None,
    };
    let lease = live_entry(&fleet.buckets.leases, id)
        .await
        .map_err(unavailable)?
        .and_then(|entry| serde_json::from_slice::<Lease>(&entry.value).ok())
        .filter(|lease| lease.generation == generation);
    if let Some(lease) = lease {
        view.state = FleetState::Running;
        view.metrics = engines
            .iter()
            .find(|e| e.engine == lease.engine)
            .and_then(|e| e.runs.iter().find(|run| run.pipeline_id == id))
            .and_then(|run| run.metrics.clone());
        view.engine = Some(lease.engine);
        return Ok(view);
    }
    let outcome = live_entry(&fleet.buckets.outcomes, id)
        .await
        .map_err(unavailable)?
        .and_then(|entry| serde_json::from_slice::<Outcome>(&entry.value).ok())
        .filter(|outcome| outcome.generation == generation);
    if let Some(outcome) = outcome {
        view.state = outcome.state;
        view.engine = Some(outcome.engine);
        view.failure = outcome.failure;
        view.metrics = outcome.metrics;
    }
    Ok(view)
}

async fn put(
    id: String,
    body: PutFleetPipeline,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    let fleet = fleet(&state)?;
    check_id(&id)?;
    // Checked here as each engine will check it before running it (operators, parameters,
    // limits, paths inside the roots).
    super::pipelines::graph_from_value(&state, &format!("fleet pipeline '{id}'"), &body.graph)
        .map_err(|errors| {
            ApiError::with_errors(
                StatusCode::UNPROCESSABLE_ENTITY,
                errors.to_string(),
                serde_json::to_value(&errors.0).unwrap_or_default(),
            )
        })?;
    let current = live_entry(&fleet.buckets.desired, &id)
        .await
        .map_err(unavailable)?;
    let unchanged = current.as_ref().and_then(|entry| {
        serde_json::from_slice::<DesiredPipeline>(&entry.value)
            .ok()
            .filter(|existing| existing.graph == body.graph)
            .map(|existing| (entry.revision, existing))
    });
    let (generation, desired) = match unchanged {
        Some(kept) => kept,
        None => {
            let desired = DesiredPipeline {
                graph: body.graph,
                updated_at: now(),
            };
            let value = serde_json::to_vec(&desired).unwrap_or_default();
            let revision = fleet
                .buckets
                .desired
                .put(&id, value.into())
                .await
                .map_err(|e| unavailable(FleetError(format!("storing the desired state: {e}"))))?;
            (revision, desired)
        }
    };
    let engines = fleet.buckets.engine_records().await.map_err(unavailable)?;
    let view = pipeline_view(&fleet, &engines, &id, generation, &desired).await?;
    let status = if current.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(json_reply(status, &view))
}

async fn get(id: String, state: Arc<AppState>) -> Result<Response, Rejection> {
    let fleet = fleet(&state)?;
    check_id(&id)?;
    let entry = live_entry(&fleet.buckets.desired, &id)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| ApiError::not_found("fleet pipeline", &id))?;
    let desired: DesiredPipeline = serde_json::from_slice(&entry.value).map_err(|e| {
        ApiError::reject(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("fleet pipeline {id}: unreadable desired state: {e}"),
        )
    })?;
    let engines = fleet.buckets.engine_records().await.map_err(unavailable)?;
    let view = pipeline_view(&fleet, &engines, &id, entry.revision, &desired).await?;
    Ok(ok(&view))
}

async fn delete(id: String, state: Arc<AppState>) -> Result<Response, Rejection> {
    let fleet = fleet(&state)?;
    check_id(&id)?;
    live_entry(&fleet.buckets.desired, &id)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| ApiError::not_found("fleet pipeline", &id))?;
    fleet
        .buckets
        .desired
        .purge(&id)
        .await
        .map_err(|e| unavailable(FleetError(format!("removing the desired state: {e}"))))?;
    let _ = fleet.buckets.outcomes.purge(&id).await;
    Ok(warp::reply::with_status(warp::reply(), StatusCode::NO_CONTENT).into_response())
}
