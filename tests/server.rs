//! The REST API as a client sees it: a real `inspectflow serve` process on 127.0.0.1, driven
//! over HTTP, killed with SIGKILL and restarted on the same data directory.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::server::{
    Contract, Server, call, client, inspectflow, png, png_claiming, png_of, upload_form,
};
use reqwest::StatusCode;
use reqwest::blocking::Client;
use serde_json::{Value, json};

#[test]
fn projects_are_created_listed_paged_renamed_and_deleted_and_survive_a_kill() {
    let dir = tempfile::tempdir().expect("temp dir");
    let http = client();
    let ids: Vec<String> = {
        let server = Server::start(dir.path(), None);
        let (status, body) = call(http.get(server.url("/health")));
        assert_eq!(
            (status, body["status"].as_str()),
            (StatusCode::OK, Some("ok"))
        );
        let ids = (0..5)
            .map(|n| {
                let (status, project) = call(
                    http.post(server.url("/api/projects"))
                        .json(&json!({"name": format!("line {n}")})),
                );
                assert_eq!(status, StatusCode::CREATED, "{project}");
                assert_eq!(project["name"], format!("line {n}"));
                project["id"].as_str().expect("id").to_string()
            })
            .collect();
        // SIGKILL: every answered write is already durable.
        drop(server);
        ids
    };
    let server = Server::start(dir.path(), None);
    let (status, page) = call(http.get(server.url("/api/projects?limit=2&offset=1")));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        page["pagination"],
        json!({"offset": 1, "limit": 2, "count": 2, "total": 5})
    );
    let listed: Vec<&str> = page["projects"]
        .as_array()
        .expect("projects")
        .iter()
        .map(|p| p["id"].as_str().expect("id"))
        .collect();
    assert_eq!(
        listed,
        vec![ids[1].as_str(), ids[2].as_str()],
        "creation order"
    );

    let (status, renamed) = call(
        http.patch(server.url(&format!("/api/projects/{}", ids[0])))
            .json(&json!({"name": "  welding  "})),
    );
    assert_eq!(
        (status, renamed["name"].as_str()),
        (StatusCode::OK, Some("welding"))
    );
    let (status, fetched) = call(http.get(server.url(&format!("/api/projects/{}", ids[0]))));
    assert_eq!(
        (status, fetched["name"].as_str()),
        (StatusCode::OK, Some("welding"))
    );
    assert_eq!(fetched["description"], "", "none given");

    // A description: given at creation, changed alone, limited, and one of name or description
    // is needed to change anything.
    let (status, described) = call(
        http.post(server.url("/api/projects"))
            .json(&json!({"name": "caps", "description": "Bottle caps on line 3"})),
    );
    assert_eq!(status, StatusCode::CREATED, "{described}");
    assert_eq!(described["description"], "Bottle caps on line 3");
    let caps = described["id"].as_str().expect("id");
    let (status, changed) = call(
        http.patch(server.url(&format!("/api/projects/{caps}")))
            .json(&json!({"description": "Bottle caps, lines 3 and 4"})),
    );
    assert_eq!(status, StatusCode::OK, "{changed}");
    assert_eq!(
        (changed["name"].as_str(), changed["description"].as_str()),
        (Some("caps"), Some("Bottle caps, lines 3 and 4"))
    );
    for (body, field) in [
        (json!({"description": "x".repeat(4001)}), "description"),
        (json!({}), "name, description"),
        (json!({"name": ""}), "name"),
    ] {
        let (status, error) = call(
            http.patch(server.url(&format!("/api/projects/{caps}")))
                .json(&body),
        );
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
        assert!(
            error["detail"].as_str().expect("detail").contains(field),
            "{error}"
        );
    }
    let (_, created) = call(
        http.post(server.url("/api/projects"))
            .json(&json!({"name": "tmp"})),
    );
    let (status, _) = call(http.delete(server.url(&format!(
        "/api/projects/{}",
        created["id"].as_str().expect("id")
    ))));
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call(http.delete(server.url(&format!("/api/projects/{caps}"))));
    assert_eq!(status, StatusCode::NO_CONTENT);

    let (status, body) = call(http.delete(server.url(&format!("/api/projects/{}", ids[4]))));
    assert_eq!((status, body), (StatusCode::NO_CONTENT, Value::Null));
    let (status, body) = call(http.get(server.url(&format!("/api/projects/{}", ids[4]))));
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["detail"].as_str().expect("detail").contains(&ids[4]));
    let (_, page) = call(http.get(server.url("/api/projects")));
    assert_eq!(page["pagination"]["total"], 4);
}

#[test]
fn bad_requests_get_json_details_with_honest_codes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(dir.path(), None);
    let http = client();
    let cases = [
        (
            http.post(server.url("/api/projects"))
                .json(&json!({"name": ""})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "name",
        ),
        (
            http.post(server.url("/api/projects"))
                .json(&json!({"title": "x"})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "title",
        ),
        (
            http.post(server.url("/api/projects"))
                .header("content-type", "application/json")
                .body("{not json"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "request body",
        ),
        (
            http.post(server.url("/api/projects"))
                .header("content-type", "text/plain")
                .body("name"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "application/json",
        ),
        (
            http.get(server.url("/api/projects?limit=0")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "limit",
        ),
        (
            http.get(server.url("/api/projects?limit=ten")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "query field limit: invalid digit",
        ),
        (
            http.post(server.url("/api/projects"))
                .json(&json!({"name": 5})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "request body field name: invalid type: integer `5`",
        ),
        (
            http.get(server.url("/api/projects/no-such-id")),
            StatusCode::NOT_FOUND,
            "no-such-id",
        ),
        (
            http.get(server.url("/api/nothing-here")),
            StatusCode::NOT_FOUND,
            "route",
        ),
        (
            http.put(server.url("/api/projects")),
            StatusCode::METHOD_NOT_ALLOWED,
            "method",
        ),
    ];
    // Too large: the server answers from the declared length without reading the body, so the
    // request goes over a raw socket (a client still writing the body could see a broken pipe).
    {
        use std::io::{Read, Write};
        let address = server.base.trim_start_matches("http://").to_string();
        let mut socket = std::net::TcpStream::connect(&address).expect("connect");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(
            socket,
            "POST /api/projects HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            2 << 20
        )
        .expect("send headers");
        let mut answer = vec![0u8; 4096];
        let read = socket.read(&mut answer).expect("answer");
        let answer = String::from_utf8_lossy(&answer[..read]);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("too large"), "{answer}");
    }
    for (request, expected, mentions) in cases {
        let (status, body) = call(request);
        let detail = body["detail"]
            .as_str()
            .unwrap_or_else(|| panic!("{status}: {body}"));
        assert_eq!(status, expected, "{detail}");
        assert!(detail.contains(mentions), "{status}: {detail}");
    }
}

#[test]
fn a_token_is_required_on_every_route_once_configured() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(dir.path(), Some("s3cret"));
    let http = client();
    for path in ["/health", "/api/projects", "/api/projects/x"] {
        let (status, body) = call(http.get(server.url(path)));
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {body}");
        let (status, _) = call(http.get(server.url(path)).bearer_auth("wrong"));
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    let (status, _) = call(http.get(server.url("/api/projects")).bearer_auth("s3cret"));
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(
        http.post(server.url("/api/projects"))
            .bearer_auth("s3cret")
            .json(&json!({"name": "line"})),
    );
    assert_eq!(status, StatusCode::CREATED);
}

#[test]
fn every_documented_route_is_served_and_gen_api_writes_the_servers_spec() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(dir.path(), None);
    let http = client();
    let (status, served) = call(http.get(server.url("/api/openapi.json")));
    assert_eq!(status, StatusCode::OK);
    let written = dir.path().join("openapi.json");
    let generated = Command::new(env!("CARGO_BIN_EXE_inspectflow"))
        .args(["gen-api", "--target-path"])
        .arg(&written)
        .status()
        .expect("gen-api runs");
    assert!(generated.success());
    let on_disk: Value =
        serde_json::from_str(&std::fs::read_to_string(&written).expect("written")).expect("JSON");
    assert_eq!(on_disk, served, "gen-api and the running server agree");

    // Every documented method and path reaches a handler: never "no such route", never 405.
    let paths = served["paths"].as_object().expect("paths");
    assert!(paths.len() >= 5, "{paths:?}");
    for (path, methods) in paths {
        // Every `{..._id}` becomes an id that does not exist.
        let concrete: String = path
            .split('{')
            .enumerate()
            .map(|(index, part)| match part.split_once('}') {
                Some((_, rest)) if index > 0 => {
                    format!("00000000-0000-0000-0000-00000000000{index}{rest}")
                }
                _ => part.to_string(),
            })
            .collect();
        for method in methods.as_object().expect("methods").keys() {
            let request = match method.as_str() {
                "get" => http.get(server.url(&concrete)),
                "post" => http.post(server.url(&concrete)).json(&json!({"name": "x"})),
                "patch" => http
                    .patch(server.url(&concrete))
                    .json(&json!({"name": "x"})),
                "put" => http.put(server.url(&concrete)).json(&json!({"name": "x"})),
                "delete" => http.delete(server.url(&concrete)),
                other => panic!("undocumented method {other}"),
            };
            let (status, body) = call(request);
            let documented: Vec<u16> = methods[method]["responses"]
                .as_object()
                .expect("responses")
                .keys()
                .map(|code| code.parse().expect("status code"))
                .collect();
            assert!(
                documented.contains(&status.as_u16()),
                "{method} {path} answered {status} ({body}), documented {documented:?}"
            );
            assert_ne!(body["detail"], "no such route", "{method} {path}");
        }
    }
}

#[test]
fn trainable_models_and_devices_describe_what_this_build_and_machine_offer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(dir.path(), None);
    let http = client();
    let (status, body) = call(http.get(server.url("/api/trainable-models")));
    assert_eq!(status, StatusCode::OK);
    let models = body["trainable_models"].as_array().expect("list");
    let names: Vec<&str> = models
        .iter()
        .map(|m| m["name"].as_str().expect("name"))
        .collect();
    // The gradient-trained families are listed as their helper is built with the workspace.
    assert_eq!(
        names,
        vec![
            "padim",
            "patchcore",
            "stfpm",
            "reverse_distillation",
            "efficient_ad"
        ]
    );
    for gradient_trained in &models[2..] {
        let parameters = &gradient_trained["parameters"];
        for name in ["epochs", "batch_size", "learning_rate", "patience"] {
            assert!(parameters.get(name).is_some(), "{name}: {gradient_trained}");
        }
        assert!(
            parameters.get("memory_bank").is_none(),
            "{gradient_trained}"
        );
    }
    assert_eq!(
        models.iter().filter(|m| m["recommended"] == true).count(),
        1,
        "exactly one recommended family"
    );
    assert_eq!(
        models[0]["parameters"]["input_size"]["default"],
        Value::Null
    );

    let (status, body) = call(http.get(server.url("/api/devices")));
    assert_eq!(status, StatusCode::OK, "{body}");
    let devices: Vec<&str> = body["inference_devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["name"].as_str().expect("name"))
        .collect();
    assert!(devices.contains(&"CPU"), "{devices:?}");
    assert!(body["cameras"].is_array());
}

/// Every setting `/api/trainable-models` lists for a family is taken, under the same name and
/// with the same default, by the training route and by `inspectflow train` (as a `--kebab-case`
/// flag); names it does not list are refused by both.
#[test]
fn trainable_model_parameters_are_the_training_routes_and_the_clis_settings() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(dir.path(), None);
    let http = client();
    let project = create_project(&http, &server, "settings");
    let train_url = server.url(&format!("/api/projects/{project}/train"));
    let (_, body) = call(http.get(server.url("/api/trainable-models")));
    let families = body["trainable_models"].as_array().expect("families");
    let print_settings = |args: &[String]| -> Result<Value, String> {
        let output = Command::new(env!("CARGO_BIN_EXE_inspectflow"))
            .args(["train", "--print-settings"])
            .args(args)
            .output()
            .expect("runs");
        if output.status.success() {
            Ok(serde_json::from_slice(&output.stdout).expect("settings JSON"))
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    };
    for family in families {
        let name = family["name"].as_str().expect("name");
        let parameters = family["parameters"].as_object().expect("parameters");
        assert!(parameters.len() >= 5, "{name}: {parameters:?}");
        let family_flag = ["--model-name".to_string(), name.to_string()];
        let defaults = print_settings(&family_flag).expect("defaults");
        assert_eq!(defaults["model_name"], name);
        for (parameter, schema) in parameters {
            let default = schema
                .get("default")
                .unwrap_or_else(|| panic!("{name}.{parameter} has no default: {schema}"));
            assert_eq!(
                &defaults[parameter], default,
                "{name}.{parameter}: the CLI's default is the API's"
            );
            // The API takes it under this name (the refusal is about the empty project, not
            // the field).
            let (status, body) = call(
                http.post(&train_url)
                    .json(&json!({"model_name": name, parameter.as_str(): default})),
            );
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
            let detail = body["detail"].as_str().expect("detail");
            assert!(
                detail.starts_with("the project has 0 normal images"),
                "{name}.{parameter} = {default}: {detail}"
            );
            // The CLI takes it as a flag of the same name (null is the flag left out).
            if !default.is_null() {
                let value = default
                    .as_str()
                    .map_or_else(|| default.to_string(), str::to_string);
                let mut args = family_flag.to_vec();
                args.extend([format!("--{}", parameter.replace('_', "-")), value]);
                let settings = print_settings(&args)
                    .unwrap_or_else(|error| panic!("{name}.{parameter}: {error}"));
                assert_eq!(&settings[parameter], default, "{name}.{parameter}");
            }
        }
    }
    // Not a setting: refused by both, naming it.
    let (status, body) = call(
        http.post(&train_url)
            .json(&json!({"model_name": "patchcore", "neighbours": 9})),
    );
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        body["detail"]
            .as_str()
            .expect("detail")
            .contains("neighbours"),
        "{body}"
    );
    let error = print_settings(&["--neighbours".into(), "9".into()]).expect_err("refused");
    assert!(error.contains("--neighbours"), "{error}");
}

#[test]
fn media_are_uploaded_with_labels_and_masks_checked_listed_downloaded_and_deleted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let http = client();
    let server = Server::start(dir.path(), None);
    let (_, project) = call(
        http.post(server.url("/api/projects"))
            .json(&json!({"name": "line"})),
    );
    let media_url = server.url(&format!(
        "/api/projects/{}/media",
        project["id"].as_str().expect("id")
    ));

    let mut ids = Vec::new();
    for level in [10u8, 20, 30] {
        let (status, media) = call(http.post(&media_url).multipart(upload_form(
            png(640, 480, level),
            Some("normal"),
            None,
        )));
        assert_eq!(status, StatusCode::CREATED, "{media}");
        assert_eq!(
            (media["width"].as_u64(), media["height"].as_u64()),
            (Some(640), Some(480))
        );
        assert_eq!(media["label"], "normal");
        ids.push(media["id"].as_str().expect("id").to_string());
    }
    let original = png(64, 48, 200);
    let (status, anomalous) = call(http.post(&media_url).multipart(upload_form(
        original.clone(),
        Some("anomalous"),
        Some(png(64, 48, 255)),
    )));
    assert_eq!(status, StatusCode::CREATED, "{anomalous}");
    assert_eq!(
        (anomalous["label"].as_str(), anomalous["has_mask"].as_bool()),
        (Some("anomalous"), Some(true))
    );
    let anomalous_id = anomalous["id"].as_str().expect("id").to_string();

    // Refusals, each naming the field.
    for (form, expected, mentions) in [
        (
            upload_form(png(8, 8, 1), Some("scratched"), None),
            StatusCode::UNPROCESSABLE_ENTITY,
            "label",
        ),
        (
            upload_form(b"GIF89a not really".to_vec(), None, None),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "file",
        ),
        (
            upload_form(png(8, 8, 1), Some("anomalous"), Some(png(4, 4, 1))),
            StatusCode::UNPROCESSABLE_ENTITY,
            "mask: 4x4 does not match",
        ),
        (
            upload_form(png(8, 8, 1), Some("normal"), Some(png(8, 8, 1))),
            StatusCode::UNPROCESSABLE_ENTITY,
            "mask: only anomalous images have masks",
        ),
        (
            upload_form(png(8, 8, 1), Some("normal"), None).text("label", "anomalous"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "label: given twice",
        ),
        (
            reqwest::blocking::multipart::Form::new().text("label", "normal"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "file",
        ),
    ] {
        let (status, body) = call(http.post(&media_url).multipart(form));
        assert_eq!(status, expected, "{body}");
        assert!(
            body["detail"].as_str().expect("detail").contains(mentions),
            "{body}"
        );
    }
    let (status, _) = call(
        http.post(server.url("/api/projects/no-such-project/media"))
            .multipart(upload_form(png(8, 8, 1), None, None)),
    );
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, page) = call(http.get(format!("{media_url}?limit=10")));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        page["pagination"]["total"], 4,
        "the refused uploads left nothing"
    );
    let listed: Vec<&str> = page["media"]
        .as_array()
        .expect("media")
        .iter()
        .map(|m| m["id"].as_str().expect("id"))
        .collect();
    assert_eq!(
        &listed[..3],
        &[ids[0].as_str(), ids[1].as_str(), ids[2].as_str()]
    );

    let download = http
        .get(format!("{media_url}/{anomalous_id}/full"))
        .send()
        .expect("download");
    assert_eq!(download.headers()["content-type"], "image/png");
    assert_eq!(
        download.bytes().expect("bytes").to_vec(),
        original,
        "byte for byte"
    );
    let thumbnail = http
        .get(format!("{media_url}/{}/thumbnail", ids[0]))
        .send()
        .expect("thumbnail");
    assert_eq!(thumbnail.headers()["content-type"], "image/jpeg");
    let thumbnail = image::load_from_memory(&thumbnail.bytes().expect("bytes")).expect("a JPEG");
    assert_eq!((thumbnail.width(), thumbnail.height()), (256, 192));
    let (status, _) = call(http.get(format!("{media_url}/{}/mask", ids[0])));
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "no mask was uploaded with it"
    );
    let mask = http
        .get(format!("{media_url}/{anomalous_id}/mask"))
        .send()
        .expect("mask");
    assert_eq!(mask.status(), StatusCode::OK);

    let (status, _) = call(http.delete(format!("{media_url}/{}", ids[1])));
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call(http.get(format!("{media_url}/{}", ids[1])));
    assert_eq!(status, StatusCode::NOT_FOUND);
    let files: Vec<String> = walk(dir.path());
    assert!(
        !files.iter().any(|f| f.contains(&ids[1])),
        "its files are gone: {files:?}"
    );
    assert!(!files.iter().any(|f| f.ends_with(".partial")), "{files:?}");
    // Three images with thumbnails, one mask.
    assert_eq!(
        files.iter().filter(|f| f.contains("/media/")).count(),
        3 * 2 + 1,
        "{files:?}"
    );

    // Deleting the project takes its media along.
    let project_url = server.url(&format!(
        "/api/projects/{}",
        project["id"].as_str().expect("id")
    ));
    let (status, _) = call(http.delete(&project_url));
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call(http.get(format!("{media_url}/{anomalous_id}")));
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(!walk(dir.path()).iter().any(|f| f.contains("/media/")));
}

/// Every file under `dir`, as paths.
fn walk(dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path.display().to_string());
        }
    }
    files
}

#[test]
fn migrate_and_check_db_report_the_schema_and_every_inconsistency() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (ok, out) = inspectflow(&["migrate"], dir.path());
    assert!(ok && out.contains("schema version 2"), "{out}");
    let (ok, out) = inspectflow(&["check-db"], dir.path());
    assert!(ok && out.contains("consistent"), "{out}");

    let http = client();
    let (project, media) = {
        let server = Server::start(dir.path(), None);
        let (_, project) = call(
            http.post(server.url("/api/projects"))
                .json(&json!({"name": "line"})),
        );
        let project = project["id"].as_str().expect("id").to_string();
        let media_url = server.url(&format!("/api/projects/{project}/media"));
        let media: Vec<String> = (0..2)
            .map(|n| {
                let (_, media) = call(http.post(&media_url).multipart(upload_form(
                    png(32, 32, n),
                    None,
                    None,
                )));
                media["id"].as_str().expect("id").to_string()
            })
            .collect();
        (project, media)
    }; // SIGKILL
    let (ok, out) = inspectflow(&["check-db"], dir.path());
    assert!(ok, "a killed server leaves a consistent store: {out}");
    assert!(out.contains("3 records"), "{out}");

    // Damage it three ways: a lost image, a stray file, a half-written upload.
    let folder = dir.path().join("projects").join(&project).join("media");
    std::fs::remove_file(folder.join(format!("{}.png", media[0]))).expect("remove");
    std::fs::write(folder.join("stray.png"), b"x").expect("write");
    std::fs::write(folder.join(".upload.png.partial"), b"x").expect("write");
    let (ok, out) = inspectflow(&["check-db"], dir.path());
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("media {} lacks its file", media[0])),
        "{out}"
    );
    assert!(
        out.contains("orphan file (no record)") && out.contains("stray.png"),
        "{out}"
    );
    assert!(
        out.contains("half-written file") && out.contains(".upload.png.partial"),
        "{out}"
    );
    assert!(out.contains("3 problems"), "{out}");
}

/// A generated dataset's normal training images (PNG), `count` of them at `size` pixels.
fn normal_images(dir: &Path, count: usize, size: usize) -> Vec<std::path::PathBuf> {
    let out = dir.join("synth");
    inspectflow::synth::write_dataset(
        &out,
        &inspectflow::synth::SynthOptions {
            texture: inspectflow::synth::Texture::Carpet,
            size,
            train_normal: count,
            test_normal: 1,
            test_anomalous: 1,
            seed: 3,
            photo: None,
        },
    )
    .expect("dataset");
    let mut images: Vec<_> = std::fs::read_dir(out.join("train/normal"))
        .expect("train folder")
        .map(|e| e.expect("entry").path())
        .collect();
    images.sort();
    images
}

fn upload_all(http: &Client, server: &Server, project: &str, images: &[std::path::PathBuf]) {
    for image in images {
        let bytes = std::fs::read(image).expect("image");
        let (status, body) = call(
            http.post(server.url(&format!("/api/projects/{project}/media")))
                .multipart(upload_form(bytes, Some("normal"), None)),
        );
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
}

/// Images over a mebibyte are streamed from their file rather than read whole: the download is
/// still the upload, byte for byte, with its length declared.
#[test]
fn a_large_image_downloads_byte_for_byte_from_its_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(dir.path(), None);
    let http = client();
    let project = create_project(&http, &server, "large");
    // Noise does not compress: about 1.5 MB of PNG.
    let mut state = 0x2545_f491_u32;
    let noise = image::RgbImage::from_fn(800, 640, |_, _| {
        let mut channel = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        };
        image::Rgb([channel(), channel(), channel()])
    });
    let original = png_of(&noise);
    assert!(original.len() > 1 << 20, "{} bytes", original.len());
    let media_url = server.url(&format!("/api/projects/{project}/media"));
    let uploaded = http
        .post(&media_url)
        .multipart(upload_form(original.clone(), Some("normal"), None))
        .send()
        .expect("upload");
    assert_eq!(uploaded.status(), StatusCode::CREATED);
    let id = uploaded.json::<Value>().expect("json")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let download = http
        .get(format!("{media_url}/{id}/full"))
        .send()
        .expect("download");
    assert_eq!(download.status(), StatusCode::OK);
    assert_eq!(download.headers()["content-type"], "image/png");
    assert_eq!(
        download.headers()["content-length"],
        original.len().to_string().as_str()
    );
    assert!(
        download.bytes().expect("bytes").to_vec() == original,
        "byte for byte"
    );
}

fn create_project(http: &Client, server: &Server, name: &str) -> String {
    let (status, project) = call(
        http.post(server.url("/api/projects"))
            .json(&json!({"name": name})),
    );
    assert_eq!(status, StatusCode::CREATED, "{project}");
    project["id"].as_str().expect("id").to_string()
}

/// Reads a server-sent event stream to its end: (event, data) pairs.
fn events(url: &str) -> Vec<(String, String)> {
    let client = Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("client");
    let response = client.get(url).send().expect("stream");
    assert_eq!(response.status(), StatusCode::OK);
    let mut events = Vec::new();
    let mut event = String::new();
    for line in BufReader::new(response).lines() {
        let line = line.expect("line");
        if let Some(name) = line.strip_prefix("event:") {
            event = name.trim().to_string();
        } else if let Some(data) = line.strip_prefix("data:") {
            events.push((event.clone(), data.trim_start().to_string()));
        }
    }
    events
}

/// An H.264 MP4 of `frames` frames written by GStreamer.
fn mp4(path: &Path, frames: u32) {
    let status = Command::new("gst-launch-1.0")
        .arg("-q")
        .args(format!(
            "videotestsrc num-buffers={frames} pattern=ball ! video/x-raw,format=I420,width=320,height=240,framerate=30/1 \
             ! x264enc speed-preset=ultrafast ! mp4mux ! filesink location={}",
            path.display()
        ).split_whitespace())
        .status()
        .expect("gst-launch-1.0 runs");
    assert!(status.success(), "gst-launch-1.0 wrote {}", path.display());
}

/// Polls `url` until `done` holds for its JSON (at most 60 s).
fn poll(http: &Client, url: &str, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..600 {
        let (status, body) = call(http.get(url));
        assert_eq!(status, StatusCode::OK, "{body}");
        if done(&body) {
            return body;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{url} never reached the expected state");
}

/// Index lines a folder sink wrote.
/// Reads `count` parts of the MJPEG stream at `url`: each part's `X-Sequence` and its decoded
/// JPEG.
fn mjpeg_parts(url: &str, count: usize) -> Vec<(u64, image::RgbImage)> {
    use std::io::Read;
    let mut response = client().get(url).send().expect("the stream answers");
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"]
        .to_str()
        .expect("text")
        .to_string();
    let boundary = content_type
        .split("boundary=")
        .nth(1)
        .expect("a boundary")
        .to_string();
    let mut buffer = Vec::new();
    let mut parts = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    while parts.len() < count {
        let read = response.read(&mut chunk).expect("stream bytes");
        assert!(read > 0, "the stream ended after {} parts", parts.len());
        buffer.extend_from_slice(&chunk[..read]);
        // A complete part: headers, a blank line and Content-Length bytes.
        loop {
            let text = String::from_utf8_lossy(&buffer[..buffer.len().min(1024)]).into_owned();
            let Some(headers_end) = text.find("\r\n\r\n") else {
                break;
            };
            let headers = &text[..headers_end];
            assert!(headers.starts_with(&format!("--{boundary}")), "{headers}");
            let header = |name: &str| -> u64 {
                headers
                    .lines()
                    .find_map(|line| line.strip_prefix(name))
                    .and_then(|value| value.trim().parse().ok())
                    .unwrap_or_else(|| panic!("{name} in {headers}"))
            };
            let length = header("Content-Length:") as usize;
            let start = headers_end + 4;
            if buffer.len() < start + length + 2 {
                break;
            }
            let jpeg = image::load_from_memory(&buffer[start..start + length])
                .expect("each part is a JPEG")
                .to_rgb8();
            parts.push((header("X-Sequence:"), jpeg));
            buffer.drain(..start + length + 2);
        }
    }
    parts
}

fn index_lines(folder: &Path) -> Vec<Value> {
    let Ok(text) = std::fs::read_to_string(folder.join("results.jsonl")) else {
        return Vec::new();
    };
    text.lines()
        .map(|line| serde_json::from_str(line).expect("index line is JSON"))
        .collect()
}

#[test]
fn a_newcomer_trains_a_model_and_runs_it_on_a_video_into_a_folder() {
    let dir = tempfile::tempdir().expect("temp dir");
    let media_root = dir.path().join("line");
    std::fs::create_dir_all(&media_root).expect("root");
    let data = dir.path().join("data");
    let server = Server::start_with(&data, &["--path-root", media_root.to_str().expect("utf-8")]);
    let http = client();
    // Every answer below is checked against the OpenAPI document's schemas.
    let contract = Contract::of(&server, &http);

    // 1. A project with 20 normal images and two anomalous ones, only one with a mask.
    let project = create_project(&http, &server, "bottle caps");
    let images = normal_images(dir.path(), 20, 128);
    upload_all(&http, &server, &project, &images);
    let mut mask = image::GrayImage::new(128, 128);
    for (x, y, pixel) in mask.enumerate_pixels_mut() {
        pixel.0 = [if (40..60).contains(&x) && (40..60).contains(&y) {
            255
        } else {
            0
        }];
    }
    let mut mask_png = Vec::new();
    mask.write_to(
        &mut std::io::Cursor::new(&mut mask_png),
        image::ImageFormat::Png,
    )
    .expect("mask PNG");
    for (level, mask) in [(200, Some(mask_png)), (220, None)] {
        let (status, body) = contract.call(
            http.post(server.url(&format!("/api/projects/{project}/media")))
                .multipart(upload_form(png(128, 128, level), Some("anomalous"), mask)),
        );
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    // 2. Train, watching progress and logs as server-sent events.
    let (status, body) = contract.call(
        http.post(server.url(&format!("/api/projects/{project}/train")))
            .json(&json!({"model_name": "unknown"})),
    );
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        body["detail"]
            .as_str()
            .expect("detail")
            .starts_with("model_name"),
        "{body}"
    );
    let (status, body) = contract.call(
        http.post(server.url(&format!("/api/projects/{project}/train")))
            .json(&json!({"model_name": "patchcore", "input_size": 256, "tile": 256})),
    );
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .expect("detail")
            .contains("tile: 256 must be smaller than input_size 256"),
        "{body}"
    );
    for hostile in [
        json!({"model_name": "patchcore", "tile": 10}),
        json!({"model_name": "patchcore", "tile": 1_000_000_000_000u64}),
        json!({"model_name": "patchcore", "memory_bank": 0}),
        json!({"model_name": "patchcore", "input_size": 4096}),
        json!({"model_name": "patchcore", "tile": -64}),
    ] {
        let (status, body) = contract.call(
            http.post(server.url(&format!("/api/projects/{project}/train")))
                .json(&hostile),
        );
        assert!(
            status == StatusCode::UNPROCESSABLE_ENTITY || status == StatusCode::BAD_REQUEST,
            "{hostile}: {status} {body}"
        );
    }
    let (status, job) = contract.call(
        http.post(server.url(&format!("/api/projects/{project}/train")))
            .json(&json!({"model_name": "padim", "input_size": 64, "name": "caps v1"})),
    );
    assert_eq!(status, StatusCode::CREATED, "{job}");
    let job_id = job["id"].as_str().expect("job id").to_string();
    let progress = events(&server.url(&format!("/api/jobs/{job_id}/progress")));
    let updates: Vec<Value> = progress
        .iter()
        .map(|(event, data)| {
            assert_eq!(event, "progress");
            serde_json::from_str(data).expect("job JSON")
        })
        .collect();
    let last = updates.last().expect("at least one update");
    assert_eq!(last["status"], "completed", "{last}");
    assert_eq!(last["progress"], 100);
    let percents: Vec<u64> = updates
        .iter()
        .filter_map(|u| u["progress"].as_u64())
        .collect();
    assert!(
        percents.windows(2).all(|w| w[0] <= w[1]),
        "progress only grows: {percents:?}"
    );
    let stages: Vec<&str> = updates.iter().filter_map(|u| u["stage"].as_str()).collect();
    assert!(
        stages.contains(&"features") && stages.contains(&"calibration"),
        "{stages:?}"
    );
    let logs = events(&server.url(&format!("/api/jobs/{job_id}/logs")));
    let log_text: Vec<&str> = logs.iter().map(|(_, line)| line.as_str()).collect();
    assert!(
        log_text
            .iter()
            .any(|l| l.contains("dataset: 20 normal, 2 anomalous images (1 with a mask)")),
        "{log_text:?}"
    );
    assert!(
        log_text.iter().any(|l| l.contains("completed")),
        "{log_text:?}"
    );
    assert!(
        std::fs::read_to_string(data.join("logs/training.log"))
            .expect("training.log")
            .contains(&job_id)
    );
    let (status, done) =
        contract.call(http.post(server.url(&format!("/api/jobs/{job_id}:cancel"))));
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "an ended job cannot be canceled: {done}"
    );

    // 3. The model: listed, predicts, exports, takes a threshold.
    let (status, models) =
        contract.call(http.get(server.url(&format!("/api/projects/{project}/models"))));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(models["pagination"]["total"], 1, "{models}");
    let model = &models["models"][0];
    let model_id = model["id"].as_str().expect("model id").to_string();
    assert_eq!(model["id"], last["model_id"]);
    assert_eq!(
        (model["name"].as_str(), model["architecture"].as_str()),
        (Some("caps v1"), Some("padim"))
    );
    let image = std::fs::read(&images[0]).expect("image");
    let predict = |bytes: Vec<u8>| {
        contract.call(
            http.post(server.url(&format!(
                "/api/projects/{project}/models/{model_id}:predict"
            )))
            .multipart(reqwest::blocking::multipart::Form::new().part(
                "file",
                reqwest::blocking::multipart::Part::bytes(bytes).file_name("frame.png"),
            )),
        )
    };
    let (status, verdict) = predict(image.clone());
    assert_eq!(status, StatusCode::OK, "{verdict}");
    assert_eq!(
        verdict["label"], "Normal",
        "a training image is normal: {verdict}"
    );
    use base64::Engine;
    let map = base64::engine::general_purpose::STANDARD
        .decode(verdict["anomaly_map"].as_str().expect("map"))
        .expect("base64");
    let map = image::load_from_memory(&map).expect("the map is a PNG");
    assert_eq!((map.width(), map.height()), (128, 128));
    let (status, body) = predict(b"not an image".to_vec());
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    // Wider than a JPEG can be (the answer's overlay is one): refused, naming the size.
    let mut wide = Vec::new();
    image::GrayImage::new(70_000, 8)
        .write_to(
            &mut std::io::Cursor::new(&mut wide),
            image::ImageFormat::Png,
        )
        .expect("a PNG");
    let (status, body) = predict(wide);
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["detail"].as_str().expect("detail").contains("70000x8"),
        "{body}"
    );
    // A file of a few bytes whose header claims 1.2 GB of pixels is refused from its header,
    // before they are allocated.
    let bomb = png_claiming(20_000, 20_000);
    let (status, body) = predict(bomb);
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .expect("detail")
            .contains("20000x20000"),
        "{body}"
    );
    let (status, body) = contract.call(
        http.patch(server.url(&format!("/api/projects/{project}/models/{model_id}")))
            .json(&json!({"threshold": 0.0})),
    );
    assert_eq!(
        (status, body["threshold"].as_f64()),
        (StatusCode::OK, Some(0.0))
    );
    let (_, verdict) = predict(image);
    assert_eq!(
        verdict["label"], "Anomalous",
        "threshold 0 flags everything: {verdict}"
    );
    let (status, body) = contract.call(
        http.patch(server.url(&format!("/api/projects/{project}/models/{model_id}")))
            .json(&json!({"threshold": 1.5})),
    );
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    http.patch(server.url(&format!("/api/projects/{project}/models/{model_id}")))
        .json(&json!({"threshold": model["calibrated_threshold"]}))
        .send()
        .expect("threshold back");
    let zip = http
        .post(server.url(&format!("/api/projects/{project}/models/{model_id}:export")))
        .send()
        .expect("export");
    assert_eq!(zip.status(), StatusCode::OK);
    assert_eq!(zip.headers()["content-type"], "application/zip");
    let zip = zip.bytes().expect("zip bytes");
    assert_eq!(&zip[..2], b"PK");
    let zip_text = String::from_utf8_lossy(&zip);
    for member in ["manifest.json", "model.xml", "model.bin"] {
        assert!(zip_text.contains(member), "the zip holds {member}");
    }

    // The dataset snapshot it was trained on.
    let snapshot_id = model["dataset_snapshot_id"].as_str().expect("snapshot id");
    let (status, snapshot) =
        contract.call(http.get(server.url(&format!("/api/snapshots/{snapshot_id}"))));
    assert_eq!(status, StatusCode::OK, "{snapshot}");
    assert_eq!(
        (
            snapshot["count"].as_u64(),
            snapshot["anomalous"].as_u64(),
            snapshot["masks"].as_u64()
        ),
        (Some(22), Some(2), Some(1))
    );
    let parquet = http
        .get(server.url(&format!("/api/snapshots/{snapshot_id}/download")))
        .send()
        .expect("download")
        .bytes()
        .expect("bytes");
    assert_eq!(&parquet[..4], b"PAR1");
    let (_, snapshots) = contract.call(http.get(server.url("/api/snapshots")));
    assert_eq!(snapshots["pagination"]["total"], 1);

    // 4. A video file source and a folder sink, assembled into a pipeline.
    let video = media_root.join("line1.mp4");
    mp4(&video, 45);
    let (status, body) = contract.call(http.post(server.url("/api/sources")).json(&json!({
        "name": "outside", "type": "video_file", "config": {"path": "/etc/hostname"}
    })));
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        body["detail"]
            .as_str()
            .expect("detail")
            .contains("path roots"),
        "{body}"
    );
    let (status, body) = contract.call(http.post(server.url("/api/sources")).json(&json!({
        "name": "missing", "type": "video_file", "config": {"path": media_root.join("nope.mp4")}
    })));
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        body["detail"]
            .as_str()
            .expect("detail")
            .starts_with("config.path"),
        "{body}"
    );
    let (status, body) = contract.call(http.post(server.url("/api/sources")).json(&json!({
        "name": "typo", "type": "video_file", "config": {"path": video, "lop": true}
    })));
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        body["detail"].as_str().expect("detail").contains("lop"),
        "{body}"
    );
    let (status, source) = contract.call(http.post(server.url("/api/sources")).json(&json!({
        "name": "line 1", "type": "video_file", "config": {"path": video, "loop": true}
    })));
    assert_eq!(status, StatusCode::CREATED, "{source}");
    let source_id = source["id"].as_str().expect("id").to_string();
    let results = media_root.join("results");
    let (status, sink) = contract.call(http.post(server.url("/api/sinks")).json(&json!({
        "name": "results", "type": "folder",
        "config": {"path": results, "create": true, "output_formats": ["predictions", "image_with_predictions"]}
    })));
    assert_eq!(status, StatusCode::CREATED, "{sink}");
    let sink_id = sink["id"].as_str().expect("id").to_string();
    let (status, pipeline) = contract.call(
        http.post(server.url(&format!("/api/projects/{project}/pipelines"))).json(&json!({
            "name": "line 1 inspection", "source_id": source_id, "model_id": model_id, "sink_ids": [sink_id]
        })),
    );
    assert_eq!(status, StatusCode::CREATED, "{pipeline}");
    assert_eq!(pipeline["status"], "idle");
    let pipeline_id = pipeline["id"].as_str().expect("id").to_string();

    // 5. Start it, see results and metrics while it runs, stop it.
    let (status, started) = contract.call(
        http.post(server.url("/api/active-pipelines"))
            .json(&json!({"pipeline_id": pipeline_id})),
    );
    assert_eq!(status, StatusCode::CREATED, "{started}");
    let (status, _) = contract.call(
        http.post(server.url("/api/active-pipelines"))
            .json(&json!({"pipeline_id": pipeline_id})),
    );
    assert_eq!(status, StatusCode::CONFLICT, "it already runs");
    let running = poll(
        &http,
        &server.url(&format!("/api/active-pipelines/{pipeline_id}")),
        |body| {
            body["metrics"]["nodes"]
                .as_array()
                .and_then(|nodes| nodes.iter().find(|n| n["id"] == "sink1"))
                .and_then(|sink| sink["packets_in"].as_u64())
                .is_some_and(|n| n >= 60)
        },
    );
    assert_eq!(running["status"], "running", "the source loops: {running}");

    // The live view: MJPEG of the overlay and of the raw frame, frame-rate capped per client.
    let stream_url = server.url(&format!("/api/active-pipelines/{pipeline_id}/stream"));
    let overlay = mjpeg_parts(&format!("{stream_url}?fps=30"), 20);
    let raw = mjpeg_parts(&format!("{stream_url}?view=raw&fps=30"), 3);
    let sequences: Vec<u64> = overlay.iter().map(|(sequence, _)| *sequence).collect();
    assert!(
        sequences.windows(2).all(|w| w[0] < w[1]),
        "newest frames, in order: {sequences:?}"
    );
    let (_, first_overlay) = &overlay[0];
    let (_, first_raw) = &raw[0];
    assert_eq!(
        first_overlay.dimensions(),
        first_raw.dimensions(),
        "both views at the frame's size"
    );
    let (status, body) = contract.call(http.get(format!("{stream_url}?fps=0")));
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, _) = contract.call(
        http.get(server.url("/api/active-pipelines/00000000-0000-0000-0000-000000000000/stream")),
    );
    assert_eq!(status, StatusCode::NOT_FOUND);
    let model_node = running["metrics"]["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["id"] == "model")
        .expect("model node");
    assert!(
        model_node["fps"].as_f64().expect("fps") > 0.0,
        "{model_node}"
    );
    assert!(
        model_node["latency_ms"]["p50"].as_f64().is_some(),
        "{model_node}"
    );
    let (status, body) = contract.call(
        http.put(server.url(&format!("/api/sources/{source_id}")))
            .json(&json!({
                "name": "line 1", "type": "video_file", "config": {"path": video}
            })),
    );
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a running pipeline's source is locked: {body}"
    );
    let (status, _) = contract
        .call(http.delete(server.url(&format!("/api/projects/{project}/models/{model_id}"))));
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a running pipeline's model is locked"
    );
    let (status, prometheus) = contract.call(http.get(server.url("/metrics")));
    assert_eq!(status, StatusCode::OK);
    let prometheus = prometheus.as_str().expect("text");
    assert!(
        prometheus.contains(&format!("pipeline=\"{pipeline_id}\"")),
        "{prometheus}"
    );
    assert!(
        prometheus.contains("inspectflow_jobs{status=\"completed\"} 1"),
        "{prometheus}"
    );
    let (status, stopped) =
        contract.call(http.delete(server.url(&format!("/api/active-pipelines/{pipeline_id}"))));
    assert_eq!(status, StatusCode::OK, "{stopped}");
    assert_eq!(stopped["status"], "stopped");
    let delivered = stopped["metrics"]["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["id"] == "sink1")
        .and_then(|n| n["packets_in"].as_u64())
        .expect("sink count");
    let written = index_lines(&results);
    assert_eq!(
        written.len() as u64,
        delivered,
        "every result the sink took is on disk"
    );
    assert!(written.len() >= 60);
    for line in &written {
        assert_eq!(line["pipeline"], pipeline_id.as_str());
        assert_eq!(line["prediction"]["model"], model_id.as_str());
        let file = line["images"]["with_predictions"]["file"]
            .as_str()
            .expect("image file");
        assert!(results.join(file).is_file(), "{file}");
    }
    let sequences: Vec<u64> = written
        .iter()
        .filter_map(|l| l["sequence"].as_u64())
        .collect();
    assert!(
        sequences.windows(2).all(|w| w[0] < w[1]),
        "in order, each once"
    );
    let app_log = std::fs::read_to_string(data.join("logs/app.log")).expect("app.log");
    let inference_log =
        std::fs::read_to_string(data.join("logs/inference.log")).expect("inference.log");
    assert!(inference_log.contains(&pipeline_id), "{inference_log}");
    assert!(app_log.contains(&pipeline_id), "{app_log}");
    assert!(data.join("logs/dispatching.log").is_file());
    let (_, listed) = contract
        .call(http.get(server.url(&format!("/api/projects/{project}/pipelines/{pipeline_id}"))));
    assert_eq!(listed["status"], "idle");
    let (status, _) = contract.call(
        http.put(server.url(&format!("/api/sources/{source_id}")))
            .json(&json!({
                "name": "line 1", "type": "video_file", "config": {"path": video}
            })),
    );
    assert_eq!(status, StatusCode::OK, "stopped: the source may change");
    let routes: std::collections::BTreeSet<(String, String)> = contract
        .checked
        .borrow()
        .iter()
        .map(|(method, template, _)| (method.clone(), template.clone()))
        .collect();
    assert!(
        routes.len() >= 15,
        "the session's answers were checked on {} routes: {routes:?}",
        routes.len()
    );
}

/// While a stop drains a pipeline (up to 10 s), the pipeline still writes and uses what it
/// names: its record and its project cannot be deleted until it has been joined.
#[test]
fn a_pipeline_that_is_draining_after_a_stop_still_holds_its_record_and_project() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&dir.path().join("data"), None);
    let http = client();
    let project = create_project(&http, &server, "draining");
    let pipelines_url = server.url(&format!("/api/projects/{project}/pipelines"));
    let (status, pipeline) = call(http.post(&pipelines_url).json(&json!({
        "name": "slow",
        "graph": {"name": "slow", "nodes": [
            {"id": "camera", "op": "source.synthetic",
             "params": {"width": 32, "height": 32, "fps": 100, "realtime": true}},
            {"id": "slow", "op": "identity", "params": {"sleep_ms": 150}},
            {"id": "out", "op": "sink.null"}
        ], "edges": [
            {"from": "camera", "to": "slow", "queue": {"capacity": 16, "policy": "block"}},
            {"from": "slow", "to": "out"}
        ]}
    })));
    assert_eq!(status, StatusCode::CREATED, "{pipeline}");
    let pipeline_id = pipeline["id"].as_str().expect("id").to_string();
    let (status, started) = call(
        http.post(server.url("/api/active-pipelines"))
            .json(&json!({"pipeline_id": pipeline_id})),
    );
    assert_eq!(status, StatusCode::CREATED, "{started}");
    // The queue fills (16 packets: 2.4 s of draining at 150 ms each).
    std::thread::sleep(Duration::from_millis(500));
    let stop_url = server.url(&format!("/api/active-pipelines/{pipeline_id}"));
    let stopper = std::thread::spawn(move || call(client().delete(stop_url)));
    std::thread::sleep(Duration::from_millis(300));
    let (status, body) = call(http.delete(format!("{pipelines_url}/{pipeline_id}")));
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = call(http.delete(server.url(&format!("/api/projects/{project}"))));
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, stopped) = stopper.join().expect("the stop returns");
    assert_eq!(status, StatusCode::OK, "{stopped}");
    let (status, body) = call(http.delete(format!("{pipelines_url}/{pipeline_id}")));
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
}

#[test]
fn two_pipelines_run_at_once_each_with_its_own_metrics_and_graph_errors_name_node_and_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let server = Server::start(&data, None);
    let http = client();
    let project = create_project(&http, &server, "two lines");
    let pipelines_url = server.url(&format!("/api/projects/{project}/pipelines"));

    // A graph with two mistakes: both are reported, each with its node and field.
    let (status, body) = call(http.post(&pipelines_url).json(&json!({
        "name": "broken",
        "graph": "name: broken\nnodes:\n  - id: camera\n    op: source.synthetic\n    params: {width: -4, height: 48}\n  - id: out\n    op: sink.nul\nedges:\n  - {from: camera, to: out}\n"
    })));
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let errors = body["errors"].as_array().expect("errors");
    assert!(
        errors
            .iter()
            .any(|e| e["node"] == "camera" && e["field"] == "params.width" && e["line"].is_u64()),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e["node"] == "out" && e["field"] == "op"),
        "{errors:?}"
    );

    // A path outside the roots is refused with its node and field.
    let (status, body) = call(http.post(&pipelines_url).json(&json!({
        "name": "escape",
        "graph": {"name": "escape", "nodes": [
            {"id": "camera", "op": "source.synthetic", "params": {"width": 32, "height": 32}},
            {"id": "out", "op": "sink.folder", "params": {"path": "/tmp/elsewhere", "create": true}}
        ], "edges": [{"from": "camera", "to": "out"}]}
    })));
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .expect("detail")
            .contains("node 'out': field 'params.path'"),
        "{body}"
    );

    // The server's own data directory is not a place to write: not its database (an index
    // appended to it would corrupt it), not a project's media, not a model package.
    let store_database = std::fs::read(data.join("inspectflow.redb")).expect("the database");
    for (path, index_file) in [
        (data.clone(), "inspectflow.redb"),
        (data.join("projects").join(&project), "results.jsonl"),
        (data.join("models"), "results.jsonl"),
    ] {
        let (status, body) = call(http.post(&pipelines_url).json(&json!({
            "name": "into the store",
            "graph": {"name": "store", "nodes": [
                {"id": "camera", "op": "source.synthetic", "params": {"width": 32, "height": 32}},
                {"id": "out", "op": "sink.folder", "params": {"path": path, "index_file": index_file}}
            ], "edges": [{"from": "camera", "to": "out"}]}
        })));
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let detail = body["detail"].as_str().expect("detail");
        assert!(
            detail.contains("node 'out': field 'params.path'")
                && detail.contains("only read model packages"),
            "{body}"
        );
        let (status, body) = call(http.post(server.url("/api/sinks")).json(&json!({
            "name": "into the store", "type": "folder", "config": {"path": path}
        })));
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    }
    assert_eq!(
        std::fs::read(data.join("inspectflow.redb"))
            .expect("the database")
            .len(),
        store_database.len()
    );
    // A setting that trips a document limit is refused, not stored unchecked.
    let mut deep = json!(1);
    for _ in 0..80 {
        deep = json!([deep]);
    }
    let (status, body) = call(http.post(server.url("/api/sinks")).json(&json!({
        "name": "deep", "type": "webhook", "config": {"url": "gopher://x", "junk": deep}
    })));
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

    // Two endless synthetic cameras at different sizes, one as YAML and one as JSON.
    let yaml = "name: first\nnodes:\n  - id: camera\n    op: source.synthetic\n    params: {width: 64, height: 48, fps: 200, realtime: true}\n  - id: out\n    op: sink.null\nedges:\n  - {from: camera, to: out}\n";
    let (status, first) = call(
        http.post(&pipelines_url)
            .json(&json!({"name": "first", "graph": yaml})),
    );
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let (status, second) = call(http.post(&pipelines_url).json(&json!({"name": "second", "graph": {
        "name": "second",
        "nodes": [
            {"id": "camera", "op": "source.synthetic", "params": {"width": 32, "height": 32, "fps": 100, "realtime": true, "format": "bgr"}},
            {"id": "out", "op": "sink.null"}
        ],
        "edges": [{"from": "camera", "to": "out"}]
    }})));
    assert_eq!(status, StatusCode::CREATED, "{second}");
    let ids: Vec<String> = [&first, &second]
        .iter()
        .map(|p| p["id"].as_str().expect("id").to_string())
        .collect();
    for id in &ids {
        let (status, body) = call(
            http.post(server.url("/api/active-pipelines"))
                .json(&json!({"pipeline_id": id})),
        );
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    for id in &ids {
        let body = poll(
            &http,
            &server.url(&format!("/api/active-pipelines/{id}")),
            |body| {
                body["metrics"]["nodes"][1]["packets_in"]
                    .as_u64()
                    .is_some_and(|n| n >= 20)
            },
        );
        assert_eq!(body["status"], "running");
        assert_eq!(body["metrics"]["pipeline"], id.as_str(), "its own metrics");
    }
    let (_, active) = call(http.get(server.url("/api/active-pipelines")));
    assert_eq!(
        active["active_pipelines"].as_array().expect("list").len(),
        2
    );
    captures_save_the_frame_a_pipeline_sees_now(&http, &server, &project, &ids);
    the_control_plane_runs_below_the_pipelines_priority(&server);
    let (status, body) = call(
        http.put(format!("{pipelines_url}/{}", ids[0]))
            .json(&json!({"name": "first", "graph": yaml})),
    );
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a running pipeline cannot change: {body}"
    );
    let (_, prometheus) = call(http.get(server.url("/metrics")));
    let prometheus = prometheus.as_str().expect("text");
    for id in &ids {
        assert!(
            prometheus.contains(&format!("pipeline=\"{id}\"")),
            "{prometheus}"
        );
    }
    assert_eq!(
        prometheus
            .matches("# TYPE inspectflow_packets_in_total")
            .count(),
        1,
        "one header per family"
    );
    let (status, body) = call(http.delete(server.url(&format!("/api/projects/{project}"))));
    assert_eq!(status, StatusCode::CONFLICT, "pipelines run: {body}");
    let (status, stopped) =
        call(http.delete(server.url(&format!("/api/active-pipelines/{}", ids[0]))));
    assert_eq!(
        (status, stopped["status"].as_str()),
        (StatusCode::OK, Some("stopped"))
    );
    let (status, body) = call(
        http.post(server.url("/api/captures"))
            .json(&json!({"pipeline_id": ids[0]})),
    );
    assert_eq!(status, StatusCode::CONFLICT, "a stopped pipeline: {body}");
    let body = poll(
        &http,
        &server.url(&format!("/api/active-pipelines/{}", ids[1])),
        |body| body["status"] == "running",
    );
    assert_eq!(
        body["metrics"]["pipeline"],
        ids[1].as_str(),
        "the other one runs on"
    );
    let (status, _) = call(http.delete(server.url(&format!("/api/active-pipelines/{}", ids[1]))));
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(http.get(server.url(&format!("/api/active-pipelines/{}", ids[1]))));
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// The server's threads by name (`comm`) with their nice values, from `/proc`.
fn threads_and_nice_values(pid: u32) -> Vec<(String, i64)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc tasks") {
        let task = task.expect("task").path();
        let (Ok(name), Ok(stat)) = (
            std::fs::read_to_string(task.join("comm")),
            std::fs::read_to_string(task.join("stat")),
        ) else {
            continue; // the thread ended meanwhile
        };
        // Fields after the parenthesised name: state is field 3, nice is field 19.
        let after_name = &stat[stat.rfind(')').expect("stat") + 2..];
        let nice: i64 = after_name
            .split_whitespace()
            .nth(16)
            .expect("nice field")
            .parse()
            .expect("a number");
        threads.push((name.trim().to_string(), nice));
    }
    threads
}

/// While pipelines run: their node threads (`if-<node>`) keep normal priority, and the API's
/// runtime threads run at nice 10.
fn the_control_plane_runs_below_the_pipelines_priority(server: &Server) {
    let threads = threads_and_nice_values(server.child.id());
    let nodes: Vec<&(String, i64)> = threads
        .iter()
        .filter(|(name, _)| name == "if-camera" || name == "if-out")
        .collect();
    assert_eq!(nodes.len(), 4, "two pipelines of two nodes: {threads:?}");
    assert!(nodes.iter().all(|(_, nice)| *nice == 0), "{threads:?}");
    let runtime: Vec<&(String, i64)> = threads
        .iter()
        .filter(|(name, _)| name.starts_with("tokio-"))
        .collect();
    assert!(!runtime.is_empty(), "{threads:?}");
    assert!(runtime.iter().all(|(_, nice)| *nice == 10), "{threads:?}");
}

/// Captures from the running pipelines of the two-pipelines test: the second one's synthetic
/// camera draws BGR colour bars with a square whose place follows the frame's sequence, so the
/// saved image must be exactly the frame the capture names.
fn captures_save_the_frame_a_pipeline_sees_now(
    http: &Client,
    server: &Server,
    project: &str,
    ids: &[String],
) {
    let captures_url = server.url("/api/captures");
    let (status, captured) = call(http.post(&captures_url).json(&json!({
        "pipeline_id": ids[1], "label": "anomalous", "source_node": "camera"
    })));
    assert_eq!(status, StatusCode::CREATED, "{captured}");
    assert_eq!(captured["project_id"], project);
    assert_eq!(
        (&captured["label"], &captured["format"]),
        (&json!("anomalous"), &json!("png"))
    );
    assert_eq!(
        (&captured["width"], &captured["height"]),
        (&json!(32), &json!(32))
    );
    assert_eq!(captured["capture"]["pipeline_id"], ids[1].as_str());
    assert_eq!(captured["capture"]["source_node"], "camera");
    let sequence = captured["capture"]["sequence"].as_u64().expect("sequence");
    let media_id = captured["id"].as_str().expect("id");
    let file = http
        .get(server.url(&format!("/api/projects/{project}/media/{media_id}/full")))
        .send()
        .expect("download");
    let image = image::load_from_memory(&file.bytes().expect("bytes"))
        .expect("a PNG")
        .to_rgb8();
    const BARS: [[u8; 3]; 8] = [
        [255, 255, 255],
        [255, 255, 0],
        [0, 255, 255],
        [0, 255, 0],
        [255, 0, 255],
        [255, 0, 0],
        [0, 0, 255],
        [0, 0, 0],
    ];
    // A 32x32 frame: bars 4 pixels wide, a 4-pixel square moved 4 pixels a frame along 29
    // places.
    let corner = (sequence * 4 % 29) as u32;
    for (x, y, pixel) in image.enumerate_pixels() {
        let in_square = (corner..corner + 4).contains(&x) && (corner..corner + 4).contains(&y);
        let expected = if in_square {
            [128, 128, 128]
        } else {
            BARS[x as usize / 4]
        };
        assert_eq!(pixel.0, expected, "pixel ({x}, {y}) of frame {sequence}");
    }

    // The first pipeline's frame by default, labelled normal.
    let (status, normal) = call(
        http.post(&captures_url)
            .json(&json!({"pipeline_id": ids[0]})),
    );
    assert_eq!(status, StatusCode::CREATED, "{normal}");
    assert_eq!(
        (&normal["label"], &normal["width"]),
        (&json!("normal"), &json!(64))
    );

    let (status, body) = call(http.post(&captures_url).json(&json!({
        "pipeline_id": ids[1], "source_node": "out"
    })));
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .expect("detail")
            .contains("source_node: 'out'"),
        "{body}"
    );
    let (status, body) = call(http.post(&captures_url).json(&json!({
        "pipeline_id": ids[1], "label": "great"
    })));
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, body) = call(http.post(&captures_url).json(&json!({
        "pipeline_id": "00000000-0000-0000-0000-000000000000"
    })));
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

    let (status, listed) = call(http.get(format!(
        "{captures_url}?project_id={project}&limit=1&offset=1"
    )));
    assert_eq!(status, StatusCode::OK, "{listed}");
    assert_eq!(listed["pagination"]["total"], 2, "{listed}");
    assert_eq!(listed["captures"][0]["id"], normal["id"], "oldest first");
    let (_, media) = call(http.get(server.url(&format!("/api/projects/{project}/media"))));
    assert_eq!(
        media["media"].as_array().expect("media").len(),
        2,
        "captures are media"
    );
}

/// Three pipelines of `project`: an endless one left running, one started and stopped, and one
/// whose source ended by itself. Their ids, in that order.
fn pipelines_running_stopped_and_finished(
    http: &Client,
    server: &Server,
    project: &str,
) -> [String; 3] {
    let ids = [("running", "realtime: true"), ("stopped", "realtime: true"), ("finished", "frames: 5")]
        .map(|(name, params)| {
            let graph = format!(
                "name: {name}\nnodes:\n  - id: camera\n    op: source.synthetic\n    params: {{width: 32, height: 32, fps: 50, {params}}}\n  - id: out\n    op: sink.null\nedges:\n  - {{from: camera, to: out}}\n"
            );
            let (status, created) = call(
                http.post(server.url(&format!("/api/projects/{project}/pipelines")))
                    .json(&json!({"name": name, "graph": graph})),
            );
            assert_eq!(status, StatusCode::CREATED, "{created}");
            let id = created["id"].as_str().expect("id").to_string();
            let (status, started) = call(
                http.post(server.url("/api/active-pipelines"))
                    .json(&json!({"pipeline_id": id})),
            );
            assert_eq!(status, StatusCode::CREATED, "{started}");
            id
        });
    let (status, _) = call(http.delete(server.url(&format!("/api/active-pipelines/{}", ids[1]))));
    assert_eq!(status, StatusCode::OK);
    for (id, keep_running) in [(&ids[0], true), (&ids[1], false), (&ids[2], false)] {
        poll(
            http,
            &server.url(&format!("/api/projects/{project}/pipelines/{id}")),
            |record| record["keep_running"] == keep_running,
        );
    }
    ids
}

#[test]
fn a_server_killed_during_uploads_and_training_restarts_consistent() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let images = normal_images(dir.path(), 24, 128);
    let http = client();
    let (project, job_id, pipelines) = {
        let server = Server::start(&data, None);
        let project = create_project(&http, &server, "killed");
        let pipelines = pipelines_running_stopped_and_finished(&http, &server, &project);
        upload_all(&http, &server, &project, &images[..12]);
        let (status, job) = call(
            http.post(server.url(&format!("/api/projects/{project}/train")))
                .json(&json!({"model_name": "padim", "input_size": 64})),
        );
        assert_eq!(status, StatusCode::CREATED, "{job}");
        let job_id = job["id"].as_str().expect("job id").to_string();
        poll(&http, &server.url(&format!("/api/jobs/{job_id}")), |job| {
            job["status"] == "running"
        });
        // Uploads go on while training runs; the kill lands in the middle of them.
        let uploader = {
            let base = server.base.clone();
            let project = project.clone();
            let images = images[12..].to_vec();
            std::thread::spawn(move || {
                let http = client();
                for image in images {
                    let bytes = std::fs::read(image).expect("image");
                    let sent = http
                        .post(format!("{base}/api/projects/{project}/media"))
                        .multipart(upload_form(bytes, Some("normal"), None))
                        .send();
                    if sent.is_err() {
                        break;
                    }
                }
            })
        };
        std::thread::sleep(Duration::from_millis(150));
        drop(server); // SIGKILL
        uploader.join().expect("uploader");
        (project, job_id, pipelines)
    };

    // What an upload killed between placing its files and committing its record leaves: a
    // file no record points to. The restart removes it.
    let uncommitted = data.join(format!("projects/{project}/media/uncommitted.png"));
    std::fs::create_dir_all(uncommitted.parent().expect("media folder")).expect("media folder");
    std::fs::write(&uncommitted, png(8, 8, 40)).expect("planted file");
    let server = Server::start(&data, None);
    assert!(
        !uncommitted.exists(),
        "an uncommitted upload's file is removed"
    );
    // The pipeline that was running runs again; the stopped and the finished ones do not.
    let [running, stopped, finished] = &pipelines;
    let (status, active) = call(http.get(server.url(&format!("/api/active-pipelines/{running}"))));
    assert_eq!(
        (status, &active["status"]),
        (StatusCode::OK, &json!("running")),
        "{active}"
    );
    for id in [stopped, finished] {
        let (status, body) = call(http.get(server.url(&format!("/api/active-pipelines/{id}"))));
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    }
    let (status, _) = call(http.delete(server.url(&format!("/api/active-pipelines/{running}"))));
    assert_eq!(status, StatusCode::OK);
    let (_, record) =
        call(http.get(server.url(&format!("/api/projects/{project}/pipelines/{running}"))));
    assert_eq!(record["keep_running"], false, "stopped by a user: {record}");
    let (_, job) = call(http.get(server.url(&format!("/api/jobs/{job_id}"))));
    assert_eq!(job["status"], "failed", "{job}");
    assert!(
        job["message"]
            .as_str()
            .expect("message")
            .contains("interrupted"),
        "{job}"
    );
    let (_, models) = call(http.get(server.url(&format!("/api/projects/{project}/models"))));
    assert_eq!(
        models["pagination"]["total"], 0,
        "a failed job registers no model"
    );
    let (_, media) =
        call(http.get(server.url(&format!("/api/projects/{project}/media?limit=100"))));
    let listed = media["media"].as_array().expect("media");
    assert!(listed.len() >= 12, "{} listed", listed.len());
    for item in listed {
        let id = item["id"].as_str().expect("id");
        let file = http
            .get(server.url(&format!("/api/projects/{project}/media/{id}/full")))
            .send()
            .expect("download");
        assert_eq!(file.status(), StatusCode::OK);
        image::load_from_memory(&file.bytes().expect("bytes"))
            .expect("every listed image is whole");
    }
    drop(server);
    let (clean, report) = inspectflow(&["check-db"], &data);
    assert!(clean, "check-db after the restart: {report}");
    assert!(
        !walk(&data).iter().any(|f| f.contains(".partial")),
        "{:?}",
        walk(&data)
    );
}

#[test]
fn jobs_queue_one_at_a_time_and_cancel_while_pending_or_running_registers_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let server = Server::start_with(&data, &["--max-jobs", "1"]);
    let http = client();
    let project = create_project(&http, &server, "queue");
    let (status, body) = call(
        http.post(server.url(&format!("/api/projects/{project}/train")))
            .json(&json!({"model_name": "padim", "input_size": 64})),
    );
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "no images yet: {body}"
    );
    assert!(
        body["detail"]
            .as_str()
            .expect("detail")
            .contains("at least 3"),
        "{body}"
    );
    upload_all(
        &http,
        &server,
        &project,
        &normal_images(dir.path(), 12, 128),
    );
    let submit = || {
        let (status, job) = call(
            http.post(server.url(&format!("/api/projects/{project}/train")))
                // A large input makes the first job last long enough to cancel it mid-run.
                .json(&json!({"model_name": "padim", "input_size": 512})),
        );
        assert_eq!(status, StatusCode::CREATED, "{job}");
        job["id"].as_str().expect("id").to_string()
    };
    let first = submit();
    let second = submit();
    poll(&http, &server.url(&format!("/api/jobs/{first}")), |job| {
        job["status"] == "running"
    });
    let (_, waiting) = call(http.get(server.url(&format!("/api/jobs/{second}"))));
    assert_eq!(waiting["status"], "pending", "one job at a time: {waiting}");

    let (status, canceled) = call(http.post(server.url(&format!("/api/jobs/{second}:cancel"))));
    assert_eq!(
        (status, canceled["status"].as_str()),
        (StatusCode::OK, Some("canceled")),
        "{canceled}"
    );
    let (status, canceled) = call(http.post(server.url(&format!("/api/jobs/{first}:cancel"))));
    assert_eq!(
        (status, canceled["status"].as_str()),
        (StatusCode::OK, Some("canceled")),
        "{canceled}"
    );
    assert!(canceled["end_time"].is_string());
    assert_eq!(
        canceled["completed_at"], canceled["end_time"],
        "the seed's name"
    );
    assert_eq!(
        canceled["error_message"],
        Value::Null,
        "canceled is not failed"
    );

    // The worker is free again: the next job runs to the end.
    let (status, third) = call(
        http.post(server.url(&format!("/api/projects/{project}/train")))
            .json(&json!({"model_name": "patchcore", "input_size": 64, "memory_bank": 64})),
    );
    assert_eq!(status, StatusCode::CREATED, "{third}");
    let third = third["id"].as_str().expect("id").to_string();
    let done = poll(&http, &server.url(&format!("/api/jobs/{third}")), |job| {
        job["status"] != "pending" && job["status"] != "running"
    });
    assert_eq!(done["status"], "completed", "{done}");
    let (_, models) = call(http.get(server.url(&format!("/api/projects/{project}/models"))));
    assert_eq!(
        models["pagination"]["total"], 1,
        "canceled jobs register nothing: {models}"
    );
    assert_eq!(models["models"][0]["architecture"], "patchcore");
    let (_, jobs) = call(http.get(server.url(&format!("/api/jobs?project_id={project}"))));
    let statuses: Vec<&str> = jobs["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter_map(|j| j["status"].as_str())
        .collect();
    assert_eq!(statuses, ["canceled", "canceled", "completed"]);
    let (status, page) =
        call(http.get(server.url(&format!("/api/jobs?project_id={project}&limit=1&offset=2"))));
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["jobs"][0]["status"], "completed", "{page}");
    assert_eq!(page["pagination"]["total"], 3, "{page}");
    let models_dir: Vec<String> = std::fs::read_dir(data.join("models"))
        .expect("models folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        models_dir,
        [models["models"][0]["id"].as_str().expect("id")],
        "no leftovers"
    );
}

/// The API refuses what `inspectflow validate` refuses: operator rules that need code (a
/// heatmap's alpha, a backoff out of order) in a graph document and in a stored sink, each
/// naming the node or the config field, before anything starts.
#[test]
fn operator_rules_are_refused_by_the_api_naming_node_and_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&dir.path().join("data"), None);
    let http = client();
    let project = create_project(&http, &server, "rules");
    let (status, body) = call(
        http.post(server.url(&format!("/api/projects/{project}/pipelines")))
            .json(&json!({"name": "rules", "graph": {"name": "rules", "nodes": [
                {"id": "camera", "op": "source.synthetic", "params": {"width": 32, "height": 32}},
                {"id": "overlay", "op": "heatmap", "params": {"alpha": 1.5}},
                {"id": "hook", "op": "sink.webhook", "params": {
                    "url": "http://127.0.0.1:9/hook", "initial_backoff_ms": 5000, "max_backoff_ms": 100
                }},
                {"id": "out", "op": "sink.null"}
            ], "edges": [
                {"from": "camera", "to": "hook"},
                {"from": "camera", "to": "out"},
                {"from": "overlay", "to": "out"}
            ]}})),
    );
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let errors = body["errors"].as_array().expect("errors");
    for (node, field) in [
        ("overlay", "params.alpha"),
        ("hook", "params.max_backoff_ms"),
    ] {
        assert!(
            errors
                .iter()
                .any(|e| e["node"] == node && e["field"] == field),
            "{node} {field}: {errors:?}"
        );
    }

    let (status, body) = call(http.post(server.url("/api/sinks")).json(&json!({
        "name": "hook", "type": "webhook",
        "config": {"url": "http://127.0.0.1:9/hook", "initial_backoff_ms": 5000, "max_backoff_ms": 100}
    })));
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let detail = body["detail"].as_str().expect("detail");
    assert!(
        detail.starts_with("config.max_backoff_ms: must not be below initial_backoff_ms"),
        "{detail}"
    );
    let (status, body) = call(http.post(server.url("/api/sinks")).json(&json!({
        "name": "hook", "type": "webhook", "config": {"url": "http://127.0.0.1:9/hook"}
    })));
    assert_eq!(
        status,
        StatusCode::CREATED,
        "the defaults are in order: {body}"
    );
}

/// Runs `tests/browser/live.mjs` (Debian's headless chromium through playwright-core) on the live
/// view page of `pipeline` and returns what the page reported.
fn browser(server: &Server, pipeline: &str, args: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/live.mjs");
    let output = Command::new("node")
        .arg(script)
        .arg(&server.base)
        .arg(pipeline)
        .args(args)
        .output()
        .expect("node runs (scripts/setup.sh installs it and playwright-core)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| {
            panic!(
                "live.mjs {args:?}: {stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    assert_eq!(report["ok"], true, "live.mjs {args:?}: {report}");
    report
}

/// Threads and resident memory of a process.
#[derive(Debug, Clone, Copy)]
struct Usage {
    threads: u64,
    rss_kib: u64,
}

/// The server's threads and memory once they have settled: read every half second until the
/// thread count is back to `baseline`'s (connections close and pools shrink in the background)
/// or 15 s have passed.
fn settled_usage(server: &Server, baseline: Option<Usage>) -> Usage {
    let read = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id()))
            .expect("the server's /proc status");
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|value| value.parse().ok())
                .unwrap_or_else(|| panic!("{name} in /proc status"))
        };
        Usage {
            threads: field("Threads:"),
            rss_kib: field("VmRSS:"),
        }
    };
    std::thread::sleep(Duration::from_secs(2));
    let mut usage = read();
    for _ in 0..30 {
        if baseline.is_none_or(|b| usage.threads <= b.threads) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
        usage = read();
    }
    usage
}

/// Mean of (blue - red) over an RGB sample: the jet heatmap's low end tints the ball video's
/// black background blue.
fn blue_excess(sample: &Value) -> f64 {
    let values: Vec<f64> = sample
        .as_array()
        .expect("a sample")
        .iter()
        .map(|v| v.as_f64().expect("a number"))
        .collect();
    assert!(!values.is_empty(), "an empty sample");
    let pixels = values.chunks(3);
    let count = pixels.len() as f64;
    pixels.map(|rgb| rgb[2] - rgb[0]).sum::<f64>() / count
}

/// The live view in a real browser: a pipeline on a looping video, watched by WebRTC in headless
/// chromium (at least 50 frames decoded, the heatmap visible), falling back to MJPEG when the
/// server refuses WebRTC (its viewer limit), and twenty viewers in turn that cost the pipeline no
/// result.
#[test]
fn a_running_pipeline_is_watched_live_in_chromium_by_webrtc_or_mjpeg() {
    let dir = tempfile::tempdir().expect("temp dir");
    let media_root = dir.path().join("line");
    std::fs::create_dir_all(&media_root).expect("root");
    let server = Server::start_with(
        &dir.path().join("data"),
        &[
            "--path-root",
            media_root.to_str().expect("utf-8"),
            "--webrtc-max-viewers",
            "1",
        ],
    );
    let http = client();
    let project = create_project(&http, &server, "live");
    upload_all(&http, &server, &project, &normal_images(dir.path(), 12, 96));
    let (status, job) = call(
        http.post(server.url(&format!("/api/projects/{project}/train")))
            .json(&json!({"model_name": "padim", "input_size": 64})),
    );
    assert_eq!(status, StatusCode::CREATED, "{job}");
    let job_id = job["id"].as_str().expect("job id");
    let done = poll(&http, &server.url(&format!("/api/jobs/{job_id}")), |job| {
        job["status"] == "completed" || job["status"] == "failed"
    });
    assert_eq!(done["status"], "completed", "{done}");
    let video = media_root.join("ball.mp4");
    mp4(&video, 90);
    let (_, source) = call(http.post(server.url("/api/sources")).json(&json!({
        "name": "ball", "type": "video_file", "config": {"path": video, "loop": true, "realtime": true}
    })));
    let (_, sink) = call(http.post(server.url("/api/sinks")).json(&json!({
        "name": "results", "type": "folder",
        "config": {"path": media_root.join("results"), "create": true, "output_formats": ["predictions"]}
    })));
    let (status, pipeline) = call(
        http.post(server.url(&format!("/api/projects/{project}/pipelines")))
            .json(&json!({
                "name": "watched", "source_id": source["id"], "model_id": done["model_id"],
                "sink_ids": [sink["id"]], "queue_policy": "block"
            })),
    );
    assert_eq!(status, StatusCode::CREATED, "{pipeline}");
    let pipeline_id = pipeline["id"].as_str().expect("id").to_string();
    let (status, started) = call(
        http.post(server.url("/api/active-pipelines"))
            .json(&json!({"pipeline_id": pipeline_id})),
    );
    assert_eq!(status, StatusCode::CREATED, "{started}");

    // 1. WebRTC: frames decoded by the browser, the heatmap over the picture.
    let webrtc = browser(&server, &pipeline_id, &["--frames", "50"]);
    assert_eq!(webrtc["mode"], "webrtc", "{webrtc}");
    assert!(
        webrtc["framesDecoded"].as_u64().expect("frames") >= 50,
        "{webrtc}"
    );
    assert_eq!(webrtc["videoWidth"], 320, "{webrtc}");
    let raw = browser(&server, &pipeline_id, &["--mode", "mjpeg", "--view", "raw"]);
    assert_eq!(raw["mode"], "mjpeg", "{raw}");
    let (overlay_blue, raw_blue) = (blue_excess(&webrtc["sample"]), blue_excess(&raw["sample"]));
    assert!(
        overlay_blue > raw_blue + 15.0,
        "the heatmap tints the overlay: blue-red {overlay_blue:.1} over {raw_blue:.1} in the raw frame"
    );

    // 2. WebRTC refused (the viewer limit is 1 and another page holds it): the page falls back
    // to MJPEG and shows frames that change.
    let fallback = browser(&server, &pipeline_id, &["--hold", "1"]);
    assert_eq!(fallback["mode"], "mjpeg", "{fallback}");
    assert!(
        fallback["fallbackReason"]
            .as_str()
            .is_some_and(|reason| reason.contains("409")),
        "{fallback}"
    );
    assert_eq!(fallback["imageWidth"], 320, "{fallback}");
    assert_ne!(
        fallback["sample"], fallback["sampleLater"],
        "the MJPEG picture moves"
    );

    // 3. Twenty viewers in turn, each connecting, watching and leaving: every one sees frames,
    // the pipeline loses no result to them (its queues block, so a drop anywhere but the
    // previews would be a lost result), and the server keeps no thread and no growing memory
    // for them once they have left.
    // Five viewers first, so what the first connections set up once (plugins, the DTLS
    // certificate) is in the baseline. Memory is then measured after each ten viewers: the
    // server hands freed memory back when a viewer leaves (malloc_trim), so what stays resident
    // is what is still allocated; a leak grows with every viewer, so the second ten must add
    // little (heap fragmentation alone has left 4.5 MB after ten on a busy host). A leaked
    // webrtcbin (its ICE, DTLS and SRTP state and threads) costs more than a megabyte; the
    // thread count catches the leak this test was written for exactly.
    let warm_up = browser(&server, &pipeline_id, &["--cycles", "5"]);
    assert_eq!(warm_up["cycles"], 5, "{warm_up}");
    let before = settled_usage(&server, None);
    let mut usage = vec![before];
    for _ in 0..2 {
        let cycled = browser(
            &server,
            &pipeline_id,
            &["--cycles", "10", "--timeout-ms", "120000"],
        );
        assert_eq!(cycled["cycles"], 10, "{cycled}");
        usage.push(settled_usage(&server, Some(before)));
    }
    eprintln!("server usage after 5, 15 and 25 viewers: {usage:?}");
    let (middle, after) = (usage[1], usage[2]);
    assert!(
        after.threads <= before.threads + 2,
        "viewers leave no threads behind: {usage:?}"
    );
    assert!(
        after.rss_kib <= middle.rss_kib + 8 * 1024,
        "the last ten viewers leave at most 0.8 MB each behind: {usage:?}"
    );
    assert!(
        after.rss_kib <= before.rss_kib + 10 * 1024,
        "twenty viewers leave at most 10 MB behind: {usage:?}"
    );
    let (status, stopped) =
        call(http.delete(server.url(&format!("/api/active-pipelines/{pipeline_id}"))));
    assert_eq!(status, StatusCode::OK, "{stopped}");
    for edge in stopped["metrics"]["edges"].as_array().expect("edges") {
        if !edge["to"]
            .as_str()
            .unwrap_or_default()
            .starts_with("preview")
        {
            assert_eq!(edge["dropped"], 0, "viewers cost no result: {edge}");
        }
    }
    let node = |id: &str| -> u64 {
        stopped["metrics"]["nodes"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["id"] == id))
            .and_then(|n| n["packets_in"].as_u64())
            .unwrap_or_else(|| panic!("node {id}: {stopped}"))
    };
    assert_eq!(
        node("sink1"),
        node("preprocess"),
        "every frame the pipeline took became a result"
    );
}

/// The reference's two pipeline states: `active` (the camera runs and is previewed, nothing is
/// inspected) and `running` (inspection), switched through the API while the camera keeps
/// running; the status, the metrics and `/metrics` say which.
#[test]
fn a_pipeline_switches_between_previewed_only_and_inspecting_without_restarting_its_camera() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = Server::start(&dir.path().join("data"), None);
    let http = client();
    let project = create_project(&http, &server, "modes");
    let (status, pipeline) = call(
        http.post(server.url(&format!("/api/projects/{project}/pipelines")))
            .json(&json!({"name": "line", "graph": {"name": "line", "nodes": [
                {"id": "camera", "op": "source.synthetic",
                 "params": {"width": 64, "height": 48, "fps": 30, "realtime": true}},
                {"id": "jpeg", "op": "encode.jpeg", "params": {}},
                {"id": "results", "op": "sink.null", "params": {}},
                {"id": "preview", "op": "sink.preview", "params": {"view": "raw"}}
            ], "edges": [
                {"from": "camera", "to": "jpeg"},
                {"from": "jpeg", "to": "results"},
                {"from": "camera", "to": "preview", "queue": {"capacity": 1, "policy": "drop_oldest"}}
            ]}})),
    );
    assert_eq!(status, StatusCode::CREATED, "{pipeline}");
    let id = pipeline["id"].as_str().expect("id").to_string();
    let status_url = server.url(&format!("/api/active-pipelines/{id}"));
    let mode_url = server.url(&format!("/api/active-pipelines/{id}/mode"));
    let count = |body: &Value, node: &str, field: &str| -> u64 {
        body["metrics"]["nodes"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["id"] == node))
            .and_then(|n| n[field].as_u64())
            .unwrap_or_else(|| panic!("{node}.{field}: {body}"))
    };

    // Started previewed only: the camera delivers (a capture sees its frame), nothing is
    // inspected.
    let (status, started) = call(
        http.post(server.url("/api/active-pipelines"))
            .json(&json!({"pipeline_id": id, "mode": "active"})),
    );
    assert_eq!(status, StatusCode::CREATED, "{started}");
    assert_eq!(started["mode"], "active", "{started}");
    let previewing = poll(&http, &status_url, |body| {
        count(body, "camera", "packets_out") >= 15
    });
    assert_eq!(count(&previewing, "jpeg", "packets_in"), 0, "{previewing}");
    assert_eq!(previewing["metrics"]["mode"], "active", "{previewing}");
    let (status, captured) = call(
        http.post(server.url("/api/captures"))
            .json(&json!({"pipeline_id": id})),
    );
    assert_eq!(status, StatusCode::CREATED, "{captured}");
    let metrics = http
        .get(server.url("/metrics"))
        .send()
        .and_then(|r| r.text())
        .expect("metrics");
    assert!(
        metrics.contains(&format!(
            "inspectflow_pipeline_mode{{pipeline=\"{id}\",mode=\"active\"}} 1"
        )),
        "{metrics}"
    );

    // Inspecting: results flow, and the camera was not restarted (its count goes on).
    let camera_before = count(&previewing, "camera", "packets_out");
    let (status, switched) = call(http.put(&mode_url).json(&json!({"mode": "running"})));
    assert_eq!(status, StatusCode::OK, "{switched}");
    assert_eq!(switched["mode"], "running", "{switched}");
    let inspecting = poll(&http, &status_url, |body| {
        count(body, "results", "packets_in") >= 10
    });
    assert!(count(&inspecting, "camera", "packets_out") >= camera_before + 10);
    assert_eq!(count(&inspecting, "camera", "restarts"), 0, "{inspecting}");

    // Back to previewed only: inspection stops while the camera goes on.
    let (status, switched) = call(http.put(&mode_url).json(&json!({"mode": "active"})));
    assert_eq!(status, StatusCode::OK, "{switched}");
    // Frames queued before the switch still drain; then the count stays put for good.
    let (mut paused, mut later) = (Value::Null, Value::Null);
    for _ in 0..20 {
        paused = call(http.get(&status_url)).1;
        std::thread::sleep(Duration::from_millis(500));
        later = call(http.get(&status_url)).1;
        if count(&paused, "jpeg", "packets_in") == count(&later, "jpeg", "packets_in") {
            break;
        }
    }
    assert_eq!(
        count(&paused, "jpeg", "packets_in"),
        count(&later, "jpeg", "packets_in"),
        "nothing is inspected while active: {later}"
    );
    assert!(count(&later, "camera", "packets_out") > count(&paused, "camera", "packets_out"));

    // Bad switches name what was wrong.
    let (status, body) = call(http.put(&mode_url).json(&json!({"mode": "paused"})));
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, body) = call(
        http.put(server.url("/api/active-pipelines/nope/mode"))
            .json(&json!({"mode": "running"})),
    );
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, stopped) = call(http.delete(&status_url));
    assert_eq!(status, StatusCode::OK, "{stopped}");
    let (status, body) = call(http.put(&mode_url).json(&json!({"mode": "running"})));
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a stopped pipeline has no mode: {body}"
    );
}

/// The web UI walked by a newcomer in Debian's headless chromium (tests/browser/ui.mjs), through
/// the UI alone: create a project from the keyboard, upload 20 images, train to completed, move
/// the threshold from the keyboard and save it, add a video source and a folder sink, build a
/// pipeline from them, start it, watch live frames and metrics, capture a frame into the
/// dataset, stop it. axe-core finds no serious or critical accessibility violation on any
/// screen, and each screen's screenshot lands in docs/ (the README shows them). The API then
/// confirms what the UI did.
#[test]
fn a_newcomer_walks_the_whole_flow_in_the_web_ui() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("line");
    std::fs::create_dir_all(&root).expect("root");
    let video = root.join("line.mp4");
    mp4(&video, 90);
    let images = normal_images(dir.path(), 20, 96);
    let image_dir = images[0].parent().expect("image folder");
    let out = root.join("results");
    let server = Server::start_with(
        &dir.path().join("data"),
        &["--path-root", root.to_str().expect("utf-8")],
    );
    let screenshots = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    std::fs::create_dir_all(&screenshots).expect("docs folder");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/ui.mjs");
    let output = Command::new("node")
        .arg(script)
        .arg(&server.base)
        .arg("--images")
        .arg(image_dir)
        .arg("--video")
        .arg(&video)
        .arg("--out")
        .arg(&out)
        .arg("--screenshots")
        .arg(&screenshots)
        .output()
        .expect("node runs (scripts/setup.sh installs it and playwright-core)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report: Value = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("ui.mjs: {stdout}\n{stderr}"));
    assert_eq!(report["ok"], true, "ui.mjs: {report}\n{stderr}");
    for (screen, violations) in report["accessibility"].as_object().expect("audits") {
        assert_eq!(
            violations.as_array().map(Vec::len),
            Some(0),
            "serious or critical accessibility violations on {screen}: {violations}"
        );
    }
    assert_eq!(
        report["accessibility"].as_object().map(|a| a.len()),
        Some(6),
        "every screen audited: {report}"
    );
    assert_eq!(
        report["sourceState"], "online",
        "the pipeline's metrics show its camera delivering: {report}"
    );
    for screen in [
        "projects",
        "dataset",
        "training",
        "models",
        "devices",
        "pipelines",
    ] {
        assert!(
            screenshots.join(format!("ui-{screen}.png")).is_file(),
            "screenshot of {screen}"
        );
    }

    // What the UI did, as the API sees it.
    let http = client();
    let project = report["projectId"].as_str().expect("project id");
    let (_, media) =
        call(http.get(server.url(&format!("/api/projects/{project}/media?limit=100"))));
    let media = media["media"].as_array().expect("media");
    assert_eq!(media.len(), 21, "20 uploads and one capture");
    assert_eq!(
        media.iter().filter(|m| !m["capture"].is_null()).count(),
        1,
        "the captured frame knows its pipeline"
    );
    let (_, models) = call(http.get(server.url(&format!("/api/projects/{project}/models"))));
    let model = &models["models"][0];
    let (_, snapshots) =
        call(http.get(server.url(&format!("/api/snapshots?project_id={project}"))));
    let snapshot = &snapshots["snapshots"][0];
    assert_eq!(
        (&snapshot["origin"], &snapshot["count"]),
        (&json!("on_demand"), &json!(20)),
        "{snapshots}"
    );
    assert_eq!(
        model["dataset_snapshot_id"], snapshot["id"],
        "trained on the snapshot the UI chose"
    );
    let saved = model["threshold"].as_f64().expect("threshold");
    let moved = report["thresholdAfter"].as_f64().expect("moved threshold");
    assert!(
        (saved - moved).abs() < 1e-3 && moved < report["thresholdBefore"].as_f64().expect("before"),
        "the slider's threshold was saved: {saved} vs {report}"
    );
    let (_, active) = call(http.get(server.url("/api/active-pipelines")));
    assert_eq!(
        active["active_pipelines"].as_array().map(Vec::len),
        Some(0),
        "stopped"
    );
    let written = std::fs::read_dir(&out)
        .map(|entries| entries.count())
        .unwrap_or(0);
    assert!(written > 0, "the folder sink wrote results into {out:?}");
}

/// The UI's API types (ui/src/api/schema.d.ts) are what openapi-typescript makes of the
/// server's OpenAPI document now, so the UI cannot drift from the API.
#[test]
fn the_web_uis_api_types_are_generated_from_the_current_openapi_document() {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = dir.path().join("openapi.json");
    let status = Command::new(env!("CARGO_BIN_EXE_inspectflow"))
        .args(["gen-api", "--target-path"])
        .arg(&spec)
        .status()
        .expect("gen-api runs");
    assert!(status.success());
    let ui = Path::new(env!("CARGO_MANIFEST_DIR")).join("ui");
    let generated = dir.path().join("schema.d.ts");
    let output = Command::new("node")
        .arg(ui.join("node_modules/openapi-typescript/bin/cli.js"))
        .arg("--default-non-nullable")
        .arg("false")
        .arg(&spec)
        .arg("-o")
        .arg(&generated)
        .output()
        .expect("node runs openapi-typescript (scripts/setup.sh installs it in ui/)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let committed =
        std::fs::read_to_string(ui.join("src/api/schema.d.ts")).expect("ui/src/api/schema.d.ts");
    let current = std::fs::read_to_string(&generated).expect("generated types");
    assert!(
        committed == current,
        "ui/src/api/schema.d.ts is stale: run `cargo run -- gen-api --target-path target/openapi.json && \
         (cd ui && npm run gen-api -- ../target/openapi.json -o src/api/schema.d.ts)`"
    );
}

/// Training jobs and assembled pipelines run on the OpenVINO device they name (here `AUTO`,
/// which every machine has); a device this machine lacks is a 422 that names the field and the
/// device, at submission, before anything runs.
#[test]
fn training_and_pipelines_run_on_the_chosen_openvino_device() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("line");
    std::fs::create_dir_all(&root).expect("root");
    let server = Server::start_with(
        &dir.path().join("data"),
        &["--path-root", root.to_str().expect("utf-8")],
    );
    let http = client();
    let project = create_project(&http, &server, "devices");
    upload_all(&http, &server, &project, &normal_images(dir.path(), 8, 96));
    let train = |body: Value| {
        call(
            http.post(server.url(&format!("/api/projects/{project}/train")))
                .json(&body),
        )
    };
    let (status, refused) = train(json!({"model_name": "padim", "device": "NPU.9"}));
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    let detail = refused["detail"].as_str().expect("detail");
    assert!(
        detail.starts_with("device: ") && detail.contains("NPU.9") && detail.contains("CPU"),
        "names the field, the device and what there is: {detail}"
    );
    let (status, job) = train(json!({"model_name": "padim", "input_size": 64, "device": "AUTO"}));
    assert_eq!(status, StatusCode::CREATED, "{job}");
    assert_eq!(job["payload"]["device"], "AUTO");
    let job_id = job["id"].as_str().expect("job id");
    let done = poll(&http, &server.url(&format!("/api/jobs/{job_id}")), |job| {
        job["status"] == "completed" || job["status"] == "failed"
    });
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["started_at"], done["start_time"],
        "the seed's names too"
    );
    assert_eq!(done["error_message"], Value::Null);
    let model_id = done["model_id"].as_str().expect("model id");

    let video = root.join("line.mp4");
    mp4(&video, 30);
    let (_, source) = call(http.post(server.url("/api/sources")).json(&json!({
        "name": "line", "type": "video_file", "config": {"path": video, "loop": true}
    })));
    let (_, sink) = call(http.post(server.url("/api/sinks")).json(&json!({
        "name": "results", "type": "folder", "config": {"path": root.join("results"), "create": true}
    })));
    let pipeline = |device: &str| {
        call(
            http.post(server.url(&format!("/api/projects/{project}/pipelines")))
                .json(&json!({
                    "name": format!("on {device}"), "source_id": source["id"], "model_id": model_id,
                    "sink_ids": [sink["id"]], "device": device
                })),
        )
    };
    let (status, refused) = pipeline("XPU");
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    assert!(
        refused["detail"]
            .as_str()
            .expect("detail")
            .starts_with("device: device 'XPU' is not available here"),
        "{refused}"
    );
    let (status, created) = pipeline("AUTO");
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["device"], "AUTO");
    let pipeline_id = created["id"].as_str().expect("pipeline id");
    let (status, started) = call(
        http.post(server.url("/api/active-pipelines"))
            .json(&json!({"pipeline_id": pipeline_id})),
    );
    assert_eq!(status, StatusCode::CREATED, "{started}");
    poll(
        &http,
        &server.url(&format!("/api/active-pipelines/{pipeline_id}")),
        |body| {
            body["metrics"]["nodes"]
                .as_array()
                .and_then(|nodes| nodes.iter().find(|n| n["id"] == "sink1"))
                .is_some_and(|sink| sink["packets_in"].as_u64().unwrap_or(0) >= 5)
        },
    );
    let (status, stopped) =
        call(http.delete(server.url(&format!("/api/active-pipelines/{pipeline_id}"))));
    assert_eq!(status, StatusCode::OK, "{stopped}");
}

/// Sources and sinks move between servers as YAML (secrets left out, imports checked as creates
/// are), and `disconnected` ones are placeholders: a pipeline naming a disconnected source is
/// stored but cannot start until the source gets a type; a disconnected sink receives nothing.
#[test]
fn sources_and_sinks_travel_as_yaml_and_disconnected_ones_hold_a_pipeline_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The path root holds the data directory, which stays closed to sinks all the same.
    let files = dir.path().to_path_buf();
    let server = Server::start_with(
        &dir.path().join("data"),
        &["--path-root", files.to_str().expect("utf-8")],
    );
    let http = client();
    let contract = Contract::of(&server, &http);
    let project = create_project(&http, &server, "line");
    let images = normal_images(dir.path(), 4, 64);
    upload_all(&http, &server, &project, &images);
    let (status, job) = contract.call(
        http.post(server.url(&format!("/api/projects/{project}/train")))
            .json(&json!({"model_name": "padim", "input_size": 64})),
    );
    assert_eq!(status, StatusCode::CREATED, "{job}");
    let job_url = server.url(&format!("/api/jobs/{}", job["id"].as_str().expect("id")));
    let job = poll(&http, &job_url, |job| job["status"] == "completed");
    let model_id = job["model_id"].as_str().expect("model").to_string();

    // Disconnected: no parameters allowed.
    let (status, body) = contract.call(http.post(server.url("/api/sources")).json(&json!({
        "name": "later", "type": "disconnected", "config": {"path": "x"}
    })));
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .expect("detail")
            .starts_with("config")
    );
    let (status, source) = contract.call(http.post(server.url("/api/sources")).json(&json!({
        "name": "later", "type": "disconnected"
    })));
    assert_eq!(status, StatusCode::CREATED, "{source}");
    let source_id = source["id"].as_str().expect("id").to_string();
    let (_, unplugged) = contract.call(http.post(server.url("/api/sinks")).json(&json!({
        "name": "unplugged", "type": "disconnected"
    })));

    // A sink as YAML, out and back in; a secret never leaves.
    let results = files.join("results");
    let (status, sink) = contract.call(http.post(server.url("/api/sinks")).json(&json!({
        "name": "results", "type": "folder", "config": {"path": results, "create": true}
    })));
    assert_eq!(status, StatusCode::CREATED, "{sink}");
    let sink_id = sink["id"].as_str().expect("id").to_string();
    let yaml = http
        .get(server.url(&format!("/api/sinks/{sink_id}:export")))
        .send()
        .expect("export")
        .text()
        .expect("text");
    assert!(
        yaml.contains("type: folder") && yaml.contains("name: results"),
        "{yaml}"
    );
    let (status, copy) = contract.call(
        http.post(server.url("/api/sinks:import"))
            .header("content-type", "application/yaml")
            .body(yaml.clone()),
    );
    assert_eq!(status, StatusCode::CREATED, "{copy}");
    assert_eq!(copy["config"], sink["config"]);
    assert_ne!(copy["id"], sink["id"]);
    let (status, hook) = contract.call(http.post(server.url("/api/sinks")).json(&json!({
        "name": "hook", "type": "webhook",
        "config": {"url": "http://127.0.0.1:9/in", "headers": {"X-Key": "s3cret"}}
    })));
    assert_eq!(status, StatusCode::CREATED, "{hook}");
    let hook_yaml = http
        .get(server.url(&format!(
            "/api/sinks/{}:export",
            hook["id"].as_str().expect("id")
        )))
        .send()
        .expect("export")
        .text()
        .expect("text");
    assert!(
        hook_yaml.contains("type: webhook")
            && !hook_yaml.contains("s3cret")
            && !hook_yaml.contains("headers"),
        "{hook_yaml}"
    );
    for (bad, expected) in [
        (
            "name: x\ntype: folder\nconfig: {path: /etc}\n",
            "config.path",
        ),
        ("nme: x\ntype: folder\n", "nme"),
        ("name: x\ntype: teleporter\n", "type"),
        ("[unclosed", "request body"),
        ("- x\n- folder\n", "is a mapping of name, type and config"),
    ] {
        let (status, body) = contract.call(http.post(server.url("/api/sinks:import")).body(bad));
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
        let detail = body["detail"].as_str().expect("detail");
        assert!(detail.contains(expected), "{bad}: {detail}");
    }

    // A pipeline on the disconnected source is stored, but does not start until it is connected.
    let (status, pipeline) = contract.call(
        http.post(server.url(&format!("/api/projects/{project}/pipelines")))
            .json(&json!({
                "name": "line 1", "source_id": source_id, "model_id": model_id,
                "sink_ids": [sink_id, unplugged["id"]]
            })),
    );
    assert_eq!(status, StatusCode::CREATED, "{pipeline}");
    let pipeline_id = pipeline["id"].as_str().expect("id").to_string();
    let start = || {
        contract.call(
            http.post(server.url("/api/active-pipelines"))
                .json(&json!({"pipeline_id": pipeline_id})),
        )
    };
    let (status, body) = start();
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .expect("detail")
            .contains("disconnected")
    );
    let folder = images[0].parent().expect("image folder").to_path_buf();
    let (status, body) = contract.call(
        http.put(server.url(&format!("/api/sources/{source_id}")))
            .json(&json!({"name": "later", "type": "images_folder", "config": {"path": folder}})),
    );
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = start();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    for _ in 0..300 {
        if index_lines(&results).len() >= images.len() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(index_lines(&results).len(), images.len());
    let (status, _) =
        contract.call(http.delete(server.url(&format!("/api/active-pipelines/{pipeline_id}"))));
    assert_eq!(status, StatusCode::OK);
}

/// The gradient-trained families through the API: each job runs the libtorch helper (built
/// with the workspace), its log shows each epoch's loss, and the model serves; a cancelled job
/// stops the helper and leaves no model.
#[test]
fn gradient_trained_jobs_log_each_epoch_and_a_cancelled_one_stops_its_helper_and_leaves_no_model() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let server = Server::start(&data, None);
    let http = client();
    let project = create_project(&http, &server, "gradient");
    upload_all(&http, &server, &project, &normal_images(dir.path(), 12, 64));
    let families = ["stfpm", "reverse_distillation", "efficient_ad"];
    for family in families {
        let (status, job) = call(
            http.post(server.url(&format!("/api/projects/{project}/train")))
                .json(&json!({"model_name": family, "input_size": 64, "epochs": 3, "patience": 0})),
        );
        assert_eq!(status, StatusCode::CREATED, "{job}");
        let job_id = job["id"].as_str().expect("id").to_string();
        let done = poll(&http, &server.url(&format!("/api/jobs/{job_id}")), |job| {
            job["status"] != "pending" && job["status"] != "running"
        });
        assert_eq!(done["status"], "completed", "{family}: {done}");
        let logs = events(&server.url(&format!("/api/jobs/{job_id}/logs")));
        for epoch in 1..=3 {
            assert!(
                logs.iter().any(|(_, line)| line
                    .contains(&format!("training epoch {epoch}/3: loss "))
                    && line.contains("validation loss")),
                "{family}: {logs:?}"
            );
        }
    }
    let (_, models) = call(http.get(server.url(&format!("/api/projects/{project}/models"))));
    let mut trained: Vec<&str> = models["models"]
        .as_array()
        .expect("models")
        .iter()
        .filter_map(|m| m["architecture"].as_str())
        .collect();
    trained.sort();
    assert_eq!(
        trained,
        vec!["efficient_ad", "reverse_distillation", "stfpm"],
        "{models}"
    );

    let (status, job) = call(
        http.post(server.url(&format!("/api/projects/{project}/train")))
            .json(&json!({"model_name": "efficient_ad", "input_size": 64, "epochs": 1000, "patience": 0})),
    );
    assert_eq!(status, StatusCode::CREATED, "{job}");
    let job_id = job["id"].as_str().expect("id").to_string();
    poll(&http, &server.url(&format!("/api/jobs/{job_id}")), |job| {
        job["stage"] == "fitting"
    });
    let (status, canceled) = call(http.post(server.url(&format!("/api/jobs/{job_id}:cancel"))));
    assert_eq!(status, StatusCode::OK, "{canceled}");
    assert_eq!(canceled["status"], "canceled");
    let helper_running = || {
        Command::new("pgrep")
            .args([
                "-f",
                &format!("inspectflow-torch --request {}", data.display()),
            ])
            .status()
            .is_ok_and(|s| s.success())
    };
    let started = std::time::Instant::now();
    while helper_running() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the helper stops with its job"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, models) = call(http.get(server.url(&format!("/api/projects/{project}/models"))));
    assert_eq!(models["pagination"]["total"], families.len(), "{models}");
}
