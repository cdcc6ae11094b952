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
use std::path::{Path, PathBuf};

use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use inspectflow::backbone::ir::{IrGraph, Output, Reduction};
use inspectflow::backbone::layers::Weights;
use inspectflow::backbone::torch_legacy::{self, CheckpointTensor};
use inspectflow::backbone::{Backbone, mobilenet_v2};

use super::mobilenet::{self, MobileNetFeatures};

/// Training or export failed: what and where, in one line.
pub type TrainError = String;

/// Added to a feature vector's norm before dividing by it (so an all-zero vector stays zero).
const NORM_EPS: f32 = 1e-6;

/// How a student is trained.
#[derive(Debug, Clone)]
pub struct StfpmSettings {
    /// Passes over the training images.
    pub epochs: usize,
    /// Images per optimisation step.
    pub batch_size: usize,
    /// Adam's learning rate.
    pub learning_rate: f64,
    /// Seeds the student's initial weights and the order of the images.
    pub seed: u64,
}

/// A trained student.
pub struct Student {
    store: nn::VarStore,
    network: MobileNetFeatures,
}

/// The training images as one `[n, 3, size, size]` tensor, RGB in [0, 1] (resized bilinearly,
/// as `preprocess` does for serving).
pub fn load_images(files: &[PathBuf], size: usize) -> Result<Tensor, TrainError> {
    let side = size as u32;
    let mut planes = Vec::with_capacity(files.len() * 3 * size * size);
    for file in files {
        let image = image::open(file)
            .map_err(|e| format!("{}: {e}", file.display()))?
            .to_rgb8();
        let image =
            image::imageops::resize(&image, side, side, image::imageops::FilterType::Triangle);
        for channel in 0..3 {
            planes.extend(image.pixels().map(|p| f32::from(p[channel]) / 255.0));
        }
    }
    Ok(Tensor::from_slice(&planes).view([files.len() as i64, 3, size as i64, size as i64]))
}

/// Each position's feature vector divided by its length.
fn normalised(features: &Tensor) -> Tensor {
    let norm = features
        .pow_tensor_scalar(2)
        .sum_dim_intlist(1, true, Kind::Float)
        .sqrt()
        + f64::from(NORM_EPS);
    features / norm
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

/// Trains a student on `images` against `teacher`; `progress` hears each epoch's number (from
/// 1) and mean loss.
pub fn fit(
    teacher: &MobileNetFeatures,
    images: &Tensor,
    settings: &StfpmSettings,
    progress: &mut dyn FnMut(usize, f64),
) -> Result<Student, TrainError> {
    tch::manual_seed(settings.seed as i64);
    let device = images.device();
    let count = images.size()[0];
    if count == 0 {
        return Err("STFPM needs training images".to_string());
    }
    let targets = tch::no_grad(|| teacher.forward_t(images, false));
    let store = nn::VarStore::new(device);
    let network = MobileNetFeatures::new(&store.root());
    let mut optimiser = nn::Adam::default()
        .build(&store, settings.learning_rate)
        .map_err(|e| format!("STFPM optimiser: {e}"))?;
    let batch = settings.batch_size.max(1) as i64;
    for epoch in 1..=settings.epochs {
        let order = Tensor::randperm(count, (Kind::Int64, device));
        let (mut total, mut steps) = (0.0, 0);
        let mut start = 0;
        while start < count {
            let length = batch.min(count - start);
            let indices = order.narrow(0, start, length);
            let input = images.index_select(0, &indices);
            let target = (
                targets.0.index_select(0, &indices),
                targets.1.index_select(0, &indices),
            );
            let output = network.forward_t(&input, true);
            let [d8, d16] = distances(&target, &output);
            // The paper's loss: per stage, the distance averaged over positions, summed.
            let loss = d8.mean(Kind::Float) + d16.mean(Kind::Float);
            optimiser.backward_step(&loss);
            total += loss.double_value(&[]);
            steps += 1;
            start += length;
        }
        progress(epoch, total / f64::from(steps.max(1)));
    }
    Ok(Student { store, network })
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
    let score = graph.reduce("pred_score_max", map, &[1, 2, 3], Reduction::Max);
    graph.result("anomaly_map", map);
    graph.result("pred_score", score);
    graph
        .write(xml)
        .map_err(|e| format!("writing {}: {e}", xml.display()))
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
    let eps = graph.constant_f32(&format!("{stage}/eps"), &[1], &[NORM_EPS]);
    let normalise = |graph: &mut IrGraph, name: &str, features: Output| {
        let squares = graph.multiply(&format!("{stage}/{name}/squares"), features, features);
        let sum = graph.reduce(
            &format!("{stage}/{name}/sum"),
            squares,
            &[1],
            Reduction::Sum,
        );
        let sum = graph.reshape(&format!("{stage}/{name}/keep"), sum, &[1, 1, height, width]);
        let norm = graph.sqrt(&format!("{stage}/{name}/norm"), sum);
        let norm = graph.add(&format!("{stage}/{name}/norm_eps"), norm, eps);
        graph.divide(&format!("{stage}/{name}/normalised"), features, norm)
    };
    let t = normalise(graph, "teacher", teacher);
    let s = normalise(graph, "student", student);
    let difference = graph.subtract(&format!("{stage}/difference"), t, s);
    let squares = graph.multiply(&format!("{stage}/squares"), difference, difference);
    let sum = graph.reduce(&format!("{stage}/sum"), squares, &[1], Reduction::Sum);
    let sum = graph.reshape(&format!("{stage}/keep"), sum, &[1, 1, height, width]);
    let half = graph.constant_f32(&format!("{stage}/half"), &[1], &[0.5]);
    let distance = graph.multiply(&format!("{stage}/distance"), sum, half);
    graph.resize_bilinear(&format!("{stage}/resize"), distance, input_size, input_size)
}

/// The teacher on `device`.
pub fn teacher(device: Device) -> Result<MobileNetFeatures, TrainError> {
    // The layers hold their tensors (reference-counted): the store may go.
    let (_store, network) = mobilenet::teacher(device)?;
    Ok(network)
}
