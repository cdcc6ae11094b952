//! Hostile and careless input, as an attacker or a hurried user would send it: graph documents
//! that nest without end, alias bombs, huge, binary and mutated files (`inspectflow validate`,
//! and the same documents posted to a real server), paths that leave the roots through links,
//! concurrent starts of one pipeline, deletes racing reads and uploads, and malformed requests
//! to every documented route. Every loop is bounded; the server runs on 127.0.0.1.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::server::{Server, call, client, inspectflow, png, png_claiming, upload_form};
use inspectflow::operators::Registry;
use inspectflow::operators::params::ParamStep;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A small deterministic generator (xorshift64*), so that every run tries the same documents
/// and a failure can be reproduced from its index.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// What one `inspectflow validate` run did.
struct Validated {
    code: Option<i32>,
    stderr: String,
    took: Duration,
}

fn validate(args: &[&str], file: &Path) -> Validated {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_inspectflow"))
        .arg("validate")
        .args(args)
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("inspectflow validate starts");
    // Bounded: a run still going after 20 s is killed (and fails the test below).
    let deadline = started + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let output = child.wait_with_output().expect("output");
    Validated {
        code: output.status.code(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        took: started.elapsed(),
    }
}

/// Asserts a clean refusal: exit status 1 (never a signal, an abort or a panic's 101), within
/// 5 s, with the file named first.
fn assert_refused(result: &Validated, file: &Path, what: &str) {
    assert_eq!(
        result.code,
        Some(1),
        "{what}: exit {:?}, stderr {}",
        result.code,
        result.stderr.chars().take(2000).collect::<String>()
    );
    assert!(
        result.took < Duration::from_secs(5),
        "{what}: took {:?}",
        result.took
    );
    assert!(
        result.stderr.starts_with(&file.display().to_string()),
        "{what}: the error names the file: {}",
        result.stderr.chars().take(500).collect::<String>()
    );
    assert!(
        !result.stderr.contains("panicked"),
        "{what}: {}",
        result.stderr
    );
}

fn nested_sequences(levels: usize) -> String {
    format!("name: deep\nnodes:\n  - {}x\n", "- ".repeat(levels))
}

fn nested_maps(levels: usize) -> String {
    let mut text = String::from("name: deep\nnodes:\n  - id: a\n    op: identity\n    params:\n");
    for level in 0..levels {
        text.push_str(&" ".repeat(6 + level));
        text.push_str("k:\n");
    }
    text
}

fn nested_flow(levels: usize) -> String {
    format!(
        "nodes: [{}1{}]\n",
        "{a: ".repeat(levels),
        "}".repeat(levels)
    )
}

/// The "billion laughs": nine levels of nine aliases each (9^9 values once expanded), in about
/// 300 bytes.
fn alias_bomb() -> String {
    let names: Vec<char> = ('a'..='j').collect();
    let mut text = String::from("a: &a [x,x,x,x,x,x,x,x,x]\n");
    for pair in names.windows(2) {
        let (previous, name) = (pair[0], pair[1]);
        text.push_str(&format!(
            "{name}: &{name} [{}]\n",
            vec![format!("*{previous}"); 9].join(",")
        ));
    }
    text.push_str("nodes: *j\n");
    text
}

#[test]
fn deep_nesting_alias_bombs_and_huge_or_binary_files_are_refused_by_validate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "seq5000.yaml",
            nested_sequences(5_000).into_bytes(),
            "--graph-max-depth",
        ),
        (
            "seq50000.yaml",
            nested_sequences(50_000).into_bytes(),
            "--graph-max-depth",
        ),
        (
            "maps5000.yaml",
            nested_maps(5_000).into_bytes(),
            "--graph-max-depth",
        ),
        ("flow300.yaml", nested_flow(300).into_bytes(), ""),
        (
            "bomb.yaml",
            alias_bomb().into_bytes(),
            "--graph-max-alias-values",
        ),
        (
            "deep.json",
            format!("{{\"nodes\": {}1{}}}", "[".repeat(5000), "]".repeat(5000)).into_bytes(),
            "",
        ),
        (
            "binary.yaml",
            (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect(),
            "",
        ),
        (
            "latin1.yaml",
            b"name: caf\xe9\nnodes: []\n".to_vec(),
            "UTF-8",
        ),
        ("empty.yaml", Vec::new(), ""),
    ];
    for (name, bytes, expected) in &cases {
        let file = dir.path().join(name);
        std::fs::write(&file, bytes).expect("write");
        let result = validate(&[], &file);
        assert_refused(&result, &file, name);
        assert!(
            result.stderr.contains(expected),
            "{name}: {}",
            result.stderr
        );
    }
    let bomb = alias_bomb();
    assert!(bomb.len() < 352, "the bomb is small: {} bytes", bomb.len());

    // A document over the size limit is not read past the limit.
    let big = dir.path().join("big.yaml");
    std::fs::write(
        &big,
        format!("name: big\n# {}\nnodes: []\n", "x".repeat(3 << 20)),
    )
    .expect("write");
    let result = validate(&["--graph-max-bytes", "1048576"], &big);
    assert_refused(&result, &big, "big");
    assert!(
        result.stderr.contains("--graph-max-bytes"),
        "{}",
        result.stderr
    );

    // Node and edge counts, from the environment as well as flags.
    let many = dir.path().join("many.yaml");
    let nodes: String = (0..50)
        .map(|i| format!("  - {{id: n{i}, op: identity}}\n"))
        .collect();
    std::fs::write(&many, format!("nodes:\n{nodes}")).expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_inspectflow"))
        .arg("validate")
        .arg(&many)
        .env("INSPECTFLOW_GRAPH_MAX_NODES", "10")
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("more than 10 nodes"), "{stderr}");
}

/// An identity chain of `count` nodes from a synthetic source into a null sink.
fn identity_chain(count: usize) -> String {
    let mut text = String::from(
        "nodes:\n  - {id: src, op: source.synthetic, params: {width: 16, height: 16, frames: 1}}\n",
    );
    for i in 0..count {
        text.push_str(&format!("  - {{id: n{i}, op: identity}}\n"));
    }
    text.push_str("  - {id: out, op: sink.null}\nedges:\n  - {from: src, to: n0}\n");
    for i in 1..count {
        text.push_str(&format!("  - {{from: n{}, to: n{i}}}\n", i - 1));
    }
    text.push_str(&format!("  - {{from: n{}, to: out}}\n", count - 1));
    text
}

#[test]
fn validation_grows_linearly_with_the_graph() {
    let registry = Registry::builtin();
    let limits = inspectflow::graph::GraphLimits::DEFAULT;
    let time = |count: usize| {
        let text = identity_chain(count);
        // The quicker of three tries, against noise from the other tests on the machine.
        (0..3)
            .map(|_| {
                let started = Instant::now();
                let graph =
                    inspectflow::graph::load_str("chain.yaml", &text, false, &registry, &limits)
                        .expect("the chain is valid");
                assert_eq!(graph.nodes.len(), count + 2);
                started.elapsed()
            })
            .min()
            .expect("two tries")
    };
    let small = time(5_000);
    let large = time(40_000);
    // Linear work is 8x (about 10x measured, allocation included); quadratic work is 64x over
    // this range (the validator this replaces took 14x from 10k to 40k nodes). The ratio is taken within one run, so a busy machine
    // slows both sides.
    let ratio = large.as_secs_f64() / small.as_secs_f64();
    assert!(
        ratio < 32.0,
        "5k nodes {small:?}, 40k nodes {large:?}: {ratio:.1}x for 8x the nodes"
    );
}

/// Documents that must all be refused: mutations of the shipped graphs and of generated ones.
fn malformed_documents(count: usize) -> Vec<(String, Vec<u8>)> {
    let shipped: Vec<(String, String)> = std::fs::read_dir("graphs")
        .expect("graphs/")
        .flatten()
        .map(|entry| {
            let path = entry.path();
            (
                path.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                std::fs::read_to_string(&path).expect("a shipped graph"),
            )
        })
        .collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut documents = Vec::new();
    let specials: [&[u8]; 14] = [
        b"&a ",
        b"*a",
        b"[",
        b"]",
        b"{",
        b"}",
        b": ",
        b"- ",
        b"\t",
        b"\"",
        b"'",
        b"\x00",
        b"\xff\xfe",
        b"!!binary ",
    ];
    for index in 0..count {
        let (name, text) = &shipped[index % shipped.len()];
        let kind = index % 12;
        // Mutations keep the syntax of the file they mutate; generated documents are YAML.
        let extension = if name.ends_with(".json") && kind <= 5 {
            "json"
        } else {
            "yaml"
        };
        let mut bytes = text.clone().into_bytes();
        match kind {
            // Insert special characters at random places.
            0..=2 => {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(bytes.len());
                    let special = specials[rng.below(specials.len())];
                    bytes.splice(at..at, special.iter().copied());
                }
            }
            // Cut the document short.
            3 => bytes.truncate(rng.below(bytes.len().saturating_sub(1)).max(1)),
            // Delete a random slice.
            4 => {
                let at = rng.below(bytes.len());
                let end = (at + 1 + rng.below(40)).min(bytes.len());
                bytes.drain(at..end);
            }
            // Flip bytes.
            5 => {
                for _ in 0..1 + rng.below(8) {
                    let at = rng.below(bytes.len());
                    bytes[at] ^= 1 << rng.below(8);
                }
            }
            // An unknown operator.
            6 => {
                let text = String::from_utf8_lossy(&bytes).replacen("op: ", "op: no.such.", 1);
                bytes = text.into_bytes();
            }
            // A parameter of the wrong type or range.
            7 => {
                bytes = format!(
                    "nodes:\n  - {{id: cam, op: source.synthetic, params: {{width: {}, height: 8}}}}\n  - {{id: out, op: sink.null}}\nedges:\n  - {{from: cam, to: out}}\n",
                    ["-1", "'wide'", "[1]", "{a: 1}", "1e400", "0"][rng.below(6)]
                )
                .into_bytes();
            }
            // Deep nesting in random places.
            8 => {
                let levels = 65 + rng.below(20_000);
                bytes = if rng.below(2) == 0 {
                    nested_sequences(levels).into_bytes()
                } else {
                    format!(
                        "nodes:\n  - {{id: a, op: identity, params: {}1{}}}\n",
                        "[".repeat(levels.min(250)),
                        "]".repeat(levels.min(250))
                    )
                    .into_bytes()
                };
            }
            // Aliases that expand past the bound.
            9 => {
                let width = 4 + rng.below(12);
                let mut text = format!("a0: &a0 [{}]\n", vec!["x"; width].join(", "));
                for level in 1..8 {
                    text.push_str(&format!(
                        "a{level}: &a{level} [{}]\n",
                        vec![format!("*a{}", level - 1); width].join(", ")
                    ));
                }
                text.push_str("nodes: [*a7]\n");
                bytes = text.into_bytes();
            }
            // Binary garbage, invalid UTF-8.
            10 => {
                bytes = (0..1 + rng.below(2048)).map(|_| rng.next() as u8).collect();
                bytes.insert(0, 0xc3);
                bytes.insert(1, 0x28);
            }
            // A document that is not a graph at all.
            _ => {
                bytes = [
                    "[]",
                    "42",
                    "null",
                    "'text'",
                    "nodes: 7",
                    "nodes: [1, 2]",
                    "edges: {}",
                    "--- a\n--- b\n",
                ][rng.below(8)]
                .as_bytes()
                .to_vec();
            }
        }
        documents.push((format!("{index:04}-{kind}.{extension}"), bytes));
    }
    documents
}

#[test]
fn a_thousand_malformed_documents_are_each_refused_cleanly_with_file_node_and_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    let documents = malformed_documents(1_200);
    let files: Vec<PathBuf> = documents
        .iter()
        .map(|(name, bytes)| {
            let file = dir.path().join(name);
            std::fs::write(&file, bytes).expect("write");
            file
        })
        .collect();
    // Two workers, as many as this machine has cores.
    let results: Vec<(PathBuf, Validated)> = std::thread::scope(|scope| {
        let halves: Vec<_> = files
            .chunks(files.len().div_ceil(2))
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|file| (file.clone(), validate(&[], file)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        halves
            .into_iter()
            .flat_map(|half| half.join().expect("worker"))
            .collect()
    });
    let mut refused = 0;
    for (file, result) in &results {
        // A mutation can leave a document valid (a flipped bit in a comment): that passes with
        // 0, and only refusals are counted below. Nothing else than 0 or 1 is acceptable.
        if result.code == Some(0) {
            continue;
        }
        assert_refused(result, file, &file.display().to_string());
        refused += 1;
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        if name.ends_with("-7.yaml") {
            assert!(
                result.stderr.contains("node 'cam'") && result.stderr.contains("field 'params"),
                "{name}: {}",
                result.stderr
            );
        }
        if name.ends_with("-6.yaml") {
            assert!(
                result.stderr.contains("node '"),
                "{name}: {}",
                result.stderr
            );
            assert!(
                result.stderr.contains("field 'op'"),
                "{name}: {}",
                result.stderr
            );
        }
    }
    assert!(
        refused >= 1_000,
        "only {refused} of 1200 documents were refused"
    );
}

/// Starts a server with `--path-root` set to `root`, and a project.
fn server_with_root(data: &Path, root: &Path) -> (Server, String) {
    let server = Server::start_with(data, &["--path-root", &root.display().to_string()]);
    let (status, project) = call(
        client()
            .post(server.url("/api/projects"))
            .json(&json!({"name": "hostile"})),
    );
    assert_eq!(status, StatusCode::CREATED, "{project}");
    let id = project["id"].as_str().expect("id").to_string();
    (server, id)
}

#[test]
fn hostile_graphs_posted_to_the_server_get_422_and_the_server_keeps_answering() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (server, project) = server_with_root(&dir.path().join("data"), dir.path());
    let http = client();
    let pipelines = server.url(&format!("/api/projects/{project}/pipelines"));
    let documents = [
        ("sequences", nested_sequences(5_000)),
        ("maps", nested_maps(1_000)),
        ("bomb", alias_bomb()),
        ("flow", nested_flow(300)),
    ];
    for (what, graph) in documents {
        assert!(graph.len() < 1 << 20);
        let (status, body) = call(
            http.post(&pipelines)
                .json(&json!({"name": what, "graph": graph})),
        );
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{what}: {body}");
        assert!(
            body["detail"]
                .as_str()
                .is_some_and(|d| d.contains("pipeline '")),
            "{body}"
        );
        let (status, _) = call(http.get(server.url("/health")));
        assert_eq!(status, StatusCode::OK, "the server answers after {what}");
    }
    // JSON nested deeper than the body parser allows.
    let deep = format!(
        "{{\"name\": \"x\", \"graph\": {}1{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let (status, body) = call(
        http.post(&pipelines)
            .header("content-type", "application/json")
            .body(deep),
    );
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, _) = call(http.get(server.url("/health")));
    assert_eq!(status, StatusCode::OK);
}

/// A root with `a/b/lnk -> <elsewhere>/x/y`, and files outside it: the escaping path through the
/// link, and a plain outside path.
struct Escape {
    root: PathBuf,
    through_link: PathBuf,
    outside: PathBuf,
}

fn escape_routes(dir: &Path) -> Escape {
    let root = dir.join("root");
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir_all(root.join("a/b")).expect("mkdir");
    std::fs::create_dir_all(elsewhere.join("x/y")).expect("mkdir");
    std::fs::write(elsewhere.join("secret.png"), png(8, 8, 10)).expect("write");
    std::os::unix::fs::symlink(elsewhere.join("x/y"), root.join("a/b/lnk")).expect("link");
    let through_link = root.join("a/b/lnk/../../secret.png");
    assert!(through_link.exists(), "the path opens the outside file");
    Escape {
        root,
        through_link,
        outside: elsewhere.join("secret.png"),
    }
}

/// Parameters that put `value` at `path` (e.g. `tls.ca_file`, `paths[]`).
fn params_with(path: &[ParamStep], value: &str) -> Value {
    match path.split_first() {
        None => json!(value),
        Some((ParamStep::Field(name), rest)) => json!({ name: params_with(rest, value) }),
        Some((ParamStep::EachItem, rest)) => json!([params_with(rest, value)]),
    }
}

/// Other parameters an operator needs besides its files.
fn required_params(op: &str) -> Value {
    match op {
        "sink.mqtt" => json!({"host": "127.0.0.1", "topic": "t"}),
        "sink.nats" => json!({"url": "nats://127.0.0.1:4222", "subject": "t"}),
        _ => json!({}),
    }
}

/// A valid graph in which node `target` (operator `op`) has `params`: sources feed a null sink,
/// other operators get a chain that produces what their input needs.
fn graph_around(op: &str, params: Value, inside_model: &Path) -> Value {
    let registry = Registry::builtin();
    let descriptor = registry.get(op).expect("registered");
    let mut nodes = Vec::new();
    if descriptor.kind != inspectflow::operators::OperatorKind::Source {
        nodes.push(json!({"id": "src", "op": "source.synthetic", "params": {"width": 16, "height": 16, "frames": 1}}));
        let level = descriptor.inputs[0].accepts.level();
        if level >= 2 {
            nodes.push(
                json!({"id": "pre", "op": "preprocess", "params": {"width": 32, "height": 32}}),
            );
        }
        if level >= 3 {
            nodes.push(
                json!({"id": "infer", "op": "infer.openvino", "params": {"model": inside_model}}),
            );
        }
    }
    nodes.push(json!({"id": "target", "op": op, "params": params}));
    let mut edges: Vec<Value> = nodes
        .windows(2)
        .map(|pair| json!({"from": pair[0]["id"], "to": pair[1]["id"]}))
        .collect();
    if descriptor.kind != inspectflow::operators::OperatorKind::Sink {
        nodes.push(json!({"id": "out", "op": "sink.null"}));
        edges.push(json!({"from": "target", "to": "out"}));
    }
    json!({"name": "escape", "nodes": nodes, "edges": edges})
}

#[test]
fn no_file_parameter_of_any_operator_reaches_outside_the_roots_with_or_without_links() {
    let dir = tempfile::tempdir().expect("temp dir");
    let escape = escape_routes(dir.path());
    let inside_model = escape.root.join("model.xml");
    let (server, project) = server_with_root(&dir.path().join("data"), &escape.root);
    let http = client();
    let registry = Registry::builtin();
    let mut checked = 0;
    for descriptor in registry.iter() {
        for path in descriptor.file_parameter_paths() {
            for bad in [&escape.through_link, &escape.outside] {
                let mut params = required_params(descriptor.name);
                let file_params = params_with(path, &bad.display().to_string());
                if let (Some(all), Some(more)) = (params.as_object_mut(), file_params.as_object()) {
                    all.extend(more.clone());
                }
                let graph = graph_around(descriptor.name, params, &inside_model);
                // Through the API.
                let (status, body) = call(
                    http.post(server.url(&format!("/api/projects/{project}/pipelines")))
                        .json(&json!({"name": "escape", "graph": graph})),
                );
                assert_eq!(
                    status,
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "{} {path:?}: {body}",
                    descriptor.name
                );
                let errors = body["errors"].as_array().expect("errors");
                assert!(
                    errors.iter().any(|e| e["node"] == "target"
                        && e["field"]
                            .as_str()
                            .is_some_and(|f| f.starts_with("params."))
                        && e["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("outside the path roots"))),
                    "{} {path:?}: {body}",
                    descriptor.name
                );
                // Through the CLI, with the same root.
                let file = dir.path().join(format!("{}.json", descriptor.name));
                std::fs::write(&file, graph.to_string()).expect("write");
                let result = validate(&["--path-root", &escape.root.display().to_string()], &file);
                assert_refused(&result, &file, descriptor.name);
                assert!(
                    result.stderr.contains("outside the path roots"),
                    "{}",
                    result.stderr
                );
                assert!(result.stderr.contains("node 'target'"), "{}", result.stderr);
                checked += 1;
            }
        }
    }
    // source.files, images_folder, video_file, infer.openvino, anomaly, sink.folder, sink.mqtt
    // (tls.ca_file) and sink.video_file.
    assert!(checked >= 16, "{checked} file parameters tried");

    // Sources and sinks stored through their own routes.
    let link = escape.through_link.display().to_string();
    for (route, body) in [
        (
            "/api/sources",
            json!({"name": "s", "type": "video_file", "config": {"path": link}}),
        ),
        (
            "/api/sources",
            json!({"name": "s", "type": "images_folder", "config": {"path": escape.root.join("a/b/lnk/..")}}),
        ),
        (
            "/api/sinks",
            json!({"name": "s", "type": "folder", "config": {"path": escape.root.join("a/b/lnk/../../out")}}),
        ),
        (
            "/api/sinks",
            json!({"name": "s", "type": "mqtt", "config": {"host": "127.0.0.1", "topic": "t", "tls": {"ca_file": link}}}),
        ),
    ] {
        let (status, answer) = call(http.post(server.url(route)).json(&body));
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{route} {body}: {answer}"
        );
        assert!(
            answer["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("config.")),
            "{answer}"
        );
    }
    // A USB camera is a device under /dev, not any path.
    let (status, answer) = call(http.post(server.url("/api/sources")).json(
        &json!({"name": "s", "type": "usb_camera", "config": {"device": "/dev/../etc/passwd"}}),
    ));
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
}

/// A graph that runs until stopped: a paced synthetic camera into a null sink.
fn endless_graph() -> Value {
    json!({"name": "endless", "nodes": [
        {"id": "cam", "op": "source.synthetic", "params": {"width": 64, "height": 48, "fps": 30, "realtime": true}},
        {"id": "out", "op": "sink.null"}
    ], "edges": [{"from": "cam", "to": "out"}]})
}

#[test]
fn parallel_starts_of_one_pipeline_give_one_run_and_shutdown_is_prompt() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut server = Server::start(dir.path(), None);
    let http = client();
    let (_, project) = call(
        http.post(server.url("/api/projects"))
            .json(&json!({"name": "p"})),
    );
    let project = project["id"].as_str().expect("id").to_string();
    let (status, pipeline) = call(
        http.post(server.url(&format!("/api/projects/{project}/pipelines")))
            .json(&json!({"name": "endless", "graph": endless_graph()})),
    );
    assert_eq!(status, StatusCode::CREATED, "{pipeline}");
    let pipeline_id = pipeline["id"].as_str().expect("id").to_string();
    for round in 0..3 {
        let statuses: Vec<(StatusCode, Value)> = std::thread::scope(|scope| {
            let starts: Vec<_> = (0..8)
                .map(|_| {
                    scope.spawn(|| {
                        call(
                            client()
                                .post(server.url("/api/active-pipelines"))
                                .json(&json!({"pipeline_id": pipeline_id})),
                        )
                    })
                })
                .collect();
            starts
                .into_iter()
                .map(|s| s.join().expect("start"))
                .collect()
        });
        let created = statuses
            .iter()
            .filter(|(s, _)| *s == StatusCode::CREATED)
            .count();
        assert_eq!(created, 1, "round {round}: {statuses:?}");
        for (status, body) in &statuses {
            if *status != StatusCode::CREATED {
                assert_eq!(*status, StatusCode::CONFLICT, "{body}");
                assert!(
                    body["detail"]
                        .as_str()
                        .is_some_and(|d| d.contains(&pipeline_id)),
                    "{body}"
                );
            }
        }
        let (_, active) = call(http.get(server.url("/api/active-pipelines")));
        let runs = active["active_pipelines"].as_array().expect("list");
        assert_eq!(runs.len(), 1, "{active}");
        assert_eq!(runs[0]["status"], "running");
        // One stop stops the one run.
        let (status, stopped) =
            call(http.delete(server.url(&format!("/api/active-pipelines/{pipeline_id}"))));
        assert_eq!(status, StatusCode::OK, "{stopped}");
        let (_, active) = call(http.get(server.url("/api/active-pipelines")));
        assert_eq!(
            active["active_pipelines"].as_array().map(Vec::len),
            Some(0),
            "{active}"
        );
    }
    // Shutdown with a pipeline running ends the server promptly (SIGINT and SIGTERM share a handler).
    let (status, _) = call(
        http.post(server.url("/api/active-pipelines"))
            .json(&json!({"pipeline_id": pipeline_id})),
    );
    assert_eq!(status, StatusCode::CREATED);
    // SIGTERM, as systemd and Kubernetes send it, stops the server as gracefully as Ctrl-C.
    // SAFETY: a plain signal to our own child process.
    unsafe { libc::kill(server.child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut exited = None;
    while Instant::now() < deadline {
        if let Some(status) = server.child.try_wait().expect("wait") {
            exited = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = exited.expect("the server exits within 15 s of SIGTERM");
    assert!(status.success(), "{status:?}");
}

#[test]
fn deletes_racing_reads_and_uploads_answer_404_or_409_and_leave_the_store_clean() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let server = Server::start(&data, None);
    let http = client();
    let image = png(64, 48, 90);
    for round in 0..4 {
        let (_, project) = call(
            http.post(server.url("/api/projects"))
                .json(&json!({"name": format!("race {round}")})),
        );
        let project = project["id"].as_str().expect("id").to_string();
        let media_url = server.url(&format!("/api/projects/{project}/media"));
        let mut items = Vec::new();
        for _ in 0..6 {
            let (status, media) = call(http.post(&media_url).multipart(upload_form(
                image.clone(),
                Some("normal"),
                None,
            )));
            assert_eq!(status, StatusCode::CREATED, "{media}");
            items.push(media["id"].as_str().expect("id").to_string());
        }
        let unexpected: Vec<String> = std::thread::scope(|scope| {
            let mut workers = Vec::new();
            // Readers of files and thumbnails while their media are deleted.
            for reader in 0..2 {
                let (items, server) = (&items, &server);
                let media_url = media_url.clone();
                workers.push(scope.spawn(move || {
                    let http = client();
                    let mut odd = Vec::new();
                    for pass in 0..15 {
                        let id = &items[(pass + reader) % items.len()];
                        for which in ["full", "thumbnail"] {
                            let response = http
                                .get(format!("{media_url}/{id}/{which}"))
                                .send()
                                .expect("answer");
                            let status = response.status();
                            if status != StatusCode::OK && status != StatusCode::NOT_FOUND {
                                odd.push(format!("read {which}: {status}"));
                            }
                        }
                    }
                    let _ = server;
                    odd
                }));
            }
            // Deleting media one by one, then the project.
            {
                let (items, media_url, project) = (&items, media_url.clone(), project.clone());
                let base = server.url("");
                workers.push(scope.spawn(move || {
                    let http = client();
                    let mut odd = Vec::new();
                    for id in items.iter().take(3) {
                        let status = http
                            .delete(format!("{media_url}/{id}"))
                            .send()
                            .expect("answer")
                            .status();
                        if status != StatusCode::NO_CONTENT && status != StatusCode::NOT_FOUND {
                            odd.push(format!("delete media: {status}"));
                        }
                    }
                    let status = http
                        .delete(format!("{base}/api/projects/{project}"))
                        .send()
                        .expect("answer")
                        .status();
                    if status != StatusCode::NO_CONTENT {
                        odd.push(format!("delete project: {status}"));
                    }
                    odd
                }));
            }
            // Uploaders into the project being deleted.
            for _ in 0..2 {
                let (media_url, image) = (media_url.clone(), image.clone());
                workers.push(scope.spawn(move || {
                    let http = client();
                    let mut odd = Vec::new();
                    for _ in 0..10 {
                        let status = http
                            .post(&media_url)
                            .multipart(upload_form(image.clone(), Some("anomalous"), None))
                            .send()
                            .expect("answer")
                            .status();
                        if ![
                            StatusCode::CREATED,
                            StatusCode::NOT_FOUND,
                            StatusCode::CONFLICT,
                        ]
                        .contains(&status)
                        {
                            odd.push(format!("upload: {status}"));
                        }
                    }
                    odd
                }));
            }
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("worker"))
                .collect()
        });
        assert!(unexpected.is_empty(), "round {round}: {unexpected:?}");
        let (status, _) = call(http.get(server.url(&format!("/api/projects/{project}"))));
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    drop(server);
    let (clean, report) = inspectflow(&["check-db"], &data);
    assert!(clean, "{report}");
    assert!(
        !data.join("projects").exists()
            || std::fs::read_dir(data.join("projects"))
                .expect("list")
                .next()
                .is_none(),
        "no project folder is left behind"
    );
}

/// Bodies a careless or hostile client sends.
fn malformed_bodies(rng: &mut Rng) -> Vec<(&'static str, Vec<u8>)> {
    let deep = format!(
        "{}1{}",
        "[".repeat(200 + rng.below(5000)),
        "]".repeat(200 + rng.below(5000))
    );
    let long = "x".repeat(1 + rng.below(100_000));
    vec![
        ("application/json", b"".to_vec()),
        ("application/json", b"{".to_vec()),
        ("application/json", b"null".to_vec()),
        ("application/json", b"[]".to_vec()),
        ("application/json", b"{\"name\": 7}".to_vec()),
        ("application/json", format!("{{\"name\": \"{long}\"}}").into_bytes()),
        ("application/json", deep.into_bytes()),
        ("application/json", b"{\"name\": \"x\", \"graph\": 12, \"threshold\": \"high\", \"pipeline_id\": [1]}".to_vec()),
        ("application/json", b"{\"name\": \"\\ud800\", \"config\": {\"path\": \"/etc/passwd\"}, \"type\": \"video_file\"}".to_vec()),
        ("application/json", (0..1 + rng.below(512)).map(|_| rng.next() as u8).collect()),
        ("text/plain", b"name=x".to_vec()),
        ("multipart/form-data; boundary=zz", b"--zz\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nnot an image\r\n--zz--\r\n".to_vec()),
        ("multipart/form-data; boundary=zz", b"--zz\r\nbroken".to_vec()),
        ("application/json", b"{\"name\": \"x\", \"graph\": \"nodes: [*a]\"}".to_vec()),
    ]
}

/// Bodies that break `schema` (an object schema) one way each.
fn schema_mutations(schema: &Value) -> Vec<Value> {
    let properties = schema["properties"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|names| names.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    // A body with every property set to something plausible.
    let plausible: serde_json::Map<String, Value> = properties
        .iter()
        .map(|(name, property)| {
            let value = match property["type"].as_str() {
                Some("integer") | Some("number") => json!(1),
                Some("boolean") => json!(true),
                Some("array") => json!([]),
                Some("object") => json!({}),
                _ => json!("x"),
            };
            (name.clone(), value)
        })
        .collect();
    let wrong_values = [
        json!(null),
        json!(-1),
        json!(1e308),
        json!(18446744073709551615u64),
        json!("x".repeat(10_000)),
        json!([1, [2, [3]]]),
        json!({"nested": {"deeper": true}}),
        json!(true),
        json!("../../etc/passwd"),
    ];
    let mut bodies = Vec::new();
    for name in properties.keys() {
        for wrong in &wrong_values {
            let mut body = plausible.clone();
            body.insert(name.clone(), wrong.clone());
            bodies.push(Value::Object(body));
        }
    }
    for name in required {
        let mut body = plausible.clone();
        body.remove(name);
        bodies.push(Value::Object(body));
    }
    let mut body = plausible.clone();
    body.insert("unexpected_field".into(), json!(1));
    bodies.push(Value::Object(body));
    bodies
}

/// An upload whose header claims more pixels than the decoding limit (256 MiB) is refused
/// before they are allocated, image or mask; small valid uploads still pass meanwhile.
#[test]
fn an_upload_claiming_a_huge_image_is_refused_before_its_pixels_are_allocated() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&dir.path().join("data"), None);
    let http = client();
    let (_, project) = call(
        http.post(server.url("/api/projects"))
            .json(&json!({"name": "target"})),
    );
    let project = project["id"].as_str().expect("id").to_string();
    let media_url = server.url(&format!("/api/projects/{project}/media"));
    // 11000 x 11000 RGB is 363 MB: under the image crate's own default limit, over ours.
    let huge = png_claiming(11_000, 11_000);
    assert!(huge.len() < 200, "{} bytes", huge.len());
    // Each refusal is 415 with a detail naming the field.
    let refused = |file: Vec<u8>, mask: Option<Vec<u8>>| -> String {
        let (status, body) = call(http.post(&media_url).multipart(upload_form(
            file,
            Some("anomalous"),
            mask,
        )));
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{body}");
        body["detail"].as_str().expect("detail").to_string()
    };
    let detail = refused(huge.clone(), None).to_ascii_lowercase();
    assert!(
        detail.starts_with("file:") && detail.contains("limit"),
        "{detail}"
    );
    let detail = refused(png(32, 32, 5), Some(huge));
    assert!(detail.starts_with("mask:"), "{detail}");
    // A mask is stored as PNG: a JPEG one is refused, not stored under a .png name.
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new(&mut jpeg)
        .encode(&[0u8; 32 * 32], 32, 32, image::ExtendedColorType::L8)
        .expect("jpeg");
    let detail = refused(png(32, 32, 5), Some(jpeg));
    assert!(detail.starts_with("mask: not a PNG"), "{detail}");
    let (status, body) = call(http.post(&media_url).multipart(upload_form(
        png(32, 32, 5),
        None,
        None,
    )));
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// Sends `head` (request line and headers, as given) over a new connection to the server at
/// `base` and returns what the server answers within `wait`, up to 4 KB.
fn raw_exchange(base: &str, head: &str, wait: Duration) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let address = base.trim_start_matches("http://");
    let mut socket = std::net::TcpStream::connect(address)?;
    socket.set_read_timeout(Some(wait))?;
    socket.write_all(head.as_bytes())?;
    let mut answer = vec![0u8; 4096];
    let read = socket.read(&mut answer)?;
    Ok(String::from_utf8_lossy(&answer[..read]).into_owned())
}

#[test]
fn broken_headers_oversized_bodies_and_half_sent_requests_are_answered_or_closed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&dir.path().join("data"), None);
    let http = client();
    let (_, project) = call(
        http.post(server.url("/api/projects"))
            .json(&json!({"name": "target"})),
    );
    let project = project["id"].as_str().expect("id").to_string();

    // A multipart upload without its boundary: 400 naming the header, not 405.
    let (status, body) = call(
        http.post(server.url(&format!("/api/projects/{project}/media")))
            .header("content-type", "multipart/form-data")
            .body("--x\r\n"),
    );
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .expect("detail")
            .contains("content-type"),
        "{body}"
    );

    // Each body limit is named by the route that has it (answered from the declared length).
    let host = server.base.trim_start_matches("http://").to_string();
    for (path, length, limit) in [
        (
            format!("/api/projects/{project}/snapshots:import"),
            600u64 << 20,
            "536870912",
        ),
        ("/api/sources:import".to_string(), 1 << 20, "65536"),
        ("/api/projects".to_string(), 2 << 20, "1048576"),
    ] {
        let answer = raw_exchange(
            &server.base,
            &format!("POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"),
            Duration::from_secs(10),
        )
        .expect("an answer");
        assert!(answer.starts_with("HTTP/1.1 413"), "{path}: {answer}");
        assert!(answer.contains(limit), "{path}: {answer}");
    }

    // An import whose body stalls keeps the import's turn (one at a time) for at most 30 s of
    // silence: it gets 408, and an import sent meanwhile is then served.
    let stalled = {
        let (server_base, project) = (server.base.clone(), project.clone());
        let host = host.clone();
        std::thread::spawn(move || {
            raw_exchange(
                &server_base,
                &format!(
                    "POST /api/projects/{project}/snapshots:import HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/vnd.apache.parquet\r\nContent-Length: 1000\r\n\r\nPAR1"
                ),
                Duration::from_secs(60),
            )
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let patient = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(90))
        .build()
        .expect("client");
    let (status, body) = call(
        patient
            .post(server.url(&format!("/api/projects/{project}/snapshots:import")))
            .header("content-type", "application/vnd.apache.parquet")
            .body(b"not parquet".to_vec()),
    );
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let answer = stalled.join().expect("joined").expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("nothing received for 30 s"), "{answer}");

    // A client that sends half a request, or nothing, loses its connection after the header
    // deadline (10 s) instead of holding it for ever; the server answers others meanwhile.
    let waits: Vec<_> = ["GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ", ""]
        .into_iter()
        .map(|head| {
            let server_base = server.base.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                let answer = raw_exchange(&server_base, head, Duration::from_secs(30));
                (head, started.elapsed(), answer)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let (status, _) = call(http.get(server.url("/health")));
    assert_eq!(status, StatusCode::OK);
    for wait in waits {
        let (head, took, answer) = wait.join().expect("joined");
        assert!(
            took < Duration::from_secs(25),
            "{head:?}: still open after {took:?}"
        );
        // Closed (nothing read, or a reset), or a 408 before closing: never a normal answer.
        match answer {
            Ok(text) => assert!(
                text.is_empty() || text.starts_with("HTTP/1.1 408"),
                "{head:?}: {text}"
            ),
            Err(error) => assert!(
                !matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "{head:?}: {error}"
            ),
        }
    }
}

#[test]
fn malformed_requests_to_every_documented_route_never_get_a_5xx() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let server = Server::start(&data, None);
    let http = client();
    let (_, project) = call(
        http.post(server.url("/api/projects"))
            .json(&json!({"name": "target"})),
    );
    let project = project["id"].as_str().expect("id").to_string();
    let (status, _) = call(
        http.post(server.url(&format!("/api/projects/{project}/media")))
            .multipart(upload_form(png(32, 32, 5), None, None)),
    );
    assert_eq!(status, StatusCode::CREATED);
    let (_, spec) = call(http.get(server.url("/api/openapi.json")));
    let paths = spec["paths"].as_object().expect("paths").clone();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let ids = [
        project.clone(),
        "00000000-0000-0000-0000-000000000000".to_string(),
        "..".to_string(),
        "%2e%2e%2f%2e%2e%2fetc".to_string(),
        "x".repeat(3000),
        "%00".to_string(),
        "%ff%fe".to_string(),
    ];
    let queries = [
        "",
        "?limit=-1",
        "?limit=abc&offset=-5",
        "?offset=99999999999999999999",
        "?limit=1000000",
        "?project_id=%00&unknown=1",
    ];
    let mut sent = 0;
    let mut closed_early = 0;
    let mut failures = Vec::new();
    for (path, methods) in &paths {
        for method in methods.as_object().expect("methods").keys() {
            for (round, (content_type, body)) in malformed_bodies(&mut rng).into_iter().enumerate()
            {
                let id = &ids[(round + sent) % ids.len()];
                let concrete: String = path
                    .split('{')
                    .enumerate()
                    .map(|(index, part)| match part.split_once('}') {
                        Some((_, rest)) if index > 0 => format!("{id}{rest}"),
                        _ => part.to_string(),
                    })
                    .collect();
                let url = format!(
                    "{}{}",
                    server.url(&concrete),
                    queries[round % queries.len()]
                );
                let request = match method.as_str() {
                    "get" => http.get(&url),
                    "post" => http.post(&url),
                    "put" => http.put(&url),
                    "patch" => http.patch(&url),
                    "delete" => http.delete(&url),
                    other => panic!("undocumented method {other}"),
                };
                // Event streams answer with a stream: only its status is read.
                let response = request
                    .header("content-type", content_type)
                    .body(body)
                    .timeout(Duration::from_secs(10))
                    .send();
                sent += 1;
                match response {
                    Ok(response) if response.status().is_server_error() => {
                        let status = response.status();
                        failures.push(format!(
                            "{method} {url}: {status} {}",
                            response
                                .text()
                                .unwrap_or_default()
                                .chars()
                                .take(300)
                                .collect::<String>()
                        ));
                    }
                    Ok(_) => {}
                    Err(error) if error.is_timeout() => {}
                    // The server may answer before reading a body it has no use for (a 404 on
                    // a GET) and close the connection, and the client, still writing, then
                    // loses the answer. Acceptable while the server keeps answering.
                    Err(_) if call(http.get(server.url("/health"))).0 == StatusCode::OK => {
                        closed_early += 1;
                    }
                    Err(error) => failures.push(format!("{method} {url} body {round}: {error:?}")),
                }
            }
        }
        let (status, _) = call(http.get(server.url("/health")));
        assert_eq!(status, StatusCode::OK, "the server answers after {path}");
    }
    // Bodies made from each route's request schema: every property of the wrong type or out of
    // range, every required property missing, an unknown property.
    for (path, methods) in &paths {
        for (method, operation) in methods.as_object().expect("methods") {
            let Some(reference) =
                operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].as_str()
            else {
                continue;
            };
            let schema = spec
                .pointer(reference.trim_start_matches('#'))
                .expect("the body schema is in components");
            let url = server.url(
                &path
                    .split('{')
                    .enumerate()
                    .map(|(index, part)| match part.split_once('}') {
                        Some((_, rest)) if index > 0 => format!("{project}{rest}"),
                        _ => part.to_string(),
                    })
                    .collect::<String>(),
            );
            for body in schema_mutations(schema) {
                let request = match method.as_str() {
                    "post" => http.post(&url),
                    "put" => http.put(&url),
                    "patch" => http.patch(&url),
                    other => panic!("a body on {other}"),
                };
                let (status, answer) = call(request.json(&body));
                sent += 1;
                if status.is_server_error() {
                    failures.push(format!("{method} {url} {body}: {status} {answer}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {sent}: {failures:#?}",
        failures.len()
    );
    assert!(sent >= 500, "only {sent} requests");
    assert!(
        closed_early * 20 < sent,
        "{closed_early} of {sent} connections closed early"
    );
    drop(server);
    let (clean, report) = inspectflow(&["check-db"], &data);
    assert!(clean, "{report}");
}

/// Creates and starts a pipeline whose synthetic camera (64x48, 30 FPS) feeds a raw
/// `sink.preview`; returns its id.
fn running_raw_preview(server: &Server, project: &str) -> String {
    let http = client();
    let graph = json!({"name": "raw only", "nodes": [
        {"id": "cam", "op": "source.synthetic", "params": {"width": 64, "height": 48, "fps": 30, "realtime": true}},
        {"id": "preview", "op": "sink.preview", "params": {"view": "raw"}}
    ], "edges": [{"from": "cam", "to": "preview", "queue": {"capacity": 1, "policy": "drop_oldest"}}]});
    let (status, pipeline) = call(
        http.post(server.url(&format!("/api/projects/{project}/pipelines")))
            .json(&json!({"name": "raw only", "graph": graph})),
    );
    assert_eq!(status, StatusCode::CREATED, "{pipeline}");
    let id = pipeline["id"].as_str().expect("id").to_string();
    let (status, started) = call(
        http.post(server.url("/api/active-pipelines"))
            .json(&json!({"pipeline_id": id})),
    );
    assert_eq!(status, StatusCode::CREATED, "{started}");
    id
}

/// Thousands of mutated WebRTC offers (lines dropped, repeated, or taken from a list of odd
/// ones), each answered offer then given a candidate and closed: every request gets an
/// answer (a 503 only for an offer webrtcbin leaves unanswered), every close 204, and the
/// server keeps answering. (A longer fuzzing run of this kind, with more mutations, found
/// offers webrtcbin stalls on, now refused, and a close that could wait for ever.)
#[test]
fn mutated_live_view_offers_are_each_answered_and_their_viewers_close() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).expect("root");
    let (server, project) = server_with_root(&dir.path().join("data"), &root);
    let id = running_raw_preview(&server, &project);
    // Longer than the server's own 20 s wait for an answer.
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    let fingerprint = format!("a=fingerprint:sha-256 {}", vec!["AB"; 32].join(":"));
    let base = [
        "v=0",
        "o=- 1 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "m=video 9 UDP/TLS/RTP/SAVPF 102",
        "c=IN IP4 0.0.0.0",
        "a=recvonly",
        "a=rtpmap:102 H264/90000",
        "a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
        "a=mid:0",
        "a=ice-ufrag:abcd",
        "a=ice-pwd:abcdefghijklmnopqrstuvwx",
        fingerprint.as_str(),
        "a=setup:actpass",
        "a=rtcp-mux",
    ];
    let odd = [
        "m=video 9 UDP/TLS/RTP/SAVPF 96 97",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "a=rtpmap:96 VP8/90000",
        "a=rtpmap:102 H264/0",
        "a=fmtp:102 profile-level-id=zzzzzz",
        "a=sendrecv",
        "a=inactive",
        "a=ssrc-group:FID 1 2",
        "a=group:BUNDLE 0 1",
        "a=candidate:1 1 UDP 1 127.0.0.1 9 typ host",
        "c=IN IP6 ::",
        "a=setup:passive",
        "a=fingerprint:sha-1 00",
        "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
        "a=mid:1",
    ];
    // A host candidate, the end of candidates, and one that does not parse.
    let candidates = [
        "candidate:1 1 UDP 1 127.0.0.1 9 typ host",
        "",
        "candidate:x",
    ];
    // xorshift64: the same offers every run.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = |bound: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % bound as u64) as usize
    };
    let (mut answered, mut stalled) = (0, 0);
    for round in 0..2000 {
        let mut lines: Vec<&str> = base.to_vec();
        for _ in 0..1 + next(4) {
            match next(3) {
                0 if lines.len() > 1 => {
                    lines.remove(next(lines.len()));
                }
                1 => {
                    let at = next(lines.len() + 1);
                    lines.insert(at, odd[next(odd.len())]);
                }
                _ => {
                    let from = next(lines.len());
                    let tail: Vec<&str> = lines[from..].to_vec();
                    lines.extend(tail);
                }
            }
        }
        let sdp = format!("{}\r\n", lines.join("\r\n"));
        let (status, answer) = call(
            http.post(server.url("/api/webrtc/offer"))
                .json(&json!({"pipeline_id": id, "sdp": sdp, "view": "raw"})),
        );
        match status {
            StatusCode::OK => answered += 1,
            StatusCode::SERVICE_UNAVAILABLE => stalled += 1,
            StatusCode::UNPROCESSABLE_ENTITY => continue,
            other => panic!("offer {round}: {other} {answer}\n{sdp}"),
        }
        let Some(connection) = answer["connection_id"].as_str() else {
            continue;
        };
        let (status, body) = call(
            http.post(server.url(&format!("/api/webrtc/{connection}/ice")))
                .json(&json!({"candidate": candidates[next(candidates.len())], "sdpMLineIndex": next(4)})),
        );
        assert!(
            status.is_client_error() || status == StatusCode::NO_CONTENT,
            "{status} {body}"
        );
        let (status, body) = call(http.delete(server.url(&format!("/api/webrtc/{connection}"))));
        assert_eq!(
            status,
            StatusCode::NO_CONTENT,
            "close after offer {round}: {body}\n{sdp}"
        );
    }
    assert!(answered > 100, "only {answered} offers answered");
    assert!(stalled * 100 < answered, "{stalled} offers left unanswered");
    let (status, _) = call(http.get(server.url("/health")));
    assert_eq!(status, StatusCode::OK, "the server keeps answering");
}

/// The live view's inputs (the MJPEG query, WebRTC offers, candidates and closes) refuse hostile
/// values with 404, 409 or 422 naming what was wrong, and the server keeps answering.
#[test]
fn hostile_live_view_requests_are_refused_and_the_server_keeps_answering() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).expect("root");
    let (server, project) = server_with_root(&dir.path().join("data"), &root);
    let http = client();
    let id = running_raw_preview(&server, &project);
    let h264 = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 102\r\nc=IN IP4 0.0.0.0\r\na=recvonly\r\na=rtpmap:102 H264/90000\r\na=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\n";
    let vp8_only = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 VP8/90000\r\n";
    let huge = format!("{h264}{}", "a=x\r\n".repeat(20_000));
    let offers = [
        (
            json!({"pipeline_id": id, "sdp": "not an offer \u{0}\u{7f}"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "sdp",
        ),
        (
            json!({"pipeline_id": id, "sdp": vp8_only}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "H.264",
        ),
        (
            json!({"pipeline_id": id, "sdp": huge}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "bytes",
        ),
        (
            json!({"pipeline_id": id, "sdp": h264, "view": "sideways"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "sideways",
        ),
        (
            json!({"pipeline_id": id, "sdp": h264, "extra": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "extra",
        ),
        (
            json!({"pipeline_id": "no-such-pipeline", "sdp": h264}),
            StatusCode::NOT_FOUND,
            "no-such-pipeline",
        ),
        (
            json!({"pipeline_id": id, "sdp": h264, "view": "overlay"}),
            StatusCode::CONFLICT,
            "sink.preview",
        ),
        // Offers GStreamer's webrtcbin would stall on for ever, refused before it sees them.
        (
            json!({"pipeline_id": id, "sdp": format!("{h264}{}a=recvonly\r\n", &h264[h264.find("m=").expect("m=")..])}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "media section 2 (video) has 2 direction attributes",
        ),
        (
            json!({"pipeline_id": id, "sdp": h264.replace("a=recvonly\r\n", "")}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "media section 1 (video) has 0 direction attributes",
        ),
    ];
    for (body, expected, named) in offers {
        let (status, answer) = call(http.post(server.url("/api/webrtc/offer")).json(&body));
        assert_eq!(status, expected, "{answer}");
        assert!(
            answer["detail"].as_str().is_some_and(|d| d.contains(named)),
            "the answer names {named}: {answer}"
        );
    }
    // An offer that parses but that WebRTC negotiation refuses (no ICE credentials, no
    // fingerprint) is the client's to fix: 422, with webrtcbin's reason.
    let (status, answer) = call(
        http.post(server.url("/api/webrtc/offer"))
            .json(&json!({"pipeline_id": id, "sdp": h264, "view": "raw"})),
    );
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert!(
        answer["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("sdp: the offer was refused")),
        "{answer}"
    );
    // Ten complete offers at once, right after that failure tore its broadcast down: the
    // viewer limit (8) holds while they are answered, and every one within it is answered.
    let complete = format!(
        "{h264}a=mid:0\r\na=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n\
         a=fingerprint:sha-256 {}\r\na=setup:actpass\r\na=rtcp-mux\r\n",
        vec!["AB"; 32].join(":")
    );
    let statuses: Vec<(StatusCode, Value)> = std::thread::scope(|scope| {
        let offers: Vec<_> = (0..10)
            .map(|_| {
                scope.spawn(|| {
                    call(
                        client()
                            .post(server.url("/api/webrtc/offer"))
                            .json(&json!({"pipeline_id": id, "sdp": complete, "view": "raw"})),
                    )
                })
            })
            .collect();
        offers
            .into_iter()
            .map(|offer| offer.join().expect("offer thread"))
            .collect()
    });
    let answered: Vec<&Value> = statuses
        .iter()
        .filter(|(status, _)| *status == StatusCode::OK)
        .map(|(_, answer)| answer)
        .collect();
    let refused = statuses
        .iter()
        .filter(|(status, _)| *status == StatusCode::CONFLICT)
        .count();
    assert_eq!((answered.len(), refused), (8, 2), "{statuses:?}");
    // Candidates for a real connection: too long, a NUL in it, a media line that is not there.
    let connection = answered[0]["connection_id"]
        .as_str()
        .expect("connection id");
    for (candidate, line, named) in [
        ("c".repeat(5000), 0, "candidate"),
        (
            "candidate:1 1 UDP 1 127.0.0.1 9 typ host\u{0}".to_string(),
            0,
            "candidate",
        ),
        (
            "candidate:1 1 UDP 1 127.0.0.1 9 typ host".to_string(),
            99_999,
            "sdpMLineIndex",
        ),
    ] {
        let (status, body) = call(
            http.post(server.url(&format!("/api/webrtc/{connection}/ice")))
                .json(&json!({"candidate": candidate, "sdpMLineIndex": line})),
        );
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert!(
            body["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with(named)),
            "{body}"
        );
    }
    for answer in &answered {
        let connection = answer["connection_id"].as_str().expect("connection id");
        let (status, _) = call(http.delete(server.url(&format!("/api/webrtc/{connection}"))));
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    let (status, _) = call(
        http.post(server.url("/api/webrtc/no-such-connection/ice"))
            .json(&json!({"candidate": "candidate:1 1 UDP 1 127.0.0.1 9 typ host", "sdpMLineIndex": 0})),
    );
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(http.delete(server.url("/api/webrtc/no-such-connection")));
    assert_eq!(status, StatusCode::NOT_FOUND);
    let stream = |query: &str| {
        call(http.get(server.url(&format!("/api/active-pipelines/{id}/stream{query}"))))
    };
    for (query, expected) in [
        ("?fps=1000", StatusCode::UNPROCESSABLE_ENTITY),
        ("?fps=-1", StatusCode::UNPROCESSABLE_ENTITY),
        ("?view=sideways", StatusCode::UNPROCESSABLE_ENTITY),
        ("?unknown=1", StatusCode::UNPROCESSABLE_ENTITY),
        ("?view=overlay", StatusCode::CONFLICT),
    ] {
        let (status, body) = stream(query);
        assert_eq!(status, expected, "{query}: {body}");
    }
    let (status, _) = call(http.get(server.url("/health")));
    assert_eq!(status, StatusCode::OK, "the server keeps answering");
}

/// A web page on another site cannot drive the server through a visitor's browser: changes
/// that carry a foreign `Origin` (or `Sec-Fetch-Site: cross-site`) are refused with 403 and
/// change nothing; the server's own pages, programs (no such headers) and reads pass.
#[test]
fn changes_sent_by_another_site_through_a_browser_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&dir.path().join("data"), None);
    let http = client();
    let own = server.url("");
    let own = own.trim_end_matches('/');
    let create = |headers: &[(&str, &str)]| {
        let mut request = http
            .post(server.url("/api/projects"))
            .json(&json!({"name": "csrf"}));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        call(request)
    };
    for headers in [
        vec![("Origin", "http://evil.example")],
        vec![("Origin", "null")],
        vec![("Sec-Fetch-Site", "cross-site")],
    ] {
        let (status, body) = create(&headers);
        assert_eq!(status, StatusCode::FORBIDDEN, "{headers:?}: {body}");
        assert!(
            body["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("Origin")),
            "{body}"
        );
    }
    let (_, projects) = call(
        http.get(server.url("/api/projects"))
            .header("Origin", "http://evil.example"),
    );
    assert_eq!(projects["pagination"]["total"], 0, "nothing was created");
    for headers in [
        vec![("Origin", own), ("Sec-Fetch-Site", "same-origin")],
        vec![],
    ] {
        let (status, body) = create(&headers);
        assert_eq!(status, StatusCode::CREATED, "{headers:?}: {body}");
    }
}
