//! Log output: stderr for every command (level from `RUST_LOG`, default `warn`), and for
//! `inspectflow serve` also files under the data directory's `logs/`: `app.log` (everything at
//! info and above), `inference.log` (inference and the pipeline runtime), `dispatching.log`
//! (sinks: webhook, MQTT, folder). The training worker writes `training.log` itself, with the
//! job's child process output.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Mutex;

use tracing::Level;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

fn append(dir: &Path, name: &str) -> Result<Mutex<std::fs::File>, String> {
    let path = dir.join(name);
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map(Mutex::new)
        .map_err(|e| format!("cannot open the log file {}: {e}", path.display()))
}

/// A plain-text layer appending to `dir/name`.
fn file_layer<S>(
    dir: &Path,
    name: &str,
) -> Result<
    tracing_subscriber::fmt::Layer<
        S,
        tracing_subscriber::fmt::format::DefaultFields,
        tracing_subscriber::fmt::format::Format,
        Mutex<std::fs::File>,
    >,
    String,
>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    Ok(tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(append(dir, name)?))
}

/// Installs the subscriber; with `log_dir`, also the log files.
pub fn init(log_dir: Option<&Path>) -> Result<(), String> {
    // Colours only on a terminal: a log redirected to a file or a collector stays plain text.
    let stderr = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()));
    let Some(dir) = log_dir else {
        tracing_subscriber::registry().with(stderr).init();
        return Ok(());
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("cannot create the log folder {}: {e}", dir.display()))?;
    let is_inference = |target: &str| {
        target.starts_with("inspectflow_operators::infer")
            || target.starts_with("inspectflow::runtime")
            || target.starts_with("inspectflow::server::pipelines")
    };
    let is_dispatching = |target: &str| target.starts_with("inspectflow_operators::sink");
    tracing_subscriber::registry()
        .with(stderr)
        .with(file_layer(dir, "app.log")?.with_filter(LevelFilter::INFO))
        .with(
            file_layer(dir, "inference.log")?.with_filter(filter_fn(move |meta| {
                *meta.level() <= Level::INFO && is_inference(meta.target())
            })),
        )
        .with(
            file_layer(dir, "dispatching.log")?.with_filter(filter_fn(move |meta| {
                *meta.level() <= Level::INFO && is_dispatching(meta.target())
            })),
        )
        .init();
    Ok(())
}
