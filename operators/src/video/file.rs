//! `source.video_file`: decodes a video file (any container and codec the installed GStreamer
//! decodes) into frames. By default it decodes as fast as the graph consumes, holding the decoder
//! back when the graph is slow, so that under `block` every frame is delivered exactly once, in
//! order; end of file ends the stream (a batch run finishes). `loop` starts again at the end;
//! `realtime` plays at the file's own frame rate, like a camera (the node is then live).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gstreamer::prelude::*;
use serde::Deserialize;

use super::{AppSinkReader, DecoderThreads, Pace, Pulled, VideoFormat, link_decoded_video, make};
use crate::contract::{
    OpError, OperatorInstance, OperatorKind, OutputType, PortType, Source, SourceContext,
    SourcePoll,
};
use crate::packet::{CaptureTime, Frame, Packet};
use crate::registry::{OperatorDescriptor, ParamError};

/// Parameters of `source.video_file`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VideoFileParams {
    /// The video file.
    #[schemars(with = "crate::params::FileParam")]
    pub path: PathBuf,
    /// Start again from the beginning at the end of the file (the stream never ends).
    #[serde(default, rename = "loop")]
    pub looping: bool,
    /// Play at the file's frame rate, like a camera (the node is live: its edges default to
    /// `drop_oldest`). Off: decode as fast as the graph takes frames, losing none.
    #[serde(default)]
    pub realtime: bool,
    /// Pixel format of the frames.
    #[serde(default)]
    pub format: VideoFormat,
    /// Stream id stamped on frames (default: the node id).
    #[serde(default)]
    pub stream_id: Option<String>,
}

/// The registry entry.
pub fn descriptor() -> OperatorDescriptor {
    OperatorDescriptor::builder::<VideoFileParams>(
        "source.video_file",
        OperatorKind::Source,
        "Decodes a video file with GStreamer: any container and codec installed (MP4, MKV, AVI; H.264, H.265, MJPEG, ...), every frame once and in order (frame-exact under `block`); end of file ends the stream unless `loop`; `realtime` plays it at its own frame rate like a camera; `format` picks the pixel format.",
    )
    .output("out", OutputType::Fixed(PortType::Image))
    .live_when(|params| params.realtime)
    .health_check(|params| {
        std::fs::File::open(&params.path).map(|_| ()).map_err(|e| {
            ParamError::new(
                "path",
                format!("cannot open {}: {e}", params.path.display()),
            )
        })
    })
    .build_with(|params, context| {
        Ok(OperatorInstance::Source(Box::new(VideoFileSource::open(
            params,
            context.node_id,
            context.tensor_wanted_downstream,
        )?)))
    })
}

/// The running source.
pub struct VideoFileSource {
    reader: AppSinkReader,
    path: PathBuf,
    looping: bool,
    stream_id: Arc<str>,
    sequence: u64,
    /// Frames delivered since the last rewind (a looped file must deliver at least one per pass).
    frames_this_pass: u64,
    /// Since when `next` has found no frame (never counting time the graph held the source
    /// back), to catch a stalled decoder.
    waiting_since: Option<Instant>,
    /// How long decoding may produce nothing before the file counts as broken.
    stall_limit: Duration,
}

/// A file read as fast as it decodes that yields nothing for this long is broken (some truncated
/// files make demuxers wait forever instead of failing).
const STALL_LIMIT: Duration = Duration::from_secs(10);
/// The same in real time, where a still scene may legitimately hold frames back for a while.
const REALTIME_STALL_LIMIT: Duration = Duration::from_secs(60);

impl VideoFileSource {
    /// Opens the file and decodes up to its first picture (playing starts with the first
    /// frame asked for); a missing or unreadable file fails here. `to_model`: whether its frames
    /// go to a node that takes tensors (a model), which then gets the cores before the decoder
    /// ([`DecoderThreads::for_stream`]).
    pub fn open(params: VideoFileParams, node_id: &str, to_model: bool) -> Result<Self, OpError> {
        let path = params.path;
        if !path.is_file() {
            return Err(OpError::param(
                "path",
                format!("{} is not a readable file", path.display()),
            ));
        }
        let filesrc = make("filesrc")?;
        filesrc.set_property("location", path.to_string_lossy().as_ref());
        let decodebin = make("decodebin")?;
        let pace = if params.realtime {
            Pace::Clock
        } else {
            Pace::AsFastAsConsumed
        };
        let reader = AppSinkReader::new(
            &[filesrc, decodebin],
            link_decoded_video,
            params.format,
            pace,
            DecoderThreads::for_stream(pace, to_model),
        )?;
        reader
            .start()
            .map_err(|e| OpError::Failed(format!("{}: {e}", path.display())))?;
        Ok(Self {
            reader,
            path,
            looping: params.looping,
            stream_id: params.stream_id.as_deref().unwrap_or(node_id).into(),
            sequence: 0,
            frames_this_pass: 0,
            waiting_since: None,
            stall_limit: if params.realtime {
                REALTIME_STALL_LIMIT
            } else {
                STALL_LIMIT
            },
        })
    }
}

impl Source for VideoFileSource {
    fn next(&mut self, _ctx: &SourceContext) -> Result<SourcePoll, OpError> {
        let pulled = self
            .reader
            .pull(Duration::from_millis(100))
            .map_err(|e| OpError::Failed(format!("cannot decode {}: {e}", self.path.display())))?;
        match pulled {
            Pulled::Frame(pixels, layout) => {
                let frame = Frame::new(
                    pixels,
                    layout,
                    Arc::clone(&self.stream_id),
                    self.sequence,
                    CaptureTime::now(),
                );
                self.sequence += 1;
                self.frames_this_pass += 1;
                self.waiting_since = None;
                Ok(SourcePoll::Packet(Packet::from_frame(frame)))
            }
            Pulled::Waiting => {
                let since = *self.waiting_since.get_or_insert_with(Instant::now);
                if since.elapsed() > self.stall_limit {
                    return Err(OpError::Failed(format!(
                        "cannot decode {}: no frame for {} s (a truncated or unsupported file?)",
                        self.path.display(),
                        self.stall_limit.as_secs()
                    )));
                }
                Ok(SourcePoll::Pending)
            }
            Pulled::EndOfStream if self.looping && self.frames_this_pass > 0 => {
                self.frames_this_pass = 0;
                self.waiting_since = None;
                self.reader.rewind().map_err(|e| {
                    OpError::Failed(format!("looping {}: {e}", self.path.display()))
                })?;
                Ok(SourcePoll::Pending)
            }
            Pulled::EndOfStream if self.sequence == 0 => Err(OpError::Failed(format!(
                "{} holds no video frames",
                self.path.display()
            ))),
            Pulled::EndOfStream => Ok(SourcePoll::EndOfStream),
        }
    }
}
