//! Projects: the unit that owns media, models, pipelines and jobs. List (paged), create, get,
//! rename, and delete with everything the project owns.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::http::{ApiError, Page, blocking, json_body, json_reply, listing, now, ok, paginate};
use super::jobs::Job;
use super::openapi::{Content, RouteDoc, schema_of};
use super::snapshot_store::Snapshot;
use super::state::AppState;
use super::store::{JOBS, MEDIA, MODELS, PIPELINES, PROJECTS, SNAPSHOTS};

/// A project: the unit that owns media, models, pipelines and jobs.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Project {
    /// UUID.
    pub id: String,
    /// Display name.
    pub name: String,
    /// What the project inspects (free text, may be empty).
    #[serde(default)]
    pub description: String,
    /// Creation time, RFC 3339 UTC.
    pub created_at: String,
    /// Last change, RFC 3339 UTC.
    pub updated_at: String,
}

/// Longest project description, in bytes.
const MAX_DESCRIPTION_BYTES: usize = 4000;

/// Body of `POST /api/projects`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProjectBody {
    /// 1 to 200 characters.
    name: String,
    /// What the project inspects (at most 4000 bytes).
    #[serde(default)]
    description: Option<String>,
}

/// Body of `PATCH /api/projects/{id}`: what changes.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProjectChange {
    /// A new name (1 to 200 characters).
    #[serde(default)]
    name: Option<String>,
    /// A new description (at most 4000 bytes; empty clears it).
    #[serde(default)]
    description: Option<String>,
}

fn checked_name(name: &str) -> Result<String, Rejection> {
    let name = name.trim().to_string();
    if name.is_empty() || name.len() > 200 {
        return Err(ApiError::reject(
            StatusCode::UNPROCESSABLE_ENTITY,
            "name: must be 1 to 200 characters",
        ));
    }
    Ok(name)
}

fn checked_description(description: &str) -> Result<String, Rejection> {
    let description = description.trim().to_string();
    if description.len() > MAX_DESCRIPTION_BYTES {
        return Err(ApiError::reject(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("description: at most {MAX_DESCRIPTION_BYTES} bytes"),
        ));
    }
    Ok(description)
}

listing!(
    /// The answer of `GET /api/projects`.
    ProjectList,
    projects,
    Project
);

/// The project routes.
pub fn routes(state: Arc<AppState>) -> BoxedFilter<(Response,)> {
    let with_state = warp::any().map(move || Arc::clone(&state));
    let list = warp::path!("api" / "projects")
        .and(warp::get())
        .and(super::http::query::<Page>())
        .and(with_state.clone())
        .and_then(list_projects);
    let create = warp::path!("api" / "projects")
        .and(warp::post())
        .and(json_body::<ProjectBody>())
        .and(with_state.clone())
        .and_then(create_project);
    let get = warp::path!("api" / "projects" / String)
        .and(warp::get())
        .and(with_state.clone())
        .and_then(get_project);
    let rename = warp::path!("api" / "projects" / String)
        .and(warp::patch())
        .and(json_body::<ProjectChange>())
        .and(with_state.clone())
        .and_then(rename_project);
    let delete = warp::path!("api" / "projects" / String)
        .and(warp::delete())
        .and(with_state)
        .and_then(delete_project);
    list.or(create)
        .unify()
        .or(get)
        .unify()
        .or(rename)
        .unify()
        .or(delete)
        .unify()
        .boxed()
}

/// The project routes' documentation.
pub const DOCS: &[RouteDoc] = &[
    RouteDoc {
        method: "get",
        path: "/api/projects",
        summary: "Projects in creation order, paginated with limit (1-1000, default 20) and offset.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<ProjectList>)),
        errors: &[401, 422],
    },
    RouteDoc {
        method: "post",
        path: "/api/projects",
        summary: "Create a project: {\"name\": ... (1-200 characters), \"description\"?: ...}.",
        body: Content::Json(schema_of::<ProjectBody>),
        ok: (201, Content::Json(schema_of::<Project>)),
        errors: &[401, 413, 415, 422],
    },
    RouteDoc {
        method: "get",
        path: "/api/projects/{project_id}",
        summary: "One project.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<Project>)),
        errors: &[401, 404],
    },
    RouteDoc {
        method: "patch",
        path: "/api/projects/{project_id}",
        summary: "Rename a project or change its description: {\"name\"?: ..., \"description\"?: ...}.",
        body: Content::Json(schema_of::<ProjectChange>),
        ok: (200, Content::Json(schema_of::<Project>)),
        errors: &[401, 404, 413, 415, 422],
    },
    RouteDoc {
        method: "delete",
        path: "/api/projects/{project_id}",
        summary: "Delete a project.",
        body: Content::None,
        ok: (204, Content::None),
        errors: &[401, 404, 409],
    },
];

async fn list_projects(page: Page, state: Arc<AppState>) -> Result<Response, Rejection> {
    let mut projects: Vec<Project> = blocking(&state, |store| store.all(PROJECTS)).await?;
    projects.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
    let (items, pagination) = paginate(projects, &page)?;
    Ok(ok(&ProjectList {
        projects: items,
        pagination,
    }))
}

async fn create_project(body: ProjectBody, state: Arc<AppState>) -> Result<Response, Rejection> {
    let now = now();
    let project = Project {
        id: uuid::Uuid::new_v4().to_string(),
        name: checked_name(&body.name)?,
        description: checked_description(body.description.as_deref().unwrap_or_default())?,
        created_at: now.clone(),
        updated_at: now,
    };
    let stored = project.clone();
    blocking(&state, move |store| {
        store.put(PROJECTS, &stored.id, &stored)
    })
    .await?;
    Ok(json_reply(StatusCode::CREATED, &project))
}

async fn get_project(id: String, state: Arc<AppState>) -> Result<Response, Rejection> {
    let key = id.clone();
    match blocking(&state, move |store| store.get::<Project>(PROJECTS, &key)).await? {
        Some(project) => Ok(ok(&project)),
        None => Err(ApiError::not_found("project", &id)),
    }
}

async fn rename_project(
    id: String,
    body: ProjectChange,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    if body.name.is_none() && body.description.is_none() {
        return Err(ApiError::reject(
            StatusCode::UNPROCESSABLE_ENTITY,
            "request body: give name, description or both",
        ));
    }
    let name = body.name.as_deref().map(checked_name).transpose()?;
    let description = body
        .description
        .as_deref()
        .map(checked_description)
        .transpose()?;
    let key = id.clone();
    let Some(mut project) =
        blocking(&state, move |store| store.get::<Project>(PROJECTS, &key)).await?
    else {
        return Err(ApiError::not_found("project", &id));
    };
    if let Some(name) = name {
        project.name = name;
    }
    if let Some(description) = description {
        project.description = description;
    }
    project.updated_at = now();
    let stored = project.clone();
    blocking(&state, move |store| {
        store.put(PROJECTS, &stored.id, &stored)
    })
    .await?;
    Ok(ok(&project))
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
            snapshots: Vec<String>,
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
            let snapshots: Vec<Snapshot> = tx.all(SNAPSHOTS)?;
            let snapshots: Vec<String> = snapshots
                .into_iter()
                .filter(|s| s.project_id == key)
                .map(|s| s.id)
                .collect();
            for snapshot in &snapshots {
                tx.remove(SNAPSHOTS, snapshot)?;
            }
            tx.remove(PROJECTS, &key)?;
            Ok(Outcome::Deleted {
                models,
                jobs,
                snapshots,
            })
        })
    })
    .await?;
    match outcome {
        Outcome::Missing => Err(ApiError::not_found("project", &id)),
        Outcome::Busy(job) => Err(ApiError::reject(
            StatusCode::CONFLICT,
            format!("project {id} has job {job} in progress; cancel it first"),
        )),
        Outcome::Deleted {
            models,
            jobs,
            snapshots,
        } => {
            let data_dir = state.data_dir.clone();
            let shared = Arc::clone(&state);
            let _ = tokio::task::spawn_blocking(move || {
                super::snapshot_store::forget(&shared.store, &data_dir, &snapshots);
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
