//! HTTP helpers every resource shares: the JSON error contract ([`ApiError`], answered as
//! [`ErrorBody`]), JSON bodies with a size limit, paging (`limit`/`offset` and the `pagination`
//! part of list answers), colon actions (`/api/jobs/{id}:cancel`), store calls on the blocking
//! pool and JSON replies. With [`super::state`] the bottom layer of the server.

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

/// `response` with its Content-Type, and with `filename` a Content-Disposition offering it as a
/// download under that name.
pub(crate) fn with_file_headers(
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
                let value = serde_path_to_error::deserialize(&mut reader)
                    .map_err(|error| field_error("request body", error))?;
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

/// 422 for `error` in `what` (a request body, a query), naming the field it is in, if any:
/// `query field limit: invalid digit found in string`.
fn field_error<E: std::fmt::Display>(
    what: &str,
    error: serde_path_to_error::Error<E>,
) -> Rejection {
    let field = match error.path().to_string().as_str() {
        "." => String::new(),
        field => format!(" field {field}"),
    };
    ApiError::reject(
        StatusCode::UNPROCESSABLE_ENTITY,
        format!("{what}{field}: {}", error.inner()),
    )
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
            serde_path_to_error::deserialize(pairs).map_err(|error| field_error("query", error))
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
