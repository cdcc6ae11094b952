//! WebRTC live view of running pipelines, through GStreamer's `webrtcbin`.
//!
//! - Signalling: `POST /api/webrtc/offer` takes a browser's SDP offer for a pipeline's view
//!   (`overlay` or `raw`) and answers with the SDP answer (its ICE candidates included, gathered
//!   before answering, so a client needs no candidate route from the server);
//!   `POST /api/webrtc/{connection_id}/ice` adds the browser's trickled candidates;
//!   `DELETE /api/webrtc/{connection_id}` closes one; `GET /api/webrtc/config` gives the ICE
//!   servers and the viewer limit.
//! - The media side (one H.264 encode per pipeline view, a `webrtcbin` per viewer) is in
//!   [`super::broadcast`].

use std::sync::Arc;

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_sdp as gst_sdp;
use serde::{Deserialize, Serialize};
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::broadcast::answer;
use super::http::{ApiError, json_body, ok};
use super::openapi::{Content, RouteDoc, schema_of};
use super::sdp::{MAX_MEDIA_SECTIONS, check_offer, h264_format};
use super::state::AppState;
use inspectflow_operators::preview::{self, View};

/// One ICE server, as `RTCPeerConnection`'s configuration takes it.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct IceServer {
    /// Its URLs.
    pub urls: Vec<String>,
}

/// The answer of `GET /api/webrtc/config`.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WebRtcConfig {
    /// For the browser's `RTCPeerConnection` (`iceServers`).
    pub ice_servers: Vec<IceServer>,
    /// Most viewers per pipeline at once.
    pub max_viewers: usize,
}

/// Body of `POST /api/webrtc/offer`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OfferBody {
    /// The running pipeline to watch.
    pub pipeline_id: String,
    /// `overlay` (default) or `raw`.
    #[serde(default)]
    pub view: View,
    /// The browser's SDP offer (receive-only video, H.264).
    #[schemars(length(max = 65536))]
    pub sdp: String,
}

/// The answer of `POST /api/webrtc/offer`.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct OfferAnswer {
    /// Names the connection in the ICE and close routes.
    pub connection_id: String,
    /// Always `answer`.
    #[serde(rename = "type")]
    pub sdp_type: String,
    /// The SDP answer, with the server's ICE candidates.
    pub sdp: String,
}

/// Body of `POST /api/webrtc/{connection_id}/ice`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IceBody {
    /// The candidate line (`candidate:...`); empty: the end of the browser's candidates.
    #[schemars(length(max = MAX_CANDIDATE_BYTES))]
    pub candidate: String,
    /// The media line it belongs to.
    #[serde(default, rename = "sdpMLineIndex")]
    #[schemars(range(max = MAX_MEDIA_SECTIONS - 1))]
    pub sdp_m_line_index: u32,
}

/// Why an offer got no answer.
pub(crate) enum AnswerError {
    /// The offer itself was refused in negotiation (the client's to fix).
    Offer(String),
    /// The server could not set up the viewer.
    Unavailable(String),
}

impl From<String> for AnswerError {
    fn from(message: String) -> Self {
        Self::Unavailable(message)
    }
}

/// The longest ICE candidate line taken.
const MAX_CANDIDATE_BYTES: usize = 1024;

/// The longest an offer waits for webrtcbin's answer (ICE gathering included).
const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// The largest SDP offer taken.
const MAX_SDP_BYTES: usize = 65536;

/// The WebRTC routes.
pub fn routes(state: Arc<AppState>) -> BoxedFilter<(Response,)> {
    let with_state = warp::any().map(move || Arc::clone(&state));
    let config = warp::path!("api" / "webrtc" / "config")
        .and(warp::get())
        .and(with_state.clone())
        .map(|state: Arc<AppState>| ok(&state.webrtc.config()));
    let offer = warp::path!("api" / "webrtc" / "offer")
        .and(warp::post())
        .and(json_body::<OfferBody>())
        .and(with_state.clone())
        .and_then(offer);
    let ice = warp::path!("api" / "webrtc" / String / "ice")
        .and(warp::post())
        .and(json_body::<IceBody>())
        .and(with_state.clone())
        .and_then(ice);
    let close = warp::path!("api" / "webrtc" / String)
        .and(warp::delete())
        .and(with_state)
        .and_then(close);
    config
        .or(offer)
        .unify()
        .or(ice)
        .unify()
        .or(close)
        .unify()
        .boxed()
}

/// The routes' documentation.
pub const DOCS: &[RouteDoc] = &[
    RouteDoc {
        method: "get",
        path: "/api/webrtc/config",
        summary: "ICE servers for RTCPeerConnection and the viewer limit per pipeline.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<WebRtcConfig>)),
        errors: &[401],
    },
    RouteDoc {
        method: "post",
        path: "/api/webrtc/offer",
        summary: "Watch a running pipeline: a browser's SDP offer (receive-only H.264 video) for its overlay or raw view, answered with the SDP answer (server candidates included). 409 when the pipeline has no preview of that view or its viewers are at the limit.",
        body: Content::Json(schema_of::<OfferBody>),
        ok: (200, Content::Json(schema_of::<OfferAnswer>)),
        errors: &[401, 404, 409, 413, 415, 422, 503],
    },
    RouteDoc {
        method: "post",
        path: "/api/webrtc/{connection_id}/ice",
        summary: "Add an ICE candidate the browser trickled.",
        body: Content::Json(schema_of::<IceBody>),
        ok: (204, Content::None),
        errors: &[401, 404, 413, 415, 422],
    },
    RouteDoc {
        method: "delete",
        path: "/api/webrtc/{connection_id}",
        summary: "Close a WebRTC connection.",
        body: Content::None,
        ok: (204, Content::None),
        errors: &[401, 404],
    },
];

async fn offer(body: OfferBody, state: Arc<AppState>) -> Result<Response, Rejection> {
    let invalid = |message: String| ApiError::reject(StatusCode::UNPROCESSABLE_ENTITY, message);
    gst::init().map_err(|e| {
        ApiError::reject(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("GStreamer is unavailable: {e}"),
        )
    })?;
    if body.sdp.len() > MAX_SDP_BYTES {
        return Err(invalid(format!("sdp: longer than {MAX_SDP_BYTES} bytes")));
    }
    if body.sdp.trim().is_empty() {
        return Err(invalid("sdp: empty".into()));
    }
    let sdp = gst_sdp::SDPMessage::parse_buffer(body.sdp.as_bytes())
        .map_err(|_| invalid("sdp: not an SDP offer".into()))?;
    let format = h264_format(&sdp).ok_or_else(|| {
        invalid("sdp: the offer has no H.264 video with packetization-mode 1".into())
    })?;
    check_offer(&sdp).map_err(invalid)?;
    if !state.pipelines.is_running(&body.pipeline_id) {
        return Err(ApiError::not_found("running pipeline", &body.pipeline_id));
    }
    let webrtc = Arc::clone(&state.webrtc);
    let Some(slot) = webrtc.reserve_viewer(&body.pipeline_id) else {
        return Err(ApiError::reject(
            StatusCode::CONFLICT,
            format!(
                "pipeline {} has {} viewers, the limit (serve --webrtc-max-viewers)",
                body.pipeline_id, webrtc.settings.max_viewers
            ),
        ));
    };
    let channel = preview::hub()
        .find(&body.pipeline_id, body.view)
        .ok_or_else(|| {
            ApiError::reject(
                StatusCode::CONFLICT,
                format!(
                    "pipeline {} has no sink.preview node with view {}",
                    body.pipeline_id,
                    body.view.name()
                ),
            )
        })?;
    let key = (body.pipeline_id.clone(), body.view);
    let broadcast = webrtc
        .broadcast(&key, channel.watch())
        .map_err(|e| ApiError::reject(StatusCode::SERVICE_UNAVAILABLE, e))?;
    let answering = tokio::task::spawn_blocking(move || {
        let answered = answer(&webrtc, &broadcast, key.clone(), sdp, &format);
        if answered.is_err() {
            webrtc.end_if_unwatched(&key);
        }
        answered
    });
    // webrtcbin may stall on an offer it should refuse (see `check_offer`); the client gets
    // an answer either way, and its viewer slot back.
    let answered = tokio::time::timeout(ANSWER_WAIT, answering).await;
    drop(slot);
    let answered = answered
        .map_err(|_| {
            tracing::error!(
                "webrtcbin gave no answer within {} s to an offer for pipeline {}",
                ANSWER_WAIT.as_secs(),
                body.pipeline_id
            );
            ApiError::reject(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "sdp: no answer within {} s; the offer may be malformed",
                    ANSWER_WAIT.as_secs()
                ),
            )
        })?
        .map_err(|e| ApiError::reject(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
        .map_err(|e| match e {
            AnswerError::Offer(message) => invalid(message),
            AnswerError::Unavailable(message) => {
                ApiError::reject(StatusCode::SERVICE_UNAVAILABLE, message)
            }
        })?;
    Ok(ok(&answered))
}

async fn ice(id: String, body: IceBody, state: Arc<AppState>) -> Result<Response, Rejection> {
    let webrtcbin = state
        .webrtc
        .connections
        .lock()
        .ok()
        .and_then(|c| c.get(&id).map(|c| c.webrtcbin.clone()))
        .ok_or_else(|| ApiError::not_found("WebRTC connection", &id))?;
    if body.candidate.len() > MAX_CANDIDATE_BYTES {
        return Err(ApiError::reject(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("candidate: longer than {MAX_CANDIDATE_BYTES} bytes"),
        ));
    }
    if body.candidate.chars().any(char::is_control) {
        return Err(ApiError::reject(
            StatusCode::UNPROCESSABLE_ENTITY,
            "candidate: holds a control character (a candidate is one line of text)",
        ));
    }
    if body.sdp_m_line_index >= MAX_MEDIA_SECTIONS {
        return Err(ApiError::reject(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "sdpMLineIndex: {} is past the answer's media lines",
                body.sdp_m_line_index
            ),
        ));
    }
    if !body.candidate.is_empty() {
        webrtcbin.emit_by_name::<()>(
            "add-ice-candidate",
            &[&body.sdp_m_line_index, &body.candidate],
        );
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn close(id: String, state: Arc<AppState>) -> Result<Response, Rejection> {
    let webrtc = Arc::clone(&state.webrtc);
    let closed = tokio::task::spawn_blocking(move || webrtc.close(&id))
        .await
        .unwrap_or(false);
    if closed {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(ApiError::reject(
            StatusCode::NOT_FOUND,
            "WebRTC connection not found",
        ))
    }
}
