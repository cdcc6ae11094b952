//! Video through GStreamer 1.22: decoding files and camera streams into the runtime's frames, and
//! encoding frames to H.264.
//!
//! GStreamer does the media work (demuxing, decoding, RTSP, V4L2); the runtime owns the frames
//! afterwards. Every source here builds a small GStreamer pipeline that ends in an `appsink`
//! ([`AppSinkReader`]): a decoded picture whose planes lie packed becomes a frame's memory as it
//! is, any other is copied once, plane by plane, into a pooled buffer. A live camera's reader
//! counts the pictures it let go because the graph fell behind.
//! Frames stay in the decoder's I420 by default: a full-size RGB conversion at 1080p costs more
//! than decoding (see BENCHMARKS.md), so operators convert at the size they need.
//!
//! - [`file`] has `source.video_file`;
//! - [`camera`] has `source.ip_camera` and `source.usb_camera`, which reconnect with backoff;
//! - [`devices`] lists the cameras with their names and modes;
//! - [`h264`] has `encode.h264` and `sink.video_file`.

pub mod camera;
pub mod devices;
pub mod file;
pub mod h264;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use gstreamer_video::prelude::*;

use crate::contract::OpError;
use crate::packet::{ImageLayout, PixelFormat, PixelMemory, YuvEncoding};
use crate::pool::{BufferPool, PooledBuffer};

/// Initialises GStreamer once per process; the error says what is missing.
pub fn init() -> Result<(), OpError> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| gst::init().map_err(|e| e.to_string()))
        .clone()
        .map_err(|e| OpError::Failed(format!("cannot initialise GStreamer: {e}")))
}

/// GStreamer's description of raw frames laid out as `layout` at `fps` (0/1: variable), with
/// the colorimetry their values stand for ([`crate::packet::YuvEncoding`]): what encoders fed
/// from inspectflow frames announce.
pub fn video_info(
    layout: &ImageLayout,
    fps: gst::Fraction,
) -> Result<gst_video::VideoInfo, gst::glib::BoolError> {
    let format = match layout.format {
        PixelFormat::I420 => gst_video::VideoFormat::I420,
        PixelFormat::Rgb => gst_video::VideoFormat::Rgb,
        PixelFormat::Bgr => gst_video::VideoFormat::Bgr,
        PixelFormat::Gray => gst_video::VideoFormat::Gray8,
    };
    let builder = gst_video::VideoInfo::builder(format, layout.width, layout.height).fps(fps);
    let jpeg_ycbcr = gst_video::VideoColorimetry::new(
        gst_video::VideoColorRange::Range0_255,
        gst_video::VideoColorMatrix::Bt601,
        gst_video::VideoTransferFunction::Bt709,
        gst_video::VideoColorPrimaries::Bt709,
    );
    let full_range_ycbcr = layout.format == PixelFormat::I420 && layout.yuv == YuvEncoding::Jpeg;
    builder
        .colorimetry_if(&jpeg_ycbcr, full_range_ycbcr)
        .build()
}

/// Makes a GStreamer element, naming the Debian package to install when it is missing.
pub(crate) fn make(factory: &str) -> Result<gst::Element, OpError> {
    init()?;
    gst::ElementFactory::make(factory).build().map_err(|_| {
        OpError::Failed(format!(
            "GStreamer element '{factory}' is not installed (scripts/setup.sh installs the \
             gstreamer1.0-plugins-* packages that provide it)"
        ))
    })
}

/// Pixel formats a video source can deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VideoFormat {
    /// Planar YUV 4:2:0 as decoders produce it: no colour conversion at full size (fastest).
    #[default]
    I420,
    /// Interleaved RGB, converted by GStreamer at full size.
    Rgb,
    /// Interleaved BGR, converted by GStreamer at full size.
    Bgr,
    /// Luminance only.
    Gray,
}

impl VideoFormat {
    fn gst_name(self) -> &'static str {
        match self {
            VideoFormat::I420 => "I420",
            VideoFormat::Rgb => "RGB",
            VideoFormat::Bgr => "BGR",
            VideoFormat::Gray => "GRAY8",
        }
    }

    fn pixel_format(self) -> PixelFormat {
        match self {
            VideoFormat::I420 => PixelFormat::I420,
            VideoFormat::Rgb => PixelFormat::Rgb,
            VideoFormat::Bgr => PixelFormat::Bgr,
            VideoFormat::Gray => PixelFormat::Gray,
        }
    }
}

/// How an FFmpeg decoder spends its threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecoderThreads {
    /// FFmpeg's default, several pictures at once, one per thread: the most pictures a second,
    /// for a file read as fast as it decodes with nothing heavy after it (a transcode, a
    /// recorder). Each thread keeps its own pictures, and each picture comes a frame later per
    /// extra thread.
    Frames,
    /// Each picture split over the threads (one thread for a stream of single-slice pictures):
    /// for paced streams, which leave the decoder idle between pictures, and for files whose
    /// frames go to a model, which needs the cores more than the decoder does.
    Slices,
}

impl DecoderThreads {
    /// The threading for a stream read at `pace` whose frames go (`to_model`) or do not go to
    /// a node that takes tensors. `benches/e2e_vs_python.sh` with slices instead of frames:
    /// throughput the same within the host's swing, the 1080p job's peak RSS 9-36 MB lower; a
    /// 1080p file decoded into `sink.null` alone, 250 FPS instead of 395, which is why a graph
    /// without a model keeps frame threads (BENCHMARKS.md, issue 08).
    pub(crate) fn for_stream(pace: Pace, to_model: bool) -> Self {
        if pace == Pace::AsFastAsConsumed && !to_model {
            Self::Frames
        } else {
            Self::Slices
        }
    }
}

/// How an [`AppSinkReader`] treats a slow consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pace {
    /// Decode as fast as the graph takes frames; a full appsink holds the decoder back, so no
    /// frame is ever lost (files under `block`).
    AsFastAsConsumed,
    /// Follow the stream's clock, never losing a frame before the graph sees it (files played
    /// in real time): the source thread takes every frame as it comes (its edges never block it),
    /// and when that thread falls behind, playback waits instead of the appsink dropping frames
    /// nobody would count. Frames the graph cannot keep up with are dropped, and counted, on its
    /// `drop_oldest` edges.
    Clock,
    /// Follow a live camera, which does not wait: when the source thread falls behind, the
    /// appsink keeps only the newest frames, and the reader counts the others
    /// ([`AppSinkReader::take_dropped`]).
    Realtime,
}

/// Pictures that reached a live reader's appsink, numbered in order of arrival, so that the
/// reader can tell how many the appsink let go before the one it pulled.
#[derive(Default)]
struct Arrivals {
    /// How many pictures arrived so far.
    count: u64,
    /// The last few arrivals: the picture's buffer (its address) and its number. The appsink
    /// holds at most [`LIVE_APPSINK_BUFFERS`] pictures, so the one pulled next is among them.
    recent: VecDeque<(usize, u64)>,
}

impl Arrivals {
    /// Arrivals remembered: the appsink's queue, the picture it is taking in, and some slack.
    const REMEMBERED: usize = LIVE_APPSINK_BUFFERS + 6;

    fn arrived(&mut self, buffer: &gst::BufferRef) {
        if self.recent.len() == Self::REMEMBERED {
            self.recent.pop_front();
        }
        self.recent
            .push_back((buffer.as_ptr() as usize, self.count));
        self.count += 1;
    }

    /// The arrival number of `buffer`: the newest arrival at its address (an older one there
    /// is a picture let go whose buffer the decoder has used again).
    fn number_of(&self, buffer: &gst::BufferRef) -> Option<u64> {
        let address = buffer.as_ptr() as usize;
        self.recent
            .iter()
            .rev()
            .find(|(at, _)| *at == address)
            .map(|(_, number)| *number)
    }
}

/// Pictures a live reader's appsink queues before it lets the oldest go.
const LIVE_APPSINK_BUFFERS: usize = 2;

/// Most decoder pictures one reader lets the graph hold at once; beyond that, pictures are
/// copied, so that however many frames the graph keeps (deep queues, a sink that stores them),
/// the decoder never waits for its own buffers to come back.
const MOST_DECODER_PICTURES_HELD: usize = 8;

/// Counts a decoder picture held by the graph until it is dropped.
pub(crate) struct HeldPicture(Arc<AtomicUsize>);

impl Drop for HeldPicture {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A decoded picture as a frame's memory.
pub(crate) enum Picture {
    /// The decoder's own buffer, mapped for reading and held until the last packet using it is
    /// gone: its planes already lie as a packed frame's do, so nothing is copied.
    Decoded {
        /// The buffer, mapped.
        mapped: gst::MappedBuffer<gst::buffer::Readable>,
        /// Counts it as held until it is dropped.
        _held: HeldPicture,
    },
    /// A copy, plane by plane without row padding (the decoder's rows are padded, or its planes
    /// are apart).
    Copied(PooledBuffer<u8>),
}

impl PixelMemory for Picture {
    fn bytes(&self) -> &[u8] {
        match self {
            Picture::Decoded { mapped, .. } => mapped.as_slice(),
            Picture::Copied(buffer) => buffer,
        }
    }
}

/// What one pull from the appsink produced.
pub(crate) enum Pulled {
    /// A decoded picture.
    Frame(Picture, ImageLayout),
    /// Nothing within the timeout.
    Waiting,
    /// The stream ended.
    EndOfStream,
}

/// A GStreamer pipeline whose last element is an appsink delivering raw video in one format.
/// Dropping it stops the pipeline.
pub(crate) struct AppSinkReader {
    pipeline: gst::Pipeline,
    appsink: gst_app::AppSink,
    format: VideoFormat,
    pool: BufferPool<u8>,
    /// Caps of the last sample and the video info parsed from them (parsed again only when the
    /// caps change).
    info: Option<(gst::Caps, gst_video::VideoInfo)>,
    /// Decoder pictures the graph holds now.
    pictures_held: Arc<AtomicUsize>,
    /// Whether the pipeline plays yet: it is only made ready (opened, first picture decoded)
    /// when the node is built, and plays from the first pull, so a clock-paced file's clock does
    /// not run while the rest of the graph is built (its first frames then came as a burst that
    /// waited in the queues: 7 frames in 8 ms and up to 91 ms capture-to-result at 360p).
    playing: bool,
    /// A live reader's count of the pictures reaching its appsink (none for other paces, whose
    /// appsink never lets a picture go).
    arrivals: Option<Arc<Mutex<Arrivals>>>,
    /// The arrival number the next pulled picture has when none was let go.
    next_arrival: u64,
    /// Pictures let go since [`AppSinkReader::take_dropped`] last asked.
    dropped: u64,
}

impl AppSinkReader {
    /// Builds `upstream` (which must produce raw or decodable video on its last element's pads,
    /// possibly dynamic ones) followed by `videoconvert ! appsink`, without starting it.
    /// `link_upstream` links the last upstream element to the given converter.
    pub(crate) fn new(
        upstream: &[gst::Element],
        link_upstream: impl FnOnce(&gst::Element, &gst::Element) -> Result<(), OpError>,
        format: VideoFormat,
        pace: Pace,
        threads: DecoderThreads,
    ) -> Result<Self, OpError> {
        init()?;
        let pipeline = gst::Pipeline::new();
        let convert = make("videoconvert")?;
        if format != VideoFormat::I420 {
            // A real conversion: use every core. (I420 from a decoder passes through untouched.)
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            convert.set_property("n-threads", cores as u32);
        }
        let caps = gst::Caps::builder("video/x-raw")
            .field("format", format.gst_name())
            .build();
        let appsink = gst_app::AppSink::builder()
            .caps(&caps)
            .max_buffers(LIVE_APPSINK_BUFFERS as u32)
            .drop(pace == Pace::Realtime)
            .sync(pace != Pace::AsFastAsConsumed)
            .build();
        let mut elements: Vec<&gst::Element> = upstream.iter().collect();
        elements.push(&convert);
        elements.push(appsink.upcast_ref());
        pipeline
            .add_many(elements.iter().copied())
            .map_err(|e| OpError::Failed(format!("building the GStreamer pipeline: {e}")))?;
        for pair in upstream.windows(2) {
            link_when_ready(&pair[0], &pair[1])?;
        }
        if let Some(last) = upstream.last() {
            link_upstream(last, &convert)?;
        }
        convert
            .link(&appsink)
            .map_err(|e| OpError::Failed(format!("linking videoconvert to appsink: {e}")))?;
        let arrivals = (pace == Pace::Realtime)
            .then(|| count_arrivals(&appsink))
            .transpose()?;
        if threads == DecoderThreads::Slices {
            decode_without_frame_threads(&pipeline);
        }
        Ok(Self {
            pipeline,
            appsink,
            format,
            pool: BufferPool::new(8),
            info: None,
            pictures_held: Arc::new(AtomicUsize::new(0)),
            playing: false,
            arrivals,
            next_arrival: 0,
            dropped: 0,
        })
    }

    /// Pictures the appsink let go since the last call (a live reader whose graph fell behind;
    /// always 0 for other paces).
    pub(crate) fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }

    /// Stops the pipeline and counts what it leaves behind: the pictures let go and those still
    /// queued, never pulled.
    pub(crate) fn close(mut self) -> u64 {
        let _ = self.pipeline.set_state(gst::State::Null);
        let unpulled = self.arrivals.as_ref().map_or(0, |arrivals| {
            let arrived = arrivals.lock().unwrap_or_else(|p| p.into_inner()).count;
            arrived.saturating_sub(self.next_arrival)
        });
        self.take_dropped() + unpulled
    }

    /// Counts the pictures let go before `sample`'s, which is pulled now.
    fn count_dropped_before(&mut self, sample: &gst::Sample) {
        let (Some(arrivals), Some(buffer)) = (&self.arrivals, sample.buffer()) else {
            return;
        };
        let number = arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .number_of(buffer);
        if let Some(number) = number {
            self.dropped += number.saturating_sub(self.next_arrival);
            self.next_arrival = number + 1;
        }
    }

    /// Opens the source and decodes up to the first picture, without playing (the first
    /// [`AppSinkReader::pull`] plays). Errors that GStreamer reports right away (a file it
    /// cannot open) come back here; later ones from `pull`.
    pub(crate) fn start(&self) -> Result<(), String> {
        self.set_state(gst::State::Paused)
    }

    fn set_state(&self, state: gst::State) -> Result<(), String> {
        if self.pipeline.set_state(state).is_err() {
            return Err(self
                .bus_error()
                .unwrap_or_else(|| "the pipeline refused to start".into()));
        }
        Ok(())
    }

    /// The first error message waiting on the bus, described.
    fn bus_error(&self) -> Option<String> {
        let bus = self.pipeline.bus()?;
        let message = bus.pop_filtered(&[gst::MessageType::Error])?;
        match message.view() {
            gst::MessageView::Error(error) => Some(describe_error(error)),
            _ => None,
        }
    }

    /// Waits up to `timeout` for the next picture.
    pub(crate) fn pull(&mut self, timeout: Duration) -> Result<Pulled, String> {
        if let Some(error) = self.bus_error() {
            return Err(error);
        }
        if !self.playing {
            self.set_state(gst::State::Playing)?;
            self.playing = true;
        }
        let timeout = gst::ClockTime::from_nseconds(timeout.as_nanos() as u64);
        let Some(sample) = self.appsink.try_pull_sample(timeout) else {
            if let Some(error) = self.bus_error() {
                return Err(error);
            }
            return Ok(if self.appsink.is_eos() {
                Pulled::EndOfStream
            } else {
                Pulled::Waiting
            });
        };
        self.count_dropped_before(&sample);
        let (picture, layout) = self.picture_of(&sample)?;
        Ok(Pulled::Frame(picture, layout))
    }

    /// Seeks back to the start (looping files).
    pub(crate) fn rewind(&self) -> Result<(), String> {
        self.pipeline
            .seek_simple(
                gst::SeekFlags::FLUSH | gst::SeekFlags::ACCURATE,
                gst::ClockTime::ZERO,
            )
            .map_err(|e| format!("cannot seek back to the start: {e}"))
    }

    /// One sample as a frame's memory: the decoder's buffer itself when its planes lie as a
    /// packed frame's do (the usual case: I420 at widths that are a multiple of 8), a pooled
    /// copy otherwise.
    fn picture_of(&mut self, sample: &gst::Sample) -> Result<(Picture, ImageLayout), String> {
        let caps = sample.caps().ok_or("decoded sample without caps")?;
        let stale = self
            .info
            .as_ref()
            .is_none_or(|(known, _)| known.as_ptr() != caps.as_ptr());
        if stale {
            let info = gst_video::VideoInfo::from_caps(caps)
                .map_err(|e| format!("unusable video caps {caps}: {e}"))?;
            self.info = Some((caps.to_owned(), info));
        }
        let Some((_, info)) = &self.info else {
            return Err("no video info".into());
        };
        let buffer = sample.buffer().ok_or("decoded sample without a buffer")?;
        let layout = ImageLayout::packed(info.width(), info.height(), self.format.pixel_format());
        if self.pictures_held.load(Ordering::Acquire) < MOST_DECODER_PICTURES_HELD
            && lies_packed(buffer, info, &layout)
            && let Some(owned) = sample.buffer_owned()
            && let Ok(mapped) = owned.into_mapped_buffer_readable()
        {
            self.pictures_held.fetch_add(1, Ordering::AcqRel);
            let _held = HeldPicture(Arc::clone(&self.pictures_held));
            return Ok((Picture::Decoded { mapped, _held }, layout));
        }
        let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer, info)
            .map_err(|e| format!("cannot map a decoded picture: {e}"))?;
        let mut pixels = self.pool.get(layout.byte_len());
        let mut offset = 0;
        for plane in 0..frame.n_planes() {
            let (row_bytes, rows) = plane_size(&layout, plane);
            let data = frame
                .plane_data(plane)
                .map_err(|e| format!("plane {plane}: {e}"))?;
            let stride = frame.plane_stride()[plane as usize] as usize;
            for row in 0..rows {
                let start = row * stride;
                let source = data
                    .get(start..start + row_bytes)
                    .ok_or_else(|| format!("plane {plane} shorter than its layout"))?;
                pixels[offset..offset + row_bytes].copy_from_slice(source);
                offset += row_bytes;
            }
        }
        Ok((Picture::Copied(pixels), layout))
    }
}

/// Makes every FFmpeg video decoder that `pipeline` comes to hold (decodebin adds them once it
/// knows the codec) split each picture over its threads instead of decoding several pictures
/// at once ([`DecoderThreads::Slices`]): frame threading delays each picture by a frame per
/// thread and keeps a copy of the decoder's state and pictures per thread. For a paced stream
/// (a camera, a file played in real time) the decoder has spare time between pictures, so only
/// the delay and the memory would remain: four 360p files played in real time peaked at
/// 221-222 MB with frame threads and 207 MB without (one: 162 against 158-160 MB;
/// BENCHMARKS.md, issue 08).
fn decode_without_frame_threads(pipeline: &gst::Pipeline) {
    pipeline.connect_deep_element_added(|_, _, element| {
        let is_libav_decoder = element
            .factory()
            .is_some_and(|factory| factory.name().starts_with("avdec_"));
        if is_libav_decoder && element.find_property("thread-type").is_some() {
            element.set_property_from_str("thread-type", "slice");
        }
    });
}

/// Numbers every picture that reaches `appsink`, in order, from GStreamer's streaming thread.
fn count_arrivals(appsink: &gst_app::AppSink) -> Result<Arc<Mutex<Arrivals>>, OpError> {
    let arrivals = Arc::new(Mutex::new(Arrivals::default()));
    let pad = appsink
        .static_pad("sink")
        .ok_or_else(|| OpError::Failed("appsink without a sink pad".into()))?;
    let counted = Arc::clone(&arrivals);
    pad.add_probe(
        gst::PadProbeType::BUFFER | gst::PadProbeType::BUFFER_LIST,
        move |_, info| {
            let mut arrivals = counted.lock().unwrap_or_else(|p| p.into_inner());
            match &info.data {
                Some(gst::PadProbeData::Buffer(buffer)) => arrivals.arrived(buffer),
                Some(gst::PadProbeData::BufferList(list)) => {
                    list.iter().for_each(|buffer| arrivals.arrived(buffer));
                }
                _ => {}
            }
            gst::PadProbeReturn::Ok
        },
    )
    .ok_or_else(|| OpError::Failed("cannot watch the appsink's pad".into()))?;
    Ok(arrivals)
}

/// Whether `buffer`'s planes (as its video meta says, or the caps when it has none) start and
/// step exactly as those of a packed frame of `layout`, in one block of memory that holds them
/// all: then the buffer can be a frame's memory as it is.
fn lies_packed(buffer: &gst::BufferRef, info: &gst_video::VideoInfo, layout: &ImageLayout) -> bool {
    let meta = buffer.meta::<gst_video::VideoMeta>();
    let (offsets, strides) = match &meta {
        Some(meta) => (meta.offset(), meta.stride()),
        None => (info.offset(), info.stride()),
    };
    let mut expected_offset = 0;
    for plane in 0..info.n_planes() as usize {
        let (row_bytes, rows) = plane_size(layout, plane as u32);
        let stride = strides.get(plane).copied().unwrap_or(-1);
        if offsets.get(plane) != Some(&expected_offset) || stride != row_bytes as i32 {
            return false;
        }
        expected_offset += row_bytes * rows;
    }
    expected_offset == layout.byte_len()
        && buffer.n_memory() == 1
        && buffer.size() >= expected_offset
}

/// Bytes per row and rows of `plane` of a packed image.
fn plane_size(layout: &ImageLayout, plane: u32) -> (usize, usize) {
    match (layout.format, plane) {
        (PixelFormat::I420, 1 | 2) => layout.chroma_size(),
        _ => (layout.stride, layout.height as usize),
    }
}

impl Drop for AppSinkReader {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// An error message from the bus as one line: the element, the error and GStreamer's details.
fn describe_error(error: &gst::message::Error) -> String {
    let source = error
        .src()
        .map(|s| s.name().to_string())
        .unwrap_or_else(|| "pipeline".into());
    match error.debug() {
        Some(debug) => format!("{source}: {} ({})", error.error(), debug.replace('\n', " ")),
        None => format!("{source}: {}", error.error()),
    }
}

/// Links `from` to `to` now, or, when `from`'s output pads only appear once it runs (rtspsrc,
/// demuxers), as soon as one appears.
fn link_when_ready(from: &gst::Element, to: &gst::Element) -> Result<(), OpError> {
    if from.static_pad("src").is_some() {
        return from.link(to).map_err(|e| {
            OpError::Failed(format!("linking {} to {}: {e}", from.name(), to.name()))
        });
    }
    let to = to.downgrade();
    from.connect_pad_added(move |_, pad| {
        if let Some(sink) = to.upgrade().and_then(|to| to.static_pad("sink"))
            && !sink.is_linked()
            && let Err(error) = pad.link(&sink)
        {
            tracing::warn!("cannot link {}: {error:?}", pad.name());
        }
    });
    Ok(())
}

/// Links `decodebin`'s video pad, once it appears, to `target`'s sink pad. Audio and other
/// streams are left unlinked.
pub(crate) fn link_decoded_video(
    decodebin: &gst::Element,
    target: &gst::Element,
) -> Result<(), OpError> {
    let target = target.downgrade();
    decodebin.connect_pad_added(move |_, pad| {
        let Some(target) = target.upgrade() else {
            return;
        };
        let is_video = pad
            .current_caps()
            .or_else(|| Some(pad.query_caps(None)))
            .and_then(|caps| caps.structure(0).map(|s| s.name().starts_with("video/")))
            .unwrap_or(false);
        let Some(sink) = target.static_pad("sink") else {
            return;
        };
        if is_video
            && !sink.is_linked()
            && let Err(error) = pad.link(&sink)
        {
            tracing::warn!("cannot link decoded video: {error:?}");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader of `frames` test pictures in I420 at `width` x `height`.
    fn test_pictures(width: i32, height: i32, frames: i32) -> AppSinkReader {
        test_reader(width, height, frames, None)
    }

    /// A reader of `frames` test pictures, from a live source at `live_fps` when given (read as
    /// a camera is), else as fast as they are taken.
    fn test_reader(width: i32, height: i32, frames: i32, live_fps: Option<i32>) -> AppSinkReader {
        let source = make("videotestsrc").expect("videotestsrc");
        source.set_property("num-buffers", frames);
        source.set_property("is-live", live_fps.is_some());
        let filter = make("capsfilter").expect("capsfilter");
        let caps = gst::Caps::builder("video/x-raw")
            .field("format", "I420")
            .field("width", width)
            .field("height", height)
            .field("framerate", gst::Fraction::new(live_fps.unwrap_or(30), 1))
            .build();
        filter.set_property("caps", &caps);
        let pace = if live_fps.is_some() {
            Pace::Realtime
        } else {
            Pace::AsFastAsConsumed
        };
        let reader = AppSinkReader::new(
            &[source, filter],
            |last, convert| {
                last.link(convert)
                    .map_err(|e| OpError::Failed(format!("link: {e}")))
            },
            VideoFormat::I420,
            pace,
            DecoderThreads::for_stream(pace, false),
        )
        .expect("reader");
        reader.start().expect("plays");
        reader
    }

    fn next_picture(reader: &mut AppSinkReader) -> (Picture, ImageLayout) {
        match reader.pull(Duration::from_secs(10)).expect("pulled") {
            Pulled::Frame(picture, layout) => (picture, layout),
            Pulled::Waiting => panic!("no picture within 10 s"),
            Pulled::EndOfStream => panic!("the stream ended early"),
        }
    }

    #[test]
    fn packed_pictures_are_the_decoders_own_memory_and_padded_ones_are_copied_unpadded() {
        let mut reader = test_pictures(640, 360, 1);
        let (picture, layout) = next_picture(&mut reader);
        assert!(
            matches!(picture, Picture::Decoded { .. }),
            "640x360 I420 lies packed"
        );
        assert_eq!(picture.bytes().len(), layout.byte_len());

        // 66 wide: GStreamer pads the 33-byte chroma rows to 36, so the planes are copied.
        let mut reader = test_pictures(66, 50, 1);
        let (picture, layout) = next_picture(&mut reader);
        assert!(matches!(picture, Picture::Copied(_)));
        assert_eq!((layout.stride, layout.chroma_size()), (66, (33, 25)));
        assert!(picture.bytes().len() >= layout.byte_len());
    }

    #[test]
    fn a_camera_read_too_slowly_keeps_the_newest_pictures_and_counts_every_one_let_go() {
        let sent = 40;
        let mut reader = test_reader(64, 48, sent, Some(100));
        let mut pulled = 0;
        let mut dropped = 0;
        // Take one picture, then fall behind for twice the time the camera takes to send all.
        if let Pulled::Frame(..) = reader.pull(Duration::from_secs(10)).expect("pulled") {
            pulled += 1;
        }
        std::thread::sleep(Duration::from_millis(1200));
        loop {
            match reader.pull(Duration::from_secs(10)).expect("pulled") {
                Pulled::Frame(..) => pulled += 1,
                Pulled::Waiting => panic!("no picture or end within 10 s"),
                Pulled::EndOfStream => break,
            }
            dropped += reader.take_dropped();
        }
        dropped += reader.take_dropped();
        assert!(
            pulled < sent as u64 / 2,
            "the appsink keeps only the newest: {pulled} pulled"
        );
        assert_eq!(
            pulled + dropped,
            sent as u64,
            "every picture pulled or counted"
        );
        assert_eq!(reader.close(), 0, "nothing left behind after the end");
    }

    /// The thread type of the FFmpeg decoder that decodebin picked for an H.264 stream read at
    /// `pace`.
    fn decoder_thread_type(pace: Pace, to_model: bool) -> String {
        let source = make("videotestsrc").expect("videotestsrc");
        source.set_property("num-buffers", 3);
        let encoder = make("x264enc").expect("x264enc (gst-plugins-ugly)");
        let decodebin = make("decodebin").expect("decodebin");
        let mut reader = AppSinkReader::new(
            &[source, encoder, decodebin],
            link_decoded_video,
            VideoFormat::I420,
            pace,
            DecoderThreads::for_stream(pace, to_model),
        )
        .expect("reader");
        reader.start().expect("plays");
        assert!(matches!(
            reader.pull(Duration::from_secs(10)).expect("pulled"),
            Pulled::Frame(..)
        ));
        let decoder = reader
            .pipeline
            .iterate_recurse()
            .into_iter()
            .filter_map(Result::ok)
            .find(|element| {
                element
                    .factory()
                    .is_some_and(|factory| factory.name() == "avdec_h264")
            })
            .expect("decodebin picked avdec_h264");
        decoder
            .property_value("thread-type")
            .serialize()
            .expect("serialisable")
            .to_string()
    }

    #[test]
    fn only_files_read_at_full_speed_for_no_model_decode_with_frame_threads() {
        // GStreamer writes these flags by their names ("Auto", "Frame", "Slice").
        for to_model in [false, true] {
            assert_eq!(decoder_thread_type(Pace::Clock, to_model), "Slice");
            assert_eq!(decoder_thread_type(Pace::Realtime, to_model), "Slice");
        }
        assert_eq!(decoder_thread_type(Pace::AsFastAsConsumed, true), "Slice");
        assert_eq!(decoder_thread_type(Pace::AsFastAsConsumed, false), "Auto");
    }

    #[test]
    fn a_camera_closed_with_pictures_waiting_counts_them_as_let_go() {
        let mut reader = test_reader(64, 48, 20, Some(100));
        assert!(matches!(
            reader.pull(Duration::from_secs(10)).expect("pulled"),
            Pulled::Frame(..)
        ));
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(reader.close(), 19, "the other pictures were never pulled");
    }

    #[test]
    fn a_graph_holding_many_pictures_gets_copies_beyond_the_limit() {
        let total = MOST_DECODER_PICTURES_HELD + 3;
        let mut reader = test_pictures(64, 48, total as i32 + 1);
        let held: Vec<(Picture, ImageLayout)> =
            (0..total).map(|_| next_picture(&mut reader)).collect();
        let decoded = held
            .iter()
            .filter(|(picture, _)| matches!(picture, Picture::Decoded { .. }))
            .count();
        assert_eq!(decoded, MOST_DECODER_PICTURES_HELD);
        assert!(
            held[MOST_DECODER_PICTURES_HELD..]
                .iter()
                .all(|(picture, _)| matches!(picture, Picture::Copied(_)))
        );
        drop(held);
        let (picture, _) = next_picture(&mut reader);
        assert!(
            matches!(picture, Picture::Decoded { .. }),
            "released pictures count out"
        );
    }
}
