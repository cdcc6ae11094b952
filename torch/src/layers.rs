//! The convolution layer the gradient-trained heads are built from (Reverse Distillation's
//! bottleneck and decoder, EfficientAD's patch networks and autoencoder): a convolution, an
//! optional BatchNorm and an optional ReLU, trained in tch and written into an OpenVINO IR by
//! the project's IR writer with the BatchNorm folded into the convolution's weights and bias.

use std::path::Path;

use tch::nn::{self, Module, ModuleT};
use tch::{Device, Tensor};

use inspectflow::backbone::ir::{Conv2d, IrGraph, Output, Reduction};

use super::TrainError;

/// BatchNorm's epsilon (tch's private config cannot be read back, so it is set here).
const BATCH_NORM_EPS: f64 = 1e-5;

/// The shape of a [`Conv`].
#[derive(Debug, Clone, Copy)]
pub struct ConvSpec {
    /// Input channels.
    pub input: i64,
    /// Output channels.
    pub output: i64,
    /// Square kernel side.
    pub kernel: i64,
    /// Stride in both directions.
    pub stride: i64,
    /// Zeros added on every side.
    pub padding: i64,
    /// BatchNorm after the convolution (which then has no bias).
    pub batch_norm: bool,
    /// ReLU at the end.
    pub relu: bool,
}

impl ConvSpec {
    /// A `kernel` x `kernel` convolution from `input` to `output` channels, stride 1, no
    /// padding, bias, no BatchNorm, no ReLU.
    pub fn new(input: i64, output: i64, kernel: i64) -> Self {
        Self {
            input,
            output,
            kernel,
            stride: 1,
            padding: 0,
            batch_norm: false,
            relu: false,
        }
    }

    /// With stride `stride`.
    pub fn stride(self, stride: i64) -> Self {
        Self { stride, ..self }
    }

    /// Padded by `padding` on every side.
    pub fn padding(self, padding: i64) -> Self {
        Self { padding, ..self }
    }

    /// Followed by BatchNorm.
    pub fn batch_norm(self) -> Self {
        Self {
            batch_norm: true,
            ..self
        }
    }

    /// Ending in ReLU.
    pub fn relu(self) -> Self {
        Self { relu: true, ..self }
    }
}

/// Convolution, optional BatchNorm, optional ReLU.
#[derive(Debug)]
pub struct Conv {
    spec: ConvSpec,
    conv: nn::Conv2D,
    batch_norm: Option<nn::BatchNorm>,
}

impl Conv {
    /// The layer's variables under `path` (`conv`, and `bn` with BatchNorm).
    pub fn new(path: &nn::Path, spec: ConvSpec) -> Self {
        let config = nn::ConvConfig {
            stride: spec.stride,
            padding: spec.padding,
            bias: !spec.batch_norm,
            ..Default::default()
        };
        Self {
            spec,
            conv: nn::conv2d(path / "conv", spec.input, spec.output, spec.kernel, config),
            batch_norm: spec.batch_norm.then(|| {
                let config = nn::BatchNormConfig {
                    eps: BATCH_NORM_EPS,
                    ..Default::default()
                };
                nn::batch_norm2d(path / "bn", spec.output, config)
            }),
        }
    }

    /// The layer on `x`; `train` uses batch statistics in BatchNorm.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = self.conv.forward(x);
        if let Some(batch_norm) = &self.batch_norm {
            y = batch_norm.forward_t(&y, train);
        }
        if self.spec.relu { y.relu() } else { y }
    }

    /// Writes the layer into `graph` on `input` as layers named `name/...`, BatchNorm folded
    /// into the convolution (its running statistics, as in evaluation).
    pub fn export(
        &self,
        graph: &mut IrGraph,
        name: &str,
        input: Output,
    ) -> Result<Output, TrainError> {
        let (weights, bias) = tch::no_grad(|| {
            let weights = self.conv.ws.to_device(Device::Cpu);
            let bias = match &self.conv.bs {
                Some(bias) => bias.to_device(Device::Cpu),
                None => Tensor::zeros([self.spec.output], (tch::Kind::Float, Device::Cpu)),
            };
            match &self.batch_norm {
                None => (weights, bias),
                Some(bn) => {
                    let cpu = |t: &Tensor| t.to_device(Device::Cpu);
                    let gamma = bn.ws.as_ref().map_or_else(|| bias.ones_like(), cpu);
                    let beta = bn.bs.as_ref().map_or_else(|| bias.zeros_like(), cpu);
                    let scale = gamma / (cpu(&bn.running_var) + BATCH_NORM_EPS).sqrt();
                    let folded_weights = &weights * scale.view([-1, 1, 1, 1]);
                    let folded_bias = beta + (bias - cpu(&bn.running_mean)) * &scale;
                    (folded_weights, folded_bias)
                }
            }
        });
        let values = |t: Tensor, what: &str| {
            Vec::<f32>::try_from(t.flatten(0, -1)).map_err(|e| format!("{name}: {what}: {e}"))
        };
        let weights = values(weights, "weights")?;
        let bias = values(bias, "bias")?;
        let ConvSpec {
            input: channels_in,
            output: channels_out,
            kernel,
            stride,
            padding,
            ..
        } = self.spec;
        let side = kernel as usize;
        let pad = padding as usize;
        let convolved = graph.convolution(
            name,
            input,
            &Conv2d {
                weight_shape: [channels_out as usize, channels_in as usize, side, side],
                weights: &weights,
                bias: &bias,
                stride: stride as usize,
                pads: [pad; 4],
                groups: 1,
            },
        );
        Ok(if self.spec.relu {
            graph.relu(&format!("{name}/relu"), convolved)
        } else {
            convolved
        })
    }
}

/// Added to a feature vector's length before dividing by it (an all-zero vector stays zero).
const NORM_EPS: f32 = 1e-6;

/// Each position's feature vector (axis 1 of `[n, c, h, w]`) divided by its length.
pub fn normalised(features: &Tensor) -> Tensor {
    let norm = features
        .pow_tensor_scalar(2)
        .sum_dim_intlist(1, true, tch::Kind::Float)
        .sqrt()
        + f64::from(NORM_EPS);
    features / norm
}

/// [`normalised`] as IR layers named `name/...` on `features` (`[1, c, h, w]`).
pub fn normalise_channels(graph: &mut IrGraph, name: &str, features: Output) -> Output {
    let shape = graph.shape(features).to_vec();
    let (height, width) = (shape[2], shape[3]);
    let eps = graph.constant_f32(&format!("{name}/eps"), &[1], &[NORM_EPS]);
    let squares = graph.multiply(&format!("{name}/squares"), features, features);
    let sum = graph.reduce(&format!("{name}/sum"), squares, &[1], Reduction::Sum);
    let sum = graph.reshape(&format!("{name}/keep"), sum, &[1, 1, height, width]);
    let norm = graph.sqrt(&format!("{name}/norm"), sum);
    let norm = graph.add(&format!("{name}/norm_eps"), norm, eps);
    graph.divide(&format!("{name}/normalised"), features, norm)
}

/// ImageNet's channel means and standard deviations, which every network here normalises its
/// RGB input in [0, 1] with.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// See [`IMAGENET_MEAN`].
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// `images` (`[n, 3, h, w]`, RGB in [0, 1]) normalised with ImageNet's statistics.
pub fn imagenet_normalised(images: &Tensor) -> Tensor {
    let device = images.device();
    let mean = Tensor::from_slice(&IMAGENET_MEAN)
        .to_device(device)
        .view([1, 3, 1, 1]);
    let std = Tensor::from_slice(&IMAGENET_STD)
        .to_device(device)
        .view([1, 3, 1, 1]);
    (images - mean) / std
}

/// [`imagenet_normalised`] as IR layers on `input`.
pub fn imagenet_normalise(graph: &mut IrGraph, name: &str, input: Output) -> Output {
    let mean = graph.constant_f32(&format!("{name}/mean"), &[1, 3, 1, 1], &IMAGENET_MEAN);
    let std = graph.constant_f32(&format!("{name}/std"), &[1, 3, 1, 1], &IMAGENET_STD);
    let centred = graph.subtract(&format!("{name}/centred"), input, mean);
    graph.divide(&format!("{name}/scaled"), centred, std)
}

/// Finishes a family's IR: `map` (`[1, 1, size, size]`) becomes the output `anomaly_map`, its
/// maximum the output `pred_score` (`[1]`), and the IR is written at `xml`.
pub fn write_scored(graph: &mut IrGraph, map: Output, xml: &Path) -> Result<(), TrainError> {
    let score = graph.reduce("pred_score_max", map, &[1, 2, 3], Reduction::Max);
    graph.result("anomaly_map", map);
    graph.result("pred_score", score);
    graph
        .write(xml)
        .map_err(|e| format!("writing {}: {e}", xml.display()))
}
