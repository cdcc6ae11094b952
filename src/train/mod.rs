//! Training: fitting anomaly models on images of good parts and exporting them as model packages
//! (one OpenVINO IR holding backbone and head, plus a manifest with calibration and metrics).
//!
//! A run is a sequence of stages, each reported through one progress callback:
//! 1. `snapshot`: freeze the dataset ([`dataset`]);
//! 2. `features`: run backbone + embedding over the training images as a batch graph
//!    ([`batch`]);
//! 3. `fitting`: PaDiM's Gaussians ([`padim`]) or PatchCore's memory bank ([`patchcore`]);
//! 4. `calibration`: score a validation split of held-out normal images and anomalies, labelled
//!    ones when the dataset has them, generated ones ([`crate::synth`]) otherwise; choose the
//!    F1-adaptive threshold and the min-max normalisation, and measure ([`evaluate`]);
//! 5. `export`: write the package atomically.

pub mod batch;
pub mod config;
pub mod dataset;
pub mod evaluate;
pub mod gradient;
pub mod metrics;
pub mod padim;
pub mod patchcore;

use std::path::{Path, PathBuf};
use std::time::Instant;

use inspectflow_operators::OpError;
use inspectflow_operators::package::{self, Manifest, ModelPackage, Provenance};
use inspectflow_operators::transform::preprocess::{Preprocess, PreprocessParams};

use crate::backbone::BackboneError;
use crate::backbone::ir::{Conv2d, IrGraph, Output};
use crate::backbone::tiling::Tiling;
pub use config::{Architecture, EpochReport, TrainConfig, TrainEvent, TrainingPhase};

/// Training or evaluation failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The backbone could not be built.
    #[error(transparent)]
    Backbone(#[from] BackboneError),
    /// The package could not be written or read.
    #[error(transparent)]
    Package(#[from] package::PackageError),
    /// Bad input or a failed step, with what and where.
    #[error("{0}")]
    Invalid(String),
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> TrainError {
    let context = context.into();
    move |source| TrainError::Io { context, source }
}

/// Embeddings of the training images: `maps[i]` is `[channels, height, width]`.
pub struct FeatureMaps {
    /// Channels.
    pub channels: usize,
    /// Feature map height.
    pub height: usize,
    /// Feature map width.
    pub width: usize,
    /// One map per image.
    pub maps: Vec<Vec<f32>>,
}

/// A normalised Gaussian kernel of odd `size`.
fn gaussian_kernel(size: usize, sigma: f32) -> Vec<f32> {
    let centre = (size / 2) as f32;
    let one_d: Vec<f32> = (0..size)
        .map(|i| (-((i as f32 - centre).powi(2)) / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f32 = one_d.iter().sum::<f32>().powi(2);
    let mut kernel = Vec::with_capacity(size * size);
    for a in &one_d {
        for b in &one_d {
            kernel.push(a * b / total);
        }
    }
    kernel
}

/// Smooths a stride-8 map `[1, 1, h, w]` (a Gaussian of sigma 4 input pixels) and resizes it to
/// the input: (smoothed, resized).
pub fn smooth_and_resize(graph: &mut IrGraph, map: Output, input_size: usize) -> (Output, Output) {
    let kernel = gaussian_kernel(5, 0.5);
    let smoothed = graph.convolution(
        "head/smooth",
        map,
        &Conv2d {
            weight_shape: [1, 1, 5, 5],
            weights: &kernel,
            bias: &[0.0],
            stride: 1,
            pads: [2, 2, 2, 2],
            groups: 1,
        },
    );
    let full = graph.resize_bilinear("anomaly_map_resize", smoothed, input_size, input_size);
    (smoothed, full)
}

/// The `preprocess` parameters the models training writes take (their IR normalises inside).
pub fn preprocess_params(input_size: usize) -> serde_json::Value {
    crate::operators::package::preprocess_params(input_size, None)
}

/// A package's preprocessing outside a pipeline (`predict`).
pub fn preprocessor(manifest: &Manifest) -> Result<Preprocess, OpError> {
    let params: PreprocessParams = serde_json::from_value(manifest.preprocess_params())
        .map_err(|e| OpError::param("input_size", e.to_string()))?;
    Preprocess::new(params)
}

/// Where a training run reports how far it is.
pub trait TrainProgress {
    /// A stage (`snapshot`, `features`, `fitting`, `calibration`, `export`) and the fraction of
    /// it done.
    fn stage(&mut self, stage: &str, fraction: f32);

    /// A gradient-trained family finished an epoch.
    fn epoch(&mut self, report: &EpochReport) {
        let _ = report;
    }
}

/// A closure of stage and fraction reports stages only.
impl<F: FnMut(&str, f32)> TrainProgress for F {
    fn stage(&mut self, stage: &str, fraction: f32) {
        self(stage, fraction);
    }
}

/// Progress reports of a run.
pub type Progress<'a> = &'a mut dyn TrainProgress;

/// What a training run produced.
pub struct TrainReport {
    /// The package.
    pub package: ModelPackage,
    /// Validation results (also in the manifest).
    pub validation: evaluate::Evaluation,
    /// Whether the dataset snapshot was reused from the cache.
    pub snapshot_reused: bool,
    /// The dataset snapshot's id (its file in the cache is `<id>.parquet`).
    pub snapshot_id: String,
    /// Seconds spent.
    pub seconds: f64,
}

/// The fitted head of either family.
enum Head {
    Padim(padim::PadimStats),
    Patchcore(patchcore::PatchcoreBank),
}

/// Backbone plus the family's embedding; the output is `[1, channels, h/8, w/8]`.
fn network_with_embedding(
    config: &TrainConfig,
    input_size: usize,
    tiling: Option<&Tiling>,
    padim_indices: &[usize],
) -> Result<(IrGraph, Output), TrainError> {
    let mut network = config.backbone.network_tiled(input_size, tiling)?;
    let mut embedded = match config.architecture {
        Architecture::Padim => padim::embedding(&mut network, padim_indices),
        Architecture::Patchcore => patchcore::embedding(&mut network),
        family => {
            return Err(TrainError::Invalid(format!(
                "{} has no embedding graph (it is gradient-trained)",
                family.name()
            )));
        }
    };
    if let Some(tiling) = tiling {
        embedded = tiling.stitch(&mut network.graph, embedded, 8, "tiling/stitched");
    }
    Ok((network.graph, embedded))
}

/// The input size of a run that names none. PaDiM and STFPM: 256 (its Gaussians grow with the square of
/// the size). PatchCore: the training images' shorter side, rounded down to a multiple of 32,
/// from 256 to 512, so that defects of a few pixels in big images survive the resize (on the
/// DeepPCB cross-board split 512 lifts image AUROC from 0.80 to 0.94; BENCHMARKS.md) at a
/// quarter of the frame rate of 256.
pub fn default_input_size(
    architecture: Architecture,
    snapshot: &dataset::Snapshot,
) -> Result<usize, TrainError> {
    const SMALLEST: usize = 256;
    const LARGEST: usize = 512;
    if architecture != Architecture::Patchcore {
        return Ok(SMALLEST);
    }
    let mut shorter_side = usize::MAX;
    for entry in snapshot
        .entries
        .iter()
        .filter(|e| e.split == dataset::Split::Train)
    {
        let (width, height) = image::image_dimensions(&entry.path)
            .map_err(|e| TrainError::Invalid(format!("{}: {e}", entry.path.display())))?;
        shorter_side = shorter_side.min(width.min(height) as usize);
    }
    Ok((shorter_side / 32 * 32).clamp(SMALLEST, LARGEST))
}

/// Trains a model on the dataset at `sources` and writes its package to `out` (which must not
/// exist). Nothing is left at `out` unless the whole run succeeds.
pub fn train(
    config: &TrainConfig,
    sources: &dataset::Sources,
    snapshot_cache: &Path,
    out: &Path,
    progress: Progress,
) -> Result<TrainReport, TrainError> {
    let started = Instant::now();
    config.validate().map_err(TrainError::Invalid)?;
    if out.exists() {
        return Err(TrainError::Invalid(format!(
            "{} already exists; choose a new model directory",
            out.display()
        )));
    }
    progress.stage("snapshot", 0.0);
    let snapshot = dataset::snapshot(sources, config.seed, snapshot_cache)?;
    progress.stage("snapshot", 1.0);
    let input_size = match config.input_size {
        Some(size) => size,
        None => default_input_size(config.architecture, &snapshot)?,
    };
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let scratch = out.with_file_name(format!(".{name}.scratch"));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)
        .map_err(io_error(format!("creating {}", scratch.display())))?;
    let result = train_in(
        config, input_size, &snapshot, out, &scratch, started, progress,
    );
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn train_in(
    config: &TrainConfig,
    input_size: usize,
    snapshot: &dataset::Snapshot,
    out: &Path,
    scratch: &Path,
    started: Instant,
    progress: Progress,
) -> Result<TrainReport, TrainError> {
    let training: Vec<PathBuf> = snapshot
        .entries
        .iter()
        .filter(|e| e.split == dataset::Split::Train)
        .map(|e| e.path.clone())
        .collect();

    // The deployable IR, and what the family adds to the package's metrics.
    let (model_xml, family_metrics) = match config.architecture {
        Architecture::Stfpm | Architecture::ReverseDistillation | Architecture::EfficientAd => {
            // The validation split's normal images decide when training stops (and set
            // EfficientAD's map normalisation); they are never trained on.
            let validation: Vec<PathBuf> = snapshot
                .entries
                .iter()
                .filter(|e| {
                    e.split == dataset::Split::Validation && e.label == dataset::Label::Normal
                })
                .map(|e| e.path.clone())
                .collect();
            gradient::train_student(
                config,
                input_size,
                &training,
                &validation,
                scratch,
                progress,
            )?
        }
        Architecture::Padim | Architecture::Patchcore => {
            statistical_model(config, input_size, &training, scratch, progress)?
        }
    };

    // Calibration on the validation split.
    let mut validation: Vec<dataset::Entry> = snapshot
        .entries
        .iter()
        .filter(|e| e.split == dataset::Split::Validation)
        .cloned()
        .collect();
    let labelled = validation
        .iter()
        .any(|e| e.label == dataset::Label::Anomalous);
    if !labelled {
        let generated =
            evaluate::generate_anomalies(&validation, &scratch.join("generated"), config.seed)?;
        validation.extend(generated);
    }
    let scored = evaluate::score(
        &model_xml,
        &config.device,
        &validation,
        input_size,
        &mut |f| progress.stage("calibration", f),
    )?;
    let calibration = evaluate::calibrate(&scored, labelled)?;
    let normalization = calibration.normalization;
    let evaluation = evaluate::evaluate(&scored, normalization, 0.5)?;

    // Export.
    progress.stage("export", 0.0);
    let mut metrics = serde_json::json!({
        "validation": evaluation.summary,
        "validation_anomalies": if labelled { "labelled" } else { "generated" },
        "calibration": calibration,
        "training_seconds": started.elapsed().as_secs_f64(),
    });
    if let Some(object) = metrics.as_object_mut() {
        object.extend(family_metrics);
    }
    let manifest = Manifest {
        format_version: package::FORMAT_VERSION,
        architecture: config.architecture.name().into(),
        backbone: config.backbone.name().into(),
        input_size,
        model_file: package::MODEL_FILE.into(),
        normalization,
        threshold: 0.5,
        metrics,
        provenance: Provenance {
            inspectflow_version: env!("CARGO_PKG_VERSION").into(),
            created_unix_ms: package::unix_millis_now(),
            training_images: training.len(),
            calibration_images: scored.len(),
            seed: config.seed,
            dataset_snapshot: Some(snapshot.id.clone()),
        },
        input_normalization: None,
    };
    let mut table = evaluation.table()?;
    let package = ModelPackage::create(out, &manifest, |target| {
        std::fs::rename(&model_xml, target)?;
        std::fs::rename(
            model_xml.with_extension("bin"),
            target.with_extension("bin"),
        )?;
        let dir = target.parent().unwrap_or(Path::new("."));
        std::fs::copy(&snapshot.file, dir.join("dataset.parquet"))?;
        dataset::write_parquet(&dir.join("validation.parquet"), &mut table)
            .map_err(std::io::Error::other)
    })?;
    progress.stage("export", 1.0);
    Ok(TrainReport {
        package,
        validation: evaluation,
        snapshot_reused: snapshot.reused,
        snapshot_id: snapshot.id.clone(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// PaDiM or PatchCore: features of the training images through the embedding graph, the fitted
/// head, and the deployable IR (the same graph with the head appended), in `scratch`.
fn statistical_model(
    config: &TrainConfig,
    input_size: usize,
    training: &[PathBuf],
    scratch: &Path,
    progress: Progress,
) -> Result<(PathBuf, serde_json::Map<String, serde_json::Value>), TrainError> {
    // Features of the training images, through the embedding graph. The deployable IR is the
    // same graph with the head appended instead of the `embedding` output.
    let [c8, c16] = config.backbone.feature_channels();
    let padim_indices = padim::channel_subset(c8 + c16, config.padim_channels, config.seed);
    let tiling = config
        .tile
        .map(|tile| Tiling::new(input_size, tile))
        .transpose()
        .map_err(TrainError::Invalid)?;
    let (mut graph, embedded) =
        network_with_embedding(config, input_size, tiling.as_ref(), &padim_indices)?;
    let shape = graph.shape(embedded).to_vec();
    let mut embedding_graph = graph.clone();
    embedding_graph.result("embedding", embedded);
    let embedding_xml = scratch.join("embedding.xml");
    embedding_graph
        .write(&embedding_xml)
        .map_err(io_error(format!("writing {}", embedding_xml.display())))?;
    let mut features_progress = |f| progress.stage("features", f);
    let head = match config.architecture {
        Architecture::Padim => {
            let outputs = batch::run_model(
                &embedding_xml,
                &config.device,
                training,
                input_size,
                &mut features_progress,
            )?;
            let features = FeatureMaps {
                channels: shape[1],
                height: shape[2],
                width: shape[3],
                maps: outputs
                    .into_iter()
                    .map(|mut o| o.remove("embedding").unwrap_or_default())
                    .collect(),
            };
            Head::Padim(padim::fit(&features, &mut |f| {
                progress.stage("fitting", f)
            })?)
        }
        Architecture::Patchcore => {
            let mut patches = patchcore::PatchSampler::new(
                shape[1],
                shape[2] * shape[3],
                training.len(),
                config.seed,
            );
            batch::run_model_each(
                &embedding_xml,
                &config.device,
                training,
                input_size,
                &mut features_progress,
                &mut |mut outputs| patches.add(&outputs.remove("embedding").unwrap_or_default()),
            )?;
            Head::Patchcore(patchcore::fit(
                patches,
                config.memory_bank,
                patchcore::SUPPORT_NEIGHBOURS,
                config.seed,
                &mut |f| progress.stage("fitting", f),
            )?)
        }
        family => {
            return Err(TrainError::Invalid(format!(
                "{} is not fitted on features (it is gradient-trained)",
                family.name()
            )));
        }
    };
    drop(embedding_graph);

    // The deployable IR.
    match &head {
        Head::Padim(stats) => padim::head(&mut graph, embedded, stats, input_size),
        Head::Patchcore(bank) => patchcore::head(&mut graph, embedded, bank, input_size),
    }
    let model_xml = scratch.join(package::MODEL_FILE);
    graph
        .write(&model_xml)
        .map_err(io_error(format!("writing {}", model_xml.display())))?;

    let mut metrics = serde_json::Map::new();
    if let Some(tiling) = &tiling {
        metrics.insert(
            "tiling".into(),
            serde_json::json!({"tile": tiling.tile, "tiles": tiling.count()}),
        );
    }
    if let Head::Patchcore(bank) = &head {
        metrics.insert(
            "memory_bank".into(),
            serde_json::json!({
                "rows": bank.bank.len() / bank.dim,
                "dim": bank.dim,
                "neighbours": bank.neighbours,
            }),
        );
    }
    Ok((model_xml, metrics))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaussian_kernels_sum_to_one() {
        let kernel = gaussian_kernel(5, 0.5);
        assert!((kernel.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(kernel[12] > kernel[0]);
    }
}
