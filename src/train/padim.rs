//! PaDiM (Defard et al., 2020): a Gaussian per feature-map position over a random subset of
//! backbone channels; the anomaly of a position is the Mahalanobis distance of its feature vector.
//!
//! The embedding (stride-8 features with the stride-16 features resized onto them, then the
//! channel subset) and the distance are both OpenVINO IR, appended to the imported backbone, so
//! fitting and serving run the very same graph and the exported model is one IR with outputs
//! `anomaly_map` (smoothed, at the input resolution) and `pred_score` (its maximum).

use crate::backbone::Network;
use crate::backbone::ir::{IrGraph, Output, Reduction};

use super::{FeatureMaps, TrainError, smooth_and_resize};

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
pub fn embedding(network: &mut Network, indices: &[usize]) -> Output {
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

/// Fits the Gaussians on the embeddings of the training images (`features`, from
/// [`embedding`]).
pub fn fit(
    features: &FeatureMaps,
    progress: &mut dyn FnMut(f32),
) -> Result<PadimStats, TrainError> {
    let n_images = features.maps.len();
    if n_images < 2 {
        return Err(TrainError::Invalid(format!(
            "PaDiM needs at least 2 training images to estimate covariances, got {n_images}"
        )));
    }
    let (channels, height, width) = (features.channels, features.height, features.width);
    let positions = height * width;
    let n = n_images as f64;
    let mut mean = vec![0f32; positions * channels];
    let mut inverse_covariance = vec![0f32; positions * channels * channels];
    let mut covariance = vec![0f64; channels * channels];
    let mut sum = vec![0f64; channels];
    let mut vector = vec![0f64; channels];
    for position in 0..positions {
        sum.iter_mut().for_each(|s| *s = 0.0);
        covariance.iter_mut().for_each(|c| *c = 0.0);
        for map in &features.maps {
            for (c, slot) in vector.iter_mut().enumerate() {
                *slot = f64::from(map[c * positions + position]);
            }
            sum.iter_mut().zip(&vector).for_each(|(s, v)| *s += v);
            for (i, vi) in vector.iter().enumerate() {
                for (j, vj) in vector.iter().enumerate().skip(i) {
                    covariance[i * channels + j] += vi * vj;
                }
            }
        }
        for i in 0..channels {
            for j in i..channels {
                let value = (covariance[i * channels + j] - sum[i] * sum[j] / n) / (n - 1.0);
                covariance[i * channels + j] = value;
                covariance[j * channels + i] = value;
            }
            // PaDiM's regularisation keeps the covariance invertible with few images.
            covariance[i * channels + i] += 0.01;
        }
        let inverse = invert_spd(&covariance, channels).ok_or_else(|| {
            TrainError::Invalid(format!(
                "covariance at feature position {position} is not positive definite"
            ))
        })?;
        for (slot, value) in mean[position * channels..(position + 1) * channels]
            .iter_mut()
            .zip(&sum)
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
        if position % 64 == 63 {
            progress((position + 1) as f32 / positions as f32);
        }
    }
    progress(1.0);
    Ok(PadimStats {
        channels,
        height,
        width,
        mean,
        inverse_covariance,
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

/// The deployable head on `embedded`: the Mahalanobis distance of every position, smoothed (a
/// Gaussian of sigma 4 input pixels, applied at stride 8) and resized to the input
/// (`anomaly_map`), and its maximum (`pred_score`).
pub fn head(graph: &mut IrGraph, embedded: Output, stats: &PadimStats, input_size: usize) {
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
    let squared = graph.reduce("padim/squared_distance", weighted, &[1, 2], Reduction::Sum);
    let non_negative = graph.clamp("padim/non_negative", squared, 0.0, f32::MAX);
    let distance = graph.sqrt("padim/distance", non_negative);
    let map = graph.reshape("padim/map", distance, &[1, 1, h, w]);
    let (smoothed, full) = smooth_and_resize(graph, map, input_size);

    let score_map = graph.reshape("padim/score_map", smoothed, &[1, positions]);
    let score = graph.reduce("pred_score_max", score_map, &[1], Reduction::Max);
    graph.result("anomaly_map", full);
    graph.result("pred_score", score);
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
}
