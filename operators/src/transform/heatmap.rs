//! `heatmap`: draws the anomaly map over the frame for people to look at: a jet colour map
//! blended with the image (`alpha`), an optional outline of the region above the threshold, and
//! the label and score ("ANOMALOUS 87%") in the top-left corner. The result goes into the packet's
//! `overlay` frame (a new pooled image); the original frame is left untouched.
//!
//! Video frames (I420) are blended in their own planes, and the overlay stays I420: the blend is
//! linear, so mixing the colour map's YUV into the frame's YUV gives the same picture as mixing in
//! RGB, at half the bytes and without a colour conversion per pixel (JPEG and H.264 encoders take
//! I420 as it is). Other frames give an RGB overlay.

use std::sync::Arc;

use serde::Deserialize;

use crate::contract::{
    Emitter, OpError, OperatorInstance, OperatorKind, OutputType, PortType, Transform,
};
use crate::packet::{Frame, ImageLayout, Packet, PixelFormat, Prediction};
use crate::pool::BufferPool;
use crate::registry::{OperatorDescriptor, ParamError};
use crate::yuv;

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
    .validate(HeatmapParams::validate)
    .build_with(|params, _context| {
        Ok(OperatorInstance::Transform(Box::new(Heatmap {
            params,
            pool: BufferPool::new(32),
        })))
    })
}

/// The running operator.
pub struct Heatmap {
    params: HeatmapParams,
    pool: BufferPool<u8>,
}

impl Transform for Heatmap {
    fn process(&mut self, mut packet: Packet, out: &mut Emitter) -> Result<(), OpError> {
        let prediction = packet.prediction.clone().ok_or_else(|| {
            OpError::UnsupportedInput(
                "packet has no prediction: put `anomaly` before `heatmap`".into(),
            )
        })?;
        packet.overlay = Some(render(
            &packet.frame,
            &prediction,
            &self.params,
            &self.pool,
        )?);
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

/// The map value as a colour table index (0-255).
#[inline(always)]
fn level_index(value: f32) -> usize {
    (value.clamp(0.0, 1.0) * 255.0) as usize
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

/// Calls `mark(x, y)` for every pixel on the edge of the region whose map value reaches the
/// threshold.
fn outline(
    prediction: &Prediction,
    width: usize,
    height: usize,
    mut mark: impl FnMut(usize, usize),
) {
    let above = |x: usize, y: usize| prediction.map[y * width + x] >= prediction.threshold;
    for y in 1..height.saturating_sub(1) {
        for x in 1..width.saturating_sub(1) {
            if above(x, y)
                && (!above(x - 1, y) || !above(x + 1, y) || !above(x, y - 1) || !above(x, y + 1))
            {
                mark(x, y);
            }
        }
    }
}

/// Draws the overlay for `frame` as a new frame from `pool`: I420 for I420 frames, RGB for the
/// others.
pub fn render(
    frame: &Frame,
    prediction: &Prediction,
    params: &HeatmapParams,
    pool: &BufferPool<u8>,
) -> Result<Frame, OpError> {
    let source = frame.layout;
    if (prediction.map_width, prediction.map_height) != (source.width, source.height) {
        return Err(OpError::UnsupportedInput(format!(
            "anomaly map is {}x{} but the frame is {}x{}",
            prediction.map_width, prediction.map_height, source.width, source.height
        )));
    }
    if let Some(planes) = yuv::Planes::of(frame) {
        return Ok(render_i420(frame, &planes, prediction, params, pool));
    }
    let layout = ImageLayout::packed(source.width, source.height, PixelFormat::Rgb);
    let mut pixels = pool.get(layout.byte_len());
    let (width, height) = (source.width as usize, source.height as usize);
    // Integer blend through a 256-entry table of pre-weighted colours: no float work per pixel.
    let weight = map_weight(params.alpha);
    let keep = 256 - weight;
    let mut colours = [[0u32; 3]; 256];
    for (level, colour) in colours.iter_mut().enumerate() {
        let rgb = jet(level as f32 / 255.0);
        *colour = [
            u32::from(rgb[0]) * weight,
            u32::from(rgb[1]) * weight,
            u32::from(rgb[2]) * weight,
        ];
    }
    let blend = |rgb: [u8; 3], level: f32, target: &mut [u8]| {
        let colour = &colours[level_index(level)];
        for c in 0..3 {
            target[c] = ((u32::from(rgb[c]) * keep + colour[c]) >> 8) as u8;
        }
    };
    let channels = source.format.channels();
    for y in 0..height {
        let map_row = &prediction.map[y * width..(y + 1) * width];
        let out_row = &mut pixels[y * width * 3..(y + 1) * width * 3];
        let row = &frame.pixels()[y * source.stride..y * source.stride + width * channels];
        for ((p, level), target) in row
            .chunks_exact(channels)
            .zip(map_row)
            .zip(out_row.chunks_exact_mut(3))
        {
            let rgb = match source.format {
                PixelFormat::Rgb => [p[0], p[1], p[2]],
                PixelFormat::Bgr => [p[2], p[1], p[0]],
                PixelFormat::Gray | PixelFormat::I420 => [p[0], p[0], p[0]],
            };
            blend(rgb, *level, target);
        }
    }
    let pixel = |x: usize, y: usize| (y * width + x) * 3..(y * width + x) * 3 + 3;
    if params.outline {
        outline(prediction, width, height, |x, y| {
            pixels[pixel(x, y)].copy_from_slice(&[255, 255, 255]);
        });
    }
    if params.label {
        let (text, colour) = label_of(prediction);
        draw_text(width, height, &text, |x, y, paint| match paint {
            Paint::Shade => pixels[pixel(x, y)].iter_mut().for_each(|v| *v /= 4),
            Paint::Ink => pixels[pixel(x, y)].copy_from_slice(&colour),
        });
    }
    Ok(Frame::new(
        pixels,
        layout,
        Arc::clone(&frame.stream_id),
        frame.sequence,
        frame.capture,
    ))
}

/// 5x7 glyphs (one byte per row, low 5 bits, leftmost pixel in bit 4) for the characters labels use.
fn glyph(c: char) -> [u8; 7] {
    match c {
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x19, 0x15, 0x13, 0x11, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        _ => [0; 7],
    }
}

/// What [`draw_text`] asks of a pixel.
#[derive(Clone, Copy)]
enum Paint {
    /// Part of the dark box behind the text: darken it.
    Shade,
    /// Part of a letter: the text colour.
    Ink,
}

/// Writes `text` in the top-left corner (each font pixel a square of a side that grows with the
/// image), on a dark box so it reads on any image, by calling `paint` for each pixel. Clipped at
/// the image border.
fn draw_text(width: usize, height: usize, text: &str, mut paint: impl FnMut(usize, usize, Paint)) {
    let scale = (height / 160).clamp(1, 6);
    let (left, top) = (4 * scale, 4 * scale);
    let advance = 6 * scale;
    let box_right = (left + text.chars().count() * advance + scale).min(width);
    let box_bottom = (top + 9 * scale).min(height);
    for y in top.saturating_sub(scale)..box_bottom {
        for x in left.saturating_sub(scale)..box_right {
            paint(x, y, Paint::Shade);
        }
    }
    for (index, c) in text.chars().enumerate() {
        let rows = glyph(c);
        for (row, bits) in rows.iter().enumerate() {
            for column in 0..5 {
                if bits & (0x10 >> column) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let x = left + index * advance + column * scale + dx;
                        let y = top + row * scale + dy;
                        if x < width && y < height {
                            paint(x, y, Paint::Ink);
                        }
                    }
                }
            }
        }
    }
}

/// The overlay of an I420 frame, blended plane by plane into a new I420 frame: luma per pixel,
/// chroma per 2x2 block (with the map value of the block's top-left pixel).
fn render_i420(
    frame: &Frame,
    planes: &yuv::Planes,
    prediction: &Prediction,
    params: &HeatmapParams,
    pool: &BufferPool<u8>,
) -> Frame {
    let source = frame.layout;
    let (width, height) = (source.width as usize, source.height as usize);
    let layout = ImageLayout::packed(source.width, source.height, PixelFormat::I420);
    let (chroma_width, chroma_height) = layout.chroma_size();
    let matrix = yuv::matrix_for_height(source.height);
    let weight = map_weight(params.alpha);
    let keep = 256 - weight;
    // The colour map in YUV, pre-weighted, one table per plane.
    let mut tables = [[0u32; 256]; 3];
    for level in 0..256 {
        let colour = matrix.to_yuv(jet(level as f32 / 255.0));
        for (table, value) in tables.iter_mut().zip(colour) {
            table[level] = u32::from(value) * weight;
        }
    }
    let mut pixels = pool.get(layout.byte_len());
    let (luma, chroma) = pixels.split_at_mut(width * height);
    let (u_out, v_out) = chroma.split_at_mut(chroma_width * chroma_height);
    let mix = |value: u8, weighted: u32| ((u32::from(value) * keep + weighted) >> 8) as u8;
    for y in 0..height {
        let map_row = &prediction.map[y * width..(y + 1) * width];
        let in_row = &planes.y[y * planes.y_stride..y * planes.y_stride + width];
        let out_row = &mut luma[y * width..(y + 1) * width];
        for ((target, value), level) in out_row.iter_mut().zip(in_row).zip(map_row) {
            *target = mix(*value, tables[0][level_index(*level)]);
        }
    }
    for cy in 0..chroma_height {
        let map_row = &prediction.map[(2 * cy) * width..(2 * cy + 1) * width];
        let row = cy * chroma_width..(cy + 1) * chroma_width;
        for (cx, ((u_target, v_target), (u, v))) in u_out[row.clone()]
            .iter_mut()
            .zip(&mut v_out[row.clone()])
            .zip(planes.u[row.clone()].iter().zip(&planes.v[row]))
            .enumerate()
        {
            let level = level_index(map_row[2 * cx]);
            *u_target = mix(*u, tables[1][level]);
            *v_target = mix(*v, tables[2][level]);
        }
    }
    let chroma_at = |x: usize, y: usize| (y / 2) * chroma_width + x / 2;
    if params.outline {
        let [white_y, white_u, white_v] = matrix.to_yuv([255, 255, 255]);
        outline(prediction, width, height, |x, y| {
            luma[y * width + x] = white_y;
            u_out[chroma_at(x, y)] = white_u;
            v_out[chroma_at(x, y)] = white_v;
        });
    }
    if params.label {
        let (text, colour) = label_of(prediction);
        let [ink_y, ink_u, ink_v] = matrix.to_yuv(colour);
        draw_text(width, height, &text, |x, y, paint| {
            let chroma = chroma_at(x, y);
            // Chroma is shared by a 2x2 block: shade it once, from the block's top-left pixel.
            let block_origin = x % 2 == 0 && y % 2 == 0;
            match paint {
                Paint::Shade => {
                    let shaded = &mut luma[y * width + x];
                    *shaded = 16 + shaded.saturating_sub(16) / 4;
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
    Frame::new(
        pixels,
        layout,
        Arc::clone(&frame.stream_id),
        frame.sequence,
        frame.capture,
    )
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
        for height in [48u32, 720] {
            let width = 64;
            let frame = crate::yuv::tests::uniform_i420(width, height, [120, 100, 170]);
            let prediction = ramp_prediction(width, height);
            let params = HeatmapParams {
                alpha: 0.4,
                outline: false,
                label: false,
            };
            let overlay = render(&frame, &prediction, &params, &pool).expect("renders");
            assert_eq!(overlay.layout.format, PixelFormat::I420);
            let from_planes = crate::yuv::to_rgb_frame(&overlay, &pool);
            let rgb_frame = crate::yuv::to_rgb_frame(&frame, &pool);
            let from_rgb = render(&rgb_frame, &prediction, &params, &pool).expect("renders");
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
        let plain = render(
            &frame,
            &prediction,
            &HeatmapParams {
                alpha: 0.4,
                outline: false,
                label: false,
            },
            &pool,
        )
        .expect("renders");
        let decorated = render(
            &frame,
            &prediction,
            &HeatmapParams {
                alpha: 0.4,
                outline: true,
                label: true,
            },
            &pool,
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
}
