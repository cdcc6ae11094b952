//! Live preview: `sink.preview` nodes publish what a pipeline sees (the overlay or the raw frame)
//! to a process-wide [`hub`], where the server's MJPEG and WebRTC routes watch it.
//!
//! A preview never slows inspection and costs next to nothing while nobody watches:
//! - the node returns at once when its channel has no viewer;
//! - with viewers, it hands over the newest packet's frame (a reference, not a copy) and, when
//!   an upstream `encode.jpeg` already compressed it, that JPEG too; each viewer takes the newest
//!   frame when it is ready for one, so a slow viewer skips frames instead of queueing them;
//! - the edge into a preview node should be `drop_oldest` with capacity 1 (assembled pipelines
//!   do so), so the node itself never holds the pipeline back.
//!
//! Channels are keyed by pipeline name and view (`overlay` or `raw`). A channel closes when its
//! node ends (the pipeline stopped or finished), which ends every stream watching it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock, Weak};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::contract::{OpError, OperatorInstance, OperatorKind, PortType, Sink, SinkContext};
use crate::packet::{EncodedImage, Frame, Packet};
use crate::registry::OperatorDescriptor;
use crate::transform::encode::{EncodeParams, EncodeSource, JpegEncoder};

/// JPEG quality of preview frames that no upstream `encode.jpeg` compressed.
const PREVIEW_QUALITY: u8 = 80;

thread_local! {
    /// Each thread that compresses preview frames keeps its compressor and buffers.
    static ENCODER: RefCell<Option<JpegEncoder>> = const { RefCell::new(None) };
}

/// What a preview shows.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum View {
    /// The frame with the heatmap, outline and verdict drawn over it (the raw frame while the
    /// packet has no overlay yet).
    #[default]
    Overlay,
    /// The frame as the source produced it.
    Raw,
}

impl View {
    /// Lower-case name, as in routes and graph files.
    pub fn name(self) -> &'static str {
        match self {
            View::Overlay => "overlay",
            View::Raw => "raw",
        }
    }
}

/// One frame of a preview.
pub struct PreviewFrame {
    /// Position in the preview's sequence, from 1.
    pub sequence: u64,
    /// When the source captured it (Unix milliseconds).
    pub captured_at_ms: u64,
    /// The image (shared with the pipeline's packet, not copied).
    pub frame: Frame,
    /// The same image as JPEG: set from the start when an upstream `encode.jpeg` made one,
    /// otherwise by the first viewer that asks for it.
    jpeg: OnceLock<Arc<EncodedImage>>,
}

impl PreviewFrame {
    /// The image as JPEG: the upstream encoder's when there is one, otherwise compressed (quality
    /// 80) by the first viewer that asks, on its thread, and shared with the others.
    pub fn jpeg(&self) -> Result<&Arc<EncodedImage>, OpError> {
        if let Some(jpeg) = self.jpeg.get() {
            return Ok(jpeg);
        }
        let encoded = ENCODER.with(|slot| {
            let mut slot = slot.borrow_mut();
            let encoder = match slot.as_mut() {
                Some(encoder) => encoder,
                None => slot.insert(JpegEncoder::new(EncodeParams {
                    quality: PREVIEW_QUALITY,
                    source: EncodeSource::Frame,
                })?),
            };
            encoder.encode(&self.frame)
        })?;
        Ok(self.jpeg.get_or_init(|| Arc::new(encoded)))
    }
}

/// The newest frame of one pipeline's view, and who watches it.
pub struct PreviewChannel {
    newest: watch::Sender<Option<Arc<PreviewFrame>>>,
    viewers: AtomicUsize,
}

impl PreviewChannel {
    /// Viewers watching now.
    pub fn viewers(&self) -> usize {
        self.viewers.load(Ordering::SeqCst)
    }

    /// Starts watching: the node publishes while at least one [`Viewer`] lives.
    pub fn watch(self: &Arc<Self>) -> Viewer {
        self.viewers.fetch_add(1, Ordering::SeqCst);
        Viewer {
            channel: Arc::clone(self),
            newest: self.newest.subscribe(),
        }
    }
}

/// A watcher of a preview; dropping it stops counting it.
pub struct Viewer {
    channel: Arc<PreviewChannel>,
    newest: watch::Receiver<Option<Arc<PreviewFrame>>>,
}

impl Viewer {
    /// Waits for a frame newer than the last one returned; `None` once the preview has closed
    /// (its pipeline stopped).
    pub async fn next(&mut self) -> Option<Arc<PreviewFrame>> {
        loop {
            self.newest.changed().await.ok()?;
            if let Some(frame) = self.newest.borrow_and_update().clone() {
                return Some(frame);
            }
        }
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.channel.viewers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Every open preview channel of this process.
pub struct Hub {
    channels: Mutex<HashMap<(String, View), Weak<PreviewChannel>>>,
}

/// The process-wide hub.
pub fn hub() -> &'static Hub {
    static HUB: LazyLock<Hub> = LazyLock::new(|| Hub {
        channels: Mutex::new(HashMap::new()),
    });
    &HUB
}

impl Hub {
    /// Opens the channel of `pipeline`'s `view` (a node starting); a previous one is replaced.
    fn open(&self, pipeline: &str, view: View) -> Arc<PreviewChannel> {
        let channel = Arc::new(PreviewChannel {
            newest: watch::Sender::new(None),
            viewers: AtomicUsize::new(0),
        });
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels.retain(|_, channel| channel.strong_count() > 0);
        channels.insert((pipeline.to_string(), view), Arc::downgrade(&channel));
        channel
    }

    /// The open channel of `pipeline`'s `view`, if a preview node publishes it.
    pub fn find(&self, pipeline: &str, view: View) -> Option<Arc<PreviewChannel>> {
        let channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels.get(&(pipeline.to_string(), view))?.upgrade()
    }
}

/// Parameters of `sink.preview`.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PreviewParams {
    /// `overlay` (default) or `raw`.
    #[serde(default)]
    pub view: View,
}

/// The operator's name in graph files (the runtime keeps a source's edges to it open while a
/// pipeline is previewed only).
pub const OPERATOR: &str = "sink.preview";

/// The registry entry.
pub fn descriptor() -> OperatorDescriptor {
    OperatorDescriptor::builder::<PreviewParams>(
        OPERATOR,
        OperatorKind::Sink,
        "live preview of the overlay (or the raw frame) for the server's MJPEG and WebRTC routes; costs nothing while nobody watches, never holds the pipeline back (viewers take the newest frame), reuses an upstream `encode.jpeg`'s JPEG",
    )
    .input("in", PortType::Any)
    .build_with(|params, _context| {
        Ok(OperatorInstance::Sink(Box::new(PreviewSink {
            view: params.view,
            channel: None,
            sequence: 0,
        })))
    })
}

struct PreviewSink {
    view: View,
    channel: Option<Arc<PreviewChannel>>,
    sequence: u64,
}

impl Sink for PreviewSink {
    fn attach(&mut self, ctx: &SinkContext) {
        self.channel = Some(hub().open(&ctx.pipeline, self.view));
    }

    fn consume(&mut self, packet: Packet) -> Result<(), OpError> {
        let Some(channel) = &self.channel else {
            return Ok(());
        };
        if channel.viewers() == 0 {
            return Ok(());
        }
        self.sequence += 1;
        let (frame, jpeg) = match self.view {
            View::Raw => (packet.frame, None),
            View::Overlay => {
                let jpeg = packet.encoded.filter(|e| e.format == "jpeg");
                (packet.overlay.unwrap_or(packet.frame), jpeg)
            }
        };
        let captured_at_ms = (frame.capture.unix_nanos / 1_000_000) as u64;
        let compressed = OnceLock::new();
        if let Some(jpeg) = jpeg {
            let _ = compressed.set(jpeg);
        }
        channel.newest.send_replace(Some(Arc::new(PreviewFrame {
            sequence: self.sequence,
            captured_at_ms,
            frame,
            jpeg: compressed,
        })));
        Ok(())
    }

    fn finish(&mut self) -> Result<(), OpError> {
        // Dropping the channel closes it: every stream watching it ends.
        self.channel = None;
        Ok(())
    }
}
