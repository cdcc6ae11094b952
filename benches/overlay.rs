//! The overlay stages on one core at 1080p, for an I420 video frame: the heatmap blend and the
//! JPEG (quality 95), each the way the pipeline runs it now (in the frame's planes, JPEG from
//! YCbCr planes) and the way it ran before (the frame converted to RGB first), in one run.
//!
//! `cargo bench --bench overlay`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use inspectflow::operators::packet::Prediction;
use inspectflow::operators::transform::encode::{EncodeParams, JpegEncoder};
use inspectflow::operators::transform::heatmap::{HeatmapParams, OverlayRenderer};
use inspectflow::operators::{BufferPool, CaptureTime, Frame, ImageLayout, PixelFormat, yuv};

fn i420_1080p() -> Frame {
    let layout = ImageLayout::packed(1920, 1080, PixelFormat::I420);
    let pool = BufferPool::new(1);
    let mut pixels = pool.get(layout.byte_len());
    for (i, byte) in pixels.iter_mut().enumerate() {
        *byte = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
    }
    Frame::new(pixels, layout, "bench".into(), 0, CaptureTime::now())
}

fn prediction() -> Prediction {
    let pool = BufferPool::new(1);
    // A 32x32 map (a model's feature grid; the packages trained here give their input size,
    // 256x256), a ramp from left to right.
    let mut map = pool.get(32 * 32);
    for (i, value) in map.iter_mut().enumerate() {
        *value = (i % 32) as f32 / 31.0;
    }
    Prediction {
        raw_score: 1.0,
        score: 0.6,
        threshold: 0.7,
        anomalous: false,
        model: "bench".into(),
        map,
        map_width: 32,
        map_height: 32,
    }
}

fn overlay(c: &mut Criterion) {
    let frame = i420_1080p();
    let prediction = prediction();
    let pool = BufferPool::new(8);
    let mut renderer = OverlayRenderer::new(8);
    let params: HeatmapParams =
        serde_json::from_value(serde_json::json!({"alpha": 0.4})).expect("valid parameters");
    let mut encoder = JpegEncoder::new(
        serde_json::from_value::<EncodeParams>(serde_json::json!({"quality": 95}))
            .expect("valid parameters"),
    )
    .expect("starts");
    let overlay_i420 = renderer
        .render(&frame, &prediction, &params)
        .expect("renders");
    let overlay_rgb = yuv::to_rgb_frame(&overlay_i420, &pool);
    let mut group = c.benchmark_group("overlay_1080p");
    group.bench_function("heatmap_in_i420_planes", |b| {
        b.iter(|| black_box(renderer.render(black_box(&frame), &prediction, &params)))
    });
    let plain: HeatmapParams =
        serde_json::from_value(serde_json::json!({"alpha": 0.4, "outline": false, "label": false}))
            .expect("valid parameters");
    group.bench_function("heatmap_in_i420_planes_blend_only", |b| {
        b.iter(|| black_box(renderer.render(black_box(&frame), &prediction, &plain)))
    });
    group.bench_function("heatmap_after_rgb_conversion", |b| {
        b.iter(|| {
            let rgb = yuv::to_rgb_frame(black_box(&frame), &pool);
            black_box(renderer.render(&rgb, &prediction, &params))
        })
    });
    group.bench_function("jpeg_q95_from_i420_planes", |b| {
        b.iter(|| black_box(encoder.encode(black_box(&overlay_i420)).expect("encodes")))
    });
    group.bench_function("jpeg_q95_from_rgb", |b| {
        b.iter(|| black_box(encoder.encode(black_box(&overlay_rgb)).expect("encodes")))
    });
    group.finish();
}

criterion_group!(benches, overlay);
criterion_main!(benches);
