//! Writing files so that readers never see half of one: the bytes go to a hidden temporary name
//! in the same folder (`.name.partial`) and are renamed into place.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` through `.{name}.partial` beside it and a rename; the temporary file
/// is removed when the rename fails. Not synced to disk (results written per frame): after a
/// power loss the file may be missing or empty, never half of the new bytes under the name.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    StagedFile::stage(path, bytes, false)?.place()
}

/// Syncs to disk every file in `folder` (and its subfolders) and the folders themselves: for a
/// folder another process wrote (a training helper's package), before it is renamed into place.
pub fn sync_folder(folder: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(folder)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            sync_folder(&entry.path())?;
        } else if kind.is_file() {
            std::fs::File::open(entry.path())?.sync_all()?;
        }
    }
    std::fs::File::open(folder)?.sync_all()
}

/// Syncs the folder that holds `path`'s name: after a rename, so that the rename survives a
/// power loss.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    let folder = match path.parent() {
        Some(folder) if !folder.as_os_str().is_empty() => folder,
        _ => Path::new("."),
    };
    std::fs::File::open(folder)?.sync_all()
}

/// A file written under its hidden temporary name (`.{name}.partial`), not yet in place: for
/// callers that put several files in place together with a store commit. Its bytes are on disk
/// before it is renamed, and the rename before [`StagedFile::place`] returns, so a record
/// committed after it never outlives its file, power loss included. Dropped before
/// [`StagedFile::place`], it removes its temporary file.
pub struct StagedFile {
    temporary: PathBuf,
    path: PathBuf,
    placed: bool,
    durable: bool,
}

impl StagedFile {
    /// Writes `bytes` to the temporary name of `path` and syncs them to disk.
    pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<Self> {
        Self::stage(path, bytes, true)
    }

    fn stage(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<Self> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let staged = Self {
            temporary: path.with_file_name(format!(".{name}.partial")),
            path: path.to_path_buf(),
            placed: false,
            durable,
        };
        // A fresh file, never an existing one: `create_new` refuses a symbolic link planted under
        // the temporary name instead of writing through it (a stale temporary file is removed
        // first). The rename then replaces whatever is at `path`, a link included, without
        // following it.
        let _ = std::fs::remove_file(&staged.temporary);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&staged.temporary)?;
        file.write_all(bytes)?;
        if durable {
            file.sync_data()?;
        }
        Ok(staged)
    }

    /// Renames the file into place (and, when durable, syncs the folder that holds the name).
    pub fn place(mut self) -> std::io::Result<()> {
        std::fs::rename(&self.temporary, &self.path)?;
        self.placed = true;
        if self.durable {
            sync_parent(&self.path)?;
        }
        Ok(())
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.placed {
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_at_the_temporary_or_final_name_are_replaced_not_followed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let outside = dir.path().join("outside.txt");
        std::fs::write(&outside, b"untouched").expect("write");
        let inside = dir.path().join("folder");
        std::fs::create_dir(&inside).expect("mkdir");
        std::os::unix::fs::symlink(&outside, inside.join(".out.png.partial")).expect("link");
        std::os::unix::fs::symlink(&outside, inside.join("out.png")).expect("link");
        write_atomically(&inside.join("out.png"), b"new").expect("written");
        assert_eq!(std::fs::read(&outside).expect("read"), b"untouched");
        assert_eq!(std::fs::read(inside.join("out.png")).expect("read"), b"new");
        assert!(
            !std::fs::symlink_metadata(inside.join("out.png"))
                .expect("metadata")
                .file_type()
                .is_symlink()
        );
    }
}
