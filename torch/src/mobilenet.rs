//! MobileNetV2's feature layers in libtorch (tch), with torchvision's parameter
//! names: the teacher of the gradient-trained families, loaded from the ImageNet checkpoint the
//! project already reads (no download), or a student of the same architecture trained from
//! scratch. It computes what the OpenVINO backbone computes (`inspectflow::backbone::mobilenet_v2`):
//! ImageNet normalisation of RGB in [0, 1] inside, outputs after `features.6` (stride 8, 32
//! channels) and `features.13` (stride 16, 96 channels). Because the names match torchvision's,
//! a trained student's weights can be written as IR by the same code as the backbone's.

use std::collections::BTreeMap;

use tch::nn::{self, Module, ModuleT};
use tch::{Device, Tensor};

use inspectflow::backbone::torch_legacy::CheckpointTensor;

use super::layers::imagenet_normalised;

/// `(expansion, output channels, repeats, first stride)` of the stages up to `features.13`.
const STAGES: [(i64, i64, usize, i64); 5] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
];
/// Block whose output is the stride-8 map.
const STRIDE_8_BLOCK: usize = 6;
/// Block whose output is the stride-16 map (the last one built).
const STRIDE_16_BLOCK: usize = 13;

/// A convolution without bias followed by BatchNorm.
#[derive(Debug)]
struct ConvBn {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
}

impl ConvBn {
    fn new(
        conv: nn::Path,
        bn: nn::Path,
        channels: (i64, i64),
        kernel: i64,
        stride: i64,
        groups: i64,
    ) -> Self {
        let config = nn::ConvConfig {
            stride,
            padding: kernel / 2,
            groups,
            bias: false,
            ..Default::default()
        };
        Self {
            conv: nn::conv2d(conv, channels.0, channels.1, kernel, config),
            bn: nn::batch_norm2d(bn, channels.1, Default::default()),
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.bn.forward_t(&self.conv.forward(x), train)
    }
}

/// One inverted residual block.
#[derive(Debug)]
struct Block {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    residual: bool,
}

impl Block {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut y = match &self.expand {
            Some(expand) => expand.forward_t(x, train).clamp(0.0, 6.0),
            None => x.shallow_clone(),
        };
        y = self.depthwise.forward_t(&y, train).clamp(0.0, 6.0);
        y = self.project.forward_t(&y, train);
        if self.residual { y + x } else { y }
    }
}

/// MobileNetV2's `features.0` to `features.13`.
#[derive(Debug)]
pub struct MobileNetFeatures {
    stem: ConvBn,
    blocks: Vec<Block>,
}

impl MobileNetFeatures {
    /// The layers under `root` (randomly initialised), named as torchvision names them.
    pub fn new(root: &nn::Path) -> Self {
        let features = root / "features";
        let stem = ConvBn::new(&features / 0 / 0, &features / 0 / 1, (3, 32), 3, 2, 1);
        let mut blocks = Vec::new();
        let mut channels = 32;
        let mut index = 1;
        for (expansion, out, repeats, first_stride) in STAGES {
            for repeat in 0..repeats {
                let stride = if repeat == 0 { first_stride } else { 1 };
                let conv = &features / index / "conv";
                let hidden = channels * expansion;
                let (expand, layer) = if expansion == 1 {
                    (None, 0)
                } else {
                    let expand =
                        ConvBn::new(&conv / 0 / 0, &conv / 0 / 1, (channels, hidden), 1, 1, 1);
                    (Some(expand), 1)
                };
                let depthwise = ConvBn::new(
                    &conv / layer / 0,
                    &conv / layer / 1,
                    (hidden, hidden),
                    3,
                    stride,
                    hidden,
                );
                let project = ConvBn::new(
                    &conv / (layer + 1),
                    &conv / (layer + 2),
                    (hidden, out),
                    1,
                    1,
                    1,
                );
                blocks.push(Block {
                    expand,
                    depthwise,
                    project,
                    residual: stride == 1 && channels == out,
                });
                channels = out;
                index += 1;
            }
        }
        debug_assert_eq!(index - 1, STRIDE_16_BLOCK);
        Self { stem, blocks }
    }

    /// The stride-8 and stride-16 features of `images` (`[n, 3, h, w]`, RGB in [0, 1]); `train`
    /// uses batch statistics in BatchNorm (and updates the running ones).
    pub fn forward_t(&self, images: &Tensor, train: bool) -> (Tensor, Tensor) {
        let mut x = self
            .stem
            .forward_t(&imagenet_normalised(images), train)
            .clamp(0.0, 6.0);
        let mut stride_8 = None;
        for (offset, block) in self.blocks.iter().enumerate() {
            x = block.forward_t(&x, train);
            if offset + 1 == STRIDE_8_BLOCK {
                stride_8 = Some(x.shallow_clone());
            }
        }
        (stride_8.unwrap_or_else(|| x.shallow_clone()), x)
    }
}

/// Copies a checkpoint's tensors into every variable of `store` (parameters and BatchNorm
/// statistics) by name; errors name the variable that is missing or has another shape.
/// Checkpoint entries the store has no variable for (the classifier, counters) are ignored.
pub fn load_checkpoint(
    store: &mut nn::VarStore,
    tensors: &BTreeMap<String, CheckpointTensor>,
    checkpoint: &str,
) -> Result<(), String> {
    let variables = store.variables();
    tch::no_grad(|| {
        for (name, mut variable) in variables {
            let source = tensors
                .get(&name)
                .ok_or_else(|| format!("checkpoint {checkpoint}: missing parameter '{name}'"))?;
            let shape: Vec<i64> = source.shape.iter().map(|&d| d as i64).collect();
            if variable.size() != shape {
                return Err(format!(
                    "checkpoint {checkpoint}: parameter '{name}' has shape {:?}, the network \
                     needs {:?}",
                    source.shape,
                    variable.size()
                ));
            }
            variable.copy_(&Tensor::from_slice(&source.data).view(shape.as_slice()));
        }
        Ok(())
    })
}

/// The ImageNet-trained MobileNetV2 features on `device`, frozen: the teacher.
pub fn teacher(device: Device) -> Result<(nn::VarStore, MobileNetFeatures), String> {
    let backbone = inspectflow::backbone::Backbone::MobilenetV2;
    let checkpoint = backbone.locate_weights().map_err(|e| e.to_string())?;
    let tensors = inspectflow::backbone::torch_legacy::read_state_dict(&checkpoint)
        .map_err(|e| e.to_string())?;
    let mut store = nn::VarStore::new(device);
    let network = MobileNetFeatures::new(&store.root());
    load_checkpoint(&mut store, &tensors, &checkpoint.display().to_string())?;
    store.freeze();
    Ok((store, network))
}
