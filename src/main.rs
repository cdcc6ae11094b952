//! The `inspectflow` command line: run, validate and draw graph files, list operators, and keep
//! the published JSON Schemas in step with the code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};

use clap::{Parser, Subcommand};

mod logging;
mod model_commands;
use inspectflow::graph::{self, schema};
use inspectflow::operators::Registry;
use inspectflow::runtime::Pipeline;

#[derive(Parser)]
#[command(
    name = "inspectflow",
    version,
    about = "Dataflow engine for visual anomaly inspection"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a graph file until its sources end (or Ctrl-C: once drains, twice aborts), then print
    /// per-operator metrics.
    Run {
        /// Graph file (YAML or JSON).
        file: PathBuf,
        /// Also write the metrics as JSON here.
        #[arg(long, value_name = "PATH")]
        metrics_json: Option<PathBuf>,
        /// Also write the metrics in Prometheus text format here (for node_exporter's textfile
        /// collector, for example).
        #[arg(long, value_name = "PATH")]
        metrics_prometheus: Option<PathBuf>,
        #[command(flatten)]
        reading: GraphReading,
    },
    /// Check graph files without running them; exits non-zero when any is invalid.
    Validate {
        /// Graph files (YAML or JSON).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        reading: GraphReading,
    },
    /// Print a graph file as Graphviz DOT.
    Graph {
        /// Graph file (YAML or JSON).
        file: PathBuf,
        #[command(flatten)]
        reading: GraphReading,
    },
    /// List the operators with their ports, print their reference table as Markdown, or write
    /// it into the README (between its `operators:begin` / `operators:end` markers).
    Operators {
        /// Print the reference table (Markdown) instead of the list.
        #[arg(long)]
        markdown: bool,
        /// Rewrite the generated region of this file (the README).
        #[arg(long)]
        readme: Option<PathBuf>,
        /// With --readme: only check that the region is up to date; exit non-zero when stale.
        #[arg(long, requires = "readme")]
        check: bool,
    },
    /// List the pretrained backbones and whether their weights are installed, or export one as
    /// OpenVINO IR.
    Backbones {
        #[command(subcommand)]
        action: Option<BackbonesAction>,
    },
    /// Train an anomaly model (PaDiM or PatchCore) on a folder of normal images, calibrate it on
    /// held-out normal images and labelled or generated anomalies, and write a model package.
    Train(model_commands::TrainArgs),
    /// Measure a model package on labelled images: image AUROC and F1, and pixel AUROC, F1 and
    /// PRO when masks are given; prints a summary and a per-image table.
    Eval(model_commands::EvalArgs),
    /// Write a generated dataset (procedural textures with scratches, holes, stains and
    /// foreign-texture blobs, with masks) for trying out training and evaluation.
    Synth(model_commands::SynthArgs),
    /// Score images with a model package: prints score and label per image and writes overlay
    /// images (heatmap, outline, label) when --out is given.
    Predict {
        /// The model package directory.
        #[arg(long)]
        model: PathBuf,
        /// PNG or JPEG images.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// Directory for the overlay images (created if missing).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print one JSON document instead of lines.
        #[arg(long)]
        json: bool,
        /// Normalised threshold (0-1) instead of the package's.
        #[arg(long)]
        threshold: Option<f32>,
    },
    /// Import a model exported by anomalib (OpenVINO IR with an `anomaly_map` output, and its
    /// metadata.json) as a model package that pipelines, predict and the API serve.
    ImportAnomalib {
        /// The exported IR (`model.xml`, with `model.bin` beside it).
        #[arg(long)]
        model: PathBuf,
        /// anomalib's metadata.json (thresholds, min-max normalisation, input transform);
        /// without it the IR is taken to normalise its own outputs (anomalib 1.x and later).
        #[arg(long)]
        metadata: Option<PathBuf>,
        /// The package directory to write (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a model package's network as ONNX (the same outputs, read by any ONNX runtime).
    ExportOnnx {
        /// The package directory.
        #[arg(long)]
        model: PathBuf,
        /// The .onnx file to write.
        #[arg(long)]
        out: PathBuf,
        /// Store weights as 16-bit floats (half the size).
        #[arg(long)]
        fp16: bool,
    },
    /// List OpenVINO's inference devices on this machine.
    Devices {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write the JSON Schemas of graph files and operator parameters, or check them.
    Schemas {
        /// Directory to write to.
        #[arg(long, default_value = "schemas")]
        out: PathBuf,
        /// Only check that the directory is up to date; exit non-zero when stale.
        #[arg(long)]
        check: bool,
    },
    /// Create or upgrade the server's store in the data directory to this build's schema.
    Migrate {
        /// Where the store lives.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// Write the skeleton of the store's next schema revision and register it in the migration
    /// chain (for developers of inspectflow, in its source tree).
    CreateDbRevision {
        /// Short name: lower-case letters, digits and underscores.
        #[arg(long)]
        name: String,
        /// The migration chain's source folder.
        #[arg(long, default_value = "src/server/migrations")]
        dir: PathBuf,
    },
    /// Check the server's store (stopped): schema version, records that do not parse or lack
    /// their files, files without records, half-written files. Exits 1 when anything is wrong.
    CheckDb {
        /// Where the store lives.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// Write the REST API's OpenAPI 3 description (the same as the server's /api/openapi.json).
    GenApi {
        /// The JSON file to write.
        #[arg(long)]
        target_path: PathBuf,
    },
    /// Serve the REST API (projects, media, training jobs, models, sources, sinks, pipelines) over a store in the data directory, until Ctrl-C.
    Serve {
        /// Address to listen on (port 0 picks a free one; the address is printed).
        #[arg(long, default_value = "127.0.0.1:8000")]
        bind: std::net::SocketAddr,
        /// Where the store and files live.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
        /// Require `Authorization: Bearer <token>` on every route (default: the
        /// INSPECTFLOW_API_TOKEN environment variable, if set).
        #[arg(long, env = "INSPECTFLOW_API_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Training jobs that run at once (more queue).
        #[arg(long, default_value_t = 1)]
        max_jobs: usize,
        /// A folder clients may name in sources, sinks and pipeline graphs (repeatable; the
        /// data directory always is one).
        #[arg(long = "path-root")]
        path_roots: Vec<PathBuf>,
        #[command(flatten)]
        graph_limits: graph::GraphLimits,
        #[command(flatten)]
        webrtc: inspectflow::server::WebRtcSettings,
        #[command(flatten)]
        fleet: inspectflow::server::fleet::FleetSettings,
    },
}

/// How graph files are read: the limits they are held to and, when given, the folders their file
/// and folder parameters must stay in.
#[derive(clap::Args)]
struct GraphReading {
    #[command(flatten)]
    limits: graph::GraphLimits,
    /// A folder that file and folder parameters (sources, sinks, models, certificates) must lie
    /// in, links resolved (repeatable; without it, any path is allowed).
    #[arg(long = "path-root")]
    path_roots: Vec<PathBuf>,
}

impl GraphReading {
    /// Reads, validates and (with roots) confines a graph file.
    fn load(
        &self,
        file: &std::path::Path,
        registry: &Registry,
    ) -> Result<graph::ValidatedGraph, graph::GraphErrors> {
        let graph = graph::load(file, registry, &self.limits)?;
        if !self.path_roots.is_empty() {
            inspectflow::roots::PathRoots::new(&self.path_roots).confine(&graph)?;
        }
        Ok(graph)
    }
}

#[derive(Subcommand)]
enum BackbonesAction {
    /// Write a backbone as OpenVINO IR (outputs features_s8, features_s16, logits; input RGB in
    /// [0, 1], NCHW).
    Export {
        /// mobilenet_v2 or efficientnet_lite0.
        name: String,
        /// Square input size in pixels (a multiple of 32).
        #[arg(long, default_value_t = 256)]
        size: usize,
        /// The .xml to write (the .bin goes beside it).
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_dir = match &cli.command {
        Command::Serve { data_dir, .. } => Some(data_dir.join("logs")),
        _ => None,
    };
    if let Err(error) = logging::init(log_dir.as_deref()) {
        eprintln!("error: {error}");
        return ExitCode::FAILURE;
    }
    let registry = Registry::builtin();
    match cli.command {
        Command::Run {
            file,
            metrics_json,
            metrics_prometheus,
            reading,
        } => run(&registry, &reading, &file, metrics_json, metrics_prometheus),
        Command::Validate { files, reading } => validate(&registry, &reading, &files),
        Command::Graph { file, reading } => match reading.load(&file, &registry) {
            Ok(graph) => {
                print!("{}", graph::dot::to_dot(&graph));
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::FAILURE
            }
        },
        Command::Operators {
            markdown,
            readme,
            check,
        } => match readme {
            Some(readme) => operators_readme(&registry, &readme, check),
            None if markdown => {
                print!("{}", graph::reference::operators_markdown(&registry));
                ExitCode::SUCCESS
            }
            None => {
                list_operators(&registry);
                ExitCode::SUCCESS
            }
        },
        Command::Schemas { out, check } => schemas(&registry, &out, check),
        Command::Migrate { data_dir } => report(
            inspectflow::server::store::Store::migrate(&data_dir)
                .map(|migrated| match migrated.backup {
                    Some(backup) => println!(
                        "{}: upgraded from schema version {} to {} (the old store is kept as {})",
                        data_dir.display(),
                        migrated.from,
                        migrated.to,
                        backup.display()
                    ),
                    None => println!("{}: schema version {}", data_dir.display(), migrated.to),
                })
                .map_err(|e| format!("{}: {e}", data_dir.display())),
        ),
        Command::CreateDbRevision { name, dir } => report(
            inspectflow::server::migrations::create_revision(&dir, &name).map(|file| {
                println!(
                    "wrote {}: fill in its upgrade, then build and test",
                    file.display()
                );
            }),
        ),
        Command::CheckDb { data_dir } => check_db(&data_dir),
        Command::GenApi { target_path } => report(
            serde_json::to_string_pretty(&inspectflow::server::openapi::spec())
                .map_err(|e| e.to_string())
                .and_then(|text| {
                    std::fs::write(&target_path, text + "\n")
                        .map_err(|e| format!("cannot write {}: {e}", target_path.display()))
                }),
        ),
        Command::Serve {
            bind,
            data_dir,
            token,
            max_jobs,
            path_roots,
            graph_limits,
            webrtc,
            fleet,
        } => report(inspectflow::server::serve(
            inspectflow::server::ServeOptions {
                bind,
                data_dir,
                token,
                max_jobs,
                path_roots,
                graph_limits,
                webrtc,
                fleet,
            },
        )),
        Command::Devices { json } => devices(json),
        Command::Train(args) => report(model_commands::train(&args)),
        Command::Eval(args) => report(model_commands::eval(&args)),
        Command::Synth(args) => report(model_commands::synth(&args)),
        Command::Predict {
            model,
            images,
            out,
            json,
            threshold,
        } => match model_commands::predict(&model, &images, out.as_deref(), json, threshold) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Backbones { action } => backbones(action),
        Command::ExportOnnx { model, out, fp16 } => report(export_onnx(&model, &out, fp16)),
        Command::ImportAnomalib {
            model,
            metadata,
            out,
        } => report(
            inspectflow::anomalib::import(&model, metadata.as_deref(), &out)
                .map(|package| {
                    println!(
                        "imported {} as {} (input {}x{}, threshold at raw score {})",
                        model.display(),
                        out.display(),
                        package.manifest.input_size,
                        package.manifest.input_size,
                        package.manifest.normalization.threshold
                    );
                })
                .map_err(|e| e.to_string()),
        ),
    }
}

/// Exit status of a command that either succeeds or fails with a message.
fn check_db(data_dir: &std::path::Path) -> ExitCode {
    match inspectflow::server::check::check(data_dir) {
        Ok(report) => {
            println!(
                "{}: schema version {}, {} records",
                data_dir.display(),
                report.schema_version,
                report.records
            );
            for problem in &report.problems {
                println!("{problem}");
            }
            if report.problems.is_empty() {
                println!("consistent");
                ExitCode::SUCCESS
            } else {
                println!("{} problems", report.problems.len());
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `export-onnx`: the package's IR as an ONNX file.
fn export_onnx(model: &std::path::Path, out: &std::path::Path, fp16: bool) -> Result<(), String> {
    let xml = model.join(inspectflow::operators::package::MODEL_FILE);
    let text = std::fs::read_to_string(&xml)
        .map_err(|e| format!("--model: cannot read {}: {e}", xml.display()))?;
    let weights = std::fs::read(xml.with_extension("bin")).map_err(|e| {
        format!(
            "--model: cannot read {}: {e}",
            xml.with_extension("bin").display()
        )
    })?;
    let onnx =
        inspectflow::onnx::ir_to_onnx(&text, &weights, inspectflow::onnx::OnnxOptions { fp16 })
            .map_err(|e| format!("{}: {e}", xml.display()))?;
    inspectflow::operators::files::write_atomically(out, &onnx)
        .map_err(|e| format!("--out: cannot write {}: {e}", out.display()))?;
    println!("wrote {} ({} bytes)", out.display(), onnx.len());
    Ok(())
}

fn report(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    registry: &Registry,
    reading: &GraphReading,
    file: &std::path::Path,
    metrics_json: Option<PathBuf>,
    metrics_prometheus: Option<PathBuf>,
) -> ExitCode {
    let graph = match reading.load(file, registry) {
        Ok(graph) => graph,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    let pipeline = match Pipeline::start(&graph) {
        Ok(pipeline) => pipeline,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let stop = pipeline.stop_handle();
    let presses = AtomicUsize::new(0);
    let installed = ctrlc::set_handler(move || {
        if presses.fetch_add(1, Ordering::SeqCst) == 0 {
            eprintln!("stopping: draining queued frames (Ctrl-C again to abort)");
            stop.stop();
        } else {
            eprintln!("aborting");
            stop.abort();
        }
    });
    if let Err(error) = installed {
        tracing::warn!("Ctrl-C will not drain the pipeline: {error}");
    }
    let outcome = pipeline.wait();
    print!("{}", outcome.report.to_table());
    let mut code = ExitCode::SUCCESS;
    if let Some(path) = metrics_json {
        let written = serde_json::to_string_pretty(&outcome.report)
            .map_err(std::io::Error::other)
            .and_then(|json| write_metrics(&path, &(json + "\n")));
        if let Err(error) = written {
            eprintln!("cannot write metrics to {}: {error}", path.display());
            code = ExitCode::FAILURE;
        }
    }
    if let Some(path) = metrics_prometheus
        && let Err(error) = write_metrics(&path, &outcome.report.to_prometheus())
    {
        eprintln!("cannot write metrics to {}: {error}", path.display());
        code = ExitCode::FAILURE;
    }
    if let Some(failure) = outcome.failure {
        eprintln!("error: {failure}");
        return ExitCode::FAILURE;
    }
    code
}

fn validate(registry: &Registry, reading: &GraphReading, files: &[PathBuf]) -> ExitCode {
    let mut all_valid = true;
    for file in files {
        match reading.load(file, registry) {
            Ok(graph) => println!(
                "{}: ok ({} nodes, {} edges)",
                file.display(),
                graph.nodes.len(),
                graph.edges.len()
            ),
            Err(errors) => {
                all_valid = false;
                eprintln!("{errors}");
                eprintln!("{}: {} error(s)", file.display(), errors.0.len());
            }
        }
    }
    if all_valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn list_operators(registry: &Registry) {
    for descriptor in registry.iter() {
        let ports = |names: Vec<String>| {
            if names.is_empty() {
                "-".to_string()
            } else {
                names.join(", ")
            }
        };
        let inputs = ports(
            descriptor
                .inputs
                .iter()
                .map(|p| format!("{}: {}", p.name, p.accepts.name()))
                .collect(),
        );
        let outputs = ports(
            descriptor
                .outputs
                .iter()
                .map(|p| match p.emits {
                    inspectflow::operators::OutputType::Fixed(t) => {
                        format!("{}: {}", p.name, t.name())
                    }
                    inspectflow::operators::OutputType::SameAsInput => {
                        format!("{}: same as input", p.name)
                    }
                })
                .collect(),
        );
        println!(
            "{:<18} {:<9} in [{inputs}]  out [{outputs}]",
            descriptor.name,
            descriptor.kind.name()
        );
        println!("    {}", descriptor.summary);
        let settings = descriptor.node_settings();
        if !settings.is_empty() {
            println!("    node settings: {}", settings.join(", "));
        }
    }
}

fn operators_readme(registry: &Registry, readme: &std::path::Path, check: bool) -> ExitCode {
    let result = if check {
        graph::reference::is_current(readme, registry).inspect(|&current| {
            if !current {
                eprintln!(
                    "stale: {}; run `inspectflow operators --readme {}` and commit the result",
                    readme.display(),
                    readme.display()
                );
            }
        })
    } else {
        graph::reference::update(readme, registry).map(|changed| {
            if changed {
                println!("wrote the operator reference into {}", readme.display());
            }
            true
        })
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn backbones(action: Option<BackbonesAction>) -> ExitCode {
    use inspectflow::backbone::Backbone;
    match action {
        None => {
            for backbone in Backbone::ALL {
                let info = backbone.info();
                let weights = info
                    .weights
                    .map(|path| path.display().to_string())
                    .unwrap_or_else(|| {
                        format!("not installed (scripts/setup.sh installs {})", info.package)
                    });
                println!(
                    "{:<20} features s8/s16: {}/{} channels  weights: {weights}",
                    info.name, info.feature_channels[0], info.feature_channels[1]
                );
            }
            ExitCode::SUCCESS
        }
        Some(BackbonesAction::Export { name, size, out }) => {
            let Some(backbone) = Backbone::from_name(&name) else {
                let known: Vec<&str> = Backbone::ALL.iter().map(|b| b.name()).collect();
                eprintln!(
                    "error: unknown backbone '{name}'; known: {}",
                    known.join(", ")
                );
                return ExitCode::FAILURE;
            };
            match backbone.import(size, &out) {
                Ok(()) => {
                    println!(
                        "wrote {} and {}",
                        out.display(),
                        out.with_extension("bin").display()
                    );
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("error: {error}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn devices(json: bool) -> ExitCode {
    match inspectflow::operators::infer::runtime::available_devices() {
        Ok(devices) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&devices).unwrap_or_default()
                );
            } else {
                for device in devices {
                    println!("{:<10} {}", device.name, device.full_name);
                }
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn schemas(registry: &Registry, out: &std::path::Path, check: bool) -> ExitCode {
    if check {
        let stale = schema::stale_files(out, registry);
        if stale.is_empty() {
            println!("{}: up to date", out.display());
            return ExitCode::SUCCESS;
        }
        for path in stale {
            eprintln!("stale: {}", out.join(path).display());
        }
        eprintln!(
            "run `inspectflow schemas --out {}` and commit the result",
            out.display()
        );
        return ExitCode::FAILURE;
    }
    match schema::write_all(out, registry) {
        Ok(written) => {
            for path in written {
                println!("wrote {}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("cannot write schemas to {}: {error}", out.display());
            ExitCode::FAILURE
        }
    }
}

/// Writes a metrics file through a temporary name and a rename, so that a collector reading it
/// (Prometheus' textfile collector) never sees half of one; a path that is not a regular file
/// (`/dev/stdout`) is written directly.
fn write_metrics(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    if std::fs::metadata(path).is_ok_and(|metadata| !metadata.is_file()) {
        std::fs::write(path, text)
    } else {
        inspectflow::operators::files::write_atomically(path, text.as_bytes())
    }
}
