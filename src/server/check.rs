//! `inspectflow check-db`: the store's consistency with the files beside it. It reports the
//! schema version, records that do not parse, media whose project is gone or whose files are
//! missing (dangling records), and files no record points to, including half-written `.partial`
//! files (orphans). The server must not be running (redb locks the store).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::media::Media;
use super::store::{MEDIA, PROJECTS, Store};

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
    let projects: HashSet<String> = match store.all::<super::api::Project>(PROJECTS) {
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
    let mut expected: HashSet<PathBuf> = HashSet::new();
    for item in &media {
        if !projects.contains(&item.project_id) {
            problems.push(format!(
                "dangling record: media {} belongs to project {}, which does not exist",
                item.id, item.project_id
            ));
        }
        let mut files = vec![item.image_path(data_dir), item.thumbnail_path(data_dir)];
        if item.has_mask {
            files.push(item.mask_path(data_dir));
        }
        for file in files {
            if !file.is_file() {
                problems.push(format!(
                    "dangling record: media {} lacks its file {}",
                    item.id,
                    file.display()
                ));
            }
            expected.insert(file);
        }
    }
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
    Ok(Report {
        schema_version: store.schema_version().map_err(|e| e.to_string())?,
        records: projects.len() + media.len(),
        problems,
    })
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
