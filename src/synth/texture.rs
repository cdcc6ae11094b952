//! Procedural textures for generated datasets: stationary surfaces (carpet, fabric, wood, brushed
//! metal, a printed-circuit grid) that vary from image to image in phase and fine noise the way
//! photos of one product vary, so that a model must learn the texture, not one picture.

use super::noise::{Perlin, Rng};

/// An RGB image with channels in [0, 1], row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Canvas {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width * height` pixels.
    pub pixels: Vec<[f32; 3]>,
}

impl Canvas {
    /// A canvas filled with `colour`.
    pub fn filled(width: usize, height: usize, colour: [f32; 3]) -> Self {
        Self {
            width,
            height,
            pixels: vec![colour; width * height],
        }
    }

    /// 8-bit RGB bytes.
    pub fn to_rgb8(&self) -> Vec<u8> {
        self.pixels
            .iter()
            .flat_map(|p| p.map(|c| (c.clamp(0.0, 1.0) * 255.0).round() as u8))
            .collect()
    }

    /// A canvas from 8-bit RGB bytes (`width * height * 3` of them).
    pub fn from_rgb8(width: usize, height: usize, bytes: &[u8]) -> Self {
        Self {
            width,
            height,
            pixels: bytes
                .chunks_exact(3)
                .map(|p| [p[0], p[1], p[2]].map(|c| f32::from(c) / 255.0))
                .collect(),
        }
    }
}

/// The texture families `inspectflow synth` can draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Texture {
    /// Fractal noise in warm fibre colours.
    Carpet,
    /// A woven pattern of crossing threads.
    Fabric,
    /// Growth rings with grain.
    Wood,
    /// Brushed metal: noise stretched along one axis.
    Metal,
    /// A printed-circuit-like grid of pads and traces.
    Grid,
}

impl Texture {
    /// Every family.
    pub const ALL: [Texture; 5] = [
        Texture::Carpet,
        Texture::Fabric,
        Texture::Wood,
        Texture::Metal,
        Texture::Grid,
    ];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Texture::Carpet => "carpet",
            Texture::Fabric => "fabric",
            Texture::Wood => "wood",
            Texture::Metal => "metal",
            Texture::Grid => "grid",
        }
    }

    /// One image of this texture; `rng` decides its phase and fine noise.
    pub fn draw(self, size: usize, rng: &mut Rng) -> Canvas {
        let noise = Perlin::new(rng);
        let (ox, oy) = (rng.range(0.0, 64.0), rng.range(0.0, 64.0));
        let scale = size as f32 / 256.0;
        let mut canvas = Canvas::filled(size, size, [0.0; 3]);
        for y in 0..size {
            for x in 0..size {
                // Texture coordinates in 256-pixel units, so every size shows the same pattern.
                let (u, v) = (x as f32 / scale + ox, y as f32 / scale + oy);
                canvas.pixels[y * size + x] = self.colour_at(&noise, u, v);
            }
        }
        canvas
    }

    fn colour_at(self, noise: &Perlin, u: f32, v: f32) -> [f32; 3] {
        let mix = |a: [f32; 3], b: [f32; 3], t: f32| {
            let t = t.clamp(0.0, 1.0);
            [0, 1, 2].map(|i| a[i] + (b[i] - a[i]) * t)
        };
        let grain = noise.at(u * 0.9, v * 0.9) * 0.04;
        let shade = |c: [f32; 3], amount: f32| c.map(|x| x + amount);
        match self {
            Texture::Carpet => {
                let t = 0.5 + 0.5 * noise.fractal(u / 18.0, v / 18.0, 5);
                shade(mix([0.42, 0.30, 0.22], [0.72, 0.58, 0.42], t), grain)
            }
            Texture::Fabric => {
                let warp = (u * 0.55).sin();
                let weft = (v * 0.55).sin();
                let cell_x = (u * 0.55 / std::f32::consts::PI).floor() as i64;
                let cell_y = (v * 0.55 / std::f32::consts::PI).floor() as i64;
                let over = if (cell_x + cell_y) & 1 == 0 {
                    warp.abs()
                } else {
                    weft.abs()
                };
                let t = 0.35 + 0.5 * over + 0.15 * noise.at(u / 10.0, v / 10.0);
                shade(mix([0.10, 0.16, 0.32], [0.40, 0.52, 0.78], t), grain)
            }
            Texture::Wood => {
                let distortion = 6.0 * noise.fractal(u / 40.0, v / 40.0, 3);
                let rings = ((u * 0.08 + distortion) * std::f32::consts::TAU / 3.0).sin();
                let t = 0.5 + 0.35 * rings + 0.15 * noise.at(u / 3.0, v / 30.0);
                shade(mix([0.36, 0.20, 0.09], [0.74, 0.52, 0.30], t), grain)
            }
            Texture::Metal => {
                let streak = noise.fractal(u / 60.0, v / 1.2, 3);
                let t = 0.55 + 0.3 * streak + 0.1 * noise.at(u / 25.0, v / 25.0);
                shade(mix([0.45, 0.47, 0.50], [0.82, 0.84, 0.86], t), grain * 0.5)
            }
            Texture::Grid => {
                let cell = 32.0;
                let (cx, cy) = (u.rem_euclid(cell), v.rem_euclid(cell));
                let pad = (cx - 16.0).abs() < 6.0 && (cy - 16.0).abs() < 6.0;
                let trace = (cy - 16.0).abs() < 1.6 || (cx - 16.0).abs() < 1.6;
                let substrate = shade([0.10, 0.36, 0.18], 0.05 * noise.at(u / 12.0, v / 12.0));
                let colour = if pad {
                    [0.80, 0.66, 0.32]
                } else if trace {
                    [0.18, 0.52, 0.26]
                } else {
                    substrate
                };
                shade(colour, grain)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn textures_are_seeded_and_differ_between_images() {
        for texture in Texture::ALL {
            let first = texture.draw(64, &mut Rng::new(9));
            assert_eq!(
                first,
                texture.draw(64, &mut Rng::new(9)),
                "{}",
                texture.name()
            );
            assert_ne!(
                first,
                texture.draw(64, &mut Rng::new(10)),
                "{}",
                texture.name()
            );
            let bytes = first.to_rgb8();
            assert_eq!(bytes.len(), 64 * 64 * 3);
            let distinct: std::collections::HashSet<&u8> = bytes.iter().collect();
            assert!(distinct.len() > 8, "{} has structure", texture.name());
        }
    }
}
