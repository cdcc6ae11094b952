//! Seeded randomness for generated data: a SplitMix64 generator and 2-D Perlin gradient noise
//! (with fractal sums of octaves). Everything here is deterministic for a given seed, so the same
//! seed gives the same dataset, the same generated anomalies and therefore the same metrics.

/// SplitMix64: small, fast, and good enough for sampling shapes and colours.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [low, high).
    pub fn range(&mut self, low: f32, high: f32) -> f32 {
        low + (high - low) * self.unit()
    }

    /// Uniform integer in [0, bound); 0 when `bound` is 0.
    pub fn below(&mut self, bound: usize) -> usize {
        if bound == 0 {
            0
        } else {
            (self.next_u64() % bound as u64) as usize
        }
    }

    /// A generator derived from this one, for an independent stream (per image, per defect).
    pub fn fork(&mut self) -> Rng {
        Rng(self.next_u64())
    }
}

/// 2-D Perlin gradient noise with a seeded permutation table; values roughly in [-1, 1].
#[derive(Debug, Clone)]
pub struct Perlin {
    permutation: [u8; 512],
}

impl Perlin {
    /// Noise whose lattice gradients come from `rng`.
    pub fn new(rng: &mut Rng) -> Self {
        let mut table: Vec<u8> = (0..=255).collect();
        for i in (1..256).rev() {
            table.swap(i, rng.below(i + 1));
        }
        let mut permutation = [0u8; 512];
        for (i, slot) in permutation.iter_mut().enumerate() {
            *slot = table[i % 256];
        }
        Self { permutation }
    }

    fn gradient(&self, ix: i64, iy: i64, dx: f32, dy: f32) -> f32 {
        let hash = self.permutation
            [(self.permutation[(ix & 255) as usize] as usize + (iy & 255) as usize) & 511];
        // Eight gradient directions.
        match hash & 7 {
            0 => dx + dy,
            1 => dx - dy,
            2 => -dx + dy,
            3 => -dx - dy,
            4 => dx,
            5 => -dx,
            6 => dy,
            _ => -dy,
        }
    }

    /// Noise at `(x, y)` in lattice units.
    pub fn at(&self, x: f32, y: f32) -> f32 {
        let (fx, fy) = (x.floor(), y.floor());
        let (ix, iy) = (fx as i64, fy as i64);
        let (dx, dy) = (x - fx, y - fy);
        let fade = |t: f32| t * t * t * (t * (t * 6.0 - 15.0) + 10.0);
        let (u, v) = (fade(dx), fade(dy));
        let lerp = |a: f32, b: f32, t: f32| a + (b - a) * t;
        let top = lerp(
            self.gradient(ix, iy, dx, dy),
            self.gradient(ix + 1, iy, dx - 1.0, dy),
            u,
        );
        let bottom = lerp(
            self.gradient(ix, iy + 1, dx, dy - 1.0),
            self.gradient(ix + 1, iy + 1, dx - 1.0, dy - 1.0),
            u,
        );
        lerp(top, bottom, v)
    }

    /// Fractal sum of `octaves` octaves, each twice the frequency and half the amplitude of the
    /// last, normalised to roughly [-1, 1].
    pub fn fractal(&self, x: f32, y: f32, octaves: usize) -> f32 {
        let (mut total, mut amplitude, mut frequency, mut norm) = (0.0, 1.0, 1.0, 0.0);
        for _ in 0..octaves.max(1) {
            total += amplitude * self.at(x * frequency, y * frequency);
            norm += amplitude;
            amplitude *= 0.5;
            frequency *= 2.0;
        }
        total / norm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_units_stay_in_range() {
        let (mut a, mut b) = (Rng::new(3), Rng::new(3));
        for _ in 0..1000 {
            let value = a.unit();
            assert_eq!(value, b.unit());
            assert!((0.0..1.0).contains(&value));
        }
        assert_ne!(Rng::new(3).next_u64(), Rng::new(4).next_u64());
    }

    #[test]
    fn perlin_noise_is_zero_on_lattice_points_and_bounded() {
        let noise = Perlin::new(&mut Rng::new(1));
        assert_eq!(noise.at(3.0, 5.0), 0.0);
        let mut spread = (f32::MAX, f32::MIN);
        for i in 0..4000 {
            let value = noise.fractal(i as f32 * 0.037, i as f32 * 0.051, 4);
            assert!((-1.5..=1.5).contains(&value), "{value}");
            spread = (spread.0.min(value), spread.1.max(value));
        }
        assert!(spread.1 - spread.0 > 0.5, "noise varies: {spread:?}");
    }
}
