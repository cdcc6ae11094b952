//! Writing files so that readers never see half of one: the bytes go to a hidden temporary name
//! in the same folder (`.name.partial`) and are renamed into place.

use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` through `.{name}.partial` beside it and a rename; the temporary file
/// is removed when the rename fails.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    StagedFile::write(path, bytes)?.place()
}

/// A file written under its hidden temporary name (`.{name}.partial`), not yet in place: for
/// callers that put several files in place together with a store commit. Dropped before
/// [`StagedFile::place`], it removes its temporary file.
pub struct StagedFile {
    temporary: PathBuf,
    path: PathBuf,
    placed: bool,
}

impl StagedFile {
    /// Writes `bytes` to the temporary name of `path`.
    pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<Self> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let staged = Self {
            temporary: path.with_file_name(format!(".{name}.partial")),
            path: path.to_path_buf(),
            placed: false,
        };
        std::fs::write(&staged.temporary, bytes)?;
        Ok(staged)
    }

    /// Renames the file into place.
    pub fn place(mut self) -> std::io::Result<()> {
        std::fs::rename(&self.temporary, &self.path)?;
        self.placed = true;
        Ok(())
    }

    /// Where the file goes.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.placed {
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}
