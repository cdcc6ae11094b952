//! Evaluation metrics, computed with polars: ROC curves (image and pixel AUROC), F1 at a
//! threshold and the F1-adaptive threshold, and PRO (per-region overlap, averaged over defect
//! regions and integrated up to a false-positive rate of 0.3, as in MVTec AD).
//!
//! Every curve comes from one sort: rows of (score, positive weight, negative weight) sorted by
//! descending score, with cumulative sums of the weights taken at the last row of each distinct
//! score, so tied scores form one point. AUROC weights positives and negatives by 1; PRO weights
//! a defect pixel by 1 / (its region's area x the number of regions), so the "true positive
//! rate" becomes the mean overlap of the regions.

use polars::prelude::*;

use super::TrainError;

fn failed(what: &'static str) -> impl FnOnce(PolarsError) -> TrainError {
    move |e| TrainError::Invalid(format!("computing {what}: {e}"))
}

/// Points of a curve: the cumulative positive and negative weight with every score at or above
/// each distinct score, highest score first, and those scores.
struct Cumulative {
    scores: Vec<f64>,
    positive: Vec<f64>,
    negative: Vec<f64>,
    total_positive: f64,
    total_negative: f64,
}

fn cumulative(
    scores: &[f32],
    positive: &[f64],
    negative: &[f64],
) -> Result<Cumulative, TrainError> {
    let frame = df!(
        "score" => scores.iter().map(|&s| f64::from(s)).collect::<Vec<f64>>(),
        "positive" => positive,
        "negative" => negative,
    )
    .map_err(failed("the score table"))?;
    let sorted = frame
        .sort(
            ["score"],
            SortMultipleOptions::default()
                .with_order_descending(true)
                .with_maintain_order(true),
        )
        .map_err(failed("the sort"))?;
    let series = |name: &str| -> Result<Series, TrainError> {
        Ok(sorted
            .column(name)
            .map_err(failed("a column"))?
            .as_materialized_series()
            .clone())
    };
    let score = series("score")?;
    let positive = cum_sum(&series("positive")?, false).map_err(failed("cumulative sums"))?;
    let negative = cum_sum(&series("negative")?, false).map_err(failed("cumulative sums"))?;
    // The last row of each run of equal scores closes that score's point.
    let next = score.shift(-1);
    let closes = score
        .not_equal_missing(&next)
        .map_err(failed("the tie groups"))?;
    let take = |s: &Series| -> Result<Vec<f64>, TrainError> {
        Ok(s.filter(&closes)
            .map_err(failed("the tie groups"))?
            .f64()
            .map_err(failed("a column"))?
            .into_no_null_iter()
            .collect())
    };
    let scores = take(&score)?;
    let positive = take(&positive)?;
    let negative = take(&negative)?;
    Ok(Cumulative {
        total_positive: positive.last().copied().unwrap_or(0.0),
        total_negative: negative.last().copied().unwrap_or(0.0),
        scores,
        positive,
        negative,
    })
}

/// A ROC curve from (0, 0) to (1, 1): false-positive rates and true-positive rates.
#[derive(Debug, Clone, PartialEq)]
pub struct Roc {
    /// False-positive rates, ascending.
    pub fpr: Vec<f64>,
    /// True-positive rates.
    pub tpr: Vec<f64>,
}

impl Roc {
    /// Area under the curve (trapezoids).
    pub fn area(&self) -> f64 {
        self.area_until(1.0)
    }

    /// Area under the curve for false-positive rates up to `limit`, divided by `limit`.
    pub fn area_until(&self, limit: f64) -> f64 {
        let mut area = 0.0;
        for i in 1..self.fpr.len() {
            let (x0, x1, y0, y1) = (self.fpr[i - 1], self.fpr[i], self.tpr[i - 1], self.tpr[i]);
            if x0 >= limit {
                break;
            }
            let (end, y_end) = if x1 > limit {
                (limit, y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
            } else {
                (x1, y1)
            };
            area += (end - x0) * (y0 + y_end) / 2.0;
        }
        area / limit
    }
}

/// The ROC curve of `scores` where rows carry `positive` and `negative` weights; `None` when
/// one class has no weight (the curve is undefined).
pub fn weighted_roc(
    scores: &[f32],
    positive: &[f64],
    negative: &[f64],
) -> Result<Option<Roc>, TrainError> {
    let points = cumulative(scores, positive, negative)?;
    if points.total_positive <= 0.0 || points.total_negative <= 0.0 {
        return Ok(None);
    }
    let mut roc = Roc {
        fpr: vec![0.0],
        tpr: vec![0.0],
    };
    for (p, n) in points.positive.iter().zip(&points.negative) {
        roc.fpr.push(n / points.total_negative);
        roc.tpr.push(p / points.total_positive);
    }
    Ok(Some(roc))
}

/// The ROC curve of `scores` for binary `labels` (true: anomalous).
pub fn roc(scores: &[f32], labels: &[bool]) -> Result<Option<Roc>, TrainError> {
    let positive: Vec<f64> = labels.iter().map(|&l| f64::from(u8::from(l))).collect();
    let negative: Vec<f64> = labels.iter().map(|&l| f64::from(u8::from(!l))).collect();
    weighted_roc(scores, &positive, &negative)
}

/// F1 of predicting "anomalous" for scores at or above `threshold`.
pub fn f1_at(scores: &[f32], labels: &[bool], threshold: f32) -> f64 {
    let (mut tp, mut fp, mut fn_) = (0u64, 0u64, 0u64);
    for (&score, &label) in scores.iter().zip(labels) {
        match (score >= threshold, label) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fn_ += 1,
            (false, false) => {}
        }
    }
    if tp == 0 {
        0.0
    } else {
        2.0 * tp as f64 / (2 * tp + fp + fn_) as f64
    }
}

/// The threshold that maximises F1, and that F1. The threshold lies halfway between the lowest
/// score predicted anomalous and the next lower score, so that it does not sit on a training
/// sample. `None` without anomalous labels.
pub fn f1_adaptive_threshold(
    scores: &[f32],
    labels: &[bool],
) -> Result<Option<(f32, f64)>, TrainError> {
    Ok(best_f1_cut(scores, labels)?.map(|cut| (cut.between(0.5), cut.f1)))
}

/// Where the best-F1 threshold falls between two neighbouring scores.
#[derive(Debug, Clone, Copy)]
pub struct F1Cut {
    /// The lowest score flagged at the best F1.
    pub lowest_flagged: f64,
    /// The next lower score (or one below the lowest when every image is flagged).
    pub highest_passed: f64,
    /// The F1 there.
    pub f1: f64,
}

impl F1Cut {
    /// A threshold `fraction` of the way from the highest passed score to the lowest flagged.
    pub fn between(&self, fraction: f64) -> f32 {
        (self.highest_passed + fraction * (self.lowest_flagged - self.highest_passed)) as f32
    }
}

/// The cut between scores with the best F1; `None` without positives.
pub fn best_f1_cut(scores: &[f32], labels: &[bool]) -> Result<Option<F1Cut>, TrainError> {
    let positive: Vec<f64> = labels.iter().map(|&l| f64::from(u8::from(l))).collect();
    let negative: Vec<f64> = labels.iter().map(|&l| f64::from(u8::from(!l))).collect();
    let points = cumulative(scores, &positive, &negative)?;
    if points.total_positive <= 0.0 {
        return Ok(None);
    }
    let mut best: Option<(usize, f64)> = None;
    for (i, (tp, fp)) in points.positive.iter().zip(&points.negative).enumerate() {
        let f1 = 2.0 * tp / (tp + fp + points.total_positive);
        if best.is_none_or(|(_, b)| f1 > b) {
            best = Some((i, f1));
        }
    }
    Ok(best.map(|(i, f1)| {
        let cut = points.scores[i];
        let below = points
            .scores
            .get(i + 1)
            .copied()
            .unwrap_or(cut - cut.abs().max(1.0));
        F1Cut {
            lowest_flagged: cut,
            highest_passed: below,
            f1,
        }
    }))
}

/// Connected regions (4-neighbourhood) of a `width` x `height` mask: a region number per pixel
/// (`u32::MAX` outside) and the region areas.
pub fn regions(mask: &[bool], width: usize, height: usize) -> (Vec<u32>, Vec<usize>) {
    let mut label = vec![u32::MAX; mask.len()];
    let mut areas = Vec::new();
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || label[start] != u32::MAX {
            continue;
        }
        let id = areas.len() as u32;
        let mut area = 0;
        label[start] = id;
        stack.push(start);
        while let Some(pixel) = stack.pop() {
            area += 1;
            let (x, y) = (pixel % width, pixel / width);
            let mut visit = |neighbour: usize| {
                if mask[neighbour] && label[neighbour] == u32::MAX {
                    label[neighbour] = id;
                    stack.push(neighbour);
                }
            };
            if x > 0 {
                visit(pixel - 1);
            }
            if x + 1 < width {
                visit(pixel + 1);
            }
            if y > 0 {
                visit(pixel - width);
            }
            if y + 1 < height {
                visit(pixel + width);
            }
        }
        areas.push(area);
    }
    (label, areas)
}

/// One evaluated image's maps: raw anomaly values and the ground-truth mask, same size.
pub struct PixelImage<'a> {
    /// Raw anomaly map.
    pub map: &'a [f32],
    /// Defect mask (all false for normal images).
    pub mask: &'a [bool],
    /// Map width.
    pub width: usize,
    /// Map height.
    pub height: usize,
}

/// Pixel-level results.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct PixelMetrics {
    /// Pixel AUROC.
    pub auroc: f64,
    /// Pixel F1 at the threshold.
    pub f1: f64,
    /// PRO up to a false-positive rate of 0.3, normalised to [0, 1].
    pub pro: f64,
}

/// Pixel AUROC, F1 at `threshold` and PRO over `images`; `None` without defect pixels.
pub fn pixel_metrics(
    images: &[PixelImage],
    threshold: f32,
) -> Result<Option<PixelMetrics>, TrainError> {
    let total: usize = images.iter().map(|i| i.map.len()).sum();
    let mut scores = Vec::with_capacity(total);
    let mut labels = Vec::with_capacity(total);
    let mut overlap_weight = Vec::with_capacity(total);
    // Regions are counted over the whole set, so each region weighs the same.
    let mut region_count = 0usize;
    let mut per_image = Vec::with_capacity(images.len());
    for image in images {
        let (label, areas) = regions(image.mask, image.width, image.height);
        region_count += areas.len();
        per_image.push((label, areas));
    }
    for (image, (label, areas)) in images.iter().zip(&per_image) {
        scores.extend_from_slice(image.map);
        labels.extend_from_slice(image.mask);
        overlap_weight.extend(label.iter().map(|&region| {
            if region == u32::MAX {
                0.0
            } else {
                1.0 / (areas[region as usize] as f64 * region_count as f64)
            }
        }));
    }
    let Some(curve) = roc(&scores, &labels)? else {
        return Ok(None);
    };
    let negative: Vec<f64> = labels.iter().map(|&l| f64::from(u8::from(!l))).collect();
    let pro = weighted_roc(&scores, &overlap_weight, &negative)?
        .map_or(0.0, |curve| curve.area_until(0.3));
    Ok(Some(PixelMetrics {
        auroc: curve.area(),
        f1: f1_at(&scores, &labels, threshold),
        pro,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_of_known_rankings() {
        let labels = [false, false, true, true];
        // Perfect ranking.
        let perfect = roc(&[0.1, 0.2, 0.8, 0.9], &labels).unwrap().unwrap();
        assert!((perfect.area() - 1.0).abs() < 1e-12);
        // Reversed ranking.
        let reversed = roc(&[0.9, 0.8, 0.2, 0.1], &labels).unwrap().unwrap();
        assert!(reversed.area().abs() < 1e-12);
        // One of four positive-negative pairs misordered: 3/4.
        let one_swap = roc(&[0.1, 0.5, 0.4, 0.9], &labels).unwrap().unwrap();
        assert!((one_swap.area() - 0.75).abs() < 1e-12, "{one_swap:?}");
        // All tied: a tie counts half, 0.5.
        let tied = roc(&[0.5; 4], &labels).unwrap().unwrap();
        assert!((tied.area() - 0.5).abs() < 1e-12);
        // One class only: undefined.
        assert!(roc(&[0.1, 0.2], &[false, false]).unwrap().is_none());
    }

    #[test]
    fn partial_area_is_normalised_by_its_limit() {
        let curve = Roc {
            fpr: vec![0.0, 1.0],
            tpr: vec![0.0, 1.0],
        };
        // The diagonal up to 0.3: area 0.045, normalised 0.15.
        assert!((curve.area_until(0.3) - 0.15).abs() < 1e-12);
    }

    #[test]
    fn f1_threshold_separates_the_classes_when_they_can_be() {
        let scores = [0.1, 0.2, 0.3, 0.7, 0.8];
        let labels = [false, false, false, true, true];
        let (threshold, f1) = f1_adaptive_threshold(&scores, &labels).unwrap().unwrap();
        assert!((f1 - 1.0).abs() < 1e-12);
        assert!((threshold - 0.5).abs() < 1e-6, "{threshold}");
        assert!((f1_at(&scores, &labels, threshold) - 1.0).abs() < 1e-12);
        // Predicting everything anomalous: tp 2, fp 3 -> F1 = 4 / 7.
        assert!((f1_at(&scores, &labels, 0.0) - 4.0 / 7.0).abs() < 1e-12);
    }

    #[test]
    fn regions_are_four_connected() {
        #[rustfmt::skip]
        let mask = [
            true,  true,  false, false,
            false, false, false, true,
            false, false, true,  true,
        ];
        let (label, areas) = regions(&mask, 4, 3);
        assert_eq!(areas, vec![2, 3]);
        assert_eq!(label[0], label[1]);
        assert_eq!(label[7], label[11]);
        assert_ne!(label[0], label[7]);
        assert_eq!(label[2], u32::MAX);
    }

    #[test]
    fn pro_averages_regions_not_pixels() {
        // One image, 1x10: a big region (pixels 0-5) found completely, a small one (pixel 9)
        // missed entirely; normal pixels 6-8.
        let mask = [
            true, true, true, true, true, true, false, false, false, true,
        ];
        let map = [0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.5, 0.5, 0.5, 0.1];
        let image = PixelImage {
            map: &map,
            mask: &mask,
            width: 10,
            height: 1,
        };
        let metrics = pixel_metrics(&[image], 0.7).unwrap().unwrap();
        // Up to FPR 0.3 the curve is flat at PRO 0.5 (big region covered, small one not).
        assert!((metrics.pro - 0.5).abs() < 1e-9, "{metrics:?}");
        // Pixel F1 at 0.7: tp 6, fp 0, fn 1 -> 12 / 13.
        assert!((metrics.f1 - 12.0 / 13.0).abs() < 1e-9);
        // AUROC: 6 of 7 positives above all 3 negatives, 1 below: 18 / 21.
        assert!((metrics.auroc - 18.0 / 21.0).abs() < 1e-9);
    }
}
