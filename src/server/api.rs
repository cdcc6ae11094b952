//! The REST API's routes (warp) and its error contract: every error is JSON `{"detail": ...}`
//! with an honest status code (400, 401, 404, 405, 409, 413, 415, 422), and bad input never
//! gives a 500.
//!
//! Projects (list with `limit`/`offset`, create, get, rename, delete), `/api/trainable-models`,
//! `/api/devices`, `/api/openapi.json` and `/health` live here; media, jobs, models, sources and
//! sinks, and pipelines have their own modules. Store calls run on tokio's blocking pool, since
//! redb commits wait for the disk.

use std::convert::Infallible;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::endpoints::EndpointKind;
use super::jobs::{Job, JobRunner, JobStatus};
use super::models::LoadedModels;
use super::pipelines::ActivePipelines;
use super::store::{JOBS, MEDIA, MODELS, PIPELINES, PROJECTS, Store, StoreError};
use crate::roots::PathRoots;
use crate::train::Architecture;
use inspectflow_operators::Registry;
use inspectflow_operators::sink::message::rfc3339_utc;

/// What every handler shares.
pub struct AppState {
    /// The metadata store.
    pub store: Store,
    /// When set, every route needs `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Where files (media, models) live.
    pub data_dir: std::path::PathBuf,
    /// Folders clients may name in sources, sinks and graphs.
    pub roots: PathRoots,
    /// Limits on the graph documents clients send.
    pub graph_limits: crate::graph::GraphLimits,
    /// The training worker.
    pub jobs: JobRunner,
    /// Compiled models for `:predict`.
    pub models: LoadedModels,
    /// Running pipelines.
    pub pipelines: ActivePipelines,
}

impl AppState {
    /// `inspectflow_jobs{status}`: how many jobs are in each status.
    pub fn jobs_prometheus(&self) -> String {
        let jobs: Vec<Job> = self.store.all(JOBS).unwrap_or_default();
        let mut text = String::from(
            "# HELP inspectflow_jobs Training jobs by status.\n# TYPE inspectflow_jobs gauge\n",
        );
        for status in JobStatus::ALL {
            let count = jobs.iter().filter(|job| job.status == status).count();
            text.push_str(&format!(
                "inspectflow_jobs{{status=\"{}\"}} {count}\n",
                status.name()
            ));
        }
        text
    }
}

/// The operators graphs may use.
pub(crate) fn registry() -> Registry {
    Registry::builtin()
}

/// An API error: a status and the `detail` the client sees (plus, for graph validation, the
/// list of `errors` with node, field, line and column).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    detail: String,
    errors: Option<Value>,
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

/// A project: the unit that owns media, models, pipelines and jobs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Project {
    /// UUID.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Creation time, RFC 3339 UTC.
    pub created_at: String,
    /// Last change, RFC 3339 UTC.
    pub updated_at: String,
}

/// Body of `POST /api/projects` and `PATCH /api/projects/{id}`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProjectBody {
    name: String,
}

impl ProjectBody {
    fn checked_name(self) -> Result<String, Rejection> {
        let name = self.name.trim().to_string();
        if name.is_empty() || name.len() > 200 {
            return Err(ApiError::reject(
                StatusCode::UNPROCESSABLE_ENTITY,
                "name: must be 1 to 200 characters",
            ));
        }
        Ok(name)
    }
}

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
#[derive(Debug, Serialize)]
pub(crate) struct Pagination {
    offset: usize,
    limit: usize,
    count: usize,
    total: usize,
}

const MAX_LIMIT: usize = 1000;
/// Largest JSON body accepted.
const MAX_JSON_BYTES: u64 = 1 << 20;

pub(crate) fn now() -> String {
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    rfc3339_utc(unix_ms)
}

/// A JSON body of type `T`, at most [`MAX_JSON_BYTES`].
pub(crate) fn json_body<T: serde::de::DeserializeOwned + Send>()
-> impl Filter<Extract = (T,), Error = Rejection> + Clone {
    warp::body::content_length_limit(MAX_JSON_BYTES).and(warp::body::json::<T>())
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

/// Every route, with authentication and error handling.
pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let with_state = {
        let state = Arc::clone(&state);
        warp::any().map(move || Arc::clone(&state))
    };
    let json_body = json_body::<ProjectBody>;
    let health = warp::path!("health")
        .and(warp::get())
        .map(|| warp::reply::json(&serde_json::json!({"status": "ok"})).into_response());
    let list = warp::path!("api" / "projects")
        .and(warp::get())
        .and(warp::query::<Page>())
        .and(with_state.clone())
        .and_then(list_projects);
    let create = warp::path!("api" / "projects")
        .and(warp::post())
        .and(json_body())
        .and(with_state.clone())
        .and_then(create_project);
    let get = warp::path!("api" / "projects" / String)
        .and(warp::get())
        .and(with_state.clone())
        .and_then(get_project);
    let rename = warp::path!("api" / "projects" / String)
        .and(warp::patch())
        .and(json_body())
        .and(with_state.clone())
        .and_then(rename_project);
    let delete = warp::path!("api" / "projects" / String)
        .and(warp::delete())
        .and(with_state.clone())
        .and_then(delete_project);
    let openapi = warp::path!("api" / "openapi.json")
        .and(warp::get())
        .map(|| warp::reply::json(&super::openapi::spec()).into_response());
    let trainable = warp::path!("api" / "trainable-models")
        .and(warp::get())
        .map(|| warp::reply::json(&trainable_models()).into_response());
    let devices = warp::path!("api" / "devices")
        .and(warp::get())
        .and_then(list_devices);
    // Each group is boxed: chaining the concrete filter types of every route into one type made
    // type checking this crate take over ten minutes.
    let projects: BoxedFilter<(Response,)> = list
        .or(create)
        .unify()
        .or(get)
        .unify()
        .or(rename)
        .unify()
        .or(delete)
        .unify()
        .or(openapi)
        .unify()
        .or(trainable)
        .unify()
        .or(devices)
        .unify()
        .boxed();
    let api = projects
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
        .or(super::pipelines::routes(Arc::clone(&state)))
        .unify()
        .or(super::snapshots::routes(Arc::clone(&state)))
        .unify()
        .or(super::captures::routes(Arc::clone(&state)))
        .unify()
        .boxed();
    authenticated(state)
        .and(health.or(api).unify())
        .recover(into_json_error)
        .unify()
}

/// Passes when no token is configured or the request carries it.
fn authenticated(state: Arc<AppState>) -> impl Filter<Extract = (), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and_then(move |header: Option<String>| {
            let state = Arc::clone(&state);
            async move {
                match &state.token {
                    None => Ok(()),
                    Some(token) if header.as_deref() == Some(&format!("Bearer {token}")) => Ok(()),
                    Some(_) => Err(ApiError::reject(
                        StatusCode::UNAUTHORIZED,
                        "missing or wrong bearer token (Authorization: Bearer <token>)",
                    )),
                }
            }
        })
        .untuple_one()
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

async fn list_projects(page: Page, state: Arc<AppState>) -> Result<Response, Rejection> {
    let mut projects: Vec<Project> = blocking(&state, |store| store.all(PROJECTS)).await?;
    projects.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
    let (items, pagination) = paginate(projects, &page)?;
    Ok(
        warp::reply::json(&serde_json::json!({"projects": items, "pagination": pagination}))
            .into_response(),
    )
}

async fn create_project(body: ProjectBody, state: Arc<AppState>) -> Result<Response, Rejection> {
    let now = now();
    let project = Project {
        id: uuid::Uuid::new_v4().to_string(),
        name: body.checked_name()?,
        created_at: now.clone(),
        updated_at: now,
    };
    let stored = project.clone();
    blocking(&state, move |store| {
        store.put(PROJECTS, &stored.id, &stored)
    })
    .await?;
    Ok(warp::reply::with_status(warp::reply::json(&project), StatusCode::CREATED).into_response())
}

async fn get_project(id: String, state: Arc<AppState>) -> Result<Response, Rejection> {
    let key = id.clone();
    match blocking(&state, move |store| store.get::<Project>(PROJECTS, &key)).await? {
        Some(project) => Ok(warp::reply::json(&project).into_response()),
        None => Err(ApiError::not_found("project", &id)),
    }
}

async fn rename_project(
    id: String,
    body: ProjectBody,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    let name = body.checked_name()?;
    let key = id.clone();
    let Some(mut project) =
        blocking(&state, move |store| store.get::<Project>(PROJECTS, &key)).await?
    else {
        return Err(ApiError::not_found("project", &id));
    };
    project.name = name;
    project.updated_at = now();
    let stored = project.clone();
    blocking(&state, move |store| {
        store.put(PROJECTS, &stored.id, &stored)
    })
    .await?;
    Ok(warp::reply::json(&project).into_response())
}

/// Deletes a project with everything it owns, in one store transaction that also makes the
/// busy check (a job in progress), so no job can start and no upload can land between the check
/// and the delete. Records go first and files after: a crash in between leaves orphan files,
/// which `check-db` lists, never records without files.
async fn delete_project(id: String, state: Arc<AppState>) -> Result<Response, Rejection> {
    if let Some(pipeline) = state.pipelines.running_in_project(&id) {
        return Err(ApiError::reject(
            StatusCode::CONFLICT,
            format!("project {id} has running pipeline {pipeline}; stop it first"),
        ));
    }
    /// What the transaction found.
    enum Outcome {
        Deleted {
            models: Vec<super::models::Model>,
            jobs: Vec<Job>,
        },
        Missing,
        Busy(String),
    }
    let key = id.clone();
    let outcome = blocking(&state, move |store| {
        store.write(|tx| {
            if !tx.contains(PROJECTS, &key)? {
                return Ok(Outcome::Missing);
            }
            let jobs: Vec<Job> = tx.all(JOBS)?;
            let jobs: Vec<Job> = jobs.into_iter().filter(|j| j.project_id == key).collect();
            if let Some(job) = jobs.iter().find(|job| !job.status.is_final()) {
                return Ok(Outcome::Busy(job.id.clone()));
            }
            let media: Vec<super::media::Media> = tx.all(MEDIA)?;
            for item in media.iter().filter(|m| m.project_id == key) {
                tx.remove(MEDIA, &item.id)?;
            }
            let models: Vec<super::models::Model> = tx.all(MODELS)?;
            let models: Vec<_> = models.into_iter().filter(|m| m.project_id == key).collect();
            for model in &models {
                tx.remove(MODELS, &model.id)?;
            }
            let pipelines: Vec<super::pipelines::PipelineRecord> = tx.all(PIPELINES)?;
            for pipeline in pipelines.iter().filter(|p| p.project_id == key) {
                tx.remove(PIPELINES, &pipeline.id)?;
            }
            for job in &jobs {
                tx.remove(JOBS, &job.id)?;
            }
            tx.remove(PROJECTS, &key)?;
            Ok(Outcome::Deleted { models, jobs })
        })
    })
    .await?;
    match outcome {
        Outcome::Missing => Err(ApiError::not_found("project", &id)),
        Outcome::Busy(job) => Err(ApiError::reject(
            StatusCode::CONFLICT,
            format!("project {id} has job {job} in progress; cancel it first"),
        )),
        Outcome::Deleted { models, jobs } => {
            let data_dir = state.data_dir.clone();
            let _ = tokio::task::spawn_blocking(move || {
                for model in &models {
                    let _ =
                        std::fs::remove_dir_all(super::models::Model::dir(&data_dir, &model.id));
                }
                for job in &jobs {
                    let _ =
                        std::fs::remove_file(data_dir.join("jobs").join(format!("{}.log", job.id)));
                }
                let _ = std::fs::remove_dir_all(data_dir.join("projects").join(&id));
            })
            .await;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
    }
}

/// The model families training supports, as `GET /api/trainable-models` lists them.
fn trainable_models() -> Value {
    let common = json!({
        "backbone": {"type": "string", "default": "mobilenet_v2", "choices": ["mobilenet_v2", "efficientnet_lite0"]},
        "input_size": {"type": ["integer", "null"], "default": null, "multiple_of": 32, "description": "square input size; null: PaDiM 256, PatchCore the training images' shorter side from 256 to 512"},
        "seed": {"type": "integer", "default": 42},
        "tile": {"type": ["integer", "null"], "default": null, "multiple_of": 32, "description": "cut the input into overlapping tiles of this size, scored as one batch; null: no tiling"}
    });
    let with = |extra: Value| {
        let mut parameters = common.clone();
        if let (Some(all), Some(more)) = (parameters.as_object_mut(), extra.as_object()) {
            all.extend(more.clone());
        }
        parameters
    };
    json!({"trainable_models": [
        {
            "name": Architecture::Padim.name(),
            "description": "PaDiM: a Gaussian per feature-map position, Mahalanobis distance; the fastest to run, for a fixed camera and part.",
            "recommended": false,
            "parameters": with(json!({"padim_channels": {"type": "integer", "default": 100}}))
        },
        {
            "name": Architecture::Patchcore.name(),
            "description": "PatchCore: a coreset memory bank of patch features, nearest-neighbour distance; the most accurate on every dataset of BENCHMARKS.md, tolerates position changes, sizes its input to the images (up to 512) to keep small defects.",
            "recommended": true,
            "parameters": with(json!({
                "memory_bank": {"type": ["integer", "null"], "default": null, "description": "rows of the memory bank; null: 10% of the training patches, at most 1024"}
            }))
        }
    ]})
}

async fn list_devices() -> Result<Response, Rejection> {
    let inference =
        tokio::task::spawn_blocking(inspectflow_operators::infer::runtime::available_devices)
            .await
            .map_err(|e| ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(|e| ApiError::reject(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let mut cameras: Vec<Value> = std::fs::read_dir("/dev")
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok())
                .filter_map(|entry| {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let index: u32 = name.strip_prefix("video")?.parse().ok()?;
                    Some(json!({"index": index, "path": format!("/dev/{name}"), "type": "usb_camera"}))
                })
                .collect()
        })
        .unwrap_or_default();
    cameras.sort_by_key(|camera| camera["index"].as_u64());
    Ok(
        warp::reply::json(&json!({"inference_devices": inference, "cameras": cameras}))
            .into_response(),
    )
}

/// Turns every rejection into `{"detail": ...}` with the right status.
async fn into_json_error(rejection: Rejection) -> Result<Response, Infallible> {
    if let Some(ApiError {
        status,
        detail,
        errors: Some(errors),
    }) = rejection.find::<ApiError>()
    {
        return Ok(warp::reply::with_status(
            warp::reply::json(&json!({"detail": detail, "errors": errors})),
            *status,
        )
        .into_response());
    }
    let (status, detail) = if let Some(error) = rejection.find::<ApiError>() {
        (error.status, error.detail.clone())
    } else if rejection.is_not_found() {
        (StatusCode::NOT_FOUND, "no such route".to_string())
    } else if let Some(error) = rejection.find::<warp::filters::body::BodyDeserializeError>() {
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("request body: {error}"),
        )
    } else if let Some(error) = rejection.find::<warp::reject::InvalidQuery>() {
        (StatusCode::UNPROCESSABLE_ENTITY, format!("query: {error}"))
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body too large (JSON: {MAX_JSON_BYTES} bytes, uploads: {} bytes)",
                super::media::MAX_UPLOAD_BYTES
            ),
        )
    } else if rejection
        .find::<warp::reject::UnsupportedMediaType>()
        .is_some()
    {
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be application/json".to_string(),
        )
    } else if rejection.find::<warp::reject::LengthRequired>().is_some() {
        (
            StatusCode::LENGTH_REQUIRED,
            "the request needs a Content-Length".to_string(),
        )
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
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
    Ok(warp::reply::with_status(
        warp::reply::json(&serde_json::json!({ "detail": detail })),
        status,
    )
    .into_response())
}
