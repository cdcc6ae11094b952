//! Dataset snapshots as first-class records: a snapshot freezes a project's labelled images so
//! that a model stays reproducible after the media it was trained on are deleted.
//!
//! - The images (and masks) themselves are kept, content-addressed, under
//!   `blobs/<first two hex digits>/<sha256>`: shared between snapshots, so a second snapshot of
//!   an unchanged dataset adds no bytes. A blob is hard-linked from the media file where the file
//!   system allows (no copy at all), copied otherwise.
//! - Each snapshot's rows (image hash, file name, label, format, mask hash, media id, size) are a
//!   Parquet manifest, `snapshots/<id>.manifest.parquet`; the record in the store's `snapshots`
//!   table carries the counts. The manifest is written before the record is committed, so no
//!   record lacks its file; files of an uncommitted snapshot are swept at start-up ([`sweep`]).
//! - A snapshot is deleted only when no model names it; the blobs no remaining snapshot refers to
//!   go with it. Taking, importing and deleting hold one process-wide lock, so the blob garbage
//!   collection never sees a snapshot half made.
//! - Download and import use one self-contained Parquet file ([`super::snapshot_file`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use polars::prelude::*;
use serde::{Deserialize, Serialize};

use super::blobs::{add_file, blob_files, blob_path, sha256_hex};
use super::media::Media;
use super::store::{MEDIA, MODELS, PROJECTS, SNAPSHOTS, Store, StoreError};

/// How a snapshot came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotOrigin {
    /// `POST /api/projects/{id}/snapshots`.
    OnDemand,
    /// Taken by a training job that named none.
    Training,
    /// Imported from a downloaded snapshot file.
    Import,
    /// Converted from a path-only snapshot of schema version 1.
    Migrated,
}

/// One snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Snapshot {
    /// UUID (or, for a migrated snapshot, the id models already knew it by).
    pub id: String,
    /// The project it belongs to.
    pub project_id: String,
    /// The name of the file `GET /api/snapshots/{id}/download` answers.
    pub filename: String,
    /// Images in it.
    pub count: usize,
    /// Of which labelled anomalous.
    pub anomalous: usize,
    /// Images that have a defect mask.
    pub masks: usize,
    /// Bytes of its images and masks.
    pub size_bytes: u64,
    /// Bytes it added to the image store when taken (0 when every image was already held).
    pub added_bytes: u64,
    /// How it came to be.
    pub origin: SnapshotOrigin,
    /// Hash of its rows (image, label, mask): equal datasets have equal keys.
    pub content_key: String,
    /// When it was taken, RFC 3339 UTC.
    pub created_at: String,
}

/// One image of a snapshot: a row of its manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// SHA-256 of the image, hex: its blob.
    pub sha256: String,
    /// The name it was uploaded with.
    pub filename: String,
    /// `normal` or `anomalous`.
    pub label: String,
    /// `png` or `jpeg`.
    pub format: String,
    /// SHA-256 of its mask, when it has one.
    pub mask_sha256: Option<String>,
    /// The media item it was taken from (none once imported).
    pub media_id: Option<String>,
    /// Bytes of the image and its mask.
    pub size_bytes: u64,
}

impl Row {
    pub(super) fn is_anomalous(&self) -> bool {
        self.label == "anomalous"
    }
}

/// What can go wrong with snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file could not be read or written.
    #[error("{0}")]
    Io(String),
    /// The request (an imported file) is wrong; the message says where.
    #[error("{0}")]
    Invalid(String),
    /// No such snapshot or project.
    #[error("{what} {id} not found")]
    NotFound {
        /// `snapshot` or `project`.
        what: &'static str,
        /// The id asked for.
        id: String,
    },
    /// The snapshot is in use, or the dataset changed while it was taken.
    #[error("{0}")]
    Conflict(String),
}

/// Serialises taking, importing, deleting and collecting garbage.
static BLOBS: Mutex<()> = Mutex::new(());

pub(super) fn lock() -> std::sync::MutexGuard<'static, ()> {
    BLOBS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The manifest of snapshot `id`.
pub fn manifest_path(data_dir: &Path, id: &str) -> PathBuf {
    data_dir
        .join("snapshots")
        .join(format!("{id}.manifest.parquet"))
}

/// The key of a dataset: its rows' images, labels and masks, in a canonical order.
fn content_key(rows: &[Row]) -> String {
    let mut lines: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{} {} {}",
                r.sha256,
                r.label,
                r.mask_sha256.as_deref().unwrap_or("-")
            )
        })
        .collect();
    lines.sort();
    sha256_hex(lines.join("\n").as_bytes())
}

pub(super) fn polars_error(context: String) -> impl FnOnce(PolarsError) -> SnapshotError {
    move |e| SnapshotError::Io(format!("{context}: {e}"))
}

/// Writes `rows` as the manifest at `path` (through a temporary file).
pub fn write_manifest(path: &Path, rows: &[Row]) -> Result<(), SnapshotError> {
    let text = |f: &dyn Fn(&Row) -> String| rows.iter().map(f).collect::<Vec<String>>();
    let optional =
        |f: &dyn Fn(&Row) -> Option<String>| rows.iter().map(f).collect::<Vec<Option<String>>>();
    let mut frame = df!(
        "sha256" => text(&|r| r.sha256.clone()),
        "filename" => text(&|r| r.filename.clone()),
        "label" => text(&|r| r.label.clone()),
        "format" => text(&|r| r.format.clone()),
        "mask_sha256" => optional(&|r| r.mask_sha256.clone()),
        "media_id" => optional(&|r| r.media_id.clone()),
        "size_bytes" => rows.iter().map(|r| r.size_bytes).collect::<Vec<u64>>(),
    )
    .map_err(polars_error("building a snapshot manifest".into()))?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| SnapshotError::Io(format!("cannot create {}: {e}", parent.display())))?;
    }
    crate::train::dataset::write_parquet(path, &mut frame)
        .map_err(|e| SnapshotError::Io(e.to_string()))
}

/// Reads the manifest at `path`.
pub fn read_manifest(path: &Path) -> Result<Vec<Row>, SnapshotError> {
    let context = || format!("reading the snapshot manifest {}", path.display());
    let file =
        std::fs::File::open(path).map_err(|e| SnapshotError::Io(format!("{}: {e}", context())))?;
    let frame = ParquetReader::new(file)
        .finish()
        .map_err(polars_error(context()))?;
    let text = |name: &str| {
        crate::train::dataset::text_column(&frame, name)
            .map_err(polars_error(format!("{}: column {name}", context())))
    };
    let (hashes, names, labels, formats, masks, media) = (
        text("sha256")?,
        text("filename")?,
        text("label")?,
        text("format")?,
        text("mask_sha256")?,
        text("media_id")?,
    );
    let sizes: Vec<Option<u64>> = frame
        .column("size_bytes")
        .and_then(|c| c.u64().cloned())
        .map_err(polars_error(format!("{}: column size_bytes", context())))?
        .iter()
        .collect();
    (0..hashes.len())
        .map(|row| {
            let bad =
                |what: &str| SnapshotError::Io(format!("{}: row {row}: no {what}", context()));
            Ok(Row {
                sha256: hashes[row].clone().ok_or_else(|| bad("sha256"))?,
                filename: names[row].clone().unwrap_or_default(),
                label: labels[row].clone().ok_or_else(|| bad("label"))?,
                format: formats[row].clone().ok_or_else(|| bad("format"))?,
                mask_sha256: masks[row].clone(),
                media_id: media[row].clone(),
                size_bytes: sizes[row].unwrap_or(0),
            })
        })
        .collect()
}

/// Fails with [`SnapshotError::NotFound`] unless project `project_id` exists.
pub(super) fn require_project(store: &Store, project_id: &str) -> Result<(), SnapshotError> {
    match store.get::<serde_json::Value>(PROJECTS, project_id)? {
        Some(_) => Ok(()),
        None => Err(SnapshotError::NotFound {
            what: "project",
            id: project_id.to_string(),
        }),
    }
}

/// Freezes project `project_id`'s media into a snapshot. A training snapshot reuses the
/// project's newest snapshot of the same content instead of adding a record.
pub fn take(
    store: &Store,
    data_dir: &Path,
    project_id: &str,
    origin: SnapshotOrigin,
) -> Result<Snapshot, SnapshotError> {
    let _guard = lock();
    require_project(store, project_id)?;
    let mut media: Vec<Media> = store.all(MEDIA)?;
    media.retain(|m| m.project_id == project_id);
    media.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
    if media.is_empty() {
        return Err(SnapshotError::Invalid(format!(
            "project {project_id} has no media to snapshot"
        )));
    }
    let rows = match media_rows(data_dir, &media) {
        Ok(rows) => rows,
        Err(error) => {
            collect_garbage(store, data_dir);
            return Err(error);
        }
    };
    let (rows, added) = rows;
    if origin == SnapshotOrigin::Training {
        let key = content_key(&rows);
        let mut same: Vec<Snapshot> = store.all(SNAPSHOTS)?;
        same.retain(|s| s.project_id == project_id && s.content_key == key);
        if let Some(newest) = same
            .into_iter()
            .max_by(|a, b| a.created_at.cmp(&b.created_at))
        {
            return Ok(newest);
        }
    }
    commit(store, data_dir, project_id, rows, origin, added)
}

/// The rows of `media`, their images and masks put into the blob store; also the bytes the
/// store gained.
fn media_rows(data_dir: &Path, media: &[Media]) -> Result<(Vec<Row>, u64), SnapshotError> {
    let gone = |item: &Media, e: std::io::Error| {
        SnapshotError::Io(format!(
            "media {}: its files cannot be kept ({e}); `inspectflow check-db` tells what is wrong",
            item.id
        ))
    };
    let mut rows = Vec::with_capacity(media.len());
    let mut added = 0;
    for item in media {
        let (sha256, gained) =
            add_file(data_dir, &item.image_path(data_dir), item.sha256.as_deref())
                .map_err(|e| gone(item, e))?;
        added += gained;
        let mut size_bytes = item.size_bytes;
        let mask_sha256 = if item.has_mask {
            let mask = item.mask_path(data_dir);
            let (hash, gained) = add_file(data_dir, &mask, None).map_err(|e| gone(item, e))?;
            added += gained;
            size_bytes += std::fs::metadata(&mask).map_or(0, |m| m.len());
            Some(hash)
        } else {
            None
        };
        rows.push(Row {
            sha256,
            filename: item.filename.clone(),
            label: item.label.clone(),
            format: item.format.clone(),
            mask_sha256,
            media_id: Some(item.id.clone()),
            size_bytes,
        });
    }
    Ok((rows, added))
}

/// Writes the manifest of a new snapshot and commits its record (in one transaction with the
/// check that the project still exists); on failure removes what it wrote.
pub(super) fn commit(
    store: &Store,
    data_dir: &Path,
    project_id: &str,
    rows: Vec<Row>,
    origin: SnapshotOrigin,
    added_bytes: u64,
) -> Result<Snapshot, SnapshotError> {
    let record = new_record(project_id, &rows, origin, added_bytes, None);
    let manifest = manifest_path(data_dir, &record.id);
    if let Err(error) = write_manifest(&manifest, &rows) {
        collect_garbage(store, data_dir);
        return Err(error);
    }
    let committed = store.write(|tx| {
        if !tx.contains(PROJECTS, project_id)? {
            return Ok(false);
        }
        tx.put(SNAPSHOTS, &record.id, &record)?;
        Ok(true)
    });
    if !matches!(committed, Ok(true)) {
        let _ = std::fs::remove_file(&manifest);
        collect_garbage(store, data_dir);
    }
    match committed {
        Ok(true) => Ok(record),
        Ok(false) => Err(SnapshotError::NotFound {
            what: "project",
            id: project_id.to_string(),
        }),
        Err(error) => Err(error.into()),
    }
}

/// The record of a snapshot of `rows`, under `id` (the migration keeps the ids models know) or
/// a new UUID.
pub(super) fn new_record(
    project_id: &str,
    rows: &[Row],
    origin: SnapshotOrigin,
    added_bytes: u64,
    id: Option<String>,
) -> Snapshot {
    let id = id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    Snapshot {
        filename: format!("snapshot-{id}.parquet"),
        id,
        project_id: project_id.to_string(),
        count: rows.len(),
        anomalous: rows.iter().filter(|r| r.is_anomalous()).count(),
        masks: rows.iter().filter(|r| r.mask_sha256.is_some()).count(),
        size_bytes: rows.iter().map(|r| r.size_bytes).sum(),
        added_bytes,
        origin,
        content_key: content_key(rows),
        created_at: super::http::now(),
    }
}

/// Deletes snapshot `id` and the blobs no other snapshot refers to; refused while a model
/// names it.
pub fn delete(store: &Store, data_dir: &Path, id: &str) -> Result<(), SnapshotError> {
    let _guard = lock();
    store.write(|tx| {
        if !tx.contains(SNAPSHOTS, id)? {
            return Ok(Err(SnapshotError::NotFound {
                what: "snapshot",
                id: id.to_string(),
            }));
        }
        let models: Vec<super::models::Model> = tx.all(MODELS)?;
        if let Some(model) = models
            .iter()
            .find(|m| m.dataset_snapshot_id.as_deref() == Some(id))
        {
            return Ok(Err(SnapshotError::Conflict(format!(
                "model {} was trained on snapshot {id}; delete the model first",
                model.id
            ))));
        }
        let project_id = tx
            .get::<Snapshot>(SNAPSHOTS, id)?
            .map(|s| s.project_id)
            .unwrap_or_default();
        let jobs: Vec<super::jobs::Job> = tx.all(super::store::JOBS)?;
        // A job that names no snapshot yet may be about to take (or reuse) this one.
        if let Some(job) = jobs.iter().find(|j| {
            !j.status.is_final()
                && match j.payload.dataset_snapshot_id.as_deref() {
                    Some(named) => named == id,
                    None => j.project_id == project_id,
                }
        }) {
            return Ok(Err(SnapshotError::Conflict(format!(
                "job {} trains on snapshot {id}; wait for it or cancel it first",
                job.id
            ))));
        }
        tx.remove(SNAPSHOTS, id)?;
        Ok(Ok(()))
    })??;
    let _ = std::fs::remove_file(manifest_path(data_dir, id));
    collect_garbage(store, data_dir);
    Ok(())
}

/// Removes the manifests of snapshots `ids` (whose records are gone) and the blobs no remaining
/// snapshot refers to: the file side of a project's deletion.
pub fn forget(store: &Store, data_dir: &Path, ids: &[String]) {
    let _guard = lock();
    for id in ids {
        let _ = std::fs::remove_file(manifest_path(data_dir, id));
    }
    collect_garbage(store, data_dir);
}

/// Every blob the committed snapshots refer to; `None` when a manifest is unreadable (then
/// nothing may be collected).
fn referenced_blobs(store: &Store, data_dir: &Path) -> Option<HashSet<String>> {
    let snapshots: Vec<Snapshot> = store.all(SNAPSHOTS).ok()?;
    let mut referenced = HashSet::new();
    for snapshot in snapshots {
        let rows = read_manifest(&manifest_path(data_dir, &snapshot.id)).ok()?;
        for row in rows {
            referenced.extend(row.mask_sha256);
            referenced.insert(row.sha256);
        }
    }
    Some(referenced)
}

/// Removes the blobs no committed snapshot refers to (the caller holds the lock).
pub(super) fn collect_garbage(store: &Store, data_dir: &Path) {
    let Some(referenced) = referenced_blobs(store, data_dir) else {
        tracing::warn!("a snapshot manifest is unreadable: no image blob is collected");
        return;
    };
    for file in blob_files(data_dir) {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !referenced.contains(&name) {
            let _ = std::fs::remove_file(&file);
        }
    }
}

/// Removes what a snapshot interrupted before its commit left: manifests (and other files under
/// `snapshots/`) no record names, and unreferenced blobs. Runs when the server starts.
pub fn sweep(store: &Store, data_dir: &Path) {
    let _guard = lock();
    let Ok(snapshots) = store.all::<Snapshot>(SNAPSHOTS) else {
        return;
    };
    let expected: HashSet<PathBuf> = snapshots
        .iter()
        .map(|s| manifest_path(data_dir, &s.id))
        .collect();
    for entry in std::fs::read_dir(data_dir.join("snapshots"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = entry.path();
        if path.is_file() && !expected.contains(&path) {
            tracing::warn!("removing {} (no snapshot record names it)", path.display());
            let _ = std::fs::remove_file(&path);
        }
    }
    collect_garbage(store, data_dir);
}

/// The dataset folders of a training job.
pub struct DatasetFolders {
    /// Images in `normal/`.
    pub normal_count: usize,
    /// Images in `anomalous/`.
    pub anomalous_count: usize,
    /// Masks in `masks/` (anomalous images may lack one).
    pub mask_count: usize,
}

/// Links (hard links, copies across file systems) each image of `rows` into `normal/` or
/// `anomalous/` under `dataset` as `<sha256>.<format>`, and each mask into `masks/` under the
/// same stem, the layout `inspectflow train` reads.
pub fn link_dataset(
    data_dir: &Path,
    rows: &[Row],
    dataset: &Path,
) -> Result<DatasetFolders, String> {
    let _ = std::fs::remove_dir_all(dataset);
    let mut folders = DatasetFolders {
        normal_count: 0,
        anomalous_count: 0,
        mask_count: 0,
    };
    for folder in ["normal", "anomalous", "masks"] {
        std::fs::create_dir_all(dataset.join(folder))
            .map_err(|e| format!("cannot create {}: {e}", dataset.join(folder).display()))?;
    }
    let link = |from: &Path, to: &Path| -> Result<(), String> {
        if to.exists() {
            return Ok(()); // The same image twice in a dataset counts once.
        }
        std::fs::hard_link(from, to)
            .or_else(|_| std::fs::copy(from, to).map(|_| ()))
            .map_err(|e| format!("cannot link {} into the dataset: {e}", from.display()))
    };
    for row in rows {
        let extension = if row.format == "png" { "png" } else { "jpg" };
        let folder = if row.is_anomalous() {
            folders.anomalous_count += 1;
            "anomalous"
        } else {
            folders.normal_count += 1;
            "normal"
        };
        let name = format!("{}.{extension}", row.sha256);
        link(
            &blob_path(data_dir, &row.sha256),
            &dataset.join(folder).join(name),
        )?;
        if let (true, Some(mask)) = (row.is_anomalous(), &row.mask_sha256) {
            link(
                &blob_path(data_dir, mask),
                &dataset.join("masks").join(format!("{}.png", row.sha256)),
            )?;
            folders.mask_count += 1;
        }
    }
    Ok(folders)
}
