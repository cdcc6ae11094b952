//! YUV 4:2:0 (I420) frames, as video decoders produce them: plane access and conversion to RGB.
//!
//! Video sources keep frames in I420 so that the expensive full-size colour conversion does not
//! run on every frame (at 1080p it costs more than decoding). Operators that need RGB convert at
//! the size they work at: `preprocess` resizes the three planes to the model's input size first
//! and converts only those pixels; the heatmap overlay converts per pixel as it blends; encoders
//! and the folder sink convert the whole frame with [`to_rgb_frame`], only when they run.
//!
//! Limited-range ("TV") YUV with the BT.709 matrix for frames 720 rows high or more and BT.601
//! below, the same default GStreamer assumes when a stream does not say.

use crate::packet::{Frame, ImageLayout, PixelFormat};
use crate::pool::BufferPool;

/// Fixed-point (16 fractional bits) coefficients of one YUV to RGB matrix, limited range, and
/// the luma weights of red and blue (in 1/65536) for the way back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Matrix {
    red_weight: i32,
    blue_weight: i32,
    luma: i32,
    red_from_v: i32,
    green_from_u: i32,
    green_from_v: i32,
    blue_from_u: i32,
}

const fn fixed(value: f64) -> i32 {
    (value * 65536.0 + 0.5) as i32
}

/// ITU-R BT.601 (standard definition).
pub const BT601: Matrix = Matrix {
    red_weight: fixed(0.299),
    blue_weight: fixed(0.114),
    luma: fixed(1.164_383),
    red_from_v: fixed(1.596_027),
    green_from_u: fixed(0.391_762),
    green_from_v: fixed(0.812_968),
    blue_from_u: fixed(2.017_232),
};

/// ITU-R BT.709 (high definition).
pub const BT709: Matrix = Matrix {
    red_weight: fixed(0.2126),
    blue_weight: fixed(0.0722),
    luma: fixed(1.164_383),
    red_from_v: fixed(1.792_741),
    green_from_u: fixed(0.213_249),
    green_from_v: fixed(0.532_909),
    blue_from_u: fixed(2.112_402),
};

/// The matrix assumed for a frame of this height.
pub const fn matrix_for_height(height: u32) -> Matrix {
    if height >= 720 { BT709 } else { BT601 }
}

impl Matrix {
    /// One pixel to RGB.
    #[inline(always)]
    pub fn to_rgb(&self, y: u8, u: u8, v: u8) -> [u8; 3] {
        let luma = (i32::from(y) - 16) * self.luma + (1 << 15);
        let u = i32::from(u) - 128;
        let v = i32::from(v) - 128;
        let clamp = |value: i32| (value >> 16).clamp(0, 255) as u8;
        [
            clamp(luma + self.red_from_v * v),
            clamp(luma - self.green_from_u * u - self.green_from_v * v),
            clamp(luma + self.blue_from_u * u),
        ]
    }

    /// One RGB colour to limited-range YUV (for colour tables, not per pixel).
    pub fn to_yuv(&self, rgb: [u8; 3]) -> [u8; 3] {
        let [r, g, b] = rgb.map(f32::from);
        let kr = self.red_weight as f32 / 65536.0;
        let kb = self.blue_weight as f32 / 65536.0;
        let luma = kr * r + (1.0 - kr - kb) * g + kb * b;
        let to_byte = |value: f32| value.round().clamp(0.0, 255.0) as u8;
        [
            to_byte(16.0 + luma * 219.0 / 255.0),
            to_byte(128.0 + (b - luma) / (2.0 * (1.0 - kb)) * 224.0 / 255.0),
            to_byte(128.0 + (r - luma) / (2.0 * (1.0 - kr)) * 224.0 / 255.0),
        ]
    }
}

/// The three planes of an I420 frame.
pub struct Planes<'a> {
    /// Luma, `y_stride` bytes a row.
    pub y: &'a [u8],
    /// Blue-difference chroma, `chroma_width` bytes a row.
    pub u: &'a [u8],
    /// Red-difference chroma, `chroma_width` bytes a row.
    pub v: &'a [u8],
    /// Bytes per luma row.
    pub y_stride: usize,
    /// Chroma plane width (and bytes per row).
    pub chroma_width: usize,
    /// Chroma plane height.
    pub chroma_height: usize,
}

impl<'a> Planes<'a> {
    /// Splits an I420 frame's buffer into its planes; `None` for other formats.
    pub fn of(frame: &'a Frame) -> Option<Self> {
        Self::split(frame.layout, frame.pixels())
    }

    /// Splits a buffer laid out as `layout` (which must be I420).
    pub fn split(layout: ImageLayout, pixels: &'a [u8]) -> Option<Self> {
        if layout.format != PixelFormat::I420 || pixels.len() < layout.byte_len() {
            return None;
        }
        let (chroma_width, chroma_height) = layout.chroma_size();
        let luma_len = layout.stride * layout.height as usize;
        let chroma_len = chroma_width * chroma_height;
        Some(Self {
            y: &pixels[..luma_len],
            u: &pixels[luma_len..luma_len + chroma_len],
            v: &pixels[luma_len + chroma_len..luma_len + 2 * chroma_len],
            y_stride: layout.stride,
            chroma_width,
            chroma_height,
        })
    }

    /// Pixel (x, y) as RGB.
    #[inline(always)]
    pub fn rgb_at(&self, matrix: &Matrix, x: usize, y: usize) -> [u8; 3] {
        let chroma = (y / 2) * self.chroma_width + x / 2;
        matrix.to_rgb(
            self.y[y * self.y_stride + x],
            self.u[chroma],
            self.v[chroma],
        )
    }
}

/// Converts I420 `planes` (limited range, `matrix`) into the full-range BT.601 YCbCr that JPEG
/// files hold (JFIF), plane by plane into `out` (an I420 buffer of the same size, tightly
/// packed): one pass of integer arithmetic, no RGB in between. Chroma depends only on chroma
/// (grey stays grey in both), luma on luma and, across matrices, its block's chroma.
pub fn to_jfif_planes(
    planes: &Planes,
    matrix: &Matrix,
    width: usize,
    height: usize,
    out: &mut [u8],
) {
    // M = (RGB to JFIF YCbCr) x (limited YUV to RGB), in 16-bit fixed point.
    let to_rgb = [
        [matrix.luma, 0, matrix.red_from_v],
        [matrix.luma, -matrix.green_from_u, -matrix.green_from_v],
        [matrix.luma, matrix.blue_from_u, 0],
    ];
    let to_jfif = [
        [0.299, 0.587, 0.114],
        [-0.168_736, -0.331_264, 0.5],
        [0.5, -0.418_688, -0.081_312],
    ];
    let mut m = [[0i32; 3]; 3];
    for (row, out_row) in m.iter_mut().enumerate() {
        for (column, value) in out_row.iter_mut().enumerate() {
            let sum: f64 = (0..3)
                .map(|k| to_jfif[row][k] * f64::from(to_rgb[k][column]))
                .sum();
            *value = sum.round() as i32;
        }
    }
    let clamp = |value: i32| (value >> 16).clamp(0, 255) as u8;
    let half = 1 << 15;
    let chroma_len = planes.chroma_width * planes.chroma_height;
    let (luma_out, chroma_out) = out.split_at_mut(width * height);
    let (u_out, v_out) = chroma_out.split_at_mut(chroma_len);
    // Luma's own term as a table; the chroma terms are zero when the matrices agree (BT.601).
    let mut luma_term = [0i32; 256];
    for (value, term) in luma_term.iter_mut().enumerate() {
        *term = m[0][0] * (value as i32 - 16) + half;
    }
    let same_matrix = m[0][1] == 0 && m[0][2] == 0;
    for y in 0..height {
        let in_row = &planes.y[y * planes.y_stride..y * planes.y_stride + width];
        let out_row = &mut luma_out[y * width..(y + 1) * width];
        if same_matrix {
            for (target, value) in out_row.iter_mut().zip(in_row) {
                *target = clamp(luma_term[usize::from(*value)]);
            }
            continue;
        }
        let chroma_row = (y / 2) * planes.chroma_width;
        let u_row = &planes.u[chroma_row..chroma_row + planes.chroma_width];
        let v_row = &planes.v[chroma_row..chroma_row + planes.chroma_width];
        // Two luma pixels share one chroma sample.
        for (((targets, values), u), v) in out_row
            .chunks_mut(2)
            .zip(in_row.chunks(2))
            .zip(u_row)
            .zip(v_row)
        {
            let chroma = m[0][1] * (i32::from(*u) - 128) + m[0][2] * (i32::from(*v) - 128);
            for (target, value) in targets.iter_mut().zip(values) {
                *target = clamp(luma_term[usize::from(*value)] + chroma);
            }
        }
    }
    for (index, (u_target, v_target)) in u_out.iter_mut().zip(v_out.iter_mut()).enumerate() {
        let u = i32::from(planes.u[index]) - 128;
        let v = i32::from(planes.v[index]) - 128;
        *u_target = clamp((128 << 16) + m[1][1] * u + m[1][2] * v + half);
        *v_target = clamp((128 << 16) + m[2][1] * u + m[2][2] * v + half);
    }
}

/// Interleaves three same-size planes (Y, and U and V already upsampled to it) into RGB.
pub fn full_planes_to_rgb(matrix: &Matrix, y: &[u8], u: &[u8], v: &[u8], rgb: &mut [u8]) {
    for (((pixel, &y), &u), &v) in rgb.chunks_exact_mut(3).zip(y).zip(u).zip(v) {
        pixel.copy_from_slice(&matrix.to_rgb(y, u, v));
    }
}

/// The whole frame as packed RGB in a buffer from `pool`; provenance is kept. Frames that are not
/// I420 are returned as they are (a pointer copy).
pub fn to_rgb_frame(frame: &Frame, pool: &BufferPool<u8>) -> Frame {
    let Some(planes) = Planes::of(frame) else {
        return frame.clone();
    };
    let (width, height) = (frame.layout.width as usize, frame.layout.height as usize);
    let matrix = matrix_for_height(frame.layout.height);
    let layout = ImageLayout::packed(frame.layout.width, frame.layout.height, PixelFormat::Rgb);
    let mut pixels = pool.get(layout.byte_len());
    for (row_index, row) in pixels.chunks_exact_mut(width * 3).take(height).enumerate() {
        for (x, pixel) in row.chunks_exact_mut(3).enumerate() {
            pixel.copy_from_slice(&planes.rgb_at(&matrix, x, row_index));
        }
    }
    Frame::new(
        pixels,
        layout,
        frame.stream_id.clone(),
        frame.sequence,
        frame.capture,
    )
}

/// The frame as tightly packed RGB bytes (a fresh copy), whatever its pixel format. For saving a
/// frame off the hot path (captures); operators use [`to_rgb_frame`] and their pools instead.
pub fn packed_rgb(frame: &Frame) -> Vec<u8> {
    let (width, height) = (frame.layout.width as usize, frame.layout.height as usize);
    let mut rgb = Vec::with_capacity(width * height * 3);
    if let Some(planes) = Planes::of(frame) {
        let matrix = matrix_for_height(frame.layout.height);
        for y in 0..height {
            for x in 0..width {
                rgb.extend_from_slice(&planes.rgb_at(&matrix, x, y));
            }
        }
        return rgb;
    }
    let format = frame.layout.format;
    let row_bytes = width * format.channels();
    for y in 0..height {
        let start = y * frame.layout.stride;
        for pixel in frame.pixels()[start..start + row_bytes].chunks_exact(format.channels()) {
            match format {
                PixelFormat::Bgr => rgb.extend_from_slice(&[pixel[2], pixel[1], pixel[0]]),
                PixelFormat::Gray => rgb.extend_from_slice(&[pixel[0]; 3]),
                PixelFormat::Rgb | PixelFormat::I420 => rgb.extend_from_slice(&pixel[..3]),
            }
        }
    }
    rgb
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::packet::CaptureTime;

    /// An I420 frame whose every pixel is the YUV triple `(y, u, v)`.
    pub(crate) fn uniform_i420(width: u32, height: u32, yuv: [u8; 3]) -> Frame {
        let layout = ImageLayout::packed(width, height, PixelFormat::I420);
        let pool = BufferPool::new(1);
        let mut pixels = pool.get(layout.byte_len());
        let luma = layout.stride * height as usize;
        let (cw, ch) = layout.chroma_size();
        pixels[..luma].fill(yuv[0]);
        pixels[luma..luma + cw * ch].fill(yuv[1]);
        pixels[luma + cw * ch..].fill(yuv[2]);
        Frame::new(pixels, layout, "test".into(), 0, CaptureTime::now())
    }

    #[test]
    fn reference_colours_convert_within_one_level() {
        // Limited-range BT.601: black, white and the primaries.
        let cases = [
            ([16, 128, 128], [0, 0, 0]),
            ([235, 128, 128], [255, 255, 255]),
            ([81, 90, 240], [255, 0, 0]),
            ([145, 54, 34], [0, 255, 0]),
            ([41, 240, 110], [0, 0, 255]),
        ];
        for (yuv, expected) in cases {
            let rgb = BT601.to_rgb(yuv[0], yuv[1], yuv[2]);
            for (got, want) in rgb.iter().zip(expected) {
                assert!(
                    (i32::from(*got) - want).abs() <= 2,
                    "{yuv:?} gave {rgb:?}, expected {expected:?}"
                );
            }
        }
    }

    #[test]
    fn packed_rgb_converts_every_format_and_drops_row_padding() {
        let white = uniform_i420(5, 3, [235, 128, 128]);
        assert_eq!(packed_rgb(&white), vec![255; 5 * 3 * 3]);

        // 2x2 BGR with 2 bytes of padding after each row.
        let layout = ImageLayout {
            width: 2,
            height: 2,
            stride: 8,
            format: PixelFormat::Bgr,
        };
        let pool = BufferPool::new(1);
        let mut pixels = pool.get(16);
        pixels.copy_from_slice(&[1, 2, 3, 4, 5, 6, 0, 0, 7, 8, 9, 10, 11, 12, 0, 0]);
        let bgr = Frame::new(pixels, layout, "test".into(), 0, CaptureTime::now());
        assert_eq!(
            packed_rgb(&bgr),
            vec![3, 2, 1, 6, 5, 4, 9, 8, 7, 12, 11, 10]
        );
    }

    #[test]
    fn odd_sized_frames_have_rounded_up_chroma_planes() {
        let frame = uniform_i420(5, 3, [235, 128, 128]);
        assert_eq!(frame.layout.byte_len(), 15 + 2 * 3 * 2);
        let rgb = to_rgb_frame(&frame, &BufferPool::new(1));
        assert_eq!(rgb.layout.format, PixelFormat::Rgb);
        assert!(rgb.pixels().iter().all(|&value| value == 255));
        assert_eq!(rgb.sequence, frame.sequence);
    }

    #[test]
    fn rgb_to_yuv_and_back_is_within_two_levels() {
        for matrix in [BT601, BT709] {
            for rgb in [
                [0, 0, 0],
                [255, 255, 255],
                [255, 0, 0],
                [0, 200, 30],
                [10, 20, 240],
                [127, 64, 200],
            ] {
                let [y, u, v] = matrix.to_yuv(rgb);
                let back = matrix.to_rgb(y, u, v);
                for (got, want) in back.iter().zip(rgb) {
                    assert!(
                        got.abs_diff(want) <= 2,
                        "{rgb:?} -> {:?} -> {back:?}",
                        [y, u, v]
                    );
                }
            }
        }
    }
}
