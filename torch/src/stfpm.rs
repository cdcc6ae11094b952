//! STFPM, student-teacher feature pyramid matching (Wang et al., 2021), trained with libtorch.
//! The teacher is the ImageNet MobileNetV2 ([`super::mobilenet`]); a
//! student of the same architecture, trained from scratch on normal images only, learns to
//! reproduce the teacher's channel-normalised features at stride 8 and 16. Where the two disagree
//! the image is unlike the training images: per stage, half the squared distance between the
//! normalised features, resized to the input and multiplied across stages, is the anomaly map;
//! its maximum is the score.
//!
//! The trained model is exported as one OpenVINO IR by the project's IR writer: the teacher's
//! and the student's feature layers side by side on one input (the student's layers named
//! `student/...`), then the same scoring, so pipelines, `predict` and the API serve it like any
//! other package, without libtorch.

use std::collections::BTreeMap;
use std::path::Path;

use tch::nn;
use tch::{Device, Kind, Tensor};

use inspectflow::backbone::ir::{IrGraph, Output, Reduction};
use inspectflow::backbone::layers::Weights;
use inspectflow::backbone::torch_legacy::{self, CheckpointTensor};
use inspectflow::backbone::{Backbone, mobilenet_v2};

use inspectflow::train::{EpochReport, TrainingPhase};

use super::TrainError;
use super::layers::{normalise_channels, normalised, write_scored};
use super::mobilenet::MobileNetFeatures;
use super::training::{self, Outcome, Settings};

/// A trained student.
pub struct Student {
    store: nn::VarStore,
    network: MobileNetFeatures,
}

/// Per stage, half the squared distance of the normalised features: `[n, 1, h, w]`.
fn distances(teacher: &(Tensor, Tensor), student: &(Tensor, Tensor)) -> [Tensor; 2] {
    let distance = |t: &Tensor, s: &Tensor| {
        (normalised(t) - normalised(s))
            .pow_tensor_scalar(2)
            .sum_dim_intlist(1, true, Kind::Float)
            * 0.5
    };
    [
        distance(&teacher.0, &student.0),
        distance(&teacher.1, &student.1),
    ]
}

/// Trains a student on `images` against `teacher`, stopping early on `validation`'s loss;
/// `progress` hears each epoch.
pub fn fit(
    teacher: &MobileNetFeatures,
    images: &Tensor,
    validation: Option<&Tensor>,
    settings: &Settings,
    progress: &mut dyn FnMut(&EpochReport),
) -> Result<(Student, Outcome), TrainError> {
    tch::manual_seed(settings.seed as i64);
    let store = nn::VarStore::new(images.device());
    let network = MobileNetFeatures::new(&store.root());
    // The paper's loss: per stage, the distance averaged over positions, summed.
    let loss = |batch: &Tensor, train: bool| {
        let target = tch::no_grad(|| teacher.forward_t(batch, false));
        let output = network.forward_t(batch, train);
        let [d8, d16] = distances(&target, &output);
        d8.mean(Kind::Float) + d16.mean(Kind::Float)
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
    Ok((Student { store, network }, outcome))
}

/// The anomaly maps of `images` (`[n, 1, size, size]`), computed in tch as the exported IR
/// computes them.
pub fn anomaly_maps(teacher: &MobileNetFeatures, student: &Student, images: &Tensor) -> Tensor {
    tch::no_grad(|| {
        let size = images.size()[2];
        let t = teacher.forward_t(images, false);
        let s = student.network.forward_t(images, false);
        let [d8, d16] = distances(&t, &s);
        let up = |d: &Tensor| d.upsample_bilinear2d([size, size], false, None, None);
        up(&d8) * up(&d16)
    })
}

impl Student {
    /// The student's parameters and BatchNorm statistics by torchvision's names.
    fn state_dict(&self) -> Result<BTreeMap<String, CheckpointTensor>, TrainError> {
        let mut tensors = BTreeMap::new();
        for (name, tensor) in self.store.variables() {
            let shape = tensor.size().iter().map(|&d| d as usize).collect();
            let data = Vec::<f32>::try_from(tensor.to_device(Device::Cpu).flatten(0, -1))
                .map_err(|e| format!("reading student weight {name}: {e}"))?;
            tensors.insert(name, CheckpointTensor { shape, data });
        }
        Ok(tensors)
    }
}

/// Writes teacher, student and the scoring as one IR at `xml` (outputs `anomaly_map`,
/// `[1, 1, size, size]`, and `pred_score`, `[1]`).
pub fn export(student: &Student, input_size: usize, xml: &Path) -> Result<(), TrainError> {
    let backbone = Backbone::MobilenetV2;
    let checkpoint = backbone.locate_weights().map_err(|e| e.to_string())?;
    let teacher_tensors = torch_legacy::read_state_dict(&checkpoint).map_err(|e| e.to_string())?;
    let checkpoint_name = checkpoint.display().to_string();
    let student_tensors = student.state_dict()?;
    let mut graph = IrGraph::new("stfpm");
    let input = graph.parameter("input", &[1, 3, input_size, input_size]);
    let weights = |tensors| Weights {
        checkpoint: &checkpoint_name,
        tensors,
        bn_eps: 1e-5,
    };
    let invalid = |e: inspectflow::backbone::layers::WeightsError| e.to_string();
    let teacher = mobilenet_v2::feature_taps(&weights(&teacher_tensors), &mut graph, input)
        .map_err(invalid)?;
    graph.set_name_prefix("student/");
    let taught = mobilenet_v2::feature_taps(&weights(&student_tensors), &mut graph, input)
        .map_err(invalid)?;
    graph.set_name_prefix("");
    let d8 = distance_layers(&mut graph, "stride8", teacher.0, taught.0, input_size);
    let d16 = distance_layers(&mut graph, "stride16", teacher.1, taught.1, input_size);
    let map = graph.multiply("anomaly_map_product", d8, d16);
    write_scored(&mut graph, map, xml)
}

/// One stage's map in the IR: half the squared distance of the normalised features, resized
/// to the input.
fn distance_layers(
    graph: &mut IrGraph,
    stage: &str,
    teacher: Output,
    student: Output,
    input_size: usize,
) -> Output {
    let shape = graph.shape(teacher).to_vec();
    let (height, width) = (shape[2], shape[3]);
    let t = normalise_channels(graph, &format!("{stage}/teacher"), teacher);
    let s = normalise_channels(graph, &format!("{stage}/student"), student);
    let difference = graph.subtract(&format!("{stage}/difference"), t, s);
    let squares = graph.multiply(&format!("{stage}/squares"), difference, difference);
    let sum = graph.reduce(&format!("{stage}/sum"), squares, &[1], Reduction::Sum);
    let sum = graph.reshape(&format!("{stage}/keep"), sum, &[1, 1, height, width]);
    let half = graph.constant_f32(&format!("{stage}/half"), &[1], &[0.5]);
    let distance = graph.multiply(&format!("{stage}/distance"), sum, half);
    graph.resize_bilinear(&format!("{stage}/resize"), distance, input_size, input_size)
}
