//! The web UI at `/`: the single-page app of `ui/` (React and TypeScript, built by Vite into
//! `ui/dist` by `scripts/setup.sh`), embedded in the binary so that nothing is fetched at run
//! time. `/` and `/index.html` answer the app's page, `/assets/...` its scripts and styles
//! (content-hashed names, cached for a year). A build without `ui/dist` answers a page that says
//! how to build it.

use super::openapi::{Content, RouteDoc};
use warp::filters::BoxedFilter;
use warp::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use warp::http::{Response as HttpResponse, StatusCode};
use warp::reply::Response;
use warp::{Filter, Reply};

/// The built UI. Debug builds read the folder at run time; release builds embed it.
#[derive(rust_embed::RustEmbed)]
#[folder = "ui/dist"]
#[allow_missing = true]
struct Assets;

/// What `/` answers when the UI was not built into this binary.
const NOT_BUILT: &str = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>inspectflow</title></head>\
<body><main><h1>inspectflow</h1><p>This build has no web UI: run <code>scripts/setup.sh</code> \
(it builds <code>ui/dist</code>), then build inspectflow again. The REST API is at \
<a href=\"/api/openapi.json\">/api/openapi.json</a>.</p></main></body></html>";

/// The documented route of the UI (its assets are not API).
pub const DOCS: &[RouteDoc] = &[RouteDoc {
    method: "get",
    path: "/",
    summary: "The web UI: projects, dataset, training, models, pipelines with live view, devices and sources.",
    body: Content::None,
    ok: (200, Content::Binary(&["text/html"])),
    errors: &[],
}];

/// The UI's routes (served without authentication: the page holds no data; every API call it
/// makes carries the token).
pub fn routes() -> BoxedFilter<(Response,)> {
    let index = warp::path::end()
        .or(warp::path!("index.html"))
        .unify()
        .and(warp::get())
        .map(page);
    let asset = warp::path("assets")
        .and(warp::path::tail())
        .and(warp::get())
        .map(|tail: warp::path::Tail| asset(&format!("assets/{}", tail.as_str())));
    index.or(asset).unify().boxed()
}

fn page() -> Response {
    match Assets::get("index.html") {
        Some(file) => HttpResponse::builder()
            .header(CONTENT_TYPE, "text/html; charset=utf-8")
            .header(CACHE_CONTROL, "no-cache")
            .body(file.data.into_owned().into())
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()),
        None => warp::reply::html(NOT_BUILT).into_response(),
    }
}

fn asset(path: &str) -> Response {
    let Some(file) = Assets::get(path) else {
        return warp::reply::with_status(
            warp::reply::json(&super::http::ErrorBody {
                detail: format!("no UI file {path}"),
                errors: None,
            }),
            StatusCode::NOT_FOUND,
        )
        .into_response();
    };
    HttpResponse::builder()
        .header(CONTENT_TYPE, file.metadata.mimetype())
        .header(CACHE_CONTROL, "public, max-age=31536000, immutable")
        .body(file.data.into_owned().into())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
