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

/// Scores `entries` with the IR at `model_xml` on `device`.
pub fn score(
    model_xml: &Path,
    device: &str,
    entries: &[Entry],
    input_size: usize,
    progress: &mut dyn FnMut(f32),
) -> Result<Vec<Scored>, TrainError> {
    let files: Vec<PathBuf> = entries.iter().map(|e| e.path.clone()).collect();
    let outputs = batch::run_model(model_xml, device, &files, input_size, progress)?;
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

/// The target of thresholds calibrated without labelled anomalies: the share of good parts a
/// threshold may flag, read off the normal scores' fitted tail.
pub const TARGET_FALSE_POSITIVE_RATE: f64 = 0.01;

/// Where between the highest passed and the lowest flagged validation score a threshold from
/// generated anomalies falls: near the normal side, as painted defects are easier than real ones
/// (across the report's datasets the worst F1 against the best on the test scores went from
/// 0.88 at the midpoint to 0.91).
const GENERATED_CUT: f64 = 0.25;

/// How a package's thresholds were chosen: the manifest's `metrics.calibration`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Calibration {
    /// The thresholds and the min-max normalisation.
    pub normalization: Normalization,
    /// How the image threshold was chosen: `labelled anomalies` (best F1 on them),
    /// `normal tail` (the normal scores' fitted tail at [`TARGET_FALSE_POSITIVE_RATE`]) or
    /// `generated anomalies` (best F1 on defects painted on held-out normal images, where that
    /// threshold is the lower one).
    pub image_method: &'static str,
    /// Share of good parts the image threshold is expected to flag, from a normal distribution
    /// fitted to the held-out normal images' scores.
    pub expected_false_positive_rate: f64,
    /// Held-out normal images the tail was fitted on.
    pub normal_images: usize,
    /// Their scores' mean and standard deviation.
    pub normal_mean: f32,
    /// See `normal_mean`.
    pub normal_std: f32,
}

/// The standard normal's upper tail, `P(Z > z)` (Abramowitz and Stegun 26.2.17, error below
/// 1e-7).
fn upper_tail(z: f64) -> f64 {
    if z < 0.0 {
        return 1.0 - upper_tail(-z);
    }
    let t = 1.0 / (1.0 + 0.231_641_9 * z);
    let poly = t
        * (0.319_381_530
            + t * (-0.356_563_782
                + t * (1.781_477_937 + t * (-1.821_255_978 + t * 1.330_274_429))));
    (-z * z / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt() * poly
}

/// The `z` with `upper_tail(z) = rate`, by bisection.
fn upper_quantile(rate: f64) -> f64 {
    let (mut low, mut high) = (-10.0f64, 10.0f64);
    for _ in 0..100 {
        let middle = (low + high) / 2.0;
        if upper_tail(middle) > rate {
            low = middle;
        } else {
            high = middle;
        }
    }
    (low + high) / 2.0
}

/// Chooses the thresholds from a validation set of held-out normal images and anomalies
/// (`labelled` ones, or generated), and the min-max normalisation (lowest map value to highest
/// score or map value).
///
/// The image threshold: with labelled anomalies, the one with the best F1 on them. Without, a
/// normal distribution is fitted to the normal images' scores and the threshold is the score it
/// exceeds with probability [`TARGET_FALSE_POSITIVE_RATE`]; generated anomalies only lower it,
/// to their best-F1 cut (a quarter of the way from its normal side), when that is lower: painted defects are cruder than real ones, so
/// a threshold placed between them and the normal images is too high whenever they are easy,
/// but where they are hard to tell from normal images real defects are too. The pixel
/// threshold is the best-F1 threshold over the validation anomalies' pixels, apart from the
/// image threshold.
pub fn calibrate(scored: &[Scored], labelled: bool) -> Result<Calibration, TrainError> {
    let scores: Vec<f32> = scored.iter().map(|s| s.raw_score).collect();
    let labels: Vec<bool> = scored
        .iter()
        .map(|s| s.entry.label == Label::Anomalous)
        .collect();
    let normal: Vec<f64> = scored
        .iter()
        .filter(|s| s.entry.label == Label::Normal)
        .map(|s| f64::from(s.raw_score))
        .collect();
    if normal.is_empty() {
        return Err(TrainError::Invalid(
            "calibration needs held-out normal images".into(),
        ));
    }
    let mean = normal.iter().sum::<f64>() / normal.len() as f64;
    let variance =
        normal.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (normal.len().max(2) - 1) as f64;
    // A floor on the spread keeps one image, or identical scores, from giving a zero-width tail.
    let std = variance.sqrt().max(mean.abs() * 1e-3).max(1e-6);
    let best_f1 = metrics::best_f1_cut(&scores, &labels)?;
    let tail = (mean + upper_quantile(TARGET_FALSE_POSITIVE_RATE) * std) as f32;
    let (threshold, image_method) = match best_f1 {
        Some(cut) if labelled => (cut.between(0.5), "labelled anomalies"),
        // A quarter of the way from the normal side of the gap: real defects score lower
        // than painted ones.
        Some(cut) if cut.between(GENERATED_CUT) < tail => {
            (cut.between(GENERATED_CUT), "generated anomalies")
        }
        _ => (tail, "normal tail"),
    };
    let expected_false_positive_rate = upper_tail((f64::from(threshold) - mean) / std);

    let mut pixel_scores = Vec::new();
    let mut pixel_labels = Vec::new();
    for s in scored {
        if let Some(mask) = &s.mask {
            pixel_scores.extend_from_slice(&s.map);
            pixel_labels.extend_from_slice(mask);
        }
    }
    let pixel_threshold = metrics::f1_adaptive_threshold(&pixel_scores, &pixel_labels)?
        .map(|(threshold, _)| threshold);

    let values = scored
        .iter()
        .flat_map(|s| s.map.iter().copied().chain(std::iter::once(s.raw_score)));
    let (min, max) = values.fold((f32::MAX, f32::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let lowest = pixel_threshold.map_or(threshold, |p| p.min(threshold));
    let highest = pixel_threshold.map_or(threshold, |p| p.max(threshold));
    Ok(Calibration {
        normalization: Normalization {
            threshold,
            min: min.min(lowest),
            max: max.max(highest),
            pixel_threshold,
        },
        image_method,
        expected_false_positive_rate,
        normal_images: normal.len(),
        normal_mean: mean as f32,
        normal_std: std as f32,
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
    /// The best image F1 any threshold gives on the same scores, for comparison.
    pub image_f1_best: Option<f64>,
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
    let image_f1_best = metrics::f1_adaptive_threshold(&raw, &labels)?.map(|(_, f1)| f1);
    // The raw map value that normalises to `threshold`.
    let spread = (normalization.max - normalization.min).max(f32::EPSILON);
    let raw_threshold = normalization
        .pixel_threshold
        .unwrap_or(normalization.threshold)
        + (threshold - 0.5) * spread;
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
            image_f1_best,
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
        crate::operators::infer::model::DEFAULT_DEVICE,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scored(raw_score: f32, label: Label) -> Scored {
        let anomalous = label == Label::Anomalous;
        Scored {
            entry: Entry {
                path: PathBuf::from(format!("{raw_score}.png")),
                label,
                mask: None,
                split: Split::Validation,
                sha256: String::new(),
            },
            raw_score,
            // A 2x2 map: the defect pixel scores high in anomalies.
            map: vec![1.0, 1.0, 1.0, if anomalous { 9.0 } else { 1.5 }],
            mask: Some(vec![false, false, false, anomalous]),
        }
    }

    /// Normal scores 9.0 to 11.0: mean 10, sample standard deviation about 0.65.
    fn normals() -> Vec<Scored> {
        (0..9)
            .map(|i| scored(9.0 + 0.25 * i as f32, Label::Normal))
            .collect()
    }

    #[test]
    fn the_normal_tail_sets_the_threshold_when_generated_defects_are_easy() {
        let mut set = normals();
        set.extend((0..5).map(|i| scored(30.0 + i as f32, Label::Anomalous)));
        let calibration = calibrate(&set, false).expect("calibrates");
        assert_eq!(calibration.image_method, "normal tail");
        let std = (0..9).map(|i| (0.25 * i as f64 - 1.0).powi(2)).sum::<f64>() / 8.0;
        let expected = 10.0 + upper_quantile(TARGET_FALSE_POSITIVE_RATE) * std.sqrt();
        assert!(
            (f64::from(calibration.normalization.threshold) - expected).abs() < 1e-3,
            "{calibration:?}"
        );
        assert!((calibration.expected_false_positive_rate - 0.01).abs() < 1e-4);
        // The easy defects would have put it half-way to them, at 20.5.
        assert!(calibration.normalization.threshold < 12.0);
        // Pixels: 1.5 (normal) and 9.0 (defect) are told apart at their own threshold.
        let pixel = calibration.normalization.pixel_threshold.expect("pixel");
        assert!(pixel > 1.5 && pixel <= 9.0, "{pixel}");
    }

    #[test]
    fn hard_generated_defects_lower_the_threshold_and_labelled_ones_win() {
        let mut set = normals();
        set.extend((0..5).map(|i| scored(10.9 + 0.01 * i as f32, Label::Anomalous)));
        let generated = calibrate(&set, false).expect("calibrates");
        assert_eq!(generated.image_method, "generated anomalies");
        // The best cut flags 10.9 and up (and the normal 11.0); the next lower score is the
        // normal 10.75: a quarter of the way from it.
        let threshold = generated.normalization.threshold;
        assert!((threshold - 10.7875).abs() < 1e-4, "{threshold}");
        assert!(generated.expected_false_positive_rate > 0.01);
        let labelled = calibrate(&set, true).expect("calibrates");
        assert_eq!(labelled.image_method, "labelled anomalies");
        let threshold = labelled.normalization.threshold;
        assert!(
            (threshold - 10.825).abs() < 1e-4,
            "labelled: the midpoint, {threshold}"
        );
    }

    #[test]
    fn the_tail_quantile_inverts_the_tail() {
        assert!((upper_tail(0.0) - 0.5).abs() < 1e-7);
        assert!((upper_tail(1.959_964) - 0.025).abs() < 1e-6);
        assert!((upper_quantile(0.01) - 2.326_348).abs() < 1e-4);
        assert!(calibrate(&[], false).is_err(), "no normal images");
    }
}
