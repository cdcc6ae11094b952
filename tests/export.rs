//! ONNX export: the ONNX file written from a package's IR, read back by OpenVINO's ONNX reader,
//! computes what the IR computes (every output within 1e-4; bit for bit on the CPU plugin), for both backbones and for models
//! trained through the API and exported with `:export?format=onnx`.

mod common;

use std::io::Read;
use std::path::Path;

use common::server::{Server, call, client, upload_form};
use inspectflow::backbone::Backbone;
use inspectflow::onnx::{OnnxOptions, ir_to_onnx};
use inspectflow::operators::infer::model::{CompileOptions, LoadedModel, OutputValues};
use reqwest::StatusCode;
use serde_json::json;

/// Deterministic input values in [-2, 2).
fn input(len: usize, seed: u32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state as f32 / u32::MAX as f32) * 4.0 - 2.0
        })
        .collect()
}

/// Runs both models on the same inputs; returns, per output, the largest difference and the
/// output's scale (range, or magnitude for a single value) in the IR (and checks names and
/// shapes agree).
fn compare(ir: &Path, onnx: &Path) -> Vec<(String, f32, f32)> {
    let ir = LoadedModel::load(ir, &CompileOptions::default()).expect("the IR loads");
    let onnx = LoadedModel::load(onnx, &CompileOptions::default()).expect("the ONNX file loads");
    assert_eq!(ir.input, onnx.input);
    let mut worst: Vec<(String, f32, f32)> = Vec::new();
    for seed in 1..=3 {
        let values = input(ir.input_len(), seed);
        let expected: Vec<OutputValues> = ir.infer(&values).expect("IR infers");
        let got: Vec<OutputValues> = onnx.infer(&values).expect("ONNX infers");
        for want in &expected {
            let have = got
                .iter()
                .find(|o| o.name == want.name)
                .unwrap_or_else(|| panic!("the ONNX model lacks output {}", want.name));
            assert_eq!(have.shape, want.shape, "{}", want.name);
            // The output's scale: its range, or its magnitude for a single value.
            let (low, high, magnitude) = want
                .values
                .iter()
                .fold((f32::MAX, f32::MIN, 0.0f32), |(l, h, m), v| {
                    (l.min(*v), h.max(*v), m.max(v.abs()))
                });
            let difference = want
                .values
                .iter()
                .zip(&have.values)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            match worst.iter_mut().find(|(name, _, _)| *name == want.name) {
                Some(entry) => {
                    entry.1 = entry.1.max(difference);
                    entry.2 = entry.2.max((high - low).max(magnitude));
                }
                None => worst.push((want.name.clone(), difference, (high - low).max(magnitude))),
            }
        }
    }
    worst
}

fn write_onnx(xml: &Path, options: OnnxOptions) -> std::path::PathBuf {
    let text = std::fs::read_to_string(xml).expect("xml");
    let bin = std::fs::read(xml.with_extension("bin")).expect("bin");
    let onnx = ir_to_onnx(&text, &bin, options).unwrap_or_else(|e| panic!("{e}"));
    let path = xml.with_extension("onnx");
    std::fs::write(&path, onnx).expect("write");
    path
}

#[test]
fn both_backbones_compute_the_same_in_onnx_as_in_the_ir() {
    let dir = tempfile::tempdir().expect("temp dir");
    for backbone in [Backbone::MobilenetV2, Backbone::EfficientnetLite0] {
        let xml = dir.path().join(format!("{}.xml", backbone.name()));
        backbone.import(64, &xml).unwrap_or_else(|e| panic!("{e}"));
        let onnx = write_onnx(&xml, OnnxOptions::default());
        for (name, difference, range) in compare(&xml, &onnx) {
            eprintln!(
                "{}: {name}: largest difference {difference:e}, scale {range}",
                backbone.name()
            );
            assert!(
                difference <= 1e-4,
                "{}: {name} differs by {difference} (range {range})",
                backbone.name()
            );
        }
    }
}

/// The files of a zip answer.
fn unzip(bytes: &[u8], into: &Path) -> Vec<String> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes)).expect("a zip");
    let mut names = Vec::new();
    for index in 0..archive.len() {
        let mut file = archive.by_index(index).expect("entry");
        let name = file.name().expect("a name").to_string();
        let mut content = Vec::new();
        file.read_to_end(&mut content).expect("read");
        std::fs::write(into.join(&name), content).expect("write");
        names.push(name);
    }
    names.sort();
    names
}

#[test]
fn trained_models_export_to_onnx_through_the_api_with_the_same_outputs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&dir.path().join("data"), None);
    let http = client();
    let (_, project) = call(
        http.post(server.url("/api/projects"))
            .json(&json!({"name": "line"})),
    );
    let project = project["id"].as_str().expect("id").to_string();
    for level in [60u8, 90, 120, 150] {
        let image = common::server::png(48, 48, level);
        let (status, body) = call(
            http.post(server.url(&format!("/api/projects/{project}/media")))
                .multipart(upload_form(image, Some("normal"), None)),
        );
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    for settings in [
        json!({"model_name": "padim", "input_size": 64, "backbone": "mobilenet_v2"}),
        json!({"model_name": "patchcore", "input_size": 64, "backbone": "efficientnet_lite0", "memory_bank": 64}),
    ] {
        let (status, job) = call(
            http.post(server.url(&format!("/api/projects/{project}/train")))
                .json(&settings),
        );
        assert_eq!(status, StatusCode::CREATED, "{job}");
        let url = server.url(&format!("/api/jobs/{}", job["id"].as_str().expect("id")));
        let job = (0..1200)
            .find_map(|_| {
                let (_, job) = call(http.get(&url));
                match job["status"].as_str() {
                    Some("completed") => Some(job),
                    Some("failed" | "canceled") => panic!("training ended: {job}"),
                    _ => {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        None
                    }
                }
            })
            .expect("training ends");
        let model = job["model_id"].as_str().expect("model id");
        let export = |query: &str| {
            let response = http
                .post(server.url(&format!(
                    "/api/projects/{project}/models/{model}:export{query}"
                )))
                .send()
                .expect("export");
            (response.status(), response.bytes().expect("body").to_vec())
        };
        let family = settings["model_name"].as_str().expect("family");
        let folder = dir.path().join(family);
        for name in ["ir", "onnx", "fp16"] {
            std::fs::create_dir_all(folder.join(name)).expect("folder");
        }
        let (status, bytes) = export("");
        assert_eq!(status, StatusCode::OK);
        let files = unzip(&bytes, &folder.join("ir"));
        assert!(files.contains(&"model.xml".to_string()), "{files:?}");
        let (status, bytes) = export("?format=onnx");
        assert_eq!(status, StatusCode::OK);
        let files = unzip(&bytes, &folder.join("onnx"));
        assert!(
            files.contains(&"model.onnx".to_string())
                && files.contains(&"manifest.json".to_string())
                && !files
                    .iter()
                    .any(|f| f.starts_with("model.xml") || f == "model.bin"),
            "{family}: {files:?}"
        );
        let ir = folder.join("ir/model.xml");
        for (name, difference, range) in compare(&ir, &folder.join("onnx/model.onnx")) {
            eprintln!("{family}: {name}: largest difference {difference:e}, scale {range}");
            assert!(
                difference <= 1e-4,
                "{family}: {name} differs by {difference} (range {range})"
            );
        }
        let (status, bytes) = export("?format=onnx&precision=fp16");
        assert_eq!(status, StatusCode::OK);
        unzip(&bytes, &folder.join("fp16"));
        let full = std::fs::metadata(folder.join("onnx/model.onnx")).expect("size");
        let half = std::fs::metadata(folder.join("fp16/model.onnx")).expect("size");
        assert!(
            half.len() * 10 < full.len() * 6,
            "{} vs {}",
            half.len(),
            full.len()
        );
        for (name, difference, range) in compare(&ir, &folder.join("fp16/model.onnx")) {
            assert!(
                difference <= 0.02 * range.max(1e-3),
                "{family} fp16: {name} differs by {difference} (range {range})"
            );
        }
        let (status, body) = export("?format=onnx&precision=int4");
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(String::from_utf8_lossy(&body).contains("precision"));
        let (status, body) = export("?format=tflite");
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.contains("query field format: unknown variant `tflite`"),
            "{body}"
        );
    }
}
