//! `encode.jpeg`: JPEG-encodes the packet's overlay (or its frame when there is no overlay) with
//! libjpeg-turbo (SIMD), straight into a pooled buffer sized for the worst case, so encoding
//! allocates nothing per frame. Sinks and the live preview send the bytes as they are.

use std::sync::Arc;

use serde::Deserialize;
use turbojpeg::{Compressor, Image, Subsamp};

use crate::contract::{
    Emitter, OpError, OperatorInstance, OperatorKind, OutputType, PortType, Transform,
};
use crate::packet::{EncodedImage, Frame, Packet, PixelFormat};
use crate::pool::BufferPool;
use crate::registry::OperatorDescriptor;
use crate::yuv;

/// Which image to encode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EncodeSource {
    /// The heatmap overlay when there is one, otherwise the frame.
    Auto,
    /// Always the original frame.
    Frame,
}

/// Parameters of `encode.jpeg`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EncodeParams {
    /// JPEG quality, 1-100.
    #[serde(default = "default_quality")]
    #[schemars(range(min = 1, max = 100))]
    pub quality: u8,
    /// Which image to encode.
    #[serde(default = "default_source")]
    pub source: EncodeSource,
}

fn default_quality() -> u8 {
    85
}
fn default_source() -> EncodeSource {
    EncodeSource::Auto
}

/// The registry entry.
pub fn descriptor() -> OperatorDescriptor {
    OperatorDescriptor::builder::<EncodeParams>(
        "encode.jpeg",
        OperatorKind::Transform,
        "JPEG-encodes the overlay (or the frame) with libjpeg-turbo into a pooled buffer.",
    )
    .input("in", PortType::Image)
    .output("out", OutputType::SameAsInput)
    .build_with(|params, _node_id| {
        Ok(OperatorInstance::Transform(Box::new(JpegEncoder::new(
            params,
        )?)))
    })
}

/// The running operator (also used directly by the command line).
pub struct JpegEncoder {
    compressor: Compressor,
    source: EncodeSource,
    pool: BufferPool<u8>,
    /// RGB conversions of I420 frames.
    rgb_pool: BufferPool<u8>,
}

impl JpegEncoder {
    /// A libjpeg-turbo compressor at `quality` with 4:2:0 chroma subsampling.
    pub fn new(params: EncodeParams) -> Result<Self, OpError> {
        if !(1..=100).contains(&params.quality) {
            return Err(OpError::param("quality", "must be between 1 and 100"));
        }
        let mut compressor = Compressor::new()
            .map_err(|e| OpError::Failed(format!("cannot start libjpeg-turbo: {e}")))?;
        compressor.set_quality(i32::from(params.quality));
        compressor.set_subsamp(Subsamp::Sub2x2);
        Ok(Self {
            compressor,
            source: params.source,
            pool: BufferPool::new(32),
            rgb_pool: BufferPool::new(2),
        })
    }

    /// Encodes one frame (I420 frames are converted to RGB first).
    pub fn encode(&mut self, frame: &Frame) -> Result<EncodedImage, OpError> {
        let converted;
        let frame = if frame.layout.format == PixelFormat::I420 {
            converted = yuv::to_rgb_frame(frame, &self.rgb_pool);
            &converted
        } else {
            frame
        };
        let layout = frame.layout;
        let format = match layout.format {
            PixelFormat::Rgb => turbojpeg::PixelFormat::RGB,
            PixelFormat::Bgr => turbojpeg::PixelFormat::BGR,
            PixelFormat::Gray => turbojpeg::PixelFormat::GRAY,
            PixelFormat::I420 => {
                return Err(OpError::Failed("I420 frame left unconverted".into()));
            }
        };
        let (width, height) = (layout.width as usize, layout.height as usize);
        let capacity =
            turbojpeg::compressed_buf_len(width, height, Subsamp::Sub2x2).map_err(|e| {
                OpError::UnsupportedInput(format!("cannot encode a {width}x{height} image: {e}"))
            })?;
        let mut buffer = self.pool.get(capacity);
        let image = Image {
            pixels: &frame.pixels()[..layout.byte_len()],
            width,
            pitch: layout.stride,
            height,
            format,
        };
        let len = self
            .compressor
            .compress_to_slice(image, &mut buffer)
            .map_err(|e| OpError::Failed(format!("JPEG encoding: {e}")))?;
        Ok(EncodedImage {
            format: "jpeg",
            buffer,
            len,
        })
    }
}

impl Transform for JpegEncoder {
    fn process(&mut self, mut packet: Packet, out: &mut Emitter) -> Result<(), OpError> {
        let encoded = match (&packet.overlay, self.source) {
            (Some(overlay), EncodeSource::Auto) => self.encode(overlay)?,
            _ => self.encode(&packet.frame)?,
        };
        packet.encoded = Some(Arc::new(encoded));
        out.emit(0, packet);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{CaptureTime, ImageLayout};

    #[test]
    fn encodes_a_frame_that_decodes_back_to_the_same_size() {
        let layout = ImageLayout::packed(64, 48, PixelFormat::Rgb);
        let pool = BufferPool::new(1);
        let mut pixels = pool.get(layout.byte_len());
        pixels
            .iter_mut()
            .enumerate()
            .for_each(|(i, p)| *p = (i % 251) as u8);
        let frame = Frame::new(pixels, layout, "t".into(), 0, CaptureTime::now());
        let mut encoder = JpegEncoder::new(EncodeParams {
            quality: 80,
            source: EncodeSource::Auto,
        })
        .expect("starts");
        let encoded = encoder.encode(&frame).expect("encodes");
        assert_eq!(
            &encoded.bytes()[..2],
            &[0xFF, 0xD8],
            "JPEG start-of-image marker"
        );
        let decoded =
            crate::decode::decode_rgb(encoded.bytes(), "encoded", &pool, 0).expect("decodes");
        assert_eq!((decoded.layout.width, decoded.layout.height), (64, 48));
    }
}
