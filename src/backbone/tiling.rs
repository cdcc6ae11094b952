//! Tiling: a large square input cut into overlapping square tiles that go through the backbone as
//! one batch, and their feature maps stitched back into one map of the whole input, inside the
//! IR. Each cell of the stitched map comes from the tile whose centre is nearest to it, so the
//! zero padding at tile borders never reaches it where another tile sees more context. Heads
//! then work on the stitched map as on any other, and a tiled package is used like an untiled
//! one (one input of the full size), in training, evaluation, `predict` and pipelines.

use super::ir::{IrGraph, Output};

/// Where the tiles of a square input lie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tiling {
    /// Side of the whole input in pixels.
    pub image: usize,
    /// Side of a tile in pixels.
    pub tile: usize,
    /// Tile offsets along each axis, in pixels (multiples of 32), first 0, last `image - tile`.
    pub starts: Vec<usize>,
}

impl Tiling {
    /// Tiles of `tile` pixels over an `image`-pixel input (both multiples of 32, the tile at
    /// least 64 and smaller than the image), neighbours overlapping by at least a quarter tile.
    pub fn new(image: usize, tile: usize) -> Result<Self, String> {
        if !image.is_multiple_of(32) || !tile.is_multiple_of(32) || tile < 64 || tile >= image {
            return Err(format!(
                "--tile {tile} must be a multiple of 32, at least 64 and smaller than the image size {image}"
            ));
        }
        let step = tile * 3 / 4;
        let count = (image - tile).div_ceil(step) + 1;
        let starts = (0..count)
            .map(|i| {
                let exact = i * (image - tile) / (count - 1);
                (exact + 16) / 32 * 32
            })
            .map(|start| start.min(image - tile))
            .collect::<Vec<_>>();
        let mut starts = starts;
        starts.dedup();
        Ok(Self {
            image,
            tile,
            starts,
        })
    }

    /// Tiles in all (rows x columns).
    pub fn count(&self) -> usize {
        self.starts.len() * self.starts.len()
    }

    /// Along one axis, for each tile, the cells of a map of `stride` pixels it gives to the
    /// stitched map: (first cell within the tile, count). Every cell goes to the tile whose
    /// centre is nearest (ties to the earlier tile); the counts add up to `image / stride`.
    fn kept_cells(&self, stride: usize) -> Vec<(usize, usize)> {
        let cells = self.image / stride;
        let tile_cells = self.tile / stride;
        let mut kept = vec![(0usize, 0usize); self.starts.len()];
        for cell in 0..cells {
            let centre = 2 * cell + 1; // in half cells
            let owner = (0..self.starts.len())
                .filter(|&i| {
                    let first = self.starts[i] / stride;
                    cell >= first && cell < first + tile_cells
                })
                .min_by_key(|&i| (2 * (self.starts[i] / stride) + tile_cells).abs_diff(centre))
                .unwrap_or(0);
            let local = cell - self.starts[owner] / stride;
            let (first, count) = &mut kept[owner];
            if *count == 0 {
                *first = local;
            }
            *count += 1;
        }
        kept
    }

    /// Cuts `input` (`[1, C, image, image]`) into the tiles, as one batch `[tiles, C, tile,
    /// tile]` (row by row).
    pub fn split(&self, graph: &mut IrGraph, input: Output) -> Output {
        let range = |start: usize| (start as i64..(start + self.tile) as i64).collect::<Vec<_>>();
        let mut tiles = Vec::with_capacity(self.count());
        for (row, &top) in self.starts.iter().enumerate() {
            let strip = graph.gather(&format!("tiling/rows{row}"), input, &range(top), 2);
            for (column, &left) in self.starts.iter().enumerate() {
                tiles.push(graph.gather(
                    &format!("tiling/tile{row}_{column}"),
                    strip,
                    &range(left),
                    3,
                ));
            }
        }
        graph.concat("tiling/batch", &tiles, 0)
    }

    /// Stitches per-tile maps `[tiles, C, tile / stride, tile / stride]` (in [`Tiling::split`]'s
    /// order) into `[1, C, image / stride, image / stride]`.
    pub fn stitch(&self, graph: &mut IrGraph, maps: Output, stride: usize, name: &str) -> Output {
        let kept = self.kept_cells(stride);
        let range = |(first, count): (usize, usize)| {
            (first as i64..(first + count) as i64).collect::<Vec<_>>()
        };
        let columns_per_row = self.starts.len();
        let mut strips = Vec::with_capacity(columns_per_row);
        for (row, &rows_kept) in kept.iter().enumerate() {
            let mut pieces = Vec::with_capacity(columns_per_row);
            for (column, &columns_kept) in kept.iter().enumerate() {
                let index = (row * columns_per_row + column) as i64;
                let tile = graph.gather(&format!("{name}/tile{row}_{column}"), maps, &[index], 0);
                let rows = graph.gather(
                    &format!("{name}/rows{row}_{column}"),
                    tile,
                    &range(rows_kept),
                    2,
                );
                pieces.push(graph.gather(
                    &format!("{name}/piece{row}_{column}"),
                    rows,
                    &range(columns_kept),
                    3,
                ));
            }
            strips.push(graph.concat(&format!("{name}/strip{row}"), &pieces, 3));
        }
        graph.concat(name, &strips, 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_image_with_overlap_and_every_cell_once() {
        let tiling = Tiling::new(640, 256).expect("tiles");
        assert_eq!(tiling.starts.first(), Some(&0));
        assert_eq!(tiling.starts.last(), Some(&384));
        assert!(tiling.starts.iter().all(|s| s % 32 == 0));
        for pair in tiling.starts.windows(2) {
            assert!(pair[1] > pair[0] && pair[1] - pair[0] <= 192, "{tiling:?}");
        }
        for stride in [8, 16] {
            let kept = tiling.kept_cells(stride);
            assert_eq!(kept.iter().map(|k| k.1).sum::<usize>(), 640 / stride);
            // Cells are handed on in order: each tile's kept cells start where the last ended.
            let mut next = 0;
            for ((first, count), start) in kept.iter().zip(&tiling.starts) {
                assert_eq!(start / stride + first, next, "{kept:?}");
                assert!(first + count <= 256 / stride);
                next += count;
            }
        }
        assert!(Tiling::new(512, 512).is_err());
        assert!(Tiling::new(512, 48).is_err());
        assert!(Tiling::new(512, 100).is_err());
    }
}
