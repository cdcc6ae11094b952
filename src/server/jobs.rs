//! Training jobs: `POST /api/projects/{id}/train` queues one, a worker runs it, and
//! `/api/jobs` shows it (status, progress percent and stage, log lines, also as server-sent
//! events) and cancels it.
//!
//! [`super::training`] runs the jobs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;

use super::openapi::{Content, RouteDoc, schema_of};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::http::{ApiError, ProjectPage, action, blocking, listing, now, paginate};
use super::job_log::{log_file_lines, log_path};
use super::media::Media;
use super::projects::Project;
use super::snapshot_store::Snapshot;
use super::state::AppState;
use super::store::{JOBS, MEDIA, PROJECTS, SNAPSHOTS};
use super::training::{submit, until_final};
use crate::train::{Architecture, TrainConfig};

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Queued, waiting for a free worker.
    Pending,
    /// Training.
    Running,
    /// Done; the model is registered.
    Completed,
    /// Ended with an error (see `message`); no model.
    Failed,
    /// Canceled by a user; no model.
    Canceled,
}

impl JobStatus {
    /// Every status, in the order of a job's life.
    pub const ALL: [JobStatus; 5] = [
        Self::Pending,
        Self::Running,
        Self::Completed,
        Self::Failed,
        Self::Canceled,
    ];

    /// The status as the API writes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
        }
    }

    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Canceled)
    }
}

/// What to train: the body of `POST /api/projects/{id}/train`, the run's [`TrainConfig`] (the
/// settings `inspectflow train` takes as flags) plus an optional display name.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TrainRequest {
    /// Display name of the model (1 to 200 characters; default: family and time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 200))]
    pub name: Option<String>,
    /// The dataset snapshot to train on (`/api/snapshots/{id}`, of the same project); default:
    /// a snapshot of the project's media when the job starts (an unchanged dataset reuses its
    /// newest one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_snapshot_id: Option<String>,
    /// The training settings.
    #[serde(flatten)]
    pub config: TrainConfig,
}

impl TrainRequest {
    /// Reads and checks a request body, naming the first bad field.
    fn from_body(body: serde_json::Value) -> Result<Self, Rejection> {
        let invalid = |message: String| ApiError::reject(StatusCode::UNPROCESSABLE_ENTITY, message);
        let serde_json::Value::Object(mut fields) = body else {
            return Err(invalid("request body: must be a JSON object".into()));
        };
        let name = match fields.remove("name") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(name))
                if !name.trim().is_empty() && name.chars().count() <= 200 =>
            {
                Some(name)
            }
            Some(_) => {
                return Err(invalid(
                    "name: must be a string of 1 to 200 characters".into(),
                ));
            }
        };
        let dataset_snapshot_id = match fields.remove("dataset_snapshot_id") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(id)) if !id.is_empty() && id.len() <= 100 => Some(id),
            Some(_) => {
                return Err(invalid(
                    "dataset_snapshot_id: must be a snapshot id (a string)".into(),
                ));
            }
        };
        let config = TrainConfig::from_json(&serde_json::Value::Object(fields)).map_err(invalid)?;
        Ok(Self {
            name,
            dataset_snapshot_id,
            config,
        })
    }
}

/// The body of `GET /api/trainable-models`.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TrainableModels {
    /// Every family training supports.
    pub trainable_models: Vec<TrainableModel>,
    /// Normal images a project needs before it can be trained.
    pub min_normal_images: usize,
}

/// A model family and the settings it takes.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TrainableModel {
    /// The family, as `model_name` in the training request.
    pub name: Architecture,
    /// What it is good at.
    pub description: String,
    /// Whether it is the one to use when unsure (the default `model_name`).
    pub recommended: bool,
    /// The JSON Schema of each setting it takes (type, default, limits, description), by the
    /// request field's name; `inspectflow train` takes the same settings as `--kebab-case` flags.
    pub parameters: serde_json::Map<String, serde_json::Value>,
}

impl TrainableModels {
    /// What this build trains.
    fn list() -> Self {
        Self {
            trainable_models: Architecture::trainable()
                .into_iter()
                .map(|family| TrainableModel {
                    name: family,
                    description: family.description().into(),
                    recommended: family == Architecture::default(),
                    parameters: TrainConfig::parameters(family),
                })
                .collect(),
            min_normal_images: MIN_NORMAL_IMAGES,
        }
    }
}

/// A job record.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Job {
    /// UUID.
    pub id: String,
    /// The project trained.
    pub project_id: String,
    /// Always `training` for now.
    #[serde(rename = "type")]
    pub job_type: String,
    /// Status.
    pub status: JobStatus,
    /// 0 to 100.
    pub progress: u8,
    /// Training stage: snapshot, features, fitting, calibration, export.
    pub stage: Option<String>,
    /// Why it failed, or what it produced.
    pub message: Option<String>,
    /// What was asked for.
    pub payload: TrainRequest,
    /// The model it registers (reserved at submission, registered on completion).
    pub model_id: String,
    /// Submission time.
    pub created_at: String,
    /// When it started running.
    pub start_time: Option<String>,
    /// When it ended.
    pub end_time: Option<String>,
}

/// A job as the API answers it: the record, plus the seed's names for three of its fields
/// (Geti Inspect's API says `start_time`, `end_time` and `message`; its database
/// `started_at`, `completed_at` and `error_message`), so clients written for either find them.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JobView {
    /// The record.
    #[serde(flatten)]
    pub job: Job,
    /// The same as `start_time`.
    pub started_at: Option<String>,
    /// The same as `end_time`.
    pub completed_at: Option<String>,
    /// `message` when the job failed; null otherwise.
    pub error_message: Option<String>,
}

impl From<Job> for JobView {
    fn from(job: Job) -> Self {
        Self {
            started_at: job.start_time.clone(),
            completed_at: job.end_time.clone(),
            error_message: (job.status == JobStatus::Failed)
                .then(|| job.message.clone())
                .flatten(),
            job,
        }
    }
}

listing!(
    /// The answer of `GET /api/jobs`.
    JobList,
    jobs,
    JobView
);

/// Normal images training needs: 2 to fit and 1 to calibrate.
const MIN_NORMAL_IMAGES: usize = 3;

/// The job routes.
pub fn routes(state: Arc<AppState>) -> BoxedFilter<(Response,)> {
    let with_state = warp::any().map(move || Arc::clone(&state));
    let train = warp::path!("api" / "projects" / String / "train")
        .and(warp::post())
        .and(super::http::json_body::<serde_json::Value>())
        .and(with_state.clone())
        .and_then(start_training);
    let trainable = warp::path!("api" / "trainable-models")
        .and(warp::get())
        .map(|| warp::reply::json(&TrainableModels::list()).into_response());
    let list = warp::path!("api" / "jobs")
        .and(warp::get())
        .and(super::http::query::<ProjectPage>())
        .and(with_state.clone())
        .and_then(list);
    let get = warp::path!("api" / "jobs" / String)
        .and(warp::get())
        .and(with_state.clone())
        .and_then(get);
    let cancel = warp::path("api")
        .and(warp::path("jobs"))
        .and(action("cancel"))
        .and(warp::path::end())
        .and(warp::post())
        .and(with_state.clone())
        .and_then(cancel);
    let progress = warp::path!("api" / "jobs" / String / "progress")
        .and(warp::get())
        .and(with_state.clone())
        .and_then(progress_events);
    let logs = warp::path!("api" / "jobs" / String / "logs")
        .and(warp::get())
        .and(with_state)
        .and_then(log_events);
    train
        .or(trainable)
        .unify()
        .or(list)
        .unify()
        .or(get)
        .unify()
        .or(cancel)
        .unify()
        .or(progress)
        .unify()
        .or(logs)
        .unify()
        .boxed()
}

/// The routes' documentation.
pub const DOCS: &[RouteDoc] = &[
    RouteDoc {
        method: "get",
        path: "/api/trainable-models",
        summary: "The model families training supports, with description, recommended flag and parameters.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<TrainableModels>)),
        errors: &[401],
    },
    RouteDoc {
        method: "post",
        path: "/api/projects/{project_id}/train",
        summary: "Queue a training job on the project's media (201 with the job; 422 with fewer than 3 normal images).",
        body: Content::Json(schema_of::<TrainRequest>),
        ok: (201, Content::Json(schema_of::<JobView>)),
        errors: &[401, 404, 413, 415, 422],
    },
    RouteDoc {
        method: "get",
        path: "/api/jobs",
        summary: "Jobs, oldest first (optional project_id filter), paginated.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<JobList>)),
        errors: &[401, 422],
    },
    RouteDoc {
        method: "get",
        path: "/api/jobs/{job_id}",
        summary: "A job: status, progress 0-100, stage, message, model_id.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<JobView>)),
        errors: &[401, 404],
    },
    RouteDoc {
        method: "post",
        path: "/api/jobs/{job_id}:cancel",
        summary: "Cancel a pending or running job; answers once it stopped (409 if it already ended).",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<JobView>)),
        errors: &[401, 404, 409],
    },
    RouteDoc {
        method: "get",
        path: "/api/jobs/{job_id}/progress",
        summary: "Server-sent `progress` events with the job on every change, until it ends.",
        body: Content::None,
        ok: (200, Content::EventStream(schema_of::<JobView>)),
        errors: &[401, 404],
    },
    RouteDoc {
        method: "get",
        path: "/api/jobs/{job_id}/logs",
        summary: "Server-sent `log` events: the job's log lines so far, then new ones, until it ends.",
        body: Content::None,
        ok: (200, Content::EventStream(schema_of::<String>)),
        errors: &[401, 404],
    },
];

async fn start_training(
    project_id: String,
    body: serde_json::Value,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    let payload = TrainRequest::from_body(body)?;
    super::system::require_device("device", &payload.config.device).await?;
    let key = project_id.clone();
    let snapshot_id = payload.dataset_snapshot_id.clone();
    let (project, normal, snapshot) = blocking(&state, move |store| {
        let project = store.get::<Project>(PROJECTS, &key)?;
        let snapshot = match &snapshot_id {
            Some(id) => Some(store.get::<Snapshot>(SNAPSHOTS, id)?),
            None => None,
        };
        let media: Vec<Media> = store.all(MEDIA)?;
        let normal = media
            .iter()
            .filter(|m| m.project_id == key && m.label == "normal")
            .count();
        Ok((project, normal, snapshot))
    })
    .await?;
    if project.is_none() {
        return Err(ApiError::not_found("project", &project_id));
    }
    let (normal, what) = match snapshot {
        None => (normal, "the project has"),
        Some(Some(snapshot)) if snapshot.project_id == project_id => {
            (snapshot.count - snapshot.anomalous, "the snapshot has")
        }
        Some(_) => {
            return Err(ApiError::reject(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "dataset_snapshot_id: project {project_id} has no snapshot {}",
                    payload.dataset_snapshot_id.unwrap_or_default()
                ),
            ));
        }
    };
    if normal < MIN_NORMAL_IMAGES {
        return Err(ApiError::reject(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{what} {normal} normal images; training needs at least {MIN_NORMAL_IMAGES}"),
        ));
    }
    let job = Job {
        id: uuid::Uuid::new_v4().to_string(),
        project_id,
        job_type: "training".into(),
        status: JobStatus::Pending,
        progress: 0,
        stage: None,
        message: None,
        payload,
        model_id: uuid::Uuid::new_v4().to_string(),
        created_at: now(),
        start_time: None,
        end_time: None,
    };
    super::http::put_in_project(&state, &job.project_id, JOBS, &job.id, job.clone()).await?;
    submit(&state, job.clone());
    Ok(
        warp::reply::with_status(warp::reply::json(&JobView::from(job)), StatusCode::CREATED)
            .into_response(),
    )
}

async fn list(query: ProjectPage, state: Arc<AppState>) -> Result<Response, Rejection> {
    let mut jobs: Vec<Job> = blocking(&state, |store| store.all(JOBS)).await?;
    jobs.retain(|job| {
        query
            .project_id
            .as_ref()
            .is_none_or(|id| &job.project_id == id)
    });
    jobs.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
    let (items, pagination) = paginate(jobs, &query.page())?;
    Ok(warp::reply::json(&JobList {
        jobs: items.into_iter().map(JobView::from).collect(),
        pagination,
    })
    .into_response())
}

/// The job as the worker sees it now (fresher than the store between saves), else as stored.
async fn current(state: &Arc<AppState>, id: &str) -> Result<Job, Rejection> {
    if let Some(live) = state.jobs.live(id) {
        return Ok(live.state.borrow().clone());
    }
    let key = id.to_string();
    blocking(state, move |store| store.get::<Job>(JOBS, &key))
        .await?
        .ok_or_else(|| ApiError::not_found("job", id))
}

async fn get(id: String, state: Arc<AppState>) -> Result<Response, Rejection> {
    Ok(warp::reply::json(&JobView::from(current(&state, &id).await?)).into_response())
}

/// Cancels a pending or running job and answers once it has stopped (at most 10 s).
async fn cancel(id: String, state: Arc<AppState>) -> Result<Response, Rejection> {
    let job = current(&state, &id).await?;
    let Some(live) = state.jobs.live(&id).filter(|_| !job.status.is_final()) else {
        return Err(ApiError::reject(
            StatusCode::CONFLICT,
            format!("job {id} has already ended ({:?})", job.status).to_lowercase(),
        ));
    };
    live.cancel.send_replace(true);
    let mut updates = live.state.subscribe();
    let ended = tokio::time::timeout(Duration::from_secs(10), until_final(&mut updates)).await;
    let job = match ended {
        Ok(Some(job)) => job,
        _ => current(&state, &id).await?,
    };
    Ok(warp::reply::json(&JobView::from(job)).into_response())
}

/// `GET /api/jobs/{id}/progress`: a `progress` event with the job on every change, ending
/// after the final status.
async fn progress_events(id: String, state: Arc<AppState>) -> Result<Response, Rejection> {
    let job = current(&state, &id).await?;
    let updates = state.jobs.live(&id).map(|live| live.state.subscribe());
    let events = futures::stream::unfold(
        (Some(job), updates, false),
        |(first, mut updates, done)| async move {
            if done {
                return None;
            }
            let job = match first {
                Some(job) => job,
                None => {
                    let receiver = updates.as_mut()?;
                    receiver.changed().await.ok()?;
                    receiver.borrow_and_update().clone()
                }
            };
            let last = job.status.is_final() || updates.is_none();
            let event = warp::sse::Event::default()
                .event("progress")
                .json_data(JobView::from(job))
                .map_err(|e| std::io::Error::other(e.to_string()));
            Some((event, (None, updates, last)))
        },
    );
    Ok(warp::sse::reply(warp::sse::keep_alive().stream(events)).into_response())
}

/// The next line already queued on `receiver` that the log file did not hold (numbered `seen`
/// or later).
fn queued_line(receiver: &mut broadcast::Receiver<(u64, String)>, seen: u64) -> Option<String> {
    loop {
        match receiver.try_recv() {
            Ok((number, _)) if number < seen => continue,
            Ok((_, line)) => return Some(line),
            Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
            Err(_) => return None,
        }
    }
}

/// `GET /api/jobs/{id}/logs`: the job's log lines so far, then new ones as they come, as `log`
/// events; the stream ends with the job.
async fn log_events(id: String, state: Arc<AppState>) -> Result<Response, Rejection> {
    current(&state, &id).await?;
    let live = state.jobs.live(&id);
    // Subscribe before reading the file, so no line falls between the two.
    let receiver = live.as_ref().map(|live| live.lines.subscribe());
    // Lines numbered below this count were in the file already: it is final once the file's
    // lines are sent, before the first new line is looked at.
    let in_file = Arc::new(AtomicU64::new(0));
    let path = log_path(&state.data_dir, &id);
    let past = log_file_lines(path, Arc::clone(&in_file), live.is_none())
        .map(Ok::<String, std::io::Error>);
    let ended = live.map(|live| live.state.subscribe());
    let future = futures::stream::unfold(
        (receiver, ended, in_file),
        |(receiver, ended, in_file)| async move {
            let mut receiver = receiver?;
            let seen = in_file.load(Ordering::Acquire);
            let Some(mut ended) = ended else {
                // The job has ended: drain what was sent before its final status.
                return queued_line(&mut receiver, seen)
                    .map(|line| (Ok(line), (Some(receiver), None, in_file)));
            };
            loop {
                let next = tokio::select! {
                    line = receiver.recv() => Some(line),
                    _ = until_final(&mut ended) => None,
                };
                match next {
                    Some(Ok((number, _))) if number < seen => continue,
                    Some(Ok((_, line))) => {
                        return Some((Ok(line), (Some(receiver), Some(ended), in_file)));
                    }
                    Some(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                    Some(Err(broadcast::error::RecvError::Closed)) => return None,
                    // The job ended: lines sent before its final status are still queued.
                    None => {
                        return queued_line(&mut receiver, seen)
                            .map(|line| (Ok(line), (Some(receiver), None, in_file)));
                    }
                }
            }
        },
    );
    let events = past
        .chain(future)
        .map(|line| line.map(|text| warp::sse::Event::default().event("log").data(text)));
    Ok(warp::sse::reply(warp::sse::keep_alive().stream(events)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_answers_with_the_seeds_field_names_too() {
        let payload: TrainRequest =
            serde_json::from_value(serde_json::json!({"model_name": "padim"})).expect("request");
        let job = Job {
            id: "j".into(),
            project_id: "p".into(),
            job_type: "training".into(),
            status: JobStatus::Failed,
            progress: 40,
            stage: Some("features".into()),
            message: Some("out of memory".into()),
            payload,
            model_id: "m".into(),
            created_at: "2026-12-02T00:00:00Z".into(),
            start_time: Some("2026-12-02T00:00:01Z".into()),
            end_time: Some("2026-12-02T00:00:09Z".into()),
        };
        let failed = serde_json::to_value(JobView::from(job.clone())).expect("json");
        assert_eq!(failed["started_at"], failed["start_time"]);
        assert_eq!(failed["completed_at"], failed["end_time"]);
        assert_eq!(failed["error_message"], "out of memory");
        assert_eq!(failed["message"], "out of memory");
        let completed = JobView::from(Job {
            status: JobStatus::Completed,
            message: Some("model m registered".into()),
            ..job
        });
        assert_eq!(completed.error_message, None, "only a failure has an error");
    }
}
