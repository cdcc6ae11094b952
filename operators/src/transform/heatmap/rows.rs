//! The row loops of the overlay blend (I420 planes, and the outline of both kinds of overlay):
//! plain loops over slices that the compiler vectorises, run AVX2-compiled where the CPU has it.

use crate::map_upsample::lerp_fixed;
use crate::yuv;

/// Defines `$name`, which runs `$portable` (an `#[inline(always)]` function of the same
/// arguments) compiled for AVX2 when the CPU has it and as it is otherwise: the row loops below
/// are plain loops over slices that the compiler vectorises, twice as wide with AVX2 as in the
/// portable (SSE2) build.
macro_rules! with_avx2 {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $type:ty),*) $(-> $out:ty)? = $portable:path) => {
        $(#[$doc])*
        pub(super) fn $name($($arg: $type),*) $(-> $out)? {
            /// Safety: only on CPUs with AVX2.
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            unsafe fn compiled_for_avx2($($arg: $type),*) $(-> $out)? {
                $portable($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2.
                return unsafe { compiled_for_avx2($($arg),*) };
            }
            $portable($($arg),*)
        }
    };
}

/// The map value as a colour table index (0-255).
#[inline(always)]
fn level_index(value: f32) -> u8 {
    // max and min first: NaN becomes 0 and the product lies in 0-255, so the conversion needs
    // no saturation (and vectorises).
    #[expect(
        clippy::manual_clamp,
        reason = "clamp keeps NaN, which the conversion must not see"
    )]
    let scaled = value.max(0.0).min(1.0) * 255.0;
    // SAFETY: `scaled` is finite and within 0-255.
    unsafe { scaled.to_int_unchecked::<i32>() as u8 }
}

with_avx2! {
    /// Colour table indices of map values.
    fn levels_of(values: &[f32], levels: &mut [u8]) = levels_kernel
}

#[inline(always)]
fn levels_kernel(values: &[f32], levels: &mut [u8]) {
    for (level, value) in levels.iter_mut().zip(values) {
        *level = level_index(*value);
    }
}

with_avx2! {
    /// What each pixel's chroma (`u`, `v`: a row of blocks) adds to its luma.
    fn chroma_in_luma(convert: &yuv::ToJfif, u: &[u8], v: &[u8], terms: &mut [i32]) =
        chroma_in_luma_kernel
}

#[inline(always)]
fn chroma_in_luma_kernel(convert: &yuv::ToJfif, u: &[u8], v: &[u8], terms: &mut [i32]) {
    // The conversion copied into a local: the compiler then knows the stores below cannot change
    // it, and keeps its coefficients in registers.
    let convert = *convert;
    // Two pixels share each block; an odd width leaves one pixel for the last block.
    let blocks = terms.len() / 2;
    let mut pairs = terms.chunks_exact_mut(2);
    for ((pair, u), v) in (&mut pairs).zip(u).zip(v) {
        let term = convert.chroma_in_luma(*u, *v);
        pair[0] = term;
        pair[1] = term;
    }
    if let ([last], Some(u), Some(v)) = (pairs.into_remainder(), u.get(blocks), v.get(blocks)) {
        *last = convert.chroma_in_luma(*u, *v);
    }
}

with_avx2! {
    /// A row of luma `values` in JPEG's YCbCr (with `chroma_in_luma` per pixel), into `out`.
    fn convert_luma(convert: &yuv::ToJfif, values: &[u8], chroma_in_luma: &[i32], out: &mut [u8]) =
        convert_luma_kernel
}

#[inline(always)]
fn convert_luma_kernel(
    convert: &yuv::ToJfif,
    values: &[u8],
    chroma_in_luma: &[i32],
    out: &mut [u8],
) {
    let convert = *convert;
    let n = out.len();
    let (values, chroma_in_luma) = (&values[..n], &chroma_in_luma[..n]);
    for x in 0..n {
        out[x] = convert.luma(values[x], chroma_in_luma[x]);
    }
}

with_avx2! {
    /// A row of chroma blocks `u`, `v` in JPEG's YCbCr, into `u_out` and `v_out`.
    fn convert_chroma(convert: &yuv::ToJfif, u: &[u8], v: &[u8], u_out: &mut [u8], v_out: &mut [u8]) =
        convert_chroma_kernel
}

#[inline(always)]
fn convert_chroma_kernel(
    convert: &yuv::ToJfif,
    u: &[u8],
    v: &[u8],
    u_out: &mut [u8],
    v_out: &mut [u8],
) {
    let convert = *convert;
    let n = u_out.len().min(v_out.len());
    let (u, v, u_out, v_out) = (&u[..n], &v[..n], &mut u_out[..n], &mut v_out[..n]);
    for x in 0..n {
        [u_out[x], v_out[x]] = convert.chroma(u[x], v[x]);
    }
}

/// `value` weighted by `keep` plus `colour` weighted by `weight` (`keep + weight` = 256),
/// rounded. 16-bit arithmetic: the sum is at most 255 x 256 + 128.
#[inline(always)]
pub(super) fn weighted_sum(value: u8, keep: u16, colour: u16, weight: u16) -> u8 {
    ((u16::from(value) * keep + colour * weight + 128) >> 8) as u8
}

with_avx2! {
    /// One row of a plane: `values` and the colour map's row, interpolated between `above` and
    /// `below` by `row_weight` (in 1/128), blended with `weights`: the frame's and the colour
    /// map's, in 1/256, summing to 256; into `out`.
    fn blend_row(
        weights: [u16; 2],
        values: &[u8],
        above: &[u16],
        below: &[u16],
        row_weight: u16,
        out: &mut [u8]
    ) = blend_row_kernel
}

#[inline(always)]
fn blend_row_kernel(
    [keep, weight]: [u16; 2],
    values: &[u8],
    above: &[u16],
    below: &[u16],
    row_weight: u16,
    out: &mut [u8],
) {
    let n = out.len();
    let (values, above, below) = (&values[..n], &above[..n], &below[..n]);
    for x in 0..n {
        let colour = lerp_fixed(above[x], below[x], row_weight);
        out[x] = weighted_sum(values[x], keep, colour, weight);
    }
}

with_avx2! {
    /// Marks in `marks` (1, else 0) the pixels of row `current` on the edge of the region whose
    /// map value reaches `threshold`: they reach it and a 4-neighbour does not. The first and
    /// last pixels are never on it.
    fn outline_marks(
        previous: &[f32],
        current: &[f32],
        next: &[f32],
        threshold: f32,
        marks: &mut [u8]
    ) = outline_marks_kernel
}

#[inline(always)]
fn outline_marks_kernel(
    previous: &[f32],
    current: &[f32],
    next: &[f32],
    threshold: f32,
    marks: &mut [u8],
) {
    let n = marks.len();
    let (previous, current, next) = (&previous[..n], &current[..n], &next[..n]);
    marks.fill(0);
    for x in 1..n.saturating_sub(1) {
        let inside = current[x] >= threshold;
        let neighbour_outside = (current[x - 1] < threshold)
            | (current[x + 1] < threshold)
            | (previous[x] < threshold)
            | (next[x] < threshold);
        marks[x] = u8::from(inside & neighbour_outside);
    }
}
