//! The dataset snapshot routes (the records and files are [`super::snapshot_store`]'s):
//!
//! - `POST /api/projects/{id}/snapshots` freezes the project's media now;
//! - `POST /api/projects/{id}/snapshots:import` takes a downloaded snapshot file back;
//! - `GET /api/snapshots` (`?project_id=` filters) lists them, `GET /api/snapshots/{id}` gives
//!   one, `GET /api/snapshots/{id}/download` answers it as one Parquet file with the images;
//! - `DELETE /api/snapshots/{id}` removes one no model was trained on.

use std::sync::Arc;

use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::download::streamed_file_reply;
use super::http::{ApiError, ProjectPage, listing, paginate};
use super::openapi::{Content, RouteDoc, schema_of};
use super::snapshot_file::{self, MAX_IMPORT_BYTES};
use super::snapshot_store::{self, Snapshot, SnapshotError, SnapshotOrigin};
use super::state::AppState;
use super::store::SNAPSHOTS;

listing!(
    /// The answer of `GET /api/snapshots`.
    SnapshotList,
    snapshots,
    Snapshot
);

/// The snapshot routes.
pub fn routes(state: Arc<AppState>) -> BoxedFilter<(Response,)> {
    let with_state = warp::any().map(move || Arc::clone(&state));
    let create = warp::path!("api" / "projects" / String / "snapshots")
        .and(warp::post())
        .and(with_state.clone())
        .and_then(create);
    let import = warp::path!("api" / "projects" / String / "snapshots:import")
        .and(warp::post())
        .and(super::http::body_limit(MAX_IMPORT_BYTES, "a snapshot file"))
        // One import at a time, its body read only once it has its turn: each may hold a
        // file of up to MAX_IMPORT_BYTES and its decoded images.
        .and(warp::any().then(|| IMPORTS.acquire()))
        .and(super::http::body_within(IMPORT_IDLE, IMPORT_TOTAL))
        .and(with_state.clone())
        .and_then(import);
    let list = warp::path!("api" / "snapshots")
        .and(warp::get())
        .and(super::http::query::<ProjectPage>())
        .and(with_state.clone())
        .and_then(list);
    let get = warp::path!("api" / "snapshots" / String)
        .and(warp::get())
        .and(with_state.clone())
        .and_then(get);
    let download = warp::path!("api" / "snapshots" / String / "download")
        .and(warp::get())
        .and(with_state.clone())
        .and_then(download);
    let delete = warp::path!("api" / "snapshots" / String)
        .and(warp::delete())
        .and(with_state)
        .and_then(delete);
    create
        .or(import)
        .unify()
        .or(list)
        .unify()
        .or(get)
        .unify()
        .or(download)
        .unify()
        .or(delete)
        .unify()
        .boxed()
}

/// The routes' documentation.
pub const DOCS: &[RouteDoc] = &[
    RouteDoc {
        method: "post",
        path: "/api/projects/{project_id}/snapshots",
        summary: "Freeze the project's media (images, labels, masks) into a snapshot; images already held by another snapshot add no bytes.",
        body: Content::None,
        ok: (201, Content::Json(schema_of::<Snapshot>)),
        errors: &[401, 404, 409, 422],
    },
    RouteDoc {
        method: "post",
        path: "/api/projects/{project_id}/snapshots:import",
        summary: "Import a snapshot file (as downloaded; or Geti Inspect's image, is_anomalous, filename columns), at most 512 MiB and 100000 images.",
        body: Content::Binary(&["application/vnd.apache.parquet"]),
        ok: (201, Content::Json(schema_of::<Snapshot>)),
        errors: &[401, 404, 408, 413, 422],
    },
    RouteDoc {
        method: "get",
        path: "/api/snapshots",
        summary: "Dataset snapshots, oldest first, paginated; `project_id` filters.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<SnapshotList>)),
        errors: &[401, 422],
    },
    RouteDoc {
        method: "get",
        path: "/api/snapshots/{snapshot_id}",
        summary: "A snapshot: its project, image, anomalous and mask counts, size, origin, time.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<Snapshot>)),
        errors: &[401, 404],
    },
    RouteDoc {
        method: "get",
        path: "/api/snapshots/{snapshot_id}/download",
        summary: "The snapshot as one Parquet file: image and mask bytes, is_anomalous, label, filename and sha256 per image.",
        body: Content::None,
        ok: (200, Content::Binary(&["application/vnd.apache.parquet"])),
        errors: &[401, 404],
    },
    RouteDoc {
        method: "delete",
        path: "/api/snapshots/{snapshot_id}",
        summary: "Delete a snapshot (and the images no other snapshot holds); 409 while a model or a running job uses it.",
        body: Content::None,
        ok: (204, Content::None),
        errors: &[401, 404, 409],
    },
];

fn rejection(error: SnapshotError) -> Rejection {
    match error {
        SnapshotError::Store(error) => warp::reject::custom(ApiError::from(error)),
        SnapshotError::Io(message) => {
            tracing::error!("snapshot: {message}");
            ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, message)
        }
        SnapshotError::Invalid(message) => {
            ApiError::reject(StatusCode::UNPROCESSABLE_ENTITY, message)
        }
        SnapshotError::NotFound { what, id } => ApiError::not_found(what, &id),
        SnapshotError::Conflict(message) => ApiError::reject(StatusCode::CONFLICT, message),
    }
}

/// Runs a snapshot call on the blocking pool.
async fn run<T: Send + 'static>(
    state: &Arc<AppState>,
    call: impl FnOnce(&AppState) -> Result<T, SnapshotError> + Send + 'static,
) -> Result<T, Rejection> {
    let state = Arc::clone(state);
    tokio::task::spawn_blocking(move || call(&state))
        .await
        .map_err(|e| ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(rejection)
}

fn created(snapshot: &Snapshot) -> Response {
    warp::reply::with_status(warp::reply::json(snapshot), StatusCode::CREATED).into_response()
}

async fn create(project_id: String, state: Arc<AppState>) -> Result<Response, Rejection> {
    let snapshot = run(&state, move |state| {
        snapshot_store::take(
            &state.store,
            &state.data_dir,
            &project_id,
            SnapshotOrigin::OnDemand,
        )
    })
    .await?;
    Ok(created(&snapshot))
}

/// How long an import's body may pause, and how long it may take in all (512 MiB at about
/// 1 MB/s): a client sending slowly cannot keep the import's turn for ever.
const IMPORT_IDLE: std::time::Duration = std::time::Duration::from_secs(30);
const IMPORT_TOTAL: std::time::Duration = std::time::Duration::from_secs(600);

/// Imports running at once (see `routes`).
static IMPORTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

async fn import(
    project_id: String,
    turn: Result<tokio::sync::SemaphorePermit<'static>, tokio::sync::AcquireError>,
    body: bytes::Bytes,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    let _turn =
        turn.map_err(|e| ApiError::reject(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let snapshot = run(&state, move |state| {
        snapshot_file::import(&state.store, &state.data_dir, &project_id, &body)
    })
    .await?;
    Ok(created(&snapshot))
}

async fn list(query: ProjectPage, state: Arc<AppState>) -> Result<Response, Rejection> {
    let mut snapshots: Vec<Snapshot> = run(&state, |state| Ok(state.store.all(SNAPSHOTS)?)).await?;
    snapshots.retain(|s| {
        query
            .project_id
            .as_ref()
            .is_none_or(|id| &s.project_id == id)
    });
    snapshots.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
    let (items, pagination) = paginate(snapshots, &query.page())?;
    Ok(warp::reply::json(&SnapshotList {
        snapshots: items,
        pagination,
    })
    .into_response())
}

async fn find(state: &Arc<AppState>, id: String) -> Result<Snapshot, Rejection> {
    let key = id.clone();
    run(state, move |state| Ok(state.store.get(SNAPSHOTS, &key)?))
        .await?
        .ok_or_else(|| ApiError::not_found("snapshot", &id))
}

async fn get(id: String, state: Arc<AppState>) -> Result<Response, Rejection> {
    let snapshot = find(&state, id).await?;
    Ok(warp::reply::json(&snapshot).into_response())
}

async fn download(id: String, state: Arc<AppState>) -> Result<Response, Rejection> {
    let snapshot = find(&state, id).await?;
    let filename = snapshot.filename.clone();
    let export = run(&state, move |state| {
        snapshot_file::prepare_export(&state.data_dir, &snapshot)
    })
    .await?;
    streamed_file_reply(
        "application/vnd.apache.parquet",
        Some(&filename),
        move |body| export.write_to(body).map_err(|e| e.to_string()),
    )
    .await
}

async fn delete(id: String, state: Arc<AppState>) -> Result<Response, Rejection> {
    run(&state, move |state| {
        snapshot_store::delete(&state.store, &state.data_dir, &id)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
