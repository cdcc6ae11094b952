//! torchvision's MobileNetV2 (ImageNet weights) as OpenVINO IR: BatchNorm folded into the
//! convolutions (eps 1e-5), ImageNet mean/std normalisation inside the graph, outputs the stride-8
//! features (after `features.6`, 32 channels), the stride-16 features (after `features.13`, 96
//! channels) and the 1000 ImageNet logits.

use super::Network;
use super::ir::{IrGraph, Output};
use super::layers::{BlockSpec, Weights, WeightsError, normalise, run_stages, same_symmetric};

/// `(expansion, output channels, repeats, first stride)` per stage, as in the paper.
const STAGES: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

/// Index in `features` whose output is the stride-8 map.
const STRIDE_8_BLOCK: usize = 6;
/// Index in `features` whose output is the stride-16 map.
const STRIDE_16_BLOCK: usize = 13;

/// Builds the network in `graph` on `input`, RGB in [0, 1], `[batch, 3, height, width]`.
pub fn build(
    weights: &Weights,
    mut graph: IrGraph,
    input: Output,
) -> Result<Network, WeightsError> {
    let stages = stages(weights, &mut graph, input, &STAGES)?;
    let [stride_8, stride_16] = stages.taps;
    let mut x = stages.last;
    x = weights.conv_bn(&mut graph, x, "features.18.0", "features.18.1", 1, [0; 4])?;
    x = graph.clamp("features.18/relu6", x, 0.0, 6.0);
    let pooled = graph.global_average_pool("pool", x);
    let logits = weights.linear(&mut graph, pooled, "classifier.1")?;

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

/// The feature layers only, `features.0` to `features.13` (all a student of this architecture
/// has): the stride-8 and stride-16 maps of RGB in [0, 1].
pub fn feature_taps(
    weights: &Weights,
    graph: &mut IrGraph,
    input: Output,
) -> Result<(Output, Output), WeightsError> {
    // The stages up to the 96-channel one end with block 13.
    let stages = stages(weights, graph, input, &STAGES[..5])?;
    match stages.taps {
        [Some(stride_8), Some(stride_16)] => Ok((stride_8, stride_16)),
        _ => Err(WeightsError {
            checkpoint: weights.checkpoint.to_string(),
            message: "the network has fewer blocks than the feature taps need".into(),
        }),
    }
}

/// Normalisation, the stem and the inverted residual blocks of `table`.
fn stages(
    weights: &Weights,
    graph: &mut IrGraph,
    input: Output,
    table: &[(usize, usize, usize, usize)],
) -> Result<super::layers::StageOutputs, WeightsError> {
    let (mean, std) = ([0.485f32, 0.456, 0.406], [0.229f32, 0.224, 0.225]);
    let scale = [1.0 / std[0], 1.0 / std[1], 1.0 / std[2]];
    let shift = [-mean[0] / std[0], -mean[1] / std[1], -mean[2] / std[2]];
    let mut x = normalise(graph, input, scale, shift);
    x = weights.conv_bn(
        graph,
        x,
        "features.0.0",
        "features.0.1",
        2,
        same_symmetric(3),
    )?;
    x = graph.clamp("features.0/relu6", x, 0.0, 6.0);
    run_stages(
        table,
        1,
        32,
        x,
        [STRIDE_8_BLOCK, STRIDE_16_BLOCK],
        |x, spec| inverted_residual(weights, graph, x, spec),
    )
}

/// One inverted residual block `features.{index}`: optional 1x1 expansion, 3x3 depthwise,
/// 1x1 projection, and the skip connection when shapes allow.
fn inverted_residual(
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
    let prefix = format!("features.{index}.conv");
    let mut x = input;
    let mut layer = 0;
    if expansion != 1 {
        x = weights.conv_bn(
            graph,
            x,
            &format!("{prefix}.0.0"),
            &format!("{prefix}.0.1"),
            1,
            [0; 4],
        )?;
        x = graph.clamp(&format!("{prefix}.0/relu6"), x, 0.0, 6.0);
        layer = 1;
    }
    x = weights.conv_bn(
        graph,
        x,
        &format!("{prefix}.{layer}.0"),
        &format!("{prefix}.{layer}.1"),
        stride,
        same_symmetric(3),
    )?;
    x = graph.clamp(&format!("{prefix}.{layer}/relu6"), x, 0.0, 6.0);
    x = weights.conv_bn(
        graph,
        x,
        &format!("{prefix}.{}", layer + 1),
        &format!("{prefix}.{}", layer + 2),
        1,
        [0; 4],
    )?;
    if residual {
        x = graph.add(&format!("features.{index}/residual"), x, input);
    }
    Ok(x)
}
