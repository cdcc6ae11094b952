//! The media side of the WebRTC live view ([`super::webrtc`] is its HTTP side): one H.264
//! encode per pipeline view, shared by all its viewers, and one `webrtcbin` branch per viewer.
//!
//! - A broadcast is `appsrc ! videoconvert ! x264enc (zero latency, a key frame a second) !
//!   h264parse ! tee`, fed from the pipeline's `sink.preview` node: the newest frame only, its
//!   pixels lent to GStreamer without a copy.
//! - A viewer is `queue (leaky) ! rtph264pay (the payload type the browser offered) !
//!   capssetter (the answered profile-level-id) ! webrtcbin` on the tee, fed before it is
//!   negotiated; its answer waits for the server's ICE candidates, so clients need no candidate
//!   route from the server.
//! - A broadcast exists while it has viewers; it and its connections close when the pipeline
//!   stops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_sdp as gst_sdp;
use gstreamer_video as gst_video;
use gstreamer_webrtc as gst_webrtc;

use super::WebRtcSettings;
use super::sdp::H264Format;
use super::webrtc::{AnswerError, IceServer, OfferAnswer, WebRtcConfig};
use inspectflow_operators::packet::{Frame, ImageLayout, PixelFormat};
use inspectflow_operators::preview::{View, Viewer};
use inspectflow_operators::video::video_info;

/// How long an answer waits for the server's ICE candidates.
const GATHERING_WAIT: Duration = Duration::from_secs(3);

/// The live broadcasts and connections of this server.
pub struct WebRtc {
    pub(crate) settings: WebRtcSettings,
    broadcasts: Mutex<HashMap<(String, View), Arc<Broadcast>>>,
    pub(crate) connections: Mutex<HashMap<String, Connection>>,
    /// Offers being answered, per pipeline: they count towards the viewer limit, so that
    /// offers arriving together cannot all pass it.
    answering: Arc<Mutex<HashMap<String, usize>>>,
}

/// A viewer's place under the limit while its offer is answered; given back when dropped.
pub(crate) struct ViewerSlot {
    answering: Arc<Mutex<HashMap<String, usize>>>,
    pipeline: String,
}

impl Drop for ViewerSlot {
    fn drop(&mut self) {
        if let Ok(mut answering) = self.answering.lock()
            && let Some(count) = answering.get_mut(&self.pipeline)
        {
            *count -= 1;
            if *count == 0 {
                answering.remove(&self.pipeline);
            }
        }
    }
}

/// One pipeline view encoded once for all its viewers.
pub(crate) struct Broadcast {
    pipeline: gst::Pipeline,
    tee: gst::Element,
}

/// One viewer's branch of a broadcast.
pub(crate) struct Connection {
    key: (String, View),
    broadcast: Arc<Broadcast>,
    tee_pad: gst::Pad,
    elements: Vec<gst::Element>,
    pub(crate) webrtcbin: gst::Element,
    /// webrtcbin's request pad for the video.
    webrtc_pad: gst::Pad,
}

impl WebRtc {
    /// Starts with `settings` (GStreamer is initialised on first use).
    pub fn new(settings: WebRtcSettings) -> Self {
        Self {
            settings,
            broadcasts: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
            answering: Arc::default(),
        }
    }

    pub(crate) fn config(&self) -> WebRtcConfig {
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

    /// A place for one more viewer of `pipeline`, if its viewers and the offers being answered
    /// for it are under the limit.
    pub(crate) fn reserve_viewer(&self, pipeline: &str) -> Option<ViewerSlot> {
        let mut answering = self.answering.lock().ok()?;
        let pending = answering.get(pipeline).copied().unwrap_or(0);
        if self.viewers_of(pipeline) + pending >= self.settings.max_viewers {
            return None;
        }
        *answering.entry(pipeline.to_string()).or_default() += 1;
        Some(ViewerSlot {
            answering: Arc::clone(&self.answering),
            pipeline: pipeline.to_string(),
        })
    }

    /// Viewers of `pipeline` now.
    pub(crate) fn viewers_of(&self, pipeline: &str) -> usize {
        self.connections
            .lock()
            .map(|c| c.values().filter(|c| c.key.0 == pipeline).count())
            .unwrap_or(0)
    }

    /// The broadcast of `key`, started (with its feeder) when there is none.
    pub(crate) fn broadcast(
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
        run_default_main_context();
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
        // Nobody polls this pipeline's bus: its messages are logged (errors and warnings) and
        // dropped as they are posted. Left queued, they would pile up and keep every element
        // that posted one alive, webrtcbins and their threads included.
        if let Some(bus) = pipeline.bus() {
            bus.set_sync_handler(|_, message| {
                match message.view() {
                    gst::MessageView::Error(error) => {
                        tracing::warn!("live view encoder: {}", error.error());
                    }
                    gst::MessageView::Warning(warning) => {
                        tracing::debug!("live view encoder: {}", warning.error());
                    }
                    _ => {}
                }
                gst::BusSyncReply::Drop
            });
        }
        pipeline
            .set_state(gst::State::Playing)
            .map_err(|e| format!("cannot start the live view's encoder: {e}"))?;
        let broadcast = Arc::new(Broadcast { pipeline, tee });
        broadcasts.insert(key.clone(), Arc::clone(&broadcast));
        let this = Arc::clone(self);
        let key = key.clone();
        let fed = Arc::downgrade(&broadcast);
        tokio::spawn(async move {
            feed(viewer, source).await;
            // The pipeline stopped (or the broadcast was closed): close what is left of this
            // broadcast, not a newer one of the same view started since.
            this.end_broadcast_if(&key, |current| std::ptr::eq(current, fed.as_ptr()));
        });
        Ok(broadcast)
    }

    /// Closes the broadcast of `key` and every connection watching it.
    fn end_broadcast(&self, key: &(String, View)) {
        self.end_broadcast_if(key, |_| true);
    }

    /// Closes the broadcast of `key` and its connections if `is_it` holds for it.
    fn end_broadcast_if(&self, key: &(String, View), is_it: impl Fn(&Broadcast) -> bool) {
        let broadcast =
            self.broadcasts
                .lock()
                .ok()
                .and_then(|mut broadcasts| match broadcasts.get(key) {
                    Some(current) if is_it(current) => broadcasts.remove(key),
                    _ => None,
                });
        let Some(broadcast) = broadcast else {
            return;
        };
        let closing: Vec<Connection> = match self.connections.lock() {
            Ok(mut connections) => {
                let ids: Vec<String> = connections
                    .iter()
                    .filter(|(_, c)| Arc::ptr_eq(&c.broadcast, &broadcast))
                    .map(|(id, _)| id.clone())
                    .collect();
                ids.iter().filter_map(|id| connections.remove(id)).collect()
            }
            Err(_) => Vec::new(),
        };
        for connection in closing {
            connection.close();
        }
        let _ = broadcast.pipeline.set_state(gst::State::Null);
    }

    /// Removes connection `id`; the broadcast ends with its last viewer.
    pub(crate) fn close(&self, id: &str) -> bool {
        let Some(connection) = self.connections.lock().ok().and_then(|mut c| c.remove(id)) else {
            return false;
        };
        let key = connection.key.clone();
        connection.close();
        self.end_if_unwatched(&key);
        release_freed_memory();
        true
    }

    /// Ends the broadcast of `key` when no connection watches it (its last viewer left, or the
    /// offer that started it failed), so that nothing encodes for nobody.
    pub(crate) fn end_if_unwatched(&self, key: &(String, View)) {
        // Under the lock that offers take their place with: an offer being answered for the
        // pipeline keeps its broadcast, and none can take a place while it ends.
        let Ok(answering) = self.answering.lock() else {
            return;
        };
        let watched = answering.contains_key(&key.0)
            || self
                .connections
                .lock()
                .map(|c| c.values().any(|c| &c.key == key))
                .unwrap_or(false);
        if !watched {
            self.end_broadcast(key);
        }
    }
}

impl Connection {
    /// Detaches the viewer's branch from the encoder, stops it and takes it out of the
    /// broadcast. webrtcbin is stopped while its sink pad is still its own and linked: that
    /// sets the pad flushing, which wakes a buffer the branch's thread may be pushing into it
    /// (webrtcbin holds buffers back until a transceiver is ready). Released first, the pad
    /// was never woken, and stopping the branch then waited for ever on that thread.
    pub(crate) fn close(self) {
        if let Some(queue_sink) = self.elements.first().and_then(|q| q.static_pad("sink")) {
            let _ = self.tee_pad.unlink(&queue_sink);
        }
        self.broadcast.tee.release_request_pad(&self.tee_pad);
        let _ = self.webrtcbin.set_state(gst::State::Null);
        if let Some(branch_src) = self.elements.last().and_then(|p| p.static_pad("src")) {
            let _ = branch_src.unlink(&self.webrtc_pad);
        }
        self.webrtcbin.release_request_pad(&self.webrtc_pad);
        let _ = self.broadcast.pipeline.remove(&self.webrtcbin);
        for element in self.elements.iter().rev() {
            let _ = element.set_state(gst::State::Null);
            let _ = self.broadcast.pipeline.remove(element);
        }
    }
}

/// Hands what a closed viewer freed back to the system. glibc keeps freed memory in the arena of
/// the thread that freed it, and a viewer's allocations are spread over the arenas of
/// webrtcbin's short-lived threads, so without a trim a server that once had a crowd of viewers
/// would keep their high-water mark resident.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers; it only walks glibc's own arenas under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs GLib's default main context on a thread of its own, once per process. webrtcbin's ICE
/// agent resolves the browser's mDNS candidates (`….local`) asynchronously and is told the
/// result through that context; with nobody running it, every lookup stays pending forever and
/// holds the agent, its thread and its sockets after the connection has closed.
fn run_default_main_context() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let main_loop = gst::glib::MainLoop::new(None, false);
        let started = std::thread::Builder::new()
            .name("glib-main".into())
            .spawn(move || main_loop.run());
        if let Err(error) = started {
            tracing::warn!("cannot start GLib's main loop for WebRTC: {error}");
        }
    });
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
    let mut caps_of: Option<(ImageLayout, gst_video::VideoFormat)> = None;
    while let Some(frame) = viewer.next().await {
        let frame = frame.frame.clone();
        let layout = frame.layout;
        let format = match caps_of {
            Some((announced, format)) if announced == layout => format,
            _ => {
                let Ok(info) = video_info(&layout, gst::Fraction::new(0, 1)) else {
                    continue;
                };
                let Ok(caps) = info.to_caps() else {
                    continue;
                };
                source.set_caps(Some(&caps));
                caps_of = Some((layout, info.format()));
                info.format()
            }
        };
        let (offsets, strides, planes) =
            plane_layout(layout.width, layout.height, layout.stride, layout.format);
        let mut buffer = gst::Buffer::from_slice(FrameBytes(frame));
        if let Some(buffer) = buffer.get_mut() {
            let _ = gst_video::VideoMeta::add_full(
                buffer,
                gst_video::VideoFrameFlags::empty(),
                format,
                layout.width,
                layout.height,
                &offsets[..planes],
                &strides[..planes],
            );
        }
        if source.push_buffer(buffer).is_err() {
            break;
        }
    }
}

/// Plane offsets and strides of an inspectflow frame (see `PixelFormat::I420`), and how many
/// planes it has; fixed arrays, so nothing is allocated per frame.
fn plane_layout(
    width: u32,
    height: u32,
    stride: usize,
    format: PixelFormat,
) -> ([usize; 3], [i32; 3], usize) {
    match format {
        PixelFormat::I420 => {
            let chroma_width = width.div_ceil(2) as usize;
            let chroma_height = height.div_ceil(2) as usize;
            let luma = stride * height as usize;
            (
                [0, luma, luma + chroma_width * chroma_height],
                [stride as i32, chroma_width as i32, chroma_width as i32],
                3,
            )
        }
        _ => ([0; 3], [stride as i32, 0, 0], 1),
    }
}

/// Sets up libnice's agent inside `webrtcbin` for a server: no UPnP port mapping (its discovery
/// thread outlives the connection, one thread and about 1 MB per viewer that ever connected, and
/// a server on a LAN or behind STUN/TURN needs none), and keep-alives that expect an answer, so a
/// viewer that vanishes without a goodbye (a closed tab, a lost network) fails its connection and
/// is closed.
fn configure_ice_agent(webrtcbin: &gst::Element) {
    let Some(ice) = webrtcbin.property::<Option<gst::glib::Object>>("ice-agent") else {
        return;
    };
    if ice.find_property("agent").is_none() {
        return;
    }
    let Some(agent) = ice.property::<Option<gst::glib::Object>>("agent") else {
        return;
    };
    for (name, value) in [("upnp", false)] {
        if agent.find_property(name).is_some() {
            agent.set_property(name, value);
        }
    }
}

/// Answers `offer` on a new branch of `broadcast`; blocking (GStreamer promises, ICE gathering).
pub(crate) fn answer(
    webrtc: &Arc<WebRtc>,
    broadcast: &Arc<Broadcast>,
    key: (String, View),
    offer: gst_sdp::SDPMessage,
    format: &H264Format,
) -> Result<OfferAnswer, AnswerError> {
    let make = |factory: &str| {
        gst::ElementFactory::make(factory)
            .build()
            .map_err(|e| format!("cannot create {factory}: {e} (is gstreamer1.0-nice installed?)"))
    };
    let queue = make("queue")?;
    queue.set_property_from_str("leaky", "downstream");
    queue.set_property("max-size-buffers", 30u32);
    let pay = make("rtph264pay")?;
    pay.set_property("pt", format.payload_type);
    pay.set_property("config-interval", -1i32);
    pay.set_property_from_str("aggregate-mode", "zero-latency");
    let caps = gst::Caps::builder("application/x-rtp")
        .field("media", "video")
        .field("encoding-name", "H264")
        .field("payload", format.payload_type as i32)
        .field("clock-rate", 90000i32)
        .field("packetization-mode", "1")
        .field("profile-level-id", format.profile_level_id.as_str())
        .build();
    // The payloader names the profile and level of the stream's SPS (`42c01f` from x264's
    // constrained baseline at 320x240, a higher level for larger frames); webrtcbin only takes
    // the `profile-level-id` it answered with. Decoders play any level of the profile, so the
    // caps are made to carry the answered one.
    let answered = make("capssetter")?;
    answered.set_property(
        "caps",
        gst::Caps::builder("application/x-rtp")
            .field("profile-level-id", format.profile_level_id.as_str())
            .build(),
    );
    let webrtcbin = make("webrtcbin")?;
    webrtcbin.set_property_from_str("bundle-policy", "max-bundle");
    if let Some(stun) = &webrtc.settings.stun_server {
        webrtcbin.set_property("stun-server", stun);
    }
    if let Some(turn) = &webrtc.settings.turn_server {
        webrtcbin.set_property("turn-server", turn);
    }
    configure_ice_agent(&webrtcbin);
    let pipeline = &broadcast.pipeline;
    pipeline
        .add_many([&queue, &pay, &answered, &webrtcbin])
        .map_err(|e| format!("cannot add a viewer: {e}"))?;
    let elements = vec![
        queue.clone(),
        pay.clone(),
        answered.clone(),
        webrtcbin.clone(),
    ];
    let Some(tee_pad) = broadcast.tee.request_pad_simple("src_%u") else {
        for element in &elements {
            let _ = pipeline.remove(element);
        }
        return Err(AnswerError::Unavailable(
            "the encoder's tee gives no pad".into(),
        ));
    };
    let fail = |message: String| {
        if let Some(queue_sink) = queue.static_pad("sink") {
            let _ = tee_pad.unlink(&queue_sink);
        }
        broadcast.tee.release_request_pad(&tee_pad);
        // Downstream first, webrtcbin before the branch that feeds it (see `Connection::close`).
        for element in elements.iter().rev() {
            let _ = element.set_state(gst::State::Null);
            let _ = pipeline.remove(element);
        }
        message
    };
    gst::Element::link_many([&queue, &pay, &answered])
        .map_err(|e| fail(format!("linking: {e}")))?;
    let Some(sink) = webrtcbin.request_pad_simple("sink_%u") else {
        return Err(fail("webrtcbin gives no sink pad".into()).into());
    };
    if let Some(transceiver) =
        sink.property::<Option<gst_webrtc::WebRTCRTPTransceiver>>("transceiver")
    {
        transceiver.set_property(
            "direction",
            gst_webrtc::WebRTCRTPTransceiverDirection::Sendonly,
        );
        transceiver.set_property("codec-preferences", &caps);
    }
    let Some(branch_src) = answered.static_pad("src") else {
        return Err(fail("capssetter has no source pad".into()).into());
    };
    branch_src
        .link(&sink)
        .map_err(|e| fail(format!("linking the payloader to webrtcbin: {e}")))?;
    for element in &elements {
        element
            .sync_state_with_parent()
            .map_err(|e| fail(format!("starting a viewer: {e}")))?;
    }
    // The stream flows into the branch before negotiation, as in a sender that makes the offer:
    // the payloader's caps are settled before the peer connects (linked only after the answer,
    // a fast ICE connection raced the first caps and the payloader refused them).
    let Some(queue_sink) = queue.static_pad("sink") else {
        return Err(fail("queue has no sink pad".into()).into());
    };
    tee_pad
        .link(&queue_sink)
        .map_err(|e| fail(format!("linking the viewer to the encoder: {e}")))?;
    let offer = gst_webrtc::WebRTCSessionDescription::new(gst_webrtc::WebRTCSDPType::Offer, offer);
    // webrtcbin replies with an `error` field when it refuses an offer (a malformed one: no
    // ICE credentials, no fingerprint) or cannot answer it.
    let error_of = |promise: &gst::Promise| {
        promise
            .get_reply()
            .and_then(|reply| reply.get::<gst::glib::Error>("error").ok())
            .map(|error| error.message().to_string())
    };
    let promise = gst::Promise::new();
    webrtcbin.emit_by_name::<()>("set-remote-description", &[&offer, &promise]);
    promise.wait();
    if let Some(error) = error_of(&promise) {
        return Err(AnswerError::Offer(fail(format!(
            "sdp: the offer was refused: {error}"
        ))));
    }
    let promise = gst::Promise::new();
    webrtcbin.emit_by_name::<()>("create-answer", &[&None::<gst::Structure>, &promise]);
    promise.wait();
    let answer = promise
        .get_reply()
        .and_then(|reply| reply.value("answer").ok())
        .and_then(|value| value.get::<gst_webrtc::WebRTCSessionDescription>().ok())
        .ok_or_else(|| {
            let why = error_of(&promise).unwrap_or_else(|| "no reason given".into());
            AnswerError::Unavailable(fail(format!("webrtcbin made no answer: {why}")))
        })?;
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
    let connection_id = uuid::Uuid::new_v4().to_string();
    // A viewer that vanishes (a closed tab, a lost network) is closed when its peer connection
    // fails or closes, not only when it says goodbye through the API.
    let table = Arc::downgrade(webrtc);
    let id = connection_id.clone();
    webrtcbin.connect_notify(Some("connection-state"), move |bin, _| {
        let state = bin.property::<gst_webrtc::WebRTCPeerConnectionState>("connection-state");
        if matches!(
            state,
            gst_webrtc::WebRTCPeerConnectionState::Failed
                | gst_webrtc::WebRTCPeerConnectionState::Closed
        ) && let Some(webrtc) = table.upgrade()
        {
            let id = id.clone();
            // Not on webrtcbin's own thread: closing changes its state.
            std::thread::spawn(move || webrtc.close(&id));
        }
    });
    let connection = Connection {
        key,
        broadcast: Arc::clone(broadcast),
        tee_pad,
        elements: vec![queue, pay, answered],
        webrtcbin,
        webrtc_pad: sink,
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
