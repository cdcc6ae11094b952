//! Anomaly maps at a frame's size, made on demand.
//!
//! A prediction keeps its anomaly map at the model's resolution (256x256 floats for the packages
//! trained here, 256 KB; 4 KB for a model's 32x32 feature grid; where the same map at 1080p is
//! 8 MB per frame in flight). Whoever needs it at
//! a frame's size asks [`MapRows`] for one row at a time (the heatmap's outline looks at each row
//! while it is in the cache), [`upsample`] for the whole map (the REST API's PNG), or
//! [`PlaneRows`] for a plane of integers made from the map (the heatmap's colours), resized in
//! fixed point.
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

/// The last two source rows resized horizontally, so that walking the target rows in order
/// resizes each source row once.
#[derive(Debug, Default)]
struct ResizedRows<T> {
    /// (source row index, values at the target width).
    slots: [(Option<usize>, Vec<T>); 2],
}

impl<T: Copy + Default> ResizedRows<T> {
    /// Forgets the rows held and sizes the slots for `width` values.
    fn reset(&mut self, width: usize) {
        for (row, values) in &mut self.slots {
            *row = None;
            values.resize(width, T::default());
        }
    }

    /// The slot holding source row `row`; when no slot has it, `fill` computes it into a slot
    /// other than `keep`.
    fn slot_for(&mut self, row: usize, keep: Option<usize>, fill: impl FnOnce(&mut [T])) -> usize {
        if let Some(slot) = self.slots.iter().position(|(held, _)| *held == Some(row)) {
            return slot;
        }
        let slot = if keep == Some(0) { 1 } else { 0 };
        let (held, values) = &mut self.slots[slot];
        fill(values);
        *held = Some(row);
        slot
    }

    /// The two slots holding source rows `lower` and `upper`, each filled by `fill(row, values)`
    /// when missing.
    fn pair(
        &mut self,
        lower: usize,
        upper: usize,
        mut fill: impl FnMut(usize, &mut [T]),
    ) -> [&[T]; 2] {
        let lower_slot = self.slot_for(lower, None, |values| fill(lower, values));
        let upper_slot = self.slot_for(upper, Some(lower_slot), |values| fill(upper, values));
        [&self.slots[lower_slot].1, &self.slots[upper_slot].1]
    }
}

/// Rows of a map resized to `width` x `height`. Reusable: `prepare` keeps the memory of the
/// previous map.
#[derive(Debug, Default)]
pub struct MapRows {
    columns: Axis,
    rows: Axis,
    map_width: usize,
    resized: ResizedRows<f32>,
}

impl MapRows {
    /// Sets up for `map` (`map_width` values a row) at `width` x `height`.
    pub fn prepare(&mut self, map_width: usize, map_height: usize, width: usize, height: usize) {
        self.columns.prepare(map_width, width);
        self.rows.prepare(map_height, height);
        self.map_width = map_width;
        self.resized.reset(width);
    }

    /// The two rows of the map that row `y` of the resized map lies between (the same one
    /// twice at the edges): no value of row `y` is higher than theirs.
    pub fn source_rows(&self, y: usize) -> [usize; 2] {
        [self.rows.lower[y], self.rows.upper[y]]
    }

    /// Row `y` of the resized map into `out` (`width` values), from `map`, the map `prepare`
    /// was called for.
    pub fn row(&mut self, map: &[f32], y: usize, out: &mut [f32]) {
        let (lower, upper, weight) = (self.rows.lower[y], self.rows.upper[y], self.rows.weight[y]);
        let (columns, map_width) = (&self.columns, self.map_width);
        let [a, b] = self.resized.pair(lower, upper, |row, values| {
            let source = &map[row * map_width..(row + 1) * map_width];
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
        });
        for ((target, a), b) in out.iter_mut().zip(a).zip(b) {
            *target = a + (b - a) * weight;
        }
    }
}

/// Row `y` of a [`PlaneRows`] plane as the two resized source rows it lies between and the
/// weight of the second, in 1/128: the value at `x` is
/// [`lerp_fixed`]`(above[x], below[x], weight)`. The blend interpolates as it reads, so a
/// target row costs no pass of its own.
pub struct RowPair<'a> {
    /// The upper source row at the target width.
    pub above: &'a [u16],
    /// The lower source row at the target width.
    pub below: &'a [u16],
    /// The weight of `below`, 0 to 128.
    pub weight: u16,
}

/// `a + (b - a) * weight / 128` for values 0 to 255 and `weight` 0 to 128, rounded: always
/// between `a` and `b`. 16-bit arithmetic throughout (at most 255 x 128 + 64), so loops over it
/// vectorise in 16-bit lanes (the heatmap's blend: 16 lanes with AVX2).
#[inline(always)]
pub fn lerp_fixed(a: u16, b: u16, weight: u16) -> u16 {
    let step = (b as i16 - a as i16) * weight as i16;
    (a as i16 + ((step + 64) >> 7)) as u16
}

/// A plane of values 0 to 255 at the map's resolution (a channel of the colour-mapped map)
/// resized to `width` x `height` bilinearly in fixed point (weights in 1/128), one row at a
/// time. Reusable: `prepare` keeps the memory of the previous plane.
#[derive(Debug, Default)]
pub struct PlaneRows {
    columns: Axis,
    rows: Axis,
    /// `columns.weight` in 1/128.
    column_weights: Vec<u16>,
    plane_width: usize,
    width: usize,
    resized: ResizedRows<u16>,
}

/// How many values a horizontal resize of a [`PlaneRows`] row writes at once: a 128-bit vector
/// of `u16`.
const RUN_CHUNK: usize = 8;

impl PlaneRows {
    /// Sets up for a plane of `plane_width` x `plane_height` at `width` x `height`.
    pub fn prepare(
        &mut self,
        plane_width: usize,
        plane_height: usize,
        width: usize,
        height: usize,
    ) {
        self.columns.prepare(plane_width, width);
        self.rows.prepare(plane_height, height);
        self.column_weights.clear();
        self.column_weights
            .extend(self.columns.weight.iter().map(|weight| to_fixed(*weight)));
        self.column_weights.extend([0; RUN_CHUNK]);
        self.plane_width = plane_width;
        self.width = width;
        self.resized.reset(width + RUN_CHUNK);
    }

    /// Row `y` of `plane` (the plane `prepare` was called for) at the target size.
    pub fn row(&mut self, plane: &[u16], y: usize) -> RowPair<'_> {
        let (lower, upper) = (self.rows.lower[y], self.rows.upper[y]);
        let weight = to_fixed(self.rows.weight[y]);
        let (columns, weights, plane_width, width) = (
            &self.columns,
            &self.column_weights,
            self.plane_width,
            self.width,
        );
        // Runs of under three columns on average (256 columns to 640).
        let short_runs = columns.runs.len() * 3 > width;
        let [above, below] = self.resized.pair(lower, upper, |row, values| {
            let source = &plane[row * plane_width..(row + 1) * plane_width];
            if short_runs {
                // Several runs per vector's worth of columns: column by column is cheaper.
                let columns_at = columns.lower.iter().zip(&columns.upper);
                for ((target, (lower, upper)), weight) in
                    values[..width].iter_mut().zip(columns_at).zip(weights)
                {
                    *target = lerp_fixed(source[*lower], source[*upper], *weight);
                }
                return;
            }
            // Upsampled further, a run is several columns (7.5 from 256 to 1920): each is
            // written RUN_CHUNK values at a time, one vector, whatever its length, the next run
            // overwriting what lies past its end (`values` and `weights` have RUN_CHUNK more).
            for &(start, end) in &columns.runs {
                let (a, b) = (source[columns.lower[start]], source[columns.upper[start]]);
                for at in (start..end).step_by(RUN_CHUNK) {
                    let (Some(targets), Some(weights)) = (
                        values[at..].first_chunk_mut::<RUN_CHUNK>(),
                        weights[at..].first_chunk::<RUN_CHUNK>(),
                    ) else {
                        break;
                    };
                    for (target, weight) in targets.iter_mut().zip(weights) {
                        *target = lerp_fixed(a, b, *weight);
                    }
                }
            }
        });
        RowPair {
            above: &above[..width],
            below: &below[..width],
            weight,
        }
    }
}

/// A weight of 0 to 1 in 1/128.
fn to_fixed(weight: f32) -> u16 {
    (weight * 128.0).round() as u16
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
    fn plane_rows_match_the_float_resize_to_within_one() {
        // Up (runs of several columns, written a vector at a time), down (runs of one) and the
        // pipeline's 256x256 map on a 1080p frame.
        let mut rows = PlaneRows::default();
        for (mw, mh, w, h) in [(7, 5, 33, 19), (33, 19, 7, 5), (256, 256, 1920, 1080)] {
            let plane: Vec<u16> = (0..mw * mh).map(|v| ((v * 97) % 256) as u16).collect();
            let floats: Vec<f32> = plane.iter().map(|v| f32::from(*v)).collect();
            let reference = upsample(&floats, mw, mh, w, h);
            rows.prepare(mw, mh, w, h);
            for y in [0, 4, 3, h - 1, h / 2] {
                let pair = rows.row(&plane, y);
                assert_eq!((pair.above.len(), pair.below.len()), (w, w));
                for x in 0..w {
                    let value = lerp_fixed(pair.above[x], pair.below[x], pair.weight);
                    let expected = reference[y * w + x];
                    assert!(
                        (f32::from(value) - expected).abs() <= 1.5,
                        "{mw}x{mh} to {w}x{h} at ({x}, {y}): {value} vs {expected}"
                    );
                }
            }
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
