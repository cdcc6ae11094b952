//! Path roots: the folders a graph may name in file and folder parameters (video files, image
//! folders, result folders, models, certificates). Anything outside them is refused, so an API
//! client (or a graph file run with `--path-root`) cannot make inspectflow read or write
//! arbitrary files. The server's data directory is always a root; more come from `--path-root`.
//!
//! Operators declare their file parameters in their schemas (`format: path`, see
//! `inspectflow_operators::params`), and [`PathRoots::confine`] checks every one of every node.
//! Paths are compared after links are resolved, the way the operating system will follow them.
//!
//! The server's data directory is a root of its own kind: graphs may read the model packages in
//! its `models/` folder and nothing else of it, and a sink may never write into it (its database,
//! other projects' media and models), not even under a `--path-root` that holds it.

use std::path::{Component, Path, PathBuf};

use inspectflow_operators::{OperatorDescriptor, OperatorKind};
use serde_json::Value;

use crate::graph::{GraphError, GraphErrors, ValidatedGraph};

/// What an operator does with a file parameter: sinks write theirs, every other operator reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The file or folder is read (a video, a model, a certificate).
    Read,
    /// Files are written there (a result folder, a recording).
    Write,
}

impl Access {
    /// How operators of `kind` use their file parameters.
    pub fn of(kind: OperatorKind) -> Self {
        match kind {
            OperatorKind::Sink => Self::Write,
            OperatorKind::Source | OperatorKind::Transform => Self::Read,
        }
    }
}

/// The allowed folders, absolute.
#[derive(Debug, Clone)]
pub struct PathRoots {
    roots: Vec<PathBuf>,
    /// The server's data directory, when serving (see the module's documentation).
    store: Option<PathBuf>,
}

impl PathRoots {
    /// Roots from folders (made absolute against the working directory).
    pub fn new(roots: &[PathBuf]) -> Self {
        Self {
            roots: roots
                .iter()
                .map(|root| lexically_clean(&absolute(root)))
                .collect(),
            store: None,
        }
    }

    /// The server's roots: `roots`, and the model packages of the data directory `data_dir`
    /// to read.
    pub fn for_server(data_dir: &Path, roots: &[PathBuf]) -> Self {
        Self {
            store: Some(lexically_clean(&absolute(data_dir))),
            ..Self::new(roots)
        }
    }

    /// Whether `path`, used for `access`, lies under a root once every link in it is followed:
    /// the longest prefix that exists is resolved by the operating system (so `link/..` goes
    /// where the link goes), and only the part that does not exist yet is cleaned up
    /// lexically.
    pub fn check(&self, path: &Path, access: Access) -> Result<(), String> {
        let outside = || {
            format!(
                "{} is outside the path roots ({}); start the server with --path-root to allow it",
                path.display(),
                self.roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        // The operating system opens no longer path (PATH_MAX), and resolving checks every
        // prefix of it: a bound keeps that work small.
        if path.as_os_str().len() > MAX_PATH_BYTES {
            return Err(format!(
                "a path of {} bytes; at most {MAX_PATH_BYTES} are allowed",
                path.as_os_str().len()
            ));
        }
        let resolved =
            resolve(&absolute(path)).map_err(|reason| format!("{}: {reason}", path.display()))?;
        if let Some(store) = self.store.as_deref().and_then(|s| resolve(s).ok())
            && resolved.starts_with(&store)
        {
            return if access == Access::Read && resolved.starts_with(store.join("models")) {
                Ok(())
            } else {
                Err(format!(
                    "{} lies in the server's data directory {}, where graphs may only read \
                     model packages (models/)",
                    path.display(),
                    store.display()
                ))
            };
        }
        let inside = self
            .roots
            .iter()
            .any(|root| resolve(root).is_ok_and(|root| resolved.starts_with(root)));
        if inside { Ok(()) } else { Err(outside()) }
    }

    /// Every file and folder parameter of `params` of `descriptor` that lies outside the roots:
    /// the parameter (`tls.ca_file`, `paths[2]`) and why.
    pub fn outside(
        &self,
        descriptor: &OperatorDescriptor,
        params: &Value,
    ) -> Vec<(String, String)> {
        let access = Access::of(descriptor.kind);
        descriptor
            .file_parameters(params)
            .into_iter()
            .filter_map(|(field, path)| {
                self.check(Path::new(path), access)
                    .err()
                    .map(|why| (field, why))
            })
            .collect()
    }

    /// Checks every file and folder parameter of every node of `graph`, reporting each one
    /// outside the roots with its node and field.
    pub fn confine(&self, graph: &ValidatedGraph) -> Result<(), GraphErrors> {
        let mut errors = Vec::new();
        for node in &graph.nodes {
            for (field, message) in self.outside(&node.descriptor, &node.params) {
                errors.push(GraphError {
                    node: Some(node.id.to_string()),
                    field: Some(format!("params.{field}")),
                    ..GraphError::in_file(&graph.file, message)
                });
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(GraphErrors(errors))
        }
    }
}

/// The longest path checked against the roots, in bytes (Linux's PATH_MAX).
const MAX_PATH_BYTES: usize = 4096;

/// `path` joined to the working directory when relative (nothing else changed).
fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    }
}

/// `path` without `.` and `..` components, removed lexically.
fn lexically_clean(path: &Path) -> PathBuf {
    let mut clean = PathBuf::new();
    for component in path.components() {
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

/// Where an absolute `path` leads: the longest existing prefix canonicalised by the operating
/// system (links followed, then `..`), with the rest appended and cleaned lexically. A link that
/// leads nowhere (dangling) is refused: whatever creates it later decides where it points.
fn resolve(path: &Path) -> Result<PathBuf, String> {
    let components: Vec<Component> = path.components().collect();
    for split in (1..=components.len()).rev() {
        let prefix: PathBuf = components[..split].iter().collect();
        let Ok(canonical) = prefix.canonicalize() else {
            continue;
        };
        let rest = &components[split..];
        if let Some(next) = rest.first() {
            let next_path = prefix.join(next);
            if next_path
                .symlink_metadata()
                .is_ok_and(|meta| meta.file_type().is_symlink())
            {
                return Err(format!(
                    "{} is a link that leads nowhere",
                    next_path.display()
                ));
            }
        }
        let mut resolved = canonical;
        for component in rest {
            match component {
                Component::ParentDir => {
                    resolved.pop();
                }
                Component::Normal(name) => resolved.push(name),
                _ => {}
            }
        }
        return Ok(resolved);
    }
    Ok(lexically_clean(path))
}

#[cfg(test)]
mod tests {
    use super::{Access, PathRoots};
    use std::path::Path;

    #[test]
    fn paths_under_a_root_pass_and_others_and_escapes_do_not() {
        let dir = tempfile::tempdir().expect("temp dir");
        let roots = PathRoots::new(&[dir.path().join("media")]);
        assert!(
            roots
                .check(&dir.path().join("media/line1/clip.mp4"), Access::Read)
                .is_ok()
        );
        assert!(
            roots
                .check(&dir.path().join("media/../secrets"), Access::Read)
                .is_err()
        );
        assert!(roots.check(Path::new("/etc/passwd"), Access::Read).is_err());
        std::fs::create_dir_all(dir.path().join("media")).expect("mkdir");
        std::os::unix::fs::symlink("/etc", dir.path().join("media/etc")).expect("link");
        let error = roots
            .check(&dir.path().join("media/etc/passwd"), Access::Read)
            .unwrap_err();
        assert!(error.contains("--path-root"), "{error}");
        // A path too long to open is refused before its prefixes are resolved.
        let long = dir.path().join("media").join("a/".repeat(300_000));
        let error = roots.check(&long, Access::Read).unwrap_err();
        assert!(error.contains("at most 4096"), "{error}");
    }

    #[test]
    fn a_link_followed_by_dot_dot_goes_where_the_link_goes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("root");
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir_all(root.join("a/b")).expect("mkdir");
        std::fs::create_dir_all(elsewhere.join("x/y")).expect("mkdir");
        std::fs::write(elsewhere.join("secret.mp4"), b"x").expect("write");
        std::os::unix::fs::symlink(elsewhere.join("x/y"), root.join("a/b/lnk")).expect("link");
        let roots = PathRoots::new(std::slice::from_ref(&root));
        // Lexically this is root/a/secret.mp4; the system opens elsewhere/secret.mp4.
        let escape = root.join("a/b/lnk/../../secret.mp4");
        assert!(
            std::fs::metadata(&escape).is_ok(),
            "the escape path opens a file"
        );
        assert!(roots.check(&escape, Access::Read).is_err());
        // The same through a path that does not exist yet (a sink's output file).
        assert!(
            roots
                .check(&root.join("a/b/lnk/../../new/out.mp4"), Access::Read)
                .is_err()
        );
        // Links that stay inside are fine.
        std::os::unix::fs::symlink(root.join("a"), root.join("inside")).expect("link");
        assert!(
            roots
                .check(&root.join("inside/b/file.png"), Access::Read)
                .is_ok()
        );
        // A dangling link is refused: its target could be created anywhere.
        std::os::unix::fs::symlink(dir.path().join("nowhere"), root.join("dangling"))
            .expect("link");
        assert!(roots.check(&root.join("dangling"), Access::Read).is_err());
        assert!(
            roots
                .check(&root.join("dangling/out"), Access::Read)
                .is_err()
        );
    }

    #[test]
    fn the_data_directory_gives_graphs_its_model_packages_to_read_and_nothing_else() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("models/m1")).expect("mkdir");
        std::fs::create_dir_all(data.join("projects/p/media")).expect("mkdir");
        std::fs::write(data.join("inspectflow.redb"), b"db").expect("write");
        // A --path-root that holds the data directory does not open it.
        let roots = PathRoots::for_server(&data, std::slice::from_ref(&dir.path().to_path_buf()));
        let model = data.join("models/m1/model.xml");
        assert!(roots.check(&model, Access::Read).is_ok());
        let error = roots.check(&model, Access::Write).unwrap_err();
        assert!(error.contains("only read model packages"), "{error}");
        for path in [
            data.clone(),
            data.join("inspectflow.redb"),
            data.join("projects/p/media"),
            data.join("models/../projects/p/media/x.png"),
        ] {
            assert!(
                roots.check(&path, Access::Read).is_err(),
                "{}",
                path.display()
            );
            assert!(
                roots.check(&path, Access::Write).is_err(),
                "{}",
                path.display()
            );
        }
        // A link from a root into the data directory is followed, and refused.
        std::os::unix::fs::symlink(&data, dir.path().join("door")).expect("link");
        assert!(
            roots
                .check(&dir.path().join("door/projects"), Access::Write)
                .is_err()
        );
        // Elsewhere under the roots, sinks write.
        assert!(
            roots
                .check(&dir.path().join("results"), Access::Write)
                .is_ok()
        );
    }
}
