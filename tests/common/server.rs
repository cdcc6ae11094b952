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
            .stderr(Stdio::null());
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
