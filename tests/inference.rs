//! `infer.openvino` in pipelines, on the real OpenVINO runtime with an imported backbone, and its
//! errors: a wrong device, a corrupt model, a missing runtime, a tensor of the wrong size.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{graph_from_yaml, registry_with_probe, run_to_end, seen_by};
use inspectflow::backbone::Backbone;
use inspectflow::operators::infer::shared;
use inspectflow::runtime::Pipeline;

const LIMIT: Duration = Duration::from_secs(120);

fn mobilenet(dir: &Path) -> PathBuf {
    let xml = dir.join("mobilenet_v2.xml");
    Backbone::MobilenetV2
        .import(224, &xml)
        .unwrap_or_else(|e| panic!("{e}"));
    xml
}

fn pipeline_yaml(
    model: &Path,
    frames: u64,
    tensor_size: u32,
    infer_extra: &str,
    node_extra: &str,
) -> String {
    format!(
        r#"
nodes:
  - {{id: camera, op: source.synthetic, params: {{width: 320, height: 240, frames: {frames}}}}}
  - {{id: pre, op: preprocess, params: {{width: {tensor_size}, height: {tensor_size}}}}}
  - {{id: infer, op: infer.openvino, params: {{model: "{}", requests: 3{infer_extra}}}{node_extra}}}
  - {{id: probe, op: test.probe}}
edges:
  - {{from: camera, to: pre}}
  - {{from: pre, to: infer, queue: {{capacity: 8}}}}
  - {{from: infer, to: probe}}
"#,
        model.display()
    )
}

#[test]
fn every_frame_gets_the_model_outputs_in_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = mobilenet(dir.path());
    let (registry, recordings) = registry_with_probe();
    let outcome = run_to_end(
        &graph_from_yaml(&registry, &pipeline_yaml(&model, 20, 224, "", "")),
        LIMIT,
    );
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    let seen = seen_by(&recordings, "probe");
    assert_eq!(
        seen.iter().map(|s| s.sequence).collect::<Vec<_>>(),
        (0..20).collect::<Vec<_>>()
    );
    for frame in &seen {
        assert_eq!(
            frame.inference,
            vec![
                ("features_s8".to_string(), vec![1, 32, 28, 28]),
                ("features_s16".to_string(), vec![1, 96, 14, 14]),
                ("logits".to_string(), vec![1, 1000]),
            ]
        );
    }
}

/// A tensor is 196 KB of pixels a frame at 256x256 RGB; once the model has it, it goes back to its pool
/// instead of travelling with the packet to the sinks, unless a node further down reads it (a
/// second model on the same input).
#[test]
fn inference_lets_the_tensor_go_unless_a_later_node_reads_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = mobilenet(dir.path());
    let (registry, recordings) = registry_with_probe();
    let yaml = format!(
        r#"
nodes:
  - {{id: camera, op: source.synthetic, params: {{width: 320, height: 240, frames: 6}}}}
  - {{id: pre, op: preprocess, params: {{width: 224, height: 224}}}}
  - {{id: first, op: infer.openvino, params: {{model: "{model}"}}}}
  - {{id: second, op: infer.openvino, params: {{model: "{model}"}}}}
  - {{id: after_first, op: test.probe}}
  - {{id: after_second, op: test.probe}}
edges:
  - {{from: camera, to: pre}}
  - {{from: pre, to: first}}
  - {{from: first, to: second}}
  - {{from: first, to: after_first}}
  - {{from: second, to: after_second}}
"#,
        model = model.display()
    );
    let outcome = run_to_end(&graph_from_yaml(&registry, &yaml), LIMIT);
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    let after_first = seen_by(&recordings, "after_first");
    let after_second = seen_by(&recordings, "after_second");
    assert_eq!((after_first.len(), after_second.len()), (6, 6));
    assert!(
        after_first.iter().all(|s| s.had_tensor),
        "the second model reads the tensor, so the first keeps it"
    );
    assert!(
        after_second
            .iter()
            .all(|s| !s.had_tensor && s.inference.len() == 3),
        "nothing after the second model reads it: let go, outputs attached"
    );
}

/// A watched folder never ends its stream: once its images are read it just goes quiet, like a
/// triggered camera. Every image's result must still come out while the source keeps waiting,
/// although `requests: 3` lets three frames be in flight and no later frame pushes them out.
#[test]
fn results_leave_as_soon_as_ready_when_the_source_goes_quiet() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = mobilenet(dir.path());
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).expect("mkdir");
    const IMAGES: usize = 5;
    for index in 0..IMAGES {
        image::RgbImage::from_pixel(64, 48, image::Rgb([40 * index as u8, 90, 200]))
            .save(images.join(format!("{index}.png")))
            .expect("write an image");
    }
    let yaml = format!(
        r#"
nodes:
  - {{id: folder, op: source.images_folder, params: {{path: "{}", watch: true, settle_ms: 0, poll_interval_ms: 20}}}}
  - {{id: pre, op: preprocess, params: {{width: 224, height: 224}}}}
  - {{id: infer, op: infer.openvino, params: {{model: "{}", requests: 3}}}}
  - {{id: probe, op: test.probe}}
edges:
  - {{from: folder, to: pre}}
  - {{from: pre, to: infer}}
  - {{from: infer, to: probe}}
"#,
        images.display(),
        model.display()
    );
    let (registry, recordings) = registry_with_probe();
    let pipeline = Pipeline::start(&graph_from_yaml(&registry, &yaml)).expect("starts");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen_by(&recordings, "probe").len() < IMAGES && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen = seen_by(&recordings, "probe");
    assert!(!pipeline.is_finished(), "the folder is still watched");
    assert_eq!(
        seen.len(),
        IMAGES,
        "every result left while the source was quiet"
    );
    assert!(
        seen.iter().all(|s| !s.inference.is_empty()),
        "each has the model outputs"
    );
    pipeline.stop_handle().stop();
    let outcome = pipeline.wait();
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
}

/// Four cameras, two in one pipeline and two in another, each with its own chain to
/// `infer.openvino` on the same model: one compiled model serves all four nodes while they run,
/// every camera's frames get their outputs, and the model leaves memory with its last node.
#[test]
fn nodes_naming_the_same_model_share_one_compiled_model_across_pipelines() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = mobilenet(dir.path());
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).expect("mkdir");
    const IMAGES: usize = 3;
    for index in 0..IMAGES {
        image::RgbImage::from_pixel(64, 48, image::Rgb([60 * index as u8, 90, 200]))
            .save(images.join(format!("{index}.png")))
            .expect("write an image");
    }
    let two_cameras = |names: [&str; 2]| {
        let mut nodes = String::new();
        let mut edges = String::new();
        for name in names {
            nodes += &format!(
                r#"
  - {{id: {name}, op: source.images_folder, params: {{path: "{}", watch: true, settle_ms: 0, poll_interval_ms: 20}}}}
  - {{id: {name}_pre, op: preprocess, params: {{width: 224, height: 224}}}}
  - {{id: {name}_infer, op: infer.openvino, params: {{model: "{}", hint: throughput}}}}
  - {{id: {name}_probe, op: test.probe}}"#,
                images.display(),
                model.display()
            );
            edges += &format!(
                r#"
  - {{from: {name}, to: {name}_pre}}
  - {{from: {name}_pre, to: {name}_infer}}
  - {{from: {name}_infer, to: {name}_probe}}"#
            );
        }
        format!("nodes:{nodes}\nedges:{edges}\n")
    };
    let (registry, recordings) = registry_with_probe();
    let pipelines: Vec<Pipeline> = [["a", "b"], ["c", "d"]]
        .into_iter()
        .map(|names| {
            Pipeline::start(&graph_from_yaml(&registry, &two_cameras(names))).expect("starts")
        })
        .collect();
    let probes = ["a_probe", "b_probe", "c_probe", "d_probe"];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while probes
        .iter()
        .any(|probe| seen_by(&recordings, probe).len() < IMAGES)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    for probe in probes {
        let seen = seen_by(&recordings, probe);
        assert_eq!(seen.len(), IMAGES, "{probe} got every frame");
        assert!(seen.iter().all(|s| !s.inference.is_empty()), "{probe}");
    }
    let real_path = model.canonicalize().expect("model path");
    let in_memory = shared::in_memory();
    assert_eq!(
        in_memory,
        vec![shared::InMemory {
            path: real_path,
            device: "CPU".into(),
            users: 4,
        }],
        "one compiled model for four nodes"
    );
    for pipeline in pipelines {
        pipeline.stop_handle().stop();
        let outcome = pipeline.wait();
        assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    }
    assert_eq!(shared::in_memory(), vec![], "freed with its last node");
}

#[test]
fn batched_inference_splits_outputs_per_frame_and_flushes_a_short_batch() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = mobilenet(dir.path());
    let (registry, recordings) = registry_with_probe();
    let yaml = pipeline_yaml(
        &model,
        10,
        224,
        ", batch: 4",
        ", batch: {max_size: 4, max_wait_ms: 50}",
    );
    let outcome = run_to_end(&graph_from_yaml(&registry, &yaml), LIMIT);
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    let seen = seen_by(&recordings, "probe");
    assert_eq!(
        seen.iter().map(|s| s.sequence).collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>()
    );
    assert!(
        seen.iter()
            .all(|s| s.inference.len() == 3 && s.inference[2].1 == vec![1, 1000])
    );
    assert!(outcome.report.node("infer").expect("metrics").batches >= 3);
}

#[test]
fn an_unknown_device_fails_the_start_naming_the_field_and_the_devices() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = mobilenet(dir.path());
    let (registry, _) = registry_with_probe();
    let graph = graph_from_yaml(
        &registry,
        &pipeline_yaml(&model, 1, 224, ", device: XPU", ""),
    );
    let error = Pipeline::start(&graph)
        .err()
        .expect("must not start")
        .to_string();
    assert!(error.contains("node 'infer'"), "{error}");
    assert!(error.contains("parameter 'device'"), "{error}");
    assert!(
        error.contains("'XPU' is not available here; available: CPU"),
        "{error}"
    );
}

#[test]
fn a_corrupt_or_missing_model_fails_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let corrupt = dir.path().join("broken.xml");
    std::fs::write(&corrupt, "<net><layers><layer id=").expect("write");
    std::fs::write(dir.path().join("broken.bin"), [0u8; 16]).expect("write");
    let (registry, _) = registry_with_probe();
    let error = Pipeline::start(&graph_from_yaml(
        &registry,
        &pipeline_yaml(&corrupt, 1, 224, "", ""),
    ))
    .err()
    .expect("must not start")
    .to_string();
    assert!(
        error.contains("parameter 'model'") && error.contains("cannot read model"),
        "{error}"
    );

    let missing = dir.path().join("nowhere.xml");
    let error = Pipeline::start(&graph_from_yaml(
        &registry,
        &pipeline_yaml(&missing, 1, 224, "", ""),
    ))
    .err()
    .expect("must not start")
    .to_string();
    assert!(error.contains("does not exist"), "{error}");
}

#[test]
fn a_tensor_of_the_wrong_size_stops_the_run_naming_the_node() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = mobilenet(dir.path());
    let (registry, _) = registry_with_probe();
    let outcome = run_to_end(
        &graph_from_yaml(&registry, &pipeline_yaml(&model, 5, 128, "", "")),
        LIMIT,
    );
    let failure = outcome.failure.expect("fails");
    assert_eq!(failure.node, "infer");
    assert!(
        failure
            .message
            .contains("expects input shape [1, 3, 224, 224]"),
        "{}",
        failure.message
    );
}

#[test]
fn a_missing_runtime_is_reported_with_the_command_that_installs_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let graph = dir.path().join("infer.yaml");
    std::fs::write(
        &graph,
        "nodes:\n  - {id: camera, op: source.synthetic, params: {frames: 1}}\n  - {id: pre, op: preprocess, params: {width: 224, height: 224}}\n  - {id: infer, op: infer.openvino, params: {model: model.xml}}\n  - {id: out, op: sink.null}\nedges:\n  - {from: camera, to: pre}\n  - {from: pre, to: infer}\n  - {from: infer, to: out}\n",
    )
    .expect("write");
    std::fs::write(dir.path().join("model.xml"), "<net/>").expect("write");
    for command in [
        vec!["run", graph.to_str().expect("utf-8 path")],
        vec!["devices"],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_inspectflow"))
            .args(&command)
            .current_dir(dir.path())
            .env(
                "INSPECTFLOW_OPENVINO_LIB",
                dir.path().join("no-such-library.so"),
            )
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{command:?}: a clean failure, not a crash: {stderr}"
        );
        assert!(stderr.contains("OpenVINO runtime not found"), "{stderr}");
        assert!(stderr.contains("scripts/setup.sh"), "{stderr}");
    }
}

#[test]
fn devices_lists_the_cpu() {
    let output = Command::new(env!("CARGO_BIN_EXE_inspectflow"))
        .args(["devices", "--json"])
        .output()
        .expect("runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let devices: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let names: Vec<&str> = devices
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert!(
        names.contains(&"CPU") && names.contains(&"AUTO"),
        "{names:?}"
    );
}
