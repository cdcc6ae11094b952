//! Generated anomalies, as DRAEM makes them: Perlin-noise blobs filled with a foreign texture,
//! scratches, holes and stains, painted onto a normal image together with their pixel mask. The
//! trainer calibrates on them when a dataset has no labelled anomalies, and `inspectflow synth`
//! uses them for its test sets.

use super::noise::{Perlin, Rng};
use super::texture::{Canvas, Texture};

/// The kinds of generated defect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Defect {
    /// A Perlin-noise-shaped region replaced by another texture (DRAEM's anomaly source).
    Blob,
    /// A thin curved line, brighter or darker than the surface.
    Scratch,
    /// A dark elliptical hole with a lit rim.
    Hole,
    /// A soft, irregular discolouration.
    Stain,
}

impl Defect {
    /// Every kind.
    pub const ALL: [Defect; 4] = [Defect::Blob, Defect::Scratch, Defect::Hole, Defect::Stain];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Defect::Blob => "blob",
            Defect::Scratch => "scratch",
            Defect::Hole => "hole",
            Defect::Stain => "stain",
        }
    }

    /// Paints this defect onto `canvas` and returns its mask (`width * height`, true where the
    /// surface changed). The mask is never empty.
    pub fn paint(self, canvas: &mut Canvas, rng: &mut Rng) -> Vec<bool> {
        let alpha = match self {
            Defect::Blob => blob(canvas, rng),
            Defect::Scratch => scratch(canvas, rng),
            Defect::Hole => hole(canvas, rng),
            Defect::Stain => stain(canvas, rng),
        };
        let mut mask: Vec<bool> = alpha.iter().map(|&a| a >= 0.5).collect();
        if !mask.iter().any(|&m| m) {
            // A shape that fell outside the image: mark its strongest pixel.
            let strongest = alpha
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i);
            mask[strongest] = true;
        }
        mask
    }
}

/// Blends `colour_at(i)` into the canvas with per-pixel opacity `alpha[i]`.
fn blend(canvas: &mut Canvas, alpha: &[f32], colour_at: impl Fn(usize, [f32; 3]) -> [f32; 3]) {
    for (i, (pixel, &a)) in canvas.pixels.iter_mut().zip(alpha).enumerate() {
        if a > 0.0 {
            let target = colour_at(i, *pixel);
            *pixel = [0, 1, 2].map(|c| pixel[c] + (target[c] - pixel[c]) * a.min(1.0));
        }
    }
}

/// A random centre well inside the image and a radius as a fraction of its size.
fn placement(canvas: &Canvas, rng: &mut Rng, radius: (f32, f32)) -> (f32, f32, f32) {
    let size = canvas.width.min(canvas.height) as f32;
    let r = rng.range(radius.0, radius.1) * size;
    let x = rng.range(r, (canvas.width as f32 - r).max(r + 1.0));
    let y = rng.range(r, (canvas.height as f32 - r).max(r + 1.0));
    (x, y, r)
}

/// Perlin noise thresholded inside a soft disc: an irregular region.
fn irregular_region(canvas: &Canvas, rng: &mut Rng, radius: (f32, f32), softness: f32) -> Vec<f32> {
    let (cx, cy, r) = placement(canvas, rng, radius);
    let noise = Perlin::new(rng);
    let frequency = rng.range(2.0, 5.0) / r;
    let mut alpha = vec![0f32; canvas.width * canvas.height];
    for y in 0..canvas.height {
        for x in 0..canvas.width {
            let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt() / r;
            if d > 1.6 {
                continue;
            }
            let field =
                1.0 - d + 0.6 * noise.fractal(x as f32 * frequency, y as f32 * frequency, 3);
            alpha[y * canvas.width + x] = ((field - 0.25) / softness + 0.5).clamp(0.0, 1.0);
        }
    }
    alpha
}

fn blob(canvas: &mut Canvas, rng: &mut Rng) -> Vec<f32> {
    let alpha = irregular_region(canvas, rng, (0.06, 0.14), 0.02);
    let foreign = Texture::ALL[rng.below(Texture::ALL.len())];
    let mut source_rng = rng.fork();
    let source = foreign.draw(canvas.width.max(canvas.height), &mut source_rng);
    let opacity = rng.range(0.75, 1.0);
    let tint = [
        rng.range(-0.25, 0.25),
        rng.range(-0.25, 0.25),
        rng.range(-0.25, 0.25),
    ];
    let width = canvas.width;
    let faded: Vec<f32> = alpha.iter().map(|a| a * opacity).collect();
    blend(canvas, &faded, |i, _| {
        let (x, y) = (i % width, i / width);
        let s = source.pixels[y * source.width + x];
        [0, 1, 2].map(|c| s[c] + tint[c])
    });
    alpha
}

fn scratch(canvas: &mut Canvas, rng: &mut Rng) -> Vec<f32> {
    let size = canvas.width.min(canvas.height) as f32;
    let (x0, y0, _) = placement(canvas, rng, (0.15, 0.2));
    let length = rng.range(0.2, 0.4) * size;
    let angle = rng.range(0.0, std::f32::consts::TAU);
    let bend = rng.range(-0.3, 0.3) * length;
    let (x2, y2) = (x0 + length * angle.cos(), y0 + length * angle.sin());
    let (x1, y1) = (
        (x0 + x2) / 2.0 - bend * angle.sin(),
        (y0 + y2) / 2.0 + bend * angle.cos(),
    );
    let half_width = rng.range(1.2, 2.2) * size / 256.0;
    let delta = if rng.unit() < 0.5 { 0.4 } else { -0.4 };
    let mut alpha = vec![0f32; canvas.width * canvas.height];
    let steps = (length * 2.0) as usize + 2;
    for step in 0..=steps {
        let t = step as f32 / steps as f32;
        let px = (1.0 - t).powi(2) * x0 + 2.0 * (1.0 - t) * t * x1 + t * t * x2;
        let py = (1.0 - t).powi(2) * y0 + 2.0 * (1.0 - t) * t * y1 + t * t * y2;
        let reach = half_width.ceil() as i64 + 1;
        for dy in -reach..=reach {
            for dx in -reach..=reach {
                let (x, y) = (px as i64 + dx, py as i64 + dy);
                if x < 0 || y < 0 || x >= canvas.width as i64 || y >= canvas.height as i64 {
                    continue;
                }
                let d = ((x as f32 + 0.5 - px).powi(2) + (y as f32 + 0.5 - py).powi(2)).sqrt();
                let a = (half_width + 0.5 - d).clamp(0.0, 1.0);
                let slot = &mut alpha[y as usize * canvas.width + x as usize];
                *slot = slot.max(a);
            }
        }
    }
    blend(canvas, &alpha, |_, p| p.map(|c| c + delta));
    alpha
}

fn hole(canvas: &mut Canvas, rng: &mut Rng) -> Vec<f32> {
    let (cx, cy, r) = placement(canvas, rng, (0.03, 0.07));
    let aspect = rng.range(0.6, 1.0);
    let darkness = rng.range(0.03, 0.12);
    let mut alpha = vec![0f32; canvas.width * canvas.height];
    let mut rim = vec![0f32; canvas.width * canvas.height];
    for y in 0..canvas.height {
        for x in 0..canvas.width {
            let (dx, dy) = ((x as f32 - cx) / r, (y as f32 - cy) / (r * aspect));
            let d = (dx * dx + dy * dy).sqrt();
            let i = y * canvas.width + x;
            alpha[i] = ((1.0 - d) * r / 1.5 + 0.5).clamp(0.0, 1.0);
            rim[i] = if (1.0..1.25).contains(&d) && dy < 0.0 {
                0.5
            } else {
                0.0
            };
        }
    }
    blend(canvas, &rim, |_, p| p.map(|c| c + 0.25));
    blend(canvas, &alpha, |_, _| {
        [darkness, darkness * 0.9, darkness * 0.8]
    });
    alpha
}

fn stain(canvas: &mut Canvas, rng: &mut Rng) -> Vec<f32> {
    let alpha = irregular_region(canvas, rng, (0.07, 0.15), 0.15);
    let opacity = rng.range(0.7, 0.9);
    let tint = [
        rng.range(0.35, 0.6),
        rng.range(0.25, 0.45),
        rng.range(0.1, 0.3),
    ];
    let faded: Vec<f32> = alpha.iter().map(|a| a * opacity).collect();
    blend(canvas, &faded, |_, p| {
        [0, 1, 2].map(|c| p[c] * tint[c] * 1.4)
    });
    alpha
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_defect_changes_the_pixels_under_its_mask_and_few_outside() {
        for texture in [Texture::Carpet, Texture::Grid] {
            for (k, defect) in Defect::ALL.into_iter().enumerate() {
                let mut rng = Rng::new(k as u64 + 1);
                let original = texture.draw(128, &mut rng);
                let mut painted = original.clone();
                let mask = defect.paint(&mut painted, &mut rng);
                let changed = |i: usize| {
                    (0..3)
                        .map(|c| (painted.pixels[i][c] - original.pixels[i][c]).abs())
                        .fold(0.0, f32::max)
                };
                let inside: Vec<f32> = (0..mask.len()).filter(|&i| mask[i]).map(changed).collect();
                let outside_changed = (0..mask.len())
                    .filter(|&i| !mask[i] && changed(i) > 0.2)
                    .count();
                assert!(!inside.is_empty(), "{} has a mask", defect.name());
                let mean = inside.iter().sum::<f32>() / inside.len() as f32;
                assert!(
                    mean > 0.08,
                    "{} on {}: mean change {mean}",
                    defect.name(),
                    texture.name()
                );
                assert!(
                    outside_changed < inside.len(),
                    "{}: {outside_changed} strong changes outside the mask",
                    defect.name()
                );
                let area = inside.len() as f32 / mask.len() as f32;
                assert!(area < 0.2, "{} covers {area}", defect.name());
            }
        }
    }
}
