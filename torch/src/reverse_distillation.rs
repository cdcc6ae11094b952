//! Reverse Distillation (Deng and Li, 2022), trained with libtorch. The ImageNet MobileNetV2
//! ([`super::mobilenet`]) is the frozen encoder; a one-class bottleneck fuses its stride-8 and
//! stride-16 features into one compact stride-32 code, and a decoder, trained on normal images
//! only, reconstructs both stages of features from that code alone. The bottleneck keeps what
//! normal parts share and drops the rest, so where an image is unlike the training images the
//! decoder's features turn away from the encoder's: per stage, one minus the cosine similarity
//! of the two feature vectors, resized to the input and summed over the stages, is the anomaly
//! map; its maximum is the score.
//!
//! Compared with the paper: a MobileNetV2 encoder instead of WideResNet-50, two stages instead
//! of three, and plain convolutions (BatchNorm, ReLU) with bilinear upsampling in the bottleneck
//! and the decoder instead of residual blocks and transposed convolutions, so that the whole
//! model is written as one OpenVINO IR by the project's IR writer and served like any package.

use std::path::Path;

use tch::nn;
use tch::{Kind, Tensor};

use inspectflow::backbone::ir::{IrGraph, Output, Reduction};
use inspectflow::backbone::layers::Weights;
use inspectflow::backbone::{Backbone, mobilenet_v2, torch_legacy};
use inspectflow::train::{EpochReport, TrainingPhase};

use super::TrainError;
use super::layers::{Conv, ConvSpec, normalise_channels, normalised, write_scored};
use super::mobilenet::MobileNetFeatures;
use super::training::{self, Outcome, Settings};

/// Channels of the teacher's stride-8 and stride-16 features.
const TEACHER_CHANNELS: (i64, i64) = (32, 96);
/// Channels of the one-class code at stride 32.
const CODE_CHANNELS: i64 = 128;

/// The trainable part: bottleneck and decoder.
pub struct Decoder {
    store: nn::VarStore,
    /// Stride-8 features down to stride 16.
    reduce_8: Conv,
    /// Both stages, concatenated, down to the stride-32 code.
    fuse: Conv,
    /// Mixes the code's channels.
    embed: Conv,
    /// Code upsampled to stride 16, then hidden features.
    up_16: Conv,
    /// The stride-16 reconstruction.
    out_16: Conv,
    /// Stride-16 hidden features upsampled to stride 8, then hidden features.
    up_8: Conv,
    /// The stride-8 reconstruction.
    out_8: Conv,
}

impl Decoder {
    fn new(store: nn::VarStore) -> Self {
        let root = store.root();
        let (c8, c16) = TEACHER_CHANNELS;
        let bottleneck = &root / "bottleneck";
        let decoder = &root / "decoder";
        let block = |input, output| ConvSpec::new(input, output, 3).padding(1);
        Self {
            reduce_8: Conv::new(
                &(&bottleneck / "reduce_8"),
                block(c8, c16).stride(2).batch_norm().relu(),
            ),
            fuse: Conv::new(
                &(&bottleneck / "fuse"),
                block(2 * c16, CODE_CHANNELS).stride(2).batch_norm().relu(),
            ),
            embed: Conv::new(
                &(&bottleneck / "embed"),
                ConvSpec::new(CODE_CHANNELS, CODE_CHANNELS, 1)
                    .batch_norm()
                    .relu(),
            ),
            up_16: Conv::new(
                &(&decoder / "up_16"),
                block(CODE_CHANNELS, c16).batch_norm().relu(),
            ),
            out_16: Conv::new(&(&decoder / "out_16"), block(c16, c16)),
            up_8: Conv::new(&(&decoder / "up_8"), block(c16, 64).batch_norm().relu()),
            out_8: Conv::new(&(&decoder / "out_8"), block(64, c8)),
            store,
        }
    }

    /// The reconstructed stride-8 and stride-16 features from the teacher's.
    fn forward_t(&self, teacher: &(Tensor, Tensor), train: bool) -> (Tensor, Tensor) {
        let (f8, f16) = teacher;
        let size = |t: &Tensor| {
            let s = t.size();
            [s[2], s[3]]
        };
        let reduced = self.reduce_8.forward_t(f8, train);
        let code = self
            .fuse
            .forward_t(&Tensor::cat(&[&reduced, f16], 1), train);
        let code = self.embed.forward_t(&code, train);
        let up = |t: &Tensor, to: [i64; 2]| t.upsample_bilinear2d(to, false, None, None);
        let hidden_16 = self.up_16.forward_t(&up(&code, size(f16)), train);
        let out_16 = self.out_16.forward_t(&hidden_16, train);
        let hidden_8 = self.up_8.forward_t(&up(&hidden_16, size(f8)), train);
        let out_8 = self.out_8.forward_t(&hidden_8, train);
        (out_8, out_16)
    }
}

/// Per stage, one minus the cosine similarity of teacher and decoder features: `[n, 1, h, w]`.
fn cosine_distances(teacher: &(Tensor, Tensor), decoded: &(Tensor, Tensor)) -> [Tensor; 2] {
    let distance = |t: &Tensor, d: &Tensor| {
        1.0 - (normalised(t) * normalised(d)).sum_dim_intlist(1, true, Kind::Float)
    };
    [
        distance(&teacher.0, &decoded.0),
        distance(&teacher.1, &decoded.1),
    ]
}

/// Trains bottleneck and decoder on `images` against `teacher`, stopping early on
/// `validation`'s loss; `progress` hears each epoch.
pub fn fit(
    teacher: &MobileNetFeatures,
    images: &Tensor,
    validation: Option<&Tensor>,
    settings: &Settings,
    progress: &mut dyn FnMut(&EpochReport),
) -> Result<(Decoder, Outcome), TrainError> {
    tch::manual_seed(settings.seed as i64);
    let decoder = Decoder::new(nn::VarStore::new(images.device()));
    // The loss: per stage, the cosine distance averaged over positions, summed.
    let loss = |batch: &Tensor, train: bool| {
        let features = tch::no_grad(|| teacher.forward_t(batch, false));
        let decoded = decoder.forward_t(&features, train);
        let [d8, d16] = cosine_distances(&features, &decoded);
        d8.mean(Kind::Float) + d16.mean(Kind::Float)
    };
    let outcome = training::train(
        &decoder.store,
        images,
        validation,
        settings,
        TrainingPhase::Training,
        &loss,
        progress,
    )?;
    Ok((decoder, outcome))
}

/// The anomaly maps of `images` (`[n, 1, size, size]`), computed in tch as the exported IR
/// computes them.
pub fn anomaly_maps(teacher: &MobileNetFeatures, decoder: &Decoder, images: &Tensor) -> Tensor {
    tch::no_grad(|| {
        let size = images.size()[2];
        let features = teacher.forward_t(images, false);
        let decoded = decoder.forward_t(&features, false);
        let [d8, d16] = cosine_distances(&features, &decoded);
        let up = |d: &Tensor| d.upsample_bilinear2d([size, size], false, None, None);
        up(&d8) + up(&d16)
    })
}

/// Writes teacher, bottleneck, decoder and the scoring as one IR at `xml` (outputs
/// `anomaly_map`, `[1, 1, size, size]`, and `pred_score`, `[1]`).
pub fn export(decoder: &Decoder, input_size: usize, xml: &Path) -> Result<(), TrainError> {
    let checkpoint = Backbone::MobilenetV2
        .locate_weights()
        .map_err(|e| e.to_string())?;
    let tensors = torch_legacy::read_state_dict(&checkpoint).map_err(|e| e.to_string())?;
    let checkpoint_name = checkpoint.display().to_string();
    let mut graph = IrGraph::new("reverse_distillation");
    let input = graph.parameter("input", &[1, 3, input_size, input_size]);
    let weights = Weights {
        checkpoint: &checkpoint_name,
        tensors: &tensors,
        bn_eps: 1e-5,
    };
    let (f8, f16) =
        mobilenet_v2::feature_taps(&weights, &mut graph, input).map_err(|e| e.to_string())?;
    let size = |graph: &IrGraph, o: Output| {
        let s = graph.shape(o);
        (s[2], s[3])
    };
    let (h8, w8) = size(&graph, f8);
    let (h16, w16) = size(&graph, f16);
    let reduced = decoder
        .reduce_8
        .export(&mut graph, "bottleneck/reduce_8", f8)?;
    let joined = graph.concat("bottleneck/concat", &[reduced, f16], 1);
    let code = decoder.fuse.export(&mut graph, "bottleneck/fuse", joined)?;
    let code = decoder.embed.export(&mut graph, "bottleneck/embed", code)?;
    let code_16 = graph.resize_bilinear("decoder/resize_16", code, h16, w16);
    let hidden_16 = decoder.up_16.export(&mut graph, "decoder/up_16", code_16)?;
    let out_16 = decoder
        .out_16
        .export(&mut graph, "decoder/out_16", hidden_16)?;
    let hidden_8 = graph.resize_bilinear("decoder/resize_8", hidden_16, h8, w8);
    let hidden_8 = decoder.up_8.export(&mut graph, "decoder/up_8", hidden_8)?;
    let out_8 = decoder
        .out_8
        .export(&mut graph, "decoder/out_8", hidden_8)?;
    let d8 = cosine_distance_layers(&mut graph, "stride8", f8, out_8, input_size);
    let d16 = cosine_distance_layers(&mut graph, "stride16", f16, out_16, input_size);
    let map = graph.add("anomaly_map_sum", d8, d16);
    write_scored(&mut graph, map, xml)
}

/// One stage's map in the IR: one minus the cosine similarity, resized to the input.
fn cosine_distance_layers(
    graph: &mut IrGraph,
    stage: &str,
    teacher: Output,
    decoded: Output,
    input_size: usize,
) -> Output {
    let shape = graph.shape(teacher).to_vec();
    let t = normalise_channels(graph, &format!("{stage}/teacher"), teacher);
    let d = normalise_channels(graph, &format!("{stage}/decoded"), decoded);
    let products = graph.multiply(&format!("{stage}/products"), t, d);
    let cosine = graph.reduce(&format!("{stage}/cosine"), products, &[1], Reduction::Sum);
    let cosine = graph.reshape(
        &format!("{stage}/keep"),
        cosine,
        &[1, 1, shape[2], shape[3]],
    );
    let one = graph.constant_f32(&format!("{stage}/one"), &[1], &[1.0]);
    let distance = graph.subtract(&format!("{stage}/distance"), one, cosine);
    graph.resize_bilinear(&format!("{stage}/resize"), distance, input_size, input_size)
}
