//! `heatmap`: draws the anomaly map over the frame for people to look at: a jet colour map
//! blended with the image (`alpha`), an optional outline of the region above the threshold, and
//! the label and score ("ANOMALOUS 87%") in the top-left corner. The result goes into the packet's
//! `overlay` frame (a new pooled RGB image); the original frame is left untouched.

use std::sync::Arc;

use serde::Deserialize;

use crate::contract::{
    Emitter, OpError, OperatorInstance, OperatorKind, OutputType, PortType, Transform,
};
use crate::packet::{Frame, ImageLayout, Packet, PixelFormat, Prediction};
use crate::pool::BufferPool;
use crate::registry::OperatorDescriptor;
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
        "Blends a colour-mapped anomaly map over the frame, outlines the anomalous region and writes the label and score.",
    )
    .input("in", PortType::Prediction)
    .output("out", OutputType::Fixed(PortType::Prediction))
    .build_with(|params, _node_id| {
        if !(0.0..=1.0).contains(&params.alpha) {
            return Err(OpError::param("alpha", "must be between 0 and 1"));
        }
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

/// Draws the overlay for `frame` (any pixel format) as a new RGB frame from `pool`.
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
    let layout = ImageLayout::packed(source.width, source.height, PixelFormat::Rgb);
    let mut pixels = pool.get(layout.byte_len());
    let (width, height) = (source.width as usize, source.height as usize);
    // Integer blend through a 256-entry table of pre-weighted colours: no float work per pixel.
    let weight = (params.alpha * 256.0).round() as u32;
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
        let colour = &colours[(level.clamp(0.0, 1.0) * 255.0) as usize];
        for c in 0..3 {
            target[c] = ((u32::from(rgb[c]) * keep + colour[c]) >> 8) as u8;
        }
    };
    let yuv = yuv::Planes::of(frame);
    let matrix = yuv::matrix_for_height(source.height);
    let channels = source.format.channels();
    for y in 0..height {
        let map_row = &prediction.map[y * width..(y + 1) * width];
        let out_row = &mut pixels[y * width * 3..(y + 1) * width * 3];
        if let Some(planes) = &yuv {
            for (x, (level, target)) in map_row.iter().zip(out_row.chunks_exact_mut(3)).enumerate()
            {
                blend(planes.rgb_at(&matrix, x, y), *level, target);
            }
            continue;
        }
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
    if params.outline {
        let above = |x: usize, y: usize| prediction.map[y * width + x] >= prediction.threshold;
        for y in 1..height.saturating_sub(1) {
            for x in 1..width.saturating_sub(1) {
                if above(x, y)
                    && (!above(x - 1, y)
                        || !above(x + 1, y)
                        || !above(x, y - 1)
                        || !above(x, y + 1))
                {
                    pixels[(y * width + x) * 3..(y * width + x) * 3 + 3]
                        .copy_from_slice(&[255, 255, 255]);
                }
            }
        }
    }
    if params.label {
        let verdict = if prediction.anomalous {
            "ANOMALOUS"
        } else {
            "NORMAL"
        };
        let text = format!("{verdict} {:.0}%", prediction.score * 100.0);
        let scale = (height / 160).clamp(1, 6);
        let colour = if prediction.anomalous {
            [255, 40, 40]
        } else {
            [40, 230, 40]
        };
        draw_text(
            &mut pixels,
            width,
            height,
            &text,
            4 * scale,
            4 * scale,
            scale,
            colour,
        );
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

/// Writes `text` with its top-left corner at (`left`, `top`), each font pixel `scale` pixels wide,
/// on a dark box so it reads on any image. Clipped at the image border.
#[allow(clippy::too_many_arguments)]
fn draw_text(
    pixels: &mut [u8],
    width: usize,
    height: usize,
    text: &str,
    left: usize,
    top: usize,
    scale: usize,
    colour: [u8; 3],
) {
    let advance = 6 * scale;
    let box_right = (left + text.chars().count() * advance + scale).min(width);
    let box_bottom = (top + 9 * scale).min(height);
    for y in top.saturating_sub(scale)..box_bottom {
        for x in left.saturating_sub(scale)..box_right {
            let p = &mut pixels[(y * width + x) * 3..(y * width + x) * 3 + 3];
            p.iter_mut().for_each(|v| *v /= 4);
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
                            pixels[(y * width + x) * 3..(y * width + x) * 3 + 3]
                                .copy_from_slice(&colour);
                        }
                    }
                }
            }
        }
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
}
