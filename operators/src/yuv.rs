//! YUV 4:2:0 (I420) frames, as video decoders produce them: plane access and conversion to RGB.
//!
//! Video sources keep frames in I420 so that the expensive full-size colour conversion does not
//! run on every frame (at 1080p it costs more than decoding). Operators that need RGB convert at
//! the size they work at: `preprocess` resizes the three planes to the model's input size first
//! and converts only those pixels; the heatmap overlay converts per pixel as it blends; encoders
//! and the folder sink convert the whole frame with [`to_rgb_frame`], only when they run.
//!
//! Which colours the values stand for is the layout's [`YuvEncoding`]: video frames are
//! limited-range ("TV") YUV with the BT.709 matrix for frames 720 rows high or more and BT.601
//! below, the same default GStreamer assumes when a stream does not say; heatmap overlays are
//! full-range BT.601, JPEG's own YCbCr, so that encoders compress them without a pass.

use crate::packet::{Frame, ImageLayout, PixelFormat, YuvEncoding};
use crate::pool::BufferPool;

/// Fixed-point (16 fractional bits) coefficients of one YUV to RGB matrix and range, and the
/// luma weights of red and blue (in 1/65536) for the way back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Matrix {
    /// Full range (luma 0-255, chroma 0-255) instead of limited (16-235, 16-240).
    full_range: bool,
    /// The luma value of black (16 in limited range, 0 in full).
    black: i32,
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

/// ITU-R BT.601 (standard definition), limited range.
pub const BT601: Matrix = Matrix {
    full_range: false,
    black: 16,
    red_weight: fixed(0.299),
    blue_weight: fixed(0.114),
    luma: fixed(1.164_383),
    red_from_v: fixed(1.596_027),
    green_from_u: fixed(0.391_762),
    green_from_v: fixed(0.812_968),
    blue_from_u: fixed(2.017_232),
};

/// ITU-R BT.709 (high definition), limited range.
pub const BT709: Matrix = Matrix {
    full_range: false,
    black: 16,
    red_weight: fixed(0.2126),
    blue_weight: fixed(0.0722),
    luma: fixed(1.164_383),
    red_from_v: fixed(1.792_741),
    green_from_u: fixed(0.213_249),
    green_from_v: fixed(0.532_909),
    blue_from_u: fixed(2.112_402),
};

/// BT.601 in full range: JPEG's YCbCr (JFIF).
pub const JFIF: Matrix = Matrix {
    full_range: true,
    black: 0,
    red_weight: fixed(0.299),
    blue_weight: fixed(0.114),
    luma: fixed(1.0),
    red_from_v: fixed(1.402),
    green_from_u: fixed(0.344_136),
    green_from_v: fixed(0.714_136),
    blue_from_u: fixed(1.772),
};

/// The matrix of an I420 image laid out as `layout`.
pub const fn matrix_of(layout: &ImageLayout) -> Matrix {
    match layout.yuv {
        YuvEncoding::Jpeg => JFIF,
        YuvEncoding::Video if layout.height >= 720 => BT709,
        YuvEncoding::Video => BT601,
    }
}

impl Matrix {
    /// One pixel to RGB.
    #[inline(always)]
    pub fn to_rgb(&self, y: u8, u: u8, v: u8) -> [u8; 3] {
        let luma = (i32::from(y) - self.black) * self.luma + (1 << 15);
        let u = i32::from(u) - 128;
        let v = i32::from(v) - 128;
        let clamp = |value: i32| (value >> 16).clamp(0, 255) as u8;
        [
            clamp(luma + self.red_from_v * v),
            clamp(luma - self.green_from_u * u - self.green_from_v * v),
            clamp(luma + self.blue_from_u * u),
        ]
    }

    /// One RGB colour to YUV of this matrix and range (for colour tables, not per pixel).
    pub fn to_yuv(&self, rgb: [u8; 3]) -> [u8; 3] {
        let [r, g, b] = rgb.map(f32::from);
        let kr = self.red_weight as f32 / 65536.0;
        let kb = self.blue_weight as f32 / 65536.0;
        let luma = kr * r + (1.0 - kr - kb) * g + kb * b;
        let (luma_scale, chroma_scale) = if self.full_range {
            (1.0, 1.0)
        } else {
            (219.0 / 255.0, 224.0 / 255.0)
        };
        let to_byte = |value: f32| value.round().clamp(0.0, 255.0) as u8;
        [
            to_byte(self.black as f32 + luma * luma_scale),
            to_byte(128.0 + (b - luma) / (2.0 * (1.0 - kb)) * chroma_scale),
            to_byte(128.0 + (r - luma) / (2.0 * (1.0 - kr)) * chroma_scale),
        ]
    }

    /// The luma of black.
    pub const fn black(&self) -> u8 {
        self.black as u8
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
    /// What the values stand for.
    pub matrix: Matrix,
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
            matrix: matrix_of(&layout),
        })
    }

    /// Pixel (x, y) as RGB.
    #[inline(always)]
    pub fn rgb_at(&self, x: usize, y: usize) -> [u8; 3] {
        let chroma = (y / 2) * self.chroma_width + x / 2;
        self.matrix.to_rgb(
            self.y[y * self.y_stride + x],
            self.u[chroma],
            self.v[chroma],
        )
    }
}

/// Per-sample conversion from the YUV of one matrix and range to JPEG's YCbCr (full-range
/// BT.601), in 16-bit fixed point, without RGB in between. Chroma depends only on chroma (grey
/// stays grey in both), luma on luma and, across matrices, its block's chroma.
#[derive(Debug, Clone, Copy)]
pub struct ToJfif {
    /// (RGB to JFIF YCbCr) x (this matrix's YUV to RGB).
    m: [[i32; 3]; 3],
    /// Luma's constant term: black's offset and the rounding half.
    luma_offset: i32,
    /// Whether luma depends on chroma (the matrices differ).
    mixes_chroma: bool,
}

impl ToJfif {
    /// The conversion from YUV of `matrix`.
    pub fn new(matrix: &Matrix) -> Self {
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
        Self {
            m,
            luma_offset: (1 << 15) - m[0][0] * matrix.black,
            mixes_chroma: m[0][1] != 0 || m[0][2] != 0,
        }
    }

    /// Whether luma depends on chroma at all (it does not from BT.601).
    pub fn mixes_chroma(&self) -> bool {
        self.mixes_chroma
    }

    /// What a block's chroma adds to its luma (0 when the matrices agree).
    #[inline(always)]
    pub fn chroma_in_luma(&self, u: u8, v: u8) -> i32 {
        self.m[0][1] * (i32::from(u) - 128) + self.m[0][2] * (i32::from(v) - 128)
    }

    /// Luma `y` of a block whose chroma adds `chroma_in_luma`.
    #[inline(always)]
    pub fn luma(&self, y: u8, chroma_in_luma: i32) -> u8 {
        clamp_fixed(self.m[0][0] * i32::from(y) + self.luma_offset + chroma_in_luma)
    }

    /// Chroma (U, V).
    #[inline(always)]
    pub fn chroma(&self, u: u8, v: u8) -> [u8; 2] {
        let u = i32::from(u) - 128;
        let v = i32::from(v) - 128;
        let base = (128 << 16) + (1 << 15);
        [
            clamp_fixed(base + self.m[1][1] * u + self.m[1][2] * v),
            clamp_fixed(base + self.m[2][1] * u + self.m[2][2] * v),
        ]
    }
}

/// A 16.16 fixed-point value as a byte, clamped.
#[inline(always)]
fn clamp_fixed(value: i32) -> u8 {
    (value >> 16).clamp(0, 255) as u8
}

/// Converts I420 `planes` into the full-range BT.601 YCbCr that JPEG files hold (JFIF), plane by
/// plane into `out` (an I420 buffer of the same size, tightly packed): one pass of integer
/// arithmetic ([`ToJfif`]), no RGB in between.
pub fn to_jfif_planes(planes: &Planes, width: usize, height: usize, out: &mut [u8]) {
    let convert = ToJfif::new(&planes.matrix);
    let chroma_len = planes.chroma_width * planes.chroma_height;
    let (luma_out, chroma_out) = out.split_at_mut(width * height);
    let (u_out, v_out) = chroma_out.split_at_mut(chroma_len);
    for y in 0..height {
        let in_row = &planes.y[y * planes.y_stride..y * planes.y_stride + width];
        let out_row = &mut luma_out[y * width..(y + 1) * width];
        if !convert.mixes_chroma() {
            for (target, value) in out_row.iter_mut().zip(in_row) {
                *target = convert.luma(*value, 0);
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
            let chroma = convert.chroma_in_luma(*u, *v);
            for (target, value) in targets.iter_mut().zip(values) {
                *target = convert.luma(*value, chroma);
            }
        }
    }
    for (index, (u_target, v_target)) in u_out.iter_mut().zip(v_out.iter_mut()).enumerate() {
        [*u_target, *v_target] = convert.chroma(planes.u[index], planes.v[index]);
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
    let layout = ImageLayout::packed(frame.layout.width, frame.layout.height, PixelFormat::Rgb);
    let mut pixels = pool.get(layout.byte_len());
    for (row_index, row) in pixels.chunks_exact_mut(width * 3).take(height).enumerate() {
        for (x, pixel) in row.chunks_exact_mut(3).enumerate() {
            pixel.copy_from_slice(&planes.rgb_at(x, row_index));
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
        for y in 0..height {
            for x in 0..width {
                rgb.extend_from_slice(&planes.rgb_at(x, y));
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

    /// An I420 frame of video whose every pixel is the YUV triple `(y, u, v)`.
    pub(crate) fn uniform_i420(width: u32, height: u32, yuv: [u8; 3]) -> Frame {
        uniform_i420_in(width, height, yuv, YuvEncoding::Video)
    }

    /// An I420 frame whose every pixel is the YUV triple `(y, u, v)` of `encoding`.
    pub(crate) fn uniform_i420_in(
        width: u32,
        height: u32,
        yuv: [u8; 3],
        encoding: YuvEncoding,
    ) -> Frame {
        let layout = ImageLayout::packed(width, height, PixelFormat::I420).with_yuv(encoding);
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
    fn jpeg_ycbcr_frames_convert_with_the_full_range_matrix_and_need_no_pass_to_jfif() {
        for (yuv, rgb) in [
            ([0, 128, 128], [0, 0, 0]),
            ([255, 128, 128], [255, 255, 255]),
            ([76, 85, 255], [255, 0, 0]),
            ([150, 44, 21], [0, 255, 0]),
        ] {
            let frame = uniform_i420_in(6, 4, yuv, YuvEncoding::Jpeg);
            let converted = packed_rgb(&frame);
            for (got, want) in converted[..3].iter().zip(rgb) {
                assert!(got.abs_diff(want) <= 1, "{yuv:?}: {converted:?} vs {rgb:?}");
            }
            assert_eq!(
                JFIF.to_yuv(rgb).map(i32::from),
                yuv.map(i32::from),
                "{rgb:?}"
            );
            let planes = Planes::of(&frame).expect("I420");
            let mut out = vec![0u8; frame.layout.byte_len()];
            to_jfif_planes(&planes, 6, 4, &mut out);
            assert_eq!(&out[..], &frame.pixels()[..frame.layout.byte_len()]);
        }
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
            yuv: YuvEncoding::Video,
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
