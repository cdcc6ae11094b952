//! Per-hop overhead of the runtime: 1080p frames through a chain of pass-through operators, each
//! on its own thread behind its own bounded queue. Compare `chain/10` with `chain/0` (source
//! straight into the sink): the difference divided by ten is the cost of one hop.
//!
//! `cargo bench --bench hop`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use inspectflow::graph;
use inspectflow::operators::{
    BufferPool, CaptureTime, Frame, ImageLayout, OpError, OperatorDescriptor, OperatorInstance,
    OperatorKind, OutputType, Packet, PixelFormat, PortType, Registry, Source, SourceContext,
    SourcePoll,
};
use inspectflow::runtime::Pipeline;

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct ReplayParams {
    frames: u64,
}

/// Emits the same 1080p frame again and again (new sequence numbers, shared pixels), so that the
/// benchmark measures the runtime, not frame generation.
struct Replay {
    frame: Frame,
    remaining: u64,
    sequence: u64,
}

impl Source for Replay {
    fn next(&mut self, _ctx: &SourceContext) -> Result<SourcePoll, OpError> {
        if self.remaining == 0 {
            return Ok(SourcePoll::EndOfStream);
        }
        self.remaining -= 1;
        let mut frame = self.frame.clone();
        frame.sequence = self.sequence;
        frame.capture = CaptureTime::now();
        self.sequence += 1;
        Ok(SourcePoll::Packet(Packet::from_frame(frame)))
    }
}

fn registry() -> Registry {
    let layout = ImageLayout::packed(1920, 1080, PixelFormat::Rgb);
    let pool = BufferPool::new(1);
    let frame = Frame::new(
        pool.get(layout.byte_len()),
        layout,
        Arc::from("bench"),
        0,
        CaptureTime::now(),
    );
    let mut registry = Registry::builtin();
    registry.register(
        OperatorDescriptor::builder::<ReplayParams>(
            "bench.replay",
            OperatorKind::Source,
            "Replays one frame.",
        )
        .output("out", OutputType::Fixed(PortType::Image))
        .build_with(move |params, _| {
            Ok(OperatorInstance::Source(Box::new(Replay {
                frame: frame.clone(),
                remaining: params.frames,
                sequence: 0,
            })))
        }),
    );
    registry
}

fn chain_yaml(hops: usize, frames: u64) -> String {
    let mut yaml =
        format!("nodes:\n  - {{id: src, op: bench.replay, params: {{frames: {frames}}}}}\n");
    for i in 0..hops {
        yaml.push_str(&format!("  - {{id: hop{i}, op: identity}}\n"));
    }
    yaml.push_str("  - {id: out, op: sink.null}\nedges:\n");
    let mut previous = "src".to_string();
    for i in 0..hops {
        yaml.push_str(&format!(
            "  - {{from: {previous}, to: hop{i}, queue: {{capacity: 16}}}}\n"
        ));
        previous = format!("hop{i}");
    }
    yaml.push_str(&format!(
        "  - {{from: {previous}, to: out, queue: {{capacity: 16}}}}\n"
    ));
    yaml
}

fn run_frames(registry: &Registry, hops: usize, frames: u64) -> Duration {
    let graph = graph::load_str(
        "bench.yaml",
        &chain_yaml(hops, frames),
        false,
        registry,
        &graph::GraphLimits::DEFAULT,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let outcome = Pipeline::start(&graph)
        .unwrap_or_else(|e| panic!("{e}"))
        .wait();
    let elapsed = started.elapsed();
    assert!(outcome.failure.is_none());
    elapsed
}

fn hops(c: &mut Criterion) {
    let registry = registry();
    let mut group = c.benchmark_group("chain");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(8));
    for hops in [0usize, 10] {
        group.bench_function(format!("{hops}"), |b| {
            b.iter_custom(|frames| run_frames(&registry, hops, frames.max(1)))
        });
    }
    group.finish();
}

criterion_group!(benches, hops);
criterion_main!(benches);
