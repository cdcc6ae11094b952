//! H.264 out: `encode.h264` (access units attached to packets, for the live preview and for
//! anything that streams) and `sink.video_file` (MP4 recording).
//!
//! Both hand each frame to GStreamer without copying it: the pooled pixel buffer is wrapped in a
//! `gst::Buffer` (it returns to its pool when the encoder is done with it), with a video meta
//! describing the packed planes. Encoding is x264 with `tune=zerolatency`: one access unit out
//! per frame in, no frame held back. The overlay is encoded when a heatmap operator drew one
//! (`source: auto`), the frame itself otherwise. x264 encodes 4:2:0 at even sizes only, so a
//! frame with an odd width or height loses its last column or row.
//!
//! `sink.video_file` writes fragmented MP4 (a fragment a second) under a temporary name and renames
//! it when the stream ends: the finished name only ever holds a complete file, and even the
//! temporary one stays playable up to its last fragment after a crash.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use serde::Deserialize;

use super::{init, make};
use crate::contract::{
    Emitter, OpError, OperatorInstance, OperatorKind, OutputType, PortType, Sink, Transform,
};
use crate::packet::{EncodedImage, Frame, ImageLayout, Packet, PixelFormat};
use crate::pool::BufferPool;
use crate::registry::{OperatorDescriptor, ParamError};
use crate::transform::encode::EncodeSource;

/// x264 settings shared by both operators.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct H264Settings {
    /// Target bit rate in kbit/s.
    #[serde(default = "default_bitrate_kbps")]
    #[schemars(range(min = 16, max = 200000))]
    pub bitrate_kbps: u32,
    /// Frames between key frames (a viewer joining waits at most this long for a picture).
    #[serde(default = "default_keyframe_interval")]
    #[schemars(range(min = 1))]
    pub keyframe_interval: u32,
    /// x264 speed preset: `ultrafast` (least CPU) to `veryslow` (smallest files).
    #[serde(default = "default_preset")]
    pub preset: String,
    /// Frame rate written into the stream's timestamps.
    #[serde(default = "default_fps")]
    #[schemars(range(min = 1, max = 1000))]
    pub fps: u32,
}

fn default_bitrate_kbps() -> u32 {
    4000
}
fn default_keyframe_interval() -> u32 {
    30
}
fn default_preset() -> String {
    "veryfast".into()
}
fn default_fps() -> u32 {
    30
}

impl Default for H264Settings {
    fn default() -> Self {
        Self {
            bitrate_kbps: default_bitrate_kbps(),
            keyframe_interval: default_keyframe_interval(),
            preset: default_preset(),
            fps: default_fps(),
        }
    }
}

const PRESETS: [&str; 9] = [
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
];

impl H264Settings {
    /// The rules the schema cannot express: a preset x264 knows, positive rates.
    pub fn validate(&self) -> Result<(), ParamError> {
        if !PRESETS.contains(&self.preset.as_str()) {
            return Err(ParamError::new(
                "preset",
                format!("'{}' is not one of {}", self.preset, PRESETS.join(", ")),
            ));
        }
        for (field, value) in [
            ("fps", self.fps),
            ("keyframe_interval", self.keyframe_interval),
        ] {
            if value == 0 {
                return Err(ParamError::new(field, "must be positive, got 0"));
            }
        }
        Ok(())
    }
}

/// Parameters of `encode.h264`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EncodeH264Params {
    /// Encoder settings.
    #[serde(flatten)]
    pub settings: H264Settings,
    /// Which image to encode.
    #[serde(default = "default_source")]
    pub source: EncodeSource,
}

/// Parameters of `sink.video_file`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VideoFileSinkParams {
    /// The MP4 file to write (its folder must exist).
    #[schemars(with = "crate::params::FileParam")]
    pub path: PathBuf,
    /// Replace an existing file.
    #[serde(default)]
    pub overwrite: bool,
    /// Encoder settings.
    #[serde(flatten)]
    pub settings: H264Settings,
    /// Which image to record.
    #[serde(default = "default_source")]
    pub source: EncodeSource,
}

fn default_source() -> EncodeSource {
    EncodeSource::Auto
}

/// The registry entry of `encode.h264`.
pub fn encode_descriptor() -> OperatorDescriptor {
    OperatorDescriptor::builder::<EncodeH264Params>(
        "encode.h264",
        OperatorKind::Transform,
        "H.264-encodes the overlay (or the frame) with x264 at zero latency (`bitrate_kbps`, `keyframe_interval`, `preset`, `fps`), one access unit per frame (Annex B) with SPS/PPS at every key frame, for streaming and the live preview.",
    )
    .input("in", PortType::Image)
    .output("out", OutputType::SameAsInput)
    .validate(|params| params.settings.validate())
    .build_with(|params, _context| {
        init()?;
        Ok(OperatorInstance::Transform(Box::new(H264Transform {
            settings: params.settings,
            source: params.source,
            encoder: None,
            pool: BufferPool::new(16),
        })))
    })
}

/// The registry entry of `sink.video_file`.
pub fn sink_descriptor() -> OperatorDescriptor {
    OperatorDescriptor::builder::<VideoFileSinkParams>(
        "sink.video_file",
        OperatorKind::Sink,
        "Records the overlay (or the frame) as H.264 with `encode.h264`'s settings in a fragmented MP4 (a crash leaves a playable file), written under a hidden `.partial` name and renamed when complete; refuses to replace a file unless `overwrite: true`.",
    )
    .input("in", PortType::Image)
    .validate(|params| params.settings.validate())
    .build_with(|params, _context| {
        init()?;
        let folder = params
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !folder.is_dir() {
            return Err(OpError::param(
                "path",
                format!("folder {} does not exist", folder.display()),
            ));
        }
        if params.path.exists() && !params.overwrite {
            return Err(OpError::param(
                "path",
                format!(
                    "{} exists (set overwrite: true to replace it)",
                    params.path.display()
                ),
            ));
        }
        Ok(OperatorInstance::Sink(Box::new(VideoFileSink {
            partial: partial_name(&params.path),
            path: params.path,
            settings: params.settings,
            source: params.source,
            encoder: None,
        })))
    })
}

fn partial_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "recording.mp4".into());
    path.with_file_name(format!(".{name}.partial"))
}

/// A frame's pixels lent to GStreamer: the `Arc` keeps them alive until the encoder is done.
struct LentPixels(Frame);

impl AsRef<[u8]> for LentPixels {
    fn as_ref(&self) -> &[u8] {
        &self.0.pixels()[..self.0.layout.byte_len()]
    }
}

/// Where an [`Encoder`]'s output goes.
enum Output {
    /// Access units come back through an appsink.
    AccessUnits(gst_app::AppSink),
    /// Muxed into an MP4 file.
    File,
}

/// `appsrc ! videoconvert ! x264enc ! h264parse ! (appsink | mp4mux ! filesink)` for frames of one
/// layout.
struct Encoder {
    pipeline: gst::Pipeline,
    appsrc: gst_app::AppSrc,
    output: Output,
    layout: ImageLayout,
    format: gst_video::VideoFormat,
    frame_duration: gst::ClockTime,
    frames: u64,
}

impl Encoder {
    fn new(
        layout: ImageLayout,
        settings: &H264Settings,
        file: Option<&Path>,
    ) -> Result<Self, OpError> {
        let info = super::video_info(&layout, gst::Fraction::new(settings.fps as i32, 1))
            .map_err(|e| OpError::Failed(format!("video caps: {e}")))?;
        let format = info.format();
        let caps = info
            .to_caps()
            .map_err(|e| OpError::Failed(format!("video caps: {e}")))?;
        let appsrc = gst_app::AppSrc::builder()
            .caps(&caps)
            .format(gst::Format::Time)
            .block(true)
            .max_bytes(4 * layout.byte_len() as u64)
            .build();
        let convert = make("videoconvert")?;
        // 8-bit 4:2:0 whatever comes in: given RGB, x264 would otherwise pick 4:4:4 (High 4:4:4
        // Predictive), which browsers and most players cannot decode.
        let to_i420 = make("capsfilter")?;
        to_i420.set_property(
            "caps",
            gst::Caps::builder("video/x-raw")
                .field("format", "I420")
                .build(),
        );
        let x264 = make("x264enc")?;
        x264.set_property_from_str("tune", "zerolatency");
        x264.set_property_from_str("speed-preset", &settings.preset);
        x264.set_property("bitrate", settings.bitrate_kbps);
        x264.set_property("key-int-max", settings.keyframe_interval);
        let parse = make("h264parse")?;
        let pipeline = gst::Pipeline::new();
        let mut chain: Vec<gst::Element> = vec![appsrc.clone().upcast()];
        // x264 encodes 4:2:0 only at even sizes: an odd last column or row is cropped off.
        let (odd_columns, odd_rows) = (layout.width % 2, layout.height % 2);
        if odd_columns + odd_rows > 0 {
            let crop = make("videocrop")?;
            crop.set_property("right", odd_columns as i32);
            crop.set_property("bottom", odd_rows as i32);
            chain.push(crop);
        }
        chain.extend([convert, to_i420, x264, parse.clone()]);
        let output = match file {
            Some(path) => {
                let mux = make("mp4mux")?;
                mux.set_property("fragment-duration", 1000u32);
                let filesink = make("filesink")?;
                filesink.set_property("location", path.to_string_lossy().as_ref());
                chain.push(mux);
                chain.push(filesink);
                Output::File
            }
            None => {
                // Parameter sets before every key frame, so a viewer can join at any key frame.
                parse.set_property("config-interval", -1i32);
                let caps = gst::Caps::builder("video/x-h264")
                    .field("stream-format", "byte-stream")
                    .field("alignment", "au")
                    .build();
                let appsink = gst_app::AppSink::builder().caps(&caps).sync(false).build();
                chain.push(appsink.clone().upcast());
                Output::AccessUnits(appsink)
            }
        };
        pipeline
            .add_many(&chain)
            .map_err(|e| OpError::Failed(format!("building the encoder: {e}")))?;
        gst::Element::link_many(&chain)
            .map_err(|e| OpError::Failed(format!("linking the encoder: {e}")))?;
        pipeline
            .set_state(gst::State::Playing)
            .map_err(|e| OpError::Failed(format!("starting the encoder: {e}")))?;
        Ok(Self {
            pipeline,
            appsrc,
            output,
            layout,
            format,
            frame_duration: gst::ClockTime::SECOND / u64::from(settings.fps),
            frames: 0,
        })
    }

    /// Hands one frame to the encoder (no pixel copy).
    fn push(&mut self, frame: &Frame) -> Result<(), OpError> {
        self.check_bus()?;
        let layout = frame.layout;
        let mut buffer = gst::Buffer::from_slice(LentPixels(frame.clone()));
        {
            let buffer = buffer
                .get_mut()
                .ok_or_else(|| OpError::Failed("new buffer is shared".into()))?;
            buffer.set_pts(self.frame_duration * self.frames);
            buffer.set_duration(self.frame_duration);
            let (offsets, strides) = plane_layout(&layout);
            gst_video::VideoMeta::add_full(
                buffer,
                gst_video::VideoFrameFlags::empty(),
                self.format,
                layout.width,
                layout.height,
                &offsets[..plane_count(&layout)],
                &strides[..plane_count(&layout)],
            )
            .map_err(|e| OpError::Failed(format!("describing the frame to GStreamer: {e}")))?;
        }
        self.frames += 1;
        self.appsrc
            .push_buffer(buffer)
            .map_err(|e| self.failure(&format!("the encoder refused a frame ({e:?})")))?;
        Ok(())
    }

    /// The next access unit (after a [`Encoder::push`]).
    fn pull(&self, pool: &BufferPool<u8>) -> Result<EncodedImage, OpError> {
        let Output::AccessUnits(appsink) = &self.output else {
            return Err(OpError::Failed("this encoder writes a file".into()));
        };
        let sample = appsink
            .try_pull_sample(gst::ClockTime::from_seconds(10))
            .ok_or_else(|| self.failure("the encoder produced nothing for a frame"))?;
        let buffer = sample
            .buffer()
            .ok_or_else(|| OpError::Failed("encoded sample without a buffer".into()))?;
        let map = buffer
            .map_readable()
            .map_err(|e| OpError::Failed(format!("reading an encoded frame: {e}")))?;
        let mut bytes = pool.get(map.len());
        bytes.copy_from_slice(&map);
        Ok(EncodedImage {
            format: "h264",
            len: map.len(),
            buffer: bytes,
        })
    }

    /// Ends the stream and waits until everything is written.
    fn finish(self) -> Result<(), OpError> {
        let _ = self.appsrc.end_of_stream();
        let bus = self
            .pipeline
            .bus()
            .ok_or_else(|| OpError::Failed("encoder without a bus".into()))?;
        let message = bus.timed_pop_filtered(
            gst::ClockTime::from_seconds(60),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        );
        let result = match message.as_ref().map(|m| m.view()) {
            Some(gst::MessageView::Eos(_)) => Ok(()),
            Some(gst::MessageView::Error(error)) => Err(OpError::Failed(format!(
                "finishing the recording: {}",
                super::describe_error(error)
            ))),
            _ => Err(OpError::Failed(
                "the encoder did not finish within 60 s".into(),
            )),
        };
        let _ = self.pipeline.set_state(gst::State::Null);
        result
    }

    fn check_bus(&self) -> Result<(), OpError> {
        match self.bus_error() {
            Some(error) => Err(OpError::Failed(error)),
            None => Ok(()),
        }
    }

    fn bus_error(&self) -> Option<String> {
        let message = self
            .pipeline
            .bus()?
            .pop_filtered(&[gst::MessageType::Error])?;
        match message.view() {
            gst::MessageView::Error(error) => Some(super::describe_error(error)),
            _ => None,
        }
    }

    /// An error, with GStreamer's reason when it gave one.
    fn failure(&self, what: &str) -> OpError {
        match self.bus_error() {
            Some(reason) => OpError::Failed(format!("{what}: {reason}")),
            None => OpError::Failed(what.to_string()),
        }
    }
}

impl Drop for Encoder {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

fn plane_count(layout: &ImageLayout) -> usize {
    if layout.format == PixelFormat::I420 {
        3
    } else {
        1
    }
}

/// Offsets and strides of the planes of a packed frame.
fn plane_layout(layout: &ImageLayout) -> ([usize; 3], [i32; 3]) {
    let luma = layout.stride * layout.height as usize;
    let (chroma_width, chroma_height) = layout.chroma_size();
    (
        [0, luma, luma + chroma_width * chroma_height],
        [
            layout.stride as i32,
            chroma_width as i32,
            chroma_width as i32,
        ],
    )
}

/// The image a packet contributes: its overlay or its frame.
fn image_of(packet: &Packet, source: EncodeSource) -> &Frame {
    match (&packet.overlay, source) {
        (Some(overlay), EncodeSource::Auto) => overlay,
        _ => &packet.frame,
    }
}

/// The running `encode.h264`.
struct H264Transform {
    settings: H264Settings,
    source: EncodeSource,
    encoder: Option<Encoder>,
    pool: BufferPool<u8>,
}

impl Transform for H264Transform {
    fn process(&mut self, mut packet: Packet, out: &mut Emitter) -> Result<(), OpError> {
        let frame = image_of(&packet, self.source);
        // A new size (a camera switched resolution) starts a new stream.
        if self
            .encoder
            .as_ref()
            .is_none_or(|encoder| encoder.layout != frame.layout)
        {
            self.encoder = Some(Encoder::new(frame.layout, &self.settings, None)?);
        }
        let Some(encoder) = &mut self.encoder else {
            return Err(OpError::Failed("no encoder".into()));
        };
        encoder.push(frame)?;
        let encoded = encoder.pull(&self.pool)?;
        packet.encoded = Some(Arc::new(encoded));
        out.emit(0, packet);
        Ok(())
    }
}

/// The running `sink.video_file`.
struct VideoFileSink {
    path: PathBuf,
    partial: PathBuf,
    settings: H264Settings,
    source: EncodeSource,
    encoder: Option<Encoder>,
}

impl VideoFileSink {
    /// Removes the temporary file when it holds nothing (the recording failed before its first
    /// fragment); one with fragments stays, playable up to its last one.
    fn remove_empty_partial(&self) {
        if std::fs::metadata(&self.partial).is_ok_and(|meta| meta.len() == 0) {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

impl Drop for VideoFileSink {
    /// A sink dropped without finishing (it failed, or its pipeline was aborted) stops its
    /// encoder first, so that what it wrote is flushed or, when empty, removed.
    fn drop(&mut self) {
        if let Some(encoder) = self.encoder.take() {
            drop(encoder);
            self.remove_empty_partial();
        }
    }
}

impl Sink for VideoFileSink {
    fn consume(&mut self, packet: Packet) -> Result<(), OpError> {
        let frame = image_of(&packet, self.source);
        match &self.encoder {
            None => {
                let encoder = Encoder::new(frame.layout, &self.settings, Some(&self.partial));
                match encoder {
                    Ok(encoder) => self.encoder = Some(encoder),
                    Err(error) => {
                        self.remove_empty_partial();
                        return Err(error);
                    }
                }
            }
            Some(encoder) if encoder.layout != frame.layout => {
                return Err(OpError::UnsupportedInput(format!(
                    "frame size changed from {}x{} to {}x{} during a recording",
                    encoder.layout.width,
                    encoder.layout.height,
                    frame.layout.width,
                    frame.layout.height
                )));
            }
            Some(_) => {}
        }
        match &mut self.encoder {
            Some(encoder) => encoder.push(frame),
            None => Err(OpError::Failed("no encoder".into())),
        }
    }

    fn finish(&mut self) -> Result<(), OpError> {
        let Some(encoder) = self.encoder.take() else {
            return Ok(()); // no frame, no file
        };
        if let Err(error) = encoder.finish() {
            self.remove_empty_partial();
            return Err(error);
        }
        std::fs::rename(&self.partial, &self.path).map_err(|e| {
            OpError::io(
                format!(
                    "renaming {} to {}",
                    self.partial.display(),
                    self.path.display()
                ),
                e,
            )
        })
    }
}
