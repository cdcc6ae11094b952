//! `inspectflow train`, `eval`, `synth` and `predict`: fit a model package on a folder of
//! normal images, measure one on labelled images, generate a dataset to try them on, and score
//! image files with a package (verdicts and overlay images).
//! Prediction uses the same operators as pipelines (preprocess, the anomaly post-processing and
//! the heatmap), so a verdict here is the verdict a camera pipeline gives.

use std::path::{Path, PathBuf};

use inspectflow::backbone::Backbone;
use inspectflow::operators::decode;
use inspectflow::operators::transform::encode::{EncodeParams, EncodeSource, JpegEncoder};
use inspectflow::predictor::Predictor;
use inspectflow::synth::{SynthOptions, Texture};
use inspectflow::train::{self, Architecture, TrainConfig, dataset, evaluate};

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
    let mut predictor = Predictor::load(model_dir, threshold)?;
    if let Some(dir) = out {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let mut jpeg = JpegEncoder::new(EncodeParams {
        quality: 90,
        source: EncodeSource::Frame,
    })
    .map_err(|e| e.to_string())?;
    let mut verdicts = Vec::new();
    let mut failures = Vec::new();
    for (index, image) in images.iter().enumerate() {
        let scored = (|| -> Result<Verdict, String> {
            let frame = decode::read_rgb(image, predictor.frame_pool(), index as u64)
                .map_err(|e| e.to_string())?;
            let prediction = predictor.score(&frame)?;
            let overlay = match out {
                Some(dir) => {
                    let drawn = predictor.overlay(&frame, &prediction)?;
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
                label: prediction.label().as_str(),
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

/// Options of `inspectflow train`.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Folder of normal images (PNG or JPEG; sizes may differ).
    #[arg(long)]
    normal: PathBuf,
    /// Folder of anomalous images; with it, calibration uses them instead of generated anomalies.
    #[arg(long)]
    anomalous: Option<PathBuf>,
    /// Folder of masks of the anomalous images (`<name>.png` or `<name>_mask.png`).
    #[arg(long)]
    masks: Option<PathBuf>,
    /// Model family.
    #[arg(long, value_enum, default_value = "padim")]
    model: Architecture,
    /// mobilenet_v2 or efficientnet_lite0.
    #[arg(long, default_value = "mobilenet_v2")]
    backbone: String,
    /// Square input size, a multiple of 32 [default: PaDiM 256; PatchCore the training images'
    /// shorter side from 256 to 512, which keeps small defects in big images].
    #[arg(long)]
    image_size: Option<usize>,
    /// Cut the input into overlapping tiles of this many pixels (a multiple of 32, smaller than
    /// the image size), scored as one batch and stitched back: small defects in big images at
    /// the backbone's own scale.
    #[arg(long)]
    tile: Option<usize>,
    /// Seed of every random choice; the same seed on the same data gives the same model.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// PaDiM: channels kept of the concatenated features.
    #[arg(long, default_value_t = 100)]
    padim_channels: usize,
    /// PatchCore: memory bank rows [default: 10% of the training patches (the paper's coresets
    /// are 1% to 10%), at most 1024]. The head costs about rows x channels multiply-adds per
    /// patch; at 1024 rows serving keeps about 0.8x the bare backbone's throughput
    /// (BENCHMARKS.md).
    #[arg(long)]
    memory_bank: Option<usize>,
    /// Where dataset snapshots are cached (default: $XDG_CACHE_HOME/inspectflow/snapshots or
    /// ~/.cache/inspectflow/snapshots).
    #[arg(long)]
    snapshots: Option<PathBuf>,
    /// The package directory to create (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// How progress is shown on standard error: `auto` (a bar on a terminal, a line per stage
    /// otherwise) or `json` (one `{"stage": .., "percent": ..}` line per percent, for programs
    /// such as the server's training worker).
    #[arg(long, value_enum, default_value = "auto")]
    progress: ProgressFormat,
}

/// How `inspectflow train` reports progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressFormat {
    /// A bar on a terminal, a line per stage otherwise.
    Auto,
    /// JSON lines.
    Json,
}

/// The default snapshot cache.
fn default_snapshot_cache() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("inspectflow").join("snapshots")
}

/// Draws progress on standard error: a bar per stage on a terminal, a line per stage otherwise,
/// or JSON lines.
struct ProgressBar {
    json: bool,
    terminal: bool,
    stage: String,
    drawn: i32,
}

impl ProgressBar {
    fn new(format: ProgressFormat) -> Self {
        Self {
            json: format == ProgressFormat::Json,
            terminal: format == ProgressFormat::Auto
                && std::io::IsTerminal::is_terminal(&std::io::stderr()),
            stage: String::new(),
            drawn: -1,
        }
    }

    fn update(&mut self, stage: &str, fraction: f32) {
        let percent = (fraction.clamp(0.0, 1.0) * 100.0) as i32;
        if self.json {
            if stage != self.stage || percent != self.drawn {
                self.stage = stage.to_string();
                self.drawn = percent;
                eprintln!(
                    "{}",
                    serde_json::json!({"stage": stage, "percent": percent})
                );
            }
            return;
        }
        if stage != self.stage {
            if self.terminal && !self.stage.is_empty() {
                eprintln!();
            }
            self.stage = stage.to_string();
            self.drawn = -1;
            if !self.terminal {
                eprintln!("{stage}...");
            }
        }
        if self.terminal && percent != self.drawn {
            let filled = (percent / 5) as usize;
            eprint!(
                "\r{stage:<12} [{}{}] {percent:>3}%",
                "#".repeat(filled),
                " ".repeat(20 - filled)
            );
            self.drawn = percent;
        }
    }

    fn finish(&self) {
        if self.terminal && !self.stage.is_empty() {
            eprintln!();
        }
    }
}

/// "image AUROC .., F1 ..; pixel AUROC .., F1 .., PRO .." ("-" where not measured).
fn metrics_text(summary: &evaluate::Summary) -> String {
    let metric = |value: Option<f64>| value.map_or_else(|| "-".into(), |v| format!("{v:.4}"));
    format!(
        "image AUROC {}, F1 {}; pixel AUROC {}, F1 {}, PRO {}",
        metric(summary.image_auroc),
        metric(summary.image_f1),
        metric(summary.pixel_auroc),
        metric(summary.pixel_f1),
        metric(summary.pro),
    )
}

/// `inspectflow train`.
pub fn train(args: &TrainArgs) -> Result<(), String> {
    let backbone = Backbone::from_name(&args.backbone).ok_or_else(|| {
        format!(
            "--backbone {}: use mobilenet_v2 or efficientnet_lite0",
            args.backbone
        )
    })?;
    let config = TrainConfig {
        architecture: args.model,
        backbone,
        input_size: args.image_size,
        seed: args.seed,
        tile: args.tile,
        padim_channels: args.padim_channels,
        memory_bank: args.memory_bank,
        neighbours: 9,
        snapshot_cache: args
            .snapshots
            .clone()
            .unwrap_or_else(default_snapshot_cache),
    };
    let sources = dataset::Sources {
        normal: &args.normal,
        anomalous: args.anomalous.as_deref(),
        masks: args.masks.as_deref(),
    };
    let mut bar = ProgressBar::new(args.progress);
    let result = train::train(&config, &sources, &args.out, &mut |stage, fraction| {
        bar.update(stage, fraction)
    });
    bar.finish();
    let report = result.map_err(|e| e.to_string())?;
    let manifest = &report.package.manifest;
    let summary = &report.validation.summary;
    println!(
        "trained {} ({}) on {} images in {:.1} s{} -> {}",
        manifest.architecture,
        manifest.backbone,
        manifest.provenance.training_images,
        report.seconds,
        if report.snapshot_reused {
            ", dataset snapshot reused"
        } else {
            ""
        },
        report.package.dir.display()
    );
    println!("dataset snapshot {}", report.snapshot_id);
    println!(
        "validation ({} normal, {} {} anomalous): {}",
        summary.normal,
        summary.anomalous,
        manifest.metrics["validation_anomalies"]
            .as_str()
            .unwrap_or("labelled"),
        metrics_text(summary),
    );
    Ok(())
}

/// Options of `inspectflow eval`.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// The model package directory.
    #[arg(long)]
    model: PathBuf,
    /// Folder of normal test images.
    #[arg(long)]
    normal: PathBuf,
    /// Folder of anomalous test images.
    #[arg(long)]
    anomalous: PathBuf,
    /// Folder of their masks (`<name>.png` or `<name>_mask.png`); enables pixel metrics.
    #[arg(long)]
    masks: Option<PathBuf>,
    /// Normalised threshold (0-1) instead of the package's.
    #[arg(long)]
    threshold: Option<f32>,
    /// Print one JSON document (summary and per-image rows) instead of text.
    #[arg(long)]
    json: bool,
}

/// `inspectflow eval`.
pub fn eval(args: &EvalArgs) -> Result<(), String> {
    if let Some(threshold) = args.threshold
        && !(0.0..=1.0).contains(&threshold)
    {
        return Err(format!("--threshold {threshold} is outside 0-1"));
    }
    let sources = dataset::Sources {
        normal: &args.normal,
        anomalous: Some(&args.anomalous),
        masks: args.masks.as_deref(),
    };
    let mut bar = ProgressBar::new(ProgressFormat::Auto);
    let result = evaluate::evaluate_package(&args.model, &sources, args.threshold, &mut |f| {
        bar.update("scoring", f)
    });
    bar.finish();
    let evaluation = result.map_err(|e| e.to_string())?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&evaluation).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    let width = evaluation
        .images
        .iter()
        .map(|row| row.filename.len())
        .max()
        .unwrap_or(0)
        .max(5);
    println!(
        "{:<width$}  {:<9}  {:>10}  {:>6}  prediction",
        "image", "label", "raw score", "score"
    );
    for row in &evaluation.images {
        println!(
            "{:<width$}  {:<9}  {:>10.4}  {:>6.3}  {}{}",
            row.filename,
            row.label,
            row.raw_score,
            row.score,
            row.prediction,
            if row.prediction == row.label {
                ""
            } else {
                "  (wrong)"
            }
        );
    }
    let summary = &evaluation.summary;
    println!(
        "{} images ({} normal, {} anomalous), threshold {:.2}: {}",
        summary.images,
        summary.normal,
        summary.anomalous,
        summary.threshold,
        metrics_text(summary),
    );
    Ok(())
}

/// Options of `inspectflow synth`.
#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// Directory to create (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
    /// Texture family.
    #[arg(long, value_enum, default_value = "carpet")]
    texture: Texture,
    /// Image size in pixels.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Take the normal images as random crops of this photo of a surface (PNG or JPEG) instead
    /// of drawing a texture.
    #[arg(long)]
    photo: Option<PathBuf>,
    /// Normal training images.
    #[arg(long, default_value_t = 40)]
    train: usize,
    /// Normal test images.
    #[arg(long, default_value_t = 20)]
    test_normal: usize,
    /// Anomalous test images (scratch, hole, stain, blob in turn).
    #[arg(long, default_value_t = 20)]
    test_anomalous: usize,
    /// Seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// `inspectflow synth`.
pub fn synth(args: &SynthArgs) -> Result<(), String> {
    let options = SynthOptions {
        texture: args.texture,
        size: args.size,
        train_normal: args.train,
        test_normal: args.test_normal,
        test_anomalous: args.test_anomalous,
        seed: args.seed,
        photo: match &args.photo {
            Some(path) => {
                Some(inspectflow::synth::read_canvas(path).map_err(|e| format!("--photo: {e}"))?)
            }
            None => None,
        },
    };
    inspectflow::synth::write_dataset(&args.out, &options).map_err(|e| e.to_string())?;
    println!(
        "wrote {} {} images ({} train, {} test normal, {} test anomalous with masks) to {}",
        args.train + args.test_normal + args.test_anomalous,
        match &args.photo {
            Some(path) => path.display().to_string(),
            None => args.texture.name().to_string(),
        },
        args.train,
        args.test_normal,
        args.test_anomalous,
        args.out.display()
    );
    Ok(())
}
