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
    /// Whether it takes a JSON body (`{"name": ...}` for projects).
    pub json_body: bool,
    /// Whether it takes a `multipart/form-data` upload (media).
    pub multipart_body: bool,
}

/// Every route.
pub const ROUTES: &[RouteDoc] = &[
    RouteDoc {
        method: "get",
        path: "/health",
        summary: "Liveness: {\"status\": \"ok\"}.",
        responses: &[200, 401],
        json_body: false,
        multipart_body: false,
    },
    RouteDoc {
        method: "get",
        path: "/api/openapi.json",
        summary: "This description.",
        responses: &[200, 401],
        json_body: false,
        multipart_body: false,
    },
    RouteDoc {
        method: "get",
        path: "/api/projects",
        summary: "Projects in creation order, paginated with limit (1-1000, default 20) and offset.",
        responses: &[200, 401, 422],
        json_body: false,
        multipart_body: false,
    },
    RouteDoc {
        method: "post",
        path: "/api/projects",
        summary: "Create a project: {\"name\": ...} (1-200 characters).",
        responses: &[201, 401, 413, 415, 422],
        json_body: true,
        multipart_body: false,
    },
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}",
        summary: "One project.",
        responses: &[200, 401, 404],
        json_body: false,
        multipart_body: false,
    },
    RouteDoc {
        method: "patch",
        path: "/api/projects/{project_id}",
        summary: "Rename a project: {\"name\": ...}.",
        responses: &[200, 401, 404, 413, 415, 422],
        json_body: true,
        multipart_body: false,
    },
    RouteDoc {
        method: "delete",
        path: "/api/projects/{project_id}",
        summary: "Delete a project.",
        responses: &[204, 401, 404],
        json_body: false,
        multipart_body: false,
    },
    RouteDoc {
        method: "get",
        path: "/api/trainable-models",
        summary: "The model families training supports, with description, recommended flag and parameters.",
        responses: &[200, 401],
        json_body: false,
        multipart_body: false,
    },
    RouteDoc {
        method: "get",
        path: "/api/devices",
        summary: "OpenVINO inference devices and V4L2 cameras.",
        responses: &[200, 401, 503],
        json_body: false,
        multipart_body: false,
    },
    RouteDoc {
        method: "post",
        path: "/api/projects/{project_id}/media",
        summary: "Upload an image: multipart fields file (PNG or JPEG), label (normal or anomalous, default normal), mask (optional PNG of the same size).",
        responses: &[201, 400, 401, 404, 413, 415, 422],
        json_body: false,
        multipart_body: true,
    },
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}/media",
        summary: "A project's media in upload order, paginated with limit and offset.",
        responses: &[200, 401, 404, 422],
        json_body: false,
        multipart_body: false,
    },
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}/media/{media_id}",
        summary: "One media record.",
        responses: &[200, 401, 404],
        json_body: false,
        multipart_body: false,
    },
    RouteDoc {
        method: "delete",
        path: "/api/projects/{project_id}/media/{media_id}",
        summary: "Delete an image, its thumbnail and its mask.",
        responses: &[204, 401, 404],
        json_body: false,
        multipart_body: false,
    },
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}/media/{media_id}/full",
        summary: "Download the image as uploaded.",
        responses: &[200, 401, 404],
        json_body: false,
        multipart_body: false,
    },
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}/media/{media_id}/thumbnail",
        summary: "A JPEG thumbnail, 256 pixels on the longer side.",
        responses: &[200, 401, 404],
        json_body: false,
        multipart_body: false,
    },
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}/media/{media_id}/mask",
        summary: "The mask, when one was uploaded.",
        responses: &[200, 401, 404],
        json_body: false,
        multipart_body: false,
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
            .split('/')
            .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if !parameters.is_empty() {
            operation["parameters"] = Value::Array(parameters);
        }
        if route.json_body {
            operation["requestBody"] = json!({
                "required": true,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ProjectBody"}}}
            });
        }
        if route.multipart_body {
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
        let entry = paths
            .entry(route.path.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        entry[route.method] = operation;
    }
    json!({
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
                "ProjectBody": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": false,
                    "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 200}}
                }
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}
        },
        "paths": paths,
    })
}
