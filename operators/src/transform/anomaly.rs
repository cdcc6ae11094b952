//! `anomaly`: from a model's raw outputs to a verdict. Takes the image score (`pred_score`) and
//! the anomaly map (`anomaly_map`), normalises both with the model package's statistics so that
//! the threshold sits at 0.5 and labels the frame. The map stays at the model's resolution: the
//! heatmap resizes it to the frame row by row as it draws.

use std::path::PathBuf;
use std::sync::Arc;

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
    #[schemars(with = "crate::params::FileParam")]
    pub model: PathBuf,
    /// Normalised score from which a frame is anomalous; the package's threshold when absent.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub threshold: Option<f32>,
    /// Gaussian smoothing of the raw map, sigma in map pixels (0: none). inspectflow's PaDiM
    /// packages smooth inside the model; set this for models that do not.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 64.0))]
    pub smoothing_sigma: f32,
}

/// The registry entry.
pub fn descriptor() -> OperatorDescriptor {
    OperatorDescriptor::builder::<AnomalyParams>(
        "anomaly",
        OperatorKind::Transform,
        "Optionally smooths the raw anomaly map (`smoothing_sigma`; inspectflow's PaDiM packages smooth inside the model), normalises the map and the score with the package's statistics (threshold at 0.5), labels the frame; the map stays at the model's resolution (consumers resize it).",
    )
    .input("in", PortType::Inference)
    .output("out", OutputType::Fixed(PortType::Prediction))
    .replicable()
    .build_with(|params, _context| Ok(OperatorInstance::Transform(Box::new(Anomaly::new(params)?))))
}

/// The post-processing, usable without a pipeline (the `predict` command uses it).
pub struct AnomalyPostprocess {
    model: Arc<str>,
    normalization: Normalization,
    threshold: f32,
    pool: BufferPool<f32>,
    smoothing: Option<GaussianBlur>,
}

/// Separable Gaussian blur with edge pixels repeated beyond the border.
struct GaussianBlur {
    kernel: Vec<f32>,
    scratch: Vec<f32>,
}

impl GaussianBlur {
    /// A kernel of radius `ceil(4 sigma)` (anomalib's size), normalised to sum 1.
    fn new(sigma: f32) -> Self {
        let radius = (4.0 * sigma).ceil().max(1.0) as i64;
        let mut kernel: Vec<f32> = (-radius..=radius)
            .map(|i| (-(i as f32).powi(2) / (2.0 * sigma * sigma)).exp())
            .collect();
        let total: f32 = kernel.iter().sum();
        kernel.iter_mut().for_each(|k| *k /= total);
        Self {
            kernel,
            scratch: Vec::new(),
        }
    }

    /// Blurs a `width` x `height` map in place.
    fn apply(&mut self, values: &mut [f32], width: usize, height: usize) {
        let radius = (self.kernel.len() / 2) as i64;
        self.scratch.clear();
        self.scratch.resize(values.len(), 0.0);
        let clamp = |i: i64, n: usize| i.clamp(0, n as i64 - 1) as usize;
        for y in 0..height {
            for x in 0..width {
                self.scratch[y * width + x] = self
                    .kernel
                    .iter()
                    .enumerate()
                    .map(|(k, weight)| {
                        weight * values[y * width + clamp(x as i64 + k as i64 - radius, width)]
                    })
                    .sum();
            }
        }
        for y in 0..height {
            for x in 0..width {
                values[y * width + x] = self
                    .kernel
                    .iter()
                    .enumerate()
                    .map(|(k, weight)| {
                        weight
                            * self.scratch[clamp(y as i64 + k as i64 - radius, height) * width + x]
                    })
                    .sum();
            }
        }
    }
}

impl AnomalyPostprocess {
    /// For the model package `model` (its id, named in every prediction), with its statistics,
    /// a threshold on normalised scores and an optional smoothing of the raw map (`sigma` in map
    /// pixels, 0 for none).
    pub fn new(
        model: &str,
        normalization: Normalization,
        threshold: f32,
        smoothing_sigma: f32,
    ) -> Self {
        Self {
            model: Arc::from(model),
            normalization,
            threshold,
            pool: BufferPool::new(32),
            smoothing: (smoothing_sigma > 0.0).then(|| GaussianBlur::new(smoothing_sigma)),
        }
    }

    /// The verdict for raw outputs. The normalised map stays at the model's resolution (see
    /// [`crate::map_upsample`] for it at a frame's size).
    pub fn predict(&mut self, outputs: &[ModelOutput]) -> Result<Prediction, OpError> {
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
            [.., h, w] if *h > 0 && *w > 0 && h * w <= map.values.len() => (*h, *w),
            _ => {
                return Err(OpError::UnsupportedInput(format!(
                    "anomaly_map has shape {:?} and {} values",
                    map.shape,
                    map.values.len()
                )));
            }
        };
        let mut normalised = self.pool.get(map_width * map_height);
        normalised.copy_from_slice(&map.values[..map_width * map_height]);
        if let Some(blur) = &mut self.smoothing {
            blur.apply(&mut normalised, map_width, map_height);
        }
        let normalization = self.normalization;
        normalised
            .iter_mut()
            .for_each(|v| *v = normalization.apply_map(*v));
        let score = self.normalization.apply(raw_score);
        Ok(Prediction {
            raw_score,
            score,
            threshold: self.threshold,
            anomalous: score >= self.threshold,
            model: Arc::clone(&self.model),
            map: normalised,
            map_width: map_width as u32,
            map_height: map_height as u32,
        })
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
            postprocess: AnomalyPostprocess::new(
                &package.id(),
                package.manifest.normalization,
                threshold,
                params.smoothing_sigma,
            ),
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
        packet.prediction = Some(Arc::new(self.postprocess.predict(&outputs)?));
        out.emit(0, packet);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(name: &str, shape: Vec<usize>, values: &[f32]) -> ModelOutput {
        let pool = BufferPool::new(1);
        let mut buffer = pool.get(values.len());
        buffer.copy_from_slice(values);
        ModelOutput {
            name: name.into(),
            shape,
            values: buffer,
        }
    }

    #[test]
    fn normalisation_puts_the_threshold_at_one_half() {
        let normalization = Normalization {
            threshold: 10.0,
            min: 2.0,
            max: 18.0,
            pixel_threshold: None,
        };
        assert_eq!(normalization.apply(10.0), 0.5);
        assert_eq!(normalization.apply(14.0), 0.75);
        assert_eq!(normalization.apply(-100.0), 0.0);
        assert_eq!(normalization.apply(100.0), 1.0);
        assert_eq!(normalization.apply_map(10.0), 0.5, "one threshold for both");
        let separate = Normalization {
            pixel_threshold: Some(6.0),
            ..normalization
        };
        assert_eq!(separate.apply(10.0), 0.5);
        assert_eq!(separate.apply_map(6.0), 0.5, "maps by their own threshold");
        assert_eq!(separate.apply_map(10.0), 0.75);
    }

    #[test]
    fn labels_by_the_normalised_score_and_keeps_the_map_at_the_models_size() {
        let normalization = Normalization {
            threshold: 10.0,
            min: 0.0,
            max: 20.0,
            pixel_threshold: None,
        };
        let mut postprocess = AnomalyPostprocess::new("test-model", normalization, 0.5, 0.0);
        let map = output("anomaly_map", vec![1, 1, 2, 2], &[0.0, 10.0, 10.0, 20.0]);
        let score = output("pred_score", vec![1], &[16.0]);
        let prediction = postprocess.predict(&[map, score]).expect("predicts");
        assert!((prediction.score - 0.8).abs() < 1e-6);
        assert!(prediction.anomalous);
        assert_eq!((prediction.map_width, prediction.map_height), (2, 2));
        assert_eq!(&prediction.map[..], &[0.0, 0.5, 0.5, 1.0]);
        let short = output("anomaly_map", vec![1, 1, 4, 4], &[0.0; 8]);
        let Err(error) = postprocess.predict(&[short]) else {
            panic!("a map shorter than its shape was accepted");
        };
        assert!(error.to_string().contains("[1, 1, 4, 4]"), "{error}");
    }

    #[test]
    fn smoothing_spreads_a_peak_and_keeps_its_mass() {
        let mut blur = GaussianBlur::new(1.0);
        let mut values = vec![0.0f32; 81];
        values[40] = 81.0;
        blur.apply(&mut values, 9, 9);
        assert!(values[40] < 81.0 && values[40] > values[41] && values[41] > 0.0);
        assert!((values.iter().sum::<f32>() - 81.0).abs() < 1e-3);
    }
}
