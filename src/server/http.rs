//! HTTP helpers every resource shares: the JSON error contract ([`ApiError`], answered as
//! [`ErrorBody`]), JSON bodies with a size limit, paging (`limit`/`offset` and the `pagination`
//! part of list answers), colon actions (`/api/jobs/{id}:cancel`), store calls on the blocking
//! pool, JSON replies and downloads streamed as they are written. With [`super::state`] the
//! bottom layer of the server.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::state::AppState;
use super::store::{PROJECTS, Store, StoreError};
use inspectflow_operators::sink::message::rfc3339_utc;

/// An API error: a status and the `detail` the client sees (plus, for graph validation, the
/// list of `errors` with node, field, line and column).
#[derive(Debug)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) detail: String,
    pub(crate) errors: Option<Value>,
}

impl warp::reject::Reject for ApiError {}

impl ApiError {
    pub(crate) fn reject(status: StatusCode, detail: impl Into<String>) -> Rejection {
        warp::reject::custom(Self {
            status,
            detail: detail.into(),
            errors: None,
        })
    }

    pub(crate) fn with_errors(
        status: StatusCode,
        detail: impl Into<String>,
        errors: Value,
    ) -> Rejection {
        warp::reject::custom(Self {
            status,
            detail: detail.into(),
            errors: Some(errors),
        })
    }

    pub(crate) fn not_found(what: &str, id: &str) -> Rejection {
        Self::reject(StatusCode::NOT_FOUND, format!("{what} {id} not found"))
    }

    /// What the client is told.
    pub(crate) fn detail(&self) -> &str {
        &self.detail
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        tracing::error!("store: {error}");
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            detail: format!("the store failed: {error}"),
            errors: None,
        }
    }
}

/// What every error answer carries.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ErrorBody {
    /// What was wrong, naming the request field, node or record.
    pub detail: String,
    /// Graph validation: every problem found, with node, field, line and column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<Value>>,
}

/// `body` as JSON with `status`.
pub(crate) fn json_reply<T: Serialize>(status: StatusCode, body: &T) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}

/// `body` as JSON with 200.
pub(crate) fn ok<T: Serialize>(body: &T) -> Response {
    warp::reply::json(body).into_response()
}

/// A binary answer of `content_type`; with `filename`, offered as a download under that name.
pub(crate) fn file_reply(
    body: Vec<u8>,
    content_type: &'static str,
    filename: Option<&str>,
) -> Response {
    with_file_headers(Response::new(body.into()), content_type, filename)
}

fn with_file_headers(
    mut response: Response,
    content_type: &'static str,
    filename: Option<&str>,
) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        warp::http::header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static(content_type),
    );
    if let Some(value) = filename.and_then(|name| {
        warp::http::HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")).ok()
    }) {
        headers.insert(warp::http::header::CONTENT_DISPOSITION, value);
    }
    response
}

/// Bytes of each chunk a [`BodyWriter`] hands to the connection.
const BODY_CHUNK_BYTES: usize = 256 << 10;
/// How long a streamed download waits for its client to take the next chunk before giving up.
const BODY_IDLE: std::time::Duration = std::time::Duration::from_secs(30);
/// The longest a streamed download may take in all: a client that reads just fast enough not
/// to be idle cannot hold its turn for ever.
const BODY_TOTAL: std::time::Duration = std::time::Duration::from_secs(30 * 60);
/// Streamed downloads written at once ([`STREAMED_DOWNLOADS`]). Each holds a thread of the blocking pool (which the
/// store's calls need too) and one row group or so of memory.
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
/// [`MAX_STREAMED_DOWNLOADS`] at once; a download that waits over [`TURN_WAIT`] for its turn is 503.
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

/// Declares the answer of a list route: `{"<field>": [items], "pagination": {...}}`.
macro_rules! listing {
    ($(#[$doc:meta])* $name:ident, $field:ident, $item:ty) => {
        $(#[$doc])*
        #[derive(Debug, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
        pub struct $name {
            /// This page's items.
            pub $field: Vec<$item>,
            /// Where the page lies in the whole list.
            pub pagination: $crate::server::http::Pagination,
        }
    };
}
pub(crate) use listing;

/// `limit` and `offset` of a list request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Page {
    #[serde(default = "default_limit")]
    limit: usize,
    #[serde(default)]
    offset: usize,
}

fn default_limit() -> usize {
    20
}

/// `project_id`, `limit` and `offset` of a list request that filters by project. (Not a
/// flattened [`Page`]: query strings carry numbers as text, which serde's `flatten` cannot
/// parse into numbers.)
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProjectPage {
    #[serde(default)]
    pub(crate) project_id: Option<String>,
    #[serde(default = "default_limit")]
    limit: usize,
    #[serde(default)]
    offset: usize,
}

impl ProjectPage {
    /// The `limit` and `offset` part.
    pub(crate) fn page(&self) -> Page {
        Page {
            limit: self.limit,
            offset: self.offset,
        }
    }
}

/// The `pagination` part of a list response.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Pagination {
    /// Items skipped.
    pub offset: usize,
    /// Most items asked for.
    pub limit: usize,
    /// Items in this page.
    pub count: usize,
    /// Items in the whole list.
    pub total: usize,
}

const MAX_LIMIT: usize = 1000;
/// Largest JSON body accepted.
pub(crate) const MAX_JSON_BYTES: u64 = 1 << 20;

pub(crate) fn now() -> String {
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    rfc3339_utc(unix_ms)
}

/// A JSON body of type `T`, at most [`MAX_JSON_BYTES`]: 415 when it is declared as another
/// type, 422 naming the field that does not fit (`request body field camera.url: ...`).
pub(crate) fn json_body<T: serde::de::DeserializeOwned + Send>()
-> impl Filter<Extract = (T,), Error = Rejection> + Clone {
    body_limit(MAX_JSON_BYTES, "a JSON body")
        .and(warp::header::optional::<String>("content-type"))
        .and(warp::body::bytes())
        .and_then(
            |content_type: Option<String>, body: bytes::Bytes| async move {
                if content_type.is_some_and(|value| !is_json(&value)) {
                    return Err(ApiError::reject(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "the body must be application/json",
                    ));
                }
                let mut reader = serde_json::Deserializer::from_slice(&body);
                let value = serde_path_to_error::deserialize(&mut reader).map_err(|error| {
                    ApiError::reject(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("request body{}: {}", field_of(error.path()), error.inner()),
                    )
                })?;
                reader.end().map_err(|error| {
                    ApiError::reject(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("request body: {error}"),
                    )
                })?;
                Ok(value)
            },
        )
}

/// Whether a Content-Type header value is JSON (`application/json`, parameters allowed).
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
}

/// ` field <path>` for an error inside a field, nothing for one at the top.
fn field_of(path: &serde_path_to_error::Path) -> String {
    match path.to_string().as_str() {
        "." => String::new(),
        field => format!(" field {field}"),
    }
}

/// The query string as `T` (an absent one as empty): 422 naming the field that does not fit
/// (`query field limit: invalid digit found in string`), where warp's own filter says only
/// "Invalid query string".
pub(crate) fn query<T: serde::de::DeserializeOwned + Send + 'static>()
-> impl Filter<Extract = (T,), Error = Rejection> + Clone {
    warp::query::raw()
        .or(warp::any().map(String::new))
        .unify()
        .and_then(|raw: String| async move {
            let pairs = serde_urlencoded::Deserializer::new(form_urlencoded::parse(raw.as_bytes()));
            serde_path_to_error::deserialize(pairs).map_err(|error| {
                ApiError::reject(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("query{}: {}", field_of(error.path()), error.inner()),
                )
            })
        })
}

/// Passes requests whose Content-Length is at most `limit` bytes; refuses larger ones with 413
/// naming this route's limit and what the body is (`what`), and bodies without a length with 411.
pub(crate) fn body_limit(
    limit: u64,
    what: &'static str,
) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::body::content_length_limit(limit).or_else(move |rejection: Rejection| async move {
        let too_large = rejection.find::<warp::reject::PayloadTooLarge>().is_some();
        Err::<(), _>(if too_large {
            ApiError::reject(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body too large: {what} may be at most {limit} bytes"),
            )
        } else {
            rejection
        })
    })
}

/// The request body, refused with 408 when the client sends nothing for `idle` or takes longer
/// than `total` in all: a body sent a byte at a time cannot hold a route (and what it reserved
/// for the request) for ever.
pub(crate) fn body_within(
    idle: std::time::Duration,
    total: std::time::Duration,
) -> impl Filter<Extract = (bytes::Bytes,), Error = Rejection> + Clone {
    warp::body::stream().and_then(move |stream| collect_body(stream, idle, total))
}

/// Gathers `stream` into one buffer within `idle` between chunks and `total` in all.
async fn collect_body<Chunk: bytes::Buf>(
    stream: impl futures::Stream<Item = Result<Chunk, warp::Error>>,
    idle: std::time::Duration,
    total: std::time::Duration,
) -> Result<bytes::Bytes, Rejection> {
    use bytes::BufMut;
    use futures::StreamExt;
    let mut stream = std::pin::pin!(stream);
    let mut body = bytes::BytesMut::new();
    let deadline = tokio::time::Instant::now() + total;
    let too_slow = |why: String| ApiError::reject(StatusCode::REQUEST_TIMEOUT, why);
    loop {
        let wait = idle.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        match tokio::time::timeout(wait, stream.next()).await {
            Err(_) if tokio::time::Instant::now() >= deadline => {
                return Err(too_slow(format!(
                    "request body: not received within {} s",
                    total.as_secs()
                )));
            }
            Err(_) => {
                return Err(too_slow(format!(
                    "request body: nothing received for {} s",
                    idle.as_secs()
                )));
            }
            Ok(None) => return Ok(body.freeze()),
            Ok(Some(Err(e))) => {
                return Err(ApiError::reject(
                    StatusCode::BAD_REQUEST,
                    format!("request body: {e}"),
                ));
            }
            Ok(Some(Ok(chunk))) => body.put(chunk),
        }
    }
}

/// A path segment `<id>:<name>` (the colon-suffixed actions, as in `/api/jobs/{id}:cancel`),
/// extracting the id.
pub(crate) fn action(
    name: &'static str,
) -> impl Filter<Extract = (String,), Error = Rejection> + Clone {
    warp::path::param::<String>().and_then(move |segment: String| async move {
        segment
            .strip_suffix(name)
            .and_then(|rest| rest.strip_suffix(':'))
            .map(str::to_string)
            .ok_or_else(warp::reject::not_found)
    })
}

/// Runs a store call on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    state: &Arc<AppState>,
    call: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Rejection> {
    let state = Arc::clone(state);
    tokio::task::spawn_blocking(move || call(&state.store))
        .await
        .map_err(|e| ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| warp::reject::custom(ApiError::from(e)))
}

/// Writes `record` of project `project_id`, in one transaction with the check that the project
/// still exists: a record can never outlive its project (a delete racing this write makes it
/// answer 404).
pub(crate) async fn put_in_project<T: Serialize + Send + 'static>(
    state: &Arc<AppState>,
    project_id: &str,
    table: super::store::Collection,
    id: &str,
    record: T,
) -> Result<(), Rejection> {
    let (project, key) = (project_id.to_string(), id.to_string());
    let written = blocking(state, move |store| {
        store.write(|tx| {
            if !tx.contains(PROJECTS, &project)? {
                return Ok(false);
            }
            tx.put(table, &key, &record)?;
            Ok(true)
        })
    })
    .await?;
    if written {
        Ok(())
    } else {
        Err(ApiError::not_found("project", project_id))
    }
}

/// One page of `items` (already in order) and its `pagination` part.
pub(crate) fn paginate<T>(items: Vec<T>, page: &Page) -> Result<(Vec<T>, Pagination), Rejection> {
    if page.limit == 0 || page.limit > MAX_LIMIT {
        return Err(ApiError::reject(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("limit: must be 1 to {MAX_LIMIT}"),
        ));
    }
    let total = items.len();
    let items: Vec<T> = items
        .into_iter()
        .skip(page.offset)
        .take(page.limit)
        .collect();
    let pagination = Pagination {
        offset: page.offset,
        limit: page.limit,
        count: items.len(),
        total,
    };
    Ok((items, pagination))
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
