//! WebRTC live view of running pipelines, through GStreamer's `webrtcbin`.
//!
//! - Signalling: `POST /api/webrtc/offer` takes a browser's SDP offer for a pipeline's view
//!   (`overlay` or `raw`) and answers with the SDP answer (its ICE candidates included, gathered
//!   before answering, so a client needs no candidate route from the server);
//!   `POST /api/webrtc/{connection_id}/ice` adds the browser's trickled candidates;
//!   `DELETE /api/webrtc/{connection_id}` closes one; `GET /api/webrtc/config` gives the ICE
//!   servers and the viewer limit.
//! - One H.264 encode per pipeline view, shared by all its viewers: a broadcast pipeline
//!   `appsrc ! videoconvert ! x264enc (zero latency) ! h264parse ! tee` fed from the pipeline's
//!   `sink.preview` node (newest frame only, no copy of the pixels), and per viewer
//!   `queue (leaky) ! rtph264pay (the payload type the browser offered) ! webrtcbin`.
//! - The broadcast exists while it has viewers; it and its connections close when the
//!   pipeline stops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_sdp as gst_sdp;
use gstreamer_video as gst_video;
use gstreamer_webrtc as gst_webrtc;
use serde::{Deserialize, Serialize};
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::WebRtcSettings;
use super::http::{ApiError, json_body, ok};
use super::openapi::{Content, RouteDoc, schema_of};
use super::state::AppState;
use inspectflow_operators::packet::{Frame, PixelFormat};
use inspectflow_operators::preview::{self, View, Viewer};

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
    #[schemars(length(max = 1024))]
    pub candidate: String,
    /// The media line it belongs to.
    #[serde(default, rename = "sdpMLineIndex")]
    pub sdp_m_line_index: u32,
}

/// The largest SDP offer taken.
const MAX_SDP_BYTES: usize = 65536;
/// How long an answer waits for the server's ICE candidates.
const GATHERING_WAIT: Duration = Duration::from_secs(3);

/// The live broadcasts and connections of this server.
pub struct WebRtc {
    settings: WebRtcSettings,
    broadcasts: Mutex<HashMap<(String, View), Arc<Broadcast>>>,
    connections: Mutex<HashMap<String, Connection>>,
}

/// One pipeline view encoded once for all its viewers.
struct Broadcast {
    pipeline: gst::Pipeline,
    tee: gst::Element,
}

/// One viewer's branch of a broadcast.
struct Connection {
    key: (String, View),
    broadcast: Arc<Broadcast>,
    tee_pad: gst::Pad,
    elements: Vec<gst::Element>,
    webrtcbin: gst::Element,
}

impl WebRtc {
    /// Starts with `settings` (GStreamer is initialised on first use).
    pub fn new(settings: WebRtcSettings) -> Self {
        Self {
            settings,
            broadcasts: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
        }
    }

    fn config(&self) -> WebRtcConfig {
        WebRtcConfig {
            ice_servers: self
                .settings
                .stun_server
                .iter()
                .map(|url| IceServer {
                    urls: vec![url.replacen("stun://", "stun:", 1)],
                })
                .collect(),
            max_viewers: self.settings.max_viewers,
        }
    }

    /// Viewers of `pipeline` now.
    fn viewers_of(&self, pipeline: &str) -> usize {
        self.connections
            .lock()
            .map(|c| c.values().filter(|c| c.key.0 == pipeline).count())
            .unwrap_or(0)
    }

    /// The broadcast of `key`, started (with its feeder) when there is none.
    fn broadcast(
        self: &Arc<Self>,
        key: &(String, View),
        viewer: Viewer,
    ) -> Result<Arc<Broadcast>, String> {
        let mut broadcasts = self
            .broadcasts
            .lock()
            .map_err(|_| "the broadcast table is unusable".to_string())?;
        if let Some(existing) = broadcasts.get(key) {
            return Ok(Arc::clone(existing));
        }
        gst::init().map_err(|e| format!("cannot start GStreamer: {e}"))?;
        let pipeline = gst::parse::launch(
            "appsrc name=src is-live=true format=time do-timestamp=true leaky-type=downstream max-buffers=2 \
             ! videoconvert ! video/x-raw,format=I420 \
             ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=30 bitrate=3000 \
             ! video/x-h264,profile=constrained-baseline,stream-format=byte-stream \
             ! h264parse config-interval=-1 ! tee name=tee allow-not-linked=true",
        )
        .map_err(|e| format!("cannot build the live view's encoder: {e}"))?
        .downcast::<gst::Pipeline>()
        .map_err(|_| "the live view's encoder is not a pipeline".to_string())?;
        let (Some(source), Some(tee)) = (pipeline.by_name("src"), pipeline.by_name("tee")) else {
            return Err("the live view's encoder lacks its elements".into());
        };
        let source = source
            .downcast::<gst_app::AppSrc>()
            .map_err(|_| "the live view's source is not an appsrc".to_string())?;
        pipeline
            .set_state(gst::State::Playing)
            .map_err(|e| format!("cannot start the live view's encoder: {e}"))?;
        let broadcast = Arc::new(Broadcast { pipeline, tee });
        broadcasts.insert(key.clone(), Arc::clone(&broadcast));
        let this = Arc::clone(self);
        let key = key.clone();
        tokio::spawn(async move {
            feed(viewer, source).await;
            // The pipeline stopped (or the broadcast was closed): close what is left.
            this.end_broadcast(&key);
        });
        Ok(broadcast)
    }

    /// Closes the broadcast of `key` and every connection watching it.
    fn end_broadcast(&self, key: &(String, View)) {
        let closing: Vec<Connection> = match self.connections.lock() {
            Ok(mut connections) => {
                let ids: Vec<String> = connections
                    .iter()
                    .filter(|(_, c)| &c.key == key)
                    .map(|(id, _)| id.clone())
                    .collect();
                ids.iter().filter_map(|id| connections.remove(id)).collect()
            }
            Err(_) => Vec::new(),
        };
        for connection in closing {
            connection.close();
        }
        let broadcast = self.broadcasts.lock().ok().and_then(|mut b| b.remove(key));
        if let Some(broadcast) = broadcast {
            let _ = broadcast.pipeline.set_state(gst::State::Null);
        }
    }

    /// Removes connection `id`; the broadcast ends with its last viewer.
    fn close(&self, id: &str) -> bool {
        let Some(connection) = self.connections.lock().ok().and_then(|mut c| c.remove(id)) else {
            return false;
        };
        let key = connection.key.clone();
        connection.close();
        let still_watched = self
            .connections
            .lock()
            .map(|c| c.values().any(|c| c.key == key))
            .unwrap_or(false);
        if !still_watched {
            self.end_broadcast(&key);
        }
        true
    }
}

impl Connection {
    fn close(self) {
        let _ = self.tee_pad.unlink(
            &self.elements[0]
                .static_pad("sink")
                .unwrap_or_else(|| self.tee_pad.clone()),
        );
        self.broadcast.tee.release_request_pad(&self.tee_pad);
        for element in self.elements.iter().rev() {
            let _ = element.set_state(gst::State::Null);
            let _ = self.broadcast.pipeline.remove(element);
        }
        let _ = self.webrtcbin.set_state(gst::State::Null);
    }
}

/// Frame bytes lent to GStreamer without a copy.
struct FrameBytes(Frame);

impl AsRef<[u8]> for FrameBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.pixels()
    }
}

/// Pushes the preview's frames into the encoder until the preview closes.
async fn feed(mut viewer: Viewer, source: gst_app::AppSrc) {
    let mut caps_of: Option<(u32, u32, PixelFormat)> = None;
    while let Some(frame) = viewer.next().await {
        let frame = frame.frame.clone();
        let layout = frame.layout;
        let format = match layout.format {
            PixelFormat::I420 => gst_video::VideoFormat::I420,
            PixelFormat::Rgb => gst_video::VideoFormat::Rgb,
            PixelFormat::Bgr => gst_video::VideoFormat::Bgr,
            PixelFormat::Gray => gst_video::VideoFormat::Gray8,
        };
        let shape = (layout.width, layout.height, layout.format);
        if caps_of != Some(shape) {
            let Ok(info) = gst_video::VideoInfo::builder(format, layout.width, layout.height)
                .fps(gst::Fraction::new(0, 1))
                .build()
            else {
                continue;
            };
            let Ok(caps) = info.to_caps() else {
                continue;
            };
            source.set_caps(Some(&caps));
            caps_of = Some(shape);
        }
        let (offsets, strides) =
            plane_layout(layout.width, layout.height, layout.stride, layout.format);
        let mut buffer = gst::Buffer::from_slice(FrameBytes(frame));
        if let Some(buffer) = buffer.get_mut() {
            let _ = gst_video::VideoMeta::add_full(
                buffer,
                gst_video::VideoFrameFlags::empty(),
                format,
                layout.width,
                layout.height,
                &offsets,
                &strides,
            );
        }
        if source.push_buffer(buffer).is_err() {
            break;
        }
    }
}

/// Plane offsets and strides of an inspectflow frame (see `PixelFormat::I420`).
fn plane_layout(
    width: u32,
    height: u32,
    stride: usize,
    format: PixelFormat,
) -> (Vec<usize>, Vec<i32>) {
    match format {
        PixelFormat::I420 => {
            let chroma_width = width.div_ceil(2) as usize;
            let chroma_height = height.div_ceil(2) as usize;
            let luma = stride * height as usize;
            (
                vec![0, luma, luma + chroma_width * chroma_height],
                vec![stride as i32, chroma_width as i32, chroma_width as i32],
            )
        }
        _ => (vec![0], vec![stride as i32]),
    }
}

/// The H.264 payload type of the offer's video that a constrained-baseline, packetization-mode 1
/// stream fits.
fn h264_payload_type(sdp: &gst_sdp::SDPMessage) -> Option<u32> {
    let media = sdp.medias().find(|m| m.media() == Some("video"))?;
    let mut candidates: Vec<(u32, bool)> = Vec::new();
    for attribute in media.attributes() {
        if attribute.key() != "rtpmap" {
            continue;
        }
        let value = attribute.value()?;
        let (pt, codec) = value.split_once(' ')?;
        if !codec.to_ascii_uppercase().starts_with("H264/") {
            continue;
        }
        let pt: u32 = pt.parse().ok()?;
        let fmtp = media
            .attributes()
            .filter(|a| a.key() == "fmtp")
            .filter_map(|a| a.value())
            .find(|v| v.split_once(' ').is_some_and(|(p, _)| p == pt.to_string()))
            .unwrap_or_default()
            .to_ascii_lowercase();
        if !fmtp.contains("packetization-mode=1") {
            continue;
        }
        candidates.push((pt, fmtp.contains("profile-level-id=42e0")));
    }
    candidates
        .iter()
        .find(|(_, baseline)| *baseline)
        .or(candidates.first())
        .map(|(pt, _)| *pt)
}

/// Answers `offer` on a new branch of `broadcast`; blocking (GStreamer promises, ICE gathering).
fn answer(
    webrtc: &WebRtc,
    broadcast: &Arc<Broadcast>,
    key: (String, View),
    offer: gst_sdp::SDPMessage,
    payload_type: u32,
) -> Result<OfferAnswer, String> {
    let make = |factory: &str| {
        gst::ElementFactory::make(factory)
            .build()
            .map_err(|e| format!("cannot create {factory}: {e} (is gstreamer1.0-nice installed?)"))
    };
    let queue = make("queue")?;
    queue.set_property_from_str("leaky", "downstream");
    queue.set_property("max-size-buffers", 30u32);
    let pay = make("rtph264pay")?;
    pay.set_property("pt", payload_type);
    pay.set_property("config-interval", -1i32);
    pay.set_property_from_str("aggregate-mode", "zero-latency");
    let webrtcbin = make("webrtcbin")?;
    webrtcbin.set_property_from_str("bundle-policy", "max-bundle");
    if let Some(stun) = &webrtc.settings.stun_server {
        webrtcbin.set_property("stun-server", stun);
    }
    if let Some(turn) = &webrtc.settings.turn_server {
        webrtcbin.set_property("turn-server", turn);
    }
    let pipeline = &broadcast.pipeline;
    pipeline
        .add_many([&queue, &pay, &webrtcbin])
        .map_err(|e| format!("cannot add a viewer: {e}"))?;
    let elements = vec![queue.clone(), pay.clone(), webrtcbin.clone()];
    let fail = |message: String| {
        for element in &elements {
            let _ = element.set_state(gst::State::Null);
            let _ = pipeline.remove(element);
        }
        message
    };
    gst::Element::link_many([&queue, &pay]).map_err(|e| fail(format!("linking: {e}")))?;
    let Some(sink) = webrtcbin.request_pad_simple("sink_%u") else {
        return Err(fail("webrtcbin gives no sink pad".into()));
    };
    let caps = gst::Caps::builder("application/x-rtp")
        .field("media", "video")
        .field("encoding-name", "H264")
        .field("payload", payload_type as i32)
        .field("clock-rate", 90000i32)
        .field("packetization-mode", "1")
        .field("profile-level-id", "42e01f")
        .build();
    if let Some(transceiver) =
        sink.property::<Option<gst_webrtc::WebRTCRTPTransceiver>>("transceiver")
    {
        transceiver.set_property(
            "direction",
            gst_webrtc::WebRTCRTPTransceiverDirection::Sendonly,
        );
        transceiver.set_property("codec-preferences", &caps);
    }
    let Some(pay_src) = pay.static_pad("src") else {
        return Err(fail("rtph264pay has no source pad".into()));
    };
    pay_src
        .link(&sink)
        .map_err(|e| fail(format!("linking the payloader to webrtcbin: {e}")))?;
    for element in &elements {
        element
            .sync_state_with_parent()
            .map_err(|e| fail(format!("starting a viewer: {e}")))?;
    }
    let offer = gst_webrtc::WebRTCSessionDescription::new(gst_webrtc::WebRTCSDPType::Offer, offer);
    let promise = gst::Promise::new();
    webrtcbin.emit_by_name::<()>("set-remote-description", &[&offer, &promise]);
    promise.wait();
    let promise = gst::Promise::new();
    webrtcbin.emit_by_name::<()>("create-answer", &[&None::<gst::Structure>, &promise]);
    promise.wait();
    let answer = promise
        .get_reply()
        .and_then(|reply| reply.value("answer").ok())
        .and_then(|value| value.get::<gst_webrtc::WebRTCSessionDescription>().ok())
        .ok_or_else(|| fail("webrtcbin made no answer to this offer".into()))?;
    webrtcbin.emit_by_name::<()>("set-local-description", &[&answer, &None::<gst::Promise>]);
    let deadline = Instant::now() + GATHERING_WAIT;
    while webrtcbin.property::<gst_webrtc::WebRTCICEGatheringState>("ice-gathering-state")
        != gst_webrtc::WebRTCICEGatheringState::Complete
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let sdp = webrtcbin
        .property::<Option<gst_webrtc::WebRTCSessionDescription>>("local-description")
        .and_then(|d| d.sdp().as_text().ok())
        .ok_or_else(|| fail("webrtcbin has no local description".into()))?;
    let Some(tee_pad) = broadcast.tee.request_pad_simple("src_%u") else {
        return Err(fail("the encoder's tee gives no pad".into()));
    };
    let Some(queue_sink) = queue.static_pad("sink") else {
        return Err(fail("queue has no sink pad".into()));
    };
    tee_pad
        .link(&queue_sink)
        .map_err(|e| fail(format!("linking the viewer to the encoder: {e}")))?;
    let connection_id = uuid::Uuid::new_v4().to_string();
    let connection = Connection {
        key,
        broadcast: Arc::clone(broadcast),
        tee_pad,
        elements: vec![queue, pay],
        webrtcbin,
    };
    webrtc
        .connections
        .lock()
        .map_err(|_| "the connection table is unusable".to_string())?
        .insert(connection_id.clone(), connection);
    Ok(OfferAnswer {
        connection_id,
        sdp_type: "answer".into(),
        sdp,
    })
}

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
    let sdp = gst_sdp::SDPMessage::parse_buffer(body.sdp.as_bytes())
        .map_err(|_| invalid("sdp: not an SDP offer".into()))?;
    let payload_type = h264_payload_type(&sdp).ok_or_else(|| {
        invalid("sdp: the offer has no H.264 video with packetization-mode 1".into())
    })?;
    if !state.pipelines.is_running(&body.pipeline_id) {
        return Err(ApiError::not_found("running pipeline", &body.pipeline_id));
    }
    let webrtc = Arc::clone(&state.webrtc);
    if webrtc.viewers_of(&body.pipeline_id) >= webrtc.settings.max_viewers {
        return Err(ApiError::reject(
            StatusCode::CONFLICT,
            format!(
                "pipeline {} has {} viewers, the limit (serve --webrtc-max-viewers)",
                body.pipeline_id, webrtc.settings.max_viewers
            ),
        ));
    }
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
    let answered =
        tokio::task::spawn_blocking(move || answer(&webrtc, &broadcast, key, sdp, payload_type))
            .await
            .map_err(|e| ApiError::reject(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
            .map_err(|e| ApiError::reject(StatusCode::SERVICE_UNAVAILABLE, e))?;
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
