//! The content-addressed image store under `blobs/`: each image or mask file kept once, named by
//! its SHA-256 (`blobs/<first two hex digits>/<sha256>`), whoever refers to it. Files come in
//! hard-linked from media files where the file system allows (media files are never rewritten),
//! or are written under a temporary name and renamed into place. What refers to them, and when
//! they go, is [`super::snapshot_store`]'s business.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use inspectflow_operators::files::StagedFile;

/// The blob of the image (or mask) whose hash is `sha256`.
pub fn blob_path(data_dir: &Path, sha256: &str) -> PathBuf {
    data_dir
        .join("blobs")
        .join(sha256.get(..2).unwrap_or("00"))
        .join(sha256)
}

/// SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// SHA-256 of the file at `path`, hex, read in pieces.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            return Ok(format!("{:x}", hasher.finalize()));
        }
        hasher.update(&buffer[..read]);
    }
}

/// Puts the file at `path` into the blob store (its hash `known` when already computed);
/// returns the hash and the bytes the store gained.
pub fn add_file(
    data_dir: &Path,
    path: &Path,
    known: Option<&str>,
) -> std::io::Result<(String, u64)> {
    let sha256 = match known {
        Some(hash) => hash.to_string(),
        None => sha256_file(path)?,
    };
    let blob = blob_path(data_dir, &sha256);
    if blob.is_file() {
        return Ok((sha256, 0));
    }
    if let Some(parent) = blob.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let size = std::fs::metadata(path)?.len();
    // A hard link shares the media file's bytes (media files are never rewritten); across file
    // systems the bytes are copied under a temporary name and renamed into place.
    if std::fs::hard_link(path, &blob).is_err() {
        let temporary = blob.with_file_name(format!(".{sha256}.partial"));
        std::fs::copy(path, &temporary)?;
        if let Err(error) = std::fs::rename(&temporary, &blob) {
            let _ = std::fs::remove_file(&temporary);
            return Err(error);
        }
    }
    Ok((sha256, size))
}

/// Puts `bytes` into the blob store; returns their hash and the bytes the store gained.
pub fn add_bytes(data_dir: &Path, bytes: &[u8]) -> std::io::Result<(String, u64)> {
    let sha256 = sha256_hex(bytes);
    let blob = blob_path(data_dir, &sha256);
    if blob.is_file() {
        return Ok((sha256, 0));
    }
    if let Some(parent) = blob.parent() {
        std::fs::create_dir_all(parent)?;
    }
    StagedFile::write(&blob, bytes)?.place()?;
    Ok((sha256, bytes.len() as u64))
}

/// The files under `blobs/` (every one, temporary files included).
pub fn blob_files(data_dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for folder in std::fs::read_dir(data_dir.join("blobs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        files.extend(
            std::fs::read_dir(folder.path())
                .into_iter()
                .flatten()
                .flatten()
                .map(|entry| entry.path()),
        );
    }
    files.sort();
    files
}
