//! Sources and sinks as stored configurations: `/api/sources` and `/api/sinks`.
//!
//! Each record names a type users of the reference system know (`video_file`, `images_folder`,
//! `usb_camera`, `ip_camera`; `folder`, `webhook`, `mqtt`; `disconnected` for either, a
//! placeholder without parameters) and holds the parameters of the
//! operator it maps to (`source.video_file`, ..., `sink.mqtt`; see `inspectflow operators` and
//! `schemas/`). Parameters are validated exactly as a graph file's are, and errors name the
//! field (`config.path`). Paths must lie under the server's path roots. A source is checked for
//! reachability when created or changed (the file or folder exists, the camera device exists,
//! the IP camera's host accepts a TCP connection), answering 422 when it is not. Changing or
//! deleting one that a running pipeline uses answers 409.

use std::sync::Arc;

use super::openapi::{Content, RouteDoc, schema_of};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::http::{ApiError, Page, blocking, json_body, listing, now, ok, paginate};
use super::state::AppState;
use super::store::{Collection, SINKS, SOURCES};

/// The type of a source or sink that is not connected to anything yet (no operator, empty
/// config): a pipeline may name it and be stored, but a pipeline whose source is disconnected
/// cannot start, and a disconnected sink receives nothing.
pub const DISCONNECTED: &str = "disconnected";

/// Which of the two resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointKind {
    /// `/api/sources`.
    Source,
    /// `/api/sinks`.
    Sink,
}

impl EndpointKind {
    fn table(self) -> Collection {
        match self {
            Self::Source => SOURCES,
            Self::Sink => SINKS,
        }
    }

    pub(crate) fn noun(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Sink => "sink",
        }
    }

    /// The operator a type maps to.
    pub fn operator(self, endpoint_type: &str) -> Option<&'static str> {
        Some(match (self, endpoint_type) {
            (Self::Source, "video_file") => "source.video_file",
            (Self::Source, "images_folder") => "source.images_folder",
            (Self::Source, "usb_camera") => "source.usb_camera",
            (Self::Source, "ip_camera") => "source.ip_camera",
            (Self::Sink, "folder") => "sink.folder",
            (Self::Sink, "webhook") => "sink.webhook",
            (Self::Sink, "mqtt") => "sink.mqtt",
            _ => return None,
        })
    }

    fn types(self) -> &'static str {
        match self {
            Self::Source => "video_file, images_folder, usb_camera, ip_camera, disconnected",
            Self::Sink => "folder, webhook, mqtt, disconnected",
        }
    }
}

/// A stored source or sink.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Endpoint {
    /// UUID.
    pub id: String,
    /// Display name.
    pub name: String,
    /// `video_file`, `images_folder`, `usb_camera`, `ip_camera`, `folder`, `webhook`, `mqtt`, or
    /// [`DISCONNECTED`].
    #[serde(rename = "type")]
    pub endpoint_type: String,
    /// The operator's parameters.
    pub config: Value,
    /// Creation time.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
}

listing!(
    /// The answer of `GET /api/sources`.
    SourceList,
    sources,
    Endpoint
);

listing!(
    /// The answer of `GET /api/sinks`.
    SinkList,
    sinks,
    Endpoint
);

/// Body of create and update.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct EndpointBody {
    pub(crate) name: String,
    #[serde(rename = "type")]
    pub(crate) endpoint_type: String,
    #[serde(default = "empty_object")]
    pub(crate) config: Value,
}

fn empty_object() -> Value {
    json!({})
}

/// The routes of one kind.
pub fn routes(state: Arc<AppState>, kind: EndpointKind) -> BoxedFilter<(Response,)> {
    let with_state = warp::any().map(move || Arc::clone(&state));
    let with_kind = warp::any().map(move || kind);
    let collection = match kind {
        EndpointKind::Source => "sources",
        EndpointKind::Sink => "sinks",
    };
    let base = move || warp::path("api").and(warp::path(collection));
    let list = base()
        .and(warp::path::end())
        .and(warp::get())
        .and(super::http::query::<Page>())
        .and(with_kind)
        .and(with_state.clone())
        .and_then(list);
    let create = base()
        .and(warp::path::end())
        .and(warp::post())
        .and(json_body::<EndpointBody>())
        .and(with_kind)
        .and(with_state.clone())
        .and_then(create);
    let one = move || {
        base()
            .and(warp::path::param::<String>())
            .and(warp::path::end())
    };
    let get = one()
        .and(warp::get())
        .and(with_kind)
        .and(with_state.clone())
        .and_then(get);
    let update = one()
        .and(warp::put())
        .and(json_body::<EndpointBody>())
        .and(with_kind)
        .and(with_state.clone())
        .and_then(update);
    let delete = one()
        .and(warp::delete())
        .and(with_kind)
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
        path: "/api/sources",
        summary: "Stored sources, paginated.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<SourceList>)),
        errors: &[401, 422],
    },
    RouteDoc {
        method: "post",
        path: "/api/sources",
        summary: "Create a source: type and the operator's parameters, validated and checked for reachability.",
        body: Content::Json(schema_of::<EndpointBody>),
        ok: (201, Content::Json(schema_of::<Endpoint>)),
        errors: &[401, 413, 415, 422],
    },
    RouteDoc {
        method: "get",
        path: "/api/sources/{source_id}",
        summary: "A source (secrets redacted).",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<Endpoint>)),
        errors: &[401, 404],
    },
    RouteDoc {
        method: "put",
        path: "/api/sources/{source_id}",
        summary: "Replace a source (409 while a running pipeline uses it).",
        body: Content::Json(schema_of::<EndpointBody>),
        ok: (200, Content::Json(schema_of::<Endpoint>)),
        errors: &[401, 404, 409, 413, 415, 422],
    },
    RouteDoc {
        method: "delete",
        path: "/api/sources/{source_id}",
        summary: "Delete a source (409 while a running pipeline uses it).",
        body: Content::None,
        ok: (204, Content::None),
        errors: &[401, 404, 409],
    },
    RouteDoc {
        method: "get",
        path: "/api/sinks",
        summary: "Stored sinks, paginated.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<SinkList>)),
        errors: &[401, 422],
    },
    RouteDoc {
        method: "post",
        path: "/api/sinks",
        summary: "Create a sink: type and the operator's parameters, validated.",
        body: Content::Json(schema_of::<EndpointBody>),
        ok: (201, Content::Json(schema_of::<Endpoint>)),
        errors: &[401, 413, 415, 422],
    },
    RouteDoc {
        method: "get",
        path: "/api/sinks/{sink_id}",
        summary: "A sink (secrets redacted).",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<Endpoint>)),
        errors: &[401, 404],
    },
    RouteDoc {
        method: "put",
        path: "/api/sinks/{sink_id}",
        summary: "Replace a sink (409 while a running pipeline uses it).",
        body: Content::Json(schema_of::<EndpointBody>),
        ok: (200, Content::Json(schema_of::<Endpoint>)),
        errors: &[401, 404, 409, 413, 415, 422],
    },
    RouteDoc {
        method: "delete",
        path: "/api/sinks/{sink_id}",
        summary: "Delete a sink (409 while a running pipeline uses it).",
        body: Content::None,
        ok: (204, Content::None),
        errors: &[401, 404, 409],
    },
];

async fn list(page: Page, kind: EndpointKind, state: Arc<AppState>) -> Result<Response, Rejection> {
    let mut items: Vec<Endpoint> = blocking(&state, move |store| store.all(kind.table())).await?;
    items.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
    let (items, pagination) = paginate(items, &page)?;
    Ok(match kind {
        EndpointKind::Source => ok(&SourceList {
            sources: items,
            pagination,
        }),
        EndpointKind::Sink => ok(&SinkList {
            sinks: items,
            pagination,
        }),
    })
}

/// The stored endpoint, or 404.
pub async fn endpoint(
    state: &Arc<AppState>,
    kind: EndpointKind,
    id: &str,
) -> Result<Endpoint, Rejection> {
    let key = id.to_string();
    blocking(state, move |store| {
        store.get::<Endpoint>(kind.table(), &key)
    })
    .await?
    .ok_or_else(|| ApiError::not_found(kind.noun(), id))
}

async fn get(id: String, kind: EndpointKind, state: Arc<AppState>) -> Result<Response, Rejection> {
    Ok(warp::reply::json(&redacted(endpoint(&state, kind, &id).await?)).into_response())
}

/// The record as answered: header values and passwords are not sent back.
pub(crate) fn redacted(mut endpoint: Endpoint) -> Endpoint {
    for secret in ["password", "headers"] {
        if let Some(value) = endpoint.config.get_mut(secret)
            && !value.is_null()
        {
            *value = json!("<redacted>");
        }
    }
    if let Some(url) = endpoint.config.get_mut("url")
        && let Some(text) = url.as_str()
    {
        *url = json!(crate::operators::url::redact_url(text));
    }
    endpoint
}

async fn create(
    body: EndpointBody,
    kind: EndpointKind,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    let endpoint = add(&state, kind, body).await?;
    Ok(
        warp::reply::with_status(warp::reply::json(&redacted(endpoint)), StatusCode::CREATED)
            .into_response(),
    )
}

/// Checks `body` and stores it as a new source or sink.
pub(crate) async fn add(
    state: &Arc<AppState>,
    kind: EndpointKind,
    body: EndpointBody,
) -> Result<Endpoint, Rejection> {
    let checked = check(state, kind, body).await?;
    let now = now();
    let endpoint = Endpoint {
        id: uuid::Uuid::new_v4().to_string(),
        name: checked.name,
        endpoint_type: checked.endpoint_type,
        config: checked.config,
        created_at: now.clone(),
        updated_at: now,
    };
    let stored = endpoint.clone();
    blocking(state, move |store| {
        store.put(kind.table(), &stored.id, &stored)
    })
    .await?;
    Ok(endpoint)
}

async fn update(
    id: String,
    body: EndpointBody,
    kind: EndpointKind,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    let mut endpoint = endpoint(&state, kind, &id).await?;
    refuse_in_use(&state, kind, &id)?;
    let checked = check(&state, kind, body).await?;
    endpoint.name = checked.name;
    endpoint.endpoint_type = checked.endpoint_type;
    endpoint.config = checked.config;
    endpoint.updated_at = now();
    let stored = endpoint.clone();
    blocking(&state, move |store| {
        store.put(kind.table(), &stored.id, &stored)
    })
    .await?;
    Ok(warp::reply::json(&redacted(endpoint)).into_response())
}

async fn delete(
    id: String,
    kind: EndpointKind,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    endpoint(&state, kind, &id).await?;
    refuse_in_use(&state, kind, &id)?;
    let key = id.clone();
    blocking(&state, move |store| store.remove(kind.table(), &key)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn refuse_in_use(state: &AppState, kind: EndpointKind, id: &str) -> Result<(), Rejection> {
    match state.pipelines.using_endpoint(kind, id) {
        Some(pipeline) => Err(ApiError::reject(
            StatusCode::CONFLICT,
            format!(
                "{} {id} is used by running pipeline {pipeline}; stop it first",
                kind.noun()
            ),
        )),
        None => Ok(()),
    }
}

/// Validates the body: the type, the operator's parameters (as a graph would), path roots and,
/// for sources, reachability.
async fn check(
    state: &Arc<AppState>,
    kind: EndpointKind,
    body: EndpointBody,
) -> Result<EndpointBody, Rejection> {
    let invalid = |message: String| ApiError::reject(StatusCode::UNPROCESSABLE_ENTITY, message);
    let name = body.name.trim().to_string();
    if name.is_empty() || name.len() > 200 {
        return Err(invalid("name: must be 1 to 200 characters".into()));
    }
    if body.endpoint_type == DISCONNECTED {
        if body.config.as_object().is_none_or(|c| !c.is_empty()) {
            return Err(invalid(
                "config: a disconnected source or sink takes no parameters ({})".into(),
            ));
        }
        return Ok(EndpointBody { name, ..body });
    }
    let Some(operator) = kind.operator(&body.endpoint_type) else {
        return Err(invalid(format!(
            "type: {:?} is not a {} type ({})",
            body.endpoint_type,
            kind.noun(),
            kind.types()
        )));
    };
    if !body.config.is_object() {
        return Err(invalid(
            "config: must be an object of the operator's parameters".into(),
        ));
    }
    validate_params(operator, &body.config).map_err(|error| invalid(format!("config{error}")))?;
    if let Some(descriptor) = super::state::registry().get(operator)
        && let Some((field, error)) = state
            .roots
            .outside(descriptor, &body.config)
            .into_iter()
            .next()
    {
        return Err(invalid(format!("config.{field}: {error}")));
    }
    if kind == EndpointKind::Source {
        let config = body.config.clone();
        tokio::task::spawn_blocking(move || reachable(operator, &config))
            .await
            .map_err(|e| ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(invalid)?;
    }
    Ok(EndpointBody { name, ..body })
}

/// Validates `params` of `operator` through the graph validator (a one-node graph), so the
/// rules and messages are those of `inspectflow validate`. The error starts with the field
/// (`.path: ...`).
fn validate_params(operator: &str, params: &Value) -> Result<(), String> {
    // The node alone would be an incomplete graph: give it a partner on its port.
    let graph = if operator.starts_with("source.") {
        json!({"name": "check", "nodes": [
            {"id": "endpoint", "op": operator, "params": params},
            {"id": "partner", "op": "sink.null"}
        ], "edges": [{"from": "endpoint", "to": "partner"}]})
    } else {
        json!({"name": "check", "nodes": [
            {"id": "partner", "op": "source.synthetic", "params": {"width": 64, "height": 64}},
            {"id": "endpoint", "op": operator, "params": params}
        ], "edges": [{"from": "partner", "to": "endpoint"}]})
    };
    let text = graph.to_string();
    let limits = crate::graph::GraphLimits::DEFAULT;
    match crate::graph::load_str("config", &text, true, super::state::registry(), &limits) {
        Ok(_) => Ok(()),
        Err(errors) => {
            // The endpoint's own error, else one about the whole document (a limit it trips).
            let Some(error) = errors
                .0
                .iter()
                .find(|e| e.node.as_deref() == Some("endpoint"))
                .or_else(|| errors.0.iter().find(|e| e.node.is_none()))
            else {
                return Ok(());
            };
            let field = error
                .field
                .as_deref()
                .map(|f| {
                    format!(
                        ".{}",
                        f.trim_start_matches("params.").trim_start_matches("params")
                    )
                })
                .filter(|f| f != ".")
                .unwrap_or_default();
            Err(format!("{field}: {}", error.message))
        }
    }
}

/// Whether a source can be reached now: its operator's health check (the file or folder
/// exists, the camera device exists, the camera's host accepts a connection).
fn reachable(operator: &str, config: &Value) -> Result<(), String> {
    match crate::operators::Registry::shared().get(operator) {
        Some(descriptor) => descriptor
            .health(config)
            .map_err(|error| match error.field {
                field if field.is_empty() => format!("config: {}", error.message),
                field => format!("config.{field}: {}", error.message),
            }),
        None => Ok(()),
    }
}
