//! Live view of running pipelines: `GET /api/active-pipelines/{id}/stream` is an MJPEG stream
//! (`multipart/x-mixed-replace`, one JPEG part per frame) of a pipeline's `sink.preview` node,
//! the overlay or the raw frame, at most `fps` frames per second per client. It works in every
//! browser (an `<img>` element) and through proxies that WebRTC does not get through.
//!
//! A client that falls behind skips frames (it always gets the newest), so no viewer slows the
//! pipeline or queues memory. The stream ends when the pipeline stops.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::http::ApiError;
use super::openapi::{Content, RouteDoc};
use super::state::AppState;
use inspectflow_operators::packet::EncodedImage;
use inspectflow_operators::preview::{self, PreviewFrame, View};

/// Most frames per second a client may ask for.
const MAX_FPS: u32 = 60;

/// The multipart boundary of MJPEG streams.
const BOUNDARY: &str = "inspectflow-frame";

/// The query of the MJPEG route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StreamQuery {
    /// `overlay` (default) or `raw`.
    #[serde(default)]
    view: View,
    /// Most frames per second sent to this client (1 to 60, default 15).
    #[serde(default = "default_fps")]
    fps: u32,
}

fn default_fps() -> u32 {
    15
}

/// The preview routes.
pub fn routes(state: Arc<AppState>) -> BoxedFilter<(Response,)> {
    let with_state = warp::any().map(move || Arc::clone(&state));
    let stream = warp::path!("api" / "active-pipelines" / String / "stream")
        .and(warp::get())
        .and(super::http::query::<StreamQuery>())
        .and(with_state)
        .and_then(mjpeg);
    let page = warp::path!("live")
        .and(warp::get())
        .map(|| warp::reply::html(LIVE_PAGE).into_response());
    stream.or(page).unify().boxed()
}

/// The live view page: WebRTC, falling back to MJPEG.
const LIVE_PAGE: &str = include_str!("live.html");

/// The routes' documentation.
pub const DOCS: &[RouteDoc] = &[
    RouteDoc {
        method: "get",
        path: "/live",
        summary: "A live view page: ?pipeline=ID[&view=overlay|raw][&mode=auto|mjpeg]. Connects by WebRTC and falls back to the MJPEG stream when WebRTC is refused or shows no frame.",
        body: Content::None,
        ok: (200, Content::Binary(&["text/html"])),
        errors: &[401],
    },
    RouteDoc {
        method: "get",
        path: "/api/active-pipelines/{pipeline_id}/stream",
        summary: "Live MJPEG stream (multipart/x-mixed-replace) of a running pipeline's preview: ?view=overlay|raw (default overlay), ?fps=1-60 (default 15). 409 when the pipeline has no sink.preview node for the view (assembled pipelines have both).",
        body: Content::None,
        ok: (
            200,
            Content::Binary(&["multipart/x-mixed-replace; boundary=inspectflow-frame"]),
        ),
        errors: &[401, 404, 409, 422],
    },
];

/// The JPEG of a preview frame, lent to the response body without a copy.
struct Jpeg(Arc<EncodedImage>);

impl AsRef<[u8]> for Jpeg {
    fn as_ref(&self) -> &[u8] {
        self.0.bytes()
    }
}

/// One multipart part: its headers (with the capture time and sequence, for measuring the
/// delay), the JPEG (shared, not copied) and the line end.
fn part(frame: &PreviewFrame) -> Result<[Bytes; 3], String> {
    let jpeg = Arc::clone(frame.jpeg().map_err(|e| e.to_string())?);
    let header = format!(
        "--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\nX-Sequence: {}\r\nX-Captured-At-Ms: {}\r\n\r\n",
        jpeg.len, frame.sequence, frame.captured_at_ms
    );
    Ok([
        Bytes::from(header),
        Bytes::from_owner(Jpeg(jpeg)),
        Bytes::from_static(b"\r\n"),
    ])
}

async fn mjpeg(
    id: String,
    query: StreamQuery,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    if !(1..=MAX_FPS).contains(&query.fps) {
        return Err(ApiError::reject(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("fps: must be 1 to {MAX_FPS}"),
        ));
    }
    if !state.pipelines.is_running(&id) {
        return Err(ApiError::not_found("running pipeline", &id));
    }
    let channel = preview::hub().find(&id, query.view).ok_or_else(|| {
        ApiError::reject(
            StatusCode::CONFLICT,
            format!(
                "pipeline {id} has no sink.preview node with view {}; add one to its graph",
                query.view.name()
            ),
        )
    })?;
    let mut viewer = channel.watch();
    let interval = Duration::from_secs_f64(1.0 / f64::from(query.fps));
    let (parts, receiver) = tokio::sync::mpsc::channel::<Bytes>(3);
    tokio::spawn(async move {
        let mut next_slot = tokio::time::Instant::now();
        while let Some(frame) = viewer.next().await {
            let encoded = tokio::task::spawn_blocking(move || part(&frame)).await;
            let Ok(Ok(chunks)) = encoded else {
                tracing::warn!("preview frame not sent: {encoded:?}");
                continue;
            };
            for chunk in chunks {
                if parts.send(chunk).await.is_err() {
                    return; // the client left
                }
            }
            next_slot = (next_slot + interval).max(tokio::time::Instant::now());
            tokio::time::sleep_until(next_slot).await;
        }
    });
    let body = futures::stream::unfold(receiver, |mut receiver| async move {
        let part = receiver.recv().await?;
        Some((Ok::<Bytes, std::io::Error>(part), receiver))
    });
    let mut response = warp::reply::stream(body).into_response();
    let headers = response.headers_mut();
    if let Ok(value) = format!("multipart/x-mixed-replace; boundary={BOUNDARY}").parse() {
        headers.insert(warp::http::header::CONTENT_TYPE, value);
    }
    headers.insert(
        warp::http::header::CACHE_CONTROL,
        warp::http::HeaderValue::from_static("no-cache, no-store"),
    );
    Ok(response)
}
