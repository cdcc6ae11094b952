//! `encode.jpeg`: JPEG-encodes the packet's overlay (or its frame when there is no overlay) with
//! libjpeg-turbo (SIMD), straight into a pooled buffer sized for the worst case, so encoding
//! allocates nothing per frame. Sinks and the live preview send the bytes as they are.

use std::sync::Arc;

use serde::Deserialize;
use turbojpeg::{Compressor, Image, Subsamp};

use crate::contract::{
    Emitter, OpError, OperatorInstance, OperatorKind, OutputType, PortType, Transform,
};
use crate::packet::{EncodedImage, Frame, ImageLayout, Packet, PixelFormat, YuvEncoding};
use crate::pool::BufferPool;
use crate::registry::{OperatorDescriptor, ParamError};
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

/// A JPEG quality must be 1 to 100; `field` names it in the error.
pub fn check_quality(field: &str, quality: u8) -> Result<(), ParamError> {
    if (1..=100).contains(&quality) {
        Ok(())
    } else {
        Err(ParamError::new(
            field,
            format!("must be 1 to 100, got {quality}"),
        ))
    }
}

impl EncodeParams {
    /// The rules the schema cannot express (kept here too for callers that build directly).
    pub fn validate(&self) -> Result<(), ParamError> {
        check_quality("quality", self.quality)
    }
}
fn default_source() -> EncodeSource {
    EncodeSource::Auto
}

/// The registry entry.
pub fn descriptor() -> OperatorDescriptor {
    OperatorDescriptor::builder::<EncodeParams>(
        "encode.jpeg",
        OperatorKind::Transform,
        "JPEG-encodes the overlay (or the frame) with libjpeg-turbo into a pooled buffer; I420 frames are compressed from YCbCr planes, without RGB in between.",
    )
    .input("in", PortType::Image)
    .output("out", OutputType::SameAsInput)
    .replicable()
    .validate(EncodeParams::validate)
    .build_with(|params, _context| {
        Ok(OperatorInstance::Transform(Box::new(JpegEncoder::new(
            params,
        )?)))
    })
}

/// libjpeg-turbo's compressor for images already in YCbCr planes (`tjCompressFromYUVPlanes`).
struct PlanesCompressor {
    handle: turbojpeg_sys::tjhandle,
    quality: i32,
}

// SAFETY: a TurboJPEG handle may move between threads; it is used by one thread at a time
// (`&mut self`).
unsafe impl Send for PlanesCompressor {}

impl PlanesCompressor {
    fn new(quality: i32) -> Result<Self, OpError> {
        // SAFETY: no arguments; a null handle is checked.
        let handle = unsafe { turbojpeg_sys::tjInitCompress() };
        if handle.is_null() {
            return Err(OpError::Failed("cannot start libjpeg-turbo".into()));
        }
        Ok(Self { handle, quality })
    }

    /// Compresses JPEG's own YCbCr (4:2:0 planes, full-range BT.601) of a `width` x `height`
    /// image into `output`, which must hold `tjBufSize` bytes; returns the JPEG's length.
    fn compress(
        &mut self,
        planes: &yuv::Planes,
        width: usize,
        height: usize,
        output: &mut [u8],
    ) -> Result<usize, OpError> {
        let chroma_len = planes.chroma_width * planes.chroma_height;
        if planes.matrix != yuv::JFIF
            || planes.y.len() < planes.y_stride * height
            || planes.u.len() < chroma_len
            || planes.v.len() < chroma_len
        {
            return Err(OpError::Failed(
                "YCbCr planes shorter than the image, or not JPEG's".into(),
            ));
        }
        let mut sources = [planes.y.as_ptr(), planes.u.as_ptr(), planes.v.as_ptr()];
        let strides = [
            planes.y_stride as i32,
            planes.chroma_width as i32,
            planes.chroma_width as i32,
        ];
        let mut destination = output.as_mut_ptr();
        let mut length = output.len() as std::ffi::c_ulong;
        // SAFETY: the planes cover the image (checked above); `output` is a live buffer of
        // `length` bytes that NOREALLOC forbids the library to replace or outgrow.
        let status = unsafe {
            turbojpeg_sys::tjCompressFromYUVPlanes(
                self.handle,
                sources.as_mut_ptr(),
                width as i32,
                strides.as_ptr(),
                height as i32,
                turbojpeg_sys::TJSAMP_TJSAMP_420 as i32,
                &mut destination,
                &mut length,
                self.quality,
                turbojpeg_sys::TJFLAG_NOREALLOC as i32,
            )
        };
        if status != 0 || destination != output.as_mut_ptr() {
            // SAFETY: the handle is live; the message is a NUL-terminated string it owns.
            let message = unsafe {
                std::ffi::CStr::from_ptr(turbojpeg_sys::tjGetErrorStr2(self.handle))
                    .to_string_lossy()
                    .into_owned()
            };
            return Err(OpError::Failed(format!("JPEG encoding: {message}")));
        }
        Ok(length as usize)
    }
}

impl Drop for PlanesCompressor {
    fn drop(&mut self) {
        // SAFETY: the handle came from tjInitCompress and is destroyed once.
        unsafe {
            turbojpeg_sys::tjDestroy(self.handle);
        }
    }
}

/// The running operator (also used directly by the command line).
pub struct JpegEncoder {
    compressor: Compressor,
    planes_compressor: PlanesCompressor,
    source: EncodeSource,
    pool: BufferPool<u8>,
    /// I420 frames converted to JPEG's YCbCr.
    ycbcr_pool: BufferPool<u8>,
}

impl JpegEncoder {
    /// A libjpeg-turbo compressor at `quality` with 4:2:0 chroma subsampling.
    pub fn new(params: EncodeParams) -> Result<Self, OpError> {
        params.validate()?;
        let mut compressor = Compressor::new()
            .map_err(|e| OpError::Failed(format!("cannot start libjpeg-turbo: {e}")))?;
        compressor.set_quality(i32::from(params.quality));
        compressor.set_subsamp(Subsamp::Sub2x2);
        Ok(Self {
            compressor,
            planes_compressor: PlanesCompressor::new(i32::from(params.quality))?,
            source: params.source,
            pool: BufferPool::new(32),
            ycbcr_pool: BufferPool::new(2),
        })
    }

    /// Encodes one frame. I420 frames are compressed from their planes: as they are when they
    /// already hold JPEG's YCbCr (heatmap overlays), after one pass of range and matrix
    /// conversion when they hold video's; never through RGB.
    pub fn encode(&mut self, frame: &Frame) -> Result<EncodedImage, OpError> {
        let layout = frame.layout;
        if let Some(planes) = yuv::Planes::of(frame) {
            let (width, height) = (layout.width as usize, layout.height as usize);
            let mut buffer = self.pool.get(self.worst_case_len(width, height)?);
            let len = if planes.matrix == yuv::JFIF {
                self.planes_compressor
                    .compress(&planes, width, height, &mut buffer)?
            } else {
                let jfif = ImageLayout::packed(layout.width, layout.height, PixelFormat::I420)
                    .with_yuv(YuvEncoding::Jpeg);
                let mut ycbcr = self.ycbcr_pool.get(jfif.byte_len());
                yuv::to_jfif_planes(&planes, width, height, &mut ycbcr);
                let converted = yuv::Planes::split(jfif, &ycbcr).ok_or_else(|| {
                    OpError::Failed("YCbCr buffer shorter than its layout".into())
                })?;
                self.planes_compressor
                    .compress(&converted, width, height, &mut buffer)?
            };
            return Ok(EncodedImage {
                format: "jpeg",
                buffer,
                len,
            });
        }
        let format = match layout.format {
            PixelFormat::Rgb => turbojpeg::PixelFormat::RGB,
            PixelFormat::Bgr => turbojpeg::PixelFormat::BGR,
            PixelFormat::Gray => turbojpeg::PixelFormat::GRAY,
            PixelFormat::I420 => {
                return Err(OpError::Failed("I420 frame shorter than its layout".into()));
            }
        };
        let (width, height) = (layout.width as usize, layout.height as usize);
        let mut buffer = self.pool.get(self.worst_case_len(width, height)?);
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

impl JpegEncoder {
    /// The largest JPEG a `width` x `height` image can give.
    fn worst_case_len(&self, width: usize, height: usize) -> Result<usize, OpError> {
        turbojpeg::compressed_buf_len(width, height, Subsamp::Sub2x2).map_err(|e| {
            OpError::UnsupportedInput(format!("cannot encode a {width}x{height} image: {e}"))
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

    #[test]
    fn i420_frames_are_encoded_from_their_planes_with_the_right_colours() {
        let pool = BufferPool::new(1);
        // 480 rows are BT.601, 720 rows BT.709, and overlays JPEG's own full-range BT.601: each
        // must decode to the colour the frame shows.
        for (height, encoding) in [
            (480u32, YuvEncoding::Video),
            (720, YuvEncoding::Video),
            (720, YuvEncoding::Jpeg),
        ] {
            for yuv in [
                [16, 128, 128],
                [235, 128, 128],
                [81, 90, 240],
                [145, 54, 34],
                [110, 160, 60],
            ] {
                let frame = crate::yuv::tests::uniform_i420_in(64, height, yuv, encoding);
                let expected = crate::yuv::matrix_of(&frame.layout).to_rgb(yuv[0], yuv[1], yuv[2]);
                let mut encoder = JpegEncoder::new(EncodeParams {
                    quality: 95,
                    source: EncodeSource::Auto,
                })
                .expect("starts");
                let encoded = encoder.encode(&frame).expect("encodes");
                let decoded = crate::decode::decode_rgb(encoded.bytes(), "encoded", &pool, 0)
                    .expect("decodes");
                assert_eq!((decoded.layout.width, decoded.layout.height), (64, height));
                let centre = decoded.pixels()[(height as usize / 2 * 64 + 32) * 3..][..3].to_vec();
                for (got, want) in centre.iter().zip(expected) {
                    assert!(
                        got.abs_diff(want) <= 3,
                        "{height} rows, {encoding:?} YUV {yuv:?}: decoded {centre:?}, expected {expected:?}"
                    );
                }
            }
        }
    }
}
