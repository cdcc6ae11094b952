//! Generated datasets, for tests, demos and calibration: procedural textures ([`texture`]) with
//! DRAEM-style defects ([`defect`]) and their masks, from seeded randomness ([`noise`]).
//! `inspectflow synth` writes the same layout a user's dataset has:
//!
//! ```text
//! OUT/train/normal/*.png   normal images to train on
//! OUT/test/normal/*.png    normal images to evaluate on
//! OUT/test/anomalous/*.png images with one defect each
//! OUT/masks/*.png          the defect masks, named like their anomalous image (0 or 255)
//! OUT/dataset.json         what was generated, with the seed
//! ```

pub mod defect;
pub mod noise;
pub mod texture;

use std::path::{Path, PathBuf};

pub use defect::Defect;
pub use noise::Rng;
pub use texture::{Canvas, Texture};

/// What to generate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SynthOptions {
    /// Texture family.
    pub texture: Texture,
    /// Square image size in pixels.
    pub size: usize,
    /// Normal images to train on.
    pub train_normal: usize,
    /// Normal test images.
    pub test_normal: usize,
    /// Anomalous test images (defect kinds in turn).
    pub test_anomalous: usize,
    /// Seed of everything.
    pub seed: u64,
    /// A photo of a surface to take the normal images from (random crops) instead of a
    /// procedural texture.
    #[serde(skip)]
    pub photo: Option<Canvas>,
}

/// Writing a generated dataset failed.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// The output directory exists and is not empty.
    #[error("{0} already exists and is not empty; choose a new directory")]
    Exists(PathBuf),
    /// A setting is out of range.
    #[error("{0}")]
    Invalid(String),
    /// Writing failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being written.
        context: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SynthError {
    let context = context.into();
    move |source| SynthError::Io { context, source }
}

/// Writes an 8-bit PNG (RGB when `channels` is 3, grey when 1) through a temporary file, so a
/// reader never sees half an image.
pub fn write_png(
    path: &Path,
    width: usize,
    height: usize,
    channels: usize,
    data: &[u8],
) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let partial = path.with_file_name(format!(".{name}.partial"));
    {
        let file = std::io::BufWriter::new(std::fs::File::create(&partial)?);
        let mut encoder = png::Encoder::new(file, width as u32, height as u32);
        encoder.set_color(if channels == 1 {
            png::ColorType::Grayscale
        } else {
            png::ColorType::Rgb
        });
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(std::io::Error::other)?;
        writer
            .write_image_data(data)
            .map_err(std::io::Error::other)?;
        writer.finish().map_err(std::io::Error::other)?;
    }
    std::fs::rename(&partial, path)
}

/// One normal image of `texture` for image number `index` of a dataset seeded with `seed`.
pub fn normal_image(texture: Texture, size: usize, seed: u64, index: u64) -> Canvas {
    let mut rng = Rng::new(seed.wrapping_mul(0x100_0000_01B3).wrapping_add(index));
    texture.draw(size, &mut rng)
}

/// A seeded random `size` x `size` crop of `photo` (which must be at least that large).
pub fn crop(photo: &Canvas, size: usize, seed: u64, index: u64) -> Canvas {
    let mut rng = Rng::new(seed.wrapping_mul(0x100_0000_01B3).wrapping_add(index));
    let x0 = rng.below(photo.width - size + 1);
    let y0 = rng.below(photo.height - size + 1);
    let mut pixels = Vec::with_capacity(size * size);
    for y in y0..y0 + size {
        pixels.extend_from_slice(&photo.pixels[y * photo.width + x0..y * photo.width + x0 + size]);
    }
    Canvas {
        width: size,
        height: size,
        pixels,
    }
}

/// Reads a PNG or JPEG file into a canvas, with the decoder pipelines use.
pub fn read_canvas(path: &Path) -> Result<Canvas, inspectflow_operators::OpError> {
    let frame = inspectflow_operators::decode::read_rgb(
        path,
        &inspectflow_operators::BufferPool::new(1),
        0,
    )?;
    Ok(Canvas::from_rgb8(
        frame.layout.width as usize,
        frame.layout.height as usize,
        frame.pixels(),
    ))
}

/// Paints a defect of `kind` on `canvas`, seeded; returns the mask.
pub fn add_defect(canvas: &mut Canvas, kind: Defect, seed: u64) -> Vec<bool> {
    kind.paint(canvas, &mut Rng::new(seed ^ 0x00DE_FEC7))
}

/// Writes a dataset to `out` (created; it must not exist or be empty). The files appear
/// together: they are written to a sibling directory that is renamed into place at the end.
pub fn write_dataset(out: &Path, options: &SynthOptions) -> Result<(), SynthError> {
    if !(32..=2048).contains(&options.size) {
        return Err(SynthError::Invalid(format!(
            "--size {} is outside 32-2048",
            options.size
        )));
    }
    if let Some(photo) = &options.photo
        && (photo.width < options.size || photo.height < options.size)
    {
        return Err(SynthError::Invalid(format!(
            "--photo is {}x{}, smaller than --size {}",
            photo.width, photo.height, options.size
        )));
    }
    if options.train_normal == 0 {
        return Err(SynthError::Invalid("--train must be at least 1".into()));
    }
    if out.exists() {
        let empty = std::fs::read_dir(out)
            .map_err(io(format!("reading {}", out.display())))?
            .next()
            .is_none();
        if !empty {
            return Err(SynthError::Exists(out.to_path_buf()));
        }
        std::fs::remove_dir(out).map_err(io(format!("replacing {}", out.display())))?;
    }
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "dataset".into());
    let staging = out.with_file_name(format!(".{name}.partial"));
    let _ = std::fs::remove_dir_all(&staging);
    let result = write_into(&staging, options).and_then(|()| {
        std::fs::rename(&staging, out).map_err(io(format!("moving into {}", out.display())))
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

fn write_into(dir: &Path, options: &SynthOptions) -> Result<(), SynthError> {
    let size = options.size;
    let folders = ["train/normal", "test/normal", "test/anomalous", "masks"];
    for folder in folders {
        let path = dir.join(folder);
        std::fs::create_dir_all(&path).map_err(io(format!("creating {}", path.display())))?;
    }
    let write_rgb = |path: PathBuf, canvas: &Canvas| {
        write_png(&path, size, size, 3, &canvas.to_rgb8())
            .map_err(io(format!("writing {}", path.display())))
    };
    let normal = |index: u64| match &options.photo {
        Some(photo) => crop(photo, size, options.seed, index),
        None => normal_image(options.texture, size, options.seed, index),
    };
    let mut index = 0u64;
    for i in 0..options.train_normal {
        let canvas = normal(index);
        index += 1;
        write_rgb(dir.join(format!("train/normal/{i:04}.png")), &canvas)?;
    }
    for i in 0..options.test_normal {
        let canvas = normal(index);
        index += 1;
        write_rgb(dir.join(format!("test/normal/{i:04}.png")), &canvas)?;
    }
    for i in 0..options.test_anomalous {
        let mut canvas = normal(index);
        let kind = Defect::ALL[i % Defect::ALL.len()];
        let mask = add_defect(&mut canvas, kind, options.seed.wrapping_add(index));
        index += 1;
        let file = format!("{i:04}_{}.png", kind.name());
        write_rgb(dir.join("test/anomalous").join(&file), &canvas)?;
        let mask_bytes: Vec<u8> = mask.iter().map(|&m| if m { 255 } else { 0 }).collect();
        let mask_path = dir.join("masks").join(&file);
        write_png(&mask_path, size, size, 1, &mask_bytes)
            .map_err(io(format!("writing {}", mask_path.display())))?;
    }
    let description = serde_json::json!({
        "generator": "inspectflow synth",
        "texture": if options.photo.is_some() { "photo" } else { options.texture.name() },
        "options": options,
        "layout": folders,
    });
    let path = dir.join("dataset.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&description).unwrap_or_default(),
    )
    .map_err(io(format!("writing {}", path.display())))
}
