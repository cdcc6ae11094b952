//! `inspectflow train` and `inspectflow predict`: fit a model package on a folder of normal
//! images; score image files with a package, print the verdicts and write overlay images.
//! Prediction uses the same operators as pipelines (preprocess, the anomaly post-processing and
//! the heatmap), so a verdict here is the verdict a camera pipeline gives.

use std::path::{Path, PathBuf};

use inspectflow::operators::BufferPool;
use inspectflow::operators::decode;
use inspectflow::operators::infer::model::{CompileOptions, LoadedModel};
use inspectflow::operators::package::ModelPackage;
use inspectflow::operators::packet::ModelOutput;
use inspectflow::operators::transform::anomaly::AnomalyPostprocess;
use inspectflow::operators::transform::encode::{EncodeParams, EncodeSource, JpegEncoder};
use inspectflow::operators::transform::heatmap::{self, HeatmapParams};
use inspectflow::train::padim;

/// One image's verdict.
#[derive(Debug, serde::Serialize)]
struct Verdict {
    image: PathBuf,
    score: f32,
    raw_score: f32,
    threshold: f32,
    label: &'static str,
    overlay: Option<PathBuf>,
}

/// One image that could not be scored.
#[derive(Debug, serde::Serialize)]
struct Failure {
    image: PathBuf,
    error: String,
}

/// Scores `images`; returns whether every image was scored. Errors that concern the model (it
/// cannot be opened or compiled) end the command; errors that concern one image are reported and
/// the others are still scored.
pub fn predict(
    model_dir: &Path,
    images: &[PathBuf],
    out: Option<&Path>,
    json: bool,
    threshold: Option<f32>,
) -> Result<bool, String> {
    let package = ModelPackage::open(model_dir).map_err(|e| e.to_string())?;
    let manifest = &package.manifest;
    let mut model = LoadedModel::load(&package.model_path(), &CompileOptions::default())
        .map_err(|e| e.to_string())?;
    let mut preprocess = padim::preprocessor(manifest.input_size).map_err(|e| e.to_string())?;
    let threshold = threshold.unwrap_or(manifest.threshold);
    if !(0.0..=1.0).contains(&threshold) {
        return Err(format!("--threshold {threshold} is outside 0-1"));
    }
    let mut postprocess = AnomalyPostprocess::new(manifest.normalization, threshold, 0.0);
    if let Some(dir) = out {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let frames = BufferPool::new(4);
    let outputs_pool = BufferPool::new(8);
    let overlays = BufferPool::new(4);
    let overlay_params = HeatmapParams {
        alpha: 0.4,
        outline: true,
        label: true,
    };
    let mut jpeg = JpegEncoder::new(EncodeParams {
        quality: 90,
        source: EncodeSource::Frame,
    })
    .map_err(|e| e.to_string())?;
    let mut verdicts = Vec::new();
    let mut failures = Vec::new();
    for (index, image) in images.iter().enumerate() {
        let scored = (|| -> Result<Verdict, String> {
            let frame =
                decode::read_rgb(image, &frames, index as u64).map_err(|e| e.to_string())?;
            let tensor = preprocess.tensor_for(&frame).map_err(|e| e.to_string())?;
            let outputs: Vec<ModelOutput> = model
                .infer(tensor.data())
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|output| {
                    let mut values = outputs_pool.get(output.values.len());
                    values.copy_from_slice(&output.values);
                    ModelOutput {
                        name: output.name,
                        shape: output.shape.iter().map(|&d| d.max(0) as usize).collect(),
                        values,
                    }
                })
                .collect();
            let prediction = postprocess
                .predict(&outputs, frame.layout.width, frame.layout.height)
                .map_err(|e| e.to_string())?;
            let overlay = match out {
                Some(dir) => {
                    let drawn = heatmap::render(&frame, &prediction, &overlay_params, &overlays)
                        .map_err(|e| e.to_string())?;
                    let stem = image
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let path = dir.join(format!("{stem}.overlay.jpg"));
                    write_jpeg(&mut jpeg, &path, &drawn)?;
                    Some(path)
                }
                None => None,
            };
            Ok(Verdict {
                image: image.clone(),
                score: prediction.score,
                raw_score: prediction.raw_score,
                threshold: prediction.threshold,
                label: if prediction.anomalous {
                    "Anomalous"
                } else {
                    "Normal"
                },
                overlay,
            })
        })();
        match scored {
            Ok(verdict) => {
                if !json {
                    println!(
                        "{}: {} {:.3} (raw {:.3}, threshold {:.2}){}",
                        verdict.image.display(),
                        verdict.label,
                        verdict.score,
                        verdict.raw_score,
                        verdict.threshold,
                        verdict
                            .overlay
                            .as_ref()
                            .map(|p| format!(" -> {}", p.display()))
                            .unwrap_or_default()
                    );
                }
                verdicts.push(verdict);
            }
            Err(error) => {
                eprintln!("{}: {error}", image.display());
                failures.push(Failure {
                    image: image.clone(),
                    error,
                });
            }
        }
    }
    if json {
        let document =
            serde_json::json!({"model": model_dir, "predictions": verdicts, "errors": failures});
        println!(
            "{}",
            serde_json::to_string_pretty(&document).unwrap_or_default()
        );
    }
    Ok(failures.is_empty())
}

fn write_jpeg(
    encoder: &mut JpegEncoder,
    path: &Path,
    frame: &inspectflow::operators::Frame,
) -> Result<(), String> {
    let encoded = encoder
        .encode(frame)
        .map_err(|e| format!("encoding {}: {e}", path.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.partial"));
    std::fs::write(&temporary, encoded.bytes())
        .map_err(|e| format!("writing {}: {e}", temporary.display()))?;
    std::fs::rename(&temporary, path).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Trains a model on every PNG or JPEG in `normal_dir` (sorted by name) and writes the package.
pub fn train(
    normal_dir: &Path,
    family: &str,
    backbone: &str,
    image_size: usize,
    seed: u64,
    out: &Path,
) -> Result<(), String> {
    if family != "padim" {
        return Err(format!("--model {family}: only padim is available so far"));
    }
    let backbone = inspectflow::backbone::Backbone::from_name(backbone)
        .ok_or_else(|| format!("--backbone {backbone}: use mobilenet_v2 or efficientnet_lite0"))?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(normal_dir)
        .map_err(|e| format!("cannot read {}: {e}", normal_dir.display()))?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!(
            "{} holds no PNG or JPEG images",
            normal_dir.display()
        ));
    }
    let pool = BufferPool::new(files.len() + 1);
    let mut frames = Vec::with_capacity(files.len());
    for (index, file) in files.iter().enumerate() {
        frames.push(decode::read_rgb(file, &pool, index as u64).map_err(|e| e.to_string())?);
    }
    let config = padim::PadimConfig {
        backbone,
        input_size: image_size,
        channels: 100.min(backbone.feature_channels().iter().sum()),
        seed,
    };
    let started = std::time::Instant::now();
    let package = padim::train(&config, &frames, out).map_err(|e| e.to_string())?;
    println!(
        "trained {} on {} images ({} for calibration) in {:.1} s -> {}",
        package.manifest.architecture,
        package.manifest.provenance.training_images,
        package.manifest.provenance.calibration_images,
        started.elapsed().as_secs_f64(),
        package.dir.display()
    );
    Ok(())
}
