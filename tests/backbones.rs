//! The imported ImageNet backbones run on the real OpenVINO runtime and recognise real photos
//! (scikit-image's `chelsea` cat and `coffee` cup, from the scikit-image wheel that the set-up
//! installs): proof that the checkpoint reader, BatchNorm folding, padding and normalisation are
//! right.

use std::path::PathBuf;

use inspectflow::backbone::Backbone;
use inspectflow::operators::decode;
use inspectflow::operators::infer::model::{CompileOptions, LoadedModel};
use inspectflow::operators::infer::runtime;
use inspectflow::operators::transform::preprocess::{Preprocess, PreprocessParams};
use inspectflow::operators::{BufferPool, CaptureTime, Frame, ImageLayout, PixelFormat};

/// ImageNet classes: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso.
const CATS: [usize; 3] = [281, 282, 285];
const ESPRESSO: usize = 967;

fn photo(name: &str) -> Frame {
    let path: PathBuf = runtime::site_packages()
        .iter()
        .map(|site| site.join("skimage/data").join(format!("{name}.png")))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!("{name}.png not found: run scripts/setup.sh (installs scikit-image's wheel)")
        });
    let pool = BufferPool::new(2);
    let full = decode::read_rgb(&path, &pool, 0).expect("decodes");
    // Centre square crop, as ImageNet evaluation does.
    let (width, height) = (full.layout.width as usize, full.layout.height as usize);
    let side = width.min(height);
    let (left, top) = ((width - side) / 2, (height - side) / 2);
    let layout = ImageLayout::packed(side as u32, side as u32, PixelFormat::Rgb);
    let mut pixels = pool.get(layout.byte_len());
    for y in 0..side {
        let from = ((top + y) * width + left) * 3;
        pixels[y * side * 3..(y + 1) * side * 3]
            .copy_from_slice(&full.pixels()[from..from + side * 3]);
    }
    Frame::new(pixels, layout, name.into(), 0, CaptureTime::now())
}

fn top5(model: &LoadedModel, frame: &Frame) -> Vec<usize> {
    let params: PreprocessParams = serde_json::from_value(
        serde_json::json!({"width": 224, "height": 224, "resize": "bilinear_antialias"}),
    )
    .expect("params");
    let tensor = Preprocess::new(params)
        .expect("builds")
        .tensor_for(frame)
        .expect("preprocesses");
    let outputs = model.infer(&tensor.to_vec()).expect("infers");
    let logits_output = outputs
        .iter()
        .find(|output| output.name == "logits")
        .expect("logits output");
    assert_eq!(logits_output.shape, vec![1, 1000]);
    let logits = &logits_output.values;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]));
    order.truncate(5);
    order
}

fn check(backbone: Backbone) {
    let dir = tempfile::tempdir().expect("temp dir");
    let xml = dir.path().join(format!("{}.xml", backbone.name()));
    backbone.import(224, &xml).unwrap_or_else(|e| panic!("{e}"));
    let model =
        LoadedModel::load(&xml, &CompileOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = model.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, vec!["features_s8", "features_s16", "logits"]);
    let [s8, s16] = backbone.feature_channels();
    assert_eq!(model.outputs[0].shape, vec![1, s8 as i64, 28, 28]);
    assert_eq!(model.outputs[1].shape, vec![1, s16 as i64, 14, 14]);

    let cat = top5(&model, &photo("chelsea"));
    assert!(
        cat.iter().any(|class| CATS.contains(class)),
        "{}: chelsea top-5 {cat:?} has no cat",
        backbone.name()
    );
    let coffee = top5(&model, &photo("coffee"));
    assert_eq!(
        coffee[0],
        ESPRESSO,
        "{}: coffee top-5 {coffee:?}",
        backbone.name()
    );
}

#[test]
fn mobilenet_v2_recognises_the_cat_and_the_espresso() {
    check(Backbone::MobilenetV2);
}

#[test]
fn efficientnet_lite0_recognises_the_cat_and_the_espresso() {
    check(Backbone::EfficientnetLite0);
}
