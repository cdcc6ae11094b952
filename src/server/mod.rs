//! `inspectflow serve`: the control plane, a warp REST API over a redb store in a data directory.
//!
//! - [`store`]: the redb database (a table per resource, JSON records, schema version);
//! - [`api`]: the routes and the JSON error contract;
//! - [`check`]: `check-db`, the store's consistency with its files;
//! - [`media`]: image uploads with labels and masks, thumbnails, downloads;
//! - [`openapi`]: the OpenAPI 3 description of every route.
//!
//! The server binds to 127.0.0.1 unless told otherwise, and with a token (`--token` or
//! `INSPECTFLOW_API_TOKEN`) every route needs `Authorization: Bearer <token>`.

pub mod api;
pub mod check;
pub mod media;
pub mod openapi;
pub mod store;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

/// Serves until Ctrl-C (or SIGTERM through the process's handler). Prints the address it
/// listens on once it does.
pub fn serve(bind: SocketAddr, data_dir: &Path, token: Option<String>) -> Result<(), String> {
    let store = store::Store::open(data_dir)
        .map_err(|e| format!("cannot open the store in {}: {e}", data_dir.display()))?;
    let state = Arc::new(api::AppState {
        store,
        token,
        data_dir: data_dir.to_path_buf(),
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
    runtime.block_on(async move {
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
        Ok(())
    })
}
