//! What flows along the edges of a graph: a [`Packet`] holding a [`Frame`] and whatever the
//! operators so far attached to it (a model input [`Tensor`] today; predictions and encodings in
//! later operators).
//!
//! Every payload sits behind an `Arc` over a pooled buffer, so cloning a packet (fan-out to several
//! sinks, a queue keeping a reference) copies pointers, never pixels.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::pool::PooledBuffer;
pub use crate::tensor::{Tensor, TensorLayout};

/// Pixel layouts the runtime understands, all 8 bits per sample. RGB, BGR and gray are
/// interleaved; I420 is what video decoders produce (see [`PixelFormat::I420`]).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum PixelFormat {
    /// Red, green, blue.
    Rgb,
    /// Blue, green, red (the order most camera stacks and OpenCV use).
    Bgr,
    /// One luminance channel.
    Gray,
    /// Planar YUV 4:2:0 as video decoders produce it: a full-size Y plane (`stride` bytes a row),
    /// then U and V planes of half width and height (rounded up), rows packed. Video sources keep
    /// frames in this form so that full-size colour conversion never happens on the hot path;
    /// operators convert at the size they need (see [`crate::yuv`]). Video frames are limited
    /// range, BT.709 from 720 rows and BT.601 below (GStreamer's own default); the overlays
    /// `heatmap` draws hold JPEG's full-range BT.601 ([`YuvEncoding`]).
    I420,
}

/// How the Y, U and V values of an I420 image stand for colours (other formats ignore it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum YuvEncoding {
    /// Limited range (luma 16-235) with the BT.709 matrix for images 720 rows high or more and
    /// BT.601 below: what video decoders give for streams that do not say (GStreamer's default).
    #[default]
    Video,
    /// Full range (0-255) with the BT.601 matrix: the YCbCr inside JPEG files (JFIF). Heatmap
    /// overlays are drawn in it, so JPEG encoders compress their planes as they are.
    Jpeg,
}

impl PixelFormat {
    /// Bytes per pixel (of the first plane, for planar formats).
    pub const fn channels(self) -> usize {
        match self {
            PixelFormat::Rgb | PixelFormat::Bgr => 3,
            PixelFormat::Gray | PixelFormat::I420 => 1,
        }
    }

    /// Lower-case name, as written in graph files.
    pub const fn name(self) -> &'static str {
        match self {
            PixelFormat::Rgb => "rgb",
            PixelFormat::Bgr => "bgr",
            PixelFormat::Gray => "gray",
            PixelFormat::I420 => "i420",
        }
    }
}

/// When a frame was captured: a monotonic instant for latency arithmetic and the wall-clock time
/// for records that leave the process.
#[derive(Debug, Clone, Copy)]
pub struct CaptureTime {
    /// Monotonic clock reading at capture.
    pub instant: Instant,
    /// Nanoseconds since the Unix epoch at capture.
    pub unix_nanos: u128,
}

impl CaptureTime {
    /// The current time.
    pub fn now() -> Self {
        let unix_nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|since| since.as_nanos())
            .unwrap_or(0);
        Self {
            instant: Instant::now(),
            unix_nanos,
        }
    }

    /// Milliseconds since the Unix epoch at capture.
    pub fn unix_ms(&self) -> u64 {
        (self.unix_nanos / 1_000_000) as u64
    }
}

/// Size and memory layout of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLayout {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Bytes from the start of one row to the start of the next (at least `width * channels`).
    pub stride: usize,
    /// Channel layout.
    pub format: PixelFormat,
    /// What I420 values stand for.
    pub yuv: YuvEncoding,
}

impl ImageLayout {
    /// A tightly packed image (stride = width * channels), I420 as video gives it.
    pub const fn packed(width: u32, height: u32, format: PixelFormat) -> Self {
        Self {
            width,
            height,
            stride: width as usize * format.channels(),
            format,
            yuv: YuvEncoding::Video,
        }
    }

    /// The same layout with I420 values standing for colours as `yuv` says.
    pub const fn with_yuv(self, yuv: YuvEncoding) -> Self {
        Self { yuv, ..self }
    }

    /// Bytes the pixels occupy (all planes).
    pub const fn byte_len(&self) -> usize {
        let first_plane = self.stride * self.height as usize;
        match self.format {
            PixelFormat::I420 => {
                let (chroma_width, chroma_height) = self.chroma_size();
                first_plane + 2 * chroma_width * chroma_height
            }
            _ => first_plane,
        }
    }

    /// Width and height of the U and V planes of an I420 image.
    pub const fn chroma_size(&self) -> (usize, usize) {
        (
            (self.width as usize).div_ceil(2),
            (self.height as usize).div_ceil(2),
        )
    }
}

/// Memory holding a frame's pixels: a pooled buffer, or memory another library owns (a video
/// decoder's picture), kept alive as long as the frame and never written to while shared.
pub trait PixelMemory: Send + Sync + 'static {
    /// The bytes.
    fn bytes(&self) -> &[u8];
}

impl PixelMemory for PooledBuffer<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// One image with its provenance. Cheap to clone: the pixels are shared.
#[derive(Clone)]
pub struct Frame {
    /// Size and memory layout of `pixels`.
    pub layout: ImageLayout,
    /// Which stream (camera, file, folder) the frame came from.
    pub stream_id: Arc<str>,
    /// Position in its stream, counted by the source from 0 without gaps.
    pub sequence: u64,
    /// When the source captured it.
    pub capture: CaptureTime,
    pixels: Arc<dyn PixelMemory>,
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame")
            .field("layout", &self.layout)
            .field("stream_id", &self.stream_id)
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

impl Frame {
    /// Wraps filled memory (a pooled buffer, a decoder's picture) holding at least
    /// `layout.byte_len()` bytes laid out as `layout` says.
    pub fn new(
        pixels: impl PixelMemory,
        layout: ImageLayout,
        stream_id: Arc<str>,
        sequence: u64,
        capture: CaptureTime,
    ) -> Self {
        debug_assert!(layout.stride >= layout.width as usize * layout.format.channels());
        debug_assert!(pixels.bytes().len() >= layout.byte_len());
        Self {
            layout,
            stream_id,
            sequence,
            capture,
            pixels: Arc::new(pixels),
        }
    }

    /// The pixel bytes, row by row with `layout.stride` bytes per row.
    pub fn pixels(&self) -> &[u8] {
        self.pixels.bytes()
    }

    /// Address of the pixel buffer, for tests and diagnostics that follow a buffer through a graph.
    pub fn pixels_addr(&self) -> usize {
        self.pixels.bytes().as_ptr() as usize
    }
}

/// One named output of a model run on one frame.
pub struct ModelOutput {
    /// Tensor name in the model (`features_s8`, `anomaly_map`, `logits`, ...).
    pub name: String,
    /// Dimensions, batch dimension included (always 1 here: batches are split per frame).
    pub shape: Vec<usize>,
    /// Values in row-major order.
    pub values: PooledBuffer<f32>,
}

/// The anomaly verdict for one frame.
pub struct Prediction {
    /// The model's raw image score.
    pub raw_score: f32,
    /// Normalised image score in [0, 1].
    pub score: f32,
    /// Normalised score at which a frame counts as anomalous (0.5 unless a user moved it).
    pub threshold: f32,
    /// `score >= threshold`.
    pub anomalous: bool,
    /// Which model decided: the model package's id (its directory name).
    pub model: Arc<str>,
    /// Normalised anomaly map in [0, 1] (0.5 at the pixel threshold) at the
    /// model's output resolution, row-major; [`crate::map_upsample`] gives it at a frame's size.
    pub map: PooledBuffer<f32>,
    /// Map width (the model's).
    pub map_width: u32,
    /// Map height (the model's).
    pub map_height: u32,
}

impl Prediction {
    /// The verdict's label.
    pub fn label(&self) -> Label {
        if self.anomalous {
            Label::Anomalous
        } else {
            Label::Normal
        }
    }
}

/// A frame's label as a model judged it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub enum Label {
    /// Within what the model learned as normal.
    Normal,
    /// Scored at or above the threshold.
    Anomalous,
}

impl Label {
    /// The label as messages and the API write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "Normal",
            Self::Anomalous => "Anomalous",
        }
    }
}

/// The unit of data on an edge: a frame plus what operators attached to it.
#[derive(Clone)]
pub struct Packet {
    /// The image and its provenance.
    pub frame: Frame,
    /// The model input made from `frame`, once a `preprocess` operator has run (and until
    /// `infer.openvino` has used it, unless a node further down asks for it).
    pub tensor: Option<Tensor>,
    /// The model's outputs for this frame, once an inference operator has run.
    pub inference: Option<Arc<[ModelOutput]>>,
    /// The anomaly verdict, once an `anomaly` operator has run.
    pub prediction: Option<Arc<Prediction>>,
    /// The frame with the heatmap drawn over it, once a `heatmap` operator has run.
    pub overlay: Option<Frame>,
    /// An encoded image (the overlay when there is one, else the frame), once an encoder ran.
    pub encoded: Option<Arc<EncodedImage>>,
}

/// An encoded image in a pooled buffer.
pub struct EncodedImage {
    /// File format (`jpeg`).
    pub format: &'static str,
    /// The bytes: `buffer[..len]`.
    pub buffer: PooledBuffer<u8>,
    /// Bytes used.
    pub len: usize,
}

impl EncodedImage {
    /// The encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buffer[..self.len]
    }
}

impl Packet {
    /// A packet carrying only a frame.
    pub fn from_frame(frame: Frame) -> Self {
        Self {
            frame,
            tensor: None,
            inference: None,
            prediction: None,
            overlay: None,
            encoded: None,
        }
    }
}
