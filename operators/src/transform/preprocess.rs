//! `preprocess`: frame to model input. A SIMD resize (fast_image_resize: AVX2/SSE4.1/NEON chosen at
//! run time) on 8-bit pixels into a pooled buffer, which becomes the packet's [`Tensor`] with the
//! tables of its colour conversion and normalisation (NCHW by default); the model's operator
//! applies them as it writes its input. The frame stays on the packet for later operators.
//!
//! I420 frames from video sources are never converted at full size: the Y, U and V planes are
//! each resized to the tensor size and only those pixels are converted to RGB.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use serde::Deserialize;

use crate::contract::{
    Emitter, OpError, OperatorInstance, OperatorKind, OutputType, PortType, Transform,
};
use std::sync::Arc;

use crate::packet::{Frame, Packet, PixelFormat};
use crate::pool::{BufferPool, PooledBuffer};
use crate::registry::{OperatorDescriptor, ParamError};
use crate::tensor::{ChannelSource, Normalisation, Tensor, TensorLayout};
use crate::yuv;

/// Resampling method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMethod {
    /// Nearest neighbour: fastest, aliased.
    Nearest,
    /// Bilinear without anti-aliasing (OpenCV's INTER_LINEAR).
    Bilinear,
    /// Area-weighted bilinear convolution (anti-aliased, like PIL's and torchvision's antialias=True).
    BilinearAntialias,
}

/// Parameters of `preprocess`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PreprocessParams {
    /// Tensor width in pixels.
    #[schemars(range(min = 1, max = 8192))]
    pub width: u32,
    /// Tensor height in pixels.
    #[schemars(range(min = 1, max = 8192))]
    pub height: u32,
    /// Resampling method.
    #[serde(default = "default_resize")]
    pub resize: ResizeMethod,
    /// Channel order of the tensor (the frame is converted to it).
    #[serde(default = "default_color")]
    pub color: PixelFormat,
    /// Multiplier applied to 0-255 pixel values before mean and std.
    #[serde(default = "default_scale")]
    pub scale: f32,
    /// Per-channel mean subtracted after scaling (in tensor channel order).
    #[serde(default = "default_mean")]
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by after the mean.
    #[serde(default = "default_std")]
    pub std: [f32; 3],
    /// Memory layout of the tensor.
    #[serde(default = "default_layout")]
    pub layout: TensorLayout,
}

impl PreprocessParams {
    /// The rules the schema cannot express: a usable `std`, a tensor colour order.
    pub fn validate(&self) -> Result<(), ParamError> {
        if let Some(index) = self.std.iter().position(|s| *s == 0.0 || !s.is_finite()) {
            return Err(ParamError::new(
                format!("std[{index}]"),
                format!("must be a finite non-zero number, got {}", self.std[index]),
            ));
        }
        if self.color == PixelFormat::I420 {
            return Err(ParamError::new("color", "a tensor is rgb, bgr or gray"));
        }
        Ok(())
    }
}

fn default_resize() -> ResizeMethod {
    ResizeMethod::Bilinear
}
fn default_color() -> PixelFormat {
    PixelFormat::Rgb
}
fn default_scale() -> f32 {
    1.0 / 255.0
}
fn default_mean() -> [f32; 3] {
    [0.0; 3]
}
fn default_std() -> [f32; 3] {
    [1.0; 3]
}
fn default_layout() -> TensorLayout {
    TensorLayout::Nchw
}

/// The registry entry.
pub fn descriptor() -> OperatorDescriptor {
    OperatorDescriptor::builder::<PreprocessParams>(
        "preprocess",
        OperatorKind::Transform,
        "SIMD resize (nearest, bilinear, anti-aliased bilinear), colour conversion (rgb, bgr, gray) and normalisation (scale, mean, std) of a frame into a model input tensor: resized 8-bit pixels from a pool, written as f32 NCHW or NHWC values straight into the model's request.",
    )
    .input("in", PortType::Image)
    .output("out", OutputType::Fixed(PortType::Tensor))
    .replicable()
    .validate(PreprocessParams::validate)
    .build_with(|params, _context| {
        Ok(OperatorInstance::Transform(Box::new(Preprocess::new(
            params,
        )?)))
    })
}

/// The running operator.
pub struct Preprocess {
    params: PreprocessParams,
    resizer: Resizer,
    options: ResizeOptions,
    /// Y, U and V planes resized to the tensor size (I420 frames only).
    resized_planes: [Vec<u8>; 3],
    /// `tables[c][v]`: normalised value of byte `v` in tensor channel `c`.
    tables: Vec<[f32; 256]>,
    /// Per pixel format of the resized pixels, how they become the tensor (made on first use).
    normalisations: Vec<(PixelFormat, Arc<Normalisation>)>,
    /// The tensors' resized pixels.
    pool: BufferPool<u8>,
}

impl Preprocess {
    /// Checks the parameters and precomputes the normalisation tables.
    pub fn new(params: PreprocessParams) -> Result<Self, OpError> {
        params.validate()?;
        let channels = params.color.channels();
        let tables = (0..channels)
            .map(|c| {
                let mut table = [0f32; 256];
                for (value, slot) in table.iter_mut().enumerate() {
                    *slot = (value as f32 * params.scale - params.mean[c]) / params.std[c];
                }
                table
            })
            .collect();
        let algorithm = match params.resize {
            ResizeMethod::Nearest => ResizeAlg::Nearest,
            ResizeMethod::Bilinear => ResizeAlg::Interpolation(FilterType::Bilinear),
            ResizeMethod::BilinearAntialias => ResizeAlg::Convolution(FilterType::Bilinear),
        };
        Ok(Self {
            params,
            resizer: Resizer::new(),
            options: ResizeOptions::new().resize_alg(algorithm),
            resized_planes: Default::default(),
            tables,
            normalisations: Vec::new(),
            pool: BufferPool::new(64),
        })
    }

    /// Makes the tensor for one frame.
    pub fn tensor_for(&mut self, frame: &Frame) -> Result<Tensor, OpError> {
        let (width, height) = (self.params.width, self.params.height);
        let plane = width as usize * height as usize;
        if frame.layout.format == PixelFormat::I420 {
            let mut pixels = self.pool.get(plane * 3);
            self.resize_i420(frame, &mut pixels)?;
            return Ok(self.tensor(PixelFormat::Rgb, pixels));
        }
        let layout = frame.layout;
        let source_channels = layout.format.channels();
        if layout.stride != layout.width as usize * source_channels {
            return Err(OpError::UnsupportedInput(format!(
                "frame rows are padded (stride {} for width {}); preprocess needs packed rows",
                layout.stride, layout.width
            )));
        }
        let pixel_type = match layout.format {
            PixelFormat::Gray | PixelFormat::I420 => PixelType::U8,
            PixelFormat::Rgb | PixelFormat::Bgr => PixelType::U8x3,
        };
        let mut pixels = self.pool.get(plane * source_channels);
        let frame_pixels = &frame.pixels()[..layout.byte_len()];
        if layout.width == width && layout.height == height {
            pixels.copy_from_slice(frame_pixels);
        } else {
            let source = ImageRef::new(layout.width, layout.height, frame_pixels, pixel_type)
                .map_err(|e| OpError::UnsupportedInput(format!("frame buffer: {e}")))?;
            let mut target = Image::from_slice_u8(width, height, &mut pixels, pixel_type)
                .map_err(|e| OpError::Failed(format!("resize buffer: {e}")))?;
            self.resizer
                .resize(&source, &mut target, &self.options)
                .map_err(|e| OpError::Failed(format!("resize: {e}")))?;
        }
        Ok(self.tensor(layout.format, pixels))
    }

    /// Resizes the three planes of an I420 frame to the tensor size and converts them into
    /// `rgb`.
    fn resize_i420(&mut self, frame: &Frame, rgb: &mut [u8]) -> Result<(), OpError> {
        let planes = yuv::Planes::of(frame).ok_or_else(|| {
            OpError::UnsupportedInput("I420 frame buffer shorter than its layout".into())
        })?;
        let (width, height) = (self.params.width, self.params.height);
        let target_len = width as usize * height as usize;
        let (luma_width, luma_height) = (frame.layout.width, frame.layout.height);
        let sources = [
            (planes.y, planes.y_stride, luma_width, luma_height),
            (
                planes.u,
                planes.chroma_width,
                planes.chroma_width as u32,
                planes.chroma_height as u32,
            ),
            (
                planes.v,
                planes.chroma_width,
                planes.chroma_width as u32,
                planes.chroma_height as u32,
            ),
        ];
        for ((plane, stride, plane_width, plane_height), target) in
            sources.into_iter().zip(&mut self.resized_planes)
        {
            if stride != plane_width as usize {
                return Err(OpError::UnsupportedInput(format!(
                    "I420 rows are padded (stride {stride} for width {plane_width}); preprocess needs packed rows"
                )));
            }
            target.resize(target_len, 0);
            let source = ImageRef::new(plane_width, plane_height, plane, PixelType::U8)
                .map_err(|e| OpError::UnsupportedInput(format!("frame plane: {e}")))?;
            let mut resized = Image::from_slice_u8(width, height, target, PixelType::U8)
                .map_err(|e| OpError::Failed(format!("resize buffer: {e}")))?;
            self.resizer
                .resize(&source, &mut resized, &self.options)
                .map_err(|e| OpError::Failed(format!("resize: {e}")))?;
        }
        let [y, u, v] = &self.resized_planes;
        yuv::full_planes_to_rgb(&planes.matrix, y, u, v, rgb);
        Ok(())
    }

    /// Tensor-sized `pixels` of format `format` as the tensor, with the tables that normalise
    /// them.
    fn tensor(&mut self, format: PixelFormat, pixels: PooledBuffer<u8>) -> Tensor {
        let normalisation = match self.normalisations.iter().find(|(f, _)| *f == format) {
            Some((_, normalisation)) => Arc::clone(normalisation),
            None => {
                let normalisation = Arc::new(Normalisation {
                    pixel_bytes: format.channels(),
                    sources: channel_sources(format, self.params.color),
                    tables: self.tables.clone(),
                    layout: self.params.layout,
                });
                self.normalisations
                    .push((format, Arc::clone(&normalisation)));
                normalisation
            }
        };
        let shape = [
            1,
            normalisation.sources.len(),
            self.params.height as usize,
            self.params.width as usize,
        ];
        Tensor::new(pixels, shape, normalisation)
    }
}

/// Where each tensor channel's value comes from in a pixel of format `from`.
fn channel_sources(from: PixelFormat, to: PixelFormat) -> Vec<ChannelSource> {
    use ChannelSource::{Channel, Luma};
    match (from, to) {
        (PixelFormat::Rgb, PixelFormat::Rgb) | (PixelFormat::Bgr, PixelFormat::Bgr) => {
            vec![Channel(0), Channel(1), Channel(2)]
        }
        (PixelFormat::Rgb, PixelFormat::Bgr) | (PixelFormat::Bgr, PixelFormat::Rgb) => {
            vec![Channel(2), Channel(1), Channel(0)]
        }
        // An I420 source here is its luma plane; `new` refuses an I420 tensor.
        (PixelFormat::Gray | PixelFormat::I420, PixelFormat::Gray | PixelFormat::I420) => {
            vec![Channel(0)]
        }
        (PixelFormat::Gray | PixelFormat::I420, PixelFormat::Rgb | PixelFormat::Bgr) => {
            vec![Channel(0); 3]
        }
        (PixelFormat::Rgb | PixelFormat::Bgr, PixelFormat::I420) => vec![Channel(0)],
        (PixelFormat::Rgb, PixelFormat::Gray) => vec![Luma {
            red: 0,
            green: 1,
            blue: 2,
        }],
        (PixelFormat::Bgr, PixelFormat::Gray) => vec![Luma {
            red: 2,
            green: 1,
            blue: 0,
        }],
    }
}

impl Transform for Preprocess {
    fn process(&mut self, mut packet: Packet, out: &mut Emitter) -> Result<(), OpError> {
        packet.tensor = Some(self.tensor_for(&packet.frame)?);
        out.emit(0, packet);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{CaptureTime, ImageLayout};

    fn frame(
        width: u32,
        height: u32,
        format: PixelFormat,
        fill: impl Fn(usize, usize, usize) -> u8,
    ) -> Frame {
        let layout = ImageLayout::packed(width, height, format);
        let pool = BufferPool::new(1);
        let mut pixels = pool.get(layout.byte_len());
        let channels = format.channels();
        for y in 0..height as usize {
            for x in 0..width as usize {
                for c in 0..channels {
                    pixels[(y * width as usize + x) * channels + c] = fill(x, y, c);
                }
            }
        }
        Frame::new(pixels, layout, "test".into(), 0, CaptureTime::now())
    }

    fn params(json: serde_json::Value) -> PreprocessParams {
        serde_json::from_value(json).expect("valid params")
    }

    #[test]
    fn normalises_with_mean_and_std_in_nchw_order() {
        // A uniform RGB frame (10, 20, 30) resized to 4x4.
        let input = frame(16, 8, PixelFormat::Rgb, |_, _, c| [10, 20, 30][c]);
        let mut op = Preprocess::new(params(serde_json::json!({
            "width": 4, "height": 4, "scale": 1.0, "mean": [10.0, 0.0, 0.0], "std": [1.0, 2.0, 3.0]
        })))
        .expect("builds");
        let tensor = op.tensor_for(&input).expect("runs");
        assert_eq!(tensor.shape, [1, 3, 4, 4]);
        let data = tensor.to_vec();
        assert!(data[..16].iter().all(|v| *v == 0.0));
        assert!(data[16..32].iter().all(|v| *v == 10.0));
        assert!(data[32..].iter().all(|v| *v == 10.0));
    }

    #[test]
    fn i420_frames_become_the_same_tensor_as_their_rgb_conversion() {
        // Limited-range BT.601 red (81, 90, 240), resized from 64x48 to 8x8.
        let i420 = crate::yuv::tests::uniform_i420(64, 48, [81, 90, 240]);
        let rgb = crate::yuv::to_rgb_frame(&i420, &BufferPool::new(1));
        let mut op =
            Preprocess::new(params(serde_json::json!({"width": 8, "height": 8}))).expect("builds");
        let from_i420 = op.tensor_for(&i420).expect("runs");
        let from_rgb = op.tensor_for(&rgb).expect("runs");
        assert_eq!(from_i420.shape, [1, 3, 8, 8]);
        let values = from_i420.to_vec();
        assert_eq!(values, from_rgb.to_vec());
        assert!(values[0] > 0.95, "red channel is high");
        assert!(values[64] < 0.05, "green channel is low");
    }

    #[test]
    fn an_i420_tensor_is_refused() {
        let error = Preprocess::new(params(
            serde_json::json!({"width": 8, "height": 8, "color": "i420"}),
        ))
        .err()
        .expect("refused");
        assert!(error.to_string().contains("color"), "{error}");
    }

    #[test]
    fn converts_bgr_frames_to_rgb_tensors_and_supports_nhwc() {
        let input = frame(2, 2, PixelFormat::Bgr, |_, _, c| [1, 2, 3][c]);
        let mut op = Preprocess::new(params(serde_json::json!({
            "width": 2, "height": 2, "scale": 1.0, "color": "rgb", "layout": "nhwc"
        })))
        .expect("builds");
        let tensor = op.tensor_for(&input).expect("runs");
        assert_eq!(&tensor.to_vec()[..6], &[3.0, 2.0, 1.0, 3.0, 2.0, 1.0]);
    }

    #[test]
    fn downscales_a_left_right_split_image() {
        // Left half black, right half white: after resizing to 8 wide, the outer columns keep
        // their values.
        let input = frame(
            64,
            32,
            PixelFormat::Gray,
            |x, _, _| if x < 32 { 0 } else { 255 },
        );
        let mut op = Preprocess::new(params(
            serde_json::json!({"width": 8, "height": 4, "color": "gray"}),
        ))
        .expect("builds");
        let tensor = op.tensor_for(&input).expect("runs");
        assert_eq!(tensor.shape, [1, 1, 4, 8]);
        let values = tensor.to_vec();
        let row = &values[..8];
        assert_eq!(row[0], 0.0);
        assert_eq!(row[7], 1.0);
    }

    #[test]
    fn rejects_a_zero_std() {
        let error = Preprocess::new(params(
            serde_json::json!({"width": 4, "height": 4, "std": [1.0, 0.0, 1.0]}),
        ))
        .err()
        .expect("must fail");
        assert!(error.to_string().contains("std[1]"), "{error}");
    }
}
