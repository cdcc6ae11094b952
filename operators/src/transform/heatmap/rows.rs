//! The row loops of the I420 overlay blend: plain loops over slices that the compiler
//! vectorises, run AVX2-compiled where the CPU has it.

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
pub(super) fn level_index(value: f32) -> u8 {
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
    /// Colour table indices of a row of map values; returns the highest.
    fn levels_of(values: &[f32], levels: &mut [u8]) -> u8 = levels_kernel
}

#[inline(always)]
fn levels_kernel(values: &[f32], levels: &mut [u8]) -> u8 {
    for (level, value) in levels.iter_mut().zip(values) {
        *level = level_index(*value);
    }
    levels.iter().copied().max().unwrap_or(0)
}

/// The blend of one overlay row into JPEG's YCbCr.
pub(super) struct PlaneBlend<'a> {
    pub(super) convert: &'a yuv::ToJfif,
    /// The colour map per plane, pre-weighted.
    pub(super) tables: &'a [[u32; 256]; 3],
    /// The frame's weight, in 1/256.
    pub(super) keep: u32,
}

with_avx2! {
    /// What each pixel's chroma (`u`, `v`: a row of blocks) adds to its luma.
    fn chroma_in_luma(blend: &PlaneBlend, u: &[u8], v: &[u8], terms: &mut [i32]) =
        chroma_in_luma_kernel
}

#[inline(always)]
fn chroma_in_luma_kernel(blend: &PlaneBlend, u: &[u8], v: &[u8], terms: &mut [i32]) {
    // The conversion copied into a local: the compiler then knows the stores below cannot change
    // it, and keeps its coefficients in registers.
    let convert = *blend.convert;
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
    /// Luma: `values` converted (with `chroma_in_luma` per pixel) and blended with the colour
    /// of `levels`, into `out`.
    fn blend_luma(
        blend: &PlaneBlend,
        values: &[u8],
        chroma_in_luma: &[i32],
        levels: &[u8],
        out: &mut [u8]
    ) = blend_luma_kernel
}

#[inline(always)]
fn blend_luma_kernel(
    blend: &PlaneBlend,
    values: &[u8],
    chroma_in_luma: &[i32],
    levels: &[u8],
    out: &mut [u8],
) {
    let n = out.len();
    let (values, chroma_in_luma, levels) = (&values[..n], &chroma_in_luma[..n], &levels[..n]);
    let (convert, keep, table) = (*blend.convert, blend.keep, &blend.tables[0]);
    for x in 0..n {
        let luma = u32::from(convert.luma(values[x], chroma_in_luma[x]));
        out[x] = ((luma * keep + table[usize::from(levels[x])]) >> 8) as u8;
    }
}

with_avx2! {
    /// Chroma: blocks `u` and `v` converted and blended with the colour of every second of
    /// `levels` (each block's top-left pixel), into `u_out` and `v_out`.
    fn blend_chroma(
        blend: &PlaneBlend,
        levels: &[u8],
        u: &[u8],
        v: &[u8],
        u_out: &mut [u8],
        v_out: &mut [u8]
    ) = blend_chroma_kernel
}

#[inline(always)]
fn blend_chroma_kernel(
    blend: &PlaneBlend,
    levels: &[u8],
    u: &[u8],
    v: &[u8],
    u_out: &mut [u8],
    v_out: &mut [u8],
) {
    let n = u_out.len().min(v_out.len()).min(levels.len().div_ceil(2));
    let (u, v, u_out, v_out) = (&u[..n], &v[..n], &mut u_out[..n], &mut v_out[..n]);
    let convert = *blend.convert;
    let keep = blend.keep;
    let [_, u_table, v_table] = blend.tables;
    for cx in 0..n {
        let level = usize::from(levels[2 * cx]);
        let [u_value, v_value] = convert.chroma(u[cx], v[cx]);
        u_out[cx] = ((u32::from(u_value) * keep + u_table[level]) >> 8) as u8;
        v_out[cx] = ((u32::from(v_value) * keep + v_table[level]) >> 8) as u8;
    }
}
