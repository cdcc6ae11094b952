//! `sink.nats` against a real nats-server with JetStream on 127.0.0.1: killed and restarted in
//! the middle of a run, it loses nothing; results sent twice are stored once; a subject with
//! wildcards is refused naming the field.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::nats::{NatsServer, repeated_ids, stored_count, stored_messages};
use common::{graph_from_yaml, registry_with_probe, run_to_end};

const LIMIT: Duration = Duration::from_secs(120);

fn message_schema() -> jsonschema::Validator {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/prediction-message.schema.json"),
    )
    .expect("schemas/prediction-message.schema.json (run `inspectflow schemas`)");
    let schema: serde_json::Value = serde_json::from_str(&text).expect("schema is JSON");
    jsonschema::validator_for(&schema).expect("schema compiles")
}

fn graph(url: &str, frames: u64, fps: u32, run_name: &str) -> String {
    // A live-paced camera, so that the restart falls in the middle of the run; the edge into the
    // sink blocks, so nothing is dropped while the server is away.
    format!(
        r#"
name: {run_name}
nodes:
  - {{id: camera, op: source.synthetic, params: {{width: 64, height: 48, frames: {frames}, fps: {fps}, realtime: true}}}}
  - {{id: verdict, op: test.verdict, params: {{anomalous_every: 4}}}}
  - id: nats
    op: sink.nats
    params: {{url: "{url}", subject: "lines.{{pipeline}}.{{stream}}", stream: RESULTS, ack_timeout_ms: 1000, initial_backoff_ms: 50, max_backoff_ms: 300}}
edges:
  - {{from: camera, to: verdict, queue: {{policy: block}}}}
  - {{from: verdict, to: nats, queue: {{capacity: 8, policy: block}}}}
"#
    )
}

#[test]
fn sink_nats_loses_nothing_across_a_server_crash_and_restart() {
    const FRAMES: u64 = 300;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut server = NatsServer::start(dir.path());
    let url = server.url();
    let (registry, _) = registry_with_probe();
    let graph = graph_from_yaml(&registry, &graph(&url, FRAMES, 100, "line-7"));
    let outcome = std::thread::scope(|scope| {
        let run = scope.spawn(|| run_to_end(&graph, LIMIT));
        let started = Instant::now();
        while stored_count(&url, "RESULTS") < 60 {
            assert!(started.elapsed() < LIMIT, "no results reach JetStream");
            std::thread::sleep(Duration::from_millis(20));
        }
        server.kill();
        std::thread::sleep(Duration::from_millis(800));
        server.resume();
        run.join().expect("run thread")
    });
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    let report = outcome
        .report
        .node("nats")
        .and_then(|n| n.sink.clone())
        .expect("sink report");
    assert!(
        report.outages >= 1,
        "the crash shows as an outage: {report:?}"
    );
    assert_eq!(report.failed, 0, "{report:?}");

    let stored = stored_messages(&url, "RESULTS");
    assert!(
        repeated_ids(&stored).is_empty(),
        "JetStream stores each id once: {:?}",
        repeated_ids(&stored)
    );
    let schema = message_schema();
    let mut sequences = BTreeSet::new();
    for stored in &stored {
        let errors: Vec<String> = schema
            .iter_errors(&stored.message)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{errors:?} in {}", stored.message);
        assert_eq!(stored.subject, "lines.line-7.camera");
        let sequence = stored.message["sequence"].as_u64().expect("sequence");
        assert!(
            stored.id.starts_with("line-7/") && stored.id.ends_with(&format!("/camera/{sequence}")),
            "message id {} names the pipeline, run, stream and sequence",
            stored.id
        );
        assert_eq!(
            stored.message["prediction"]["anomalous"].as_bool(),
            Some(sequence.is_multiple_of(4))
        );
        sequences.insert(sequence);
    }
    assert_eq!(
        sequences,
        (0..FRAMES).collect::<BTreeSet<_>>(),
        "every result is stored ({} of {FRAMES})",
        stored.len()
    );
    assert_eq!(stored.len() as u64, FRAMES);
}

#[test]
fn a_second_run_with_the_same_run_id_is_stored_once_and_counted_as_skipped() {
    const FRAMES: u64 = 40;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = NatsServer::start(dir.path());
    let url = server.url();
    let (registry, _) = registry_with_probe();
    let graph = graph_from_yaml(&registry, &graph(&url, FRAMES, 1000, "replayed"));
    // Two runs under one run id, as when a fleet pipeline moves to another engine and replays
    // its file from the start.
    for round in 0..2 {
        let pipeline = inspectflow::runtime::Pipeline::start_run(
            &graph,
            inspectflow::runtime::RunMode::Running,
            "fleet-generation-1",
        )
        .expect("starts");
        let outcome = pipeline.wait();
        assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
        let sink = outcome
            .report
            .node("nats")
            .and_then(|n| n.sink.clone())
            .expect("sink report");
        let expected_skipped = if round == 0 { 0 } else { FRAMES };
        assert_eq!(sink.skipped, expected_skipped, "round {round}: {sink:?}");
        assert_eq!(sink.failed, 0, "{sink:?}");
    }
    let stored = stored_messages(&url, "RESULTS");
    assert_eq!(stored.len() as u64, FRAMES);
    assert!(
        stored
            .iter()
            .all(|m| m.id.starts_with("replayed/fleet-generation-1/camera/"))
    );

    // A plain run gets a run id of its own: its results are new messages.
    let outcome = run_to_end(&graph, LIMIT);
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    assert_eq!(stored_count(&url, "RESULTS"), 2 * FRAMES);
}

#[test]
fn a_subject_with_wildcards_is_refused_naming_the_node_and_field() {
    let (registry, _) = registry_with_probe();
    let yaml = r#"
name: bad
nodes:
  - {id: camera, op: source.synthetic, params: {frames: 1}}
  - {id: out, op: sink.nats, params: {url: "nats://127.0.0.1:1", subject: "lines.>"}}
edges:
  - {from: camera, to: out}
"#;
    let Err(errors) = inspectflow::graph::load_str(
        "bad.yaml",
        yaml,
        false,
        &registry,
        &inspectflow::graph::GraphLimits::DEFAULT,
    ) else {
        panic!("a wildcard subject is refused");
    };
    let error = errors.to_string();
    assert!(
        error.contains("out") && error.contains("subject"),
        "{error}"
    );
}
