//! Model input tensors, kept as tensor-sized 8-bit pixels until a model takes them.
//!
//! `preprocess` resizes a frame to the model's input size; what remains is a table lookup per
//! value (colour channel, scale, mean, std). A [`Tensor`] holds those resized pixels (a quarter
//! of the bytes of f32 values: 196 KB at 256x256 RGB instead of 786 KB) with the tables, and the
//! model's operator writes the f32 values straight into its request's own input buffer
//! ([`Tensor::write_to`]): no f32 tensor is kept between the two, and none is copied.

use std::sync::Arc;

use crate::pool::PooledBuffer;

/// Memory layout of a model input tensor.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum TensorLayout {
    /// Batch, channels, height, width (OpenVINO's and PyTorch's default).
    Nchw,
    /// Batch, height, width, channels.
    Nhwc,
}

/// Where a tensor channel's value comes from in a pixel.
#[derive(Debug, Clone, Copy)]
pub enum ChannelSource {
    /// Byte `n` of each pixel.
    Channel(usize),
    /// Luminance of a 3-channel pixel (ITU-R BT.601 weights).
    Luma {
        /// Byte of the red value.
        red: usize,
        /// Byte of the green value.
        green: usize,
        /// Byte of the blue value.
        blue: usize,
    },
}

/// How tensor-sized pixels become a model's f32 input: per tensor channel, the byte (or luma)
/// it reads and the table mapping that byte to its normalised value. Made once per operator.
pub struct Normalisation {
    /// Bytes per pixel of the pixels.
    pub pixel_bytes: usize,
    /// Per tensor channel, where its value comes from.
    pub sources: Vec<ChannelSource>,
    /// Per tensor channel, `table[c][v]`: the value of byte `v`.
    pub tables: Vec<[f32; 256]>,
    /// Memory order of the values.
    pub layout: TensorLayout,
}

/// A model input of shape `[batch, channels, height, width]` (in logical order whatever the
/// memory layout): tensor-sized pixels from a pool and the [`Normalisation`] that turns them into
/// f32 values. Cloning shares both.
#[derive(Clone)]
pub struct Tensor {
    /// `[batch, channels, height, width]`.
    pub shape: [usize; 4],
    pixels: Arc<PooledBuffer<u8>>,
    normalisation: Arc<Normalisation>,
}

impl Tensor {
    /// `pixels` (height x width pixels of `normalisation.pixel_bytes` bytes) as a tensor of
    /// `shape`.
    pub fn new(
        pixels: PooledBuffer<u8>,
        shape: [usize; 4],
        normalisation: Arc<Normalisation>,
    ) -> Self {
        debug_assert_eq!(shape[1], normalisation.sources.len());
        debug_assert!(pixels.len() >= shape[2] * shape[3] * normalisation.pixel_bytes);
        Self {
            shape,
            pixels: Arc::new(pixels),
            normalisation,
        }
    }

    /// How the values lie in memory.
    pub fn layout(&self) -> TensorLayout {
        self.normalisation.layout
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the f32 values, in memory order, into `out` (exactly [`Tensor::len`] long: a
    /// model request's own input buffer).
    pub fn write_to(&self, out: &mut [f32]) {
        debug_assert_eq!(out.len(), self.len());
        let plane = self.shape[2] * self.shape[3];
        let channels = self.normalisation.sources.len();
        let pixels = &self.pixels[..plane * self.normalisation.pixel_bytes];
        for (c, (&source, table)) in self
            .normalisation
            .sources
            .iter()
            .zip(&self.normalisation.tables)
            .enumerate()
        {
            match self.normalisation.layout {
                TensorLayout::Nchw => fill_channel(
                    &mut out[c * plane..(c + 1) * plane],
                    1,
                    pixels,
                    self.normalisation.pixel_bytes,
                    source,
                    table,
                ),
                TensorLayout::Nhwc => fill_channel(
                    &mut out[c..],
                    channels,
                    pixels,
                    self.normalisation.pixel_bytes,
                    source,
                    table,
                ),
            }
        }
    }

    /// The f32 values in a new vector (tools and tests; pipelines use [`Tensor::write_to`]).
    pub fn to_vec(&self) -> Vec<f32> {
        let mut values = vec![0.0; self.len()];
        self.write_to(&mut values);
        values
    }
}

/// Writes one tensor channel: `out[i * step]` for every pixel `i`.
fn fill_channel(
    out: &mut [f32],
    step: usize,
    pixels: &[u8],
    pixel_bytes: usize,
    source: ChannelSource,
    table: &[f32; 256],
) {
    let targets = out.iter_mut().step_by(step);
    let pixels = pixels.chunks_exact(pixel_bytes);
    match source {
        ChannelSource::Channel(index) => {
            for (slot, pixel) in targets.zip(pixels) {
                *slot = table[pixel[index] as usize];
            }
        }
        ChannelSource::Luma { red, green, blue } => {
            for (slot, pixel) in targets.zip(pixels) {
                let luma =
                    (77 * pixel[red] as u32 + 150 * pixel[green] as u32 + 29 * pixel[blue] as u32)
                        >> 8;
                *slot = table[luma as usize];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::BufferPool;

    /// Two RGB pixels, pure red then pure white, as a `channels`-channel tensor of `layout`
    /// whose tables map byte `v` to `v`.
    fn two_pixels(sources: Vec<ChannelSource>, layout: TensorLayout) -> Tensor {
        let pool = BufferPool::new(1);
        let mut pixels = pool.get(6);
        pixels.copy_from_slice(&[255, 0, 0, 255, 255, 255]);
        let identity: [f32; 256] = std::array::from_fn(|v| v as f32);
        let channels = sources.len();
        let normalisation = Normalisation {
            pixel_bytes: 3,
            tables: vec![identity; channels],
            sources,
            layout,
        };
        Tensor::new(pixels, [1, channels, 1, 2], Arc::new(normalisation))
    }

    #[test]
    fn channels_are_planes_in_nchw_and_interleaved_in_nhwc() {
        let swapped = || {
            vec![
                ChannelSource::Channel(2),
                ChannelSource::Channel(1),
                ChannelSource::Channel(0),
            ]
        };
        let planar = two_pixels(swapped(), TensorLayout::Nchw);
        assert_eq!(planar.to_vec(), [0.0, 255.0, 0.0, 255.0, 255.0, 255.0]);
        let interleaved = two_pixels(swapped(), TensorLayout::Nhwc);
        assert_eq!(interleaved.to_vec(), [0.0, 0.0, 255.0, 255.0, 255.0, 255.0]);
        assert_eq!(interleaved.layout(), TensorLayout::Nhwc);
        assert_eq!(interleaved.len(), 6);
    }

    #[test]
    fn luma_weighs_red_green_and_blue_as_bt601() {
        let luma = ChannelSource::Luma {
            red: 0,
            green: 1,
            blue: 2,
        };
        let gray = two_pixels(vec![luma], TensorLayout::Nchw);
        // Red alone: 77 / 256 of full scale; white: all of it.
        assert_eq!(gray.to_vec(), [((77 * 255) >> 8) as f32, 255.0]);
    }
}
