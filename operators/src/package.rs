//! Model packages: a directory holding `manifest.json` and one OpenVINO IR (`model.xml` +
//! `model.bin`) whose outputs are the anomaly map (`anomaly_map`, `[1, 1, H, W]`, raw distances
//! at the input resolution) and the image score (`pred_score`, `[1]`), so inference is one
//! OpenVINO call. The manifest carries what post-processing needs (input size, normalisation
//! statistics, threshold) and provenance. Packages are written to a temporary directory and
//! renamed into place: a failed or interrupted export leaves nothing half-written.
//!
//! The package is the contract between training (the engine's `train` module writes packages)
//! and serving (the `infer.openvino` and `anomaly` operators read them).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Current manifest format.
pub const FORMAT_VERSION: u32 = 1;
/// Manifest file name inside a package.
pub const MANIFEST_FILE: &str = "manifest.json";
/// IR file name inside a package.
pub const MODEL_FILE: &str = "model.xml";

/// Min-max normalisation: raw scores map to `(raw - threshold) / (max - min) + 0.5`, clipped to
/// [0, 1], so the decision threshold sits at 0.5 (anomalib's convention).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    /// Raw score at the decision threshold.
    pub threshold: f32,
    /// Smallest raw value seen in calibration.
    pub min: f32,
    /// Largest raw value seen in calibration (or the spread's upper end).
    pub max: f32,
    /// Raw anomaly-map value from which a pixel is anomalous, when calibrated apart from the
    /// image threshold (packages before it have none: the image threshold serves both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pixel_threshold: Option<f32>,
}

impl Normalization {
    /// A raw score or map value in [0, 1], 0.5 at the threshold.
    pub fn apply(&self, raw: f32) -> f32 {
        let spread = (self.max - self.min).max(f32::EPSILON);
        ((raw - self.threshold) / spread + 0.5).clamp(0.0, 1.0)
    }

    /// An anomaly-map value in [0, 1], 0.5 at the pixel threshold (the image threshold when the
    /// package has no pixel threshold of its own).
    pub fn apply_map(&self, raw: f32) -> f32 {
        let spread = (self.max - self.min).max(f32::EPSILON);
        let threshold = self.pixel_threshold.unwrap_or(self.threshold);
        ((raw - threshold) / spread + 0.5).clamp(0.0, 1.0)
    }
}

/// Where a model came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// inspectflow version that trained it.
    pub inspectflow_version: String,
    /// Unix time of the export, in milliseconds.
    pub created_unix_ms: u64,
    /// Images the model was fitted on.
    pub training_images: usize,
    /// Images used for calibration.
    pub calibration_images: usize,
    /// Random seed.
    pub seed: u64,
    /// Dataset snapshot id, when trained from a snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_snapshot: Option<String>,
}

/// Milliseconds since the Unix epoch now: a package's `created_unix_ms`.
pub fn unix_millis_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The manifest of a model package.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version.
    pub format_version: u32,
    /// Model family (`padim`).
    pub architecture: String,
    /// Backbone name (`mobilenet_v2`, `efficientnet_lite0`).
    pub backbone: String,
    /// Square input size in pixels; the IR takes RGB in [0, 1], NCHW.
    pub input_size: usize,
    /// The IR file, relative to the package.
    pub model_file: String,
    /// Normalisation of image scores and map values.
    pub normalization: Normalization,
    /// Decision threshold on normalised scores (0.5 unless a user moved it).
    pub threshold: f32,
    /// Evaluation results, free form (filled by training runs).
    pub metrics: serde_json::Value,
    /// Origin of the model.
    pub provenance: Provenance,
    /// Per-channel normalisation the IR expects on its RGB [0, 1] input; absent: the IR
    /// normalises inside (inspectflow's own packages). Imported models (anomalib's exports)
    /// carry their training transform's mean and standard deviation here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_normalization: Option<InputNormalization>,
}

/// Mean and standard deviation per RGB channel, on values in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct InputNormalization {
    /// Subtracted first.
    pub mean: [f32; 3],
    /// Divided by next.
    pub std: [f32; 3],
}

/// The `preprocess` parameters a model with this input takes: bilinear resize to the square
/// input size, RGB in [0, 1], then `input`'s mean and standard deviation when given. Training,
/// prediction and assembled pipelines all take them from here.
pub fn preprocess_params(
    input_size: usize,
    input: Option<&InputNormalization>,
) -> serde_json::Value {
    let mut params =
        serde_json::json!({"width": input_size, "height": input_size, "resize": "bilinear"});
    if let Some(input) = input {
        params["mean"] = serde_json::json!(input.mean);
        params["std"] = serde_json::json!(input.std);
    }
    params
}

impl Manifest {
    /// The `preprocess` parameters this package's model takes.
    pub fn preprocess_params(&self) -> serde_json::Value {
        preprocess_params(self.input_size, self.input_normalization.as_ref())
    }
}

/// A package could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// I/O with the path involved.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The manifest is not valid.
    #[error("{path}: invalid manifest: {message}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> PackageError {
    let context = context.into();
    move |source| PackageError::Io { context, source }
}

/// A model package on disk.
#[derive(Debug, Clone)]
pub struct ModelPackage {
    /// The package directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

/// The largest manifest read (they are a few kilobytes).
const MAX_MANIFEST_BYTES: u64 = 16 << 20;

impl ModelPackage {
    /// Reads and checks a package.
    pub fn open(dir: &Path) -> Result<Self, PackageError> {
        let path = dir.join(MANIFEST_FILE);
        let too_big = std::fs::metadata(&path).is_ok_and(|m| m.len() > MAX_MANIFEST_BYTES);
        if too_big {
            return Err(PackageError::Manifest {
                path,
                message: format!("larger than {MAX_MANIFEST_BYTES} bytes"),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(io(format!(
            "{} is not a model package (cannot read {MANIFEST_FILE})",
            dir.display()
        )))?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|e| PackageError::Manifest {
                path: path.clone(),
                message: e.to_string(),
            })?;
        if manifest.format_version != FORMAT_VERSION {
            return Err(PackageError::Manifest {
                path,
                message: format!(
                    "format version {} is not supported (this inspectflow reads {FORMAT_VERSION})",
                    manifest.format_version
                ),
            });
        }
        // The network lies in the package: a plain file name, never a path out of it.
        let plain = Path::new(&manifest.model_file)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if manifest.model_file.is_empty() || !plain {
            return Err(PackageError::Manifest {
                path,
                message: format!(
                    "model_file {:?} must name a file inside the package",
                    manifest.model_file
                ),
            });
        }
        let model = dir.join(&manifest.model_file);
        if !model.is_file() || !model.with_extension("bin").is_file() {
            return Err(PackageError::Manifest {
                path,
                message: format!("model file {} or its .bin is missing", model.display()),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// The package's id: its directory's name (canonicalised, so `.` and `models/demo/` give
    /// the real name).
    pub fn id(&self) -> String {
        let dir = self.dir.canonicalize().unwrap_or_else(|_| self.dir.clone());
        dir.file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string())
    }

    /// The IR file.
    pub fn model_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.model_file)
    }

    /// Writes a package to `dir` (which must not exist yet) with `write_model` filling in the IR:
    /// everything goes to a hidden sibling directory first, renamed into place at the end.
    pub fn create(
        dir: &Path,
        manifest: &Manifest,
        write_model: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> Result<Self, PackageError> {
        if dir.exists() {
            return Err(PackageError::Io {
                context: format!("cannot create model package {}", dir.display()),
                source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "it already exists"),
            });
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let staging = dir.with_file_name(format!(".{name}.partial"));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(io(format!("creating {}", staging.display())))?;
        let result = (|| {
            write_model(&staging.join(&manifest.model_file))
                .map_err(io(format!("writing the model into {}", staging.display())))?;
            let json =
                serde_json::to_string_pretty(manifest).map_err(|e| PackageError::Manifest {
                    path: staging.join(MANIFEST_FILE),
                    message: e.to_string(),
                })?;
            std::fs::write(staging.join(MANIFEST_FILE), json + "\n")
                .map_err(io("writing the manifest"))?;
            std::fs::rename(&staging, dir)
                .map_err(io(format!("moving the package to {}", dir.display())))
        })();
        if let Err(error) = result {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(error);
        }
        Self::open(dir)
    }
}
