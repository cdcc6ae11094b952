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
//! The anomaly map arrives at the model's resolution and is resized to the frame one row at a
//! time ([`MapRows`]) while the blend walks the rows.

use std::sync::Arc;

use serde::Deserialize;

use crate::contract::{
    Emitter, OpError, OperatorInstance, OperatorKind, OutputType, PortType, Transform,
};
use crate::map_upsample::MapRows;
use crate::packet::{Frame, ImageLayout, Packet, PixelFormat, Prediction, YuvEncoding};
use crate::pool::{BufferPool, PooledBuffer};
use crate::registry::{OperatorDescriptor, ParamError};
use crate::yuv;

mod rows;
mod text;

use rows::{PlaneBlend, blend_chroma, blend_luma, chroma_in_luma, level_index, levels_of};
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
fn map_weight(alpha: f32) -> u32 {
    (alpha * 256.0).round() as u32
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

/// Whether `x` of row `current` is on the edge of the region whose map value reaches
/// `threshold` (it does, and a 4-neighbour does not). Border pixels are never on it.
#[inline(always)]
fn on_outline(rows: &MapWindow, x: usize, threshold: f32) -> bool {
    let MapWindow {
        previous,
        current,
        next,
        ..
    } = rows;
    x > 0
        && x + 1 < current.len()
        && current[x] >= threshold
        && (current[x - 1] < threshold
            || current[x + 1] < threshold
            || previous[x] < threshold
            || next[x] < threshold)
}

/// Rows `y - 1`, `y` and `y + 1` of the anomaly map at the frame's size (the outline looks at
/// a pixel's neighbours). At the first and last row the missing neighbour is the row itself.
struct MapWindow<'a> {
    previous: &'a [f32],
    current: &'a [f32],
    next: &'a [f32],
    /// The current row as colour table indices.
    levels: &'a [u8],
    /// The columns of the current row whose level reaches the threshold's, first to last
    /// (empty when none does): only they can be on the outline.
    at_or_above: std::ops::Range<usize>,
}

/// Draws overlays. Keeps its output pool and its scratch rows from frame to frame, so drawing
/// allocates nothing in steady state.
pub struct OverlayRenderer {
    pool: BufferPool<u8>,
    map_rows: MapRows,
    /// Three rows of the map at the frame's width, rotated as the rows advance.
    window: [Vec<f32>; 3],
    /// The current row's colour table indices.
    levels: Vec<u8>,
    /// Per pixel of a row, what its chroma adds to its luma (I420 overlays).
    chroma_terms: Vec<i32>,
}

impl OverlayRenderer {
    /// A renderer whose overlays come from a pool keeping at most `pooled` idle buffers.
    pub fn new(pooled: usize) -> Self {
        Self {
            pool: BufferPool::new(pooled),
            map_rows: MapRows::default(),
            window: Default::default(),
            levels: Vec::new(),
            chroma_terms: Vec::new(),
        }
    }

    /// Draws the overlay for `frame` as a new frame from the pool: I420 for I420 frames, RGB
    /// for the others. The map is resized to the frame row by row as the blend needs it.
    pub fn render(
        &mut self,
        frame: &Frame,
        prediction: &Prediction,
        params: &HeatmapParams,
    ) -> Result<Frame, OpError> {
        let (map_width, map_height) = (
            prediction.map_width as usize,
            prediction.map_height as usize,
        );
        if map_width == 0 || map_height == 0 || prediction.map.len() < map_width * map_height {
            return Err(OpError::UnsupportedInput(format!(
                "anomaly map of {map_width}x{map_height} holds {} values",
                prediction.map.len()
            )));
        }
        let (width, height) = (frame.layout.width as usize, frame.layout.height as usize);
        self.map_rows.prepare(map_width, map_height, width, height);
        for row in &mut self.window {
            row.resize(width, 0.0);
        }
        self.levels.resize(width, 0);
        let pixels = match yuv::Planes::of(frame) {
            Some(planes) => self.blend_i420(&planes, width, height, prediction, params),
            None => self.blend_packed(frame, prediction, params),
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

    /// Calls `visit(y, rows)` for each row of the map at the frame's size, in order.
    fn for_each_row(
        &mut self,
        map: &[f32],
        height: usize,
        threshold: f32,
        mut visit: impl FnMut(usize, &MapWindow),
    ) {
        let [previous, current, next] = &mut self.window;
        let threshold_level = level_index(threshold);
        self.map_rows.row(map, 0, current);
        for y in 0..height {
            if y + 1 < height {
                self.map_rows.row(map, y + 1, next);
            }
            let highest = levels_of(current, &mut self.levels);
            let at_or_above = if highest >= threshold_level {
                let reaches = |level: &u8| *level >= threshold_level;
                let first = self.levels.iter().position(reaches).unwrap_or(0);
                let last = self.levels.iter().rposition(reaches).unwrap_or(0);
                first..last + 1
            } else {
                0..0
            };
            let rows = MapWindow {
                previous: if y == 0 { current } else { previous },
                current,
                next: if y + 1 < height { next } else { current },
                levels: &self.levels,
                at_or_above,
            };
            visit(y, &rows);
            // The current row becomes the previous one and the next the current one; the old
            // previous row's memory takes the next row.
            std::mem::swap(previous, current);
            std::mem::swap(current, next);
        }
    }

    /// The RGB overlay of an RGB, BGR or grey frame.
    fn blend_packed(
        &mut self,
        frame: &Frame,
        prediction: &Prediction,
        params: &HeatmapParams,
    ) -> PooledBuffer<u8> {
        let source = frame.layout;
        let (width, height) = (source.width as usize, source.height as usize);
        let mut pixels = self.pool.get(width * height * 3);
        // Integer blend through a 256-entry table of pre-weighted colours: no float work per
        // pixel beyond the map value's table index.
        let weight = map_weight(params.alpha);
        let keep = 256 - weight;
        let mut colours = [[0u32; 3]; 256];
        for (level, colour) in colours.iter_mut().enumerate() {
            *colour = jet(level as f32 / 255.0).map(|c| u32::from(c) * weight);
        }
        let channels = source.format.channels();
        let threshold = prediction.threshold;
        self.for_each_row(&prediction.map, height, threshold, |y, rows| {
            let out_row = &mut pixels[y * width * 3..(y + 1) * width * 3];
            let row = &frame.pixels()[y * source.stride..y * source.stride + width * channels];
            for ((p, level), target) in row
                .chunks_exact(channels)
                .zip(rows.levels)
                .zip(out_row.chunks_exact_mut(3))
            {
                let rgb = match source.format {
                    PixelFormat::Rgb => [p[0], p[1], p[2]],
                    PixelFormat::Bgr => [p[2], p[1], p[0]],
                    PixelFormat::Gray | PixelFormat::I420 => [p[0], p[0], p[0]],
                };
                let colour = &colours[usize::from(*level)];
                for c in 0..3 {
                    target[c] = ((u32::from(rgb[c]) * keep + colour[c]) >> 8) as u8;
                }
            }
            if params.outline {
                for x in rows.at_or_above.clone() {
                    if on_outline(rows, x, threshold) {
                        out_row[x * 3..x * 3 + 3].copy_from_slice(&[255, 255, 255]);
                    }
                }
            }
        });
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
}

impl OverlayRenderer {
    /// The overlay of an I420 frame, blended plane by plane into new I420 planes in JPEG's
    /// YCbCr (the frame's values converted as they are read, so encoders need no pass of their
    /// own): luma per pixel, chroma per 2x2 block (with the map value of the block's top-left
    /// pixel).
    fn blend_i420(
        &mut self,
        planes: &yuv::Planes,
        width: usize,
        height: usize,
        prediction: &Prediction,
        params: &HeatmapParams,
    ) -> PooledBuffer<u8> {
        let layout = ImageLayout::packed(width as u32, height as u32, PixelFormat::I420);
        let (chroma_width, chroma_height) = layout.chroma_size();
        let convert = yuv::ToJfif::new(&planes.matrix);
        let matrix = yuv::JFIF;
        let weight = map_weight(params.alpha);
        let keep = 256 - weight;
        // The colour map in YCbCr, pre-weighted, one table per plane.
        let mut tables = [[0u32; 256]; 3];
        for level in 0..256 {
            let colour = matrix.to_yuv(jet(level as f32 / 255.0));
            for (table, value) in tables.iter_mut().zip(colour) {
                table[level] = u32::from(value) * weight;
            }
        }
        let [white_y, white_u, white_v] = matrix.to_yuv([255, 255, 255]);
        let mut pixels = self.pool.get(layout.byte_len());
        let (luma, chroma) = pixels.split_at_mut(width * height);
        let (u_out, v_out) = chroma.split_at_mut(chroma_width * chroma_height);
        let blend = PlaneBlend {
            convert: &convert,
            tables: &tables,
            keep,
        };
        // What each pixel's chroma adds to its luma, for the current pair of rows (zero when
        // the frame is BT.601).
        let mut chroma_terms = std::mem::take(&mut self.chroma_terms);
        chroma_terms.clear();
        chroma_terms.resize(width, 0);
        let threshold = prediction.threshold;
        self.for_each_row(&prediction.map, height, threshold, |y, rows| {
            let in_row = &planes.y[y * planes.y_stride..y * planes.y_stride + width];
            let out_row = &mut luma[y * width..(y + 1) * width];
            let chroma_row = (y / 2) * chroma_width..(y / 2 + 1) * chroma_width;
            let (u_row, v_row) = (&planes.u[chroma_row.clone()], &planes.v[chroma_row.clone()]);
            if y % 2 == 0 && convert.mixes_chroma() {
                chroma_in_luma(&blend, u_row, v_row, &mut chroma_terms);
            }
            blend_luma(&blend, in_row, &chroma_terms, rows.levels, out_row);
            if y % 2 == 0 {
                blend_chroma(
                    &blend,
                    rows.levels,
                    u_row,
                    v_row,
                    &mut u_out[chroma_row.clone()],
                    &mut v_out[chroma_row.clone()],
                );
            }
            if params.outline {
                for x in rows.at_or_above.clone() {
                    if on_outline(rows, x, threshold) {
                        out_row[x] = white_y;
                        u_out[chroma_row.start + x / 2] = white_u;
                        v_out[chroma_row.start + x / 2] = white_v;
                    }
                }
            }
        });
        self.chroma_terms = chroma_terms;
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
            // Chroma is blended per 2x2 block, so compare even columns (the block's own map value).
            for y in 0..height as usize {
                for x in (0..width as usize).step_by(2) {
                    let at = (y * width as usize + x) * 3;
                    let a = &from_planes.pixels()[at..at + 3];
                    let b = &from_rgb.pixels()[at..at + 3];
                    for (p, q) in a.iter().zip(b) {
                        assert!(p.abs_diff(*q) <= 4, "({x}, {y}): {a:?} vs {b:?}");
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

    #[test]
    fn a_model_sized_map_draws_the_same_as_the_map_resized_to_the_frame_first() {
        let mut renderer = OverlayRenderer::new(4);
        let params = HeatmapParams {
            alpha: 0.5,
            outline: true,
            label: false,
        };
        let small = hot_square(8, 8);
        let full = crate::map_upsample::upsample(&small.map, 8, 8, 96, 64);
        let pool = BufferPool::new(1);
        let mut map = pool.get(full.len());
        map.copy_from_slice(&full);
        let resized = Prediction {
            map,
            map_width: 96,
            map_height: 64,
            ..hot_square(8, 8)
        };
        for frame in [
            crate::yuv::tests::uniform_i420(96, 64, [120, 100, 170]),
            crate::yuv::to_rgb_frame(
                &crate::yuv::tests::uniform_i420(96, 64, [120, 100, 170]),
                &BufferPool::new(1),
            ),
        ] {
            let from_small = renderer.render(&frame, &small, &params).expect("renders");
            let from_full = renderer.render(&frame, &resized, &params).expect("renders");
            assert_eq!(from_small.layout, from_full.layout);
            assert!(from_small.pixels() == from_full.pixels());
            // The outline is there: white luma (or white RGB) where the square's edge is.
            let white = from_small.pixels().iter().filter(|v| **v >= 235).count();
            assert!(white > 100, "{white} white bytes");
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
