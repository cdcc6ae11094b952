//! A small PaDiM model package, fitted on generated normal textures, exported as one OpenVINO IR
//! and run through `inspectflow predict`: the defect scores higher than a normal image, is labelled
//! anomalous, and the map's hot region lies on the defect.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use inspectflow::backbone::Backbone;
use inspectflow::operators::package::ModelPackage;
use inspectflow::operators::{BufferPool, CaptureTime, Frame, ImageLayout, PixelFormat};
use inspectflow::train::padim::{self, PadimConfig};

const SIZE: usize = 256;
/// The defect: a dark disc.
const DEFECT_CENTRE: (f32, f32) = (170.0, 90.0);
const DEFECT_RADIUS: f32 = 18.0;

/// A striped, noisy texture; `seed` varies phase and noise. With `defect`, a dark disc.
fn texture(seed: u64, defect: bool) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 21) as f32 - 10.0
    };
    // Golden-angle phases cover the whole period evenly, so a new seed is like a seen one.
    let phase = (seed as f32 * 2.399_963) % std::f32::consts::TAU;
    let mut pixels = vec![0u8; SIZE * SIZE * 3];
    for y in 0..SIZE {
        for x in 0..SIZE {
            let stripes = (x as f32 * 0.21 + y as f32 * 0.07 + phase).sin() * 45.0;
            let mut value = 130.0 + stripes + noise();
            let (dx, dy) = (x as f32 - DEFECT_CENTRE.0, y as f32 - DEFECT_CENTRE.1);
            if defect && (dx * dx + dy * dy).sqrt() < DEFECT_RADIUS {
                value = 15.0 + noise();
            }
            let v = value.clamp(0.0, 255.0) as u8;
            pixels[(y * SIZE + x) * 3..(y * SIZE + x) * 3 + 3].copy_from_slice(&[v, v, v]);
        }
    }
    pixels
}

fn frame(pixels: &[u8]) -> Frame {
    let layout = ImageLayout::packed(SIZE as u32, SIZE as u32, PixelFormat::Rgb);
    let pool = BufferPool::new(1);
    let mut buffer = pool.get(layout.byte_len());
    buffer.copy_from_slice(pixels);
    Frame::new(buffer, layout, Arc::from("test"), 0, CaptureTime::now())
}

fn write_png(path: &Path, pixels: &[u8]) {
    let file = std::fs::File::create(path).expect("create");
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), SIZE as u32, SIZE as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder
        .write_header()
        .expect("header")
        .write_image_data(pixels)
        .expect("data");
}

#[test]
fn predict_scores_a_defect_above_a_normal_image_and_locates_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let normals: Vec<Frame> = (0..16).map(|seed| frame(&texture(seed, false))).collect();
    let config = PadimConfig {
        backbone: Backbone::MobilenetV2,
        input_size: SIZE,
        channels: 64,
        seed: 3,
    };
    let package_dir = dir.path().join("model");
    let package = padim::train(&config, &normals, &package_dir).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(package.manifest.architecture, "padim");
    assert_eq!(
        package.manifest.provenance.training_images
            + package.manifest.provenance.calibration_images,
        16
    );
    assert!(
        !dir.path().join(".model.partial").exists() && !dir.path().join(".model.scratch").exists()
    );

    let normal_png = dir.path().join("normal.png");
    let defect_png = dir.path().join("defect.png");
    write_png(&normal_png, &texture(100, false));
    write_png(&defect_png, &texture(101, true));
    let overlays = dir.path().join("overlays");
    let output = Command::new(env!("CARGO_BIN_EXE_inspectflow"))
        .arg("predict")
        .arg("--model")
        .arg(&package_dir)
        .arg(&normal_png)
        .arg(&defect_png)
        .arg("--out")
        .arg(&overlays)
        .arg("--json")
        .output()
        .expect("runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let predictions = report["predictions"].as_array().expect("predictions");
    let (normal, defect) = (&predictions[0], &predictions[1]);
    let score = |p: &serde_json::Value| p["score"].as_f64().expect("score");
    assert!(
        score(defect) > score(normal),
        "defect {defect} vs normal {normal}"
    );
    assert_eq!(defect["label"], "Anomalous", "{defect}");
    assert_eq!(normal["label"], "Normal", "{normal}");
    for prediction in predictions {
        let overlay = prediction["overlay"].as_str().expect("overlay path");
        assert!(Path::new(overlay).is_file());
    }

    // The hot region lies on the defect: the map's maximum is inside the disc (with a margin of
    // one feature cell), and the map is much hotter on the disc than elsewhere.
    let package = ModelPackage::open(&package_dir).expect("package");
    let mut model = padim::load(&package.model_path()).expect("model");
    let mut preprocess = padim::preprocessor(SIZE).expect("preprocess");
    let (_, map) =
        padim::run(&mut model, &mut preprocess, &frame(&texture(101, true))).expect("runs");
    let inside = |i: usize| {
        let (x, y) = ((i % SIZE) as f32, (i / SIZE) as f32);
        ((x - DEFECT_CENTRE.0).powi(2) + (y - DEFECT_CENTRE.1).powi(2)).sqrt()
    };
    let hottest = (0..map.len())
        .max_by(|a, b| map[*a].total_cmp(&map[*b]))
        .expect("map");
    assert!(
        inside(hottest) < DEFECT_RADIUS + 8.0,
        "hottest pixel {hottest} is {} px from the defect",
        inside(hottest)
    );
    let mean = |pick: &dyn Fn(f32) -> bool| {
        let values: Vec<f32> = (0..map.len())
            .filter(|&i| pick(inside(i)))
            .map(|i| map[i])
            .collect();
        values.iter().sum::<f32>() / values.len() as f32
    };
    let on_defect = mean(&|d| d < DEFECT_RADIUS);
    let elsewhere = mean(&|d| d > DEFECT_RADIUS * 3.0);
    assert!(
        on_defect > 2.0 * elsewhere,
        "map on the defect {on_defect} vs elsewhere {elsewhere}"
    );
}

#[test]
fn training_with_too_few_images_fails_clearly_and_leaves_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let normals: Vec<Frame> = (0..2).map(|seed| frame(&texture(seed, false))).collect();
    let config = PadimConfig {
        backbone: Backbone::MobilenetV2,
        input_size: SIZE,
        channels: 64,
        seed: 3,
    };
    let error = padim::train(&config, &normals, &dir.path().join("model"))
        .expect_err("fails")
        .to_string();
    assert!(error.contains("at least 3 normal images"), "{error}");
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("dir").count(),
        0,
        "nothing written"
    );
}
