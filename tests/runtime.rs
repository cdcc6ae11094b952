//! Runtime behaviour: backpressure policies, fan-out without copies, batching, end of stream,
//! failures, restarts and draining stops.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{graph_from_yaml, registry_with_probe, run_to_end, seen_by};
use inspectflow::runtime::Pipeline;

const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn block_loses_nothing_through_a_slow_sink_and_keeps_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (registry, _) = registry_with_probe();
    let yaml = format!(
        r#"
nodes:
  - {{id: camera, op: source.synthetic, params: {{width: 64, height: 48, frames: 150}}}}
  - {{id: slow, op: identity, params: {{sleep_ms: 2}}}}
  - {{id: records, op: sink.folder, params: {{path: "{}", format: jpeg}}}}
edges:
  - {{from: camera, to: slow, queue: {{capacity: 2, policy: block}}}}
  - {{from: slow, to: records, queue: {{capacity: 2}}}}
"#,
        dir.path().display()
    );
    let outcome = run_to_end(&graph_from_yaml(&registry, &yaml), LIMIT);
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    assert_eq!(outcome.report.state, "completed");

    let index = std::fs::read_to_string(dir.path().join("results.jsonl")).expect("index written");
    let lines: Vec<serde_json::Value> = index
        .lines()
        .map(|line| serde_json::from_str(line).expect("every line is complete JSON"))
        .collect();
    let sequences: Vec<u64> = lines
        .iter()
        .map(|l| l["sequence"].as_u64().expect("sequence"))
        .collect();
    assert_eq!(
        sequences,
        (0..150).collect::<Vec<_>>(),
        "N in, N out, in order"
    );
    for line in &lines {
        let file = line["images"]["with_predictions"]["file"]
            .as_str()
            .expect("file name");
        assert!(dir.path().join(file).is_file(), "{file} listed but missing");
    }
    assert!(outcome.report.edges.iter().all(|edge| edge.dropped == 0));
}

#[test]
fn drop_oldest_keeps_latency_bounded_behind_a_ten_times_slower_sink() {
    let (registry, recordings) = registry_with_probe();
    // 30 FPS live camera for 3 s; the sink needs 333 ms per frame (10x slower than the camera).
    let yaml = r#"
nodes:
  - {id: camera, op: source.synthetic, params: {width: 160, height: 120, fps: 30, frames: 90, realtime: true}}
  - {id: slow, op: test.probe, params: {sleep_ms: 333}}
edges:
  - {from: camera, to: slow, queue: {capacity: 2}}
"#;
    let graph = graph_from_yaml(&registry, yaml);
    assert_eq!(
        graph.edges[0].policy.name(),
        "drop_oldest",
        "live sources default to drop_oldest"
    );
    let outcome = run_to_end(&graph, LIMIT);
    assert!(outcome.failure.is_none());

    let seen = seen_by(&recordings, "slow");
    let camera = outcome.report.node("camera").expect("camera metrics");
    let sink = outcome.report.node("slow").expect("sink metrics");
    assert_eq!(camera.packets_out, 90);
    assert!(sink.drops > 0, "drops are counted");
    assert_eq!(
        camera.packets_out,
        sink.packets_in + sink.drops,
        "every frame is either consumed or counted as dropped"
    );
    assert_eq!(seen.len() as u64, sink.packets_in);

    // With a block queue the k-th consumed frame would wait about k * 300 ms more than the first;
    // with drop_oldest and capacity 2, no frame waits more than about three sink periods (the
    // bound leaves room for a loaded machine: block would pass it by the seventh frame).
    let bound = Duration::from_millis(333 * 6);
    for frame in &seen {
        assert!(
            frame.end_to_end < bound,
            "frame {} waited {:?}: latency grows with run time",
            frame.sequence,
            frame.end_to_end
        );
    }
    // Sequence numbers jump: the sink works on recent frames, not a backlog (with block, the
    // ninth frame it took in 3 s would be frame 8). This, not a comparison of wall-clock
    // latencies early and late in the run, is what shows latency does not grow.
    assert!(seen.last().expect("frames").sequence > 80);
}

#[test]
fn fan_out_to_three_sinks_shares_one_pixel_buffer_per_frame() {
    let (registry, recordings) = registry_with_probe();
    let yaml = r#"
nodes:
  - {id: camera, op: source.synthetic, params: {width: 1920, height: 1080, frames: 200}}
  - {id: a, op: test.probe}
  - {id: b, op: test.probe}
  - {id: c, op: test.probe}
edges:
  - {from: camera, to: a}
  - {from: camera, to: b}
  - {from: camera, to: c}
"#;
    let outcome = run_to_end(&graph_from_yaml(&registry, yaml), LIMIT);
    assert!(outcome.failure.is_none());
    let (a, b, c) = (
        seen_by(&recordings, "a"),
        seen_by(&recordings, "b"),
        seen_by(&recordings, "c"),
    );
    assert_eq!((a.len(), b.len(), c.len()), (200, 200, 200));
    let mut copies = 0;
    for ((a, b), c) in a.iter().zip(&b).zip(&c) {
        assert_eq!((a.sequence, b.sequence), (b.sequence, c.sequence));
        if a.pixels_addr != b.pixels_addr || a.pixels_addr != c.pixels_addr {
            copies += 1;
        }
    }
    assert_eq!(
        copies, 0,
        "every sink must see the very buffer the source filled"
    );
    // And the buffers are recycled: 200 frames of 6 MB pass through a handful of buffers.
    let distinct: HashSet<usize> = a.iter().map(|s| s.pixels_addr).collect();
    assert!(
        distinct.len() <= 16,
        "{} distinct pixel buffers for 200 frames",
        distinct.len()
    );
}

#[test]
fn preprocess_attaches_a_tensor_that_reaches_a_tensor_sink() {
    let (registry, recordings) = registry_with_probe();
    let yaml = r#"
nodes:
  - {id: camera, op: source.synthetic, params: {width: 320, height: 240, frames: 10}}
  - {id: pre, op: preprocess, params: {width: 64, height: 64}}
  - {id: model, op: test.tensor_sink}
edges:
  - {from: camera, to: pre}
  - {from: pre, to: model}
"#;
    let outcome = run_to_end(&graph_from_yaml(&registry, yaml), LIMIT);
    assert!(outcome.failure.is_none());
    let seen = seen_by(&recordings, "model");
    assert_eq!(seen.len(), 10);
    assert!(seen.iter().all(|s| s.had_tensor));
}

#[test]
fn batches_fill_to_their_size_and_flush_at_end_of_stream() {
    let (registry, _) = registry_with_probe();
    let yaml = r#"
nodes:
  - {id: camera, op: source.synthetic, params: {width: 32, height: 32, frames: 10}}
  - {id: batched, op: identity, batch: {max_size: 4, max_wait_ms: 5000}}
  - {id: out, op: sink.null}
edges:
  - {from: camera, to: batched, queue: {capacity: 16}}
  - {from: batched, to: out}
"#;
    let outcome = run_to_end(&graph_from_yaml(&registry, yaml), LIMIT);
    let batched = outcome.report.node("batched").expect("metrics");
    assert_eq!(batched.packets_in, 10);
    assert_eq!(batched.batches, 3, "4 + 4 + 2");
    assert_eq!(outcome.report.node("out").expect("metrics").packets_in, 10);
}

#[test]
fn end_of_stream_ends_every_node_cleanly() {
    let (registry, _) = registry_with_probe();
    let yaml = r#"
nodes:
  - {id: camera, op: source.synthetic, params: {width: 64, height: 64, frames: 50}}
  - {id: one, op: identity}
  - {id: two, op: identity}
  - {id: out, op: sink.null}
edges:
  - {from: camera, to: one}
  - {from: one, to: two}
  - {from: two, to: out}
"#;
    let outcome = run_to_end(&graph_from_yaml(&registry, yaml), LIMIT);
    assert!(outcome.failure.is_none());
    assert_eq!(outcome.report.state, "completed");
    for node in ["one", "two", "out"] {
        assert_eq!(
            outcome.report.node(node).expect("metrics").packets_in,
            50,
            "{node}"
        );
    }
}

#[test]
fn an_operator_error_stops_an_endless_graph_and_names_the_node() {
    let (registry, _) = registry_with_probe();
    // Endless source, block edges: upstream is blocked on a full queue when the error comes.
    let yaml = r#"
nodes:
  - {id: camera, op: source.synthetic, params: {width: 64, height: 64}}
  - {id: faulty, op: identity, params: {error_after: 20, sleep_ms: 1}}
  - {id: out, op: sink.null}
edges:
  - {from: camera, to: faulty, queue: {capacity: 1}}
  - {from: faulty, to: out}
"#;
    let outcome = run_to_end(&graph_from_yaml(&registry, yaml), LIMIT);
    let failure = outcome.failure.expect("the run reports the failure");
    assert_eq!(failure.node, "faulty");
    assert!(
        failure.message.contains("injected failure"),
        "{}",
        failure.message
    );
    assert_eq!(outcome.report.state, "failed");
    assert_eq!(outcome.report.node("faulty").expect("metrics").errors, 1);
}

#[test]
fn on_failure_restarts_the_operator_and_the_run_goes_on() {
    let (registry, _) = registry_with_probe();
    let yaml = r#"
nodes:
  - {id: camera, op: source.synthetic, params: {width: 32, height: 32, frames: 12}}
  - id: flaky
    op: identity
    params: {error_after: 5}
    restart: {policy: on_failure, max_restarts: 10, backoff_ms: 1}
  - {id: out, op: sink.null}
edges:
  - {from: camera, to: flaky}
  - {from: flaky, to: out}
"#;
    let outcome = run_to_end(&graph_from_yaml(&registry, yaml), LIMIT);
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    let flaky = outcome.report.node("flaky").expect("metrics");
    // Fails on packet 5 of each instance: packets 5 and 10 fail, two restarts.
    assert_eq!((flaky.errors, flaky.restarts), (2, 2));
    assert_eq!(outcome.report.node("out").expect("metrics").packets_in, 10);
}

/// A source that fails and is rebuilt counts from 0 again; its frames go on after the last one
/// sent, so no two results of a run share a sequence (sinks key messages and files on it).
#[test]
fn a_restarted_source_continues_the_sequence_instead_of_repeating_it() {
    let (registry, recordings) = registry_with_probe();
    let yaml = r#"
nodes:
  - id: camera
    op: test.flaky_source
    params: {failing_instances: 2, error_after: 4, frames: 4}
    restart: {policy: on_failure, max_restarts: 2, backoff_ms: 1}
  - {id: sink, op: test.probe}
edges:
  - {from: camera, to: sink, queue: {capacity: 64, policy: block}}
"#;
    let outcome = run_to_end(&graph_from_yaml(&registry, yaml), LIMIT);
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    assert_eq!(outcome.report.node("camera").expect("metrics").restarts, 2);
    let sequences: Vec<u64> = seen_by(&recordings, "sink")
        .iter()
        .map(|seen| seen.sequence)
        .collect();
    assert_eq!(sequences, (0..12).collect::<Vec<u64>>());
}

#[test]
fn restarts_are_bounded_by_max_restarts() {
    let (registry, _) = registry_with_probe();
    let yaml = r#"
nodes:
  - {id: camera, op: source.synthetic, params: {width: 32, height: 32}}
  - id: flaky
    op: identity
    params: {error_after: 1}
    restart: {policy: on_failure, max_restarts: 2, backoff_ms: 1}
  - {id: out, op: sink.null}
edges:
  - {from: camera, to: flaky}
  - {from: flaky, to: out}
"#;
    let outcome = run_to_end(&graph_from_yaml(&registry, yaml), LIMIT);
    let failure = outcome.failure.expect("fails after the restarts run out");
    assert!(
        failure.message.contains("after 2 restarts"),
        "{}",
        failure.message
    );
}

#[test]
fn a_graceful_stop_drains_queued_frames_to_the_sinks() {
    let (registry, recordings) = registry_with_probe();
    let yaml = r#"
nodes:
  - {id: camera, op: source.synthetic, params: {width: 64, height: 64}}
  - {id: sink, op: test.probe, params: {sleep_ms: 5}}
edges:
  - {from: camera, to: sink, queue: {capacity: 8, policy: block}}
"#;
    let pipeline = Pipeline::start(&graph_from_yaml(&registry, yaml)).expect("starts");
    while seen_by(&recordings, "sink").len() < 20 {
        std::thread::sleep(Duration::from_millis(5));
    }
    pipeline.stop_handle().stop();
    let outcome = pipeline.wait();
    assert_eq!(outcome.report.state, "stopped");
    let produced = outcome.report.node("camera").expect("metrics").packets_out;
    let seen = seen_by(&recordings, "sink");
    assert_eq!(
        seen.len() as u64,
        produced,
        "every produced frame reached the sink"
    );
    let sequences: Vec<u64> = seen.iter().map(|s| s.sequence).collect();
    assert_eq!(sequences, (0..produced).collect::<Vec<_>>());
}

#[test]
fn a_missing_output_directory_fails_the_start_naming_the_node() {
    let (registry, _) = registry_with_probe();
    let yaml = r#"
nodes:
  - {id: camera, op: source.synthetic, params: {frames: 1}}
  - {id: archive, op: sink.folder, params: {path: /nonexistent/inspectflow/out}}
edges:
  - {from: camera, to: archive}
"#;
    let error = Pipeline::start(&graph_from_yaml(&registry, yaml))
        .err()
        .expect("must not start");
    let text = error.to_string();
    assert!(text.contains("node 'archive'"), "{text}");
    assert!(text.contains("does not exist"), "{text}");
}

/// A replicable stage whose packets take uneven times (so replicas finish out of turn), counting
/// how many of its instances work at once.
#[derive(Default)]
struct Overlap {
    working: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

struct Uneven(std::sync::Arc<Overlap>);

impl inspectflow::operators::Transform for Uneven {
    fn process(
        &mut self,
        packet: inspectflow::operators::Packet,
        out: &mut inspectflow::operators::Emitter,
    ) -> Result<(), inspectflow::operators::OpError> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.0.working.fetch_add(1, SeqCst) + 1;
        self.0.most.fetch_max(now, SeqCst);
        // 9, 1, 5, 1, 9, ... ms: a slow packet is followed by fast ones that overtake it.
        let ms = [9, 1, 5, 1][(packet.frame.sequence % 4) as usize];
        std::thread::sleep(Duration::from_millis(ms));
        self.0.working.fetch_sub(1, SeqCst);
        out.emit(0, packet);
        Ok(())
    }
}

fn registry_with_uneven_stage() -> (
    inspectflow::operators::Registry,
    common::Recordings,
    std::sync::Arc<Overlap>,
) {
    use inspectflow::operators::{
        OperatorDescriptor, OperatorInstance, OperatorKind, OutputType, PortType,
    };
    let (mut registry, recordings) = registry_with_probe();
    let overlap = std::sync::Arc::new(Overlap::default());
    let shared = std::sync::Arc::clone(&overlap);
    #[derive(serde::Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields)]
    struct NoParams {}
    registry.register(
        OperatorDescriptor::builder::<NoParams>(
            "test.uneven",
            OperatorKind::Transform,
            "Takes 9, 1, 5 or 1 ms per packet.",
        )
        .input("in", PortType::Any)
        .output("out", OutputType::SameAsInput)
        .replicable()
        .build_with(move |_, _| {
            Ok(OperatorInstance::Transform(Box::new(Uneven(
                std::sync::Arc::clone(&shared),
            ))))
        }),
    );
    (registry, recordings, overlap)
}

#[test]
fn replicas_work_side_by_side_and_results_leave_in_arrival_order() {
    let (registry, recordings, overlap) = registry_with_uneven_stage();
    let yaml = r#"
nodes:
  - {id: camera, op: source.synthetic, params: {width: 32, height: 32, frames: 120}}
  - {id: stage, op: test.uneven, replicas: 3}
  - {id: after, op: identity}
  - {id: out, op: test.probe}
edges:
  - {from: camera, to: stage, queue: {capacity: 8, policy: block}}
  - {from: stage, to: after, queue: {capacity: 2, policy: block}}
  - {from: after, to: out}
"#;
    let outcome = run_to_end(&graph_from_yaml(&registry, yaml), LIMIT);
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    assert_eq!(outcome.report.state, "completed");
    let sequences: Vec<u64> = seen_by(&recordings, "out")
        .iter()
        .map(|seen| seen.sequence)
        .collect();
    assert_eq!(sequences, (0..120).collect::<Vec<_>>(), "all, in order");
    let stage = outcome.report.node("stage").expect("metrics");
    assert_eq!((stage.packets_in, stage.packets_out), (120, 120));
    let most = overlap.most.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (2..=3).contains(&most),
        "three replicas, {most} at work at once"
    );
}

#[test]
fn a_failing_replica_restarts_alone_and_the_order_holds() {
    let (registry, recordings) = registry_with_probe();
    // Each replica counts its own packets: both fail on their 5th and are rebuilt.
    let yaml = r#"
nodes:
  - {id: camera, op: source.synthetic, params: {width: 32, height: 32, frames: 40}}
  - id: stage
    op: identity
    params: {sleep_ms: 1, error_after: 5}
    replicas: 2
    restart: {policy: on_failure, max_restarts: 10, backoff_ms: 0}
  - {id: out, op: test.probe}
edges:
  - {from: camera, to: stage, queue: {policy: block}}
  - {from: stage, to: out}
"#;
    let outcome = run_to_end(&graph_from_yaml(&registry, yaml), LIMIT);
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    let stage = outcome.report.node("stage").expect("metrics");
    assert!(stage.restarts >= 2, "{} restarts", stage.restarts);
    let sequences: Vec<u64> = seen_by(&recordings, "out")
        .iter()
        .map(|seen| seen.sequence)
        .collect();
    // The packets the failing calls had are lost (as with one instance); the rest in order.
    assert_eq!(sequences.len() as u64 + stage.errors, 40);
    assert!(
        sequences.windows(2).all(|pair| pair[0] < pair[1]),
        "{sequences:?}"
    );
}

#[test]
fn operators_are_built_knowing_whether_a_camera_feeds_them_and_how_many_the_pipeline_has() {
    let (mut registry, _recordings) = registry_with_probe();
    // Node id, live_input and live_sources as each build context said.
    let contexts: std::sync::Arc<std::sync::Mutex<Vec<(String, bool, usize)>>> =
        std::sync::Arc::default();
    let recorded = std::sync::Arc::clone(&contexts);
    common::register_pass_on(
        &mut registry,
        "test.context",
        "Records the context it was built in and passes packets on.",
        move |context| {
            recorded.lock().expect("contexts").push((
                context.node_id.to_string(),
                context.live_input,
                context.live_sources,
            ));
        },
    );
    let yaml = r#"
nodes:
  - {id: camera1, op: source.synthetic, params: {width: 32, height: 32, frames: 3, fps: 30, realtime: true}}
  - {id: camera2, op: source.synthetic, params: {width: 32, height: 32, frames: 3, fps: 30, realtime: true}}
  - {id: file, op: source.synthetic, params: {width: 32, height: 32, frames: 3}}
  - {id: after1, op: test.context}
  - {id: after2, op: test.context}
  - {id: after_file, op: test.context}
  - {id: out1, op: test.probe}
  - {id: out2, op: test.probe}
  - {id: out_file, op: test.probe}
edges:
  - {from: camera1, to: after1}
  - {from: camera2, to: after2}
  - {from: file, to: after_file}
  - {from: after1, to: out1}
  - {from: after2, to: out2}
  - {from: after_file, to: out_file}
"#;
    let outcome = run_to_end(&graph_from_yaml(&registry, yaml), LIMIT);
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    let mut contexts = contexts.lock().expect("contexts").clone();
    contexts.sort();
    assert_eq!(
        contexts,
        vec![
            ("after1".to_string(), true, 2),
            ("after2".to_string(), true, 2),
            ("after_file".to_string(), false, 2),
        ]
    );
}
