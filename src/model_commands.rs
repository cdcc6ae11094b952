//! `inspectflow train`, `eval`, `synth` and `predict`: fit a model package on a folder of
//! normal images, measure one on labelled images, generate a dataset to try them on, and score
//! image files with a package (verdicts and overlay images).
//! Prediction uses the same operators as pipelines (preprocess, the anomaly post-processing and
//! the heatmap), so a verdict here is the verdict a camera pipeline gives.

use std::path::{Path, PathBuf};

use inspectflow::operators::decode;
use inspectflow::operators::transform::encode::{EncodeParams, EncodeSource, JpegEncoder};
use inspectflow::predictor::Predictor;
use inspectflow::synth::{SynthOptions, Texture};
use inspectflow::train::{self, EpochReport, TrainConfig, TrainEvent, dataset, evaluate};

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

/// Options of `inspectflow train`: where the images are and where the package goes, plus the
/// run's [`TrainConfig`] (the same settings the API's training route takes).
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Folder of normal images (PNG or JPEG; sizes may differ).
    #[arg(long, required_unless_present = "print_settings")]
    normal: Option<PathBuf>,
    /// Folder of anomalous images; with it, calibration uses them instead of generated anomalies.
    #[arg(long)]
    anomalous: Option<PathBuf>,
    /// Folder of masks of the anomalous images (`<name>.png` or `<name>_mask.png`); images
    /// without one are still scored, pixel metrics need them all.
    #[arg(long)]
    masks: Option<PathBuf>,
    #[command(flatten)]
    config: TrainConfig,
    /// Read the settings from this JSON file (the body `POST /api/projects/{id}/train` takes,
    /// without `name`) instead of the flags above.
    #[arg(long, conflicts_with = "TrainConfig")]
    settings: Option<PathBuf>,
    /// Print the settings as JSON (the API's body) and exit without training.
    #[arg(long)]
    print_settings: bool,
    /// Where dataset snapshots are cached (default: $XDG_CACHE_HOME/inspectflow/snapshots or
    /// ~/.cache/inspectflow/snapshots).
    #[arg(long)]
    snapshots: Option<PathBuf>,
    /// The package directory to create (must not exist).
    #[arg(long, required_unless_present = "print_settings")]
    out: Option<PathBuf>,
    /// How progress is shown on standard error: `auto` (a bar on a terminal, a line per stage
    /// otherwise) or `json` (one event per line: `{"event": "progress", "stage": ..,
    /// "percent": ..}` per percent and `{"event": "finished", "snapshot_id": ..}` at the end, for
    /// programs such as the server's training worker).
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

/// Training settings from a JSON file (`--settings`), checked like the API's body.
fn read_settings(file: &Path) -> Result<TrainConfig, String> {
    const MAX_SETTINGS_BYTES: u64 = 64 * 1024;
    let size = std::fs::metadata(file)
        .map_err(|e| format!("--settings {}: {e}", file.display()))?
        .len();
    if size > MAX_SETTINGS_BYTES {
        return Err(format!(
            "--settings {}: {size} bytes, more than the {MAX_SETTINGS_BYTES} a settings file may have",
            file.display()
        ));
    }
    let text =
        std::fs::read_to_string(file).map_err(|e| format!("--settings {}: {e}", file.display()))?;
    let document: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("--settings {}: not JSON: {e}", file.display()))?;
    TrainConfig::from_json(&document).map_err(|e| format!("--settings {}: {e}", file.display()))
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

    fn finish(&self) {
        if self.terminal && !self.stage.is_empty() {
            eprintln!();
        }
    }
}

impl train::TrainProgress for ProgressBar {
    fn stage(&mut self, stage: &str, fraction: f32) {
        let percent = (fraction.clamp(0.0, 1.0) * 100.0) as i32;
        if self.json {
            if stage != self.stage || percent != self.drawn {
                self.stage = stage.to_string();
                self.drawn = percent;
                let event = TrainEvent::Progress {
                    stage: stage.to_string(),
                    percent: percent as u8,
                };
                if let Ok(line) = serde_json::to_string(&event) {
                    eprintln!("{line}");
                }
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

    fn epoch(&mut self, report: &EpochReport) {
        if self.json {
            if let Ok(line) = serde_json::to_string(&TrainEvent::Epoch(report.clone())) {
                eprintln!("{line}");
            }
        } else {
            // On a terminal the bar is redrawn on the next line.
            if self.terminal {
                eprintln!();
                self.drawn = -1;
            }
            eprintln!("{report}");
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
    let config = match &args.settings {
        Some(file) => read_settings(file)?,
        None => {
            args.config.validate()?;
            args.config.clone()
        }
    };
    if args.print_settings {
        let text = serde_json::to_string_pretty(&config).map_err(|e| e.to_string())?;
        println!("{text}");
        return Ok(());
    }
    let (Some(normal), Some(out)) = (&args.normal, &args.out) else {
        return Err("--normal and --out are required".into());
    };
    let snapshot_cache = args
        .snapshots
        .clone()
        .unwrap_or_else(default_snapshot_cache);
    let sources = dataset::Sources {
        normal,
        anomalous: args.anomalous.as_deref(),
        masks: args.masks.as_deref(),
    };
    let mut bar = ProgressBar::new(args.progress);
    let result = train::train(&config, &sources, &snapshot_cache, out, &mut bar);
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
    if args.progress == ProgressFormat::Json {
        let event = TrainEvent::Finished {
            snapshot_id: report.snapshot_id.clone(),
        };
        if let Ok(line) = serde_json::to_string(&event) {
            eprintln!("{line}");
        }
    }
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
        train::TrainProgress::stage(&mut bar, "scoring", f)
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
