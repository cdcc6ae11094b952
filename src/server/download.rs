//! Downloads sent while they are produced, so that the server holds a few chunks of each
//! instead of the whole file: [`streamed_file_reply`] for files written on the fly (snapshot
//! files), [`file_download`] for files on disk (media).

use std::path::Path;
use std::sync::Arc;

use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Rejection, Reply};

use super::http::{ApiError, with_file_headers};

/// Bytes of each chunk a [`BodyWriter`] hands to the connection.
const BODY_CHUNK_BYTES: usize = 256 << 10;
/// How long a streamed download waits for its client to take the next chunk before giving up.
const BODY_IDLE: std::time::Duration = std::time::Duration::from_secs(30);
/// The longest a streamed download may take in all: a client that reads just fast enough not
/// to be idle cannot hold its turn for ever.
const BODY_TOTAL: std::time::Duration = std::time::Duration::from_secs(30 * 60);
/// Streamed downloads written at once ([`STREAMED_DOWNLOADS`]). Each holds a thread of the
/// blocking pool (which the store's calls need too) and one row group or so of memory.
const MAX_STREAMED_DOWNLOADS: usize = 8;
static STREAMED_DOWNLOADS: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(MAX_STREAMED_DOWNLOADS);
/// How long a download waits for its turn before it is answered 503.
const TURN_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A [`std::io::Write`] whose bytes become an HTTP body as they are written, from a blocking
/// thread, in chunks of [`BODY_CHUNK_BYTES`]: it waits while the client is a few chunks behind,
/// and fails once the client has left, has taken nothing for [`BODY_IDLE`], or the download
/// has taken [`BODY_TOTAL`].
pub(crate) struct BodyWriter {
    chunks: tokio::sync::mpsc::Sender<bytes::Bytes>,
    pending: bytes::BytesMut,
    runtime: tokio::runtime::Handle,
    deadline: tokio::time::Instant,
}

impl BodyWriter {
    /// Sends the whole chunks gathered so far, and with `all` the rest too.
    fn hand_over(&mut self, all: bool) -> std::io::Result<()> {
        while self.pending.len() >= BODY_CHUNK_BYTES || (all && !self.pending.is_empty()) {
            let size = self.pending.len().min(BODY_CHUNK_BYTES);
            let chunk = self.pending.split_to(size).freeze();
            self.send(chunk)?;
        }
        Ok(())
    }

    fn send(&self, chunk: bytes::Bytes) -> std::io::Result<()> {
        let wait = BODY_IDLE.min(self.deadline - tokio::time::Instant::now());
        let sent = self
            .runtime
            .block_on(tokio::time::timeout(wait, self.chunks.send(chunk)));
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the client went away",
            )),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the client took nothing for {} s, or the download passed {} minutes",
                    BODY_IDLE.as_secs(),
                    BODY_TOTAL.as_secs() / 60
                ),
            )),
        }
    }
}

impl std::io::Write for BodyWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        bytes::BufMut::put_slice(&mut self.pending, bytes);
        self.hand_over(false)?;
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.hand_over(true)
    }
}

/// A download of `content_type` that `write` produces on the blocking pool while it is sent:
/// the server holds a few chunks of it, not the whole file, and writes at most
/// [`MAX_STREAMED_DOWNLOADS`] at once; a download that waits over [`TURN_WAIT`] for its turn
/// is 503.
/// What goes wrong before the first byte should be found by the caller beforehand (the status
/// is sent first). A body is complete only when `write` returned and everything was sent;
/// otherwise (an error, a panic, a client too slow) it ends in an error, so the client sees a
/// broken transfer, not a short file.
pub(crate) async fn streamed_file_reply(
    content_type: &'static str,
    filename: Option<&str>,
    write: impl FnOnce(&mut BodyWriter) -> Result<(), String> + Send + 'static,
) -> Result<Response, Rejection> {
    let turn = tokio::time::timeout(TURN_WAIT, STREAMED_DOWNLOADS.acquire())
        .await
        .map_err(|_| {
            ApiError::reject(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{MAX_STREAMED_DOWNLOADS} downloads are being written; try again shortly"),
            )
        })?
        .ok();
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let complete = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let name = filename.unwrap_or(content_type).to_string();
    let runtime = tokio::runtime::Handle::current();
    let completed = Arc::clone(&complete);
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        let mut body = BodyWriter {
            chunks: sender,
            pending: bytes::BytesMut::with_capacity(BODY_CHUNK_BYTES),
            runtime,
            deadline: tokio::time::Instant::now() + BODY_TOTAL,
        };
        let written = write(&mut body)
            .and_then(|()| std::io::Write::flush(&mut body).map_err(|e| e.to_string()));
        match written {
            Ok(()) => completed.store(true, std::sync::atomic::Ordering::Release),
            Err(error) => tracing::warn!("download of {name} stopped: {error}"),
        }
    });
    // The body's end: whole when the writer finished, an error (the transfer is aborted)
    // when the channel closed without that.
    let body = futures::stream::unfold(Some(receiver), move |receiver| {
        let complete = Arc::clone(&complete);
        async move {
            let mut receiver = receiver?;
            match receiver.recv().await {
                Some(chunk) => Some((Ok(chunk), Some(receiver))),
                None if complete.load(std::sync::atomic::Ordering::Acquire) => None,
                None => Some((
                    Err(std::io::Error::other("the download stopped before its end")),
                    None,
                )),
            }
        }
    });
    Ok(with_file_headers(
        warp::reply::stream(body).into_response(),
        content_type,
        filename,
    ))
}

/// Files up to this size are answered from memory (thumbnails and most images); larger ones
/// are streamed from the file.
const WHOLE_FILE_BYTES: u64 = 1 << 20;

/// The file at `path` as a download of `content_type`: read whole when small, streamed through
/// a 64 KiB buffer with its length declared otherwise (files are put in place by a rename, so
/// the length cannot change under it).
pub(crate) async fn file_download(
    path: &Path,
    content_type: &'static str,
) -> std::io::Result<Response> {
    let mut file = tokio::fs::File::open(path).await?;
    let length = file.metadata().await?.len();
    let response = if length <= WHOLE_FILE_BYTES {
        let mut bytes = Vec::with_capacity(length as usize);
        tokio::io::AsyncReadExt::read_to_end(&mut file, &mut bytes).await?;
        Response::new(bytes.into())
    } else {
        let body = tokio_util::io::ReaderStream::with_capacity(file, 64 << 10);
        let mut response = warp::reply::stream(body).into_response();
        response.headers_mut().insert(
            warp::http::header::CONTENT_LENGTH,
            warp::http::HeaderValue::from(length),
        );
        response
    };
    Ok(with_file_headers(response, content_type, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::io::Write;

    /// The bytes of `response`'s body, and the error it ended in, if any.
    async fn read_body(response: Response) -> (usize, Option<String>) {
        let mut body = response.into_body();
        let mut bytes = 0;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => bytes += frame.data_ref().map_or(0, |data| data.len()),
                Err(error) => return (bytes, Some(format!("{error:?}"))),
            }
        }
        (bytes, None)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_streamed_download_is_whole_or_ends_in_an_error() {
        let size = 3 * BODY_CHUNK_BYTES + 5;
        let whole = streamed_file_reply("application/octet-stream", Some("a.bin"), move |body| {
            body.write_all(&vec![7; size]).map_err(|e| e.to_string())
        })
        .await
        .expect("a turn");
        assert_eq!(
            whole.headers()[warp::http::header::CONTENT_DISPOSITION],
            "attachment; filename=\"a.bin\""
        );
        assert_eq!(read_body(whole).await, (size, None));

        let cut = streamed_file_reply("application/octet-stream", None, |body| {
            body.write_all(&vec![7; 2 * BODY_CHUNK_BYTES])
                .map_err(|e| e.to_string())?;
            Err("an image went missing".to_string())
        })
        .await
        .expect("a turn");
        let (bytes, error) = read_body(cut).await;
        assert_eq!(bytes, 2 * BODY_CHUNK_BYTES);
        let error = error.expect("the body ends in an error, not as a whole file");
        assert!(error.contains("stopped before its end"), "{error}");

        // A writer that panics half-way does not end the body as a whole file either.
        let panicked = streamed_file_reply("application/octet-stream", None, |body| {
            body.write_all(&[7; 10]).map_err(|e| e.to_string())?;
            panic!("a bug in the writer")
        })
        .await
        .expect("a turn");
        assert!(read_body(panicked).await.1.is_some());

        // One large write goes out in chunks of BODY_CHUNK_BYTES.
        let large = streamed_file_reply("application/octet-stream", None, |body| {
            body.write_all(&vec![7; 10 * BODY_CHUNK_BYTES + 1])
                .map_err(|e| e.to_string())
        })
        .await
        .expect("a turn");
        let mut body = large.into_body();
        let mut sizes = Vec::new();
        while let Some(frame) = body.frame().await {
            sizes.push(frame.expect("data").into_data().expect("data").len());
        }
        assert_eq!(sizes.len(), 11, "{sizes:?}");
        assert!(
            sizes.iter().all(|size| *size <= BODY_CHUNK_BYTES),
            "{sizes:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_streamed_download_stops_writing_once_its_client_has_left() {
        let (outcome, ended) = std::sync::mpsc::channel();
        let response = streamed_file_reply("application/octet-stream", None, move |body| {
            let written = (0..1000).try_for_each(|_| body.write_all(&[0; BODY_CHUNK_BYTES]));
            let _ = outcome.send(written.map_err(|e| e.kind()));
            Ok(())
        })
        .await
        .expect("a turn");
        drop(response);
        let written = tokio::task::spawn_blocking(move || {
            ended.recv_timeout(std::time::Duration::from_secs(120))
        })
        .await
        .expect("joined")
        .expect("the writer ended");
        assert_eq!(written, Err(std::io::ErrorKind::BrokenPipe));
    }
}
