//! Anomaly maps at a frame's size, made on demand.
//!
//! A prediction keeps its anomaly map at the model's resolution (32x32 floats for the default
//! PatchCore: 4 KB, where the same map at 1080p is 8 MB per frame in flight). Whoever needs it at
//! a frame's size asks [`MapRows`] for one row at a time (the heatmap blends each row while it is
//! in the cache) or [`upsample`] for the whole map (the REST API's PNG).
//!
//! Sampling is bilinear with pixel centres aligned (the convention of OpenCV's `INTER_LINEAR`
//! and of anomalib's upsampling), edges clamped.

/// Bilinear sample positions along one axis: for each target index, the two source indices and
/// the weight of the second; and the runs of target indices that share their source indices.
#[derive(Debug, Default)]
struct Axis {
    lower: Vec<usize>,
    upper: Vec<usize>,
    weight: Vec<f32>,
    /// Target index ranges `start..end` with the same `lower` (and so `upper`), in order: within
    /// one, resizing is `a + (b - a) * weight` with `a` and `b` fixed, a loop that vectorises.
    runs: Vec<(usize, usize)>,
}

impl Axis {
    /// Positions for resizing `source` samples to `target`, reusing this axis's memory.
    fn prepare(&mut self, source: usize, target: usize) {
        self.lower.clear();
        self.upper.clear();
        self.weight.clear();
        self.runs.clear();
        let scale = source as f32 / target.max(1) as f32;
        let last = source.saturating_sub(1);
        for index in 0..target {
            let position = ((index as f32 + 0.5) * scale - 0.5).clamp(0.0, last as f32);
            let lower = (position as usize).min(last);
            match self.runs.last_mut() {
                Some((_, end)) if self.lower.last() == Some(&lower) => *end = index + 1,
                _ => self.runs.push((index, index + 1)),
            }
            self.lower.push(lower);
            self.upper.push((lower + 1).min(last));
            self.weight.push(position - lower as f32);
        }
    }
}

/// Rows of a map resized to `width` x `height`. Keeps the last two source rows resized
/// horizontally, so walking the rows in order resizes each source row once. Reusable: `prepare`
/// keeps the memory of the previous map.
#[derive(Debug, Default)]
pub struct MapRows {
    columns: Axis,
    rows: Axis,
    map_width: usize,
    /// Source rows resized to the target width: (source row index, values).
    resized: [(Option<usize>, Vec<f32>); 2],
}

impl MapRows {
    /// Sets up for `map` (`map_width` values a row) at `width` x `height`.
    pub fn prepare(&mut self, map_width: usize, map_height: usize, width: usize, height: usize) {
        self.columns.prepare(map_width, width);
        self.rows.prepare(map_height, height);
        self.map_width = map_width;
        for (row, values) in &mut self.resized {
            *row = None;
            values.resize(width, 0.0);
        }
    }

    /// Row `y` of the resized map into `out` (`width` values), from `map`, the map `prepare`
    /// was called for.
    pub fn row(&mut self, map: &[f32], y: usize, out: &mut [f32]) {
        let (lower, upper, weight) = (self.rows.lower[y], self.rows.upper[y], self.rows.weight[y]);
        let lower_slot = self.slot_for(map, lower, None);
        let upper_slot = self.slot_for(map, upper, Some(lower_slot));
        let (a, b) = (&self.resized[lower_slot].1, &self.resized[upper_slot].1);
        for ((target, a), b) in out.iter_mut().zip(a).zip(b) {
            *target = a + (b - a) * weight;
        }
    }

    /// The slot holding source row `row` resized horizontally, computing it into a slot other
    /// than `keep` when no slot has it.
    fn slot_for(&mut self, map: &[f32], row: usize, keep: Option<usize>) -> usize {
        if let Some(slot) = self.resized.iter().position(|(held, _)| *held == Some(row)) {
            return slot;
        }
        let slot = if keep == Some(0) { 1 } else { 0 };
        let source = &map[row * self.map_width..(row + 1) * self.map_width];
        let (held, values) = &mut self.resized[slot];
        let columns = &self.columns;
        for &(start, end) in &columns.runs {
            let (a, b) = (source[columns.lower[start]], source[columns.upper[start]]);
            let step = b - a;
            for (target, weight) in values[start..end]
                .iter_mut()
                .zip(&columns.weight[start..end])
            {
                *target = a + step * weight;
            }
        }
        *held = Some(row);
        slot
    }
}

/// The whole of `map` (`map_width` x `map_height`) resized to `width` x `height`.
pub fn upsample(
    map: &[f32],
    map_width: usize,
    map_height: usize,
    width: usize,
    height: usize,
) -> Vec<f32> {
    let mut rows = MapRows::default();
    rows.prepare(map_width, map_height, width, height);
    let mut resized = vec![0.0; width * height];
    for (y, out) in resized.chunks_exact_mut(width.max(1)).enumerate() {
        rows.row(map, y, out);
    }
    resized
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_of_the_same_size_comes_back_unchanged() {
        let map: Vec<f32> = (0..12).map(|v| v as f32).collect();
        assert_eq!(upsample(&map, 4, 3, 4, 3), map);
    }

    #[test]
    fn upsampling_interpolates_between_centres_and_clamps_at_the_edges() {
        // Two columns, values 0 and 1, made four wide: centres at 0.5 and 2.5 of the target.
        let resized = upsample(&[0.0, 1.0], 2, 1, 4, 1);
        assert_eq!(resized, vec![0.0, 0.25, 0.75, 1.0]);
        // Rows work the same way, and each row of a constant-column map is that column's value.
        let resized = upsample(&[0.0, 1.0], 1, 2, 3, 4);
        let column: Vec<f32> = resized.chunks(3).map(|row| row[0]).collect();
        assert_eq!(column, vec![0.0, 0.25, 0.75, 1.0]);
        assert!(
            resized
                .chunks(3)
                .all(|row| row.iter().all(|v| *v == row[0]))
        );
    }

    #[test]
    fn every_size_matches_bilinear_sampling_pixel_by_pixel() {
        // Up, down and mixed, with runs of one column (downsampling skips source columns).
        let reference = |map: &[f32], mw: usize, mh: usize, w: usize, h: usize| {
            let sample = |source: usize, target: usize, index: usize| {
                let scale = source as f32 / target as f32;
                let position = ((index as f32 + 0.5) * scale - 0.5).clamp(0.0, (source - 1) as f32);
                let lower = position as usize;
                (lower, (lower + 1).min(source - 1), position - lower as f32)
            };
            let mut out = Vec::with_capacity(w * h);
            for y in 0..h {
                let (y0, y1, wy) = sample(mh, h, y);
                for x in 0..w {
                    let (x0, x1, wx) = sample(mw, w, x);
                    let row = |r: usize| {
                        let (a, b) = (map[r * mw + x0], map[r * mw + x1]);
                        a + (b - a) * wx
                    };
                    let (a, b) = (row(y0), row(y1));
                    out.push(a + (b - a) * wy);
                }
            }
            out
        };
        for (mw, mh, w, h) in [
            (32, 32, 1920, 1080),
            (7, 5, 3, 2),
            (5, 3, 17, 4),
            (1, 1, 4, 3),
        ] {
            let map: Vec<f32> = (0..mw * mh).map(|v| ((v * 37) % 11) as f32).collect();
            assert_eq!(
                upsample(&map, mw, mh, w, h),
                reference(&map, mw, mh, w, h),
                "{mw}x{mh} to {w}x{h}"
            );
        }
    }

    #[test]
    fn rows_asked_for_out_of_order_are_the_same_as_in_order() {
        let map: Vec<f32> = (0..16).map(|v| (v * v) as f32).collect();
        let whole = upsample(&map, 4, 4, 9, 7);
        let mut rows = MapRows::default();
        rows.prepare(4, 4, 9, 7);
        let mut out = vec![0.0; 9];
        for y in [6, 0, 3, 3, 1, 5] {
            rows.row(&map, y, &mut out);
            assert_eq!(out, whole[y * 9..(y + 1) * 9], "row {y}");
        }
    }
}
