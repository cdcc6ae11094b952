//! The libtorch side of training: MobileNetV2's feature layers in tch, loaded from the same
//! ImageNet checkpoint as the OpenVINO backbone, compute the same features as the backbone's IR
//! does in OpenVINO (the oracle); each gradient-trained family's exported IR computes what tch
//! computes; training stops early on the validation loss; and `inspectflow train --model
//! stfpm|reverse_distillation|efficient_ad`, which runs this crate's helper, separates a
//! generated set's anomalies.

use inspectflow::backbone::Backbone;
use inspectflow::train::{Architecture, EpochReport, TrainingPhase};
use inspectflow_torch::mobilenet as torch_mobilenet;
use inspectflow_torch::{efficient_ad, reverse_distillation, stfpm, training};

/// A 64x64 RGB test picture: gradients and a bright square.
fn picture(path: &std::path::Path) -> Vec<f32> {
    let size = 64u32;
    let image = image::RgbImage::from_fn(size, size, |x, y| {
        let square = (20..40).contains(&x) && (24..44).contains(&y);
        if square {
            image::Rgb([250, 240, 30])
        } else {
            image::Rgb([(x * 4) as u8, (y * 4) as u8, ((x + y) * 2) as u8])
        }
    });
    image.save(path).expect("write PNG");
    // Planar RGB in [0, 1], as preprocess hands it to the model.
    let mut planes = vec![0f32; 3 * (size * size) as usize];
    for (x, y, pixel) in image.enumerate_pixels() {
        for channel in 0..3 {
            planes[channel * (size * size) as usize + (y * size + x) as usize] =
                f32::from(pixel[channel]) / 255.0;
        }
    }
    planes
}

fn largest_difference(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let difference = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max);
    (difference, scale)
}

#[test]
fn the_tch_teacher_computes_the_openvino_backbones_features() {
    let dir = tempfile::tempdir().expect("temp dir");
    let png = dir.path().join("picture.png");
    let planes = picture(&png);
    let xml = dir.path().join("backbone.xml");
    Backbone::MobilenetV2.import(64, &xml).expect("backbone IR");
    let outputs = inspectflow::train::batch::run_model(&xml, "CPU", &[png], 64, &mut |_| {})
        .expect("OpenVINO runs the backbone");

    let (_store, teacher) = torch_mobilenet::teacher(tch::Device::Cpu).expect("teacher loads");
    let input = tch::Tensor::from_slice(&planes).view([1, 3, 64, 64]);
    let (stride_8, stride_16) = tch::no_grad(|| teacher.forward_t(&input, false));
    assert_eq!(stride_8.size(), [1, 32, 8, 8]);
    assert_eq!(stride_16.size(), [1, 96, 4, 4]);
    for (name, features) in [("features_s8", stride_8), ("features_s16", stride_16)] {
        let torch: Vec<f32> = Vec::try_from(features.flatten(0, -1)).expect("f32 values");
        let openvino = &outputs[0][name];
        let (difference, scale) = largest_difference(&torch, openvino);
        assert!(
            difference <= 1e-3 * scale.max(1.0),
            "{name}: largest difference {difference} (values up to {scale})"
        );
    }
}

#[test]
fn a_checkpoint_missing_a_parameter_is_refused_naming_it() {
    let mut store = tch::nn::VarStore::new(tch::Device::Cpu);
    let _network = torch_mobilenet::MobileNetFeatures::new(&store.root());
    let checkpoint = Backbone::MobilenetV2
        .locate_weights()
        .expect("weights installed");
    let mut tensors =
        inspectflow::backbone::torch_legacy::read_state_dict(&checkpoint).expect("checkpoint");
    tensors.remove("features.3.conv.1.1.running_var");
    let error = torch_mobilenet::load_checkpoint(&mut store, &tensors, "mobilenet.pth")
        .expect_err("a missing parameter is an error");
    assert!(
        error.contains("features.3.conv.1.1.running_var") && error.contains("mobilenet.pth"),
        "{error}"
    );
}

fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("dataset folder")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    files
}

/// A generated carpet set of `size` pixels: 32 training images, 10 normal and 12 anomalous test
/// images with masks.
fn carpet(dir: &std::path::Path, size: usize) -> std::path::PathBuf {
    use inspectflow::synth::{SynthOptions, Texture};
    let data = dir.join("data");
    inspectflow::synth::write_dataset(
        &data,
        &SynthOptions {
            texture: Texture::Carpet,
            size,
            train_normal: 32,
            test_normal: 10,
            test_anomalous: 12,
            seed: 11,
            photo: None,
        },
    )
    .expect("dataset");
    data
}

/// The maps of `images`, as tch computes them, and the IR a briefly trained model of `family`
/// exported at `xml`.
fn train_briefly(
    family: Architecture,
    training: &tch::Tensor,
    images: &tch::Tensor,
    size: usize,
    xml: &std::path::Path,
) -> (tch::Tensor, Vec<f64>) {
    let (_store, teacher) = torch_mobilenet::teacher(tch::Device::Cpu).expect("teacher");
    let settings = training::Settings {
        epochs: 3,
        batch_size: 8,
        learning_rate: 1e-3,
        patience: 0,
        seed: 3,
    };
    let mut losses = Vec::new();
    let mut progress = |report: &EpochReport| losses.push(report.loss);
    let maps = match family {
        Architecture::Stfpm => {
            let (student, _) =
                stfpm::fit(&teacher, training, None, &settings, &mut progress).expect("training");
            stfpm::export(&student, size, xml).expect("export");
            stfpm::anomaly_maps(&teacher, &student, images)
        }
        Architecture::ReverseDistillation => {
            let (decoder, _) =
                reverse_distillation::fit(&teacher, training, None, &settings, &mut progress)
                    .expect("training");
            reverse_distillation::export(&decoder, size, xml).expect("export");
            reverse_distillation::anomaly_maps(&teacher, &decoder, images)
        }
        Architecture::EfficientAd => {
            let (model, _) = efficient_ad::fit(&teacher, training, None, &settings, &mut progress)
                .expect("training");
            model.export(size, xml).expect("export");
            model.anomaly_maps(images)
        }
        other => panic!("{other:?} is not gradient-trained"),
    };
    (maps, losses)
}

/// The IR `family` exports, run by OpenVINO, computes the anomaly maps and scores tch computes
/// (a briefly trained model is enough to compare them).
fn the_ir_computes_what_tch_computes(family: Architecture) {
    const SIZE: usize = 128;
    let dir = tempfile::tempdir().expect("temp dir");
    let data = carpet(dir.path(), SIZE);
    let training = training::load_images(&files(&data.join("train/normal")), SIZE).expect("images");
    let test: Vec<_> = files(&data.join("test/normal"))
        .into_iter()
        .take(2)
        .chain(files(&data.join("test/anomalous")).into_iter().take(2))
        .collect();
    let images = training::load_images(&test, SIZE).expect("test images");
    let xml = dir.path().join("model.xml");
    let (maps, losses) = train_briefly(family, &training, &images, SIZE, &xml);
    // EfficientAD reports its teacher's distillation epochs too.
    assert!(losses.len() >= 3, "{losses:?}");
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );

    let outputs = inspectflow::train::batch::run_model(&xml, "CPU", &test, SIZE, &mut |_| {})
        .expect("OpenVINO runs the IR");
    for (index, output) in outputs.iter().enumerate() {
        let torch: Vec<f32> = Vec::try_from(maps.get(index as i64).flatten(0, -1)).expect("map");
        let openvino = &output["anomaly_map"];
        // Compared after min-max normalisation over tch's map, as packages normalise maps.
        let (low, high) = torch
            .iter()
            .fold((f32::MAX, f32::MIN), |(l, h), v| (l.min(*v), h.max(*v)));
        let span = (high - low).max(f32::EPSILON);
        let difference = torch
            .iter()
            .zip(openvino)
            .map(|(a, b)| ((a - low) / span - (b - low) / span).abs())
            .fold(0f32, f32::max);
        assert!(
            difference <= 1e-3,
            "{family:?} image {index}: largest normalised difference {difference}"
        );
        let score = output["pred_score"][0];
        assert!(
            (score - high).abs() <= 1e-3 * span.max(high.abs()),
            "{family:?} image {index}: IR score {score}, tch {high}"
        );
    }
}

#[test]
fn the_stfpm_ir_computes_what_tch_computes() {
    the_ir_computes_what_tch_computes(Architecture::Stfpm);
}

#[test]
fn the_reverse_distillation_ir_computes_what_tch_computes() {
    the_ir_computes_what_tch_computes(Architecture::ReverseDistillation);
}

#[test]
fn the_efficient_ad_ir_computes_what_tch_computes() {
    the_ir_computes_what_tch_computes(Architecture::EfficientAd);
}

/// Training stops `patience` epochs after the lowest validation loss and keeps that epoch's
/// weights: here every step moves the weight away from what the validation images want.
#[test]
fn training_stops_early_and_keeps_the_best_epochs_weights() {
    let store = tch::nn::VarStore::new(tch::Device::Cpu);
    let weight = store.root().zeros("weight", &[1]);
    let images = tch::Tensor::zeros([4, 3, 8, 8], (tch::Kind::Float, tch::Device::Cpu));
    let loss = |_: &tch::Tensor, train: bool| {
        let target = if train { 10.0 } else { -1.0 };
        (&weight - target)
            .pow_tensor_scalar(2)
            .sum(tch::Kind::Float)
    };
    let settings = training::Settings {
        epochs: 50,
        batch_size: 4,
        learning_rate: 0.1,
        patience: 2,
        seed: 1,
    };
    let mut reports = Vec::new();
    let mut weights = Vec::new();
    let outcome = training::train(
        &store,
        &images,
        Some(&images),
        &settings,
        TrainingPhase::Training,
        &loss,
        &mut |report| {
            reports.push(report.clone());
            weights.push(weight.double_value(&[0]));
        },
    )
    .expect("trains");
    assert_eq!(outcome.best_epoch, 1);
    assert_eq!(outcome.epochs_run, 3, "{reports:?}");
    assert_eq!(reports.len(), 3);
    assert!(reports.iter().all(|r| r.validation_loss.is_some()));
    assert!(
        weights[2] > weights[0],
        "training moved the weight: {weights:?}"
    );
    assert_eq!(
        weight.double_value(&[0]),
        weights[0],
        "the best epoch's weight is back"
    );
}

/// `inspectflow train --model FAMILY` on a generated set: per-epoch progress, a falling loss in
/// the package's metrics, and `inspectflow eval` measures the package (served by OpenVINO): the
/// image AUROC.
fn inspectflow_train_separates_a_generated_sets_anomalies(family: &str, epochs: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = carpet(dir.path(), 128);
    let model = dir.path().join("model");
    let output = std::process::Command::new(inspectflow_program())
        .args([
            "train",
            "--model",
            family,
            "--input-size",
            "128",
            "--progress",
            "json",
        ])
        .args(["--epochs", &epochs.to_string()])
        .arg("--normal")
        .arg(data.join("train/normal"))
        .arg("--snapshots")
        .arg(dir.path().join("cache"))
        .arg("--out")
        .arg(&model)
        .output()
        .expect("inspectflow runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .collect();
    let fitting: Vec<u64> = events
        .iter()
        .filter(|e| e["stage"] == "fitting")
        .filter_map(|e| e["percent"].as_u64())
        .collect();
    assert!(
        fitting.len() >= 5 && fitting.last() == Some(&100),
        "{fitting:?}"
    );
    let epoch_events: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["event"] == "epoch").collect();
    assert!(
        epoch_events
            .iter()
            .all(|e| e["loss"].as_f64().is_some() && e["validation_loss"].as_f64().is_some()),
        "every epoch reports its loss and the validation loss: {epoch_events:?}"
    );

    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model.join("manifest.json")).expect("manifest"),
    )
    .expect("manifest JSON");
    assert_eq!(manifest["architecture"], family);
    let training = &manifest["metrics"]["training"];
    let losses: Vec<f64> = training["loss_per_epoch"]
        .as_array()
        .expect("losses")
        .iter()
        .filter_map(serde_json::Value::as_f64)
        .collect();
    let epochs_run = training["epochs_run"].as_u64().expect("epochs run") as usize;
    assert!((1..=epochs).contains(&epochs_run), "{training}");
    assert_eq!(losses.len(), epochs_run, "{training}");
    assert!(
        training["best_epoch"]
            .as_u64()
            .is_some_and(|b| (1..=epochs_run as u64).contains(&b)),
        "{training}"
    );
    assert!(
        losses[losses.len() - 1] < losses[0],
        "the loss falls: {losses:?}"
    );

    let output = std::process::Command::new(inspectflow_program())
        .args(["eval", "--json", "--model"])
        .arg(&model)
        .arg("--normal")
        .arg(data.join("test/normal"))
        .arg("--anomalous")
        .arg(data.join("test/anomalous"))
        .arg("--masks")
        .arg(data.join("masks"))
        .output()
        .expect("inspectflow runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let evaluation: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("evaluation JSON");
    let auroc = evaluation["summary"]["image_auroc"]
        .as_f64()
        .expect("auroc");
    println!(
        "{family} on the generated carpet set (128 px, {epochs_run} of {epochs} epochs): image \
         AUROC {auroc:.3}, pixel AUROC {}",
        evaluation["summary"]["pixel_auroc"]
    );
    assert!(auroc >= 0.95, "{family}: image AUROC {auroc}");
}

#[test]
fn inspectflow_train_stfpm_separates_a_generated_sets_anomalies() {
    inspectflow_train_separates_a_generated_sets_anomalies("stfpm", 25);
}

#[test]
fn inspectflow_train_reverse_distillation_separates_a_generated_sets_anomalies() {
    inspectflow_train_separates_a_generated_sets_anomalies("reverse_distillation", 25);
}

#[test]
fn inspectflow_train_efficient_ad_separates_a_generated_sets_anomalies() {
    inspectflow_train_separates_a_generated_sets_anomalies("efficient_ad", 25);
}

/// The `inspectflow` program of this build (beside this crate's helper in the target folder).
fn inspectflow_program() -> std::path::PathBuf {
    let helper = std::path::Path::new(env!("CARGO_BIN_EXE_inspectflow-torch"));
    let program = helper.with_file_name("inspectflow");
    assert!(
        program.is_file(),
        "{} is built with the workspace (cargo build --workspace)",
        program.display()
    );
    program
}

/// The same seed on the same images trains the same model on the CPU.
#[test]
fn training_with_the_same_seed_gives_the_same_model() {
    const SIZE: usize = 64;
    let dir = tempfile::tempdir().expect("temp dir");
    let data = carpet(dir.path(), SIZE);
    let training = training::load_images(&files(&data.join("train/normal")), SIZE).expect("images");
    let maps = |name: &str| {
        let xml = dir.path().join(name);
        let (maps, losses) = train_briefly(
            Architecture::ReverseDistillation,
            &training,
            &training.narrow(0, 0, 2),
            SIZE,
            &xml,
        );
        (
            Vec::<f32>::try_from(maps.flatten(0, -1)).expect("maps"),
            losses,
        )
    };
    let (first, first_losses) = maps("first.xml");
    let (second, second_losses) = maps("second.xml");
    assert_eq!(first_losses, second_losses);
    assert_eq!(first, second);
    assert_eq!(
        std::fs::read(dir.path().join("first.bin")).expect("weights"),
        std::fs::read(dir.path().join("second.bin")).expect("weights"),
        "the exported weights are the same"
    );
}
