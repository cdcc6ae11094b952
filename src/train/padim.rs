//! PaDiM (Defard et al., 2020): a Gaussian per feature-map position over a random subset of
//! backbone channels; the anomaly of a position is the Mahalanobis distance of its feature vector.
//!
//! The embedding (stride-8 features with the stride-16 features resized onto them, then the
//! channel subset) and the distance are both OpenVINO IR, appended to the imported backbone, so
//! fitting and serving run the very same graph and the exported model is one IR with outputs
//! `anomaly_map` (smoothed, at the input resolution) and `pred_score` (its maximum).

use std::path::Path;

use inspectflow_operators::infer::model::{CompileOptions, LoadedModel, ModelError};
use inspectflow_operators::transform::preprocess::{Preprocess, PreprocessParams};
use inspectflow_operators::{Frame, OpError};

use crate::backbone::ir::{IrGraph, Output};
use crate::backbone::{Backbone, BackboneError, Network};

/// Settings of a PaDiM model.
#[derive(Debug, Clone, Copy)]
pub struct PadimConfig {
    /// Feature extractor.
    pub backbone: Backbone,
    /// Square input size in pixels.
    pub input_size: usize,
    /// Channels kept from the concatenated features (PaDiM's random subset).
    pub channels: usize,
    /// Seed of the channel subset.
    pub seed: u64,
}

/// Fitting or running a PaDiM model failed.
#[derive(Debug, thiserror::Error)]
pub enum PadimError {
    /// The backbone could not be built.
    #[error(transparent)]
    Backbone(#[from] BackboneError),
    /// OpenVINO failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// An image could not be preprocessed.
    #[error("preprocessing: {0}")]
    Preprocess(#[from] OpError),
    /// Not enough images, or a wrong setting.
    #[error("{0}")]
    Invalid(String),
    /// The package could not be written.
    #[error(transparent)]
    Package(#[from] inspectflow_operators::package::PackageError),
    /// Writing a temporary file failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The fitted Gaussians.
pub struct PadimStats {
    /// Channels per position.
    pub channels: usize,
    /// Feature map height.
    pub height: usize,
    /// Feature map width.
    pub width: usize,
    /// Means, `[position][channel]`.
    pub mean: Vec<f32>,
    /// Inverse covariances, `[position][channel][channel]`.
    pub inverse_covariance: Vec<f32>,
    /// The channel subset, as indices into the concatenated features.
    pub channel_indices: Vec<usize>,
}

/// `count` distinct indices below `total`, chosen by a seeded shuffle (sorted).
pub fn channel_subset(total: usize, count: usize, seed: u64) -> Vec<usize> {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut all: Vec<usize> = (0..total).collect();
    for i in (1..total).rev() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        all.swap(i, (state % (i as u64 + 1)) as usize);
    }
    all.truncate(count.min(total));
    all.sort_unstable();
    all
}

/// The embedding on top of a backbone: `[1, channels, h, w]` at stride 8.
fn embedding(network: &mut Network, indices: &[usize]) -> Output {
    let graph = &mut network.graph;
    let s8_shape = graph.shape(network.features_s8).to_vec();
    let upsampled = graph.resize_bilinear(
        "embedding/upsample_s16",
        network.features_s16,
        s8_shape[2],
        s8_shape[3],
    );
    let joined = graph.concat("embedding/concat", &[network.features_s8, upsampled], 1);
    let indices: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
    graph.gather("embedding/subset", joined, &indices, 1)
}

fn compile(path: &Path) -> Result<LoadedModel, ModelError> {
    LoadedModel::load(path, &CompileOptions::default())
}

/// The preprocessing every PaDiM model uses: bilinear resize to the input size, RGB in [0, 1].
pub fn preprocessor(input_size: usize) -> Result<Preprocess, OpError> {
    let params: PreprocessParams = serde_json::from_value(serde_json::json!({
        "width": input_size, "height": input_size, "resize": "bilinear"
    }))
    .map_err(|e| OpError::param("input_size", e.to_string()))?;
    Preprocess::new(params)
}

/// Fits the Gaussians on `images` (normal images only).
pub fn fit(
    config: &PadimConfig,
    images: &[Frame],
    scratch: &Path,
) -> Result<PadimStats, PadimError> {
    if images.len() < 2 {
        return Err(PadimError::Invalid(format!(
            "PaDiM needs at least 2 normal images to estimate covariances, got {}",
            images.len()
        )));
    }
    let [c8, c16] = config.backbone.feature_channels();
    if config.channels == 0 || config.channels > c8 + c16 {
        return Err(PadimError::Invalid(format!(
            "channels must be between 1 and {} for {}",
            c8 + c16,
            config.backbone.name()
        )));
    }
    let indices = channel_subset(c8 + c16, config.channels, config.seed);
    let mut network = config.backbone.network(config.input_size)?;
    let embedded = embedding(&mut network, &indices);
    let shape = network.graph.shape(embedded).to_vec();
    let (channels, height, width) = (shape[1], shape[2], shape[3]);
    network.graph.result("embedding", embedded);
    let xml = scratch.join("padim_embedding.xml");
    network.graph.write(&xml).map_err(|source| PadimError::Io {
        context: format!("writing {}", xml.display()),
        source,
    })?;
    let mut model = compile(&xml)?;
    let mut preprocess = preprocessor(config.input_size)?;

    let positions = height * width;
    let mut sums = vec![0f64; positions * channels];
    let mut products = vec![0f64; positions * channels * channels];
    let mut vector = vec![0f64; channels];
    for frame in images {
        let tensor = preprocess.tensor_for(frame)?;
        let outputs = model.infer(tensor.data())?;
        let values = &outputs[0].values;
        for position in 0..positions {
            for (c, slot) in vector.iter_mut().enumerate() {
                *slot = f64::from(values[c * positions + position]);
            }
            let sum = &mut sums[position * channels..(position + 1) * channels];
            sum.iter_mut().zip(&vector).for_each(|(s, v)| *s += v);
            let product =
                &mut products[position * channels * channels..(position + 1) * channels * channels];
            for (i, vi) in vector.iter().enumerate() {
                for (j, vj) in vector.iter().enumerate().skip(i) {
                    product[i * channels + j] += vi * vj;
                }
            }
        }
    }
    let n = images.len() as f64;
    let mut mean = vec![0f32; positions * channels];
    let mut inverse_covariance = vec![0f32; positions * channels * channels];
    let mut covariance = vec![0f64; channels * channels];
    for position in 0..positions {
        let sum = &sums[position * channels..(position + 1) * channels];
        let product =
            &products[position * channels * channels..(position + 1) * channels * channels];
        for i in 0..channels {
            for j in i..channels {
                let value = (product[i * channels + j] - sum[i] * sum[j] / n) / (n - 1.0);
                covariance[i * channels + j] = value;
                covariance[j * channels + i] = value;
            }
            // PaDiM's regularisation keeps the covariance invertible with few images.
            covariance[i * channels + i] += 0.01;
        }
        let inverse = invert_spd(&covariance, channels).ok_or_else(|| {
            PadimError::Invalid(format!(
                "covariance at feature position {position} is not positive definite"
            ))
        })?;
        for (slot, value) in mean[position * channels..(position + 1) * channels]
            .iter_mut()
            .zip(sum)
        {
            *slot = (value / n) as f32;
        }
        for (slot, value) in inverse_covariance
            [position * channels * channels..(position + 1) * channels * channels]
            .iter_mut()
            .zip(&inverse)
        {
            *slot = *value as f32;
        }
    }
    Ok(PadimStats {
        channels,
        height,
        width,
        mean,
        inverse_covariance,
        channel_indices: indices,
    })
}

/// Inverse of a symmetric positive definite `n` x `n` matrix through its Cholesky factor, or
/// `None` when it is not positive definite.
pub fn invert_spd(matrix: &[f64], n: usize) -> Option<Vec<f64>> {
    // matrix = L L^T
    let mut lower = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut sum = matrix[i * n + j];
            for k in 0..j {
                sum -= lower[i * n + k] * lower[j * n + k];
            }
            if i == j {
                if sum <= 0.0 {
                    return None;
                }
                lower[i * n + i] = sum.sqrt();
            } else {
                lower[i * n + j] = sum / lower[j * n + j];
            }
        }
    }
    // Solve L L^T X = I column by column.
    let mut inverse = vec![0f64; n * n];
    let mut y = vec![0f64; n];
    for column in 0..n {
        for i in 0..n {
            let mut sum = if i == column { 1.0 } else { 0.0 };
            for k in 0..i {
                sum -= lower[i * n + k] * y[k];
            }
            y[i] = sum / lower[i * n + i];
        }
        for i in (0..n).rev() {
            let mut sum = y[i];
            for k in i + 1..n {
                sum -= lower[k * n + i] * inverse[k * n + column];
            }
            inverse[i * n + column] = sum / lower[i * n + i];
        }
    }
    Some(inverse)
}

/// A normalised Gaussian kernel of odd `size`.
fn gaussian_kernel(size: usize, sigma: f32) -> Vec<f32> {
    let centre = (size / 2) as f32;
    let one_d: Vec<f32> = (0..size)
        .map(|i| (-((i as f32 - centre).powi(2)) / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f32 = one_d.iter().sum::<f32>().powi(2);
    let mut kernel = Vec::with_capacity(size * size);
    for a in &one_d {
        for b in &one_d {
            kernel.push(a * b / total);
        }
    }
    kernel
}

/// The deployable graph: backbone, embedding and Mahalanobis distance, smoothed (a Gaussian of
/// sigma 4 input pixels, applied at stride 8) and resized to the input, plus its maximum.
pub fn export_graph(config: &PadimConfig, stats: &PadimStats) -> Result<IrGraph, PadimError> {
    let mut network = config.backbone.network(config.input_size)?;
    let embedded = embedding(&mut network, &stats.channel_indices);
    let graph = &mut network.graph;
    let (d, h, w) = (stats.channels, stats.height, stats.width);
    let positions = h * w;
    let flat = graph.reshape("padim/flatten", embedded, &[d, positions]);
    let by_position = graph.transpose("padim/by_position", flat, &[1, 0]);
    let mean = graph.constant_f32("padim/mean", &[positions, d], &stats.mean);
    let centred = graph.subtract("padim/centre", by_position, mean);
    let rows = graph.reshape("padim/rows", centred, &[positions, 1, d]);
    let inverse = graph.constant_f32(
        "padim/inverse_covariance",
        &[positions, d, d],
        &stats.inverse_covariance,
    );
    let projected = graph.matmul("padim/project", rows, inverse);
    let weighted = graph.multiply("padim/weight", projected, rows);
    let squared = graph.reduce("padim/squared_distance", weighted, &[1, 2], false);
    let non_negative = graph.clamp("padim/non_negative", squared, 0.0, f32::MAX);
    let distance = graph.sqrt("padim/distance", non_negative);
    let map = graph.reshape("padim/map", distance, &[1, 1, h, w]);
    let kernel = gaussian_kernel(5, 0.5);
    let smoothed = graph.convolution(
        "padim/smooth",
        map,
        &crate::backbone::ir::Conv2d {
            weight_shape: [1, 1, 5, 5],
            weights: &kernel,
            bias: &[0.0],
            stride: 1,
            pads: [2, 2, 2, 2],
            groups: 1,
        },
    );
    let full = graph.resize_bilinear(
        "anomaly_map_resize",
        smoothed,
        config.input_size,
        config.input_size,
    );
    let score_map = graph.reshape("padim/score_map", smoothed, &[1, positions]);
    let score = graph.reduce("pred_score_max", score_map, &[1], true);
    graph.result("anomaly_map", full);
    graph.result("pred_score", score);
    Ok(network.graph)
}

/// Runs an exported PaDiM IR on one frame: (raw image score, raw map at the input resolution).
pub fn run(
    model: &mut LoadedModel,
    preprocess: &mut Preprocess,
    frame: &Frame,
) -> Result<(f32, Vec<f32>), PadimError> {
    let tensor = preprocess.tensor_for(frame)?;
    let outputs = model.infer(tensor.data())?;
    let map = outputs
        .iter()
        .find(|o| o.name == "anomaly_map")
        .ok_or_else(|| PadimError::Invalid("the model has no anomaly_map output".into()))?;
    let score = outputs
        .iter()
        .find(|o| o.name == "pred_score")
        .and_then(|o| o.values.first().copied())
        .ok_or_else(|| PadimError::Invalid("the model has no pred_score output".into()))?;
    Ok((score, map.values.clone()))
}

/// Compiles an exported IR for [`run`].
pub fn load(path: &Path) -> Result<LoadedModel, PadimError> {
    Ok(compile(path)?)
}

/// Fits a PaDiM model on `normals`, calibrates it and writes the package to `out` (which must not
/// exist). One image in four (at least one) is held out for calibration: the threshold is set just
/// above the highest held-out score (x1.1), `min` is the lowest held-out score and `max` lies as far
/// above the threshold as `min` lies below it, so unseen normal images land below 0.5. (Training
/// with labelled or generated anomalies and F1-adaptive thresholds replaces this in the trainer.)
pub fn train(
    config: &PadimConfig,
    normals: &[Frame],
    out: &Path,
) -> Result<inspectflow_operators::package::ModelPackage, PadimError> {
    if normals.len() < 3 {
        return Err(PadimError::Invalid(format!(
            "need at least 3 normal images (2 to fit, 1 to calibrate), got {}",
            normals.len()
        )));
    }
    let calibration: Vec<&Frame> = normals.iter().skip(3).step_by(4).collect();
    let fitting: Vec<Frame> = normals
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 4 != 3)
        .map(|(_, frame)| frame.clone())
        .collect();
    // With 3 images, hold the last one out.
    let (calibration, fitting) = if calibration.is_empty() {
        (
            vec![&normals[normals.len() - 1]],
            fitting[..fitting.len() - 1].to_vec(),
        )
    } else {
        (calibration, fitting)
    };
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let scratch = out.with_file_name(format!(".{name}.scratch"));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(|source| PadimError::Io {
        context: format!("creating {}", scratch.display()),
        source,
    })?;
    let result = (|| {
        let stats = fit(config, &fitting, &scratch)?;
        let graph = export_graph(config, &stats)?;
        let xml = scratch.join(inspectflow_operators::package::MODEL_FILE);
        graph.write(&xml).map_err(|source| PadimError::Io {
            context: format!("writing {}", xml.display()),
            source,
        })?;
        let mut model = load(&xml)?;
        let mut preprocess = preprocessor(config.input_size)?;
        let mut scores = Vec::with_capacity(calibration.len());
        for frame in &calibration {
            scores.push(run(&mut model, &mut preprocess, frame)?.0);
        }
        let highest = scores.iter().copied().fold(f32::MIN, f32::max);
        let lowest = scores.iter().copied().fold(f32::MAX, f32::min);
        let threshold = highest * 1.1;
        let normalization = inspectflow_operators::package::Normalization {
            threshold,
            min: lowest,
            max: threshold + (threshold - lowest).max(f32::EPSILON),
        };
        let manifest = inspectflow_operators::package::Manifest {
            format_version: inspectflow_operators::package::FORMAT_VERSION,
            architecture: "padim".into(),
            backbone: config.backbone.name().into(),
            input_size: config.input_size,
            model_file: inspectflow_operators::package::MODEL_FILE.into(),
            normalization,
            threshold: 0.5,
            metrics: serde_json::json!({}),
            provenance: inspectflow_operators::package::Provenance {
                inspectflow_version: env!("CARGO_PKG_VERSION").into(),
                created_unix_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
                training_images: fitting.len(),
                calibration_images: calibration.len(),
                seed: config.seed,
                dataset_snapshot: None,
            },
        };
        Ok(inspectflow_operators::package::ModelPackage::create(
            out,
            &manifest,
            |target| {
                std::fs::rename(&xml, target)?;
                std::fs::rename(xml.with_extension("bin"), target.with_extension("bin"))
            },
        )?)
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverts_a_known_matrix() {
        // [[4, 2], [2, 3]]^-1 = [[3, -2], [-2, 4]] / 8
        let inverse = invert_spd(&[4.0, 2.0, 2.0, 3.0], 2).expect("positive definite");
        let expected = [0.375, -0.25, -0.25, 0.5];
        for (a, b) in inverse.iter().zip(expected) {
            assert!((a - b).abs() < 1e-12, "{inverse:?}");
        }
        assert!(invert_spd(&[1.0, 2.0, 2.0, 1.0], 2).is_none(), "indefinite");
    }

    #[test]
    fn mahalanobis_with_the_inverse_matches_a_hand_computation() {
        // x - mean = (1, 1) under [[4, 2], [2, 3]]: d^2 = (3 - 2 - 2 + 4) / 8 = 3/8.
        let inverse = invert_spd(&[4.0, 2.0, 2.0, 3.0], 2).expect("positive definite");
        let x = [1.0, 1.0];
        let d2: f64 = (0..2)
            .map(|i| {
                (0..2)
                    .map(|j| x[i] * inverse[i * 2 + j] * x[j])
                    .sum::<f64>()
            })
            .sum();
        assert!((d2 - 0.375).abs() < 1e-12);
    }

    #[test]
    fn channel_subsets_are_distinct_sorted_and_seeded() {
        let a = channel_subset(128, 64, 7);
        assert_eq!(a.len(), 64);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(a, channel_subset(128, 64, 7));
        assert_ne!(a, channel_subset(128, 64, 8));
    }

    #[test]
    fn gaussian_kernels_sum_to_one() {
        let kernel = gaussian_kernel(5, 0.5);
        assert!((kernel.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(kernel[12] > kernel[0]);
    }
}
