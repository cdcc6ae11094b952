//! Training and evaluation end to end, with real OpenVINO: both model families on generated
//! data, reproducibility, agreement between the trainer's evaluation and `predict`, snapshots,
//! and bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

use inspectflow::backbone::Backbone;
use inspectflow::synth::{SynthOptions, Texture};
use inspectflow::train::dataset::{self, Sources};
use inspectflow::train::{self, Architecture, TrainConfig, evaluate};
use polars::prelude::{ParquetReader, SerReader};

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_inspectflow"))
}

/// A generated carpet dataset: 24 training images, 10 normal and 12 anomalous test images.
fn dataset(dir: &Path) -> PathBuf {
    let out = dir.join("data");
    inspectflow::synth::write_dataset(
        &out,
        &SynthOptions {
            texture: Texture::Carpet,
            size: 256,
            train_normal: 24,
            test_normal: 10,
            test_anomalous: 12,
            seed: 11,
            photo: None,
        },
    )
    .expect("dataset");
    out
}

fn config(architecture: Architecture) -> TrainConfig {
    TrainConfig {
        architecture,
        backbone: Backbone::MobilenetV2,
        input_size: Some(256),
        seed: 5,
        tile: None,
        padim_channels: 100,
        memory_bank: Some(512),
        device: "CPU".into(),
        ..TrainConfig::default()
    }
}

fn test_sources(data: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        data.join("test/normal"),
        data.join("test/anomalous"),
        data.join("masks"),
    )
}

fn train_and_evaluate(
    architecture: Architecture,
    data: &Path,
    out: &Path,
    cache: &Path,
) -> evaluate::Evaluation {
    let normal = data.join("train/normal");
    let sources = Sources {
        normal: &normal,
        anomalous: None,
        masks: None,
    };
    let mut stages = Vec::new();
    train::train(
        &config(architecture),
        &sources,
        cache,
        out,
        &mut |stage: &str, _: f32| {
            if stages.last().map(String::as_str) != Some(stage) {
                stages.push(stage.to_string());
            }
        },
    )
    .unwrap_or_else(|e| panic!("training {architecture:?}: {e}"));
    assert_eq!(
        stages,
        ["snapshot", "features", "fitting", "calibration", "export"],
        "progress reports every stage in order"
    );
    let (normal, anomalous, masks) = test_sources(data);
    evaluate::evaluate_package(
        out,
        &Sources {
            normal: &normal,
            anomalous: Some(&anomalous),
            masks: Some(&masks),
        },
        None,
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("evaluating {architecture:?}: {e}"))
}

#[test]
fn both_models_detect_generated_defects_and_the_same_seed_gives_the_same_metrics() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dataset(dir.path());
    let cache = dir.path().join("snapshots");
    for architecture in [Architecture::Padim, Architecture::Patchcore] {
        let name = architecture.name();
        let first = train_and_evaluate(architecture, &data, &dir.path().join(name), &cache);
        let summary = &first.summary;
        let auroc = summary.image_auroc.expect("image AUROC");
        assert!(auroc >= 0.95, "{name}: image AUROC {auroc}");
        let pixel = summary.pixel_auroc.expect("pixel AUROC");
        assert!(pixel >= 0.9, "{name}: pixel AUROC {pixel}");
        assert!(summary.pro.is_some() && summary.image_f1.is_some());
        assert_eq!((summary.normal, summary.anomalous), (10, 12));

        let again = train_and_evaluate(
            architecture,
            &data,
            &dir.path().join(format!("{name}-again")),
            &cache,
        );
        assert_eq!(
            serde_json::to_value(&first).expect("json"),
            serde_json::to_value(&again).expect("json"),
            "{name}: same seed, same metrics and scores"
        );
        let manifest = |dir: &str| {
            inspectflow::operators::package::ModelPackage::open(std::path::Path::new(dir))
                .expect("package")
                .manifest
        };
        let (a, b) = (
            manifest(&dir.path().join(name).to_string_lossy()),
            manifest(&dir.path().join(format!("{name}-again")).to_string_lossy()),
        );
        assert_eq!(a.normalization, b.normalization);
        assert_eq!(a.metrics["validation"], b.metrics["validation"]);
        assert_eq!(a.architecture, name);
    }
}

/// Scores through `inspectflow predict --json`, by image path.
fn predict(model: &Path, images: &[PathBuf]) -> Vec<(String, f64)> {
    let output = binary()
        .arg("predict")
        .arg("--model")
        .arg(model)
        .arg("--json")
        .args(images)
        .output()
        .expect("runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    report["predictions"]
        .as_array()
        .expect("predictions")
        .iter()
        .map(|p| {
            (
                p["image"].as_str().expect("path").to_string(),
                p["score"].as_f64().expect("score"),
            )
        })
        .collect()
}

/// A generated dataset of `texture` at `size` pixels: `train` normal training images, 4 normal
/// and 4 anomalous test images with masks.
fn small_dataset(dir: &Path, texture: Texture, size: usize, train: usize, seed: u64) -> PathBuf {
    let out = dir.join("data");
    inspectflow::synth::write_dataset(
        &out,
        &SynthOptions {
            texture,
            size,
            train_normal: train,
            test_normal: 4,
            test_anomalous: 4,
            seed,
            photo: None,
        },
    )
    .expect("dataset");
    out
}

/// Evaluates the package at `model` on `data`'s test images (with masks) and checks that
/// `predict` gives every image the score the evaluation gave it.
fn evaluate_and_predict(model: &Path, data: &Path) -> evaluate::Evaluation {
    let (normal, anomalous, masks) = test_sources(data);
    let evaluation = evaluate::evaluate_package(
        model,
        &Sources {
            normal: &normal,
            anomalous: Some(&anomalous),
            masks: Some(&masks),
        },
        None,
        &mut |_| {},
    )
    .expect("evaluates");
    let images: Vec<PathBuf> = evaluation
        .images
        .iter()
        .map(|row| PathBuf::from(&row.path))
        .collect();
    for ((_, score), row) in predict(model, &images).iter().zip(&evaluation.images) {
        assert!(
            (score - f64::from(row.score)).abs() < 1e-4,
            "{}: predict {score}, eval {}",
            row.path,
            row.score
        );
    }
    evaluation
}

#[test]
fn predict_gives_the_scores_of_the_trainers_evaluation_and_the_map_finds_the_defect() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dataset(dir.path());
    let cache = dir.path().join("snapshots");
    for architecture in [Architecture::Padim, Architecture::Patchcore] {
        let model = dir.path().join(architecture.name());
        let evaluation = train_and_evaluate(architecture, &data, &model, &cache);
        let images: Vec<PathBuf> = evaluation
            .images
            .iter()
            .map(|r| r.path.clone().into())
            .collect();
        let predicted = predict(&model, &images);
        assert_eq!(predicted.len(), evaluation.images.len());
        for (row, (path, score)) in evaluation.images.iter().zip(&predicted) {
            assert_eq!(&row.path, path);
            assert!(
                (f64::from(row.score) - score).abs() < 1e-3,
                "{}: evaluation {} vs predict {score}",
                row.filename,
                row.score
            );
        }

        // The trainer's own validation table, for the held-out normal images still on disk.
        let table = dataset::read_snapshot(&model.join("dataset.parquet")).expect("snapshot copy");
        assert_eq!(
            table.len(),
            24,
            "every training-folder image is in the snapshot"
        );
        let held_out: Vec<PathBuf> = table
            .iter()
            .filter(|e| e.split == dataset::Split::Validation)
            .map(|e| e.path.clone())
            .collect();
        assert!(!held_out.is_empty());
        let validation = ParquetReader::new(
            std::fs::File::open(model.join("validation.parquet")).expect("validation table"),
        );
        let frame = validation.finish().expect("parquet");
        let paths = frame
            .column("path")
            .and_then(|c| c.str().cloned())
            .expect("paths");
        let scores = frame
            .column("score")
            .and_then(|c| c.f32().cloned())
            .expect("scores");
        let predicted = predict(&model, &held_out);
        for (path, score) in predicted {
            let row = paths
                .iter()
                .position(|p| p == Some(path.as_str()))
                .expect("held-out image in the validation table");
            let trained = f64::from(scores.get(row).expect("score"));
            assert!(
                (trained - score).abs() < 1e-3,
                "{path}: {trained} vs {score}"
            );
        }

        // Localisation: on each anomalous image the hottest map pixel lies on (or within one
        // feature cell of) the defect mask.
        let (normal, anomalous, masks) = test_sources(&data);
        let sources = Sources {
            normal: &normal,
            anomalous: Some(&anomalous),
            masks: Some(&masks),
        };
        let entries = dataset::list(&sources).expect("entries");
        let scored = evaluate::score(&model.join("model.xml"), "CPU", &entries, 256, &mut |_| {})
            .expect("scores");
        let mut found = 0;
        for image in scored
            .iter()
            .filter(|s| s.entry.label == dataset::Label::Anomalous)
        {
            let mask = image.mask.as_ref().expect("mask");
            let hottest = (0..image.map.len())
                .max_by(|a, b| image.map[*a].total_cmp(&image.map[*b]))
                .expect("map");
            let (hx, hy) = ((hottest % 256) as i64, (hottest / 256) as i64);
            let near = (0..mask.len()).filter(|&i| mask[i]).any(|i| {
                let (x, y) = ((i % 256) as i64, (i / 256) as i64);
                (x - hx).abs() <= 8 && (y - hy).abs() <= 8
            });
            found += usize::from(near);
        }
        assert!(
            found >= 10,
            "{architecture:?}: {found} of 12 defects localised"
        );
    }
}

#[test]
fn snapshots_are_reused_until_the_dataset_changes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let normal = dir.path().join("normal");
    std::fs::create_dir_all(&normal).expect("dir");
    for i in 0..5 {
        let canvas = inspectflow::synth::normal_image(Texture::Grid, 64, 1, i);
        inspectflow::synth::write_png(
            &normal.join(format!("{i}.png")),
            64,
            64,
            3,
            &canvas.to_rgb8(),
        )
        .expect("png");
    }
    let cache = dir.path().join("cache");
    let sources = Sources {
        normal: &normal,
        anomalous: None,
        masks: None,
    };
    let first = dataset::snapshot(&sources, 3, &cache).expect("snapshot");
    assert!(!first.reused);
    assert_eq!(first.entries.len(), 5);
    assert!(first.entries.iter().all(|e| e.sha256.len() == 64));
    assert_eq!(
        first
            .entries
            .iter()
            .filter(|e| e.split == dataset::Split::Validation)
            .count(),
        1
    );
    let second = dataset::snapshot(&sources, 3, &cache).expect("snapshot");
    assert!(second.reused);
    assert_eq!(
        second.entries, first.entries,
        "the Parquet table round-trips"
    );
    // A changed file makes a new snapshot with a new hash for it.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let canvas = inspectflow::synth::normal_image(Texture::Grid, 64, 1, 99);
    inspectflow::synth::write_png(&normal.join("0.png"), 64, 64, 3, &canvas.to_rgb8())
        .expect("png");
    let third = dataset::snapshot(&sources, 3, &cache).expect("snapshot");
    assert!(!third.reused);
    assert_ne!(third.id, first.id);
    assert_ne!(third.entries[0].sha256, first.entries[0].sha256);
    assert_eq!(third.entries[1].sha256, first.entries[1].sha256);
}

/// Runs `inspectflow train` and returns (success, stderr).
fn train_cli(normal: &Path, extra: &[&str], out: &Path, cache: &Path) -> (bool, String) {
    let output = binary()
        .arg("train")
        .arg("--normal")
        .arg(normal)
        .args(extra)
        .arg("--out")
        .arg(out)
        .arg("--snapshots")
        .arg(cache)
        .output()
        .expect("runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Nothing but `keep` is left in `dir`: no package, no partial or scratch directory.
fn only(dir: &Path, keep: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut keep: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
    keep.sort();
    assert_eq!(names, keep, "nothing half-written is left");
}

#[test]
fn bad_training_input_fails_clearly_and_leaves_no_package() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    let cache = root.join("cache");
    std::fs::create_dir_all(&cache).expect("dir");

    // No images.
    let empty = root.join("empty");
    std::fs::create_dir_all(&empty).expect("dir");
    let (ok, error) = train_cli(&empty, &[], &root.join("model"), &cache);
    assert!(
        !ok && error.contains("holds no PNG or JPEG images"),
        "{error}"
    );
    assert!(error.contains("empty"), "names the folder: {error}");
    only(root, &["cache", "empty"]);

    // An unreadable image among good ones.
    let broken = root.join("broken");
    std::fs::create_dir_all(&broken).expect("dir");
    for i in 0..4 {
        let canvas = inspectflow::synth::normal_image(Texture::Wood, 96, 2, i);
        inspectflow::synth::write_png(
            &broken.join(format!("{i}.png")),
            96,
            96,
            3,
            &canvas.to_rgb8(),
        )
        .expect("png");
    }
    std::fs::write(broken.join("3.png"), b"not a png at all").expect("write");
    let (ok, error) = train_cli(
        &broken,
        &["--image-size", "64"],
        &root.join("model"),
        &cache,
    );
    assert!(!ok, "an unreadable image fails the run");
    assert!(
        error.contains("3.png") && error.contains("not a readable"),
        "{error}"
    );
    only(root, &["broken", "cache", "empty"]);

    // A mask whose size does not match its image.
    let anomalous = root.join("anomalous");
    let masks = root.join("masks");
    std::fs::create_dir_all(&anomalous).expect("dir");
    std::fs::create_dir_all(&masks).expect("dir");
    let canvas = inspectflow::synth::normal_image(Texture::Wood, 96, 2, 9);
    inspectflow::synth::write_png(&anomalous.join("a.png"), 96, 96, 3, &canvas.to_rgb8())
        .expect("png");
    inspectflow::synth::write_png(&masks.join("a.png"), 32, 32, 1, &[0u8; 32 * 32]).expect("png");
    std::fs::write(
        broken.join("3.png"),
        std::fs::read(broken.join("2.png")).expect("read"),
    )
    .expect("write");
    let anomalous_arg = anomalous.to_string_lossy().into_owned();
    let masks_arg = masks.to_string_lossy().into_owned();
    let (ok, error) = train_cli(
        &broken,
        &[
            "--image-size",
            "64",
            "--anomalous",
            &anomalous_arg,
            "--masks",
            &masks_arg,
        ],
        &root.join("model"),
        &cache,
    );
    assert!(!ok && error.contains("is 32x32 but its image"), "{error}");
    only(root, &["anomalous", "broken", "cache", "empty", "masks"]);

    // Mixed sizes are fine: every image is resized to the input size.
    let canvas = inspectflow::synth::normal_image(Texture::Wood, 160, 2, 4);
    inspectflow::synth::write_png(&broken.join("4.png"), 160, 160, 3, &canvas.to_rgb8())
        .expect("png");
    let (ok, error) = train_cli(
        &broken,
        &["--image-size", "64"],
        &root.join("model"),
        &cache,
    );
    assert!(ok, "{error}");
    assert!(root.join("model/manifest.json").is_file());

    // A hostile settings file (the form the server hands to training) is refused, naming it and
    // what is wrong, before anything is read or written.
    let settings = root.join("settings.json");
    for (content, named) in [
        (vec![b' '; 100 * 1024], "bytes"),
        (b"{not json".to_vec(), "not JSON"),
        (
            br#"{"model_name": "padim", "neighbours": 9}"#.to_vec(),
            "neighbours",
        ),
        (br#"{"input_size": 4096}"#.to_vec(), "input_size"),
        (b"[1, 2, 3]".to_vec(), "settings"),
    ] {
        std::fs::write(&settings, &content).expect("settings");
        let settings_arg = settings.to_string_lossy().into_owned();
        let (ok, error) = train_cli(
            &broken,
            &["--settings", &settings_arg],
            &root.join("refused"),
            &cache,
        );
        assert!(!ok && error.contains(named), "{named}: {error}");
        assert!(!root.join("refused").exists());
    }
    std::fs::remove_file(&settings).expect("remove");

    // An existing package is never overwritten.
    let (ok, error) = train_cli(
        &broken,
        &["--image-size", "64"],
        &root.join("model"),
        &cache,
    );
    assert!(!ok && error.contains("already exists"), "{error}");

    // A manifest whose model file lies outside its package is refused when the package opens.
    let moved = root.join("moved");
    std::fs::create_dir_all(&moved).expect("folder");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("model/manifest.json")).expect("manifest"))
            .expect("JSON");
    for outside in ["../model/model.xml", "/etc/model.xml"] {
        manifest["model_file"] = outside.into();
        std::fs::write(
            moved.join("manifest.json"),
            serde_json::to_vec(&manifest).expect("JSON"),
        )
        .expect("write");
        let error = inspectflow::operators::package::ModelPackage::open(&moved)
            .expect_err("refused")
            .to_string();
        assert!(error.contains("inside the package"), "{outside}: {error}");
    }
}

/// PatchCore without settings: the input size follows the images (320 here, between 256 and
/// 512), the bank is 10% of the training patches, the thresholds come from held-out normal
/// images (generated anomalies only lower them) with the expected false-positive rate recorded,
/// and the package evaluates and predicts at that size.
#[test]
fn patchcore_defaults_follow_the_training_images_and_record_their_calibration() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = small_dataset(dir.path(), Texture::Grid, 320, 7, 3);
    let normal = data.join("train/normal");
    let sources = Sources {
        normal: &normal,
        anomalous: None,
        masks: None,
    };
    let config = TrainConfig {
        input_size: None,
        memory_bank: None,
        ..config(Architecture::Patchcore)
    };
    let out = dir.path().join("model");
    let report = train::train(
        &config,
        &sources,
        &dir.path().join("cache"),
        &out,
        &mut |_: &str, _: f32| {},
    )
    .expect("trains");
    let manifest = &report.package.manifest;
    assert_eq!(manifest.input_size, 320, "from the images' size");
    let patches = manifest.provenance.training_images * (320 / 8) * (320 / 8);
    let rows = manifest.metrics["memory_bank"]["rows"]
        .as_u64()
        .expect("rows") as usize;
    assert_eq!(
        rows,
        (patches as f64 * 0.1).round() as usize,
        "10% of {patches}"
    );
    let calibration = &manifest.metrics["calibration"];
    let method = calibration["image_method"].as_str().expect("method");
    assert!(
        ["normal tail", "generated anomalies"].contains(&method),
        "{calibration}"
    );
    let rate = calibration["expected_false_positive_rate"]
        .as_f64()
        .expect("rate");
    if method == "normal tail" {
        assert!((rate - 0.01).abs() < 1e-4, "the target: {rate}");
    } else {
        assert!(
            rate > 0.01 && rate < 1.0,
            "generated defects only lower it: {rate}"
        );
    }
    assert!(manifest.normalization.pixel_threshold.is_some());

    let evaluation = evaluate_and_predict(&out, &data);
    assert!(evaluation.summary.image_f1_best.is_some());
    assert!(evaluation.summary.pixel_auroc.is_some());
}

/// A tiled PatchCore package (320x320 input in four overlapping 192x192 tiles, scored as one
/// batch and stitched inside the IR) trains, finds the generated defects, and scores the same
/// through evaluation and `predict`; an impossible tile size is refused up front.
#[test]
fn tiled_patchcore_trains_evaluates_and_predicts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = small_dataset(dir.path(), Texture::Carpet, 320, 12, 8);
    let normal = data.join("train/normal");
    let sources = Sources {
        normal: &normal,
        anomalous: None,
        masks: None,
    };
    let config = TrainConfig {
        input_size: Some(320),
        tile: Some(192),
        memory_bank: Some(256),
        ..config(Architecture::Patchcore)
    };
    let out = dir.path().join("model");
    let report = train::train(
        &config,
        &sources,
        &dir.path().join("cache"),
        &out,
        &mut |_: &str, _: f32| {},
    )
    .expect("trains");
    let manifest = &report.package.manifest;
    assert_eq!(manifest.input_size, 320);
    assert_eq!(
        manifest.metrics["tiling"]["tiles"], 4,
        "{}",
        manifest.metrics
    );
    let evaluation = evaluate_and_predict(&out, &data);
    let auroc = evaluation.summary.image_auroc.expect("auroc");
    assert!(auroc >= 0.9, "tiled image AUROC {auroc}");
    let pixel = evaluation.summary.pixel_auroc.expect("pixel auroc");
    assert!(pixel >= 0.9, "the stitched map finds the defects: {pixel}");

    let refused = TrainConfig {
        tile: Some(320),
        ..config
    };
    let error = train::train(
        &refused,
        &sources,
        &dir.path().join("cache"),
        &dir.path().join("refused"),
        &mut |_: &str, _: f32| {},
    )
    .err()
    .expect("refused");
    assert!(error.to_string().contains("tile: 320"), "{error}");
    assert!(!dir.path().join("refused").exists());
}
