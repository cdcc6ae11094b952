//! `anomaly`: from a model's raw outputs to a verdict. Takes the image score (`pred_score`) and
//! the anomaly map (`anomaly_map`), normalises both with the model package's statistics so that
//! the threshold sits at 0.5, labels the frame, and resizes the map to the frame's resolution.

use std::path::PathBuf;
use std::sync::Arc;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use serde::Deserialize;

use crate::contract::{
    Emitter, OpError, OperatorInstance, OperatorKind, OutputType, PortType, Transform,
};
use crate::package::{ModelPackage, Normalization};
use crate::packet::{ModelOutput, Packet, Prediction};
use crate::pool::BufferPool;
use crate::registry::OperatorDescriptor;

/// Parameters of `anomaly`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AnomalyParams {
    /// The model package directory (its manifest holds the normalisation statistics).
    #[schemars(length(min = 1))]
    pub model: PathBuf,
    /// Normalised score from which a frame is anomalous; the package's threshold when absent.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub threshold: Option<f32>,
}

/// The registry entry.
pub fn descriptor() -> OperatorDescriptor {
    OperatorDescriptor::builder::<AnomalyParams>(
        "anomaly",
        OperatorKind::Transform,
        "Normalises a model's anomaly map and score with the package's statistics, labels the frame and resizes the map to it.",
    )
    .input("in", PortType::Inference)
    .output("out", OutputType::Fixed(PortType::Prediction))
    .build_with(|params, _node_id| Ok(OperatorInstance::Transform(Box::new(Anomaly::new(params)?))))
}

/// The post-processing, usable without a pipeline (the `predict` command uses it).
pub struct AnomalyPostprocess {
    normalization: Normalization,
    threshold: f32,
    resizer: Resizer,
    normalised: Vec<f32>,
    pool: BufferPool<f32>,
}

impl AnomalyPostprocess {
    /// With the statistics of a package and a threshold on normalised scores.
    pub fn new(normalization: Normalization, threshold: f32) -> Self {
        Self {
            normalization,
            threshold,
            resizer: Resizer::new(),
            normalised: Vec::new(),
            pool: BufferPool::new(32),
        }
    }

    /// The verdict for raw outputs, with the map resized to `width` x `height`.
    pub fn predict(
        &mut self,
        outputs: &[ModelOutput],
        width: u32,
        height: u32,
    ) -> Result<Prediction, OpError> {
        let find = |name: &str| outputs.iter().find(|o| o.name == name);
        let map = find("anomaly_map").ok_or_else(|| {
            OpError::UnsupportedInput(
                "the model has no 'anomaly_map' output (is it an anomaly model package?)".into(),
            )
        })?;
        let raw_score = match find("pred_score") {
            Some(score) => score.values.first().copied().unwrap_or(0.0),
            None => map.values.iter().copied().fold(f32::MIN, f32::max),
        };
        let (map_height, map_width) = match map.shape.as_slice() {
            [.., h, w] => (*h as u32, *w as u32),
            _ => {
                return Err(OpError::UnsupportedInput(format!(
                    "anomaly_map has shape {:?}",
                    map.shape
                )));
            }
        };
        self.normalised.clear();
        self.normalised
            .extend(map.values.iter().map(|v| self.normalization.apply(*v)));
        let mut resized = self.pool.get(width as usize * height as usize);
        if (map_width, map_height) == (width, height) {
            resized.copy_from_slice(&self.normalised);
        } else {
            let source = ImageRef::new(
                map_width,
                map_height,
                bytes_of(&self.normalised),
                PixelType::F32,
            )
            .map_err(|e| OpError::Failed(format!("anomaly map: {e}")))?;
            let mut target =
                Image::from_slice_u8(width, height, bytes_of_mut(&mut resized), PixelType::F32)
                    .map_err(|e| OpError::Failed(format!("anomaly map: {e}")))?;
            self.resizer
                .resize(
                    &source,
                    &mut target,
                    &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear)),
                )
                .map_err(|e| OpError::Failed(format!("resizing the anomaly map: {e}")))?;
        }
        let score = self.normalization.apply(raw_score);
        Ok(Prediction {
            raw_score,
            score,
            threshold: self.threshold,
            anomalous: score >= self.threshold,
            map: resized,
            map_width: width,
            map_height: height,
        })
    }
}

fn bytes_of(values: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8; the length is exact.
    unsafe {
        std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
    }
}

fn bytes_of_mut(values: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above; any byte pattern written is a valid f32.
    unsafe {
        std::slice::from_raw_parts_mut(
            values.as_mut_ptr().cast::<u8>(),
            std::mem::size_of_val(values),
        )
    }
}

/// The running operator.
pub struct Anomaly {
    postprocess: AnomalyPostprocess,
}

impl Anomaly {
    /// Reads the package's manifest.
    pub fn new(params: AnomalyParams) -> Result<Self, OpError> {
        let package = ModelPackage::open(&params.model)
            .map_err(|e| OpError::param("model", e.to_string()))?;
        let threshold = params.threshold.unwrap_or(package.manifest.threshold);
        Ok(Self {
            postprocess: AnomalyPostprocess::new(package.manifest.normalization, threshold),
        })
    }
}

impl Transform for Anomaly {
    fn process(&mut self, mut packet: Packet, out: &mut Emitter) -> Result<(), OpError> {
        let outputs = packet.inference.clone().ok_or_else(|| {
            OpError::UnsupportedInput(
                "packet has no model outputs: put `infer.openvino` before `anomaly`".into(),
            )
        })?;
        let layout = packet.frame.layout;
        packet.prediction = Some(Arc::new(self.postprocess.predict(
            &outputs,
            layout.width,
            layout.height,
        )?));
        out.emit(0, packet);
        Ok(())
    }
}
