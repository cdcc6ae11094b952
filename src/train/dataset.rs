//! Datasets and their snapshots. A dataset is folders of images: normal ones, optionally
//! anomalous ones and their masks. A snapshot freezes it as a Parquet table (Arrow types, written
//! with polars): one row per image with its path, file name, label, mask, split and SHA-256
//! content hash. Snapshots are cached by the listing (paths, sizes, modification times) and the
//! seed, so training again on an unchanged dataset reuses the snapshot instead of hashing every
//! file again; the model package keeps a copy, so a model always says what it was trained on.

use std::path::{Path, PathBuf};

use polars::prelude::*;
use sha2::{Digest, Sha256};

use super::TrainError;
use crate::synth::Rng;

/// Whether an image shows a defect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    /// A good part.
    Normal,
    /// A defective part.
    Anomalous,
}

impl Label {
    /// `normal` or `anomalous`.
    pub fn name(self) -> &'static str {
        match self {
            Label::Normal => "normal",
            Label::Anomalous => "anomalous",
        }
    }
}

/// What an image is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Fitting the model (normal images only).
    Train,
    /// Calibrating threshold and normalisation.
    Validation,
    /// Held out for evaluation.
    Test,
}

impl Split {
    /// `train`, `validation` or `test`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "train" => Some(Split::Train),
            "validation" => Some(Split::Validation),
            "test" => Some(Split::Test),
            _ => None,
        }
    }
}

/// One image of a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The image file.
    pub path: PathBuf,
    /// Its label.
    pub label: Label,
    /// Its defect mask, when one was given.
    pub mask: Option<PathBuf>,
    /// What it is used for.
    pub split: Split,
    /// SHA-256 of the file, hex.
    pub sha256: String,
}

/// A frozen dataset.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Cache key and id (hex).
    pub id: String,
    /// Its Parquet file.
    pub file: PathBuf,
    /// The images.
    pub entries: Vec<Entry>,
    /// Whether an existing snapshot was reused.
    pub reused: bool,
}

/// The PNG and JPEG files in `dir`, sorted by name.
pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>, TrainError> {
    let listing = std::fs::read_dir(dir).map_err(|source| TrainError::Io {
        context: format!("cannot read the image folder {}", dir.display()),
        source,
    })?;
    let mut files: Vec<PathBuf> = listing
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.is_file()
                && path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg")
                })
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The mask of `image` in `masks`: a PNG with the same stem, or MVTec's `<stem>_mask.png`.
pub fn find_mask(masks: &Path, image: &Path) -> Option<PathBuf> {
    let stem = image.file_stem()?.to_string_lossy().into_owned();
    [format!("{stem}.png"), format!("{stem}_mask.png")]
        .into_iter()
        .map(|name| masks.join(name))
        .find(|candidate| candidate.is_file())
}

/// The folders a dataset is made of.
#[derive(Debug, Clone)]
pub struct Sources<'a> {
    /// Normal images.
    pub normal: &'a Path,
    /// Anomalous images, if any.
    pub anomalous: Option<&'a Path>,
    /// Masks of the anomalous images, if any: at least one must match; images without one are
    /// still scored, and pixel metrics are given when every anomalous image has one.
    pub masks: Option<&'a Path>,
}

/// Lists the dataset: every image with its label and mask (split and hash not yet set).
pub fn list(sources: &Sources) -> Result<Vec<Entry>, TrainError> {
    let mut entries = Vec::new();
    let normals = image_files(sources.normal)?;
    if normals.is_empty() {
        return Err(TrainError::Invalid(format!(
            "{} holds no PNG or JPEG images; give --normal a folder of images of good parts",
            sources.normal.display()
        )));
    }
    entries.extend(normals.into_iter().map(|path| Entry {
        path,
        label: Label::Normal,
        mask: None,
        split: Split::Train,
        sha256: String::new(),
    }));
    if let Some(dir) = sources.anomalous {
        let anomalous = image_files(dir)?;
        if anomalous.is_empty() {
            return Err(TrainError::Invalid(format!(
                "{} holds no PNG or JPEG images (--anomalous)",
                dir.display()
            )));
        }
        let mut with_mask = 0;
        for path in anomalous {
            let mask = sources.masks.and_then(|masks| find_mask(masks, &path));
            with_mask += usize::from(mask.is_some());
            entries.push(Entry {
                path,
                label: Label::Anomalous,
                mask,
                split: Split::Validation,
                sha256: String::new(),
            });
        }
        // Some anomalous images may lack a mask (pixel metrics then need them all); a masks
        // folder that matches none of them is a wrong folder.
        if let Some(masks) = sources.masks
            && with_mask == 0
        {
            return Err(TrainError::Invalid(format!(
                "no anomalous image in {} has a mask in {} (looked for <name>.png and \
                 <name>_mask.png)",
                dir.display(),
                masks.display()
            )));
        }
    } else if sources.masks.is_some() {
        return Err(TrainError::Invalid(
            "--masks needs --anomalous: masks belong to anomalous images".into(),
        ));
    }
    Ok(entries)
}

/// Assigns splits: a seeded fifth of the normal images (at least one) is held out for
/// validation; labelled anomalies all go to validation.
fn assign_splits(entries: &mut [Entry], seed: u64) -> Result<(), TrainError> {
    let normal: Vec<usize> = (0..entries.len())
        .filter(|&i| entries[i].label == Label::Normal)
        .collect();
    if normal.len() < 3 {
        return Err(TrainError::Invalid(format!(
            "need at least 3 normal images (2 to fit, 1 to calibrate), got {}",
            normal.len()
        )));
    }
    let mut order = normal.clone();
    let mut rng = Rng::new(seed);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let held_out = (normal.len() / 5).max(1);
    for (rank, &index) in order.iter().enumerate() {
        entries[index].split = if rank < held_out {
            Split::Validation
        } else {
            Split::Train
        };
    }
    Ok(())
}

fn hash_file(path: &Path) -> Result<String, TrainError> {
    let bytes = std::fs::read(path).map_err(|source| TrainError::Io {
        context: format!("reading {}", path.display()),
        source,
    })?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

/// The cache key: every file's path, size and modification time, plus the seed.
fn listing_key(entries: &[Entry], seed: u64) -> Result<String, TrainError> {
    let mut hasher = Sha256::new();
    hasher.update(b"inspectflow snapshot v1\n");
    hasher.update(seed.to_le_bytes());
    for entry in entries {
        for path in std::iter::once(&entry.path).chain(entry.mask.as_ref()) {
            let metadata = std::fs::metadata(path).map_err(|source| TrainError::Io {
                context: format!("reading {}", path.display()),
                source,
            })?;
            let modified = metadata
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            hasher.update(path.to_string_lossy().as_bytes());
            hasher.update(metadata.len().to_le_bytes());
            hasher.update(modified.to_le_bytes());
        }
        hasher.update(entry.label.name());
    }
    Ok(format!("{:x}", hasher.finalize())[..16].to_string())
}

fn polars_error(context: String) -> impl FnOnce(PolarsError) -> TrainError {
    move |e| TrainError::Invalid(format!("{context}: {e}"))
}

/// The snapshot table.
pub fn to_frame(entries: &[Entry]) -> Result<DataFrame, TrainError> {
    let text = |f: &dyn Fn(&Entry) -> String| entries.iter().map(f).collect::<Vec<String>>();
    df!(
        "path" => text(&|e| e.path.to_string_lossy().into_owned()),
        "filename" => text(&|e| e.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()),
        "label" => text(&|e| e.label.name().to_string()),
        "mask" => entries.iter().map(|e| e.mask.as_ref().map(|m| m.to_string_lossy().into_owned())).collect::<Vec<Option<String>>>(),
        "split" => text(&|e| e.split.name().to_string()),
        "sha256" => text(&|e| e.sha256.clone()),
    )
    .map_err(polars_error("building the snapshot table".into()))
}

/// Writes `frame` as Parquet at `path`, through a temporary file.
pub fn write_parquet(path: &Path, frame: &mut DataFrame) -> Result<(), TrainError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let partial = path.with_file_name(format!(".{name}.partial"));
    let file = std::fs::File::create(&partial).map_err(|source| TrainError::Io {
        context: format!("creating {}", partial.display()),
        source,
    })?;
    let written = ParquetWriter::new(file)
        .finish(frame)
        .map_err(polars_error(format!("writing {}", path.display())));
    if let Err(error) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(error);
    }
    std::fs::rename(&partial, path).map_err(|source| TrainError::Io {
        context: format!("writing {}", path.display()),
        source,
    })
}

/// The values of the text column `name` of `frame` (an error when there is none, or it is not
/// text).
pub fn text_column(frame: &DataFrame, name: &str) -> PolarsResult<Vec<Option<String>>> {
    let values = frame.column(name)?.str()?;
    Ok(values.iter().map(|v| v.map(str::to_string)).collect())
}

/// Reads a snapshot table written by [`to_frame`] and [`write_parquet`].
pub fn read_snapshot(path: &Path) -> Result<Vec<Entry>, TrainError> {
    let context = || format!("reading the snapshot {}", path.display());
    let file = std::fs::File::open(path).map_err(|source| TrainError::Io {
        context: context(),
        source,
    })?;
    let frame = ParquetReader::new(file)
        .finish()
        .map_err(polars_error(context()))?;
    let column = |name: &str| {
        text_column(&frame, name).map_err(polars_error(format!("{}: column {name}", context())))
    };
    let (paths, labels, masks, splits, hashes) = (
        column("path")?,
        column("label")?,
        column("mask")?,
        column("split")?,
        column("sha256")?,
    );
    let mut entries = Vec::with_capacity(paths.len());
    for row in 0..paths.len() {
        let bad = |what: &str| TrainError::Invalid(format!("{}: row {row}: bad {what}", context()));
        entries.push(Entry {
            path: PathBuf::from(paths[row].clone().ok_or_else(|| bad("path"))?),
            label: match labels[row].as_deref() {
                Some("normal") => Label::Normal,
                Some("anomalous") => Label::Anomalous,
                _ => return Err(bad("label")),
            },
            mask: masks[row].clone().map(PathBuf::from),
            split: splits[row]
                .as_deref()
                .and_then(Split::parse)
                .ok_or_else(|| bad("split"))?,
            sha256: hashes[row].clone().ok_or_else(|| bad("sha256"))?,
        });
    }
    Ok(entries)
}

/// Freezes the dataset at `sources` into a snapshot under `cache` (created if missing), or
/// reuses the cached one when no file changed.
pub fn snapshot(sources: &Sources, seed: u64, cache: &Path) -> Result<Snapshot, TrainError> {
    let mut entries = list(sources)?;
    assign_splits(&mut entries, seed)?;
    let id = listing_key(&entries, seed)?;
    let file = cache.join(format!("{id}.parquet"));
    if file.is_file()
        && let Ok(cached) = read_snapshot(&file)
        && cached.len() == entries.len()
    {
        return Ok(Snapshot {
            id,
            file,
            entries: cached,
            reused: true,
        });
    }
    for entry in &mut entries {
        entry.sha256 = hash_file(&entry.path)?;
    }
    std::fs::create_dir_all(cache).map_err(|source| TrainError::Io {
        context: format!("creating the snapshot cache {}", cache.display()),
        source,
    })?;
    write_parquet(&file, &mut to_frame(&entries)?)?;
    Ok(Snapshot {
        id,
        file,
        entries,
        reused: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("folder");
        std::fs::write(path, b"").expect("file");
    }

    #[test]
    fn anomalous_images_without_a_mask_are_listed_but_a_masks_folder_matching_none_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        for name in ["n1.png", "n2.png", "n3.png"] {
            touch(&root.join("normal").join(name));
        }
        for name in ["a1.png", "a2.jpg"] {
            touch(&root.join("anomalous").join(name));
        }
        touch(&root.join("masks").join("a1_mask.png"));
        std::fs::create_dir_all(root.join("empty")).expect("folder");
        let (normal, anomalous) = (root.join("normal"), root.join("anomalous"));
        let with = |masks: &Path| {
            list(&Sources {
                normal: &normal,
                anomalous: Some(&anomalous),
                masks: Some(masks),
            })
        };

        let entries = with(&root.join("masks")).expect("partial masks are fine");
        let masks: Vec<(String, bool)> = entries
            .iter()
            .filter(|e| e.label == Label::Anomalous)
            .map(|e| {
                let name = e.path.file_name().expect("name").to_string_lossy();
                (name.into_owned(), e.mask.is_some())
            })
            .collect();
        assert_eq!(
            masks,
            [("a1.png".to_string(), true), ("a2.jpg".to_string(), false)]
        );

        let refused = with(&root.join("empty")).expect_err("a folder matching no image");
        assert!(
            refused.to_string().contains("no anomalous image"),
            "{refused}"
        );
    }
}
