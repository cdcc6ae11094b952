//! `heatmap`: draws the anomaly map over the frame for people to look at: a jet colour map
//! blended with the image (`alpha`), an optional outline of the region above the threshold, and
//! the label and score ("ANOMALOUS 87%") in the top-left corner. The result goes into the packet's
//! `overlay` frame (a new pooled image); the original frame is left untouched.
//!
//! Video frames (I420) are blended plane by plane, and the overlay stays I420: the blend is
//! linear, so mixing the colour map's YCbCr into the frame's gives the same picture as mixing in
//! RGB, at half the bytes and without RGB per pixel. The overlay's planes hold JPEG's YCbCr
//! (full-range BT.601, [`YuvEncoding::Jpeg`]): the frame's values are converted as they are read,
//! so `encode.jpeg` compresses the planes as they are. Other frames give an RGB overlay.
//!
//! The anomaly map arrives at the model's resolution. Its colours are made there and resized to
//! each plane one row at a time ([`PlaneRows`]) while the blend walks the rows; the outline
//! resizes the map's values ([`MapRows`]) only around rows that reach the threshold.

use std::sync::Arc;

use serde::Deserialize;

use crate::contract::{
    Emitter, OpError, OperatorInstance, OperatorKind, OutputType, PortType, Transform,
};
use crate::map_upsample::{MapRows, PlaneRows, lerp_fixed};
use crate::packet::{Frame, ImageLayout, Packet, PixelFormat, Prediction, YuvEncoding};
use crate::pool::{BufferPool, PooledBuffer};
use crate::registry::{OperatorDescriptor, ParamError};
use crate::yuv;

mod rows;
mod text;

use rows::{
    blend_row, chroma_in_luma, convert_chroma, convert_luma, levels_of, outline_marks, weighted_sum,
};
use text::{Paint, draw_text};

/// Parameters of `heatmap`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeatmapParams {
    /// Weight of the colour map in the blend (0: only the image, 1: only the map).
    #[serde(default = "default_alpha")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub alpha: f32,
    /// Outline the region whose normalised map value reaches the threshold.
    #[serde(default = "default_true")]
    pub outline: bool,
    /// Write the label and score in the top-left corner.
    #[serde(default = "default_true")]
    pub label: bool,
}

impl HeatmapParams {
    /// `alpha` is a blend weight.
    pub fn validate(&self) -> Result<(), ParamError> {
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err(ParamError::new(
                "alpha",
                format!("must be 0 to 1, got {}", self.alpha),
            ));
        }
        Ok(())
    }
}

fn default_alpha() -> f32 {
    0.4
}
fn default_true() -> bool {
    true
}

/// The registry entry.
pub fn descriptor() -> OperatorDescriptor {
    OperatorDescriptor::builder::<HeatmapParams>(
        "heatmap",
        OperatorKind::Transform,
        "Blends a jet colour map of the anomaly map over the frame, outlines the region above the threshold and writes the label and score, into the packet's overlay; video frames (I420) are blended in their own planes and give an I420 overlay.",
    )
    .input("in", PortType::Prediction)
    .output("out", OutputType::Fixed(PortType::Prediction))
    .replicable()
    .validate(HeatmapParams::validate)
    .build_with(|params, _context| {
        Ok(OperatorInstance::Transform(Box::new(Heatmap {
            params,
            renderer: OverlayRenderer::new(16),
        })))
    })
}

/// The running operator.
pub struct Heatmap {
    params: HeatmapParams,
    renderer: OverlayRenderer,
}

impl Transform for Heatmap {
    fn process(&mut self, mut packet: Packet, out: &mut Emitter) -> Result<(), OpError> {
        let prediction = packet.prediction.clone().ok_or_else(|| {
            OpError::UnsupportedInput(
                "packet has no prediction: put `anomaly` before `heatmap`".into(),
            )
        })?;
        packet.overlay = Some(
            self.renderer
                .render(&packet.frame, &prediction, &self.params)?,
        );
        out.emit(0, packet);
        Ok(())
    }
}

/// Jet colour map: blue (0) through cyan, green and yellow to red (1).
pub fn jet(value: f32) -> [u8; 3] {
    let v = value.clamp(0.0, 1.0) * 4.0;
    let channel = |centre: f32| ((1.5 - (v - centre).abs()).clamp(0.0, 1.0) * 255.0) as u8;
    [channel(3.0), channel(2.0), channel(1.0)]
}

/// The blend weight of the colour map, in 1/256.
fn map_weight(alpha: f32) -> u16 {
    (alpha * 256.0).round() as u16
}

/// The label text and its colour.
fn label_of(prediction: &Prediction) -> (String, [u8; 3]) {
    let verdict = if prediction.anomalous {
        "ANOMALOUS"
    } else {
        "NORMAL"
    };
    let colour = if prediction.anomalous {
        [255, 40, 40]
    } else {
        [40, 230, 40]
    };
    (
        format!("{verdict} {:.0}%", prediction.score * 100.0),
        colour,
    )
}

/// What the outline needs of the anomaly map at the frame's size: a row and its two
/// neighbours, in floats, made only for rows that can reach the threshold (a bilinear value is
/// never higher than the two map rows it lies between, whose peaks are known).
#[derive(Default)]
struct OutlineRows {
    map_rows: MapRows,
    /// The highest value of each row of the map at its own resolution.
    row_peaks: Vec<f32>,
    /// Rows of the map at the frame's size: (row, values), the last three made.
    held: [(Option<usize>, Vec<f32>); 3],
    /// The current row's pixels on the outline (1).
    marks: Vec<u8>,
    height: usize,
}

impl OutlineRows {
    /// Sets up for `map` (`map_width` x `map_height`) on a `width` x `height` frame.
    fn prepare(
        &mut self,
        map: &[f32],
        (map_width, map_height): (usize, usize),
        width: usize,
        height: usize,
    ) {
        self.map_rows.prepare(map_width, map_height, width, height);
        self.row_peaks.clear();
        self.row_peaks.extend(
            map.chunks_exact(map_width)
                .take(map_height)
                .map(|row| row.iter().copied().fold(f32::NEG_INFINITY, f32::max)),
        );
        for (row, values) in &mut self.held {
            *row = None;
            values.resize(width, 0.0);
        }
        self.marks.resize(width, 0);
        self.height = height;
    }

    /// Calls `mark(x)` for each column of row `y` on the outline of the region whose value
    /// reaches `threshold` (the first and last rows are their own missing neighbours).
    fn on_row(&mut self, map: &[f32], y: usize, threshold: f32, mut mark: impl FnMut(usize)) {
        let [upper, lower] = self.map_rows.source_rows(y);
        if self.row_peaks[upper].max(self.row_peaks[lower]) < threshold {
            return;
        }
        let wanted = [y.saturating_sub(1), y, (y + 1).min(self.height - 1)];
        let slots = wanted.map(|row| self.hold(map, row, &wanted));
        let [previous, current, next] = slots.map(|slot| self.held[slot].1.as_slice());
        outline_marks(previous, current, next, threshold, &mut self.marks);
        // Eight marks at a time: most of a row is off the outline.
        for (chunk, marks) in self.marks.chunks(8).enumerate() {
            if marks.iter().any(|mark| *mark != 0) {
                for (offset, _) in marks.iter().enumerate().filter(|(_, mark)| **mark != 0) {
                    mark(chunk * 8 + offset);
                }
            }
        }
    }

    /// The slot holding row `row`, made into a slot holding none of `keep` when missing.
    fn hold(&mut self, map: &[f32], row: usize, keep: &[usize; 3]) -> usize {
        if let Some(slot) = self.held.iter().position(|(held, _)| *held == Some(row)) {
            return slot;
        }
        // Three slots and at most two other rows to keep: one is always free.
        let slot = self
            .held
            .iter()
            .position(|(held, _)| held.is_none_or(|held| !keep.contains(&held)))
            .unwrap_or(0);
        let (held, values) = &mut self.held[slot];
        self.map_rows.row(map, row, values);
        *held = Some(row);
        slot
    }
}

/// Draws overlays. Keeps its output pool and its scratch rows from frame to frame, so drawing
/// allocates nothing in steady state.
///
/// The colour map is applied at the map's own resolution and the colours are resized to the
/// frame's planes (as OpenCV's `applyColorMap` followed by `resize` does): per pixel the blend is
/// then one interpolation and one weighted sum in integers. The packages trained here give maps
/// at their input size (256x256), where neighbouring values are close and the result is the
/// colour of the resized value to within a few levels; a coarse map with steep edges (a model's
/// 32x32 feature grid) blends across the jet instead (blue into red, skipping green) within
/// each map cell at the edge, as OpenCV does.
pub struct OverlayRenderer {
    pool: BufferPool<u8>,
    /// The colour map's channels at the map's resolution, 0-255: Y, Cb, Cr for I420 overlays,
    /// R, G, B for the others.
    colours: [Vec<u16>; 3],
    /// Those channels resized to the overlay's planes, a row at a time.
    colour_rows: [PlaneRows; 3],
    /// The map's values as colour table indices.
    levels: Vec<u8>,
    outline: OutlineRows,
    /// The frame's current rows in JPEG's YCbCr (I420 overlays): luma, Cb, Cr.
    converted: [Vec<u8>; 3],
    /// Per pixel of a row, what its chroma adds to its luma (I420 overlays).
    chroma_terms: Vec<i32>,
}

impl OverlayRenderer {
    /// A renderer whose overlays come from a pool keeping at most `pooled` idle buffers.
    pub fn new(pooled: usize) -> Self {
        Self {
            pool: BufferPool::new(pooled),
            colours: Default::default(),
            colour_rows: Default::default(),
            levels: Vec::new(),
            outline: OutlineRows::default(),
            converted: Default::default(),
            chroma_terms: Vec::new(),
        }
    }

    /// Draws the overlay for `frame` as a new frame from the pool: I420 for I420 frames, RGB
    /// for the others.
    pub fn render(
        &mut self,
        frame: &Frame,
        prediction: &Prediction,
        params: &HeatmapParams,
    ) -> Result<Frame, OpError> {
        let map_size = (
            prediction.map_width as usize,
            prediction.map_height as usize,
        );
        if map_size.0 == 0 || map_size.1 == 0 || prediction.map.len() < map_size.0 * map_size.1 {
            return Err(OpError::UnsupportedInput(format!(
                "anomaly map of {}x{} holds {} values",
                map_size.0,
                map_size.1,
                prediction.map.len()
            )));
        }
        let (width, height) = (frame.layout.width as usize, frame.layout.height as usize);
        if params.outline {
            self.outline
                .prepare(&prediction.map, map_size, width, height);
        }
        let pixels = match yuv::Planes::of(frame) {
            Some(planes) => self.blend_i420(&planes, width, height, map_size, prediction, params),
            None => self.blend_packed(frame, map_size, prediction, params),
        };
        let (width, height) = (frame.layout.width, frame.layout.height);
        let layout = match frame.layout.format {
            PixelFormat::I420 => {
                ImageLayout::packed(width, height, PixelFormat::I420).with_yuv(YuvEncoding::Jpeg)
            }
            _ => ImageLayout::packed(width, height, PixelFormat::Rgb),
        };
        Ok(Frame::new(
            pixels,
            layout,
            Arc::clone(&frame.stream_id),
            frame.sequence,
            frame.capture,
        ))
    }

    /// Fills `colours` with the colour map of `map` (`map_width` x `map_height`) in the three
    /// channels of `colour_of` (jet's RGB to the overlay's channels).
    fn colour_map(
        &mut self,
        map: &[f32],
        (map_width, map_height): (usize, usize),
        colour_of: impl Fn([u8; 3]) -> [u8; 3],
    ) {
        let mut tables = [[0u16; 256]; 3];
        for level in 0..256 {
            let colour = colour_of(jet(level as f32 / 255.0));
            for (table, value) in tables.iter_mut().zip(colour) {
                table[level] = u16::from(value);
            }
        }
        self.levels.resize(map_width * map_height, 0);
        levels_of(&map[..map_width * map_height], &mut self.levels);
        for (plane, table) in self.colours.iter_mut().zip(&tables) {
            plane.clear();
            plane.extend(self.levels.iter().map(|level| table[usize::from(*level)]));
        }
    }

    /// The RGB overlay of an RGB, BGR or grey frame.
    fn blend_packed(
        &mut self,
        frame: &Frame,
        map_size: (usize, usize),
        prediction: &Prediction,
        params: &HeatmapParams,
    ) -> PooledBuffer<u8> {
        let source = frame.layout;
        let (width, height) = (source.width as usize, source.height as usize);
        let mut pixels = self.pool.get(width * height * 3);
        let weight = map_weight(params.alpha);
        let keep = 256 - weight;
        self.colour_map(&prediction.map, map_size, |rgb| rgb);
        for rows in &mut self.colour_rows {
            rows.prepare(map_size.0, map_size.1, width, height);
        }
        let channels = source.format.channels();
        let threshold = prediction.threshold;
        for y in 0..height {
            let out_row = &mut pixels[y * width * 3..(y + 1) * width * 3];
            let row = &frame.pixels()[y * source.stride..y * source.stride + width * channels];
            let [red, green, blue] = &mut self.colour_rows;
            let [red_map, green_map, blue_map] = &self.colours;
            let colours = [
                red.row(red_map, y),
                green.row(green_map, y),
                blue.row(blue_map, y),
            ];
            for (x, (p, target)) in row
                .chunks_exact(channels)
                .zip(out_row.chunks_exact_mut(3))
                .enumerate()
            {
                let rgb = match source.format {
                    PixelFormat::Rgb => [p[0], p[1], p[2]],
                    PixelFormat::Bgr => [p[2], p[1], p[0]],
                    PixelFormat::Gray | PixelFormat::I420 => [p[0], p[0], p[0]],
                };
                for (c, colour) in colours.iter().enumerate() {
                    let heat = lerp_fixed(colour.above[x], colour.below[x], colour.weight);
                    target[c] = weighted_sum(rgb[c], keep, heat, weight);
                }
            }
            if params.outline {
                self.outline.on_row(&prediction.map, y, threshold, |x| {
                    out_row[x * 3..x * 3 + 3].copy_from_slice(&[255, 255, 255]);
                });
            }
        }
        if params.label {
            let pixel = |x: usize, y: usize| (y * width + x) * 3..(y * width + x) * 3 + 3;
            let (text, colour) = label_of(prediction);
            draw_text(width, height, &text, |x, y, paint| match paint {
                Paint::Shade => pixels[pixel(x, y)].iter_mut().for_each(|v| *v /= 4),
                Paint::Ink => pixels[pixel(x, y)].copy_from_slice(&colour),
            });
        }
        pixels
    }

    /// The overlay of an I420 frame, blended plane by plane into new I420 planes in JPEG's
    /// YCbCr (the frame's values converted as they are read, so encoders need no pass of their
    /// own): each plane with the colour map's channel resized to that plane's size.
    fn blend_i420(
        &mut self,
        planes: &yuv::Planes,
        width: usize,
        height: usize,
        map_size: (usize, usize),
        prediction: &Prediction,
        params: &HeatmapParams,
    ) -> PooledBuffer<u8> {
        let layout = ImageLayout::packed(width as u32, height as u32, PixelFormat::I420);
        let (chroma_width, chroma_height) = layout.chroma_size();
        let convert = yuv::ToJfif::new(&planes.matrix);
        let matrix = yuv::JFIF;
        let weights = [256 - map_weight(params.alpha), map_weight(params.alpha)];
        self.colour_map(&prediction.map, map_size, |rgb| matrix.to_yuv(rgb));
        let [luma_rows, cb_rows, cr_rows] = &mut self.colour_rows;
        luma_rows.prepare(map_size.0, map_size.1, width, height);
        for rows in [cb_rows, cr_rows] {
            rows.prepare(map_size.0, map_size.1, chroma_width, chroma_height);
        }
        let [white_y, white_u, white_v] = matrix.to_yuv([255, 255, 255]);
        let mut pixels = self.pool.get(layout.byte_len());
        let (luma, chroma) = pixels.split_at_mut(width * height);
        let (u_out, v_out) = chroma.split_at_mut(chroma_width * chroma_height);
        // What each pixel's chroma adds to its luma, for the current pair of rows (zero when
        // the frame is BT.601).
        self.chroma_terms.clear();
        self.chroma_terms.resize(width, 0);
        let [converted_luma, converted_u, converted_v] = &mut self.converted;
        converted_luma.resize(width, 0);
        converted_u.resize(chroma_width, 0);
        converted_v.resize(chroma_width, 0);
        let [luma_map, cb_map, cr_map] = &self.colours;
        let [luma_rows, cb_rows, cr_rows] = &mut self.colour_rows;
        let threshold = prediction.threshold;
        for y in 0..height {
            let in_row = &planes.y[y * planes.y_stride..y * planes.y_stride + width];
            let out_row = &mut luma[y * width..(y + 1) * width];
            let chroma_row = (y / 2) * chroma_width..(y / 2 + 1) * chroma_width;
            let (u_row, v_row) = (&planes.u[chroma_row.clone()], &planes.v[chroma_row.clone()]);
            if y % 2 == 0 && convert.mixes_chroma() {
                chroma_in_luma(&convert, u_row, v_row, &mut self.chroma_terms);
            }
            convert_luma(&convert, in_row, &self.chroma_terms, converted_luma);
            let heat = luma_rows.row(luma_map, y);
            blend_row(
                weights,
                converted_luma,
                heat.above,
                heat.below,
                heat.weight,
                out_row,
            );
            if y % 2 == 0 {
                convert_chroma(&convert, u_row, v_row, converted_u, converted_v);
                for (rows, map, converted, out) in [
                    (&mut *cb_rows, cb_map, &*converted_u, &mut *u_out),
                    (&mut *cr_rows, cr_map, &*converted_v, &mut *v_out),
                ] {
                    let heat = rows.row(map, y / 2);
                    let out = &mut out[chroma_row.clone()];
                    blend_row(weights, converted, heat.above, heat.below, heat.weight, out);
                }
            }
            if params.outline {
                self.outline.on_row(&prediction.map, y, threshold, |x| {
                    out_row[x] = white_y;
                    u_out[chroma_row.start + x / 2] = white_u;
                    v_out[chroma_row.start + x / 2] = white_v;
                });
            }
        }
        if params.label {
            let chroma_at = |x: usize, y: usize| (y / 2) * chroma_width + x / 2;
            let (text, colour) = label_of(prediction);
            let [ink_y, ink_u, ink_v] = matrix.to_yuv(colour);
            draw_text(width, height, &text, |x, y, paint| {
                let chroma = chroma_at(x, y);
                // Chroma is shared by a 2x2 block: shade it once, from the block's top-left pixel.
                let block_origin = x % 2 == 0 && y % 2 == 0;
                match paint {
                    Paint::Shade => {
                        let shaded = &mut luma[y * width + x];
                        *shaded = matrix.black() + shaded.saturating_sub(matrix.black()) / 4;
                        if block_origin {
                            for plane in [&mut *u_out, &mut *v_out] {
                                let c = i32::from(plane[chroma]);
                                plane[chroma] = (128 + (c - 128) / 4) as u8;
                            }
                        }
                    }
                    Paint::Ink => {
                        luma[y * width + x] = ink_y;
                        u_out[chroma] = ink_u;
                        v_out[chroma] = ink_v;
                    }
                }
            });
        }
        pixels
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jet_runs_from_blue_to_red() {
        assert_eq!(jet(0.0), [0, 0, 127]);
        assert_eq!(jet(1.0), [127, 0, 0]);
        let middle = jet(0.5);
        assert!(
            middle[1] == 255 && middle[0] < 200 && middle[2] < 200,
            "{middle:?}"
        );
    }

    /// A prediction for a `width` x `height` frame whose map ramps from 0 (left) to 1 (right).
    fn ramp_prediction(width: u32, height: u32) -> Prediction {
        let pool = BufferPool::new(1);
        let mut map = pool.get((width * height) as usize);
        for (index, value) in map.iter_mut().enumerate() {
            *value = (index % width as usize) as f32 / (width - 1) as f32;
        }
        Prediction {
            raw_score: 3.0,
            score: 0.8,
            threshold: 0.5,
            anomalous: true,
            model: "test".into(),
            map,
            map_width: width,
            map_height: height,
        }
    }

    #[test]
    fn i420_frames_get_an_i420_overlay_that_looks_like_the_rgb_one() {
        let pool = BufferPool::new(4);
        let mut renderer = OverlayRenderer::new(4);
        // Odd sizes too: the last column and row have a chroma block of their own.
        for (width, height) in [(64u32, 48u32), (64, 720), (63, 47)] {
            let frame = crate::yuv::tests::uniform_i420(width, height, [120, 100, 170]);
            let prediction = ramp_prediction(width, height);
            let params = HeatmapParams {
                alpha: 0.4,
                outline: false,
                label: false,
            };
            let overlay = renderer
                .render(&frame, &prediction, &params)
                .expect("renders");
            assert_eq!(overlay.layout.format, PixelFormat::I420);
            let from_planes = crate::yuv::to_rgb_frame(&overlay, &pool);
            let rgb_frame = crate::yuv::to_rgb_frame(&frame, &pool);
            let from_rgb = renderer
                .render(&rgb_frame, &prediction, &params)
                .expect("renders");
            assert_eq!(from_rgb.layout.format, PixelFormat::Rgb);
            // Chroma is blended per 2x2 block with the map's colour at the block's centre, so a
            // pixel lies between the RGB overlay's two pixels of its block's row, give or take
            // half the luma step between them (its luma is its own) and the roundings of three
            // colour conversions.
            let width = width as usize;
            for y in 0..height as usize {
                for x in 0..width {
                    let pixel = |frame: &Frame, x: usize| {
                        let at = (y * width + x) * 3;
                        <[u8; 3]>::try_from(&frame.pixels()[at..at + 3]).expect("three bytes")
                    };
                    let a = pixel(&from_planes, x);
                    let block = [x & !1, ((x & !1) + 1).min(width - 1)];
                    let b = block.map(|x| pixel(&from_rgb, x));
                    for c in 0..3 {
                        let (low, high) = (b[0][c].min(b[1][c]), b[0][c].max(b[1][c]));
                        assert!(
                            (low.saturating_sub(6)..=high.saturating_add(6)).contains(&a[c]),
                            "({x}, {y}): {a:?} vs {b:?}"
                        );
                    }
                }
            }
        }
        // The outline and label are drawn too.
        let frame = crate::yuv::tests::uniform_i420(64, 480, [120, 128, 128]);
        let prediction = ramp_prediction(64, 480);
        let plain = renderer
            .render(
                &frame,
                &prediction,
                &HeatmapParams {
                    alpha: 0.4,
                    outline: false,
                    label: false,
                },
            )
            .expect("renders");
        let decorated = renderer
            .render(
                &frame,
                &prediction,
                &HeatmapParams {
                    alpha: 0.4,
                    outline: true,
                    label: true,
                },
            )
            .expect("renders");
        let differing = plain
            .pixels()
            .iter()
            .zip(decorated.pixels())
            .filter(|(a, b)| a != b)
            .count();
        assert!(differing > 100, "{differing} bytes differ");
    }

    /// A `width` x `height` map with one hot square in the middle of a cold field.
    fn hot_square(width: u32, height: u32) -> Prediction {
        let pool = BufferPool::new(1);
        let mut map = pool.get((width * height) as usize);
        for (index, value) in map.iter_mut().enumerate() {
            let (x, y) = (index as u32 % width, index as u32 / width);
            let inside = (width / 4..3 * width / 4).contains(&x)
                && (height / 4..3 * height / 4).contains(&y);
            *value = if inside { 0.9 } else { 0.1 };
        }
        Prediction {
            map,
            map_width: width,
            map_height: height,
            ..ramp_prediction(2, 1)
        }
    }

    /// `map` (`width` x `height`) resized to 96x64 as a prediction of its own.
    fn resized_to_frame(map: &Prediction) -> Prediction {
        let full = crate::map_upsample::upsample(
            &map.map,
            map.map_width as usize,
            map.map_height as usize,
            96,
            64,
        );
        let mut values = BufferPool::new(1).get(full.len());
        values.copy_from_slice(&full);
        Prediction {
            map: values,
            map_width: 96,
            map_height: 64,
            model: Arc::clone(&map.model),
            ..*map
        }
    }

    /// A 96x64 I420 frame and the same frame in RGB.
    fn both_kinds_of_frame() -> [Frame; 2] {
        let frame = crate::yuv::tests::uniform_i420(96, 64, [120, 100, 170]);
        let rgb = crate::yuv::to_rgb_frame(&frame, &BufferPool::new(1));
        [frame, rgb]
    }

    #[test]
    fn a_smooth_model_sized_map_draws_like_the_map_resized_to_the_frame_first() {
        // Colours are made at the map's size and resized, so they differ from the colours of
        // the resized values only where a jet channel bends between two map values: by at most
        // 1020 (the change of slope, per unit) x the values' difference / 4, x alpha. Here
        // neighbours differ by up to 0.064 (16 levels): 8, plus 3 for rounding.
        let mut renderer = OverlayRenderer::new(4);
        let params = HeatmapParams {
            alpha: 0.5,
            outline: false,
            label: false,
        };
        let mut small = hot_square(24, 16);
        for (index, value) in small.map.iter_mut().enumerate() {
            let (x, y) = ((index % 24) as f32, (index / 24) as f32);
            *value = 0.5 + 0.45 * (x / 7.0).sin() * (y / 5.0).cos();
        }
        let full = resized_to_frame(&small);
        for frame in both_kinds_of_frame() {
            let from_small = renderer.render(&frame, &small, &params).expect("renders");
            let from_full = renderer.render(&frame, &full, &params).expect("renders");
            assert_eq!(from_small.layout, from_full.layout);
            let worst = from_small
                .pixels()
                .iter()
                .zip(from_full.pixels())
                .map(|(a, b)| a.abs_diff(*b))
                .max();
            assert!(
                worst <= Some(11),
                "{:?}: off by {worst:?}",
                frame.layout.format
            );
        }
    }

    #[test]
    fn the_outline_follows_the_resized_map_whatever_its_size() {
        let mut renderer = OverlayRenderer::new(4);
        let params = HeatmapParams {
            alpha: 0.5,
            outline: true,
            label: false,
        };
        let small = hot_square(8, 8);
        let full = resized_to_frame(&small);
        for frame in both_kinds_of_frame() {
            let white = |overlay: &Frame| -> Vec<usize> {
                let bytes = overlay.pixels();
                let luma_or_rgb = match overlay.layout.format {
                    PixelFormat::I420 => &bytes[..96 * 64],
                    _ => bytes,
                };
                let white = if overlay.layout.format == PixelFormat::I420 {
                    yuv::JFIF.to_yuv([255, 255, 255])[0]
                } else {
                    255
                };
                (0..luma_or_rgb.len())
                    .filter(|at| luma_or_rgb[*at] == white)
                    .collect()
            };
            let from_small = renderer.render(&frame, &small, &params).expect("renders");
            let from_full = renderer.render(&frame, &full, &params).expect("renders");
            let (edge_small, edge_full) = (white(&from_small), white(&from_full));
            assert!(edge_small.len() > 100, "{} white bytes", edge_small.len());
            assert_eq!(edge_small, edge_full);
        }
    }

    #[test]
    fn a_map_without_values_is_refused_not_drawn() {
        let mut renderer = OverlayRenderer::new(1);
        let frame = crate::yuv::tests::uniform_i420(16, 16, [120, 128, 128]);
        let mut empty = hot_square(4, 4);
        empty.map_width = 5;
        let params = HeatmapParams {
            alpha: 0.4,
            outline: true,
            label: true,
        };
        let Err(error) = renderer.render(&frame, &empty, &params) else {
            panic!("a map shorter than its size was drawn");
        };
        assert!(error.to_string().contains("5x4"), "{error}");
    }
}
