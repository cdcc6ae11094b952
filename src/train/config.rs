//! The settings of a training run, declared once.
//!
//! [`TrainConfig`] is at the same time the body of `POST /api/projects/{id}/train` (serde, with
//! its JSON Schema from schemars), the flags of `inspectflow train` (clap) and the parameter list
//! of `GET /api/trainable-models` ([`TrainConfig::parameters`]), so their names, defaults and
//! limits cannot drift apart. Limits are declared as schema keywords on the fields and enforced
//! by [`TrainConfig::validate`] through that same schema; the rule that spans two fields (a tile
//! smaller than the input) is the only one written in code.
//!
//! The server hands a job's settings to the training process as a JSON file
//! (`inspectflow train --settings FILE`), and the process reports back with [`TrainEvent`] lines.

use std::sync::LazyLock;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::backbone::Backbone;

/// The model families.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// PaDiM: a Gaussian per feature-map position, Mahalanobis distance; the fastest to run, for
    /// a fixed camera and part.
    Padim,
    /// PatchCore: a coreset memory bank of patch features, nearest-neighbour distance; the most
    /// accurate on every dataset of BENCHMARKS.md, tolerates position changes, sizes its input
    /// to the images (up to 512) to keep small defects. The default.
    #[default]
    Patchcore,
    /// STFPM: a student network trained (libtorch) to reproduce an ImageNet teacher's
    /// features on normal images; where they disagree is anomalous. Trained by the
    /// `inspectflow-torch` helper; serves like the others.
    Stfpm,
    /// Reverse Distillation: a one-class bottleneck and a decoder trained (libtorch) to
    /// reconstruct the teacher's features from their compressed form; cosine distance across
    /// stages. Trained by the `inspectflow-torch` helper.
    #[serde(rename = "reverse_distillation")]
    #[value(name = "reverse_distillation")]
    ReverseDistillation,
    /// EfficientAD: a small patch network distilled from the backbone, a student and an
    /// autoencoder (libtorch); the student-teacher and the student-autoencoder maps,
    /// normalised on validation images and averaged. Trained by the `inspectflow-torch` helper.
    #[serde(rename = "efficient_ad")]
    #[value(name = "efficient_ad")]
    EfficientAd,
}

impl Architecture {
    /// Every family, in the order `/api/trainable-models` lists them.
    pub const ALL: [Architecture; 5] = [
        Architecture::Padim,
        Architecture::Patchcore,
        Architecture::Stfpm,
        Architecture::ReverseDistillation,
        Architecture::EfficientAd,
    ];

    /// Whether training it needs the libtorch helper ([`super::gradient`]).
    pub fn is_gradient_trained(self) -> bool {
        matches!(
            self,
            Architecture::Stfpm | Architecture::ReverseDistillation | Architecture::EfficientAd
        )
    }

    /// The families this installation can train: the gradient-trained ones only when the
    /// libtorch helper is installed.
    pub fn trainable() -> Vec<Architecture> {
        let helper = super::gradient::helper().is_some();
        Self::ALL
            .into_iter()
            .filter(|family| helper || !family.is_gradient_trained())
            .collect()
    }

    /// Lower-case name, as in manifests and requests.
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Padim => "padim",
            Architecture::Patchcore => "patchcore",
            Architecture::Stfpm => "stfpm",
            Architecture::ReverseDistillation => "reverse_distillation",
            Architecture::EfficientAd => "efficient_ad",
        }
    }

    /// One sentence on what the family is good at.
    pub fn description(self) -> &'static str {
        match self {
            Architecture::Padim => {
                "PaDiM: a Gaussian per feature-map position, Mahalanobis distance; the fastest to run, for a fixed camera and part."
            }
            Architecture::Patchcore => {
                "PatchCore: a coreset memory bank of patch features, nearest-neighbour distance; the most accurate on every dataset of BENCHMARKS.md, tolerates position changes, sizes its input to the images (up to 512) to keep small defects."
            }
            Architecture::Stfpm => {
                "STFPM: a student network trained to reproduce an ImageNet teacher's features on normal images (gradient training with libtorch, per-epoch loss); where they disagree is anomalous. MobileNetV2 teacher, no tiling."
            }
            Architecture::ReverseDistillation => {
                "Reverse Distillation: a bottleneck and a decoder trained to reconstruct an ImageNet teacher's features from their compressed form (libtorch, per-epoch loss); cosine distance across stages is the map. MobileNetV2 teacher, no tiling."
            }
            Architecture::EfficientAd => {
                "EfficientAD: a small patch network distilled from the backbone on the training images, a student with the hard-feature loss and an autoencoder (libtorch, per-epoch loss); two maps normalised on validation images. Cheap to serve at high resolution; no tiling."
            }
        }
    }
}

/// The schema keyword that ties a parameter to the families it applies to (absent: all).
const FAMILIES_KEYWORD: &str = "x-families";

const DEFAULT_SEED: u64 = 42;
const DEFAULT_PADIM_CHANNELS: usize = 100;

/// Settings of a training run: the body of `POST /api/projects/{id}/train` (plus its optional
/// display `name`) and the flags of `inspectflow train`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Model family (see `GET /api/trainable-models`).
    #[serde(rename = "model_name", default)]
    #[arg(
        long = "model-name",
        visible_alias = "model",
        value_enum,
        default_value_t
    )]
    pub architecture: Architecture,
    /// Feature extractor.
    #[serde(default = "default_backbone")]
    #[arg(long, value_enum, default_value_t = default_backbone())]
    pub backbone: Backbone,
    /// Square input size in pixels, a multiple of 32; absent: PaDiM 256, PatchCore the training
    /// images' shorter side from 256 to 512, which keeps small defects in big images.
    #[serde(default)]
    #[arg(long, visible_alias = "image-size")]
    #[schemars(range(min = 64, max = 1024), extend("multipleOf" = 32))]
    pub input_size: Option<usize>,
    /// Cut the input into overlapping tiles of this many pixels (a multiple of 32, smaller than
    /// the input size), scored as one batch and stitched back: small defects in big images at
    /// the backbone's own scale. Absent: the whole input at once.
    #[serde(default)]
    #[arg(long)]
    #[schemars(range(min = 64, max = 1024), extend("multipleOf" = 32))]
    pub tile: Option<usize>,
    /// Seed of every random choice (splits, channel subset, coreset start, generated
    /// anomalies); the same seed on the same data gives the same model.
    #[serde(default = "default_seed")]
    #[arg(long, default_value_t = DEFAULT_SEED)]
    pub seed: u64,
    /// PaDiM: channels kept of the concatenated features (a random subset).
    #[serde(default = "default_padim_channels")]
    #[arg(long, default_value_t = DEFAULT_PADIM_CHANNELS)]
    #[schemars(range(min = 1, max = 1000), extend("x-families" = ["padim"]))]
    pub padim_channels: usize,
    /// PatchCore: memory bank rows; absent: 10% of the training patches (the paper's coresets
    /// are 1% to 10%), at most 1024. The head costs about rows x channels multiply-adds per
    /// patch; at 1024 rows serving keeps about 0.8x the bare backbone's throughput.
    #[serde(default)]
    #[arg(long)]
    #[schemars(range(min = 1, max = 100_000), extend("x-families" = ["patchcore"]))]
    pub memory_bank: Option<usize>,
    /// Gradient-trained families: passes over the training images at most (EfficientAD spends
    /// as many again distilling its teacher).
    #[serde(default = "default_epochs")]
    #[arg(long, default_value_t = DEFAULT_EPOCHS)]
    #[schemars(range(min = 1, max = 1000), extend("x-families" = ["stfpm", "reverse_distillation", "efficient_ad"]))]
    pub epochs: usize,
    /// Gradient-trained families: images per optimisation step.
    #[serde(default = "default_batch_size")]
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE)]
    #[schemars(range(min = 1, max = 256), extend("x-families" = ["stfpm", "reverse_distillation", "efficient_ad"]))]
    pub batch_size: usize,
    /// Gradient-trained families: Adam's learning rate.
    #[serde(default = "default_learning_rate")]
    #[arg(long, default_value_t = DEFAULT_LEARNING_RATE)]
    #[schemars(range(min = 0.000001, max = 1.0), extend("x-families" = ["stfpm", "reverse_distillation", "efficient_ad"]))]
    pub learning_rate: f64,
    /// Gradient-trained families: stop after this many epochs without a lower loss on the
    /// validation split's normal images, keeping the best epoch's weights (0: never stop
    /// early; no normal validation images: never stops early).
    #[serde(default = "default_patience")]
    #[arg(long, default_value_t = DEFAULT_PATIENCE)]
    #[schemars(range(min = 0, max = 1000), extend("x-families" = ["stfpm", "reverse_distillation", "efficient_ad"]))]
    pub patience: usize,
    /// OpenVINO device that extracts the features and scores the validation images: `CPU`,
    /// `GPU`, `NPU`, `AUTO` or an indexed name (`GPU.1`); see `GET /api/devices`.
    #[serde(default = "default_device")]
    #[arg(long, default_value = DEFAULT_DEVICE)]
    #[schemars(length(min = 1, max = 64))]
    pub device: String,
}

use crate::operators::infer::model::DEFAULT_DEVICE;

fn default_device() -> String {
    DEFAULT_DEVICE.into()
}
fn default_backbone() -> Backbone {
    Backbone::MobilenetV2
}
fn default_seed() -> u64 {
    DEFAULT_SEED
}
fn default_padim_channels() -> usize {
    DEFAULT_PADIM_CHANNELS
}
const DEFAULT_EPOCHS: usize = 40;
const DEFAULT_BATCH_SIZE: usize = 8;
const DEFAULT_LEARNING_RATE: f64 = 0.001;
const DEFAULT_PATIENCE: usize = 5;
fn default_patience() -> usize {
    DEFAULT_PATIENCE
}
fn default_epochs() -> usize {
    DEFAULT_EPOCHS
}
fn default_batch_size() -> usize {
    DEFAULT_BATCH_SIZE
}
fn default_learning_rate() -> f64 {
    DEFAULT_LEARNING_RATE
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            architecture: Architecture::default(),
            backbone: default_backbone(),
            input_size: None,
            tile: None,
            seed: DEFAULT_SEED,
            padim_channels: DEFAULT_PADIM_CHANNELS,
            memory_bank: None,
            epochs: DEFAULT_EPOCHS,
            batch_size: DEFAULT_BATCH_SIZE,
            learning_rate: DEFAULT_LEARNING_RATE,
            patience: DEFAULT_PATIENCE,
            device: default_device(),
        }
    }
}

/// The JSON Schema of [`TrainConfig`], compiled once.
static SCHEMA: LazyLock<(Value, jsonschema::Validator)> = LazyLock::new(|| {
    let schema = serde_json::to_value(schemars::schema_for!(TrainConfig))
        .unwrap_or_else(|error| panic!("the training settings' schema serializes: {error}"));
    let validator = jsonschema::validator_for(&schema)
        .unwrap_or_else(|error| panic!("the training settings' schema compiles: {error}"));
    (schema, validator)
});

impl TrainConfig {
    /// Settings from a JSON document (the API's body without `name`, or the file of
    /// `inspectflow train --settings`), checked: the error names the first bad field.
    pub fn from_json(document: &Value) -> Result<Self, String> {
        check_against_schema(document)?;
        let config: Self =
            serde_json::from_value(document.clone()).map_err(|error| error.to_string())?;
        config.check_tile()?;
        config.check_family()?;
        Ok(config)
    }

    /// Checks every limit, naming the first field that breaks one.
    pub fn validate(&self) -> Result<(), String> {
        let document = serde_json::to_value(self).map_err(|error| error.to_string())?;
        check_against_schema(&document)?;
        self.check_tile()?;
        self.check_family()
    }

    /// What a family cannot do: the gradient-trained families learn from the MobileNetV2
    /// teacher and take their input whole.
    fn check_family(&self) -> Result<(), String> {
        if !self.architecture.is_gradient_trained() {
            return Ok(());
        }
        let family = self.architecture.name();
        if self.backbone != Backbone::MobilenetV2 {
            return Err(format!(
                "backbone: {family}'s teacher is mobilenet_v2, not {}",
                self.backbone.name()
            ));
        }
        if self.tile.is_some() {
            return Err(format!("tile: {family} does not tile its input"));
        }
        Ok(())
    }

    fn check_tile(&self) -> Result<(), String> {
        match (self.tile, self.input_size) {
            (Some(tile), Some(size)) if tile >= size => Err(format!(
                "tile: {tile} must be smaller than input_size {size}"
            )),
            _ => Ok(()),
        }
    }

    /// The parameters `family` takes, as `GET /api/trainable-models` lists them: each field's
    /// JSON Schema (type, default, limits, description) by its request name, `model_name` left
    /// out.
    pub fn parameters(family: Architecture) -> Map<String, Value> {
        let Some(properties) = SCHEMA.0.get("properties").and_then(Value::as_object) else {
            return Map::new();
        };
        properties
            .iter()
            .filter(|(name, _)| name.as_str() != "model_name")
            .filter(|(_, schema)| {
                schema
                    .get(FAMILIES_KEYWORD)
                    .and_then(Value::as_array)
                    .is_none_or(|families| families.iter().any(|f| f == family.name()))
            })
            .map(|(name, schema)| (name.clone(), inline_references(schema)))
            .collect()
    }
}

/// `schema` with references to shared definitions (the backbone's enum) replaced by the
/// definitions, so a parameter's entry stands alone.
fn inline_references(schema: &Value) -> Value {
    let definitions = SCHEMA.0.get("$defs");
    let mut schema = schema.clone();
    if let Some(object) = schema.as_object_mut()
        && let Some(reference) = object.remove("$ref")
    {
        let name = reference
            .as_str()
            .and_then(|r| r.strip_prefix("#/$defs/"))
            .unwrap_or_default();
        if let Some(Value::Object(definition)) = definitions.and_then(|d| d.get(name)) {
            for (key, value) in definition {
                object.entry(key.clone()).or_insert_with(|| value.clone());
            }
        }
    }
    schema
}

/// The first schema violation of `document`, as `field: what is wrong`.
fn check_against_schema(document: &Value) -> Result<(), String> {
    match SCHEMA.1.iter_errors(document).next() {
        None => Ok(()),
        Some(error) => {
            let field = error.instance_path().to_string();
            let field = field.trim_start_matches('/');
            Err(if field.is_empty() {
                error.to_string()
            } else {
                format!("{field}: {error}")
            })
        }
    }
}

/// What `inspectflow train --progress json` writes to standard error, a JSON object per line;
/// the server's training worker reads them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TrainEvent {
    /// A stage advanced.
    Progress {
        /// `snapshot`, `features`, `fitting`, `calibration` or `export`.
        stage: String,
        /// Of the stage, 0 to 100.
        percent: u8,
    },
    /// A gradient-trained family finished an epoch.
    Epoch(EpochReport),

    /// The run succeeded.
    Finished {
        /// The dataset snapshot it trained on.
        snapshot_id: String,
    },
}

/// What a gradient-trained family's epochs train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainingPhase {
    /// EfficientAD's teacher learning the backbone's features (before `training`).
    Distillation,
    /// The networks that score: STFPM's student, Reverse Distillation's bottleneck and
    /// decoder, EfficientAD's student and autoencoder.
    Training,
}

impl std::fmt::Display for TrainingPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrainingPhase::Distillation => "distillation",
            TrainingPhase::Training => "training",
        })
    }
}

/// One epoch of a gradient-trained family, as the helper reports it and `inspectflow train`
/// passes it on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochReport {
    /// What is being trained.
    pub phase: TrainingPhase,
    /// The epoch, from 1.
    pub epoch: usize,
    /// Epochs at most (training may stop early).
    pub epochs: usize,
    /// Mean training loss over the epoch.
    pub loss: f64,
    /// Mean loss on the validation images, when there are some.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_loss: Option<f64>,
}

impl std::fmt::Display for EpochReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} epoch {}/{}: loss {:.6}",
            self.phase, self.epoch, self.epochs, self.loss
        )?;
        if let Some(validation) = self.validation_loss {
            write!(f, ", validation loss {validation:.6}")?;
        }
        Ok(())
    }
}

impl TrainEvent {
    /// Parses one line; `None` when it is not an event (a log line).
    pub fn parse(line: &str) -> Option<Self> {
        serde_json::from_str(line).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_listed() {
        TrainConfig::default().validate().expect("defaults pass");
        let patchcore = TrainConfig::parameters(Architecture::Patchcore);
        assert!(patchcore.contains_key("memory_bank"));
        assert!(!patchcore.contains_key("padim_channels"));
        assert_eq!(patchcore["seed"]["default"], 42);
        let choices = patchcore["backbone"]["oneOf"].as_array().expect("choices");
        assert!(choices.iter().any(|c| c["const"] == "mobilenet_v2"));
        let padim = TrainConfig::parameters(Architecture::Padim);
        assert!(padim.contains_key("padim_channels"));
        assert!(!padim.contains_key("memory_bank"));
    }

    #[test]
    fn bad_fields_are_named() {
        let error = TrainConfig::from_json(&serde_json::json!({"input_size": 100})).unwrap_err();
        assert!(error.starts_with("input_size:"), "{error}");
        let error = TrainConfig::from_json(&serde_json::json!({"tile": 256, "input_size": 256}))
            .unwrap_err();
        assert!(error.starts_with("tile:"), "{error}");
        let error = TrainConfig::from_json(&serde_json::json!({"neighbours": 3})).unwrap_err();
        assert!(error.contains("neighbours"), "{error}");
        let error = TrainConfig::from_json(&serde_json::json!({"model_name": "x"})).unwrap_err();
        assert!(error.starts_with("model_name:"), "{error}");
    }

    #[test]
    fn hostile_gradient_settings_are_refused_naming_the_field() {
        let refused = |document: Value, field: &str| {
            let error = TrainConfig::from_json(&document).unwrap_err();
            assert!(error.starts_with(&format!("{field}:")), "{error}");
        };
        refused(
            serde_json::json!({"model_name": "efficient_ad", "patience": 5000}),
            "patience",
        );
        refused(
            serde_json::json!({"model_name": "stfpm", "patience": -1}),
            "patience",
        );
        refused(
            serde_json::json!({"model_name": "stfpm", "epochs": 0}),
            "epochs",
        );
        refused(
            serde_json::json!({"model_name": "reverse_distillation", "learning_rate": 1e9}),
            "learning_rate",
        );
        refused(
            serde_json::json!({"model_name": "reverse_distillation", "backbone": "efficientnet_lite0"}),
            "backbone",
        );
        refused(
            serde_json::json!({"model_name": "efficient_ad", "tile": 128, "input_size": 256}),
            "tile",
        );
    }

    #[test]
    fn events_round_trip() {
        let epoch = TrainEvent::Epoch(EpochReport {
            phase: TrainingPhase::Distillation,
            epoch: 2,
            epochs: 40,
            loss: 0.5,
            validation_loss: Some(0.25),
        });
        let line = serde_json::to_string(&epoch).expect("serializes");
        assert!(line.contains(r#""phase":"distillation""#), "{line}");
        assert_eq!(TrainEvent::parse(&line), Some(epoch));
        let event = TrainEvent::Progress {
            stage: "features".into(),
            percent: 40,
        };
        let line = serde_json::to_string(&event).expect("serializes");
        assert_eq!(TrainEvent::parse(&line), Some(event));
        assert_eq!(TrainEvent::parse("dataset: 3 images"), None);
    }
}
