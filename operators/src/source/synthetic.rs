//! `source.synthetic`: a test-pattern camera. Paced like a live camera (`realtime: true`) or as
//! fast as downstream takes frames, with a moving square so that consecutive frames differ.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::contract::{
    OpError, OperatorInstance, OperatorKind, OutputType, PortType, Source, SourceContext,
    SourcePoll,
};
use crate::packet::{CaptureTime, Frame, ImageLayout, Packet, PixelFormat};
use crate::pool::BufferPool;
use crate::registry::{OperatorDescriptor, ParamError};

/// Which picture to draw.
#[derive(Debug, Clone, Copy, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Eight vertical colour bars.
    Bars,
    /// Horizontal red and vertical green ramps.
    Gradient,
    /// 32-pixel black and white squares.
    Checkerboard,
    /// Fresh random noise every frame (costs a fill per frame).
    Noise,
}

/// Parameters of `source.synthetic`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SyntheticParams {
    /// Frame width in pixels.
    #[serde(default = "default_width")]
    #[schemars(range(min = 16, max = 16384))]
    pub width: u32,
    /// Frame height in pixels.
    #[serde(default = "default_height")]
    #[schemars(range(min = 16, max = 16384))]
    pub height: u32,
    /// Frames per second: the pace when `realtime` is true.
    #[serde(default = "default_fps")]
    #[schemars(range(min = 0.1, max = 1000.0))]
    pub fps: f64,
    /// Frames to produce before end of stream; null or absent for an endless stream.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub frames: Option<u64>,
    /// Pace frames at `fps` like a live camera (its edges then default to drop_oldest); false
    /// produces frames as fast as downstream takes them (edges default to block).
    #[serde(default)]
    pub realtime: bool,
    /// Picture to draw.
    #[serde(default = "default_pattern")]
    pub pattern: Pattern,
    /// Pixel format of the frames.
    #[serde(default = "default_format")]
    pub format: PixelFormat,
    /// Stream id stamped on each frame; the node id when absent.
    #[serde(default)]
    pub stream_id: Option<String>,
    /// Draw each frame's capture time into its top rows (see [`TIMESTAMP_BITS`]), so a viewer
    /// can read back the delay from capture to display.
    #[serde(default)]
    pub timestamp: bool,
}

/// Bits of the capture time (milliseconds since the Unix epoch, modulo 2^40) that
/// `timestamp: true` draws, most significant first. Each bit is a pair of square blocks side by
/// side across the top of the frame, the bit's (white for 1) then its complement, so a reader
/// compares the two instead of trusting a threshold (a heatmap blended over them, compression).
pub const TIMESTAMP_BITS: usize = 40;

fn default_width() -> u32 {
    640
}
fn default_height() -> u32 {
    480
}
fn default_fps() -> f64 {
    30.0
}
fn default_pattern() -> Pattern {
    Pattern::Bars
}
fn default_format() -> PixelFormat {
    PixelFormat::Rgb
}

/// The registry entry.
pub fn descriptor() -> OperatorDescriptor {
    OperatorDescriptor::builder::<SyntheticParams>(
        "source.synthetic",
        OperatorKind::Source,
        "Test-pattern camera (bars, gradient, checkerboard, noise) with a moving square: size, frame rate and frame count; `realtime: true` paces it like a live camera, otherwise frames come as fast as the graph takes them.",
    )
    .output("out", OutputType::Fixed(PortType::Image))
    .live_when(|params| params.realtime)
    .validate(SyntheticParams::validate)
    .build_with(|params, context| {
        Ok(OperatorInstance::Source(Box::new(SyntheticSource::new(params, context.node_id)?)))
    })
}

impl SyntheticParams {
    /// The rules the schema cannot express: a positive frame rate, a packed pixel format.
    pub fn validate(&self) -> Result<(), ParamError> {
        if !(self.fps.is_finite() && self.fps > 0.0) {
            return Err(ParamError::new(
                "fps",
                format!("must be a positive number, got {}", self.fps),
            ));
        }
        if self.format == PixelFormat::I420 {
            return Err(ParamError::new(
                "format",
                "i420 frames come from video sources; use rgb, bgr or gray",
            ));
        }
        Ok(())
    }
}

/// The running source.
pub struct SyntheticSource {
    params: SyntheticParams,
    layout: ImageLayout,
    stream_id: Arc<str>,
    base: Vec<u8>,
    pool: BufferPool<u8>,
    sequence: u64,
    started: Option<Instant>,
    frame_interval: Duration,
    noise_state: u64,
}

impl SyntheticSource {
    /// Renders the base picture once; frames are copies of it with a moving square.
    pub fn new(params: SyntheticParams, node_id: &str) -> Result<Self, OpError> {
        params.validate()?;
        let layout = ImageLayout::packed(params.width, params.height, params.format);
        let base = render(params.pattern, layout);
        let stream_id: Arc<str> = params.stream_id.as_deref().unwrap_or(node_id).into();
        Ok(Self {
            frame_interval: Duration::from_secs_f64(1.0 / params.fps),
            params,
            layout,
            stream_id,
            base,
            pool: BufferPool::new(64),
            sequence: 0,
            started: None,
            noise_state: 0x9E37_79B9_7F4A_7C15,
        })
    }

    fn fill(&mut self, pixels: &mut [u8], captured: &CaptureTime) {
        match self.params.pattern {
            Pattern::Noise => {
                for chunk in pixels.chunks_mut(8) {
                    // xorshift64: cheap, deterministic.
                    self.noise_state ^= self.noise_state << 13;
                    self.noise_state ^= self.noise_state >> 7;
                    self.noise_state ^= self.noise_state << 17;
                    let bytes = self.noise_state.to_le_bytes();
                    chunk.copy_from_slice(&bytes[..chunk.len()]);
                }
            }
            _ => pixels.copy_from_slice(&self.base),
        }
        draw_moving_square(pixels, self.layout, self.sequence);
        if self.params.timestamp {
            draw_timestamp(pixels, self.layout, captured.unix_nanos / 1_000_000);
        }
    }
}

impl Source for SyntheticSource {
    fn next(&mut self, ctx: &SourceContext) -> Result<SourcePoll, OpError> {
        if self
            .params
            .frames
            .is_some_and(|total| self.sequence >= total)
        {
            return Ok(SourcePoll::EndOfStream);
        }
        if self.params.realtime {
            let started = *self.started.get_or_insert_with(Instant::now);
            let mut deadline = started + self.frame_interval.mul_f64(self.sequence as f64);
            let now = Instant::now();
            if now > deadline + self.frame_interval {
                // A camera does not catch up on frames it could not deliver: restart the schedule.
                self.started = Some(now - self.frame_interval.mul_f64(self.sequence as f64));
                deadline = now;
            }
            if !ctx.stop.sleep_until(deadline) {
                return Ok(SourcePoll::Pending);
            }
        }
        let captured = CaptureTime::now();
        let mut pixels = self.pool.get(self.layout.byte_len());
        self.fill(&mut pixels, &captured);
        let frame = Frame::new(
            pixels,
            self.layout,
            Arc::clone(&self.stream_id),
            self.sequence,
            captured,
        );
        self.sequence += 1;
        Ok(SourcePoll::Packet(Packet::from_frame(frame)))
    }
}

const BAR_COLOURS: [[u8; 3]; 8] = [
    [255, 255, 255],
    [255, 255, 0],
    [0, 255, 255],
    [0, 255, 0],
    [255, 0, 255],
    [255, 0, 0],
    [0, 0, 255],
    [0, 0, 0],
];

fn render(pattern: Pattern, layout: ImageLayout) -> Vec<u8> {
    let (width, height) = (layout.width as usize, layout.height as usize);
    let mut pixels = vec![0u8; layout.byte_len()];
    for y in 0..height {
        for x in 0..width {
            let rgb = match pattern {
                Pattern::Bars => BAR_COLOURS[x * 8 / width],
                Pattern::Gradient => [(x * 255 / width) as u8, (y * 255 / height) as u8, 128],
                Pattern::Checkerboard => {
                    let v = if (x / 32 + y / 32) % 2 == 0 { 235 } else { 16 };
                    [v, v, v]
                }
                Pattern::Noise => [0, 0, 0],
            };
            put_pixel(&mut pixels, layout, x, y, rgb);
        }
    }
    pixels
}

fn put_pixel(pixels: &mut [u8], layout: ImageLayout, x: usize, y: usize, rgb: [u8; 3]) {
    let offset = y * layout.stride + x * layout.format.channels();
    match layout.format {
        PixelFormat::Rgb => pixels[offset..offset + 3].copy_from_slice(&rgb),
        PixelFormat::Bgr => pixels[offset..offset + 3].copy_from_slice(&[rgb[2], rgb[1], rgb[0]]),
        PixelFormat::Gray | PixelFormat::I420 => {
            pixels[offset] =
                ((77 * rgb[0] as u32 + 150 * rgb[1] as u32 + 29 * rgb[2] as u32) >> 8) as u8
        }
    }
}

/// A grey square crossing the frame diagonally, one step per frame.
fn draw_moving_square(pixels: &mut [u8], layout: ImageLayout, sequence: u64) {
    let (width, height) = (layout.width as usize, layout.height as usize);
    let side = (width.min(height) / 8).max(2);
    let travel_x = (width - side) as u64;
    let travel_y = (height - side) as u64;
    let step = sequence * 4;
    let x0 = (step % (travel_x + 1)) as usize;
    let y0 = (step % (travel_y + 1)) as usize;
    let channels = layout.format.channels();
    for y in y0..y0 + side {
        let row = y * layout.stride;
        pixels[row + x0 * channels..row + (x0 + side) * channels].fill(128);
    }
}

/// The side of a timestamp block: as large as `2 * TIMESTAMP_BITS` blocks across the frame allow,
/// and at least 2 pixels.
pub fn timestamp_block(width: u32) -> usize {
    (width as usize / (2 * TIMESTAMP_BITS)).max(2)
}

/// Draws `millis` (modulo 2^40) as [`TIMESTAMP_BITS`] bit pairs along the top of the frame.
fn draw_timestamp(pixels: &mut [u8], layout: ImageLayout, millis: u128) {
    let block = timestamp_block(layout.width);
    let (width, height) = (layout.width as usize, layout.height as usize);
    for bit in 0..TIMESTAMP_BITS {
        let one = (millis >> (TIMESTAMP_BITS - 1 - bit)) & 1 == 1;
        for (half, white) in [(0, one), (1, !one)] {
            let x0 = (2 * bit + half) * block;
            let value = if white { 255 } else { 0 };
            for y in 0..block.min(height) {
                for x in x0..(x0 + block).min(width) {
                    put_pixel(pixels, layout, x, y, [value; 3]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(json: serde_json::Value) -> SyntheticParams {
        serde_json::from_value(json).expect("valid params")
    }

    #[test]
    fn produces_the_requested_count_then_ends() {
        let mut source = SyntheticSource::new(
            params(serde_json::json!({"width": 32, "height": 16, "frames": 3})),
            "cam",
        )
        .expect("builds");
        let ctx = SourceContext::detached("cam");
        let mut sequences = Vec::new();
        loop {
            match source.next(&ctx).expect("no error") {
                SourcePoll::Packet(packet) => {
                    assert_eq!(packet.frame.layout.byte_len(), 32 * 16 * 3);
                    assert_eq!(&*packet.frame.stream_id, "cam");
                    sequences.push(packet.frame.sequence);
                }
                SourcePoll::Pending => {}
                SourcePoll::EndOfStream => break,
            }
        }
        assert_eq!(sequences, vec![0, 1, 2]);
    }

    #[test]
    fn consecutive_frames_differ() {
        let mut source = SyntheticSource::new(
            params(serde_json::json!({"width": 64, "height": 64})),
            "cam",
        )
        .expect("builds");
        let ctx = SourceContext::detached("cam");
        let mut next = || match source.next(&ctx).expect("no error") {
            SourcePoll::Packet(packet) => packet.frame.pixels().to_vec(),
            _ => panic!("endless source ended"),
        };
        assert_ne!(next(), next());
    }

    #[test]
    fn timestamps_drawn_into_frames_read_back_as_their_capture_time() {
        for format in ["rgb", "gray"] {
            let mut source = SyntheticSource::new(
                params(serde_json::json!({"width": 320, "height": 96, "timestamp": true, "format": format})),
                "camera",
            )
            .expect("source");
            let frame = match source
                .next(&SourceContext::detached("camera"))
                .expect("a frame")
            {
                SourcePoll::Packet(packet) => packet.frame,
                _ => panic!("no frame"),
            };
            let layout = frame.layout;
            let block = timestamp_block(layout.width);
            let luma = |x: usize, y: usize| {
                frame.pixels()[y * layout.stride + x * layout.format.channels()]
            };
            let mut millis: u128 = 0;
            for bit in 0..TIMESTAMP_BITS {
                let centre = |half: usize| luma((2 * bit + half) * block + block / 2, block / 2);
                millis = (millis << 1) | u128::from(centre(0) > centre(1));
            }
            let captured = frame.capture.unix_nanos / 1_000_000;
            assert_eq!(millis, captured % (1 << TIMESTAMP_BITS), "{format}");
        }
    }
}
