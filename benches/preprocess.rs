//! `preprocess` on one core: a 1080p RGB frame to a 256x256 f32 NCHW tensor with ImageNet
//! normalisation, for each resize method: the resize into a pooled 8-bit buffer and the f32
//! values written into a reused input buffer, as `infer.openvino` writes its request's input.
//!
//! `cargo bench --bench preprocess`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use inspectflow::operators::transform::preprocess::{Preprocess, PreprocessParams};
use inspectflow::operators::{BufferPool, CaptureTime, Frame, ImageLayout, PixelFormat};

fn frame_1080p() -> Frame {
    let layout = ImageLayout::packed(1920, 1080, PixelFormat::Rgb);
    let pool = BufferPool::new(1);
    let mut pixels = pool.get(layout.byte_len());
    for (i, byte) in pixels.iter_mut().enumerate() {
        *byte = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
    }
    Frame::new(pixels, layout, "bench".into(), 0, CaptureTime::now())
}

fn preprocess(c: &mut Criterion) {
    let frame = frame_1080p();
    let mut group = c.benchmark_group("preprocess_1080p_to_256");
    for method in ["nearest", "bilinear", "bilinear_antialias"] {
        let params: PreprocessParams = serde_json::from_value(serde_json::json!({
            "width": 256, "height": 256, "resize": method,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]
        }))
        .expect("valid parameters");
        let mut op = Preprocess::new(params).expect("builds");
        let mut input = vec![0f32; 3 * 256 * 256];
        group.bench_function(method, |b| {
            b.iter(|| {
                let tensor = op.tensor_for(black_box(&frame)).expect("runs");
                tensor.write_to(&mut input);
                black_box(&input);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, preprocess);
criterion_main!(benches);
