//! Dataset snapshots: the Parquet tables training freezes its dataset into (one row per image:
//! path, filename, label, mask, split, sha256), kept under `snapshots/` in the data directory
//! and reused while the dataset does not change. Models name theirs (`dataset_snapshot_id`).
//!
//! `GET /api/snapshots` lists them, `GET /api/snapshots/{id}` gives one's counts, and
//! `GET /api/snapshots/{id}/download` answers the Parquet file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::openapi::{Content, RouteDoc, schema_of};
use serde::{Deserialize, Serialize};
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::http::{ApiError, Page, listing, ok, paginate};
use super::state::AppState;

/// One snapshot.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SnapshotInfo {
    /// Content key of the dataset listing.
    pub id: String,
    /// Images in it.
    pub count: usize,
    /// Of which labelled anomalous.
    pub anomalous: usize,
    /// Size of the Parquet file.
    pub size_bytes: u64,
    /// When it was written, RFC 3339 UTC.
    pub created_at: String,
}

fn folder(data_dir: &Path) -> PathBuf {
    data_dir.join("snapshots")
}

/// The file of snapshot `id`, when `id` is a plain name and the file exists.
fn file_of(data_dir: &Path, id: &str) -> Option<PathBuf> {
    let plain = !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    let file = folder(data_dir).join(format!("{id}.parquet"));
    (plain && file.is_file()).then_some(file)
}

fn describe(file: &Path) -> Result<SnapshotInfo, String> {
    let entries = crate::train::dataset::read_snapshot(file).map_err(|e| e.to_string())?;
    let metadata =
        std::fs::metadata(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let written_ms = metadata
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64);
    Ok(SnapshotInfo {
        id: file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        count: entries.len(),
        anomalous: entries
            .iter()
            .filter(|e| e.label == crate::train::dataset::Label::Anomalous)
            .count(),
        size_bytes: metadata.len(),
        created_at: inspectflow_operators::sink::message::rfc3339_utc(written_ms),
    })
}

listing!(
    /// The answer of `GET /api/snapshots`.
    SnapshotList,
    snapshots,
    SnapshotInfo
);

/// The snapshot routes.
pub fn routes(state: Arc<AppState>) -> BoxedFilter<(Response,)> {
    let with_state = warp::any().map(move || Arc::clone(&state));
    let list = warp::path!("api" / "snapshots")
        .and(warp::get())
        .and(warp::query::<Page>())
        .and(with_state.clone())
        .and_then(list);
    let get = warp::path!("api" / "snapshots" / String)
        .and(warp::get())
        .and(with_state.clone())
        .and_then(get);
    let download = warp::path!("api" / "snapshots" / String / "download")
        .and(warp::get())
        .and(with_state)
        .and_then(download);
    list.or(get).unify().or(download).unify().boxed()
}

/// The routes' documentation.
pub const DOCS: &[RouteDoc] = &[
    RouteDoc {
        method: "get",
        path: "/api/snapshots",
        summary: "Dataset snapshots (Parquet tables training froze its datasets into), paginated.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<SnapshotList>)),
        errors: &[401, 422],
    },
    RouteDoc {
        method: "get",
        path: "/api/snapshots/{snapshot_id}",
        summary: "A snapshot: image count, anomalous count, size, time.",
        body: Content::None,
        ok: (200, Content::Json(schema_of::<SnapshotInfo>)),
        errors: &[401, 404],
    },
    RouteDoc {
        method: "get",
        path: "/api/snapshots/{snapshot_id}/download",
        summary: "The snapshot's Parquet file (path, filename, label, mask, split, sha256 per image).",
        body: Content::None,
        ok: (200, Content::Binary(&["application/vnd.apache.parquet"])),
        errors: &[401, 404],
    },
];

async fn list(page: Page, state: Arc<AppState>) -> Result<Response, Rejection> {
    let dir = folder(&state.data_dir);
    let snapshots = tokio::task::spawn_blocking(move || {
        let files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
                    .collect()
            })
            .unwrap_or_default();
        let mut snapshots: Vec<SnapshotInfo> = files
            .iter()
            .filter_map(|file| describe(file).ok())
            .collect();
        snapshots.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
        snapshots
    })
    .await
    .map_err(|e| ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let (items, pagination) = paginate(snapshots, &page)?;
    Ok(ok(&SnapshotList {
        snapshots: items,
        pagination,
    }))
}

async fn get(id: String, state: Arc<AppState>) -> Result<Response, Rejection> {
    let file = file_of(&state.data_dir, &id).ok_or_else(|| ApiError::not_found("snapshot", &id))?;
    let info = tokio::task::spawn_blocking(move || describe(&file))
        .await
        .map_err(|e| ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(warp::reply::json(&info).into_response())
}

async fn download(id: String, state: Arc<AppState>) -> Result<Response, Rejection> {
    let file = file_of(&state.data_dir, &id).ok_or_else(|| ApiError::not_found("snapshot", &id))?;
    let bytes = tokio::fs::read(&file)
        .await
        .map_err(|e| ApiError::reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let mut response = Response::new(bytes.into());
    response.headers_mut().insert(
        warp::http::header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("application/vnd.apache.parquet"),
    );
    if let Ok(value) =
        warp::http::HeaderValue::from_str(&format!("attachment; filename=\"{id}.parquet\""))
    {
        response
            .headers_mut()
            .insert(warp::http::header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}
