//! A real `inspectflow serve` process for the API tests, and the client calls they share.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::blocking::Client;
use serde_json::Value;

/// A server process on a free port; killed when dropped.
pub struct Server {
    pub child: Child,
    pub base: String,
}

impl Server {
    pub fn start(data_dir: &Path, token: Option<&str>) -> Self {
        match token {
            Some(token) => Self::start_with(data_dir, &["--token", token]),
            None => Self::start_with(data_dir, &[]),
        }
    }

    pub fn start_with(data_dir: &Path, extra: &[&str]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_inspectflow"));
        command
            .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .env_remove("INSPECTFLOW_API_TOKEN")
            .stdout(Stdio::piped())
            .stderr(server_log());
        command.args(extra);
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

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// Where a test server's log goes: nowhere, or appended to the file that
/// `INSPECTFLOW_TEST_SERVER_LOG` names (for debugging a test).
fn server_log() -> Stdio {
    std::env::var_os("INSPECTFLOW_TEST_SERVER_LOG")
        .and_then(|path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok()
        })
        .map_or_else(Stdio::null, Stdio::from)
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// Status and JSON body (Null when there is none).
pub fn call(request: reqwest::blocking::RequestBuilder) -> (StatusCode, Value) {
    let response = request.send().expect("the server answers");
    let status = response.status();
    let text = response.text().expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, body)
}

/// A PNG of one colour.
pub fn png(width: u32, height: u32, level: u8) -> Vec<u8> {
    png_of(&image::RgbImage::from_pixel(
        width,
        height,
        image::Rgb([level, level / 2, 255 - level]),
    ))
}

/// `image` as PNG bytes.
pub fn png_of(image: &image::RgbImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .expect("encode PNG");
    bytes
}

/// The multipart form of an upload.
pub fn upload_form(
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

/// A PNG of a few bytes whose header claims `width` x `height` RGB pixels (and holds none).
pub fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, width, height);
    encoder.set_color(png::ColorType::Rgb);
    let mut writer = encoder.write_header().expect("a PNG header");
    // An image data chunk with an empty zlib stream: the decoder reads up to it.
    writer
        .write_chunk(
            png::chunk::IDAT,
            &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        )
        .expect("a chunk");
    drop(writer);
    bytes
}

/// Runs `inspectflow ARGS --data-dir DIR`: whether it succeeded, and what it printed.
pub fn inspectflow(args: &[&str], data_dir: &Path) -> (bool, String) {
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

/// The server's OpenAPI document as a contract: every answer a test receives through
/// [`Contract::call`] must be documented for its route and status and, when it is JSON, match
/// the documented schema.
pub struct Contract {
    document: Value,
    base: String,
    /// (method, path template, status) of every answer checked, for the test to inspect.
    pub checked: std::cell::RefCell<Vec<(String, String, u16)>>,
}

impl Contract {
    /// Reads `/api/openapi.json` of `server`.
    pub fn of(server: &Server, http: &Client) -> Self {
        let (status, document) = call(http.get(server.url("/api/openapi.json")));
        assert_eq!(status, StatusCode::OK, "{document}");
        Self {
            document,
            base: server.base.clone(),
            checked: Default::default(),
        }
    }

    /// The documented path template that `path` (without the query) instantiates; where several
    /// do (`/api/jobs/{job_id}` and `/api/jobs/{job_id}:cancel`), the one with the most literal
    /// text.
    fn template(&self, path: &str) -> Option<String> {
        let paths = self.document["paths"].as_object()?;
        let segments: Vec<&str> = path.split('/').collect();
        let literal = |template: &str| {
            template
                .split('{')
                .map(|part| part.split_once('}').map_or(part, |(_, rest)| rest).len())
                .sum::<usize>()
        };
        paths
            .keys()
            .filter(|template| {
                let parts: Vec<&str> = template.split('/').collect();
                parts.len() == segments.len()
                    && parts.iter().zip(&segments).all(|(part, segment)| {
                        match part.split_once('{') {
                            None => part == segment,
                            Some((before, rest)) => {
                                let after = rest.split_once('}').map_or("", |(_, after)| after);
                                segment.len() > before.len() + after.len()
                                    && segment.starts_with(before)
                                    && segment.ends_with(after)
                            }
                        }
                    })
            })
            .max_by_key(|template| literal(template))
            .cloned()
    }

    /// Sends `request` like [`call`] and checks the answer against the document.
    pub fn call(&self, request: reqwest::blocking::RequestBuilder) -> (StatusCode, Value) {
        let (http, request) = request.build_split();
        let request = request.expect("a well-formed request");
        let method = request.method().as_str().to_lowercase();
        let url = request.url().clone();
        let path = url.as_str()[self.base.len()..]
            .split('?')
            .next()
            .unwrap_or_default()
            .to_string();
        let response = http.execute(request).expect("the server answers");
        let status = response.status();
        let json = response
            .headers()
            .get("content-type")
            .is_some_and(|t| t.as_bytes().starts_with(b"application/json"));
        let text = response.text().expect("body");
        let body: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        let template = self
            .template(&path)
            .unwrap_or_else(|| panic!("{method} {path}: no documented route"));
        let responses = &self.document["paths"][&template][&method]["responses"];
        assert!(
            responses.get(status.as_str()).is_some(),
            "{method} {template} answered {status}, documented {:?}",
            responses.as_object().map(|r| r.keys().collect::<Vec<_>>())
        );
        if json {
            let schema = inspectflow::server::openapi::answer_schema(
                &self.document,
                &method,
                &template,
                status.as_u16(),
            )
            .unwrap_or_else(|| panic!("{method} {template} {status}: JSON answer, no schema"));
            let validator = jsonschema::validator_for(&schema)
                .unwrap_or_else(|e| panic!("{method} {template} {status}: schema: {e}"));
            let errors: Vec<String> = validator
                .iter_errors(&body)
                .map(|e| format!("{} at {}", e, e.instance_path()))
                .collect();
            assert!(
                errors.is_empty(),
                "{method} {template} {status}: the answer breaks its schema: {errors:?}\n{body}"
            );
        }
        self.checked
            .borrow_mut()
            .push((method, template, status.as_u16()));
        (status, body)
    }
}
