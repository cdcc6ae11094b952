//! Accepting connections for the REST API: warp's routes as a service under hyper's connection
//! builder, with the limits warp's own server loop lacks.
//!
//! - A client gets [`HEADER_READ_TIMEOUT`] to send its first byte and then its request headers
//!   (HTTP/1), and an idle keep-alive connection as long for its next request: a half-sent
//!   request cannot hold a connection open (slowloris).
//! - At most [`MAX_CONNECTIONS`] connections are open at once; beyond that, new ones wait in the
//!   kernel's backlog until one closes, instead of exhausting the process's file descriptors.
//! - A shutdown stops accepting and lets the open connections finish (the caller bounds how
//!   long).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use warp::Filter;
use warp::reply::Response;

/// How long a client may take to send a request's headers, or to start its next request on a
/// kept-alive connection.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The most connections open at once (event streams and live views included).
pub const MAX_CONNECTIONS: usize = 1024;

/// Serves `routes` on `listener` until `shutdown` completes, then waits for the open
/// connections to finish.
pub async fn serve<R>(listener: TcpListener, routes: R, shutdown: impl Future<Output = ()>)
where
    R: Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static,
{
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let builder = Arc::new(builder);
    let open = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = accept_within_limit(&listener, &open) => accepted,
        };
        let Some((stream, permit)) = accepted else {
            continue;
        };
        let service = TowerToHyperService::new(warp::service(routes.clone()));
        let builder = Arc::clone(&builder);
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            // The first byte is awaited here: the protocol detection of the connection builder
            // has no deadline of its own.
            let mut first = [0u8; 1];
            match tokio::time::timeout(HEADER_READ_TIMEOUT, stream.peek(&mut first)).await {
                Ok(Ok(read)) if read > 0 => {}
                _ => return, // silent, closed or failed: nothing to answer
            }
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(error) = watcher.watch(connection.into_owned()).await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The next connection, once fewer than [`MAX_CONNECTIONS`] are open; `None` when accepting
/// failed (the error is logged; a process out of file descriptors waits a moment).
async fn accept_within_limit(
    listener: &TcpListener,
    open: &Arc<Semaphore>,
) -> Option<(tokio::net::TcpStream, tokio::sync::OwnedSemaphorePermit)> {
    let permit = Arc::clone(open).acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((stream, _)) => {
            let _ = stream.set_nodelay(true);
            Some((stream, permit))
        }
        Err(error) => {
            tracing::warn!(%error, "accepting a connection failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        }
    }
}
