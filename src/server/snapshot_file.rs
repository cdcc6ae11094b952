//! The self-contained snapshot file that `GET /api/snapshots/{id}/download` answers and
//! `POST /api/projects/{id}/snapshots:import` takes back: Parquet with one row per image, Geti
//! Inspect's columns (`image` bytes, `is_anomalous`, `filename`) plus `label`, `mask` bytes and
//! `sha256`. An import checks every row before it stores anything.

use std::path::Path;

use polars::prelude::*;

use super::blobs::{add_bytes, blob_path, sha256_hex};
use super::media::MAX_UPLOAD_BYTES;
use super::snapshot_store::{
    Row, Snapshot, SnapshotError, SnapshotOrigin, collect_garbage, commit, lock, manifest_path,
    polars_error, read_manifest, require_project,
};
use super::store::Store;

/// Most images a snapshot file may hold on import.
pub const MAX_IMPORT_ROWS: usize = 100_000;
/// Largest snapshot file accepted on import.
pub const MAX_IMPORT_BYTES: u64 = 512 << 20;

/// The snapshot file of `snapshot`: Parquet with one row per image, the image and mask bytes
/// inline.
pub fn export(data_dir: &Path, snapshot: &Snapshot) -> Result<Vec<u8>, SnapshotError> {
    let rows = read_manifest(&manifest_path(data_dir, &snapshot.id))?;
    let read = |sha256: &str| {
        std::fs::read(blob_path(data_dir, sha256)).map_err(|e| {
            SnapshotError::Io(format!(
                "snapshot {}: image {sha256} is unreadable: {e}",
                snapshot.id
            ))
        })
    };
    let mut images = Vec::with_capacity(rows.len());
    let mut masks = Vec::with_capacity(rows.len());
    for row in &rows {
        images.push(read(&row.sha256)?);
        masks.push(row.mask_sha256.as_deref().map(read).transpose()?);
    }
    let text = |f: &dyn Fn(&Row) -> String| rows.iter().map(f).collect::<Vec<String>>();
    let mut frame = df!(
        "image" => images,
        "is_anomalous" => rows.iter().map(Row::is_anomalous).collect::<Vec<bool>>(),
        "filename" => text(&|r| r.filename.clone()),
        "label" => text(&|r| r.label.clone()),
        "mask" => masks,
        "sha256" => text(&|r| r.sha256.clone()),
    )
    .map_err(polars_error("building the snapshot file".into()))?;
    let mut bytes = Vec::new();
    ParquetWriter::new(&mut bytes)
        .finish(&mut frame)
        .map_err(polars_error("writing the snapshot file".into()))?;
    Ok(bytes)
}

/// A row that passed the checks: image, mask, label, file name, format.
type CheckedRow = (Vec<u8>, Option<Vec<u8>>, String, String, &'static str);

/// Reads a snapshot file, refusing from its metadata, before anything is decompressed, one of
/// more than [`MAX_IMPORT_ROWS`] rows or that would expand past twice [`MAX_IMPORT_BYTES`].
fn read_bounded(file: &[u8]) -> Result<DataFrame, String> {
    let unreadable = |e: PolarsError| format!("not a readable Parquet file: {e}");
    let mut reader = ParquetReader::new(std::io::Cursor::new(file));
    let metadata = reader.get_metadata().map_err(unreadable)?;
    if metadata.num_rows > MAX_IMPORT_ROWS {
        return Err(format!(
            "{} rows, at most {MAX_IMPORT_ROWS} allowed",
            metadata.num_rows
        ));
    }
    let expanded: usize = metadata
        .row_groups
        .iter()
        .map(|group| group.total_byte_size())
        .sum();
    if expanded as u64 > 2 * MAX_IMPORT_BYTES {
        return Err(format!(
            "its columns expand to {expanded} bytes, at most {} allowed",
            2 * MAX_IMPORT_BYTES
        ));
    }
    reader.finish().map_err(unreadable)
}

/// Imports a snapshot file (as [`export`] writes it, or Geti Inspect's `image`, `is_anomalous`,
/// `filename` columns) into project `project_id`. Every row is checked (image a PNG or JPEG of
/// at most [`MAX_UPLOAD_BYTES`], mask a PNG, `sha256` matching when given) before anything is
/// stored; the first bad one is named.
pub fn import(
    store: &Store,
    data_dir: &Path,
    project_id: &str,
    file: &[u8],
) -> Result<Snapshot, SnapshotError> {
    require_project(store, project_id)?;
    let invalid = |message: String| SnapshotError::Invalid(format!("snapshot file: {message}"));
    // A hostile file must not take the server down, whatever the Parquet reader does with it.
    let frame = std::panic::catch_unwind(|| read_bounded(file))
        .map_err(|_| invalid("not a readable Parquet file".into()))?
        .map_err(invalid)?;
    if frame.height() > MAX_IMPORT_ROWS {
        // The metadata may understate it.
        return Err(invalid(format!(
            "{} rows, at most {MAX_IMPORT_ROWS} allowed",
            frame.height()
        )));
    }
    let binary = |name: &str| -> Result<Option<Vec<Option<Vec<u8>>>>, SnapshotError> {
        match frame.column(name) {
            Err(_) => Ok(None),
            Ok(column) => column
                .binary()
                .map(|values| Some(values.iter().map(|v| v.map(<[u8]>::to_vec)).collect()))
                .map_err(|_| invalid(format!("column {name} must hold bytes"))),
        }
    };
    let text = |name: &str| -> Result<Option<Vec<Option<String>>>, SnapshotError> {
        match frame.column(name) {
            Err(_) => Ok(None),
            Ok(column) => column
                .str()
                .map(|values| Some(values.iter().map(|v| v.map(str::to_string)).collect()))
                .map_err(|_| invalid(format!("column {name} must hold text"))),
        }
    };
    let images = binary("image")?.ok_or_else(|| invalid("no column image".into()))?;
    let masks = binary("mask")?;
    let (labels, names, hashes) = (text("label")?, text("filename")?, text("sha256")?);
    let flags: Option<Vec<Option<bool>>> = match frame.column("is_anomalous") {
        Err(_) => None,
        Ok(column) => Some(
            column
                .bool()
                .map_err(|_| invalid("column is_anomalous must hold booleans".into()))?
                .iter()
                .collect(),
        ),
    };
    if labels.is_none() && flags.is_none() {
        return Err(invalid("no column label or is_anomalous".into()));
    }
    let mut checked = Vec::with_capacity(images.len());
    for (index, image) in images.into_iter().enumerate() {
        let at = |message: String| invalid(format!("row {index}: {message}"));
        let image = image.ok_or_else(|| at("image: missing".into()))?;
        if image.len() as u64 > MAX_UPLOAD_BYTES {
            return Err(at(format!(
                "image: {} bytes, at most {MAX_UPLOAD_BYTES}",
                image.len()
            )));
        }
        let format = match image::guess_format(&image) {
            Ok(image::ImageFormat::Png) => "png",
            Ok(image::ImageFormat::Jpeg) => "jpeg",
            _ => return Err(at("image: not a PNG or JPEG".into())),
        };
        let (width, height) = super::media::header_dimensions(&image)
            .ok_or_else(|| at("image: its header does not decode".into()))?;
        let label = match (
            labels.as_ref().and_then(|l| l[index].as_deref()),
            flags.as_ref().and_then(|f| f[index]),
        ) {
            (Some(label @ ("normal" | "anomalous")), _) => label.to_string(),
            (Some(other), _) => {
                return Err(at(format!(
                    "label: {other:?}, expected normal or anomalous"
                )));
            }
            (None, Some(true)) => "anomalous".into(),
            (None, Some(false)) => "normal".into(),
            (None, None) => return Err(at("label: missing".into())),
        };
        let sha256 = sha256_hex(&image);
        if let Some(given) = hashes.as_ref().and_then(|h| h[index].as_deref())
            && given != sha256
        {
            return Err(at(format!(
                "sha256: {given} does not match the image ({sha256})"
            )));
        }
        let mask = masks.as_ref().and_then(|m| m[index].clone());
        if let Some(mask) = &mask {
            if label != "anomalous" {
                return Err(at("mask: only anomalous images have masks".into()));
            }
            if mask.len() as u64 > MAX_UPLOAD_BYTES
                || image::guess_format(mask).ok() != Some(image::ImageFormat::Png)
            {
                return Err(at(format!(
                    "mask: must be a PNG of at most {MAX_UPLOAD_BYTES} bytes"
                )));
            }
            match super::media::header_dimensions(mask) {
                Some(size) if size == (width, height) => {}
                Some((mask_width, mask_height)) => {
                    return Err(at(format!(
                        "mask: {mask_width}x{mask_height} does not match the image's {width}x{height}"
                    )));
                }
                None => return Err(at("mask: its header does not decode".into())),
            }
        }
        let filename: String = names
            .as_ref()
            .and_then(|n| n[index].clone())
            .unwrap_or_else(|| format!("{sha256}.{format}"))
            .chars()
            .take(255)
            .collect();
        checked.push((image, mask, label, filename, format));
    }
    if checked.is_empty() {
        return Err(invalid("it holds no images".into()));
    }
    let _guard = lock();
    let stored = store_rows(data_dir, checked);
    let (rows, added) = match stored {
        Ok(stored) => stored,
        Err(error) => {
            collect_garbage(store, data_dir);
            return Err(error);
        }
    };
    commit(
        store,
        data_dir,
        project_id,
        rows,
        SnapshotOrigin::Import,
        added,
    )
}

/// Puts each checked row's image and mask into the blob store; the rows, and the bytes the store
/// gained.
fn store_rows(data_dir: &Path, checked: Vec<CheckedRow>) -> Result<(Vec<Row>, u64), SnapshotError> {
    let io = |e: std::io::Error| SnapshotError::Io(format!("cannot store an image: {e}"));
    let mut rows = Vec::with_capacity(checked.len());
    let mut added = 0;
    for (image, mask, label, filename, format) in checked {
        let (sha256, gained) = add_bytes(data_dir, &image).map_err(io)?;
        added += gained;
        let mask_sha256 = match &mask {
            Some(mask) => {
                let (hash, gained) = add_bytes(data_dir, mask).map_err(io)?;
                added += gained;
                Some(hash)
            }
            None => None,
        };
        rows.push(Row {
            sha256,
            filename,
            label,
            format: format.to_string(),
            mask_sha256,
            media_id: None,
            size_bytes: (image.len() + mask.as_ref().map_or(0, Vec::len)) as u64,
        });
    }
    Ok((rows, added))
}
