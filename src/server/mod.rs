//! `inspectflow serve`: the control plane, a warp REST API over a redb store in a data directory.
//!
//! Layers, bottom up (a module imports only from the layers below it):
//! 1. the store, state and HTTP helpers: [`store`] (the redb database, a table per resource,
//!    JSON records, schema version) with its revision chain in [`migrations`], [`state`] (what every handler shares), [`http`] (the error
//!    contract, paging, JSON bodies and replies), [`download`] (downloads streamed as they are
//!    produced) and [`openapi`] (the route documentation types and the generated description);
//! 2. one module per resource, each with its routes and their documentation: [`system`]
//!    (`/health`, `/api/devices`, `/api/openapi.json`), [`projects`], [`media`] (uploads with
//!    labels and masks, thumbnails, downloads), [`jobs`] (training jobs with progress, logs and
//!    cancel) run by the worker in [`training`], [`models`] (`:predict`, `:export`,
//!    thresholds), [`endpoints`] (sources and sinks as stored operator configurations; as YAML
//!    files in [`endpoint_yaml`]),
//!    [`pipelines`] (stored ones), [`active`] (the running ones, with metrics) over the table of
//!    runs in [`running`], [`preview`] (their live view as MJPEG) and `webrtc` (as WebRTC), [`snapshots`] (dataset
//!    snapshots, kept with their images by [`snapshot_store`], downloaded and imported as
//!    [`snapshot_file`]) and
//!    [`captures`] (a running pipeline's current frame saved as a project image);
//! 3. the [`router`]: every resource behind authentication, and rejections as JSON errors;
//!    [`listener`] accepts the connections for it (header deadline, connection bound).
//!
//! [`check`] is `check-db`, the store's consistency with its files. [`fleet`] is fleet mode
//! (`--fleet-nats`: engines sharing pipelines through NATS JetStream), with its buckets in
//! [`fleet_buckets`], their records in [`fleet_records`] and its routes in [`fleet_routes`].
//!
//! The server binds to 127.0.0.1 unless told otherwise, and with a token (`--token` or
//! `INSPECTFLOW_API_TOKEN`) every route needs `Authorization: Bearer <token>`.

pub mod active;
pub mod blobs;
#[cfg(feature = "gstreamer")]
pub mod broadcast;
pub mod captures;
pub mod check;
pub mod download;
pub mod endpoint_yaml;
pub mod endpoints;
pub mod fleet;
pub mod fleet_buckets;
mod fleet_leases;
pub mod fleet_records;
pub mod fleet_routes;
pub mod http;
pub mod job_log;
pub mod jobs;
pub mod listener;
pub mod media;
pub mod migrations;
pub mod models;
pub mod openapi;
pub mod pipelines;
pub mod preview;
pub mod projects;
pub mod router;
pub mod running;
#[cfg(feature = "gstreamer")]
pub mod sdp;
pub mod snapshot_file;
pub mod snapshot_store;
pub mod snapshots;
pub mod state;
pub mod store;
pub mod system;
pub mod training;
pub mod ui;
#[cfg(feature = "gstreamer")]
pub mod webrtc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// How `inspectflow serve` was started.
pub struct ServeOptions {
    /// Address to listen on.
    pub bind: SocketAddr,
    /// Where the store and files live.
    pub data_dir: PathBuf,
    /// Bearer token required on every route, if any.
    pub token: Option<String>,
    /// Training jobs run at once.
    pub max_jobs: usize,
    /// Folders (besides the data directory) clients may name.
    pub path_roots: Vec<PathBuf>,
    /// Limits on the graph documents clients send.
    pub graph_limits: crate::graph::GraphLimits,
    /// The WebRTC live view's ICE servers and viewer limit.
    pub webrtc: WebRtcSettings,
    /// Fleet mode: the NATS to share pipelines through, this engine's id and capacity.
    pub fleet: fleet::FleetSettings,
}

/// Settings of the WebRTC live view.
#[derive(Debug, Clone, clap::Args)]
pub struct WebRtcSettings {
    /// STUN server for the live view's ICE (`stun://host:port`); without one, host candidates
    /// only, which suffice on a LAN and on loopback.
    #[arg(long = "webrtc-stun-server")]
    pub stun_server: Option<String>,
    /// TURN server (`turn://user:password@host:port`) for networks that block direct traffic.
    #[arg(long = "webrtc-turn-server")]
    pub turn_server: Option<String>,
    /// Most WebRTC viewers per pipeline at once.
    #[arg(long = "webrtc-max-viewers", default_value_t = 8)]
    pub max_viewers: usize,
}

/// Serves until Ctrl-C (or SIGTERM through the process's handler). Prints the address it
/// listens on once it does.
pub fn serve(options: ServeOptions) -> Result<(), String> {
    let ServeOptions {
        bind,
        data_dir,
        token,
        max_jobs,
        path_roots,
        graph_limits,
        webrtc,
        fleet,
    } = options;
    #[cfg(not(feature = "gstreamer"))]
    let _ = webrtc;
    let data_dir = data_dir.as_path();
    let migrated = store::Store::migrate(data_dir)
        .map_err(|e| format!("cannot open the store in {}: {e}", data_dir.display()))?;
    if let Some(backup) = &migrated.backup {
        tracing::info!(
            "upgraded the store from schema version {} to {} (the old one is kept as {})",
            migrated.from,
            migrated.to,
            backup.display()
        );
    }
    let store = store::Store::open(data_dir)
        .map_err(|e| format!("cannot open the store in {}: {e}", data_dir.display()))?;
    let state = Arc::new(state::AppState {
        store,
        token,
        data_dir: data_dir.to_path_buf(),
        roots: crate::roots::PathRoots::for_server(data_dir, &path_roots),
        graph_limits,
        jobs: training::JobRunner::new(max_jobs),
        models: models::LoadedModels::default(),
        image_decodes: tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        ),
        // Created here, on the main thread: pipelines start on its launcher thread at normal
        // priority, whereas the runtime's threads below run at a lower one.
        pipelines: running::ActivePipelines::new()?,
        fleet: std::sync::OnceLock::new(),
        #[cfg(feature = "gstreamer")]
        webrtc: Arc::new(broadcast::WebRtc::new(webrtc)),
    });
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .on_thread_start(lower_priority)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let stop = std::sync::Mutex::new(Some(stop));
    ctrlc::set_handler(move || {
        if let Some(stop) = stop.lock().ok().and_then(|mut s| s.take()) {
            let _ = stop.send(());
        }
    })
    .map_err(|e| format!("cannot install the Ctrl-C handler: {e}"))?;
    let shutdown = Arc::clone(&state);
    runtime.block_on(async move {
        sweep_half_written(data_dir);
        check::remove_uncommitted_uploads(&state.store, data_dir);
        snapshot_store::sweep(&state.store, data_dir);
        training::JobRunner::recover(&state)?;
        active::restart_kept(&state).await;
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .map_err(|e| format!("cannot listen on {bind}: {e}"))?;
        let address = listener
            .local_addr()
            .map_err(|e| format!("cannot read the bound address: {e}"))?;
        let (signalled, on_signal) = tokio::sync::watch::channel(false);
        let fleet_task = if fleet.nats.is_some() {
            let joined = fleet::Fleet::join(&fleet, format!("http://{address}"))
                .await
                .map_err(|e| e.to_string())?;
            let joined = Arc::new(joined);
            let _ = state.fleet.set(Arc::clone(&joined));
            Some(tokio::spawn(
                joined.run(Arc::clone(&state), on_signal.clone()),
            ))
        } else {
            None
        };
        println!(
            "inspectflow API on http://{address} (data in {})",
            data_dir.display()
        );
        tracing::info!(%address, "serving");
        let server = listener::serve(listener, router::routes(state), async move {
            let _ = stopped.await;
            let _ = signalled.send(true);
        });
        // A graceful stop waits for open connections (event streams, slow clients); it gets a
        // few seconds, then the server stops regardless.
        let mut on_signal = on_signal;
        tokio::select! {
            () = server => {}
            () = async {
                let _ = on_signal.wait_for(|signalled| *signalled).await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; closing them"),
        }
        if let Some(task) = fleet_task {
            // The fleet's runs stop and their leases go back, so other engines take over now.
            let _ = task.await;
        }
        tracing::info!("stopping the running pipelines");
        let pipelines = Arc::clone(&shutdown);
        let _ =
            tokio::task::spawn_blocking(move || pipelines.pipelines.stop_all(SHUTDOWN_GRACE)).await;
        Ok(())
    })
}

/// How long a shutdown waits for open connections, and then for pipelines to drain.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The nice value of the API's threads (request handling, store calls, `:predict`) and of the
/// training processes they start: the control plane and training yield the CPU to running
/// pipelines, which keep normal priority. Measured by `benches/api_load.rs`.
const CONTROL_PLANE_NICE: libc::c_int = 10;

/// Lowers the calling thread's scheduling priority to [`CONTROL_PLANE_NICE`] (on Linux the nice
/// value is per thread, and threads and processes started from it inherit it).
fn lower_priority() {
    // SAFETY: plain system calls on the calling thread's own id.
    let result = unsafe {
        let thread = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, thread, CONTROL_PLANE_NICE)
    };
    if result != 0 {
        tracing::warn!(
            "cannot lower the API thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Removes what a crash can leave half-written: upload files still under their temporary
/// `.partial` name (their records were never committed), packages of interrupted training runs
/// (`models/.<id>.partial` and its scratch folder) and job work folders. Runs before any request is answered.
fn sweep_half_written(data_dir: &std::path::Path) {
    fn partial_files(dir: &std::path::Path, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                partial_files(&path, found);
            } else if path.extension().is_some_and(|e| e == "partial") {
                found.push(path);
            }
        }
    }
    let mut files = Vec::new();
    partial_files(&data_dir.join("projects"), &mut files);
    for file in files {
        tracing::warn!("removing half-written {}", file.display());
        let _ = std::fs::remove_file(file);
    }
    for folder in ["models", "jobs"] {
        let Ok(entries) = std::fs::read_dir(data_dir.join(folder)) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            // Training writes `.<id>.partial` (and its `..<id>.partial.scratch`); a finished
            // package is renamed to its bare id.
            let half_written = if folder == "models" {
                name.starts_with('.')
            } else {
                path.is_dir()
            };
            if half_written {
                tracing::warn!("removing half-written {}", path.display());
                let _ = std::fs::remove_dir_all(path);
            }
        }
    }
}
