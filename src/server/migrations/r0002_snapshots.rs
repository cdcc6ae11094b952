//! Schema version 2: snapshots become records that hold their images.
//!
//! - Media records gain `sha256`, the hash of their image file (left out when the file is gone).
//! - Version 1 kept a snapshot only as a Parquet file of image paths (`snapshots/<id>.parquet`,
//!   paths into a training job's folder, long removed). Each one a model names becomes a
//!   `snapshots` record under the same id: its rows are found again by content hash among the
//!   project's media (or at their path, when it still exists), their images go into the blob
//!   store, and rows whose image is nowhere to be found are left out (and logged). The version 1
//!   files are left in place; the server's start-up sweep removes them once the migration has
//!   committed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::Revision;
use crate::server::blobs;
use crate::server::snapshot_store::{self, Row, SnapshotOrigin};
use crate::server::store::{MEDIA, MODELS, SNAPSHOTS, Transaction};

/// The revision.
pub const REVISION: Revision = Revision {
    version: 2,
    name: "snapshots",
    upgrade,
};

/// A version 1 media item's files, by the layout of that version.
struct MediaFiles {
    image: PathBuf,
    mask: Option<PathBuf>,
}

fn text<'a>(record: &'a Value, field: &str, table: &str) -> Result<&'a str, String> {
    record.get(field).and_then(Value::as_str).ok_or_else(|| {
        let id = record.get("id").and_then(Value::as_str).unwrap_or("?");
        format!("record {id} in {table}: no text field {field}")
    })
}

fn upgrade(tx: &Transaction, data_dir: &Path) -> Result<(), String> {
    let media: Vec<Value> = tx.all(MEDIA).map_err(|e| e.to_string())?;
    // By project and content; an image uploaded twice keeps the copy that has a mask.
    let mut by_hash: HashMap<(String, String), MediaFiles> = HashMap::new();
    for mut item in media {
        let id = text(&item, "id", "media")?.to_string();
        let project_id = text(&item, "project_id", "media")?.to_string();
        let extension = if text(&item, "format", "media")? == "png" {
            "png"
        } else {
            "jpg"
        };
        let folder = data_dir.join("projects").join(&project_id).join("media");
        let image = folder.join(format!("{id}.{extension}"));
        let has_mask = item.get("has_mask").and_then(Value::as_bool) == Some(true);
        let Ok(hash) = blobs::sha256_file(&image) else {
            tracing::warn!(
                "media {id}: {} is gone; left without a hash",
                image.display()
            );
            continue;
        };
        if let Value::Object(fields) = &mut item {
            fields.insert("sha256".into(), Value::String(hash.clone()));
        }
        tx.put(MEDIA, &id, &item).map_err(|e| e.to_string())?;
        let mask = has_mask.then(|| folder.join(format!("{id}.mask.png")));
        let key = (project_id, hash);
        if by_hash.get(&key).is_none_or(|known| known.mask.is_none()) {
            by_hash.insert(key, MediaFiles { image, mask });
        }
    }
    let models: Vec<Value> = tx.all(MODELS).map_err(|e| e.to_string())?;
    for model in &models {
        let Some(snapshot_id) = model.get("dataset_snapshot_id").and_then(Value::as_str) else {
            continue;
        };
        let legacy = data_dir
            .join("snapshots")
            .join(format!("{snapshot_id}.parquet"));
        let plain = snapshot_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !plain
            || !legacy.is_file()
            || tx
                .contains(SNAPSHOTS, snapshot_id)
                .map_err(|e| e.to_string())?
        {
            continue;
        }
        let project_id = text(model, "project_id", "models")?;
        convert(tx, data_dir, &legacy, snapshot_id, project_id, &by_hash)?;
    }
    Ok(())
}

/// Turns the version 1 snapshot file `legacy` into a record with its images. An unreadable file
/// is left out (logged): it was a cache, and the models that name it keep working.
fn convert(
    tx: &Transaction,
    data_dir: &Path,
    legacy: &Path,
    id: &str,
    project_id: &str,
    by_hash: &HashMap<(String, String), MediaFiles>,
) -> Result<(), String> {
    let entries = match crate::train::dataset::read_snapshot(legacy) {
        Ok(entries) => entries,
        Err(error) => {
            tracing::warn!("snapshot {id}: {error}; left out of the migration");
            return Ok(());
        }
    };
    let mut rows = Vec::new();
    let mut added = 0;
    let mut missing = 0;
    for entry in entries {
        let known = by_hash.get(&(project_id.to_string(), entry.sha256.clone()));
        let image = if entry.path.is_file() {
            entry.path.clone()
        } else if let Some(files) = known {
            files.image.clone()
        } else {
            missing += 1;
            continue;
        };
        let (sha256, gained) = blobs::add_file(data_dir, &image, None)
            .map_err(|e| format!("snapshot {id}: cannot keep {}: {e}", image.display()))?;
        added += gained;
        let anomalous = entry.label == crate::train::dataset::Label::Anomalous;
        let mask = entry
            .mask
            .filter(|m| m.is_file())
            .or_else(|| known.and_then(|files| files.mask.clone()))
            .filter(|_| anomalous);
        let mut size_bytes = std::fs::metadata(&image).map_or(0, |m| m.len());
        let mask_sha256 = match mask {
            Some(mask) => {
                let (hash, gained) = blobs::add_file(data_dir, &mask, None)
                    .map_err(|e| format!("snapshot {id}: cannot keep {}: {e}", mask.display()))?;
                added += gained;
                size_bytes += std::fs::metadata(&mask).map_or(0, |m| m.len());
                Some(hash)
            }
            None => None,
        };
        let png = image_is_png(&image);
        rows.push(Row {
            sha256,
            filename: entry
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            label: entry.label.name().to_string(),
            format: if png { "png" } else { "jpeg" }.to_string(),
            mask_sha256,
            media_id: None,
            size_bytes,
        });
    }
    if missing > 0 {
        tracing::warn!("snapshot {id}: {missing} images are nowhere to be found; left out");
    }
    let record = snapshot_store::new_record(
        project_id,
        &rows,
        SnapshotOrigin::Migrated,
        added,
        Some(id.to_string()),
    );
    snapshot_store::write_manifest(&snapshot_store::manifest_path(data_dir, id), &rows)
        .map_err(|e| e.to_string())?;
    tx.put(SNAPSHOTS, id, &record).map_err(|e| e.to_string())
}

/// Whether the file at `path` starts like a PNG (its first bytes only; JPEG otherwise).
fn image_is_png(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 16];
    let read = std::fs::File::open(path).and_then(|mut file| file.read(&mut head));
    read.is_ok_and(|n| image::guess_format(&head[..n]).ok() == Some(image::ImageFormat::Png))
}
