//! The API's OpenAPI 3.1 description, served at `/api/openapi.json` and written by
//! `inspectflow gen-api --target-path FILE`.
//!
//! Each resource module declares its routes' documentation ([`RouteDoc`]) next to its router,
//! naming the Rust types of the request body and of the success answer; the schemas of those
//! types come from schemars (JSON Schema 2020-12, which OpenAPI 3.1 uses as it is), collected
//! under `components/schemas`. The handlers serialize the same types, so a schema cannot drift
//! from what is sent. A test requests every documented route from a running server, so the
//! documentation and the router cannot drift apart either, and another validates the answers of
//! a whole session against these schemas.

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{Map, Value, json};

use super::http::ErrorBody;

/// Adds the schema of a type to the generator and answers a reference to it.
pub type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

/// The schema of `T`, as a reference into `components/schemas` where `T` has a name.
pub fn schema_of<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    generator.subschema_for::<T>()
}

/// What a request or an answer carries.
#[derive(Clone, Copy)]
pub enum Content {
    /// Nothing.
    None,
    /// JSON of a type.
    Json(SchemaFn),
    /// A `multipart/form-data` upload of media: `file`, `label`, `mask`.
    MediaUpload,
    /// A `multipart/form-data` upload of one image: `file`.
    ImageUpload,
    /// Bytes of one of these media types.
    Binary(&'static [&'static str]),
    /// Server-sent events (`text/event-stream`) whose `data` is JSON of a type.
    EventStream(SchemaFn),
    /// Plain text (Prometheus' text format).
    Text,
}

/// One documented route.
pub struct RouteDoc {
    /// Lower-case HTTP method.
    pub method: &'static str,
    /// Path with `{parameters}`.
    pub path: &'static str,
    /// One line on what it does.
    pub summary: &'static str,
    /// The request body it takes.
    pub body: Content,
    /// The success status and what it carries.
    pub ok: (u16, Content),
    /// Error statuses it answers with (each carries an [`ErrorBody`]).
    pub errors: &'static [u16],
}

/// Every documented route, resource by resource.
pub fn routes() -> impl Iterator<Item = &'static RouteDoc> {
    [
        super::system::DOCS,
        super::projects::DOCS,
        super::media::DOCS,
        super::jobs::DOCS,
        super::models::DOCS,
        super::endpoints::DOCS,
        super::endpoint_yaml::DOCS,
        super::pipelines::DOCS,
        super::active::DOCS,
        super::preview::DOCS,
        super::snapshots::DOCS,
        super::captures::DOCS,
        super::fleet_routes::DOCS,
        super::ui::DOCS,
        #[cfg(feature = "gstreamer")]
        super::webrtc::DOCS,
    ]
    .into_iter()
    .flatten()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Malformed request",
        401 => "Missing or wrong bearer token",
        403 => "Sent by another site through a browser",
        404 => "Not found",
        408 => "The request body came too slowly",
        409 => "Conflicts with the current state (in use, running, ended)",
        413 => "Body too large",
        415 => "Body is not JSON",
        422 => "Invalid request field",
        503 => "A component is unavailable",
        _ => "Other",
    }
}

/// The `content` object of a body, or `None` when there is no body.
fn content(generator: &mut SchemaGenerator, content: Content) -> Option<Value> {
    let binary = json!({"type": "string", "format": "binary"});
    Some(match content {
        Content::None => return None,
        Content::Json(schema) => json!({"application/json": {"schema": schema(generator)}}),
        Content::MediaUpload => json!({"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["file"],
            "properties": {
                "file": binary,
                "label": {"type": "string", "enum": ["normal", "anomalous"]},
                "mask": binary
            }
        }}}),
        Content::ImageUpload => json!({"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["file"],
            "properties": {"file": binary}
        }}}),
        Content::Binary(types) => Value::Object(
            types
                .iter()
                .map(|media_type| (media_type.to_string(), json!({"schema": binary})))
                .collect(),
        ),
        Content::EventStream(schema) => json!({"text/event-stream": {
            "schema": {"type": "string", "description": "Server-sent events; each `data` is JSON matching `x-event-data`."},
            "x-event-data": schema(generator)
        }}),
        Content::Text => json!({"text/plain": {"schema": {"type": "string"}}}),
    })
}

/// The OpenAPI 3.1 document.
pub fn spec() -> Value {
    let mut generator = SchemaSettings::draft2020_12()
        .with(|settings| settings.definitions_path = "/components/schemas".into())
        .into_generator();
    let error = json!({"application/json": {"schema": schema_of::<ErrorBody>(&mut generator)}});
    let mut paths = Map::new();
    for route in routes() {
        let mut responses = Map::new();
        let (status, answer) = route.ok;
        let mut success = json!({"description": reason(status)});
        if let Some(content) = content(&mut generator, answer) {
            success["content"] = content;
        }
        responses.insert(status.to_string(), success);
        // Every change may be refused as sent by another site (`same_site` in the router).
        let cross_site: &[u16] = if matches!(route.method, "get" | "head" | "options") {
            &[]
        } else {
            &[403]
        };
        for status in route.errors.iter().chain(cross_site) {
            responses.insert(
                status.to_string(),
                json!({"description": reason(*status), "content": error}),
            );
        }
        let paged = is_page(&generator, &responses[&status.to_string()]);
        let mut operation = json!({"summary": route.summary, "responses": responses});
        let mut parameters: Vec<Value> = route
            .path
            .split('{')
            .skip(1)
            .filter_map(|rest| rest.split_once('}').map(|(name, _)| name))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if paged {
            parameters.extend([
                json!({"name": "limit", "in": "query", "required": false, "description": "Items per page (1 to 1000, default 20).", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}),
                json!({"name": "offset", "in": "query", "required": false, "description": "Items to skip.", "schema": {"type": "integer", "minimum": 0}}),
            ]);
        }
        if !parameters.is_empty() {
            operation["parameters"] = Value::Array(parameters);
        }
        if let Some(content) = content(&mut generator, route.body) {
            operation["requestBody"] = json!({"required": true, "content": content});
        }
        let entry = paths
            .entry(route.path.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        entry[route.method] = operation;
    }
    let schemas: Map<String, Value> = generator.take_definitions(true).into_iter().collect();
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "inspectflow",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Control plane of the inspectflow visual anomaly inspection engine."
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}
        },
        "paths": paths,
    })
}

/// Whether a success answer is one page of a list (its JSON type has `pagination`), so that the
/// route takes `limit` and `offset`.
fn is_page(generator: &SchemaGenerator, response: &Value) -> bool {
    response
        .pointer("/content/application~1json/schema/$ref")
        .and_then(Value::as_str)
        .and_then(|reference| reference.rsplit('/').next())
        .and_then(|name| generator.definitions().get(name))
        .and_then(|definition| definition.pointer("/properties/pagination"))
        .is_some()
}

/// The JSON Schema of the success answer of `method` `path` (a documented path template, such
/// as `/api/projects/{project_id}`) with `status`, resolvable on its own: its references point
/// into a copy of the document's components. `None` when the route answers no JSON there.
pub fn answer_schema(document: &Value, method: &str, path: &str, status: u16) -> Option<Value> {
    let content = document
        .get("paths")?
        .get(path)?
        .get(method)?
        .get("responses")?
        .get(status.to_string())?
        .get("content")?;
    let schema = content.get("application/json")?.get("schema")?.clone();
    let mut root = json!({"allOf": [schema]});
    root["components"] = document.get("components")?.clone();
    Some(root)
}
