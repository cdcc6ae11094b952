//! Captures: saving what a running pipeline's camera sees right now as a project image.
//!
//! `POST /api/captures {pipeline_id, label?, source_node?}` takes the most recent frame a source
//! of the running pipeline produced (the runtime keeps a reference to it, not a copy), converts it
//! to RGB, stores it as a lossless PNG media item of the pipeline's project with the label asked
//! for (default `normal`: the usual reason to capture is collecting good parts for training) and
//! answers the media record, whose `capture` field says which pipeline, source node, stream and
//! frame it came from. `GET /api/captures` lists the captured media, newest last.

use std::sync::Arc;

use super::openapi::{Content, RouteDoc, schema_of};
use serde::{Deserialize, Serialize};
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::http::{ApiError, ProjectPage, blocking, json_body, listing, now, ok, paginate};
use super::media::Media;
use super::pipelines::PipelineRecord;
use super::running::Latest;
use super::state::AppState;
use super::store::{MEDIA, PIPELINES};
use inspectflow_operators::Frame;
use inspectflow_operators::sink::message::rfc3339_utc;

/// Where a captured image came from.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CaptureOrigin {
    /// The pipeline it was captured from.
    pub pipeline_id: String,
    /// The pipeline's source node that produced the frame.
    pub source_node: String,
    /// The frame's stream (camera, file or folder).
    pub stream: String,
    /// The frame's position in its stream.
    pub sequence: u64,
    /// When the source captured the frame, RFC 3339 UTC.
    pub captured_at: String,
}

/// Body of `POST /api/captures`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CaptureBody {
    /// A running pipeline.
    pipeline_id: String,
    /// `normal` (default) or `anomalous`.
    #[serde(default)]
    label: Option<String>,
    /// Which source node to capture from, when the graph has several (default: the first
    /// source that has produced a frame).
    #[serde(default)]
    source_node: Option<String>,
}

listing!(
    /// The answer of `GET /api/captures`: captured images, media with their origin.
    CaptureList,
    captures,
    Media
);

/// The capture routes.
pub fn routes(state: Arc<AppState>) -> BoxedFilter<(Response,)> {
    let with_state = warp::any().map(move || Arc::clone(&state));
    let capture = warp::path!("api" / "captures")
        .and(warp::post())
        .and(json_body::<CaptureBody>())
        .and(with_state.clone())
        .and_then(capture);
    let list = warp::path!("api" / "captures")
        .and(warp::get())
        .and(super::http::query::<ProjectPage>())
        .and(with_state)
        .and_then(list);
    capture.or(list).unify().boxed()
}

/// The routes' documentation.
pub const DOCS: &[RouteDoc] = &[
    RouteDoc {
        method: "post",
        path: "/api/captures",
        summary: "Save a running pipeline's current frame as a PNG image of its project, labelled normal (default) or anomalous; 409 if it is not running or has no frame yet.",
        body: Content::Json(schema_of::<CaptureBody>),
        ok: (201, Content::Json(schema_of::<Media>)),
        errors: &[401, 409, 413, 415, 422],
    },
    RouteDoc {
        method: "get",
        path: "/api/captures",
        summary: "Captured images (media with their origin), optionally of one project_id, paginated.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<CaptureList>)),
        errors: &[401, 404, 422],
    },
];

async fn capture(body: CaptureBody, state: Arc<AppState>) -> Result<Response, Rejection> {
    let unprocessable = |detail: String| ApiError::reject(StatusCode::UNPROCESSABLE_ENTITY, detail);
    let label = match body.label.as_deref() {
        None | Some("normal") => "normal",
        Some("anomalous") => "anomalous",
        Some(other) => {
            return Err(unprocessable(format!(
                "label: '{other}' is neither normal nor anomalous"
            )));
        }
    };
    let key = body.pipeline_id.clone();
    let stored = blocking(&state, move |store| {
        store.get::<PipelineRecord>(PIPELINES, &key)
    })
    .await?;
    if stored.is_none() {
        return Err(unprocessable(format!(
            "pipeline_id: pipeline {} does not exist",
            body.pipeline_id
        )));
    }
    let conflict = |detail: String| ApiError::reject(StatusCode::CONFLICT, detail);
    let (project_id, node, frame) = match state
        .pipelines
        .latest_frame(&body.pipeline_id, body.source_node.as_deref())
    {
        Latest::Frame {
            project_id,
            node,
            frame,
        } => (project_id, node, frame),
        Latest::NotRunning => {
            return Err(conflict(format!(
                "pipeline {} is not running; start it to capture from it",
                body.pipeline_id
            )));
        }
        Latest::NotASource(sources) => {
            return Err(unprocessable(format!(
                "source_node: '{}' is not a source node of pipeline {} (its sources: {})",
                body.source_node.unwrap_or_default(),
                body.pipeline_id,
                sources.join(", ")
            )));
        }
        Latest::NoFrameYet => {
            return Err(conflict(format!(
                "pipeline {} has not produced a frame yet; try again once its source streams",
                body.pipeline_id
            )));
        }
    };
    let origin = CaptureOrigin {
        pipeline_id: body.pipeline_id,
        source_node: node,
        stream: frame.stream_id.to_string(),
        sequence: frame.sequence,
        captured_at: rfc3339_utc(frame.capture.unix_ms()),
    };
    let (png, decoded) = tokio::task::spawn_blocking(move || encode_png(&frame))
        .await
        .map_err(|e| ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let media = Media {
        id: uuid::Uuid::new_v4().to_string(),
        project_id,
        filename: format!(
            "capture-{}-{:08}.png",
            sanitise(&origin.stream),
            origin.sequence
        ),
        label: label.to_string(),
        width: decoded.width(),
        height: decoded.height(),
        format: "png".to_string(),
        size_bytes: png.len() as u64,
        has_mask: false,
        sha256: None,
        created_at: now(),
        capture: Some(origin),
    };
    let media = super::media::save(&state, media, png, decoded, None).await?;
    tracing::info!(media = %media.id, pipeline = ?media.capture.as_ref().map(|c| &c.pipeline_id), "captured a frame");
    Ok(warp::reply::with_status(warp::reply::json(&media), StatusCode::CREATED).into_response())
}

/// The frame as an RGB image and its PNG file.
fn encode_png(frame: &Frame) -> Result<(Vec<u8>, image::DynamicImage), String> {
    let (width, height) = (frame.layout.width, frame.layout.height);
    let rgb =
        image::RgbImage::from_raw(width, height, inspectflow_operators::yuv::packed_rgb(frame))
            .ok_or_else(|| format!("frame of {width}x{height} has too few pixels"))?;
    let image = image::DynamicImage::ImageRgb8(rgb);
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| format!("PNG encoding: {e}"))?;
    Ok((png, image))
}

/// Stream ids come from users (URLs, paths): keep file names to a safe alphabet.
fn sanitise(stream: &str) -> String {
    let name: String = stream
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if name.is_empty() {
        "stream".into()
    } else {
        name
    }
}

async fn list(query: ProjectPage, state: Arc<AppState>) -> Result<Response, Rejection> {
    if let Some(project_id) = &query.project_id {
        super::media::project_exists(&state, project_id).await?;
    }
    let mut media: Vec<Media> = blocking(&state, |store| store.all(MEDIA)).await?;
    media.retain(|m| {
        m.capture.is_some() && query.project_id.as_ref().is_none_or(|p| &m.project_id == p)
    });
    media.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
    let (items, pagination) = paginate(media, &query.page())?;
    Ok(ok(&CaptureList {
        captures: items,
        pagination,
    }))
}

#[cfg(test)]
mod tests {
    use super::sanitise;

    #[test]
    fn stream_names_become_safe_file_name_parts() {
        assert_eq!(sanitise("/data/line 1/cam.mp4"), "cam.mp4");
        assert_eq!(sanitise("rtsp://10.0.0.5:554/live?x=1"), "live_x_1");
        assert_eq!(sanitise("/"), "stream");
    }
}
