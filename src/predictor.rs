//! Scoring single images with a model package outside a pipeline: `inspectflow predict` and the
//! API's `:predict` action. It chains the same pieces a camera pipeline does (preprocess,
//! OpenVINO inference, the anomaly post-processing, the heatmap overlay), so a verdict here is
//! the verdict a pipeline gives for the same image.

use std::path::Path;

use crate::operators::BufferPool;
use crate::operators::Frame;
use crate::operators::infer::model::{CompileOptions, LoadedModel};
use crate::operators::package::ModelPackage;
use crate::operators::packet::{ModelOutput, Prediction};
use crate::operators::transform::anomaly::AnomalyPostprocess;
use crate::operators::transform::heatmap::{HeatmapParams, OverlayRenderer};
use crate::operators::transform::preprocess::Preprocess;

/// A compiled model package with its pre- and post-processing.
pub struct Predictor {
    model: LoadedModel,
    preprocess: Preprocess,
    postprocess: AnomalyPostprocess,
    outputs: BufferPool<f32>,
    overlays: OverlayRenderer,
    frames: BufferPool<u8>,
    /// The model's input values, written from each tensor (reused).
    input: Vec<f32>,
}

impl Predictor {
    /// Opens and compiles the package in `dir`; `threshold` (0-1) overrides the package's.
    pub fn load(dir: &Path, threshold: Option<f32>) -> Result<Self, String> {
        let package = ModelPackage::open(dir).map_err(|e| e.to_string())?;
        let manifest = &package.manifest;
        let threshold = threshold.unwrap_or(manifest.threshold);
        if !(0.0..=1.0).contains(&threshold) {
            return Err(format!("threshold {threshold} is outside 0-1"));
        }
        let model = LoadedModel::load(&package.model_path(), &CompileOptions::default())
            .map_err(|e| e.to_string())?;
        let preprocess = crate::train::preprocessor(manifest).map_err(|e| e.to_string())?;
        let postprocess =
            AnomalyPostprocess::new(&package.id(), manifest.normalization, threshold, 0.0);
        Ok(Self {
            model,
            preprocess,
            postprocess,
            outputs: BufferPool::new(8),
            overlays: OverlayRenderer::new(4),
            frames: BufferPool::new(4),
            input: Vec::new(),
        })
    }

    /// The pool decoded frames should come from (it recycles their buffers).
    pub fn frame_pool(&self) -> &BufferPool<u8> {
        &self.frames
    }

    /// The verdict for one frame.
    pub fn score(&mut self, frame: &Frame) -> Result<Prediction, String> {
        let tensor = self
            .preprocess
            .tensor_for(frame)
            .map_err(|e| e.to_string())?;
        self.input.resize(tensor.len(), 0.0);
        tensor.write_to(&mut self.input);
        let outputs: Vec<ModelOutput> = self
            .model
            .infer(&self.input)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|output| {
                let mut values = self.outputs.get(output.values.len());
                values.copy_from_slice(&output.values);
                ModelOutput {
                    name: output.name,
                    shape: output.shape.iter().map(|&d| d.max(0) as usize).collect(),
                    values,
                }
            })
            .collect();
        self.postprocess
            .predict(&outputs)
            .map_err(|e| e.to_string())
    }

    /// `frame` with the heatmap, outline and label drawn over it.
    pub fn overlay(&mut self, frame: &Frame, prediction: &Prediction) -> Result<Frame, String> {
        let params = HeatmapParams {
            alpha: 0.4,
            outline: true,
            label: true,
        };
        self.overlays
            .render(frame, prediction, &params)
            .map_err(|e| e.to_string())
    }
}
