//! Importing a model trained and exported with anomalib (its OpenVINO IR, `model.xml` with
//! `model.bin`, and the `metadata.json` beside it) into an inspectflow model package, so that
//! pipelines, `predict` and the API serve it like a model trained here.
//!
//! - **Outputs.** The IR must have an output named `anomaly_map` (anomalib's name); `pred_score`
//!   is used when present (otherwise the map's maximum is the score). Other outputs
//!   (`pred_label`, `pred_mask`) are ignored: the package's threshold decides.
//! - **Normalisation.** anomalib's min-max normalisation is the package's own
//!   (`(raw - threshold) / (max - min) + 0.5`, clamped to [0, 1]), so `image_threshold`,
//!   `pixel_threshold`, `min` and `max` (or the older `pred_scores.min` / `pred_scores.max`)
//!   become the package's normalisation. Without a metadata file the IR is taken to normalise
//!   itself (anomalib 1.x and later): scores in [0, 1] with the threshold at 0.5.
//! - **Input.** The IR's input must be square RGB NCHW. anomalib normalises the input outside
//!   the IR; the `Normalize` step of the metadata's transform gives the mean and standard
//!   deviation (ImageNet's when the metadata names none), kept in the manifest's
//!   `input_normalization` for the `preprocess` step.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::operators::infer::model::{CompileOptions, LoadedModel};
use crate::operators::package::{
    self, InputNormalization, Manifest, ModelPackage, Normalization, Provenance,
};

/// Largest metadata file read, in bytes.
const MAX_METADATA_BYTES: u64 = 1 << 20;
/// Deepest nesting searched for the transform's `Normalize` step.
const MAX_TRANSFORM_DEPTH: usize = 16;
/// anomalib's default input normalisation (ImageNet's statistics).
const IMAGENET: InputNormalization = InputNormalization {
    mean: [0.485, 0.456, 0.406],
    std: [0.229, 0.224, 0.225],
};

/// Why an export could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The metadata file is missing, too big or not the JSON anomalib writes.
    #[error("{path}: {message}")]
    Metadata {
        /// The metadata file.
        path: PathBuf,
        /// What is wrong, naming the field.
        message: String,
    },
    /// The IR cannot be read or is not an anomaly model anomalib exported.
    #[error("{path}: {message}")]
    Model {
        /// The IR.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The package could not be written.
    #[error(transparent)]
    Package(#[from] package::PackageError),
}

/// Imports the IR at `model_xml` (with `metadata`, anomalib's `metadata.json`) as a package in
/// `out`, which must not exist yet.
pub fn import(
    model_xml: &Path,
    metadata: Option<&Path>,
    out: &Path,
) -> Result<ModelPackage, ImportError> {
    let model_error = |message: String| ImportError::Model {
        path: model_xml.to_path_buf(),
        message,
    };
    let (normalization, input_normalization, task) = match metadata {
        Some(path) => read_metadata(path)?,
        None => (
            Normalization {
                threshold: 0.5,
                min: 0.0,
                max: 1.0,
                pixel_threshold: None,
            },
            None,
            Value::Null,
        ),
    };
    let model = LoadedModel::load(model_xml, &CompileOptions::default())
        .map_err(|e| model_error(e.to_string()))?;
    let input_size = match model.input.shape.as_slice() {
        [1, 3, height, width] if height == width && *height > 0 => *height as usize,
        shape => {
            return Err(model_error(format!(
                "the input must be one square RGB image (1, 3, size, size), not {shape:?}"
            )));
        }
    };
    let names: Vec<&str> = model.outputs.iter().map(|o| o.name.as_str()).collect();
    if !names.contains(&"anomaly_map") {
        return Err(model_error(format!(
            "no output named anomaly_map (anomalib's name); the outputs are {names:?}"
        )));
    }
    let manifest = Manifest {
        format_version: package::FORMAT_VERSION,
        architecture: "anomalib".into(),
        backbone: "unknown".into(),
        input_size,
        model_file: package::MODEL_FILE.into(),
        normalization,
        threshold: 0.5,
        metrics: serde_json::json!({
            "imported_from": "anomalib",
            "source": model_xml.display().to_string(),
            "task": task,
        }),
        provenance: Provenance {
            inspectflow_version: env!("CARGO_PKG_VERSION").into(),
            created_unix_ms: package::unix_millis_now(),
            training_images: 0,
            calibration_images: 0,
            seed: 0,
            dataset_snapshot: None,
        },
        input_normalization: Some(input_normalization.unwrap_or(IMAGENET)),
    };
    let package = ModelPackage::create(out, &manifest, |destination| {
        std::fs::copy(model_xml, destination)?;
        std::fs::copy(
            model_xml.with_extension("bin"),
            destination.with_extension("bin"),
        )?;
        Ok(())
    })?;
    Ok(package)
}

/// The normalisation, the input transform's mean and std (when it names them) and the task.
fn read_metadata(
    path: &Path,
) -> Result<(Normalization, Option<InputNormalization>, Value), ImportError> {
    let error = |message: String| ImportError::Metadata {
        path: path.to_path_buf(),
        message,
    };
    let size = std::fs::metadata(path)
        .map_err(|e| error(format!("cannot read it: {e}")))?
        .len();
    if size > MAX_METADATA_BYTES {
        return Err(error(format!(
            "{size} bytes; a metadata file has at most {MAX_METADATA_BYTES}"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| error(format!("cannot read it: {e}")))?;
    let metadata: Value =
        serde_json::from_str(&text).map_err(|e| error(format!("not JSON: {e}")))?;
    let number = |names: &[&str]| -> Option<f32> {
        names
            .iter()
            .find_map(|name| metadata.get(*name).and_then(Value::as_f64))
            .map(|value| value as f32)
    };
    let threshold = number(&["image_threshold"])
        .ok_or_else(|| error("image_threshold: missing or not a number".into()))?;
    let min = number(&["min", "pred_scores.min"])
        .ok_or_else(|| error("min: missing or not a number (nor pred_scores.min)".into()))?;
    let max = number(&["max", "pred_scores.max"])
        .ok_or_else(|| error("max: missing or not a number (nor pred_scores.max)".into()))?;
    if !(min.is_finite() && max.is_finite() && threshold.is_finite()) || max <= min {
        return Err(error(format!(
            "min {min} and max {max} must be finite with min below max"
        )));
    }
    let normalization = Normalization {
        threshold,
        min,
        max,
        pixel_threshold: number(&["pixel_threshold"]),
    };
    let input = metadata
        .get("transform")
        .and_then(|transform| find_normalize(transform, 0))
        .transpose()
        .map_err(|message| error(format!("transform: {message}")))?;
    let task = metadata.get("task").cloned().unwrap_or(Value::Null);
    Ok((normalization, input, task))
}

/// The mean and std of the first `Normalize` step in an albumentations or torchvision transform
/// serialised as JSON (searched at most [`MAX_TRANSFORM_DEPTH`] levels deep).
fn find_normalize(value: &Value, depth: usize) -> Option<Result<InputNormalization, String>> {
    if depth > MAX_TRANSFORM_DEPTH {
        return None;
    }
    match value {
        Value::Object(object) => {
            let is_normalize = ["__class_fullname__", "class_path", "type"]
                .iter()
                .filter_map(|key| object.get(*key).and_then(Value::as_str))
                .any(|name| name.ends_with("Normalize"));
            if is_normalize {
                let fields = object.get("init_args").unwrap_or(value);
                return Some(channel_triple(fields, "mean").and_then(|mean| {
                    let std = channel_triple(fields, "std")?;
                    if std.iter().any(|s| *s <= 0.0) {
                        return Err(format!("Normalize std {std:?} must be positive"));
                    }
                    Ok(InputNormalization { mean, std })
                }));
            }
            object
                .values()
                .find_map(|child| find_normalize(child, depth + 1))
        }
        Value::Array(items) => items
            .iter()
            .find_map(|child| find_normalize(child, depth + 1)),
        _ => None,
    }
}

fn channel_triple(fields: &Value, name: &str) -> Result<[f32; 3], String> {
    let values: Vec<f32> = fields
        .get(name)
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(Value::as_f64)
                .map(|v| v as f32)
                .collect()
        })
        .unwrap_or_default();
    <[f32; 3]>::try_from(values.as_slice())
        .map_err(|_| format!("Normalize {name} must be three numbers, one per RGB channel"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_normalize_step_is_found_in_an_albumentations_transform() {
        let transform = serde_json::json!({"__version__": "1.3.1", "transform": {
        "__class_fullname__": "Compose", "transforms": [
            {"__class_fullname__": "Resize", "height": 256, "width": 256},
            {"__class_fullname__": "Normalize", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.25], "max_pixel_value": 255.0},
            {"__class_fullname__": "ToTensorV2"}
        ]}});
        let found = find_normalize(&transform, 0)
            .expect("a Normalize step")
            .expect("valid");
        assert_eq!(found.mean, [0.5, 0.4, 0.3]);
        assert_eq!(found.std, [0.2, 0.2, 0.25]);
        let broken =
            serde_json::json!({"__class_fullname__": "Normalize", "mean": [0.5], "std": [1, 1, 1]});
        assert!(find_normalize(&broken, 0).expect("found").is_err());
        let deep = (0..100).fold(serde_json::json!(1), |inner, _| serde_json::json!([inner]));
        assert!(find_normalize(&deep, 0).is_none(), "bounded depth");
    }

    #[test]
    fn hostile_metadata_is_refused_naming_what_is_wrong() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("metadata.json");
        let refused = |text: &[u8]| {
            std::fs::write(&file, text).expect("write");
            match read_metadata(&file) {
                Err(error) => error.to_string(),
                Ok(_) => panic!(
                    "accepted {:?}",
                    String::from_utf8_lossy(&text[..text.len().min(60)])
                ),
            }
        };
        assert!(refused(&vec![b' '; (MAX_METADATA_BYTES + 1) as usize]).contains("at most"));
        assert!(refused(b"{\"image_threshold\": ").contains("not JSON"));
        assert!(
            refused(b"{\"image_threshold\": 1, \"min\": 2, \"max\": 1}").contains("min below max")
        );
        assert!(
            refused(b"{\"image_threshold\": \"high\", \"min\": 0, \"max\": 1}")
                .contains("image_threshold")
        );
    }
}
