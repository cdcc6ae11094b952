//! Accepting connections for the REST API: warp's routes as a service under hyper's HTTP/1
//! connection, with the limits warp's own server loop lacks.
//!
//! - A client gets [`HEADER_READ_TIMEOUT`] to send its request headers from the moment its
//!   connection opens, and an idle keep-alive connection as long for its next request: a silent
//!   or half-sent request cannot hold a connection open (slowloris). Long responses (event
//!   streams, MJPEG) are not cut: the deadline only runs while a request head is awaited.
//! - At most [`MAX_CONNECTIONS`] connections (fewer when the process may open few files) are
//!   open at once; beyond that, new ones wait in the kernel's backlog until one closes, instead
//!   of exhausting the process's file descriptors.
//! - HTTP/1.1 only: cleartext HTTP/2 (prior knowledge) would need deadlines of its own, and no
//!   client of the API uses it.
//! - A shutdown stops accepting and lets the open connections finish (the caller bounds how
//!   long).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
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
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let open = Arc::new(Semaphore::new(connection_bound()));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = accept_within_bound(&listener, &open) => accepted,
        };
        let Some((stream, permit)) = accepted else {
            continue;
        };
        let service = TowerToHyperService::new(warp::service(routes.clone()));
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// [`MAX_CONNECTIONS`], or a third of the open-file limit when that is lower (a connection may
/// hold a file it is sending as well as its socket; the rest is for the store, models,
/// pipelines' files and sockets). The soft limit is first raised to the hard one.
fn connection_bound() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a stack value of the type they expect.
    let files = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return MAX_CONNECTIONS;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
        limit.rlim_cur
    };
    usize::try_from(files / 3)
        .unwrap_or(MAX_CONNECTIONS)
        .clamp(16, MAX_CONNECTIONS)
}

/// The next connection, once fewer than the bound are open; `None` when accepting failed. A
/// process out of file descriptors or memory waits a moment before trying again; a connection
/// that failed on its own (reset, aborted) is just skipped.
async fn accept_within_bound(
    listener: &TcpListener,
    open: &Arc<Semaphore>,
) -> Option<(TcpStream, OwnedSemaphorePermit)> {
    let permit = Arc::clone(open).acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((stream, _)) => {
            let _ = stream.set_nodelay(true);
            Some((stream, permit))
        }
        Err(error) => {
            let out_of_resources = matches!(
                error.raw_os_error(),
                Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
            );
            if out_of_resources {
                tracing::warn!(%error, "accepting a connection failed; waiting 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            } else {
                tracing::debug!(%error, "accepting a connection failed");
            }
            None
        }
    }
}
