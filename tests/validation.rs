//! Each kind of validation error names the file, the node and the field (and the line), and all
//! errors come at once.

mod common;

use common::registry_with_probe;
use inspectflow::graph::{self, GraphError, GraphLimits};

fn errors_of(yaml: &str) -> Vec<GraphError> {
    let (registry, _) = registry_with_probe();
    match graph::load_str("line.yaml", yaml, false, &registry, &GraphLimits::DEFAULT) {
        Ok(_) => panic!("graph should be invalid"),
        Err(errors) => errors.0,
    }
}

/// The single error about `field`, checking that it names the file and `node`.
fn error_for<'a>(errors: &'a [GraphError], node: Option<&str>, field: &str) -> &'a GraphError {
    let error = errors
        .iter()
        .find(|e| e.field.as_deref() == Some(field) && e.node.as_deref() == node)
        .unwrap_or_else(|| panic!("no error for node {node:?} field {field}; got:\n{errors:#?}"));
    assert_eq!(error.file, "line.yaml");
    error
}

const VALID_TAIL: &str = "  - {id: out, op: sink.null}\nedges:\n  - {from: cam, to: out}\n";

#[test]
fn unknown_operator_is_named_with_a_suggestion() {
    let errors = errors_of(&format!(
        "nodes:\n  - {{id: cam, op: source.synthetik}}\n{VALID_TAIL}"
    ));
    let error = error_for(&errors, Some("cam"), "op");
    assert!(
        error
            .message
            .contains("unknown operator 'source.synthetik'"),
        "{}",
        error.message
    );
    assert!(
        error.message.contains("did you mean 'source.synthetic'"),
        "{}",
        error.message
    );
    assert_eq!(error.line, Some(2));
}

#[test]
fn unknown_missing_and_ill_typed_parameters_are_all_reported() {
    let yaml = "nodes:
  - id: cam
    op: source.synthetic
    params:
      width: wide
      fsp: 30
  - id: pre
    op: preprocess
    params:
      height: 10
  - {id: out, op: sink.null}
edges:
  - {from: cam, to: pre}
  - {from: pre, to: out}
";
    let errors = errors_of(yaml);
    let ill_typed = error_for(&errors, Some("cam"), "params.width");
    assert!(
        ill_typed.message.contains("integer"),
        "{}",
        ill_typed.message
    );
    assert_eq!(ill_typed.line, Some(5));
    let unknown = error_for(&errors, Some("cam"), "params.fsp");
    assert!(
        unknown.message.contains("unknown field 'fsp'"),
        "{}",
        unknown.message
    );
    assert_eq!(unknown.line, Some(6));
    let missing = error_for(&errors, Some("pre"), "params.width");
    assert!(
        missing.message.contains("missing required field 'width'"),
        "{}",
        missing.message
    );
    assert_eq!(errors.len(), 3, "{errors:#?}");
}

#[test]
fn out_of_range_and_wrong_enum_values_are_reported() {
    let yaml = format!(
        "nodes:\n  - {{id: cam, op: source.synthetic, params: {{width: 0, pattern: stripes}}}}\n{VALID_TAIL}"
    );
    let errors = errors_of(&yaml);
    assert!(
        error_for(&errors, Some("cam"), "params.width")
            .message
            .contains("minimum")
    );
    let pattern = error_for(&errors, Some("cam"), "params.pattern");
    assert!(
        pattern.message.contains("bars"),
        "lists the allowed values: {}",
        pattern.message
    );
}

#[test]
fn edges_to_unknown_nodes_or_ports_are_reported() {
    let yaml = "nodes:
  - {id: cam, op: source.synthetic}
  - {id: out, op: sink.null}
edges:
  - {from: cam.video, to: out}
  - {from: cam, to: outt}
";
    let errors = errors_of(yaml);
    let port = error_for(&errors, Some("cam"), "edges[0].from");
    assert!(
        port.message.contains("no output port 'video'"),
        "{}",
        port.message
    );
    assert_eq!(port.line, Some(5));
    let node = error_for(&errors, None, "edges[1].to");
    assert!(
        node.message.contains("unknown node 'outt'"),
        "{}",
        node.message
    );
    assert!(
        node.message.contains("did you mean 'out'"),
        "{}",
        node.message
    );
}

#[test]
fn duplicate_ids_point_at_the_second_definition() {
    let yaml = "nodes:
  - {id: cam, op: source.synthetic}
  - {id: cam, op: sink.null}
  - {id: out, op: sink.null}
edges:
  - {from: cam, to: out}
";
    let errors = errors_of(yaml);
    let error = error_for(&errors, Some("cam"), "id");
    assert!(
        error
            .message
            .contains("duplicate node id 'cam' (first defined at line 2)"),
        "{}",
        error.message
    );
    assert_eq!(error.line, Some(3));
}

#[test]
fn port_type_mismatch_names_both_ends() {
    // test.tensor_sink needs a tensor; a camera emits images.
    let yaml = "nodes:
  - {id: cam, op: source.synthetic}
  - {id: model, op: test.tensor_sink}
edges:
  - {from: cam, to: model}
";
    let errors = errors_of(yaml);
    let error = error_for(&errors, Some("model"), "edges[0]");
    assert!(
        error.message.contains("port type mismatch"),
        "{}",
        error.message
    );
    assert!(
        error.message.contains("'cam.out' emits image"),
        "{}",
        error.message
    );
    assert!(error.message.contains("needs tensor"), "{}", error.message);
}

#[test]
fn cycles_are_reported_for_each_node_on_them() {
    let yaml = "nodes:
  - {id: cam, op: source.synthetic}
  - {id: a, op: identity}
  - {id: b, op: identity}
  - {id: out, op: sink.null}
edges:
  - {from: cam, to: a}
  - {from: a, to: b}
  - {from: b, to: a}
  - {from: b, to: out}
";
    let errors = errors_of(yaml);
    for node in ["a", "b"] {
        let error = error_for(&errors, Some(node), "edges");
        assert!(error.message.contains("cycle"), "{}", error.message);
    }
}

#[test]
fn a_sink_with_no_input_is_reported() {
    let yaml = "nodes:
  - {id: cam, op: source.synthetic}
  - {id: out, op: sink.null}
  - {id: forgotten, op: sink.null}
edges:
  - {from: cam, to: out}
";
    let errors = errors_of(yaml);
    let error = error_for(&errors, Some("forgotten"), "inputs.in");
    assert!(
        error.message.contains("sink has no input"),
        "{}",
        error.message
    );
    assert_eq!(error.line, Some(4));
}

#[test]
fn nodes_no_source_reaches_are_reported() {
    // `orphan` has no input; `after` and `end` hang off it, so no source reaches them.
    let yaml = "nodes:
  - {id: cam, op: source.synthetic}
  - {id: out, op: sink.null}
  - {id: orphan, op: identity}
  - {id: after, op: identity}
  - {id: end, op: sink.null}
edges:
  - {from: cam, to: out}
  - {from: orphan, to: after}
  - {from: after, to: end}
";
    let errors = errors_of(yaml);
    error_for(&errors, Some("orphan"), "inputs.in");
    for node in ["after", "end"] {
        let error = errors
            .iter()
            .find(|e| e.node.as_deref() == Some(node) && e.message.contains("no source reaches"))
            .unwrap_or_else(|| panic!("no reachability error for {node}: {errors:#?}"));
        assert!(error.line.is_some());
    }
}

#[test]
fn batching_an_operator_that_does_not_batch_is_reported() {
    let yaml = "nodes:
  - {id: cam, op: source.synthetic}
  - {id: out, op: sink.null, batch: {max_size: 4}}
edges:
  - {from: cam, to: out}
";
    let errors = errors_of(yaml);
    assert!(
        error_for(&errors, Some("out"), "batch")
            .message
            .contains("does not take batches")
    );
}

#[test]
fn replicas_are_refused_where_an_operator_keeps_state_or_takes_batches() {
    let yaml = "nodes:
  - {id: cam, op: source.synthetic, replicas: 2}
  - {id: video, op: encode.h264, replicas: 2}
  - {id: both, op: identity, replicas: 2, batch: {max_size: 4}}
  - {id: many, op: identity, replicas: 65}
  - {id: out, op: sink.null, replicas: 2}
edges:
  - {from: cam, to: video}
  - {from: video, to: both}
  - {from: both, to: many}
  - {from: many, to: out}
";
    let errors = errors_of(yaml);
    for node in ["cam", "video", "out"] {
        assert!(
            error_for(&errors, Some(node), "replicas")
                .message
                .contains("runs as one instance"),
            "{node}: {errors:#?}"
        );
    }
    assert!(
        error_for(&errors, Some("both"), "replicas")
            .message
            .contains("do not go together")
    );
    error_for(&errors, Some("many"), "replicas");
}

#[test]
fn structural_mistakes_are_located() {
    let yaml = "nodes:
  - {id: cam, op: source.synthetic, restart: {policy: sometimes}}
  - {id: out, opp: sink.null}
edges:
  - {from: cam, to: out, queue: {capacity: 0, policy: drop_everything}}
";
    let errors = errors_of(yaml);
    assert!(
        error_for(&errors, Some("cam"), "restart.policy")
            .message
            .contains("on_failure")
    );
    assert!(
        error_for(&errors, Some("out"), "opp")
            .message
            .contains("unknown field")
    );
    assert!(
        error_for(&errors, Some("out"), "op")
            .message
            .contains("missing required field")
    );
    error_for(&errors, None, "edges[0].queue.capacity");
    error_for(&errors, None, "edges[0].queue.policy");
}

#[test]
fn yaml_syntax_errors_give_the_line() {
    let (registry, _) = registry_with_probe();
    let errors = graph::load_str(
        "broken.yaml",
        "nodes:\n  - {id: cam\n",
        false,
        &registry,
        &GraphLimits::DEFAULT,
    )
    .err()
    .expect("invalid")
    .0;
    assert_eq!(errors.len(), 1);
    assert!(errors[0].line.is_some());
    assert!(errors[0].to_string().starts_with("broken.yaml:"));
}

#[test]
fn json_graphs_are_validated_with_lines_too() {
    let (registry, _) = registry_with_probe();
    let json = "{\n  \"nodes\": [\n    {\"id\": \"cam\", \"op\": \"source.synthetic\", \"params\": {\"widht\": 3}},\n    {\"id\": \"out\", \"op\": \"sink.null\"}\n  ],\n  \"edges\": [{\"from\": \"cam\", \"to\": \"out\"}]\n}\n";
    let errors = graph::load_str("line.json", json, true, &registry, &GraphLimits::DEFAULT)
        .err()
        .expect("invalid")
        .0;
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].field.as_deref(), Some("params.widht"));
    assert_eq!(errors[0].node.as_deref(), Some("cam"));
    assert_eq!(errors[0].line, Some(3));
}

#[test]
fn queue_defaults_follow_the_source_kind() {
    let (registry, _) = registry_with_probe();
    let yaml = "nodes:
  - {id: live, op: source.synthetic, params: {realtime: true}}
  - {id: file, op: source.synthetic}
  - {id: a, op: sink.null}
  - {id: b, op: sink.null}
edges:
  - {from: live, to: a}
  - {from: file, to: b}
";
    let graph = common::graph_from_yaml(&registry, yaml);
    let policies: Vec<&str> = graph.edges.iter().map(|e| e.policy.name()).collect();
    assert_eq!(policies, vec!["drop_oldest", "block"]);
    assert!(graph.edges.iter().all(|e| e.capacity == 4));
}

/// Rules that need code (an operator's `validate` hook) are checked by validation, not first at
/// start: each error names the node and the field, located at the value's line.
#[test]
fn operator_rules_beyond_the_schema_are_refused_naming_node_and_field() {
    let yaml = "nodes:
  - {id: cam, op: source.synthetic, params: {width: 32, height: 32}}
  - id: overlay
    op: heatmap
    params: {alpha: 1.5}
  - id: hook
    op: sink.webhook
    params:
      url: http://127.0.0.1:9/hook
      initial_backoff_ms: 5000
      max_backoff_ms: 100
  - id: broker
    op: sink.mqtt
    params: {host: 127.0.0.1, topic: line, password: secret}
  - id: bus
    op: sink.nats
    params: {url: nats://127.0.0.1:4222, subject: line, username: u, password_env: INSPECTFLOW_API_TOKEN}
  - id: pre
    op: preprocess
    params: {width: 8, height: 8, std: [1.0, 0.0, 1.0]}
  - {id: out, op: sink.null}
edges:
  - {from: cam, to: hook}
  - {from: cam, to: broker}
  - {from: cam, to: bus}
  - {from: cam, to: pre}
  - {from: pre, to: out}
  - {from: overlay, to: out}
";
    let errors = errors_of(yaml);
    let alpha = error_for(&errors, Some("overlay"), "params.alpha");
    assert!(alpha.message.contains("1.5"), "{}", alpha.message);
    assert_eq!(alpha.line, Some(5));
    let backoff = error_for(&errors, Some("hook"), "params.max_backoff_ms");
    assert!(
        backoff
            .message
            .contains("must not be below initial_backoff_ms"),
        "{}",
        backoff.message
    );
    assert_eq!(backoff.line, Some(11), "located at the value");
    assert_eq!(
        backoff.to_string(),
        "line.yaml:11:7: node 'hook': field 'params.max_backoff_ms': must not be below \
         initial_backoff_ms (5000), got 100"
    );
    let user = error_for(&errors, Some("broker"), "params.username");
    assert!(
        user.message.contains("needs a user name"),
        "{}",
        user.message
    );
    // A graph may come over the API: it may not have the server's token sent to a broker.
    let token = error_for(&errors, Some("bus"), "params.password_env");
    assert!(
        token.message.contains("inspectflow's own settings"),
        "{}",
        token.message
    );
    let std = error_for(&errors, Some("pre"), "params.std[1]");
    assert!(std.message.contains("non-zero"), "{}", std.message);
}

/// The same rules run when a pipeline starts (building an operator), so a graph that skipped
/// validation cannot start with them broken either.
#[test]
fn building_an_operator_applies_its_rules_too() {
    use inspectflow::operators::{BuildContext, OpError, Registry};
    let descriptor = Registry::shared().get("sink.webhook").expect("registered");
    let error = descriptor
        .build(
            serde_json::json!({"url": "http://127.0.0.1:9/", "initial_backoff_ms": 50, "max_backoff_ms": 10}),
            &BuildContext::new("hook"),
        )
        .err()
        .expect("refused");
    assert!(
        matches!(&error, OpError::InvalidParam { field, .. } if field == "max_backoff_ms"),
        "{error}"
    );
}

#[cfg(feature = "gstreamer")]
#[test]
fn nested_and_video_operator_rules_name_the_dotted_field() {
    let yaml = "nodes:
  - id: cam
    op: source.usb_camera
    params:
      width: 0
  - id: ip
    op: source.ip_camera
    params:
      url: rtsp://127.0.0.1:8554/cam
      reconnect: {initial_backoff_ms: 2000, max_backoff_ms: 100}
  - id: video
    op: encode.h264
    params: {preset: fastest}
  - {id: out, op: sink.null}
edges:
  - {from: cam, to: video}
  - {from: ip, to: out}
  - {from: video, to: out}
";
    let errors = errors_of(yaml);
    error_for(&errors, Some("cam"), "params.width");
    let reconnect = error_for(&errors, Some("ip"), "params.reconnect.max_backoff_ms");
    assert_eq!(reconnect.line, Some(10));
    let preset = error_for(&errors, Some("video"), "params.preset");
    assert!(preset.message.contains("veryfast"), "{}", preset.message);
}
