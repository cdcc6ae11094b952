//! Sources and sinks as YAML files, the way Geti Inspect users move them between servers:
//! `GET /api/sources/{id}:export` (and `/api/sinks/...`) answers `name`, `type` and `config` as
//! YAML, secrets left out (passwords, headers, a URL that carries credentials); `POST /api/sources:import` (and `/api/sinks:import`) takes such a
//! file (at most 64 KiB, read with the graph files' YAML limits) and creates the source or sink
//! exactly as `POST /api/sources` would, with the same checks and errors.

use std::sync::Arc;

use serde_json::Value;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};
use yaml_rust2::Yaml;

use super::endpoints::{EndpointBody, EndpointKind, add, endpoint, redacted};
use super::http::{ApiError, action, file_reply};
use super::openapi::{Content, RouteDoc, schema_of};
use super::state::AppState;

/// Largest YAML file accepted.
const MAX_YAML_BYTES: u64 = 64 << 10;

/// The routes of one kind.
pub fn routes(state: Arc<AppState>, kind: EndpointKind) -> BoxedFilter<(Response,)> {
    let with_state = warp::any().map(move || Arc::clone(&state));
    let with_kind = warp::any().map(move || kind);
    let (collection, import_segment) = match kind {
        EndpointKind::Source => ("sources", "sources:import"),
        EndpointKind::Sink => ("sinks", "sinks:import"),
    };
    let export = warp::path("api")
        .and(warp::path(collection))
        .and(action("export"))
        .and(warp::path::end())
        .and(warp::get())
        .and(with_kind)
        .and(with_state.clone())
        .and_then(export);
    let import = warp::path("api")
        .and(warp::path(import_segment))
        .and(warp::path::end())
        .and(warp::post())
        .and(super::http::body_limit(MAX_YAML_BYTES, "a YAML document"))
        .and(warp::body::bytes())
        .and(with_kind)
        .and(with_state)
        .and_then(import);
    export.or(import).unify().boxed()
}

/// The routes' documentation.
pub const DOCS: &[RouteDoc] = &[
    RouteDoc {
        method: "get",
        path: "/api/sources/{source_id}:export",
        summary: "The source as YAML (name, type, config), secrets left out.",
        body: Content::None,
        ok: (200, Content::Binary(&["application/yaml"])),
        errors: &[401, 404],
    },
    RouteDoc {
        method: "post",
        path: "/api/sources:import",
        summary: "Create a source from YAML (name, type, config; at most 64 KiB), checked as POST /api/sources checks.",
        body: Content::Binary(&["application/yaml"]),
        ok: (201, Content::Json(schema_of::<super::endpoints::Endpoint>)),
        errors: &[401, 413, 422],
    },
    RouteDoc {
        method: "get",
        path: "/api/sinks/{sink_id}:export",
        summary: "The sink as YAML (name, type, config), secrets left out.",
        body: Content::None,
        ok: (200, Content::Binary(&["application/yaml"])),
        errors: &[401, 404],
    },
    RouteDoc {
        method: "post",
        path: "/api/sinks:import",
        summary: "Create a sink from YAML (name, type, config; at most 64 KiB), checked as POST /api/sinks checks.",
        body: Content::Binary(&["application/yaml"]),
        ok: (201, Content::Json(schema_of::<super::endpoints::Endpoint>)),
        errors: &[401, 413, 422],
    },
];

/// A JSON value as YAML.
fn to_yaml(value: &Value) -> Yaml {
    match value {
        Value::Null => Yaml::Null,
        Value::Bool(flag) => Yaml::Boolean(*flag),
        Value::Number(number) => match number.as_i64() {
            Some(integer) => Yaml::Integer(integer),
            None => Yaml::Real(number.to_string()),
        },
        Value::String(text) => Yaml::String(text.clone()),
        Value::Array(items) => Yaml::Array(items.iter().map(to_yaml).collect()),
        Value::Object(fields) => {
            let mut hash = yaml_rust2::yaml::Hash::new();
            for (key, item) in fields {
                hash.insert(Yaml::String(key.clone()), to_yaml(item));
            }
            Yaml::Hash(hash)
        }
    }
}

async fn export(
    id: String,
    kind: EndpointKind,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    let stored = endpoint(&state, kind, &id).await?;
    let original_url = stored.config.get("url").cloned();
    let mut shown = redacted(stored);
    if let Value::Object(config) = &mut shown.config {
        // Secrets stay out: redacted values, and a URL whose credentials were taken out (it
        // would import as a different, broken URL).
        config.retain(|_, value| value.as_str() != Some("<redacted>"));
        if config.get("url") != original_url.as_ref() {
            config.remove("url");
        }
    }
    let document = serde_json::json!({
        "name": shown.name,
        "type": shown.endpoint_type,
        "config": shown.config,
    });
    let mut text = String::new();
    yaml_rust2::YamlEmitter::new(&mut text)
        .dump(&to_yaml(&document))
        .map_err(|e| ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    text.push('\n');
    Ok(file_reply(text.into_bytes(), "application/yaml", None))
}

async fn import(
    body: bytes::Bytes,
    kind: EndpointKind,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    let invalid = |message: String| ApiError::reject(StatusCode::UNPROCESSABLE_ENTITY, message);
    let text =
        std::str::from_utf8(&body).map_err(|_| invalid("request body: not UTF-8 text".into()))?;
    let document = crate::graph::parse::parse_text(
        "request body",
        text,
        false,
        &crate::graph::GraphLimits::DEFAULT,
    )
    .map_err(|errors| invalid(errors.to_string()))?;
    if !document.value.is_object() {
        return Err(invalid(format!(
            "request body: a {} file is a mapping of name, type and config",
            kind.noun()
        )));
    }
    let body: EndpointBody = serde_json::from_value(document.value).map_err(|e| {
        invalid(format!(
            "request body: a {} file holds name, type and config: {e}",
            kind.noun()
        ))
    })?;
    let created = add(&state, kind, body).await?;
    Ok(
        warp::reply::with_status(warp::reply::json(&redacted(created)), StatusCode::CREATED)
            .into_response(),
    )
}
