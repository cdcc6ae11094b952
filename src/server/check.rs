//! `inspectflow check-db`: the store's consistency with the files beside it. It reports the
//! schema version, records that do not parse, media, models, jobs and pipelines whose project
//! is gone, media and models whose files are missing (dangling records), files and model
//! folders no record points to (orphans), snapshots against their manifests and image blobs,
//! half-written `.partial` files and packages, and jobs still marked running. The server must not be running (redb locks the store).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::blobs;
use super::media::Media;
use super::models::Model;
use super::snapshot_store::{self, Snapshot};
use super::store::{JOBS, MEDIA, MODELS, PIPELINES, PROJECTS, SNAPSHOTS, Store};

/// What `check-db` found.
pub struct Report {
    /// The store's schema version.
    pub schema_version: u64,
    /// Records checked.
    pub records: usize,
    /// One line per inconsistency.
    pub problems: Vec<String>,
}

/// Checks the store and files in `data_dir`.
pub fn check(data_dir: &Path) -> Result<Report, String> {
    if !data_dir.join("inspectflow.redb").is_file() {
        return Err(format!("{} holds no inspectflow store", data_dir.display()));
    }
    let store = Store::open(data_dir).map_err(|e| e.to_string())?;
    let mut problems = Vec::new();
    let projects: HashSet<String> = match store.all::<super::projects::Project>(PROJECTS) {
        Ok(projects) => projects.into_iter().map(|p| p.id).collect(),
        Err(error) => {
            problems.push(error.to_string());
            HashSet::new()
        }
    };
    let media: Vec<Media> = store.all(MEDIA).unwrap_or_else(|error| {
        problems.push(error.to_string());
        Vec::new()
    });
    for item in &media {
        if !projects.contains(&item.project_id) {
            problems.push(format!(
                "dangling record: media {} belongs to project {}, which does not exist",
                item.id, item.project_id
            ));
        }
        for file in files_of(item, data_dir) {
            if !file.is_file() {
                problems.push(format!(
                    "dangling record: media {} lacks its file {}",
                    item.id,
                    file.display()
                ));
            }
        }
    }
    let expected = expected_files(&media, data_dir);
    for file in files_under(&data_dir.join("projects")) {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".partial") {
            problems.push(format!("half-written file: {}", file.display()));
        } else if !expected.contains(&file) {
            problems.push(format!("orphan file (no record): {}", file.display()));
        }
    }
    let mut records = projects.len() + media.len();
    records += check_models_and_jobs(&store, data_dir, &projects, &mut problems);
    records += check_snapshots(&store, data_dir, &projects, &mut problems);
    Ok(Report {
        schema_version: store.schema_version().map_err(|e| e.to_string())?,
        records,
        problems,
    })
}

/// Models (records against `models/` folders), jobs and pipelines; returns how many records it
/// checked.
fn check_models_and_jobs(
    store: &Store,
    data_dir: &Path,
    projects: &HashSet<String>,
    problems: &mut Vec<String>,
) -> usize {
    let mut load = |table| -> Vec<serde_json::Value> {
        store.all(table).unwrap_or_else(|error| {
            problems.push(error.to_string());
            Vec::new()
        })
    };
    let models = load(MODELS);
    let jobs = load(JOBS);
    let pipelines = load(PIPELINES);
    let text = |record: &serde_json::Value, field: &str| {
        record[field].as_str().unwrap_or_default().to_string()
    };
    let mut model_ids = HashSet::new();
    for (kind, records) in [("model", &models), ("job", &jobs), ("pipeline", &pipelines)] {
        for record in records {
            let project = text(record, "project_id");
            if !projects.contains(&project) {
                problems.push(format!(
                    "dangling record: {kind} {} belongs to project {project}, which does not exist",
                    text(record, "id")
                ));
            }
        }
    }
    for model in &models {
        let id = text(model, "id");
        if !Model::dir(data_dir, &id).join("manifest.json").is_file() {
            problems.push(format!(
                "dangling record: model {id} lacks its package {}",
                Model::dir(data_dir, &id).display()
            ));
        }
        model_ids.insert(id);
    }
    for job in &jobs {
        if matches!(text(job, "status").as_str(), "running" | "pending") {
            problems.push(format!(
                "job {} is still marked {} (the server marks it at its next start)",
                text(job, "id"),
                text(job, "status")
            ));
        }
    }
    if let Ok(entries) = std::fs::read_dir(data_dir.join("models")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                problems.push(format!("half-written package: {}", entry.path().display()));
            } else if !model_ids.contains(&name) {
                problems.push(format!(
                    "orphan package (no record): {}",
                    entry.path().display()
                ));
            }
        }
    }
    models.len() + jobs.len() + pipelines.len()
}

/// Snapshots: records against their manifests, manifests against the blobs they name, and
/// blobs or manifests nothing refers to; returns how many records it checked.
fn check_snapshots(
    store: &Store,
    data_dir: &Path,
    projects: &HashSet<String>,
    problems: &mut Vec<String>,
) -> usize {
    let snapshots: Vec<Snapshot> = store.all(SNAPSHOTS).unwrap_or_else(|error| {
        problems.push(error.to_string());
        Vec::new()
    });
    let mut referenced = HashSet::new();
    let mut manifests = HashSet::new();
    for snapshot in &snapshots {
        if !projects.contains(&snapshot.project_id) {
            problems.push(format!(
                "dangling record: snapshot {} belongs to project {}, which does not exist",
                snapshot.id, snapshot.project_id
            ));
        }
        let manifest = snapshot_store::manifest_path(data_dir, &snapshot.id);
        let rows = match snapshot_store::read_manifest(&manifest) {
            Ok(rows) => rows,
            Err(error) => {
                problems.push(format!(
                    "dangling record: snapshot {} lacks a readable manifest: {error}",
                    snapshot.id
                ));
                continue;
            }
        };
        manifests.insert(manifest);
        for hash in rows
            .iter()
            .flat_map(|r| std::iter::once(&r.sha256).chain(&r.mask_sha256))
        {
            if referenced.insert(hash.clone()) && !blobs::blob_path(data_dir, hash).is_file() {
                problems.push(format!(
                    "dangling record: snapshot {} lacks its image {}",
                    snapshot.id,
                    blobs::blob_path(data_dir, hash).display()
                ));
            }
        }
    }
    for file in files_under(&data_dir.join("snapshots")) {
        if !manifests.contains(&file) {
            problems.push(format!("orphan file (no snapshot): {}", file.display()));
        }
    }
    for file in blobs::blob_files(data_dir) {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !referenced.contains(&name) {
            problems.push(format!("orphan image (no snapshot): {}", file.display()));
        }
    }
    snapshots.len()
}

/// The files a media record points to.
fn files_of(item: &Media, data_dir: &Path) -> Vec<PathBuf> {
    let mut files = vec![item.image_path(data_dir), item.thumbnail_path(data_dir)];
    if item.has_mask {
        files.push(item.mask_path(data_dir));
    }
    files
}

/// Removes media files no record points to: what an upload killed between placing its files and
/// committing its record left (the record never existed, so nothing can reach them). Runs when
/// the server starts, before any request is answered; `.partial` files are the sweep's.
pub(crate) fn remove_uncommitted_uploads(store: &Store, data_dir: &Path) {
    let Ok(media) = store.all::<Media>(MEDIA) else {
        // Unreadable records: keep every file; check-db reports the problem.
        return;
    };
    let expected = expected_files(&media, data_dir);
    for file in files_under(&data_dir.join("projects")) {
        let partial = file.extension().is_some_and(|e| e == "partial");
        if !partial && !expected.contains(&file) {
            tracing::warn!(
                "removing {} (its upload was never committed)",
                file.display()
            );
            let _ = std::fs::remove_file(file);
        }
    }
}

/// Every file the media records point to.
fn expected_files(media: &[Media], data_dir: &Path) -> HashSet<PathBuf> {
    media
        .iter()
        .flat_map(|item| files_of(item, data_dir))
        .collect()
}

/// Every file under `dir` (none when it does not exist).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files.sort();
    files
}
