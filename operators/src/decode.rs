//! Decoding image files (PNG, JPEG) into frames, for the image-file inputs of the command line
//! and, later, the images-folder source and training datasets.

use std::path::Path;
use std::sync::Arc;

use crate::contract::OpError;
use crate::packet::{CaptureTime, Frame, ImageLayout, PixelFormat};
use crate::pool::BufferPool;

/// Decodes `bytes` (PNG or JPEG, detected from the content) into an RGB frame from `pool`.
/// `origin` names the image in errors.
pub fn decode_rgb(
    bytes: &[u8],
    origin: &str,
    pool: &BufferPool<u8>,
    sequence: u64,
) -> Result<Frame, OpError> {
    let image = image::load_from_memory(bytes).map_err(|e| {
        OpError::UnsupportedInput(format!("{origin}: not a readable PNG or JPEG image ({e})"))
    })?;
    let rgb = image.into_rgb8();
    let layout = ImageLayout::packed(rgb.width(), rgb.height(), PixelFormat::Rgb);
    let mut pixels = pool.get(layout.byte_len());
    pixels.copy_from_slice(rgb.as_raw());
    Ok(Frame::new(
        pixels,
        layout,
        Arc::from(origin),
        sequence,
        CaptureTime::now(),
    ))
}

/// Reads and decodes an image file.
pub fn read_rgb(path: &Path, pool: &BufferPool<u8>, sequence: u64) -> Result<Frame, OpError> {
    let bytes =
        std::fs::read(path).map_err(|e| OpError::io(format!("reading {}", path.display()), e))?;
    decode_rgb(&bytes, &path.display().to_string(), pool, sequence)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bytes_that_are_not_an_image_and_names_them() {
        let pool = BufferPool::new(1);
        let error = decode_rgb(b"not an image", "notes.txt", &pool, 0).expect_err("fails");
        assert!(error.to_string().contains("notes.txt"), "{error}");
    }

    #[test]
    fn decodes_a_png_it_encoded() {
        let mut encoded = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut encoded, 2, 1);
            encoder.set_color(png::ColorType::Rgb);
            encoder.set_depth(png::BitDepth::Eight);
            let mut writer = encoder.write_header().expect("header");
            writer
                .write_image_data(&[255, 0, 0, 0, 0, 255])
                .expect("data");
        }
        let pool = BufferPool::new(1);
        let frame = decode_rgb(&encoded, "two.png", &pool, 7).expect("decodes");
        assert_eq!(
            (frame.layout.width, frame.layout.height, frame.sequence),
            (2, 1, 7)
        );
        assert_eq!(&frame.pixels()[..6], &[255, 0, 0, 0, 0, 255]);
    }
}
