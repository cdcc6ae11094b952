//! The libtorch side of training (feature `torch`): MobileNetV2's feature layers in tch, loaded
//! from the same ImageNet checkpoint as the OpenVINO backbone, compute the same features as the
//! backbone's IR does in OpenVINO (the oracle), so a teacher in tch is the teacher the exported
//! models run.

#![cfg(feature = "torch")]

use inspectflow::backbone::Backbone;
use inspectflow::train::torch_mobilenet;

/// A 64x64 RGB test picture: gradients and a bright square.
fn picture(path: &std::path::Path) -> Vec<f32> {
    let size = 64u32;
    let image = image::RgbImage::from_fn(size, size, |x, y| {
        let square = (20..40).contains(&x) && (24..44).contains(&y);
        if square {
            image::Rgb([250, 240, 30])
        } else {
            image::Rgb([(x * 4) as u8, (y * 4) as u8, ((x + y) * 2) as u8])
        }
    });
    image.save(path).expect("write PNG");
    // Planar RGB in [0, 1], as preprocess hands it to the model.
    let mut planes = vec![0f32; 3 * (size * size) as usize];
    for (x, y, pixel) in image.enumerate_pixels() {
        for channel in 0..3 {
            planes[channel * (size * size) as usize + (y * size + x) as usize] =
                f32::from(pixel[channel]) / 255.0;
        }
    }
    planes
}

fn largest_difference(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let difference = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max);
    (difference, scale)
}

#[test]
fn the_tch_teacher_computes_the_openvino_backbones_features() {
    let dir = tempfile::tempdir().expect("temp dir");
    let png = dir.path().join("picture.png");
    let planes = picture(&png);
    let xml = dir.path().join("backbone.xml");
    Backbone::MobilenetV2.import(64, &xml).expect("backbone IR");
    let outputs = inspectflow::train::batch::run_model(&xml, "CPU", &[png], 64, &mut |_| {})
        .expect("OpenVINO runs the backbone");

    let (_store, teacher) = torch_mobilenet::teacher(tch::Device::Cpu).expect("teacher loads");
    let input = tch::Tensor::from_slice(&planes).view([1, 3, 64, 64]);
    let (stride_8, stride_16) = tch::no_grad(|| teacher.forward_t(&input, false));
    assert_eq!(stride_8.size(), [1, 32, 8, 8]);
    assert_eq!(stride_16.size(), [1, 96, 4, 4]);
    for (name, features) in [("features_s8", stride_8), ("features_s16", stride_16)] {
        let torch: Vec<f32> = Vec::try_from(features.flatten(0, -1)).expect("f32 values");
        let openvino = &outputs[0][name];
        let (difference, scale) = largest_difference(&torch, openvino);
        assert!(
            difference <= 1e-3 * scale.max(1.0),
            "{name}: largest difference {difference} (values up to {scale})"
        );
    }
}

#[test]
fn a_checkpoint_missing_a_parameter_is_refused_naming_it() {
    let mut store = tch::nn::VarStore::new(tch::Device::Cpu);
    let _network = torch_mobilenet::MobileNetFeatures::new(&store.root());
    let checkpoint = Backbone::MobilenetV2
        .locate_weights()
        .expect("weights installed");
    let mut tensors =
        inspectflow::backbone::torch_legacy::read_state_dict(&checkpoint).expect("checkpoint");
    tensors.remove("features.3.conv.1.1.running_var");
    let error = torch_mobilenet::load_checkpoint(&mut store, &tensors, "mobilenet.pth")
        .expect_err("a missing parameter is an error");
    assert!(
        error.contains("features.3.conv.1.1.running_var") && error.contains("mobilenet.pth"),
        "{error}"
    );
}
