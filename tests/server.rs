//! The REST API as a client sees it: a real `inspectflow serve` process on 127.0.0.1, driven
//! over HTTP, killed with SIGKILL and restarted on the same data directory.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::blocking::Client;
use serde_json::{Value, json};

/// A server process on a free port; killed when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(data_dir: &Path, token: Option<&str>) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_inspectflow"));
        command
            .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env_remove("INSPECTFLOW_API_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(token) = token {
            command.args(["--token", token]);
        }
        let mut child = command.spawn().expect("inspectflow serve starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the server prints its address");
        let base = line
            .split_whitespace()
            .find(|word| word.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        Self { child, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// Status and JSON body (Null when there is none).
fn call(request: reqwest::blocking::RequestBuilder) -> (StatusCode, Value) {
    let response = request.send().expect("the server answers");
    let status = response.status();
    let text = response.text().expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("{status}: not JSON: {text}"))
    };
    (status, body)
}

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
                .header("content-type", "application/json")
                .body(vec![b' '; 2 << 20]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too large",
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
            "query",
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
        let concrete = path
            .replace("{project_id}", "00000000-0000-0000-0000-000000000000")
            .replace("{media_id}", "00000000-0000-0000-0000-000000000001");
        for method in methods.as_object().expect("methods").keys() {
            let request = match method.as_str() {
                "get" => http.get(server.url(&concrete)),
                "post" => http.post(server.url(&concrete)).json(&json!({"name": "x"})),
                "patch" => http
                    .patch(server.url(&concrete))
                    .json(&json!({"name": "x"})),
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
    assert_eq!(names, vec!["padim", "patchcore"]);
    assert_eq!(
        models.iter().filter(|m| m["recommended"] == true).count(),
        1,
        "exactly one recommended family"
    );
    assert_eq!(models[0]["parameters"]["input_size"]["default"], 256);

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

fn png(width: u32, height: u32, level: u8) -> Vec<u8> {
    let image =
        image::RgbImage::from_pixel(width, height, image::Rgb([level, level / 2, 255 - level]));
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .expect("encode PNG");
    bytes
}

fn upload_form(
    file: Vec<u8>,
    label: Option<&str>,
    mask: Option<Vec<u8>>,
) -> reqwest::blocking::multipart::Form {
    let mut form = reqwest::blocking::multipart::Form::new().part(
        "file",
        reqwest::blocking::multipart::Part::bytes(file).file_name("part.png"),
    );
    if let Some(label) = label {
        form = form.text("label", label.to_string());
    }
    if let Some(mask) = mask {
        form = form.part(
            "mask",
            reqwest::blocking::multipart::Part::bytes(mask).file_name("mask.png"),
        );
    }
    form
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
            upload_form(png(8, 8, 1), None, Some(png(4, 4, 1))),
            StatusCode::UNPROCESSABLE_ENTITY,
            "mask",
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

fn inspectflow(args: &[&str], data_dir: &Path) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_inspectflow"))
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("inspectflow runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[test]
fn migrate_and_check_db_report_the_schema_and_every_inconsistency() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (ok, out) = inspectflow(&["migrate"], dir.path());
    assert!(ok && out.contains("schema version 1"), "{out}");
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
