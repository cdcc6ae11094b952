//! Turning checkpoint tensors into IR layers: looking parameters up by name (errors name the key),
//! folding BatchNorm into the preceding convolution, and the input normalisation that the IR does
//! itself (so that every backbone takes RGB in [0, 1]).

use std::collections::BTreeMap;

use super::ir::{Conv2d, IrGraph, Output, Pads};
use super::torch_legacy::CheckpointTensor;

/// A checkpoint did not hold what the network needs.
#[derive(Debug, thiserror::Error)]
#[error("checkpoint {checkpoint}: {message}")]
pub struct WeightsError {
    /// The checkpoint file.
    pub checkpoint: String,
    /// What was missing or wrong.
    pub message: String,
}

/// A state dict with lookups that fail with the key's name.
pub struct Weights<'a> {
    /// File name for errors.
    pub checkpoint: &'a str,
    /// Parameters by name.
    pub tensors: &'a BTreeMap<String, CheckpointTensor>,
    /// BatchNorm epsilon of the network.
    pub bn_eps: f32,
}

impl Weights<'_> {
    /// The tensor `key` with the expected rank.
    pub fn get(&self, key: &str, rank: usize) -> Result<&CheckpointTensor, WeightsError> {
        let tensor = self.tensors.get(key).ok_or_else(|| WeightsError {
            checkpoint: self.checkpoint.to_string(),
            message: format!("missing parameter '{key}'"),
        })?;
        if tensor.shape.len() != rank {
            return Err(WeightsError {
                checkpoint: self.checkpoint.to_string(),
                message: format!(
                    "parameter '{key}' has shape {:?}, expected rank {rank}",
                    tensor.shape
                ),
            });
        }
        Ok(tensor)
    }

    /// A convolution (no bias) followed by BatchNorm, folded into one convolution with bias:
    /// `w' = w * g / sqrt(v + eps)`, `b' = beta - mean * g / sqrt(v + eps)`.
    pub fn conv_bn(
        &self,
        graph: &mut IrGraph,
        input: Output,
        conv: &str,
        bn: &str,
        stride: usize,
        pads: Pads,
    ) -> Result<Output, WeightsError> {
        let weight = self.get(&format!("{conv}.weight"), 4)?;
        let gamma = self.get(&format!("{bn}.weight"), 1)?;
        let beta = self.get(&format!("{bn}.bias"), 1)?;
        let mean = self.get(&format!("{bn}.running_mean"), 1)?;
        let variance = self.get(&format!("{bn}.running_var"), 1)?;
        let out_channels = weight.shape[0];
        for (key, tensor) in [
            ("weight", gamma),
            ("bias", beta),
            ("running_mean", mean),
            ("running_var", variance),
        ] {
            if tensor.data.len() != out_channels {
                return Err(WeightsError {
                    checkpoint: self.checkpoint.to_string(),
                    message: format!(
                        "'{bn}.{key}' has {} values for {out_channels} channels",
                        tensor.data.len()
                    ),
                });
            }
        }
        let per_channel = weight.data.len() / out_channels;
        let mut folded = weight.data.clone();
        let mut bias = vec![0f32; out_channels];
        for c in 0..out_channels {
            let scale = gamma.data[c] / (variance.data[c] + self.bn_eps).sqrt();
            folded[c * per_channel..(c + 1) * per_channel]
                .iter_mut()
                .for_each(|w| *w *= scale);
            bias[c] = beta.data[c] - mean.data[c] * scale;
        }
        let in_channels = graph.shape(input)[1];
        let in_per_group = weight.shape[1];
        let groups = in_channels / in_per_group.max(1);
        let shape = [
            weight.shape[0],
            weight.shape[1],
            weight.shape[2],
            weight.shape[3],
        ];
        Ok(graph.convolution(
            conv,
            input,
            &Conv2d {
                weight_shape: shape,
                weights: &folded,
                bias: &bias,
                stride,
                pads,
                groups,
            },
        ))
    }

    /// A fully connected layer `key.weight [m, k]`, `key.bias [m]`.
    pub fn linear(
        &self,
        graph: &mut IrGraph,
        input: Output,
        key: &str,
    ) -> Result<Output, WeightsError> {
        let weight = self.get(&format!("{key}.weight"), 2)?;
        let bias = self.get(&format!("{key}.bias"), 1)?;
        Ok(graph.linear(key, input, &weight.data, &bias.data, weight.shape[0]))
    }
}

/// Where a block of a MobileNet-style stage table sits and how it is shaped.
#[derive(Debug, Clone, Copy)]
pub struct BlockSpec {
    /// Index in the checkpoint's block list.
    pub index: usize,
    /// Channel expansion of the block (1: no expansion convolution).
    pub expansion: usize,
    /// Stride of its depthwise convolution.
    pub stride: usize,
    /// Whether the skip connection applies (stride 1, same channels in and out).
    pub residual: bool,
}

/// Outputs of [`run_stages`]: the last block's and the two tapped blocks'.
pub struct StageOutputs {
    /// After the last block.
    pub last: Output,
    /// After the blocks named in `taps`, in that order.
    pub taps: [Option<Output>; 2],
}

/// Walks a stage table of `(expansion, out_channels, repeats, first_stride)`, numbering blocks
/// from `first_index`, and builds each block with `block`.
pub fn run_stages(
    stages: &[(usize, usize, usize, usize)],
    first_index: usize,
    in_channels: usize,
    input: Output,
    taps: [usize; 2],
    mut block: impl FnMut(Output, BlockSpec) -> Result<Output, WeightsError>,
) -> Result<StageOutputs, WeightsError> {
    let mut x = input;
    let mut index = first_index;
    let mut channels = in_channels;
    let mut tapped = [None, None];
    for &(expansion, out_channels, repeats, first_stride) in stages {
        for repeat in 0..repeats {
            let stride = if repeat == 0 { first_stride } else { 1 };
            let spec = BlockSpec {
                index,
                expansion,
                stride,
                residual: stride == 1 && channels == out_channels,
            };
            x = block(x, spec)?;
            channels = out_channels;
            for (slot, tap) in tapped.iter_mut().zip(taps) {
                if tap == index {
                    *slot = Some(x);
                }
            }
            index += 1;
        }
    }
    Ok(StageOutputs {
        last: x,
        taps: tapped,
    })
}

/// `x * scale + shift` per channel on an NCHW input, for normalisation inside the IR.
pub fn normalise(graph: &mut IrGraph, input: Output, scale: [f32; 3], shift: [f32; 3]) -> Output {
    let scale = graph.constant_f32("normalise/scale", &[1, 3, 1, 1], &scale);
    let shift = graph.constant_f32("normalise/shift", &[1, 3, 1, 1], &shift);
    let scaled = graph.multiply("normalise/multiply", input, scale);
    graph.add("normalise/add", scaled, shift)
}

/// Symmetric padding for a `kernel`-sized convolution (PyTorch's `padding = kernel / 2`).
pub fn same_symmetric(kernel: usize) -> Pads {
    let pad = kernel / 2;
    [pad, pad, pad, pad]
}

/// TensorFlow's "SAME" padding for an input of `height` x `width` (more padding at the bottom and
/// right when the total is odd).
pub fn same_tensorflow(height: usize, width: usize, kernel: usize, stride: usize) -> Pads {
    let total = |size: usize| {
        (size.div_ceil(stride).saturating_sub(1) * stride + kernel).saturating_sub(size)
    };
    let (vertical, horizontal) = (total(height), total(width));
    [
        vertical / 2,
        horizontal / 2,
        vertical - vertical / 2,
        horizontal - horizontal / 2,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensorflow_same_padding_matches_its_definition() {
        // 224 input, 3x3 stride 2: output 112, total padding 1 (bottom/right).
        assert_eq!(same_tensorflow(224, 224, 3, 2), [0, 0, 1, 1]);
        // 5x5 stride 2 on 28: total 3 -> 1 before, 2 after.
        assert_eq!(same_tensorflow(28, 28, 5, 2), [1, 1, 2, 2]);
        // Stride 1 keeps the size: total kernel - 1.
        assert_eq!(same_tensorflow(14, 14, 5, 1), [2, 2, 2, 2]);
    }

    #[test]
    fn batchnorm_folding_matches_conv_then_bn() {
        // One 1x1 conv channel with weight 2, BN gamma 3, beta 1, mean 4, var 8 (eps 1): for input
        // x, conv-then-BN gives 3 * (2x - 4) / 3 + 1 = 2x - 3.
        let mut tensors = BTreeMap::new();
        let put = |t: &mut BTreeMap<String, CheckpointTensor>,
                   k: &str,
                   shape: Vec<usize>,
                   data: Vec<f32>| {
            t.insert(k.to_string(), CheckpointTensor { shape, data });
        };
        put(&mut tensors, "c.weight", vec![1, 1, 1, 1], vec![2.0]);
        put(&mut tensors, "b.weight", vec![1], vec![3.0]);
        put(&mut tensors, "b.bias", vec![1], vec![1.0]);
        put(&mut tensors, "b.running_mean", vec![1], vec![4.0]);
        put(&mut tensors, "b.running_var", vec![1], vec![8.0]);
        let weights = Weights {
            checkpoint: "test",
            tensors: &tensors,
            bn_eps: 1.0,
        };
        let mut graph = IrGraph::new("t");
        let input = graph.parameter("x", &[1, 1, 2, 2]);
        weights
            .conv_bn(&mut graph, input, "c", "b", 1, [0; 4])
            .expect("folds");
        // The folded weight (2 * 3 / 3 = 2) and bias (1 - 4 * 1 = -3) are in the weights file.
        let values: Vec<f32> = graph
            .weights()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .filter(|v| *v != 0.0)
            .collect();
        assert_eq!(values, vec![2.0, -3.0]);
    }

    #[test]
    fn a_missing_parameter_is_named() {
        let tensors = BTreeMap::new();
        let weights = Weights {
            checkpoint: "net.pth",
            tensors: &tensors,
            bn_eps: 1e-5,
        };
        let error = weights.get("features.0.0.weight", 4).expect_err("missing");
        assert_eq!(
            error.to_string(),
            "checkpoint net.pth: missing parameter 'features.0.0.weight'"
        );
    }
}
