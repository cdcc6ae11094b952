//! Path roots: the folders a client may name in sources, sinks and pipeline graphs (video
//! files, image folders, result folders). Anything outside them is refused, so an API client
//! cannot make the server read or write arbitrary files. The data directory is always a root;
//! more come from `--path-root`.

use std::path::{Component, Path, PathBuf};

/// The allowed folders, absolute and normalised.
#[derive(Debug, Clone)]
pub struct PathRoots {
    roots: Vec<PathBuf>,
}

impl PathRoots {
    /// Roots from folders (made absolute against the working directory).
    pub fn new(roots: &[PathBuf]) -> Self {
        Self {
            roots: roots.iter().map(|root| absolute(root)).collect(),
        }
    }

    /// The roots, for messages and the README.
    pub fn list(&self) -> &[PathBuf] {
        &self.roots
    }

    /// Whether `path` lies under a root. The path is resolved through existing symbolic links
    /// (its deepest existing ancestor is canonicalised), so a link cannot lead outside.
    pub fn check(&self, path: &Path) -> Result<(), String> {
        let resolved = resolve(&absolute(path));
        let roots: Vec<PathBuf> = self.roots.iter().map(|root| resolve(root)).collect();
        if roots.iter().any(|root| resolved.starts_with(root)) {
            Ok(())
        } else {
            Err(format!(
                "{} is outside the server's path roots ({}); start the server with --path-root to allow it",
                path.display(),
                self.roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    }
}

/// `path` made absolute and free of `.` and `..` (lexically).
fn absolute(path: &Path) -> PathBuf {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut clean = PathBuf::new();
    for component in joined.components() {
        match component {
            Component::ParentDir => {
                clean.pop();
            }
            Component::CurDir => {}
            other => clean.push(other),
        }
    }
    clean
}

/// The canonical form of the deepest existing ancestor, with the rest appended.
fn resolve(path: &Path) -> PathBuf {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(canonical) = existing.canonicalize() {
            let mut resolved = canonical;
            for part in rest.iter().rev() {
                resolved.push(part);
            }
            return resolved;
        }
        match (
            existing.file_name().map(|n| n.to_os_string()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return path.to_path_buf(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PathRoots;
    use std::path::Path;

    #[test]
    fn paths_under_a_root_pass_and_others_and_escapes_do_not() {
        let dir = tempfile::tempdir().expect("temp dir");
        let roots = PathRoots::new(&[dir.path().join("media")]);
        assert!(
            roots
                .check(&dir.path().join("media/line1/clip.mp4"))
                .is_ok()
        );
        assert!(roots.check(&dir.path().join("media/../secrets")).is_err());
        assert!(roots.check(Path::new("/etc/passwd")).is_err());
        std::fs::create_dir_all(dir.path().join("media")).expect("mkdir");
        std::os::unix::fs::symlink("/etc", dir.path().join("media/etc")).expect("link");
        let error = roots
            .check(&dir.path().join("media/etc/passwd"))
            .unwrap_err();
        assert!(error.contains("--path-root"), "{error}");
    }
}
