//! `inspectflow serve`: the control plane, a warp REST API over a redb store in a data directory.
//!
//! - [`store`]: the redb database (a table per resource, JSON records, schema version);
//! - [`api`]: the routes and the JSON error contract;
//! - [`check`]: `check-db`, the store's consistency with its files;
//! - [`media`]: image uploads with labels and masks, thumbnails, downloads;
//! - [`jobs`]: training jobs run by a worker, with progress, logs and cancel;
//! - [`models`]: trained models, `:predict`, `:export`, thresholds;
//! - [`endpoints`]: sources and sinks as stored operator configurations;
//! - [`pipelines`]: stored pipelines and the running ones, with metrics;
//! - [`roots`]: the folders clients may name;
//! - [`openapi`]: the OpenAPI 3 description of every route.
//!
//! The server binds to 127.0.0.1 unless told otherwise, and with a token (`--token` or
//! `INSPECTFLOW_API_TOKEN`) every route needs `Authorization: Bearer <token>`.

pub mod api;
pub mod check;
pub mod endpoints;
pub mod jobs;
pub mod media;
pub mod models;
pub mod openapi;
pub mod pipelines;
pub mod roots;
pub mod store;

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
}

/// Serves until Ctrl-C (or SIGTERM through the process's handler). Prints the address it
/// listens on once it does.
pub fn serve(options: ServeOptions) -> Result<(), String> {
    let ServeOptions {
        bind,
        data_dir,
        token,
        max_jobs,
        mut path_roots,
    } = options;
    let data_dir = data_dir.as_path();
    let store = store::Store::open(data_dir)
        .map_err(|e| format!("cannot open the store in {}: {e}", data_dir.display()))?;
    path_roots.insert(0, data_dir.to_path_buf());
    let state = Arc::new(api::AppState {
        store,
        token,
        data_dir: data_dir.to_path_buf(),
        roots: roots::PathRoots::new(&path_roots),
        jobs: jobs::JobRunner::new(max_jobs),
        models: models::LoadedModels::default(),
        pipelines: pipelines::ActivePipelines::default(),
    });
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
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
        jobs::JobRunner::recover(&state)?;
        let listener = tokio::net::TcpListener::bind(bind)
            .await
            .map_err(|e| format!("cannot listen on {bind}: {e}"))?;
        let address = listener
            .local_addr()
            .map_err(|e| format!("cannot read the bound address: {e}"))?;
        println!(
            "inspectflow API on http://{address} (data in {})",
            data_dir.display()
        );
        tracing::info!(%address, "serving");
        warp::serve(api::routes(state))
            .incoming(listener)
            .graceful(async {
                let _ = stopped.await;
            })
            .run()
            .await;
        shutdown.pipelines.stop_all();
        Ok(())
    })
}
