//! EfficientAD (Batzner et al., 2024), trained with libtorch: a small patch description network
//! (PDN) as the teacher, a student PDN and an autoencoder.
//!
//! 1. **Distillation.** The paper distils its PDN teacher from WideResNet-101 features on
//!    ImageNet. No ImageNet is at hand here, so the teacher is distilled on the *training
//!    images*, from the ImageNet MobileNetV2's stride-8 and stride-16 features ([`super::mobilenet`],
//!    upsampled to the PDN's stride-4 grid and normalised per channel): it learns to describe
//!    these parts' patches as the ImageNet network does, at a fraction of the cost.
//! 2. **Training.** On the teacher's per-channel-normalised output, the student learns with the
//!    hard-feature loss (the mean of the largest 0.1% of squared differences) and the
//!    autoencoder learns to reproduce the teacher's output through a 1x1 code; the student's
//!    second half of channels learns to predict the autoencoder. The paper's penalty on ImageNet
//!    images and its augmentation of the autoencoder's input are left out (no ImageNet).
//! 3. **Scoring.** The student-teacher map (local anomalies) and the student-autoencoder map
//!    (logical anomalies), each the mean squared difference over channels resized to the input,
//!    are normalised with their 0.9 and 0.995 quantiles on the validation images (the training
//!    images when there are none) so that both map those quantiles to 0 and 0.1, and averaged;
//!    the maximum is the score.
//!
//! The PDNs are narrower than the paper's small PDN (32, 32 and 64 hidden channels instead of
//! 128, 256 and 256; 128 output channels instead of 384), sized for training on a CPU. The whole
//! model is written as one OpenVINO IR by the project's IR writer.

use std::path::Path;

use tch::nn;
use tch::{Device, Kind, Tensor};

use inspectflow::backbone::ir::{IrGraph, Output, Reduction};
use inspectflow::train::{EpochReport, TrainingPhase};

use super::TrainError;
use super::layers::{Conv, ConvSpec, imagenet_normalise, imagenet_normalised, write_scored};
use super::mobilenet::MobileNetFeatures;
use super::training::{self, Outcome, Settings, batches};

/// Channels the teacher describes each patch with (MobileNetV2's 32 + 96).
const FEATURE_CHANNELS: i64 = 128;
/// Hidden channels of the PDN's first three convolutions.
const PDN_CHANNELS: [i64; 3] = [32, 32, 64];
/// Channels of the autoencoder's code and hidden layers.
const AE_CHANNELS: i64 = 64;
/// Share of the squared differences the hard-feature loss averages (the largest ones).
const HARD_SHARE: f64 = 0.001;
/// Quantiles of the maps on validation images mapped to 0 and [`NORMALISED_HIGH`].
const QUANTILES: (f64, f64) = (0.9, 0.995);
/// Images per forward pass when measuring statistics and maps (no gradients).
const EVALUATION_BATCH: i64 = 8;
/// What the higher quantile maps to.
const NORMALISED_HIGH: f64 = 0.1;

/// A patch description network: four convolutions and two average pools, output at stride 4.
struct Pdn {
    convs: [Conv; 4],
}

impl Pdn {
    fn new(path: &nn::Path, output: i64) -> Self {
        let [c1, c2, c3] = PDN_CHANNELS;
        Self {
            convs: [
                Conv::new(&(path / "conv1"), ConvSpec::new(3, c1, 4).padding(3).relu()),
                Conv::new(
                    &(path / "conv2"),
                    ConvSpec::new(c1, c2, 4).padding(3).relu(),
                ),
                Conv::new(
                    &(path / "conv3"),
                    ConvSpec::new(c2, c3, 3).padding(1).relu(),
                ),
                Conv::new(&(path / "conv4"), ConvSpec::new(c3, output, 4)),
            ],
        }
    }

    /// Its output on `images` (RGB in [0, 1]).
    fn forward(&self, images: &Tensor) -> Tensor {
        let pool = |x: &Tensor| x.avg_pool2d([2, 2], [2, 2], [1, 1], false, true, None);
        let x = self.convs[0].forward_t(&imagenet_normalised(images), false);
        let x = self.convs[1].forward_t(&pool(&x), false);
        let x = self.convs[2].forward_t(&pool(&x), false);
        self.convs[3].forward_t(&x, false)
    }

    fn export(&self, graph: &mut IrGraph, name: &str, input: Output) -> Result<Output, TrainError> {
        let x = imagenet_normalise(graph, &format!("{name}/normalise"), input);
        let x = self.convs[0].export(graph, &format!("{name}/conv1"), x)?;
        let x = graph.average_pool(&format!("{name}/pool1"), x, 2, 2, 1);
        let x = self.convs[1].export(graph, &format!("{name}/conv2"), x)?;
        let x = graph.average_pool(&format!("{name}/pool2"), x, 2, 2, 1);
        let x = self.convs[2].export(graph, &format!("{name}/conv3"), x)?;
        self.convs[3].export(graph, &format!("{name}/conv4"), x)
    }
}

/// The PDN's output side for an input of `size`.
fn output_side(size: i64) -> i64 {
    let pooled = |side: i64| side / 2 + 1;
    pooled(pooled(size + 3) + 3) - 3
}

/// The autoencoder: strided convolutions down to a 1x1 code, bilinear upsampling and
/// convolutions back up to the PDN's grid.
struct Autoencoder {
    encoder: Vec<Conv>,
    decoder: Vec<Conv>,
    /// The decoder's sizes, before each of its hidden convolutions.
    sizes: Vec<i64>,
}

impl Autoencoder {
    fn new(path: &nn::Path, input_size: i64) -> Self {
        let c = AE_CHANNELS;
        let down = |input, output| ConvSpec::new(input, output, 4).stride(2).padding(1).relu();
        let encoder = vec![
            Conv::new(&(path / "enc1"), down(3, 32)),
            Conv::new(&(path / "enc2"), down(32, 32)),
            Conv::new(&(path / "enc3"), down(32, c)),
            Conv::new(&(path / "enc4"), down(c, c)),
            Conv::new(&(path / "enc5"), down(c, c)),
            // Whatever is left (input / 32) down to 1x1: the code.
            Conv::new(&(path / "enc6"), ConvSpec::new(c, c, input_size / 32)),
        ];
        let side = output_side(input_size);
        let sizes = vec![side / 8, side / 4, side / 2, side];
        let mut decoder: Vec<Conv> = (1..=sizes.len())
            .map(|i| {
                Conv::new(
                    &(path / format!("dec{i}")),
                    ConvSpec::new(c, c, 3).padding(1).relu(),
                )
            })
            .collect();
        decoder.push(Conv::new(
            &(path / "dec_out"),
            ConvSpec::new(c, FEATURE_CHANNELS, 3).padding(1),
        ));
        Self {
            encoder,
            decoder,
            sizes,
        }
    }

    fn forward(&self, images: &Tensor) -> Tensor {
        let mut x = imagenet_normalised(images);
        for conv in &self.encoder {
            x = conv.forward_t(&x, false);
        }
        for (conv, &side) in self.decoder.iter().zip(&self.sizes) {
            x = x.upsample_bilinear2d([side, side], false, None, None);
            x = conv.forward_t(&x, false);
        }
        self.decoder[self.sizes.len()].forward_t(&x, false)
    }

    fn export(&self, graph: &mut IrGraph, name: &str, input: Output) -> Result<Output, TrainError> {
        let mut x = imagenet_normalise(graph, &format!("{name}/normalise"), input);
        for (index, conv) in self.encoder.iter().enumerate() {
            x = conv.export(graph, &format!("{name}/enc{}", index + 1), x)?;
        }
        for (index, (conv, &side)) in self.decoder.iter().zip(&self.sizes).enumerate() {
            let side = side as usize;
            x = graph.resize_bilinear(&format!("{name}/resize{}", index + 1), x, side, side);
            x = conv.export(graph, &format!("{name}/dec{}", index + 1), x)?;
        }
        self.decoder[self.sizes.len()].export(graph, &format!("{name}/dec_out"), x)
    }
}

/// A trained EfficientAD: the networks, the teacher's channel statistics and the maps'
/// quantiles (the layers hold their tensors, reference-counted, so the variable stores they
/// were made in need not be kept).
pub struct EfficientAd {
    teacher: Pdn,
    student: Pdn,
    autoencoder: Autoencoder,
    /// Per-channel mean and standard deviation of the teacher's output, `[1, 128, 1, 1]`.
    teacher_mean: Tensor,
    teacher_std: Tensor,
    /// Lower and higher quantile of the student-teacher and the student-autoencoder maps.
    quantiles_st: (f64, f64),
    quantiles_ae: (f64, f64),
}

/// Per-channel mean and standard deviation of `outputs(batch)` over `images`, `[1, c, 1, 1]`.
fn channel_statistics(images: &Tensor, outputs: &dyn Fn(&Tensor) -> Tensor) -> (Tensor, Tensor) {
    tch::no_grad(|| {
        let (mut sum, mut squares, mut count) = (None::<Tensor>, None::<Tensor>, 0i64);
        for batch in batches(images, EVALUATION_BATCH) {
            let output = outputs(&batch);
            let positions = output.size()[0] * output.size()[2] * output.size()[3];
            let s = output.sum_dim_intlist([0, 2, 3].as_slice(), true, Kind::Double);
            let q = output.pow_tensor_scalar(2).sum_dim_intlist(
                [0, 2, 3].as_slice(),
                true,
                Kind::Double,
            );
            sum = Some(sum.map_or(s.shallow_clone(), |t| t + &s));
            squares = Some(squares.map_or(q.shallow_clone(), |t| t + &q));
            count += positions;
        }
        let count = count.max(1) as f64;
        let mean =
            sum.unwrap_or_else(|| Tensor::zeros([1], (Kind::Double, images.device()))) / count;
        let variance =
            squares.unwrap_or_else(|| Tensor::zeros([1], (Kind::Double, images.device()))) / count
                - mean.pow_tensor_scalar(2);
        let std = variance.clamp_min(1e-12).sqrt();
        (mean.to_kind(Kind::Float), std.to_kind(Kind::Float))
    })
}

/// The MobileNetV2 features the teacher PDN is distilled to reproduce: both stages upsampled to
/// the PDN's grid and concatenated, `[n, 128, side, side]`.
fn backbone_targets(backbone: &MobileNetFeatures, images: &Tensor) -> Tensor {
    let side = output_side(images.size()[2]);
    let (f8, f16) = backbone.forward_t(images, false);
    let up = |t: &Tensor| t.upsample_bilinear2d([side, side], false, None, None);
    Tensor::cat(&[up(&f8), up(&f16)], 1)
}

/// The mean of the largest [`HARD_SHARE`] of `differences`.
fn hard_mean(differences: &Tensor) -> Tensor {
    let flat = differences.flatten(0, -1);
    let keep = ((flat.size()[0] as f64 * HARD_SHARE).ceil() as i64).max(1);
    let (largest, _) = flat.topk(keep, 0, true, false);
    largest.mean(Kind::Float)
}

/// The `q` quantile of every value of `values` (no size limit, unlike `torch.quantile`).
fn quantile(values: &Tensor, q: f64) -> f64 {
    let flat = values.flatten(0, -1).to_kind(Kind::Float);
    let count = flat.size()[0];
    if count == 0 {
        return 0.0;
    }
    let position = q * (count - 1) as f64;
    let (low, high) = (position.floor() as i64, position.ceil() as i64);
    let value = |k: i64| flat.kthvalue(k + 1, 0, false).0.double_value(&[]);
    let (a, b) = (value(low), value(high));
    a + (b - a) * (position - low as f64)
}

/// Trains teacher, student and autoencoder on `images` (distilling the teacher from
/// `backbone`), stopping each phase early on `validation`'s loss, and measures the maps'
/// quantiles on `validation` (on `images` without validation images); `progress` hears each
/// epoch of both phases.
pub fn fit(
    backbone: &MobileNetFeatures,
    images: &Tensor,
    validation: Option<&Tensor>,
    settings: &Settings,
    progress: &mut dyn FnMut(&EpochReport),
) -> Result<(EfficientAd, Outcome), TrainError> {
    tch::manual_seed(settings.seed as i64);
    let device = images.device();
    let input_size = images.size()[2];
    if input_size % 32 != 0 || input_size < 64 {
        return Err(format!(
            "input_size: EfficientAD needs a multiple of 32 from 64, not {input_size}"
        ));
    }

    // 1. The teacher PDN learns the backbone's normalised features on the training images.
    let (target_mean, target_std) =
        channel_statistics(images, &|batch| backbone_targets(backbone, batch));
    let mut teacher_store = nn::VarStore::new(device);
    let teacher = Pdn::new(&(teacher_store.root() / "teacher"), FEATURE_CHANNELS);
    let distillation_loss = |batch: &Tensor, _train: bool| {
        let target =
            tch::no_grad(|| (backbone_targets(backbone, batch) - &target_mean) / &target_std);
        (teacher.forward(batch) - target)
            .pow_tensor_scalar(2)
            .mean(Kind::Float)
    };
    training::train(
        &teacher_store,
        images,
        validation,
        settings,
        TrainingPhase::Distillation,
        &distillation_loss,
        progress,
    )?;
    teacher_store.freeze();

    // 2. Student and autoencoder on the teacher's normalised output.
    let (teacher_mean, teacher_std) = channel_statistics(images, &|batch| teacher.forward(batch));
    let store = nn::VarStore::new(device);
    let student = Pdn::new(&(store.root() / "student"), 2 * FEATURE_CHANNELS);
    let autoencoder = Autoencoder::new(&(store.root() / "autoencoder"), input_size);
    let teacher_output =
        |batch: &Tensor| tch::no_grad(|| (teacher.forward(batch) - &teacher_mean) / &teacher_std);
    let loss = |batch: &Tensor, _train: bool| {
        let target = teacher_output(batch);
        let predicted = student.forward(batch);
        let student_st = predicted.narrow(1, 0, FEATURE_CHANNELS);
        let student_ae = predicted.narrow(1, FEATURE_CHANNELS, FEATURE_CHANNELS);
        let reconstructed = autoencoder.forward(batch);
        let hard = hard_mean(&(&target - student_st).pow_tensor_scalar(2));
        let ae = (&target - &reconstructed)
            .pow_tensor_scalar(2)
            .mean(Kind::Float);
        let st_ae = (reconstructed - student_ae)
            .pow_tensor_scalar(2)
            .mean(Kind::Float);
        hard + ae + st_ae
    };
    let outcome = training::train(
        &store,
        images,
        validation,
        settings,
        TrainingPhase::Training,
        &loss,
        progress,
    )?;

    // 3. The maps' quantiles on images never trained on, when there are some.
    let mut model = EfficientAd {
        teacher,
        student,
        autoencoder,
        teacher_mean,
        teacher_std,
        quantiles_st: (0.0, 1.0),
        quantiles_ae: (0.0, 1.0),
    };
    let (map_st, map_ae) = model.raw_maps(validation.unwrap_or(images));
    model.quantiles_st = (
        quantile(&map_st, QUANTILES.0),
        quantile(&map_st, QUANTILES.1),
    );
    model.quantiles_ae = (
        quantile(&map_ae, QUANTILES.0),
        quantile(&map_ae, QUANTILES.1),
    );
    Ok((model, outcome))
}

impl EfficientAd {
    /// The student-teacher and student-autoencoder maps before normalisation, resized to the
    /// input, `[n, 1, size, size]` each.
    fn raw_maps(&self, images: &Tensor) -> (Tensor, Tensor) {
        tch::no_grad(|| {
            let size = images.size()[2];
            let (mut st, mut ae) = (Vec::new(), Vec::new());
            for batch in batches(images, EVALUATION_BATCH) {
                let target =
                    (self.teacher.forward(&batch) - &self.teacher_mean) / &self.teacher_std;
                let predicted = self.student.forward(&batch);
                let reconstructed = self.autoencoder.forward(&batch);
                let channel_mean = |t: Tensor| t.mean_dim(1, true, Kind::Float);
                let up = |t: Tensor| t.upsample_bilinear2d([size, size], false, None, None);
                st.push(up(channel_mean(
                    (target - predicted.narrow(1, 0, FEATURE_CHANNELS)).pow_tensor_scalar(2),
                )));
                ae.push(up(channel_mean(
                    (reconstructed - predicted.narrow(1, FEATURE_CHANNELS, FEATURE_CHANNELS))
                        .pow_tensor_scalar(2),
                )));
            }
            (Tensor::cat(&st, 0), Tensor::cat(&ae, 0))
        })
    }

    /// The anomaly maps of `images` (`[n, 1, size, size]`), computed in tch as the exported IR
    /// computes them.
    pub fn anomaly_maps(&self, images: &Tensor) -> Tensor {
        let (st, ae) = self.raw_maps(images);
        let normalise = |map: Tensor, (low, high): (f64, f64)| {
            (map - low) * (NORMALISED_HIGH / (high - low).max(f64::EPSILON))
        };
        (normalise(st, self.quantiles_st) + normalise(ae, self.quantiles_ae)) * 0.5
    }

    /// Writes the three networks and the scoring as one IR at `xml` (outputs `anomaly_map`,
    /// `[1, 1, size, size]`, and `pred_score`, `[1]`).
    pub fn export(&self, input_size: usize, xml: &Path) -> Result<(), TrainError> {
        let mut graph = IrGraph::new("efficient_ad");
        let input = graph.parameter("input", &[1, 3, input_size, input_size]);
        let teacher = self.teacher.export(&mut graph, "teacher", input)?;
        let channels = FEATURE_CHANNELS as usize;
        let statistic = |t: &Tensor, what: &str| {
            Vec::<f32>::try_from(t.to_device(Device::Cpu).flatten(0, -1))
                .map_err(|e| format!("teacher {what}: {e}"))
        };
        let mean = graph.constant_f32(
            "teacher/mean",
            &[1, channels, 1, 1],
            &statistic(&self.teacher_mean, "mean")?,
        );
        let std = graph.constant_f32(
            "teacher/std",
            &[1, channels, 1, 1],
            &statistic(&self.teacher_std, "std")?,
        );
        let centred = graph.subtract("teacher/centred", teacher, mean);
        let target = graph.divide("teacher/normalised", centred, std);
        let student = self.student.export(&mut graph, "student", input)?;
        let first: Vec<i64> = (0..FEATURE_CHANNELS).collect();
        let second: Vec<i64> = (FEATURE_CHANNELS..2 * FEATURE_CHANNELS).collect();
        let student_st = graph.gather("student/teacher_half", student, &first, 1);
        let student_ae = graph.gather("student/autoencoder_half", student, &second, 1);
        let reconstructed = self.autoencoder.export(&mut graph, "autoencoder", input)?;
        let st = map_layers(
            &mut graph,
            "map_st",
            target,
            student_st,
            input_size,
            self.quantiles_st,
        );
        let ae = map_layers(
            &mut graph,
            "map_ae",
            reconstructed,
            student_ae,
            input_size,
            self.quantiles_ae,
        );
        let sum = graph.add("anomaly_map_sum", st, ae);
        let half = graph.constant_f32("anomaly_map_half", &[1], &[0.5]);
        let map = graph.multiply("anomaly_map_mean", sum, half);
        write_scored(&mut graph, map, xml)
    }
}

/// One map in the IR: the mean squared difference over channels, resized to the input, with
/// `quantiles` mapped to 0 and [`NORMALISED_HIGH`].
fn map_layers(
    graph: &mut IrGraph,
    name: &str,
    a: Output,
    b: Output,
    input_size: usize,
    (low, high): (f64, f64),
) -> Output {
    let shape = graph.shape(a).to_vec();
    let difference = graph.subtract(&format!("{name}/difference"), a, b);
    let squares = graph.multiply(&format!("{name}/squares"), difference, difference);
    let mean = graph.reduce(&format!("{name}/mean"), squares, &[1], Reduction::Mean);
    let mean = graph.reshape(&format!("{name}/keep"), mean, &[1, 1, shape[2], shape[3]]);
    let resized = graph.resize_bilinear(&format!("{name}/resize"), mean, input_size, input_size);
    let scale = NORMALISED_HIGH / (high - low).max(f64::EPSILON);
    let low = graph.constant_f32(&format!("{name}/low"), &[1], &[low as f32]);
    let shifted = graph.subtract(&format!("{name}/shifted"), resized, low);
    let scale = graph.constant_f32(&format!("{name}/scale"), &[1], &[scale as f32]);
    graph.multiply(&format!("{name}/normalised"), shifted, scale)
}
