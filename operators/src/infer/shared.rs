//! One compiled model per model file and compile settings in the process.
//!
//! Every `infer.openvino` node that names the same file (unchanged since it was compiled) with the
//! same device and compile settings shares one compiled model, whether the nodes are in one
//! pipeline (several cameras, each with its own chain) or in several pipelines: the weights and
//! OpenVINO's per-stream buffers are in memory once, and each node only adds its own infer
//! requests. OpenVINO runs the requests of all of them on the model's streams. The model is freed
//! when the last node using it is dropped.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::SystemTime;

use super::model::{CompileOptions, LoadedModel, ModelError};

/// What makes two loads the same model: the file (by its real path, size and modification time,
/// so a re-exported model is compiled afresh) and the compile settings.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ModelKey {
    path: PathBuf,
    files: Vec<(u64, Option<SystemTime>)>,
    options: CompileOptions,
}

impl ModelKey {
    fn of(path: &Path, options: &CompileOptions) -> Result<Self, ModelError> {
        let real = path
            .canonicalize()
            .map_err(|_| ModelError::Missing(path.to_path_buf()))?;
        let weights = real.with_extension("bin");
        let mut files = Vec::with_capacity(2);
        for file in std::iter::once(&real).chain(
            real.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("xml"))
                .then_some(&weights),
        ) {
            // A missing weights file is reported by the load itself.
            let stamp = std::fs::metadata(file)
                .map(|m| (m.len(), m.modified().ok()))
                .unwrap_or((0, None));
            files.push(stamp);
        }
        Ok(Self {
            path: real,
            files,
            options: options.clone(),
        })
    }
}

/// The compiled models in memory. A handful at most, so a list.
static MODELS: Mutex<Vec<(ModelKey, Weak<LoadedModel>)>> = Mutex::new(Vec::new());

/// The compiled model for `path` with `options`: the one already in memory when another node
/// holds it, compiled now otherwise. Compilation happens under the table's lock, so two pipelines
/// starting together with the same model compile it once.
pub fn load(path: &Path, options: &CompileOptions) -> Result<Arc<LoadedModel>, ModelError> {
    let key = ModelKey::of(path, options)?;
    let mut models = MODELS.lock().unwrap_or_else(PoisonError::into_inner);
    models.retain(|(_, model)| model.strong_count() > 0);
    if let Some(model) = models
        .iter()
        .filter(|(known, _)| known == &key)
        .find_map(|(_, model)| model.upgrade())
    {
        return Ok(model);
    }
    let model = Arc::new(LoadedModel::load(path, options)?);
    models.push((key, Arc::downgrade(&model)));
    Ok(model)
}

/// A compiled model held in memory and how many nodes use it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InMemory {
    /// The model file (its real path).
    pub path: PathBuf,
    /// The device it is compiled for.
    pub device: String,
    /// Nodes holding it.
    pub users: usize,
}

/// Every compiled model in memory now.
pub fn in_memory() -> Vec<InMemory> {
    let models = MODELS.lock().unwrap_or_else(PoisonError::into_inner);
    models
        .iter()
        .filter_map(|(key, model)| {
            let users = model.strong_count();
            (users > 0).then(|| InMemory {
                path: key.path.clone(),
                device: key.options.device.clone(),
                users,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_reported_by_name() {
        let missing = Path::new("/nonexistent/model.xml");
        match load(missing, &CompileOptions::default()) {
            Err(ModelError::Missing(path)) => assert_eq!(path, missing),
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("a missing file loaded"),
        }
    }

    #[test]
    fn a_rewritten_file_is_a_different_model() {
        let dir = tempfile::tempdir().expect("temp dir");
        let xml = dir.path().join("m.xml");
        std::fs::write(&xml, "<net/>").expect("write");
        let first = ModelKey::of(&xml, &CompileOptions::default()).expect("key");
        assert_eq!(
            first,
            ModelKey::of(&xml, &CompileOptions::default()).expect("key")
        );
        std::fs::write(&xml, "<net version='11'/>").expect("rewrite");
        assert_ne!(
            first,
            ModelKey::of(&xml, &CompileOptions::default()).expect("key")
        );
        let other_device = CompileOptions {
            device: "GPU".into(),
            ..CompileOptions::default()
        };
        assert_ne!(first.options, other_device);
    }
}
