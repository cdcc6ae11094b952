//! The API's OpenAPI 3 description, served at `/api/openapi.json` and written by
//! `inspectflow gen-api --target-path FILE`. [`ROUTES`] lists every route the router serves; a
//! test requests each one from a running server, so the list and the router cannot drift apart.

use serde_json::{Map, Value, json};

/// One documented route.
pub struct RouteDoc {
    /// Lower-case HTTP method.
    pub method: &'static str,
    /// Path with `{parameters}`.
    pub path: &'static str,
    /// One line on what it does.
    pub summary: &'static str,
    /// Status codes it answers with (errors carry `{"detail": ...}`).
    pub responses: &'static [u16],
    /// The request body it takes.
    pub body: Body,
}

/// A route's request body.
pub enum Body {
    /// None.
    None,
    /// JSON, described by the named component schema.
    Json(&'static str),
    /// A `multipart/form-data` upload: media (file, label, mask).
    MediaUpload,
    /// A `multipart/form-data` upload of one image (`file`).
    ImageUpload,
}

/// Every route.
pub const ROUTES: &[RouteDoc] = &[
    RouteDoc {
        method: "get",
        path: "/health",
        summary: "Liveness: {\"status\": \"ok\"}.",
        responses: &[200, 401],
        body: Body::None,
    },
    RouteDoc {
        method: "get",
        path: "/api/openapi.json",
        summary: "This description.",
        responses: &[200, 401],
        body: Body::None,
    },
    RouteDoc {
        method: "get",
        path: "/api/projects",
        summary: "Projects in creation order, paginated with limit (1-1000, default 20) and offset.",
        responses: &[200, 401, 422],
        body: Body::None,
    },
    RouteDoc {
        method: "post",
        path: "/api/projects",
        summary: "Create a project: {\"name\": ...} (1-200 characters).",
        responses: &[201, 401, 413, 415, 422],
        body: Body::Json("ProjectBody"),
    },
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}",
        summary: "One project.",
        responses: &[200, 401, 404],
        body: Body::None,
    },
    RouteDoc {
        method: "patch",
        path: "/api/projects/{project_id}",
        summary: "Rename a project: {\"name\": ...}.",
        responses: &[200, 401, 404, 413, 415, 422],
        body: Body::Json("ProjectBody"),
    },
    RouteDoc {
        method: "delete",
        path: "/api/projects/{project_id}",
        summary: "Delete a project.",
        responses: &[204, 401, 404],
        body: Body::None,
    },
    RouteDoc {
        method: "get",
        path: "/api/trainable-models",
        summary: "The model families training supports, with description, recommended flag and parameters.",
        responses: &[200, 401],
        body: Body::None,
    },
    RouteDoc {
        method: "get",
        path: "/api/devices",
        summary: "OpenVINO inference devices and V4L2 cameras.",
        responses: &[200, 401, 503],
        body: Body::None,
    },
    RouteDoc {
        method: "post",
        path: "/api/projects/{project_id}/media",
        summary: "Upload an image: multipart fields file (PNG or JPEG), label (normal or anomalous, default normal), mask (optional PNG of the same size).",
        responses: &[201, 400, 401, 404, 413, 415, 422],
        body: Body::MediaUpload,
    },
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}/media",
        summary: "A project's media in upload order, paginated with limit and offset.",
        responses: &[200, 401, 404, 422],
        body: Body::None,
    },
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}/media/{media_id}",
        summary: "One media record.",
        responses: &[200, 401, 404],
        body: Body::None,
    },
    RouteDoc {
        method: "delete",
        path: "/api/projects/{project_id}/media/{media_id}",
        summary: "Delete an image, its thumbnail and its mask.",
        responses: &[204, 401, 404],
        body: Body::None,
    },
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}/media/{media_id}/full",
        summary: "Download the image as uploaded.",
        responses: &[200, 401, 404],
        body: Body::None,
    },
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}/media/{media_id}/thumbnail",
        summary: "A JPEG thumbnail, 256 pixels on the longer side.",
        responses: &[200, 401, 404],
        body: Body::None,
    },
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}/media/{media_id}/mask",
        summary: "The mask, when one was uploaded.",
        responses: &[200, 401, 404],
        body: Body::None,
    },
    RouteDoc {
        method: "post",
        path: "/api/projects/{project_id}/train",
        summary: "Queue a training job on the project's media (201 with the job; 422 with fewer than 3 normal images).",
        responses: &[201, 401, 404, 413, 415, 422],
        body: Body::Json("TrainPayload"),
    },
    RouteDoc {
        method: "get",
        path: "/api/jobs",
        summary: "Jobs, oldest first (optional project_id filter), paginated.",
        responses: &[200, 401, 422],
        body: Body::None,
    },
    RouteDoc {
        method: "get",
        path: "/api/jobs/{job_id}",
        summary: "A job: status, progress 0-100, stage, message, model_id.",
        responses: &[200, 401, 404],
        body: Body::None,
    },
    RouteDoc {
        method: "post",
        path: "/api/jobs/{job_id}:cancel",
        summary: "Cancel a pending or running job; answers once it stopped (409 if it already ended).",
        responses: &[200, 401, 404, 409],
        body: Body::None,
    },
    RouteDoc {
        method: "get",
        path: "/api/jobs/{job_id}/progress",
        summary: "Server-sent `progress` events with the job on every change, until it ends.",
        responses: &[200, 401, 404],
        body: Body::None,
    },
    RouteDoc {
        method: "get",
        path: "/api/jobs/{job_id}/logs",
        summary: "Server-sent `log` events: the job's log lines so far, then new ones, until it ends.",
        responses: &[200, 401, 404],
        body: Body::None,
    },
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}/models",
        summary: "The project's models, paginated.",
        responses: &[200, 401, 404, 422],
        body: Body::None,
    },
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}/models/{model_id}",
        summary: "A model: family, backbone, threshold, validation metrics, size.",
        responses: &[200, 401, 404],
        body: Body::None,
    },
    RouteDoc {
        method: "patch",
        path: "/api/projects/{project_id}/models/{model_id}",
        summary: "Rename a model or set its decision threshold (0-1).",
        responses: &[200, 401, 404, 413, 415, 422],
        body: Body::Json("ModelChange"),
    },
    RouteDoc {
        method: "delete",
        path: "/api/projects/{project_id}/models/{model_id}",
        summary: "Delete a model and its package (409 while a running pipeline uses it).",
        responses: &[204, 401, 404, 409],
        body: Body::None,
    },
    RouteDoc {
        method: "post",
        path: "/api/projects/{project_id}/models/{model_id}:predict",
        summary: "Score an uploaded image: score, label, threshold, anomaly map (PNG) and overlay (JPEG), base64.",
        responses: &[200, 401, 404, 413, 415, 422, 503],
        body: Body::ImageUpload,
    },
    RouteDoc {
        method: "post",
        path: "/api/projects/{project_id}/models/{model_id}:export",
        summary: "The model package (OpenVINO IR and manifest) as a zip.",
        responses: &[200, 401, 404],
        body: Body::None,
    },
    RouteDoc {
        method: "get",
        path: "/api/sources",
        summary: "Stored sources, paginated.",
        responses: &[200, 401, 422],
        body: Body::None,
    },
    RouteDoc {
        method: "post",
        path: "/api/sources",
        summary: "Create a source: type and the operator's parameters, validated and checked for reachability.",
        responses: &[201, 401, 413, 415, 422],
        body: Body::Json("EndpointBody"),
    },
    RouteDoc {
        method: "get",
        path: "/api/sources/{source_id}",
        summary: "A source (secrets redacted).",
        responses: &[200, 401, 404],
        body: Body::None,
    },
    RouteDoc {
        method: "put",
        path: "/api/sources/{source_id}",
        summary: "Replace a source (409 while a running pipeline uses it).",
        responses: &[200, 401, 404, 409, 413, 415, 422],
        body: Body::Json("EndpointBody"),
    },
    RouteDoc {
        method: "delete",
        path: "/api/sources/{source_id}",
        summary: "Delete a source (409 while a running pipeline uses it).",
        responses: &[204, 401, 404, 409],
        body: Body::None,
    },
    RouteDoc {
        method: "get",
        path: "/api/sinks",
        summary: "Stored sinks, paginated.",
        responses: &[200, 401, 422],
        body: Body::None,
    },
    RouteDoc {
        method: "post",
        path: "/api/sinks",
        summary: "Create a sink: type and the operator's parameters, validated.",
        responses: &[201, 401, 413, 415, 422],
        body: Body::Json("EndpointBody"),
    },
    RouteDoc {
        method: "get",
        path: "/api/sinks/{sink_id}",
        summary: "A sink (secrets redacted).",
        responses: &[200, 401, 404],
        body: Body::None,
    },
    RouteDoc {
        method: "put",
        path: "/api/sinks/{sink_id}",
        summary: "Replace a sink (409 while a running pipeline uses it).",
        responses: &[200, 401, 404, 409, 413, 415, 422],
        body: Body::Json("EndpointBody"),
    },
    RouteDoc {
        method: "delete",
        path: "/api/sinks/{sink_id}",
        summary: "Delete a sink (409 while a running pipeline uses it).",
        responses: &[204, 401, 404, 409],
        body: Body::None,
    },
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}/pipelines",
        summary: "The project's pipelines with their status (idle or running), paginated.",
        responses: &[200, 401, 404, 422],
        body: Body::None,
    },
    RouteDoc {
        method: "post",
        path: "/api/projects/{project_id}/pipelines",
        summary: "Create a pipeline from a graph (YAML text or JSON object) or from source_id, model_id and sink_ids; 422 lists each graph error with node and field.",
        responses: &[201, 401, 404, 413, 415, 422],
        body: Body::Json("PipelineBody"),
    },
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}/pipelines/{pipeline_id}",
        summary: "A pipeline.",
        responses: &[200, 401, 404],
        body: Body::None,
    },
    RouteDoc {
        method: "put",
        path: "/api/projects/{project_id}/pipelines/{pipeline_id}",
        summary: "Replace a pipeline's definition (409 while it runs).",
        responses: &[200, 401, 404, 409, 413, 415, 422],
        body: Body::Json("PipelineBody"),
    },
    RouteDoc {
        method: "delete",
        path: "/api/projects/{project_id}/pipelines/{pipeline_id}",
        summary: "Delete a pipeline (409 while it runs).",
        responses: &[204, 401, 404, 409],
        body: Body::None,
    },
    RouteDoc {
        method: "get",
        path: "/api/active-pipelines",
        summary: "Started pipelines with status and metrics.",
        responses: &[200, 401],
        body: Body::None,
    },
    RouteDoc {
        method: "post",
        path: "/api/active-pipelines",
        summary: "Start a pipeline (several may run at once, each at most once: 409 names the run when this one runs or is being started or stopped; 503 while the server shuts down).",
        responses: &[201, 401, 409, 413, 415, 422, 503],
        body: Body::Json("StartBody"),
    },
    RouteDoc {
        method: "get",
        path: "/api/active-pipelines/{pipeline_id}",
        summary: "A started pipeline's status and metrics: per-node FPS, latency percentiles, queue depths, drops, end-to-end latency.",
        responses: &[200, 401, 404],
        body: Body::None,
    },
    RouteDoc {
        method: "delete",
        path: "/api/active-pipelines/{pipeline_id}",
        summary: "Stop a pipeline (drain, then abort after 10 s) and answer its final metrics.",
        responses: &[200, 401, 404],
        body: Body::None,
    },
    RouteDoc {
        method: "get",
        path: "/metrics",
        summary: "Prometheus text: every started pipeline's metrics and jobs by status.",
        responses: &[200, 401],
        body: Body::None,
    },
    RouteDoc {
        method: "get",
        path: "/api/snapshots",
        summary: "Dataset snapshots (Parquet tables training froze its datasets into), paginated.",
        responses: &[200, 401, 422],
        body: Body::None,
    },
    RouteDoc {
        method: "get",
        path: "/api/snapshots/{snapshot_id}",
        summary: "A snapshot: image count, anomalous count, size, time.",
        responses: &[200, 401, 404],
        body: Body::None,
    },
    RouteDoc {
        method: "get",
        path: "/api/snapshots/{snapshot_id}/download",
        summary: "The snapshot's Parquet file (path, filename, label, mask, split, sha256 per image).",
        responses: &[200, 401, 404],
        body: Body::None,
    },
    RouteDoc {
        method: "post",
        path: "/api/captures",
        summary: "Save a running pipeline's current frame as a PNG image of its project, labelled normal (default) or anomalous; 409 if it is not running or has no frame yet.",
        responses: &[201, 401, 409, 413, 415, 422],
        body: Body::Json("CaptureBody"),
    },
    RouteDoc {
        method: "get",
        path: "/api/captures",
        summary: "Captured images (media with their origin), optionally of one project_id, paginated.",
        responses: &[200, 401, 404, 422],
        body: Body::None,
    },
];

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Malformed request",
        401 => "Missing or wrong bearer token",
        404 => "Not found",
        409 => "Conflicts with the current state (in use, running, ended)",
        413 => "Body too large",
        415 => "Body is not JSON",
        422 => "Invalid request field",
        503 => "A component is unavailable",
        _ => "Other",
    }
}

/// The OpenAPI 3.0 document.
pub fn spec() -> Value {
    let mut paths = Map::new();
    for route in ROUTES {
        let mut responses = Map::new();
        for status in route.responses {
            let mut response = json!({"description": reason(*status)});
            if *status >= 400 {
                response["content"] =
                    json!({"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}});
            }
            responses.insert(status.to_string(), response);
        }
        let mut operation = json!({
            "summary": route.summary,
            "responses": responses,
        });
        let parameters: Vec<Value> = route
            .path
            .split('{')
            .skip(1)
            .filter_map(|rest| rest.split_once('}').map(|(name, _)| name))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if !parameters.is_empty() {
            operation["parameters"] = Value::Array(parameters);
        }
        match route.body {
            Body::None => {}
            Body::Json(schema) => {
                operation["requestBody"] = json!({
                    "required": true,
                    "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}
                });
            }
            Body::MediaUpload => {
                operation["requestBody"] = json!({
                    "required": true,
                    "content": {"multipart/form-data": {"schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "label": {"type": "string", "enum": ["normal", "anomalous"]},
                            "mask": {"type": "string", "format": "binary"}
                        }
                    }}}
                });
            }
            Body::ImageUpload => {
                operation["requestBody"] = json!({
                    "required": true,
                    "content": {"multipart/form-data": {"schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {"file": {"type": "string", "format": "binary"}}
                    }}}
                });
            }
        }
        let entry = paths
            .entry(route.path.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        entry[route.method] = operation;
    }
    let mut document = json!({
        "openapi": "3.0.3",
        "info": {
            "title": "inspectflow",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Control plane of the inspectflow visual anomaly inspection engine."
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["detail"],
                    "properties": {"detail": {"type": "string"}}
                },
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}
        },
        "paths": paths,
    });
    for (name, schema) in body_schemas() {
        document["components"]["schemas"][name] = schema;
    }
    document
}

/// The JSON request bodies, from the types the handlers deserialise.
fn body_schemas() -> Vec<(&'static str, Value)> {
    fn schema<T: schemars::JsonSchema>() -> Value {
        let mut value = schemars::schema_for!(T).to_value();
        if let Some(object) = value.as_object_mut() {
            object.remove("$schema");
        }
        value
    }
    vec![
        ("ProjectBody", schema::<super::api::ProjectBody>()),
        ("TrainPayload", schema::<super::jobs::TrainPayload>()),
        ("ModelChange", schema::<super::models::ModelChange>()),
        ("EndpointBody", schema::<super::endpoints::EndpointBody>()),
        ("PipelineBody", schema::<super::pipelines::PipelineBody>()),
        ("StartBody", schema::<super::pipelines::StartBody>()),
        ("CaptureBody", schema::<super::captures::CaptureBody>()),
    ]
}
