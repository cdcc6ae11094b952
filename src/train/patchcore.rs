//! PatchCore (Roth et al., 2022): a memory bank of locally aware patch features from normal
//! images, thinned by greedy k-center coreset selection; a patch's anomaly is the distance to its
//! nearest bank entry, an image's is the largest patch anomaly re-weighted by how isolated that
//! bank entry is (the paper's equation 7, as anomalib computes it).
//!
//! The embedding (3x3 average pooling of the stride-8 and stride-16 features, the latter resized
//! onto the former) and the whole head (distances as one matrix product, the minimum, smoothing,
//! the re-weighting) are OpenVINO IR appended to the backbone, so the package is one IR.

use rayon::prelude::*;

use crate::backbone::Network;
use crate::backbone::ir::{IrGraph, Output, Reduction};

use super::{TrainError, smooth_and_resize};
use crate::synth::Rng;

/// The locally aware patch embedding: `[1, channels_s8 + channels_s16, h/8, w/8]`.
pub fn embedding(network: &mut Network) -> Output {
    let graph = &mut network.graph;
    let s8 = graph.average_pool_same("embedding/pool_s8", network.features_s8, 3);
    let s16 = graph.average_pool_same("embedding/pool_s16", network.features_s16, 3);
    let s8_shape = graph.shape(s8).to_vec();
    let upsampled = graph.resize_bilinear("embedding/upsample_s16", s16, s8_shape[2], s8_shape[3]);
    graph.concat("embedding/concat", &[s8, upsampled], 1)
}

/// Squared Euclidean distance, in eight independent lanes so that the compiler vectorises it.
#[inline(always)]
fn squared_distance(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a_blocks, b_blocks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_blocks
        .remainder()
        .iter()
        .zip(b_blocks.remainder())
        .map(|(x, y)| (x - y) * (x - y))
        .sum();
    for (x, y) in a_blocks.zip(b_blocks) {
        for lane in 0..8 {
            let difference = x[lane] - y[lane];
            lanes[lane] += difference * difference;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The coreset's projection: rows of more than this many dimensions are compared through a
/// seeded Gaussian projection to this many (the paper's d* = 128), which keeps distances within a
/// few percent (Johnson-Lindenstrauss) and the selection's passes over memory short.
pub const PROJECTION_DIM: usize = 128;

/// At most this many patches take part in the coreset selection; beyond it a seeded random
/// subset does (every image still contributes its share). Bounds fitting time and memory on big
/// datasets: 1,000 images of 256x256 give 1,024,000 patches.
pub const MAX_CANDIDATES: usize = 300_000;

/// The default bank: this fraction of the training patches (the paper's coresets are 1% to
/// 10%; the larger the bank, the closer it comes to all the patches and the less its picks
/// depend on the seed)...
pub const DEFAULT_CORESET_FRACTION: f64 = 0.1;
/// ...but at most this many rows: the head costs rows x channels multiply-adds per patch, and at
/// this size a MobileNetV2 package keeps about 0.8x the bare backbone's throughput at 256x256 and
/// at 512x512 (0.75x and 0.67x at 1536 rows; BENCHMARKS.md). From 10,240 patches (10 images at
/// 256x256) the bank is this size.
pub const MAX_DEFAULT_ROWS: usize = 1024;

/// Bank rows of a training run on `patches` training patches when none are asked for.
pub fn default_bank_rows(patches: usize) -> usize {
    ((patches as f64 * DEFAULT_CORESET_FRACTION).round() as usize)
        .clamp(1, MAX_DEFAULT_ROWS)
        .min(patches)
}

/// `rows` of `features` (`[rows, dim]`) through a seeded Gaussian projection to `target` dims.
fn project(features: &[f32], dim: usize, target: usize, rng: &mut Rng) -> Vec<f32> {
    let scale = 1.0 / (target as f32).sqrt();
    // Box-Muller normals, [dim, target] row-major.
    let projection: Vec<f32> = (0..dim * target)
        .map(|_| {
            let (u, v) = (rng.unit().max(f32::MIN_POSITIVE), rng.unit());
            (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos() * scale
        })
        .collect();
    let mut projected = vec![0f32; features.len() / dim * target];
    projected
        .par_chunks_mut(target)
        .zip(features.par_chunks(dim))
        .for_each(|(out, row)| {
            for (value, weights) in row.iter().zip(projection.chunks_exact(target)) {
                for (o, w) in out.iter_mut().zip(weights) {
                    *o += value * w;
                }
            }
        });
    projected
}

/// The farthest row of a block after lowering each row's distance to the picked set with its
/// distance to `centre`: (row within the block, its distance); ties go to the first row.
#[inline(always)]
fn update_block(nearest: &mut [f32], rows: &[f32], centre: &[f32]) -> (usize, f32) {
    let mut best = (usize::MAX, f32::NEG_INFINITY);
    for (i, (slot, row)) in nearest
        .iter_mut()
        .zip(rows.chunks_exact(centre.len()))
        .enumerate()
    {
        *slot = slot.min(squared_distance(row, centre));
        if *slot > best.1 {
            best = (i, *slot);
        }
    }
    best
}

/// [`update_block`] compiled for AVX2 and FMA, chosen at run time where the CPU has them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn update_block_avx2(nearest: &mut [f32], rows: &[f32], centre: &[f32]) -> (usize, f32) {
    update_block(nearest, rows, centre)
}

fn update_block_best(nearest: &mut [f32], rows: &[f32], centre: &[f32]) -> (usize, f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has both features, checked just above.
        return unsafe { update_block_avx2(nearest, rows, centre) };
    }
    update_block(nearest, rows, centre)
}

/// Greedy k-center selection (the paper's algorithm 1): starting from a seeded random row of
/// `features` (`[n, dim]`), repeatedly picks the row farthest from everything picked so far,
/// `count` times (or every row), comparing rows through a random projection when they have
/// more than [`PROJECTION_DIM`] dimensions. Returns the picked row indices in picking order.
/// Ties go to the lowest index, so the result depends only on the data and the seed. Each pass
/// runs on every core.
pub fn greedy_coreset(features: &[f32], dim: usize, count: usize, seed: u64) -> Vec<usize> {
    const BLOCK_ROWS: usize = 4096;
    let rows = features.len() / dim.max(1);
    let count = count.min(rows);
    if count == 0 {
        return Vec::new();
    }
    let mut rng = Rng::new(seed);
    let projected;
    let (space, space_dim) = if dim > PROJECTION_DIM {
        projected = project(features, dim, PROJECTION_DIM, &mut rng);
        (projected.as_slice(), PROJECTION_DIM)
    } else {
        (features, dim)
    };
    let mut nearest = vec![f32::INFINITY; rows];
    let mut picked = Vec::with_capacity(count);
    let mut next = rng.below(rows);
    for _ in 0..count {
        picked.push(next);
        let centre = &space[next * space_dim..(next + 1) * space_dim];
        let farthest = nearest
            .par_chunks_mut(BLOCK_ROWS)
            .zip(space.par_chunks(BLOCK_ROWS * space_dim))
            .enumerate()
            .map(|(block, (distances, block_rows))| {
                match update_block_best(distances, block_rows, centre) {
                    (usize::MAX, distance) => (usize::MAX, distance),
                    (row, distance) => (block * BLOCK_ROWS + row, distance),
                }
            })
            .reduce(
                || (usize::MAX, f32::NEG_INFINITY),
                |a, b| {
                    if b.1 > a.1 || (b.1 == a.1 && b.0 < a.0) {
                        b
                    } else {
                        a
                    }
                },
            );
        next = farthest.0;
        if next == usize::MAX {
            break;
        }
    }
    picked
}

/// For every row of `bank` (`[k, dim]`), the indices of its `neighbours` nearest rows, itself
/// first, nearest first (ties by index): `[k, neighbours]`.
pub fn support_table(bank: &[f32], dim: usize, neighbours: usize) -> Vec<i64> {
    let rows = bank.len() / dim;
    let neighbours = neighbours.min(rows);
    let by_distance_then_index =
        |a: &(f32, usize), b: &(f32, usize)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
    bank.par_chunks_exact(dim)
        .flat_map_iter(|row| {
            let mut order: Vec<(f32, usize)> = bank
                .chunks_exact(dim)
                .map(|other| squared_distance(row, other))
                .zip(0..)
                .collect();
            if neighbours > 0 && neighbours < order.len() {
                order.select_nth_unstable_by(neighbours - 1, by_distance_then_index);
            }
            order.truncate(neighbours);
            order.sort_by(by_distance_then_index);
            order.into_iter().map(|(_, i)| i as i64)
        })
        .collect()
}

/// What the exported head computes, in plain Rust (for tests and as its specification): the
/// patch scores (distance of each `[p, dim]` query row to its nearest bank row) and the image
/// score (the largest patch score times `1 - softmax(distances to the support set)[0]`).
pub fn reference_scores(
    bank: &[f32],
    dim: usize,
    support: &[i64],
    neighbours: usize,
    patches: &[f32],
) -> (Vec<f32>, f32) {
    let nearest: Vec<(f32, usize)> = patches
        .chunks_exact(dim)
        .map(|patch| {
            bank.chunks_exact(dim)
                .map(|entry| squared_distance(patch, entry))
                .zip(0..)
                .fold(
                    (f32::INFINITY, 0),
                    |best, c| if c.0 < best.0 { c } else { best },
                )
        })
        .collect();
    let scores: Vec<f32> = nearest.iter().map(|(d, _)| d.max(0.0).sqrt()).collect();
    let (worst, _) = scores
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &s)| {
            if s > best.1 { (i, s) } else { best }
        });
    let patch = &patches[worst * dim..(worst + 1) * dim];
    let entry = nearest[worst].1;
    let distances: Vec<f32> = support[entry * neighbours..(entry + 1) * neighbours]
        .iter()
        .map(|&j| squared_distance(patch, &bank[j as usize * dim..(j as usize + 1) * dim]).sqrt())
        .collect();
    let largest = distances.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f32 = distances.iter().map(|d| (d - largest).exp()).sum();
    let weight = 1.0 - (distances[0] - largest).exp() / total;
    let image = weight * scores[worst];
    (scores, image)
}

/// A fitted PatchCore model.
pub struct PatchcoreBank {
    /// Feature dimension.
    pub dim: usize,
    /// Bank rows, `[k, dim]`.
    pub bank: Vec<f32>,
    /// Support sets of the re-weighting, `[k, neighbours]`.
    pub support: Vec<i64>,
    /// Support set size (the paper's b, 9 in anomalib).
    pub neighbours: usize,
}

/// Collects the training patches image by image as rows `[n, dim]`, keeping every patch, or a
/// seeded random subset of about [`MAX_CANDIDATES`] when there are more (each patch kept with
/// the same probability), so that fitting never holds every image's features at once.
pub struct PatchSampler {
    dim: usize,
    positions: usize,
    keep: f64,
    rng: Rng,
    /// Patches seen, kept or not.
    total: usize,
    rows: Vec<f32>,
}

impl PatchSampler {
    /// A sampler for `images` embeddings of `[dim, positions]`.
    pub fn new(dim: usize, positions: usize, images: usize, seed: u64) -> Self {
        let all = images * positions;
        let keep = MAX_CANDIDATES as f64 / all.max(1) as f64;
        Self {
            dim,
            positions,
            keep,
            rng: Rng::new(seed ^ 0xC0_4E5E7),
            total: 0,
            rows: Vec::with_capacity(all.min(MAX_CANDIDATES + positions) * dim),
        }
    }

    /// Adds one image's embedding, `[dim, positions]` channel-major.
    pub fn add(&mut self, embedding: &[f32]) -> Result<(), TrainError> {
        let (dim, positions) = (self.dim, self.positions);
        if embedding.len() != dim * positions {
            return Err(TrainError::Invalid(format!(
                "embedding of {} values, expected {dim} x {positions}",
                embedding.len()
            )));
        }
        for position in 0..positions {
            self.total += 1;
            if self.keep < 1.0 && f64::from(self.rng.unit()) >= self.keep {
                continue;
            }
            self.rows
                .extend((0..dim).map(|c| embedding[c * positions + position]));
        }
        Ok(())
    }
}

/// Support set size of the paper's image-score re-weighting (its `b`).
pub const SUPPORT_NEIGHBOURS: usize = 9;

/// Selects the memory bank from the training patches: `bank_rows` rows, or
/// [`default_bank_rows`] of all the patches seen when `None`.
pub fn fit(
    patches: PatchSampler,
    bank_rows: Option<usize>,
    neighbours: usize,
    seed: u64,
    progress: &mut dyn FnMut(f32),
) -> Result<PatchcoreBank, TrainError> {
    let dim = patches.dim;
    if bank_rows == Some(0) {
        return Err(TrainError::Invalid(
            "--memory-bank must be at least 1".into(),
        ));
    }
    if patches.rows.is_empty() {
        return Err(TrainError::Invalid("no training patches to fit".into()));
    }
    let count = bank_rows.unwrap_or_else(|| default_bank_rows(patches.total));
    progress(0.0);
    let picked = greedy_coreset(&patches.rows, dim, count, seed);
    progress(0.9);
    let mut bank = Vec::with_capacity(picked.len() * dim);
    for &row in &picked {
        bank.extend_from_slice(&patches.rows[row * dim..(row + 1) * dim]);
    }
    drop(patches);
    let neighbours = neighbours.clamp(1, picked.len());
    let support = support_table(&bank, dim, neighbours);
    progress(1.0);
    Ok(PatchcoreBank {
        dim,
        bank,
        support,
        neighbours,
    })
}

/// The deployable head on `embedded` (`[1, dim, h, w]`): outputs `anomaly_map` (smoothed
/// nearest-bank distances resized to `input_size`) and `pred_score` (re-weighted maximum).
pub fn head(graph: &mut IrGraph, embedded: Output, model: &PatchcoreBank, input_size: usize) {
    let shape = graph.shape(embedded).to_vec();
    let (dim, h, w) = (shape[1], shape[2], shape[3]);
    let positions = h * w;
    let k = model.bank.len() / model.dim;
    let flat = graph.reshape("patchcore/flatten", embedded, &[dim, positions]);
    let queries = graph.transpose("patchcore/queries", flat, &[1, 0]);
    // |q - m|^2 = |q|^2 - 2 q.m + |m|^2, as one [positions, k] matrix.
    let mut bank_t = vec![0f32; dim * k];
    let mut bank_norms = vec![0f32; k];
    for (j, row) in model.bank.chunks_exact(dim).enumerate() {
        for (c, value) in row.iter().enumerate() {
            bank_t[c * k + j] = -2.0 * value;
        }
        bank_norms[j] = row.iter().map(|v| v * v).sum();
    }
    let bank_t = graph.constant_f32("patchcore/bank_times_minus_two", &[dim, k], &bank_t);
    let cross = graph.matmul("patchcore/cross", queries, bank_t);
    let bank_norms = graph.constant_f32("patchcore/bank_norms", &[1, k], &bank_norms);
    let squares = graph.multiply("patchcore/query_squares", queries, queries);
    let query_norms = graph.reduce("patchcore/query_norms", squares, &[1], Reduction::Sum);
    let query_norms = graph.reshape("patchcore/query_norms_column", query_norms, &[positions, 1]);
    // |q|^2 is the same along a row: the nearest row is found before adding it, so that only
    // `[positions, 1]` values get it (and the clamp of rounding below zero).
    let partial = graph.add("patchcore/add_bank_norms", cross, bank_norms);
    // Ties between bank rows in any order: a stable TopK over [positions, k] costs as much as
    // the backbone's last stages (4 ms against 1 ms at 1024 x 2048 on two threads).
    let (nearest, _) = graph.top_k_ties_any_order("patchcore/nearest", partial, 1, 1, false);
    let nearest = graph.add("patchcore/squared_distances", nearest, query_norms);
    let nearest = graph.clamp("patchcore/non_negative", nearest, 0.0, f32::MAX);
    let nearest = graph.sqrt("patchcore/patch_scores", nearest);
    let map = graph.reshape("patchcore/map", nearest, &[1, 1, h, w]);
    let (_, full) = smooth_and_resize(graph, map, input_size);
    graph.result("anomaly_map", full);

    // Image score: the worst patch, re-weighted by its nearest bank entry's support set.
    let scores = graph.reshape("patchcore/score_row", nearest, &[1, positions]);
    let (worst_score, worst_patch) = graph.top_k("patchcore/worst", scores, 1, 1, true);
    let worst_patch = graph.reshape("patchcore/worst_index", worst_patch, &[1]);
    let worst_partial = graph.gather_at("patchcore/worst_partial", partial, worst_patch, 0);
    let worst_norm = graph.gather_at("patchcore/worst_norm", query_norms, worst_patch, 0);
    let worst_row = graph.add("patchcore/worst_squared", worst_partial, worst_norm);
    let worst_row = graph.clamp("patchcore/worst_non_negative", worst_row, 0.0, f32::MAX);
    let (_, entry) = graph.top_k("patchcore/worst_entry", worst_row, 1, 1, false);
    let entry = graph.reshape("patchcore/worst_entry_index", entry, &[1]);
    let support = graph.constant_i64("patchcore/support", &[k, model.neighbours], &model.support);
    let support_set = graph.gather_at("patchcore/support_set", support, entry, 0);
    let support_squared = graph.gather_at("patchcore/support_distances", worst_row, support_set, 1);
    let support_distances = graph.sqrt("patchcore/support_sqrt", support_squared);
    let weights = graph.softmax("patchcore/softmax", support_distances, 2);
    let own = graph.gather("patchcore/own_weight", weights, &[0], 2);
    let own = graph.reshape("patchcore/own_weight_flat", own, &[1, 1]);
    let one = graph.constant_f32("patchcore/one", &[1, 1], &[1.0]);
    let weight = graph.subtract("patchcore/weight", one, own);
    let score = graph.multiply("patchcore/reweighted", worst_score, weight);
    let score = graph.reshape("pred_score", score, &[1]);
    graph.result("pred_score", score);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coreset_picks_the_farthest_points_in_turn() {
        // Points on a line at 0, 1, 2, 10, 11; starting anywhere, the first pick after the start
        // is an extreme, then the one farthest from both.
        let points = [0.0f32, 1.0, 2.0, 10.0, 11.0];
        let picked = greedy_coreset(&points, 1, 3, 5);
        assert_eq!(picked.len(), 3);
        let start = picked[0];
        let expected_second = if points[start] < 6.0 { 4 } else { 0 };
        assert_eq!(picked[1], expected_second, "{picked:?}");
        // With {start, extreme} picked, the farthest remaining point is computed by hand.
        let mut chosen = [points[start], points[expected_second]];
        chosen.sort_by(f32::total_cmp);
        let third = (0..points.len())
            .filter(|i| !picked[..2].contains(i))
            .max_by(|&a, &b| {
                let da = chosen
                    .iter()
                    .map(|c| (points[a] - c).abs())
                    .fold(f32::MAX, f32::min);
                let db = chosen
                    .iter()
                    .map(|c| (points[b] - c).abs())
                    .fold(f32::MAX, f32::min);
                da.total_cmp(&db).then(b.cmp(&a))
            });
        assert_eq!(Some(picked[2]), third, "{picked:?}");
        assert_eq!(greedy_coreset(&points, 1, 3, 5), picked, "seeded");
        assert_eq!(
            greedy_coreset(&points, 1, 99, 5).len(),
            5,
            "at most every row"
        );
    }

    #[test]
    fn coreset_of_two_clusters_covers_both() {
        let mut points = Vec::new();
        for i in 0..50 {
            points.extend([i as f32 * 0.01, 0.0]);
            points.extend([100.0 + i as f32 * 0.01, 100.0]);
        }
        let picked = greedy_coreset(&points, 2, 2, 1);
        let sides: Vec<bool> = picked.iter().map(|&i| points[i * 2] > 50.0).collect();
        assert_ne!(sides[0], sides[1], "one pick per cluster: {picked:?}");
    }

    #[test]
    fn the_default_bank_is_a_tenth_of_the_patches_up_to_the_serving_budget() {
        assert_eq!(default_bank_rows(9_600), 960);
        assert_eq!(default_bank_rows(12_800), MAX_DEFAULT_ROWS);
        assert_eq!(default_bank_rows(1_000_000), MAX_DEFAULT_ROWS);
        assert_eq!(default_bank_rows(7), 1, "at least one row");
        assert_eq!(default_bank_rows(0), 0);
    }

    #[test]
    fn support_sets_and_scores_match_a_hand_computation() {
        // Bank: (0,0), (3,0), (0,4). Query patches: (0,1) and (3,4).
        let bank = [0.0, 0.0, 3.0, 0.0, 0.0, 4.0];
        let support = support_table(&bank, 2, 2);
        // (0,0): itself, then (3,0) at 3; (3,0): itself, then (0,0) at 3; (0,4): itself, (0,0) at 4.
        assert_eq!(support, vec![0, 1, 1, 0, 2, 0]);
        let patches = [0.0, 1.0, 3.0, 4.0];
        let (scores, image) = reference_scores(&bank, 2, &support, 2, &patches);
        // (0,1) is 1 from (0,0); (3,4) is 4 from (3,0) and 3 from (0,4): nearest 3.
        assert!(
            (scores[0] - 1.0).abs() < 1e-6 && (scores[1] - 3.0).abs() < 1e-6,
            "{scores:?}"
        );
        // Worst patch (3,4), nearest entry (0,4), support {(0,4) at 3, (0,0) at 5}:
        // weight = 1 - e^3 / (e^3 + e^5).
        let weight = 1.0 - 3f32.exp() / (3f32.exp() + 5f32.exp());
        assert!((image - 3.0 * weight).abs() < 1e-5, "{image}");
    }
}
