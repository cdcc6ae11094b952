//! Stored pipelines (`/api/projects/{project_id}/pipelines`): definitions a project keeps, each
//! shown with whether it runs. [`super::active`] starts and stops them.
//!
//! A pipeline is either a graph (a YAML string or a JSON object in `graph`, validated exactly
//! as `inspectflow validate` validates a file; errors answer 422 with every problem's node and
//! field) or is assembled from a stored source, one of the project's models and stored sinks:
//! `source -> preprocess -> infer.openvino -> anomaly -> heatmap -> encode.jpeg -> sinks`, plus
//! the live view (`sink.preview` of the overlay after `encode.jpeg` and of the raw frame after the
//! source, behind one-packet `drop_oldest` queues).
//! Every file and folder parameter of every node must lie under the server's path roots (links
//! resolved). Starting one resolves its definition against the current records (so a model's
//! threshold change applies at the next start).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::endpoints::{DISCONNECTED, Endpoint, EndpointKind, endpoint};
use super::http::{
    ApiError, Page, blocking, json_body, listing, now, ok, paginate, put_in_project,
};
use super::models::{Model, model_of};
use super::openapi::{Content, RouteDoc, schema_of};
use super::running::Uses;
use super::state::AppState;
use super::store::PIPELINES;
use crate::graph::QueuePolicy;
use crate::graph::{GraphErrors, ValidatedGraph};
use inspectflow_operators::package::ModelPackage;

/// A stored pipeline.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
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
    /// Assembled form: what the inspection queues do when inspection falls behind the source.
    /// Unset: `drop_oldest` for live sources (cameras, realtime files: the newest frame wins),
    /// `block` otherwise. `block` with a live source inspects every frame and lets the source
    /// wait (a realtime file slows down; a camera's own buffer drops instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_policy: Option<QueuePolicy>,
    /// Assembled form: the OpenVINO device the model runs on (`CPU`, `GPU`, `NPU`, `AUTO`,
    /// `GPU.1`; see `/api/devices`). Unset: `CPU`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
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
    #[serde(default)]
    queue_policy: Option<QueuePolicy>,
    #[serde(default)]
    device: Option<String>,
}

/// Whether a stored pipeline runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Started and not ended.
    Running,
    /// Not running.
    Idle,
}

/// A stored pipeline as the API shows it: the record and whether it runs.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PipelineView {
    /// The stored definition.
    #[serde(flatten)]
    pub record: PipelineRecord,
    /// `running` or `idle`.
    pub status: RunState,
}

listing!(
    /// The answer of `GET /api/projects/{id}/pipelines`.
    PipelineList,
    pipelines,
    PipelineView
);

/// The routes of stored pipelines.
pub fn routes(state: Arc<AppState>) -> BoxedFilter<(Response,)> {
    let with_state = warp::any().map(move || Arc::clone(&state));
    let list = warp::path!("api" / "projects" / String / "pipelines")
        .and(warp::get())
        .and(super::http::query::<Page>())
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
        .and(with_state)
        .and_then(delete);
    list.or(create)
        .unify()
        .or(get)
        .unify()
        .or(update)
        .unify()
        .or(delete)
        .unify()
        .boxed()
}

/// The routes' documentation.
pub const DOCS: &[RouteDoc] = &[
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}/pipelines",
        summary: "The project's pipelines with their status (idle or running), paginated.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<PipelineList>)),
        errors: &[401, 404, 422],
    },
    RouteDoc {
        method: "post",
        path: "/api/projects/{project_id}/pipelines",
        summary: "Create a pipeline from a graph (YAML text or JSON object) or from source_id, model_id and sink_ids; 422 lists each graph error with node and field.",
        body: Content::Json(schema_of::<PipelineBody>),
        ok: (201, Content::Json(schema_of::<PipelineView>)),
        errors: &[401, 404, 413, 415, 422],
    },
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}/pipelines/{pipeline_id}",
        summary: "A pipeline.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<PipelineView>)),
        errors: &[401, 404],
    },
    RouteDoc {
        method: "put",
        path: "/api/projects/{project_id}/pipelines/{pipeline_id}",
        summary: "Replace a pipeline's definition (409 while it runs).",
        body: Content::Json(schema_of::<PipelineBody>),
        ok: (200, Content::Json(schema_of::<PipelineView>)),
        errors: &[401, 404, 409, 413, 415, 422],
    },
    RouteDoc {
        method: "delete",
        path: "/api/projects/{project_id}/pipelines/{pipeline_id}",
        summary: "Delete a pipeline (409 while it runs).",
        body: Content::None,
        ok: (204, Content::None),
        errors: &[401, 404, 409],
    },
];

async fn list(project_id: String, page: Page, state: Arc<AppState>) -> Result<Response, Rejection> {
    super::media::project_exists(&state, &project_id).await?;
    let mut items: Vec<PipelineRecord> = blocking(&state, |store| store.all(PIPELINES)).await?;
    items.retain(|p| p.project_id == project_id);
    items.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
    let (items, pagination) = paginate(items, &page)?;
    let items = items.into_iter().map(|p| with_status(&state, p)).collect();
    Ok(ok(&PipelineList {
        pipelines: items,
        pagination,
    }))
}

/// The record with its run status (`running` or `idle`).
fn with_status(state: &AppState, record: PipelineRecord) -> PipelineView {
    let status = if state.pipelines.is_running(&record.id) {
        RunState::Running
    } else {
        RunState::Idle
    };
    PipelineView { record, status }
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
        queue_policy: body.queue_policy,
        device: body.device,
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
    resolve(state, record, Purpose::Store).await?;
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
    record.queue_policy = body.queue_policy;
    record.device = body.device;
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
    state.pipelines.forget(&id);
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

/// Why a record is resolved into a graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// To check it before storing: a disconnected source stands in as a placeholder, so the rest
    /// (model, sinks, device) is still checked.
    Store,
    /// To run it: a disconnected source is a 409.
    Run,
}

/// Turns a record into a validated graph (named after the pipeline's id, which labels its
/// metrics and messages) and what it uses.
pub(crate) async fn resolve(
    state: &Arc<AppState>,
    record: &PipelineRecord,
    purpose: Purpose,
) -> Result<(ValidatedGraph, Uses), Rejection> {
    let invalid = |message: String| ApiError::reject(StatusCode::UNPROCESSABLE_ENTITY, message);
    if record.name.is_empty() || record.name.len() > 200 {
        return Err(invalid("name: must be 1 to 200 characters".into()));
    }
    let assembled = record.source_id.is_some()
        || record.model_id.is_some()
        || !record.sink_ids.is_empty()
        || record.queue_policy.is_some()
        || record.device.is_some();
    let (mut graph, uses) = match (&record.graph, assembled) {
        (Some(_), true) => {
            return Err(invalid(
                "graph: give either a graph or source_id, model_id, sink_ids (and queue_policy, device), not both"
                    .into(),
            ));
        }
        (Some(graph), false) => (
            graph_from_value(state, &format!("pipeline '{}'", record.name), graph)
                .map_err(graph_errors)?,
            Uses::default(),
        ),
        (None, _) => {
            let (graph, uses) = assemble(state, record, purpose).await?;
            let file = format!("pipeline '{}'", record.name);
            (
                graph_from_value(state, &file, &graph).map_err(graph_errors)?,
                uses,
            )
        }
    };
    graph.name = record.id.clone();
    Ok((graph, uses))
}

/// Validates a graph given as YAML text or a JSON object (`file` names it in errors) and
/// confines its paths to the roots.
pub(crate) fn graph_from_value(
    state: &AppState,
    file: &str,
    graph: &Value,
) -> Result<ValidatedGraph, GraphErrors> {
    let (text, is_json) = match graph {
        Value::String(yaml) => (yaml.clone(), false),
        Value::Object(_) => (graph.to_string(), true),
        _ => {
            return Err(GraphErrors(vec![crate::graph::GraphError::in_file(
                file,
                "graph: must be YAML text or a JSON object of a graph",
            )]));
        }
    };
    let graph = crate::graph::load_str(
        file,
        &text,
        is_json,
        super::state::registry(),
        &state.graph_limits,
    )?;
    state.roots.confine(&graph)?;
    Ok(graph)
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
    purpose: Purpose,
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
    let device = record
        .device
        .as_deref()
        .unwrap_or(inspectflow_operators::infer::model::DEFAULT_DEVICE);
    super::system::require_device("device", device).await?;
    let model_dir = Model::dir(&state.data_dir, &model.id);
    let package = ModelPackage::open(&model_dir)
        .map_err(|e| invalid(format!("model_id: model {model_id}: {e}")))?;
    let op =
        |kind: EndpointKind, e: &Endpoint| kind.operator(&e.endpoint_type).unwrap_or("invalid");
    let source_node = match (source.endpoint_type == DISCONNECTED, purpose) {
        (false, _) => {
            json!({"id": "source", "op": op(EndpointKind::Source, &source), "params": source.config})
        }
        (true, Purpose::Store) => {
            json!({"id": "source", "op": "source.synthetic", "params": {"width": 64, "height": 64}})
        }
        (true, Purpose::Run) => {
            return Err(ApiError::reject(
                StatusCode::CONFLICT,
                format!(
                    "source_id: source {source_id} is disconnected; give it a type (PUT /api/sources/{source_id}) before starting the pipeline"
                ),
            ));
        }
    };
    let mut nodes = vec![
        source_node,
        json!({"id": "preprocess", "op": "preprocess", "params": package.manifest.preprocess_params()}),
        json!({"id": "model", "op": "infer.openvino", "params": {"model": model_dir.join("model.xml"), "device": device}}),
        json!({"id": "verdict", "op": "anomaly", "params": {"model": model_dir, "threshold": model.threshold}}),
        json!({"id": "heatmap", "op": "heatmap", "params": {}}),
        json!({"id": "jpeg", "op": "encode.jpeg", "params": {}}),
    ];
    // The inspection chain's edges; the queue policy, when the pipeline sets one, on each.
    let edge = |from: &str, to: &str| match record.queue_policy {
        Some(policy) => json!({"from": from, "to": to, "queue": {"policy": policy}}),
        None => json!({"from": from, "to": to}),
    };
    let mut edges = vec![
        edge("source", "preprocess"),
        edge("preprocess", "model"),
        edge("model", "verdict"),
        edge("verdict", "heatmap"),
        edge("heatmap", "jpeg"),
    ];
    for (index, sink) in sinks.iter().enumerate() {
        if sink.endpoint_type == DISCONNECTED {
            continue; // Receives nothing.
        }
        let id = format!("sink{}", index + 1);
        nodes.push(json!({"id": id, "op": op(EndpointKind::Sink, sink), "params": sink.config}));
        edges.push(edge("jpeg", &id));
    }
    // The live view of both images; a one-packet `drop_oldest` queue, so a preview never holds
    // the inspection back.
    let preview_queue = json!({"capacity": 1, "policy": "drop_oldest"});
    nodes.push(json!({"id": "preview", "op": "sink.preview", "params": {"view": "overlay"}}));
    edges.push(json!({"from": "jpeg", "to": "preview", "queue": preview_queue}));
    nodes.push(json!({"id": "preview_raw", "op": "sink.preview", "params": {"view": "raw"}}));
    edges.push(json!({"from": "source", "to": "preview_raw", "queue": preview_queue}));
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
