//! EfficientNet-Lite0 (ImageNet weights, in the layout of the `efficientnet_pytorch` package) as
//! OpenVINO IR: BatchNorm folded (eps 1e-3), TensorFlow "SAME" padding, ReLU6, no squeeze-excite,
//! input normalisation `(255 x - 127) / 128` inside the graph. Outputs the stride-8 features
//! (after block 4, 40 channels), the stride-16 features (after block 10, 112 channels) and the 1000
//! ImageNet logits.

use super::Network;
use super::ir::{IrGraph, Output};
use super::layers::{BlockSpec, Weights, WeightsError, normalise, run_stages, same_tensorflow};

/// `(expansion, output channels, repeats, first stride)` per stage; kernel sizes come from the
/// depthwise weights.
const STAGES: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 40, 2, 2),
    (6, 80, 3, 2),
    (6, 112, 3, 1),
    (6, 192, 4, 2),
    (6, 320, 1, 1),
];

/// Block whose output is the stride-8 map.
const STRIDE_8_BLOCK: usize = 4;
/// Block whose output is the stride-16 map.
const STRIDE_16_BLOCK: usize = 10;

/// Builds the network in `graph` on `input`, RGB in [0, 1], `[batch, 3, height, width]`.
pub fn build(
    weights: &Weights,
    mut graph: IrGraph,
    input: Output,
) -> Result<Network, WeightsError> {
    let mut x = normalise(&mut graph, input, [255.0 / 128.0; 3], [-127.0 / 128.0; 3]);

    x = conv_bn_same(weights, &mut graph, x, "_conv_stem", "_bn0", 2)?;
    x = graph.clamp("stem/relu6", x, 0.0, 6.0);

    let stages = run_stages(
        &STAGES,
        0,
        32,
        x,
        [STRIDE_8_BLOCK, STRIDE_16_BLOCK],
        |x, spec| mobile_block(weights, &mut graph, x, spec),
    )?;
    let [stride_8, stride_16] = stages.taps;
    x = stages.last;
    x = conv_bn_same(weights, &mut graph, x, "_conv_head", "_bn1", 1)?;
    x = graph.clamp("head/relu6", x, 0.0, 6.0);
    let pooled = graph.global_average_pool("pool", x);
    let logits = weights.linear(&mut graph, pooled, "_fc")?;

    match (stride_8, stride_16) {
        (Some(features_s8), Some(features_s16)) => Ok(Network {
            graph,
            features_s8,
            features_s16,
            logits,
        }),
        _ => Err(WeightsError {
            checkpoint: weights.checkpoint.to_string(),
            message: "the network has fewer blocks than the feature taps need".into(),
        }),
    }
}

/// A convolution with BatchNorm and TensorFlow "SAME" padding for its kernel and stride.
fn conv_bn_same(
    weights: &Weights,
    graph: &mut IrGraph,
    input: Output,
    conv: &str,
    bn: &str,
    stride: usize,
) -> Result<Output, WeightsError> {
    let kernel = weights.get(&format!("{conv}.weight"), 4)?.shape[2];
    let shape = graph.shape(input);
    let pads = same_tensorflow(shape[2], shape[3], kernel, stride);
    weights.conv_bn(graph, input, conv, bn, stride, pads)
}

/// `_blocks.{index}`: optional 1x1 expansion, depthwise convolution, 1x1 projection, and the
/// skip connection when shapes allow.
fn mobile_block(
    weights: &Weights,
    graph: &mut IrGraph,
    input: Output,
    spec: BlockSpec,
) -> Result<Output, WeightsError> {
    let BlockSpec {
        index,
        expansion,
        stride,
        residual,
    } = spec;
    let prefix = format!("_blocks.{index}");
    let mut x = input;
    if expansion != 1 {
        x = conv_bn_same(
            weights,
            graph,
            x,
            &format!("{prefix}._expand_conv"),
            &format!("{prefix}._bn0"),
            1,
        )?;
        x = graph.clamp(&format!("{prefix}/expand_relu6"), x, 0.0, 6.0);
    }
    x = conv_bn_same(
        weights,
        graph,
        x,
        &format!("{prefix}._depthwise_conv"),
        &format!("{prefix}._bn1"),
        stride,
    )?;
    x = graph.clamp(&format!("{prefix}/depthwise_relu6"), x, 0.0, 6.0);
    x = conv_bn_same(
        weights,
        graph,
        x,
        &format!("{prefix}._project_conv"),
        &format!("{prefix}._bn2"),
        1,
    )?;
    if residual {
        x = graph.add(&format!("{prefix}/residual"), x, input);
    }
    Ok(x)
}
