//! The `inspectflow` command line, run as a user runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use inspectflow::graph::{reference, schema};
use inspectflow::operators::Registry;

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_inspectflow"))
}

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn example_graphs() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_path("graphs"))
        .expect("graphs/ exists")
        .map(|entry| entry.expect("readable entry").path())
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "yaml" || ext == "json")
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 5,
        "graphs/ holds the demo and one example per feature"
    );
    files
}

#[test]
fn every_example_graph_validates() {
    let output = binary()
        .arg("validate")
        .args(example_graphs())
        .output()
        .expect("runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Trains the demo model package that `graphs/inspection.yaml` uses, as scripts/run.sh does:
/// normal images from `graphs/normal_images.yaml`, then `inspectflow train`.
fn train_demo_model(workdir: &Path) {
    let status = binary()
        .arg("run")
        .arg(repo_path("graphs/normal_images.yaml"))
        .current_dir(workdir)
        .stdout(Stdio::null())
        .status()
        .expect("runs");
    assert!(status.success());
    let output = binary()
        .args([
            "train",
            "--model",
            "padim",
            "--normal",
            "out/normal-images",
            "--out",
            "out/models/demo",
            "--snapshots",
            "out/snapshots",
        ])
        .current_dir(workdir)
        .output()
        .expect("runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn every_example_graph_runs_to_completion() {
    let workdir = tempfile::tempdir().expect("temp dir");
    train_demo_model(workdir.path());
    for file in example_graphs() {
        let metrics = workdir.path().join("metrics.json");
        let output = binary()
            .arg("run")
            .arg(&file)
            .arg("--metrics-json")
            .arg(&metrics)
            .current_dir(workdir.path())
            .output()
            .expect("runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{}:\n{stdout}\n{}",
            file.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("completed"), "{}: {stdout}", file.display());
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&metrics).expect("metrics written"))
                .expect("JSON");
        let nodes = report["nodes"].as_array().expect("nodes");
        assert!(!nodes.is_empty());
        for node in nodes {
            if node["kind"] == "sink" {
                assert!(
                    node["packets_in"].as_u64().expect("count") > 0,
                    "{}: {node}",
                    file.display()
                );
                assert!(
                    node["end_to_end_ms"]["p99"].is_number(),
                    "{}: {node}",
                    file.display()
                );
            }
        }
    }
}

#[test]
fn validate_reports_errors_with_file_line_node_and_field_and_fails() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "nodes:\n  - id: cam\n    op: source.synthetic\n    params: {width: -5}\n  - {id: out, op: sink.null}\nedges:\n  - {from: cam, to: out}\n",
    )
    .expect("write");
    let output = binary().arg("validate").arg(&file).output().expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{}:4:", file.display())),
        "{stderr}"
    );
    assert!(
        stderr.contains("node 'cam': field 'params.width'"),
        "{stderr}"
    );
}

#[test]
fn graph_prints_dot_with_queues() {
    let output = binary()
        .arg("graph")
        .arg(repo_path("graphs/demo.yaml"))
        .output()
        .expect("runs");
    assert!(output.status.success());
    let dot = String::from_utf8_lossy(&output.stdout);
    assert!(dot.starts_with("digraph \"demo\""), "{dot}");
    assert!(dot.contains("\"camera\" -> \"preprocess\""), "{dot}");
    assert!(dot.contains("block x8"), "{dot}");
}

#[test]
fn checked_in_schemas_match_the_code() {
    let stale = schema::stale_files(&repo_path("schemas"), &Registry::builtin());
    assert!(
        stale.is_empty(),
        "schemas/ is stale ({stale:?}): run `cargo run -- schemas --out schemas` and commit"
    );
}

#[test]
fn the_readme_operator_reference_matches_the_registry() {
    let readme = repo_path("README.md");
    let current = reference::is_current(&readme, &Registry::builtin()).expect("README has markers");
    assert!(
        current,
        "README.md's operator reference is stale: run `cargo run -- operators --readme README.md` and commit"
    );
    let text = std::fs::read_to_string(&readme).expect("README");
    for descriptor in Registry::builtin().iter() {
        assert!(
            text.contains(&format!(
                "| `{}` | {} | {} | {} |",
                descriptor.name,
                descriptor.kind.name(),
                descriptor
                    .node_settings()
                    .iter()
                    .map(|setting| format!("`{setting}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                descriptor.summary
            )),
            "{} is in the table",
            descriptor.name
        );
    }
    let output = binary()
        .args(["operators", "--readme"])
        .arg(&readme)
        .arg("--check")
        .output()
        .expect("runs");
    assert!(output.status.success(), "{output:?}");
}

#[test]
fn a_stale_operator_reference_fails_the_check_and_is_rewritten() {
    let dir = tempfile::tempdir().expect("temp dir");
    let readme = dir.path().join("README.md");
    std::fs::write(
        &readme,
        format!(
            "# x\n\n{}\n| `old` | sink | gone |\n{}\n",
            reference::BEGIN,
            reference::END
        ),
    )
    .expect("write");
    let check = || {
        binary()
            .args(["operators", "--check", "--readme"])
            .arg(&readme)
            .output()
            .expect("runs")
    };
    let stale = check();
    assert!(!stale.status.success());
    assert!(
        String::from_utf8_lossy(&stale.stderr).contains("operators --readme"),
        "{stale:?}"
    );
    let written = binary()
        .args(["operators", "--readme"])
        .arg(&readme)
        .output()
        .expect("runs");
    assert!(written.status.success(), "{written:?}");
    assert!(check().status.success());
    let text = std::fs::read_to_string(&readme).expect("read");
    assert!(!text.contains("`old`") && text.contains("| `source.synthetic` | source |"));
}

#[test]
fn validate_refuses_operator_rules_that_used_to_fail_only_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("rules.yaml");
    std::fs::write(
        &file,
        "nodes:
  - {id: cam, op: source.synthetic, params: {width: 32, height: 32}}
  - {id: overlay, op: heatmap, params: {alpha: 1.5}}
  - {id: hook, op: sink.webhook, params: {url: 'http://127.0.0.1:9/', initial_backoff_ms: 5000, max_backoff_ms: 100}}
  - {id: out, op: sink.null}
edges:
  - {from: cam, to: hook}
  - {from: cam, to: out}
  - {from: overlay, to: out}
",
    )
    .expect("write");
    let output = binary().arg("validate").arg(&file).output().expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("node 'overlay': field 'params.alpha'"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "node 'hook': field 'params.max_backoff_ms': must not be below initial_backoff_ms (5000), got 100"
        ),
        "{stderr}"
    );
}

#[test]
fn the_published_graph_schema_accepts_every_example_and_checks_parameters() {
    let text = std::fs::read_to_string(repo_path("schemas/graph.schema.json")).expect("schema");
    let schema: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let validator = jsonschema::validator_for(&schema).expect("a valid JSON Schema");
    let fanout: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_path("graphs/fanout.json")).expect("example"),
    )
    .expect("JSON");
    assert!(validator.is_valid(&fanout));
    let mut broken = fanout.clone();
    broken["nodes"][0]["params"]["widht"] = 3.into();
    assert!(
        !validator.is_valid(&broken),
        "per-operator parameter schemas apply"
    );
}

#[test]
fn ctrl_c_drains_and_exits_cleanly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let graph = dir.path().join("live.yaml");
    std::fs::write(
        &graph,
        format!(
            "nodes:\n  - {{id: cam, op: source.synthetic, params: {{width: 320, height: 240, fps: 50, realtime: true}}}}\n  - {{id: out, op: sink.folder, params: {{path: \"{}\", format: jpeg}}}}\nedges:\n  - {{from: cam, to: out, queue: {{policy: block}}}}\n",
            dir.path().display()
        ),
    )
    .expect("write");
    let mut child = binary()
        .arg("run")
        .arg(&graph)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    let index = dir.path().join("results.jsonl");
    let started = Instant::now();
    while std::fs::read_to_string(&index)
        .map(|t| t.lines().count())
        .unwrap_or(0)
        < 10
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no frames written"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGINT, as Ctrl-C sends it (through the shell's built-in kill: no extra package needed).
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -INT {}", child.id()))
        .status()
        .expect("sh runs");
    assert!(status.success());
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = child.try_wait().expect("wait") {
            break exit;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "did not exit after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        exit.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("stopped"), "{stdout}");
    // Everything produced was written: the summary's count matches the index, line for line.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&index)
        .expect("index")
        .lines()
        .map(|line| serde_json::from_str(line).expect("complete JSON line"))
        .collect();
    let produced_row = stdout
        .lines()
        .find(|l| l.starts_with("cam "))
        .expect("camera row");
    let produced: usize = produced_row
        .split_whitespace()
        .nth(3)
        .expect("out column")
        .parse()
        .expect("number");
    assert_eq!(lines.len(), produced);
    for line in &lines {
        assert!(
            dir.path()
                .join(
                    line["images"]["with_predictions"]["file"]
                        .as_str()
                        .expect("file"),
                )
                .is_file()
        );
    }
}

/// The server's layering (issue 16): no module under `src/server` but its entry point (`mod.rs`,
/// which serves the router) imports from the router, and none grows past 600 lines.
#[test]
fn server_modules_stay_layered_and_small() {
    let dir = repo_path("src/server");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("src/server") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("source");
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let lines = text.lines().count();
        assert!(lines <= 600, "{name} has {lines} lines; split it");
        if name != "mod.rs" && name != "router.rs" {
            assert!(
                !text.contains("router::"),
                "{name} imports from the router; move what it needs to a lower layer"
            );
        }
        checked += 1;
    }
    assert!(checked >= 10, "{checked} modules");
}

/// An export shaped like anomalib's (an IR with `anomaly_map` and `pred_score` outputs that
/// expects ImageNet-style normalised input, and a metadata.json with thresholds, min-max
/// statistics and an albumentations transform), made here: `import-anomalib` turns it into a
/// package and `predict` gives exactly the scores and labels the metadata implies.
#[test]
fn an_anomalib_export_is_imported_and_scores_as_its_metadata_implies() {
    use inspectflow::backbone::ir::{IrGraph, Reduction};
    let dir = tempfile::tempdir().expect("temp dir");
    let export = dir.path().join("export");
    std::fs::create_dir_all(&export).expect("export folder");
    // The "model": the anomaly map is the sum of the normalised channels, the score its maximum.
    let mut graph = IrGraph::new("anomalib-like");
    let input = graph.parameter("input", &[1, 3, 32, 32]);
    let summed = graph.reduce("channel_sum", input, &[1], Reduction::Sum);
    let map = graph.reshape("map", summed, &[1, 1, 32, 32]);
    let score = graph.reduce("score", map, &[1, 2, 3], Reduction::Max);
    graph.result("anomaly_map", map);
    graph.result("pred_score", score);
    let xml = export.join("model.xml");
    graph.write(&xml).expect("IR written");
    let metadata = export.join("metadata.json");
    std::fs::write(
        &metadata,
        serde_json::json!({
            "task": "segmentation",
            "image_threshold": 1.0, "pixel_threshold": 1.0, "min": -6.0, "max": 6.0,
            "transform": {"__version__": "1.3.1", "transform": {
                "__class_fullname__": "Compose", "transforms": [
                    {"__class_fullname__": "Resize", "height": 32, "width": 32},
                    {"__class_fullname__": "Normalize", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "max_pixel_value": 255.0},
                    {"__class_fullname__": "ToTensorV2"}
                ]}}
        })
        .to_string(),
    )
    .expect("metadata written");
    let package = dir.path().join("imported");
    let output = binary()
        .args(["import-anomalib", "--model"])
        .arg(&xml)
        .arg("--metadata")
        .arg(&metadata)
        .arg("--out")
        .arg(&package)
        .output()
        .expect("import runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Two flat images: (200, 100, 50) normalises to (1.137, -0.431, -1.216), summed -0.510;
    // white to (2, 2, 2), summed 6. Normalised: (raw - 1) / 12 + 0.5.
    let images = [
        ("dim.png", [200u8, 100, 50], -0.5098_f64),
        ("white.png", [255, 255, 255], 6.0),
    ];
    for (name, colour, _) in &images {
        image::RgbImage::from_pixel(48, 48, image::Rgb(*colour))
            .save(dir.path().join(name))
            .expect("image written");
    }
    let output = binary()
        .args(["predict", "--json", "--model"])
        .arg(&package)
        .args(images.iter().map(|(name, _, _)| dir.path().join(name)))
        .output()
        .expect("predict runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let document: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("predict's JSON");
    let predictions = document["predictions"].as_array().expect("predictions");
    for ((name, _, raw), prediction) in images.iter().zip(predictions) {
        let expected = ((raw - 1.0) / 12.0 + 0.5).clamp(0.0, 1.0);
        let got_raw = prediction["raw_score"].as_f64().expect("raw score");
        let got = prediction["score"].as_f64().expect("score");
        assert!(
            (got_raw - raw).abs() < 1e-3,
            "{name}: raw {got_raw} vs {raw}"
        );
        assert!((got - expected).abs() < 1e-3, "{name}: {got} vs {expected}");
        let label = if expected >= 0.5 {
            "Anomalous"
        } else {
            "Normal"
        };
        assert_eq!(prediction["label"], label, "{name}");
    }

    // Bad exports are refused naming what is wrong.
    std::fs::write(&metadata, r#"{"min": 0, "max": 1}"#).expect("metadata rewritten");
    let output = binary()
        .args(["import-anomalib", "--model"])
        .arg(&xml)
        .arg("--metadata")
        .arg(&metadata)
        .arg("--out")
        .arg(dir.path().join("refused"))
        .output()
        .expect("import runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("image_threshold"), "{stderr}");
    assert!(!dir.path().join("refused").exists(), "nothing half-written");
}
