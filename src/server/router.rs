//! The top of the server: every resource's routes behind authentication, and the error
//! contract: every rejection becomes JSON [`ErrorBody`] with an honest status code (400, 401,
//! 404, 405, 409, 413, 415, 422), and bad input never gives a 500. Nothing imports from here.

use std::convert::Infallible;
use std::sync::Arc;

use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection};

use super::endpoints::EndpointKind;
use super::http::{ApiError, ErrorBody, json_reply};
use super::state::AppState;

/// Every route, with authentication and error handling.
pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    // Each resource's routes are boxed: chaining the concrete filter types of every route into
    // one type made type checking this crate take over ten minutes.
    let api = super::system::routes()
        .or(super::projects::routes(Arc::clone(&state)))
        .unify()
        .or(super::media::routes(Arc::clone(&state)))
        .unify()
        .or(super::jobs::routes(Arc::clone(&state)))
        .unify()
        .or(super::models::routes(Arc::clone(&state)))
        .unify()
        .or(super::endpoints::routes(
            Arc::clone(&state),
            EndpointKind::Source,
        ))
        .unify()
        .or(super::endpoints::routes(
            Arc::clone(&state),
            EndpointKind::Sink,
        ))
        .unify()
        .or(super::endpoint_yaml::routes(
            Arc::clone(&state),
            EndpointKind::Source,
        ))
        .unify()
        .or(super::endpoint_yaml::routes(
            Arc::clone(&state),
            EndpointKind::Sink,
        ))
        .unify()
        .or(super::pipelines::routes(Arc::clone(&state)))
        .unify()
        .or(super::active::routes(Arc::clone(&state)))
        .unify()
        .or(super::preview::routes(Arc::clone(&state)))
        .unify()
        .or(super::snapshots::routes(Arc::clone(&state)))
        .unify()
        .or(super::captures::routes(Arc::clone(&state)))
        .unify()
        .or(super::fleet_routes::routes(Arc::clone(&state)))
        .unify()
        .boxed();
    #[cfg(feature = "gstreamer")]
    let api = api
        .or(super::webrtc::routes(Arc::clone(&state)))
        .unify()
        .boxed();
    // The UI's page and assets hold no data, so they are served without the token (the page
    // asks for it and sends it with every API call).
    super::ui::routes()
        .or(same_site().and(authenticated(state)).and(api))
        .unify()
        .recover(into_json_error)
        .unify()
}

/// Refuses a request that changes something when a browser says another site sent it (its
/// `Origin` is not this server, or `Sec-Fetch-Site` is `cross-site`): a web page cannot make a
/// visitor's browser drive a server on their machine or network. Programs send neither header.
fn same_site() -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::method()
        .and(warp::header::optional::<String>("origin"))
        .and(warp::header::optional::<String>("host"))
        .and(warp::header::optional::<String>("sec-fetch-site"))
        .and_then(
            |method: warp::http::Method,
             origin: Option<String>,
             host: Option<String>,
             fetch_site: Option<String>| async move {
                let reads = matches!(
                    method,
                    warp::http::Method::GET
                        | warp::http::Method::HEAD
                        | warp::http::Method::OPTIONS
                );
                let origin_host = origin
                    .as_deref()
                    .and_then(|origin| origin.split_once("://"))
                    .map(|(_, rest)| rest.split('/').next().unwrap_or(rest));
                let foreign_origin = match (origin.as_deref(), origin_host, host.as_deref()) {
                    (Some(_), Some(origin_host), Some(host)) => {
                        !origin_host.eq_ignore_ascii_case(host)
                    }
                    // `Origin: null` (a sandboxed page, a file) or one that is not a URL.
                    (Some(_), None, _) => true,
                    _ => false,
                };
                let cross_site = fetch_site.as_deref() == Some("cross-site");
                if reads || !(foreign_origin || cross_site) {
                    Ok(())
                } else {
                    Err(ApiError::reject(
                        StatusCode::FORBIDDEN,
                        format!(
                            "Origin: {} is another site than this server ({}); the API takes \
                             changes from its own pages and from programs",
                            origin.as_deref().unwrap_or("-"),
                            host.as_deref().unwrap_or("-")
                        ),
                    ))
                }
            },
        )
        .untuple_one()
}

/// Whether an `Authorization` header value is `Bearer <token>`, compared in constant time (no
/// early exit that would tell how much of a guess was right).
fn carries_token(header: Option<&str>, token: &str) -> bool {
    use subtle::ConstantTimeEq;
    header
        .and_then(|value| value.strip_prefix("Bearer "))
        .is_some_and(|given| bool::from(given.as_bytes().ct_eq(token.as_bytes())))
}

/// Passes when no token is configured or the request carries it.
fn authenticated(state: Arc<AppState>) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and_then(move |header: Option<String>| {
            let state = Arc::clone(&state);
            async move {
                match &state.token {
                    None => Ok(()),
                    Some(token) if carries_token(header.as_deref(), token) => Ok(()),
                    Some(_) => Err(ApiError::reject(
                        StatusCode::UNAUTHORIZED,
                        "missing or wrong bearer token (Authorization: Bearer <token>)",
                    )),
                }
            }
        })
        .untuple_one()
}

/// Turns every rejection into `{"detail": ...}` with the right status.
async fn into_json_error(rejection: Rejection) -> Result<Response, Infallible> {
    if let Some(ApiError {
        status,
        detail,
        errors: Some(errors),
    }) = rejection.find::<ApiError>()
    {
        let errors = match errors {
            serde_json::Value::Array(errors) => errors.clone(),
            other => vec![other.clone()],
        };
        return Ok(json_reply(
            *status,
            &ErrorBody {
                detail: detail.clone(),
                errors: Some(errors),
            },
        ));
    }
    let (status, detail) = if let Some(error) = rejection.find::<ApiError>() {
        (error.status, error.detail.clone())
    } else if rejection.is_not_found() {
        (StatusCode::NOT_FOUND, "no such route".to_string())
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        // Routes name their own limit (`http::body_limit`); this is only a fallback.
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large".to_string(),
        )
    } else if rejection.find::<warp::reject::LengthRequired>().is_some() {
        (
            StatusCode::LENGTH_REQUIRED,
            "the request needs a Content-Length".to_string(),
        )
    } else if let Some(header) = rejection.find::<warp::reject::InvalidHeader>() {
        (
            StatusCode::BAD_REQUEST,
            invalid_header_detail(header.name()),
        )
    } else if let Some(header) = rejection.find::<warp::reject::MissingHeader>() {
        (
            StatusCode::BAD_REQUEST,
            format!("header {}: missing", header.name()),
        )
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        // Last of the known ones: a route that refused only the method matched less of the
        // request than one that refused a header or the body.
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed on this route".to_string(),
        )
    } else {
        (
            StatusCode::BAD_REQUEST,
            format!("bad request: {rejection:?}"),
        )
    };
    Ok(json_reply(
        status,
        &ErrorBody {
            detail,
            errors: None,
        },
    ))
}

/// What is wrong with a header a route could not read.
fn invalid_header_detail(name: &str) -> String {
    if name.eq_ignore_ascii_case("content-type") {
        "header content-type: invalid (an upload is `multipart/form-data; boundary=...`, a JSON \
         body `application/json`)"
            .to_string()
    } else {
        format!("header {name}: invalid")
    }
}
