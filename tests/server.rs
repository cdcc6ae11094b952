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
            "larger",
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
        let concrete = path.replace("{project_id}", "00000000-0000-0000-0000-000000000000");
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
