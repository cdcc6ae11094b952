//! The self-contained snapshot file that `GET /api/snapshots/{id}/download` answers and
//! `POST /api/projects/{id}/snapshots:import` takes back: Parquet with one row per image, Geti
//! Inspect's columns (`image` bytes, `is_anomalous`, `filename`) plus `label`, `mask` bytes and
//! `sha256`. An import checks every row before it stores anything.

use std::path::{Path, PathBuf};

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

/// Most images in one row group of a downloaded snapshot file...
const GROUP_ROWS: usize = 64;
/// ...or, whichever comes first, bytes of images and masks: what a download holds at once.
const GROUP_BYTES: u64 = 8 << 20;

/// A snapshot file ready to be written: the snapshot's rows, each with its files present.
pub struct Export {
    data_dir: PathBuf,
    snapshot_id: String,
    rows: Vec<Row>,
}

/// Reads `snapshot`'s manifest and checks its image and mask files are all there, so that a
/// download fails before it starts rather than half-way.
pub fn prepare_export(data_dir: &Path, snapshot: &Snapshot) -> Result<Export, SnapshotError> {
    let rows = read_manifest(&manifest_path(data_dir, &snapshot.id))?;
    for row in &rows {
        for sha256 in std::iter::once(&row.sha256).chain(&row.mask_sha256) {
            if !blob_path(data_dir, sha256).is_file() {
                return Err(SnapshotError::Io(format!(
                    "snapshot {}: image {sha256} is missing",
                    snapshot.id
                )));
            }
        }
    }
    Ok(Export {
        data_dir: data_dir.to_path_buf(),
        snapshot_id: snapshot.id.clone(),
        rows,
    })
}

/// `rows` cut into row groups of at most [`GROUP_ROWS`] rows and [`GROUP_BYTES`] bytes (a
/// larger row alone); at least one group, empty when `rows` is.
fn row_groups(rows: &[Row]) -> Vec<&[Row]> {
    let mut groups = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (index, row) in rows.iter().enumerate() {
        if index > start && (index - start == GROUP_ROWS || bytes + row.size_bytes > GROUP_BYTES) {
            groups.push(&rows[start..index]);
            (start, bytes) = (index, 0);
        }
        bytes += row.size_bytes;
    }
    groups.push(&rows[start..]);
    groups
}

impl Export {
    /// Writes the snapshot file into `out`: Parquet with one row per image, the image and mask
    /// bytes inline, in row groups of at most [`GROUP_ROWS`] rows or [`GROUP_BYTES`] bytes, so
    /// only one group is in memory at a time.
    pub fn write_to(self, out: impl std::io::Write) -> Result<(), SnapshotError> {
        let mut groups = row_groups(&self.rows).into_iter();
        // There is always a first group (empty for an empty snapshot: the file has the columns).
        let mut frame = self.frame_of(groups.next().unwrap_or(&[]))?;
        let mut writer = ParquetWriter::new(out)
            .batched(frame.schema())
            .map_err(polars_error("starting the snapshot file".into()))?;
        loop {
            writer
                .write_batch(&frame)
                .map_err(polars_error("writing the snapshot file".into()))?;
            match groups.next() {
                Some(rows) => frame = self.frame_of(rows)?,
                None => break,
            }
        }
        writer
            .finish()
            .map_err(polars_error("finishing the snapshot file".into()))?;
        Ok(())
    }

    /// The rows of one row group, with their images and masks read.
    fn frame_of(&self, rows: &[Row]) -> Result<DataFrame, SnapshotError> {
        let read = |sha256: &str| {
            std::fs::read(blob_path(&self.data_dir, sha256)).map_err(|e| {
                SnapshotError::Io(format!(
                    "snapshot {}: image {sha256} is unreadable: {e}",
                    self.snapshot_id
                ))
            })
        };
        let mut images = Vec::with_capacity(rows.len());
        let mut masks = Vec::with_capacity(rows.len());
        for row in rows {
            images.push(read(&row.sha256)?);
            masks.push(row.mask_sha256.as_deref().map(read).transpose()?);
        }
        let text = |f: &dyn Fn(&Row) -> String| rows.iter().map(f).collect::<Vec<String>>();
        df!(
            "image" => images,
            "is_anomalous" => rows.iter().map(Row::is_anomalous).collect::<Vec<bool>>(),
            "filename" => text(&|r| r.filename.clone()),
            "label" => text(&|r| r.label.clone()),
            "mask" => masks,
            "sha256" => text(&|r| r.sha256.clone()),
        )
        .map_err(polars_error("building the snapshot file".into()))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn row(sha256: &str, size_bytes: u64) -> Row {
        Row {
            sha256: sha256.to_string(),
            filename: format!("{sha256}.png"),
            label: "normal".to_string(),
            format: "png".to_string(),
            mask_sha256: None,
            media_id: None,
            size_bytes,
        }
    }

    fn group_sizes(rows: &[Row]) -> Vec<usize> {
        row_groups(rows).iter().map(|group| group.len()).collect()
    }

    #[test]
    fn row_groups_are_bounded_by_rows_and_by_bytes() {
        assert_eq!(group_sizes(&[]), [0]);
        assert_eq!(group_sizes(&vec![row("a", 1); 130]), [64, 64, 2]);
        assert_eq!(
            group_sizes(&vec![row("a", GROUP_BYTES / 2 + 1); 3]),
            [1, 1, 1]
        );
        // A row larger than a group is a group of its own.
        let rows = [row("a", 2 * GROUP_BYTES), row("b", 1), row("c", 1)];
        assert_eq!(group_sizes(&rows), [1, 2]);
    }

    #[test]
    fn a_file_of_several_row_groups_holds_every_row_in_order() {
        let data_dir = tempfile::tempdir().expect("temporary folder");
        let rows: Vec<Row> = (0..150u32)
            .map(|index| {
                let (sha256, size) =
                    add_bytes(data_dir.path(), &index.to_le_bytes()).expect("blob");
                row(&sha256, size)
            })
            .collect();
        let export = Export {
            data_dir: data_dir.path().to_path_buf(),
            snapshot_id: "snapshot".to_string(),
            rows: rows.clone(),
        };
        let mut file = Vec::new();
        export.write_to(&mut file).expect("written");

        let mut reader = ParquetReader::new(std::io::Cursor::new(file));
        assert_eq!(reader.get_metadata().expect("metadata").row_groups.len(), 3);
        let frame = reader.finish().expect("readable");
        let images = frame
            .column("image")
            .expect("image")
            .binary()
            .expect("bytes");
        let hashes = frame.column("sha256").expect("sha256").str().expect("text");
        assert_eq!(frame.height(), 150);
        for (index, row) in rows.iter().enumerate() {
            assert_eq!(images.get(index), Some(&(index as u32).to_le_bytes()[..]));
            assert_eq!(hashes.get(index), Some(row.sha256.as_str()));
        }
    }
}
