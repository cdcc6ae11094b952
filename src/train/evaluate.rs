//! Scoring labelled images with an exported model and measuring it: the calibration of a
//! training run (F1-adaptive threshold, min-max normalisation) and `inspectflow eval`. Scores
//! come from the exported IR through the batch graph, the way `predict` and pipelines compute
//! them, so what evaluation reports is what serving does.

use std::path::{Path, PathBuf};

use inspectflow_operators::package::{ModelPackage, Normalization};
use polars::prelude::*;

use super::dataset::{Entry, Label, Split};
use super::{TrainError, batch, io_error, metrics};
use crate::synth::Defect;

/// One scored image.
pub struct Scored {
    /// The image.
    pub entry: Entry,
    /// The model's raw image score.
    pub raw_score: f32,
    /// The raw anomaly map at the model's input size, row-major.
    pub map: Vec<f32>,
    /// The defect mask at the same size: all false for normal images, `None` for anomalous
    /// images without a mask.
    pub mask: Option<Vec<bool>>,
}

/// Paints generated defects (each kind in turn) on the normal validation images, at least 8 of
/// them, and writes them with their masks into `dir`.
pub fn generate_anomalies(
    validation: &[Entry],
    dir: &Path,
    seed: u64,
) -> Result<Vec<Entry>, TrainError> {
    let normals: Vec<&Entry> = validation
        .iter()
        .filter(|e| e.label == Label::Normal)
        .collect();
    if normals.is_empty() {
        return Err(TrainError::Invalid(
            "no normal validation images to generate anomalies from".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(io_error(format!("creating {}", dir.display())))?;
    let count = normals.len().max(8);
    let mut generated = Vec::with_capacity(count);
    for index in 0..count {
        let source = normals[index % normals.len()];
        let mut canvas = crate::synth::read_canvas(&source.path)
            .map_err(|e| TrainError::Invalid(e.to_string()))?;
        let (width, height) = (canvas.width, canvas.height);
        let kind = Defect::ALL[index % Defect::ALL.len()];
        let mask = crate::synth::add_defect(&mut canvas, kind, seed.wrapping_add(index as u64));
        let path = dir.join(format!("{index:04}_{}.png", kind.name()));
        let mask_path = dir.join(format!("{index:04}_{}_mask.png", kind.name()));
        crate::synth::write_png(&path, width, height, 3, &canvas.to_rgb8())
            .map_err(io_error(format!("writing {}", path.display())))?;
        let mask_bytes: Vec<u8> = mask.iter().map(|&m| if m { 255 } else { 0 }).collect();
        crate::synth::write_png(&mask_path, width, height, 1, &mask_bytes)
            .map_err(io_error(format!("writing {}", mask_path.display())))?;
        generated.push(Entry {
            path,
            label: Label::Anomalous,
            mask: Some(mask_path),
            split: Split::Validation,
            sha256: String::new(),
        });
    }
    Ok(generated)
}

/// Reads `mask` (any image; non-zero is defect), checks it has `image`'s size, and resizes it
/// (nearest neighbour) to `size` x `size`.
fn read_mask(mask: &Path, image: &Path, size: usize) -> Result<Vec<bool>, TrainError> {
    let grey = image::open(mask)
        .map_err(|e| TrainError::Invalid(format!("mask {}: {e}", mask.display())))?
        .into_luma8();
    let (width, height) = (grey.width() as usize, grey.height() as usize);
    let (image_width, image_height) = image::image_dimensions(image)
        .map_err(|e| TrainError::Invalid(format!("{}: {e}", image.display())))?;
    if (width, height) != (image_width as usize, image_height as usize) {
        return Err(TrainError::Invalid(format!(
            "mask {} is {width}x{height} but its image {} is {image_width}x{image_height}",
            mask.display(),
            image.display()
        )));
    }
    let pixels = grey.as_raw();
    let mut resized = Vec::with_capacity(size * size);
    for y in 0..size {
        let source_y = ((y as f64 + 0.5) * height as f64 / size as f64) as usize;
        for x in 0..size {
            let source_x = ((x as f64 + 0.5) * width as f64 / size as f64) as usize;
            resized.push(pixels[source_y.min(height - 1) * width + source_x.min(width - 1)] > 127);
        }
    }
    Ok(resized)
}

/// Scores `entries` with the IR at `model_xml`.
pub fn score(
    model_xml: &Path,
    entries: &[Entry],
    input_size: usize,
    progress: &mut dyn FnMut(f32),
) -> Result<Vec<Scored>, TrainError> {
    let files: Vec<PathBuf> = entries.iter().map(|e| e.path.clone()).collect();
    let outputs = batch::run_model(model_xml, &files, input_size, progress)?;
    entries
        .iter()
        .zip(outputs)
        .map(|(entry, mut outputs)| {
            let missing = |name: &str| {
                TrainError::Invalid(format!(
                    "{}: the model has no {name} output",
                    model_xml.display()
                ))
            };
            let raw_score = outputs
                .get("pred_score")
                .and_then(|s| s.first().copied())
                .ok_or_else(|| missing("pred_score"))?;
            let map = outputs
                .remove("anomaly_map")
                .ok_or_else(|| missing("anomaly_map"))?;
            let mask = match (&entry.mask, entry.label) {
                (Some(mask), _) => Some(read_mask(mask, &entry.path, input_size)?),
                (None, Label::Normal) => Some(vec![false; map.len()]),
                (None, Label::Anomalous) => None,
            };
            Ok(Scored {
                entry: entry.clone(),
                raw_score,
                map,
                mask,
            })
        })
        .collect()
}

/// The F1-adaptive threshold on the image scores and the min-max normalisation (lowest map
/// value to highest score or map value) of a validation set with both classes.
pub fn calibrate(scored: &[Scored]) -> Result<Normalization, TrainError> {
    let scores: Vec<f32> = scored.iter().map(|s| s.raw_score).collect();
    let labels: Vec<bool> = scored
        .iter()
        .map(|s| s.entry.label == Label::Anomalous)
        .collect();
    let (threshold, _) = metrics::f1_adaptive_threshold(&scores, &labels)?.ok_or_else(|| {
        TrainError::Invalid("calibration needs anomalous validation images".into())
    })?;
    let values = scored
        .iter()
        .flat_map(|s| s.map.iter().copied().chain(std::iter::once(s.raw_score)));
    let (min, max) = values.fold((f32::MAX, f32::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    Ok(Normalization {
        threshold,
        min: min.min(threshold),
        max: max.max(threshold),
    })
}

/// Results over a labelled image set.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// Images scored.
    pub images: usize,
    /// Normal images among them.
    pub normal: usize,
    /// Anomalous images among them.
    pub anomalous: usize,
    /// The normalised decision threshold.
    pub threshold: f32,
    /// Image AUROC (when both classes are present).
    pub image_auroc: Option<f64>,
    /// Image F1 at the threshold (when anomalies are present).
    pub image_f1: Option<f64>,
    /// Pixel AUROC (when every anomalous image has a mask).
    pub pixel_auroc: Option<f64>,
    /// Pixel F1 at the threshold.
    pub pixel_f1: Option<f64>,
    /// PRO up to a false-positive rate of 0.3.
    pub pro: Option<f64>,
}

/// One row of the per-image table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// File name.
    pub filename: String,
    /// Full path.
    pub path: String,
    /// `normal` or `anomalous`.
    pub label: &'static str,
    /// Raw model score.
    pub raw_score: f32,
    /// Normalised score (threshold at 0.5 unless moved).
    pub score: f32,
    /// `normal` or `anomalous`.
    pub prediction: &'static str,
}

/// An evaluation: the summary and the per-image rows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Evaluation {
    /// The metrics.
    pub summary: Summary,
    /// One row per image.
    pub images: Vec<Row>,
}

impl Evaluation {
    /// The per-image table as a polars frame.
    pub fn table(&self) -> Result<DataFrame, TrainError> {
        let rows = &self.images;
        df!(
            "filename" => rows.iter().map(|r| r.filename.clone()).collect::<Vec<_>>(),
            "path" => rows.iter().map(|r| r.path.clone()).collect::<Vec<_>>(),
            "label" => rows.iter().map(|r| r.label).collect::<Vec<_>>(),
            "raw_score" => rows.iter().map(|r| r.raw_score).collect::<Vec<_>>(),
            "score" => rows.iter().map(|r| r.score).collect::<Vec<_>>(),
            "prediction" => rows.iter().map(|r| r.prediction).collect::<Vec<_>>(),
        )
        .map_err(|e| TrainError::Invalid(format!("building the per-image table: {e}")))
    }
}

/// Measures `scored` under `normalization` with the normalised `threshold`.
pub fn evaluate(
    scored: &[Scored],
    normalization: Normalization,
    threshold: f32,
) -> Result<Evaluation, TrainError> {
    let raw: Vec<f32> = scored.iter().map(|s| s.raw_score).collect();
    let normalised: Vec<f32> = raw.iter().map(|&r| normalization.apply(r)).collect();
    let labels: Vec<bool> = scored
        .iter()
        .map(|s| s.entry.label == Label::Anomalous)
        .collect();
    let anomalous = labels.iter().filter(|&&l| l).count();
    let image_auroc = metrics::roc(&raw, &labels)?.map(|curve| curve.area());
    let image_f1 = (anomalous > 0).then(|| metrics::f1_at(&normalised, &labels, threshold));
    // The raw map value that normalises to `threshold`.
    let spread = (normalization.max - normalization.min).max(f32::EPSILON);
    let raw_threshold = normalization.threshold + (threshold - 0.5) * spread;
    let side = |s: &Scored| (s.map.len() as f64).sqrt() as usize;
    let pixel = if anomalous > 0 && scored.iter().all(|s| s.mask.is_some()) {
        let images: Vec<metrics::PixelImage> = scored
            .iter()
            .filter_map(|s| {
                s.mask.as_ref().map(|mask| metrics::PixelImage {
                    map: &s.map,
                    mask,
                    width: side(s),
                    height: side(s),
                })
            })
            .collect();
        metrics::pixel_metrics(&images, raw_threshold)?
    } else {
        None
    };
    let images = scored
        .iter()
        .zip(&normalised)
        .map(|(s, &score)| Row {
            filename: s
                .entry
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: s.entry.path.to_string_lossy().into_owned(),
            label: s.entry.label.name(),
            raw_score: s.raw_score,
            score,
            prediction: if score >= threshold {
                "anomalous"
            } else {
                "normal"
            },
        })
        .collect();
    Ok(Evaluation {
        summary: Summary {
            images: scored.len(),
            normal: scored.len() - anomalous,
            anomalous,
            threshold,
            image_auroc,
            image_f1,
            pixel_auroc: pixel.map(|p| p.auroc),
            pixel_f1: pixel.map(|p| p.f1),
            pro: pixel.map(|p| p.pro),
        },
        images,
    })
}

/// Evaluates the package at `model_dir` on the images of `sources` (all of them are test
/// images), at the package's threshold unless `threshold` is given.
pub fn evaluate_package(
    model_dir: &Path,
    sources: &super::dataset::Sources,
    threshold: Option<f32>,
    progress: &mut dyn FnMut(f32),
) -> Result<Evaluation, TrainError> {
    let package = ModelPackage::open(model_dir)?;
    let mut entries = super::dataset::list(sources)?;
    for entry in &mut entries {
        entry.split = Split::Test;
    }
    let scored = score(
        &package.model_path(),
        &entries,
        package.manifest.input_size,
        progress,
    )?;
    evaluate(
        &scored,
        package.manifest.normalization,
        threshold.unwrap_or(package.manifest.threshold),
    )
}
