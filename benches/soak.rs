//! Soak: a pipeline on a looping video runs for a long time while an API client churns projects
//! and uploads. Does memory stay flat, does the frame rate hold, does latency stay bounded?
//!
//!     cargo bench --bench soak [-- MINUTES [SAMPLE_SECONDS]]     (default 30 minutes, 60 s)
//!
//! It starts the release `inspectflow serve` on 127.0.0.1 with a fresh data directory, writes a
//! 640x360 H.264 clip with gst-launch-1.0, and runs `source.video_file` (looping, paced at the
//! clip's 30 FPS) -> `preprocess` 256x256 -> `encode.jpeg` -> `sink.folder` (keeping the last
//! 200 images). One client meanwhile creates a project, uploads 5 images, lists and reads them,
//! deletes one, and deletes the project, over and over. Every sample prints the server's RSS,
//! the pipeline's frame rate over the sample, its capture-to-sink latency (since the start), the
//! API requests in the sample with their latency percentiles, and any non-2xx answers.

#[path = "../tests/common/server.rs"]
#[allow(dead_code)]
mod server;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use serde_json::{Value, json};
use server::{Server, png, upload_form};

/// What the churning client did since the last sample.
#[derive(Default)]
struct Churn {
    latencies: Mutex<Vec<Duration>>,
    unexpected: AtomicU64,
}

fn churn(base: &str, stop: &AtomicBool, record: &Churn) {
    let http = Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let images: Vec<Vec<u8>> = (0..5).map(|i| png(320, 240, 40 * i as u8)).collect();
    let mut round = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let timed = |request: reqwest::blocking::RequestBuilder, expected: u16| -> Value {
            let started = Instant::now();
            let response = request.send();
            record
                .latencies
                .lock()
                .expect("latencies")
                .push(started.elapsed());
            match response {
                Ok(response) if response.status().as_u16() == expected => {
                    response.json().unwrap_or(Value::Null)
                }
                _ => {
                    record.unexpected.fetch_add(1, Ordering::SeqCst);
                    Value::Null
                }
            }
        };
        let project = timed(
            http.post(format!("{base}/api/projects"))
                .json(&json!({"name": format!("churn {round}")})),
            201,
        );
        let Some(project) = project["id"].as_str().map(str::to_string) else {
            continue;
        };
        let media = format!("{base}/api/projects/{project}/media");
        let mut ids = Vec::new();
        for image in &images {
            let uploaded = timed(
                http.post(&media)
                    .multipart(upload_form(image.clone(), Some("normal"), None)),
                201,
            );
            ids.extend(uploaded["id"].as_str().map(str::to_string));
        }
        timed(http.get(format!("{media}?limit=50")), 200);
        for id in &ids {
            let _ = timed(http.get(format!("{media}/{id}/thumbnail")), 200);
        }
        if let Some(id) = ids.first() {
            timed(http.delete(format!("{media}/{id}")), 204);
        }
        timed(http.delete(format!("{base}/api/projects/{project}")), 204);
        round += 1;
    }
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

fn main() {
    let numbers: Vec<f64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let minutes = numbers.first().copied().unwrap_or(30.0);
    let sample = Duration::from_secs_f64(numbers.get(1).copied().unwrap_or(60.0));
    let dir = tempfile::tempdir().expect("temp dir");
    let clip = dir.path().join("clip.mp4");
    let written = std::process::Command::new("gst-launch-1.0")
        .arg("-q")
        .args(
            format!(
                "videotestsrc num-buffers=300 pattern=ball ! video/x-raw,format=I420,width=640,height=360,framerate=30/1 \
                 ! x264enc speed-preset=ultrafast ! mp4mux ! filesink location={}",
                clip.display()
            )
            .split_whitespace(),
        )
        .status()
        .expect("gst-launch-1.0 runs");
    assert!(written.success(), "gst-launch-1.0 wrote the clip");
    let server = Server::start_with(
        &dir.path().join("data"),
        &["--path-root", &dir.path().display().to_string()],
    );
    let base = server.base.clone();
    let http = Client::new();
    let project: Value = http
        .post(format!("{base}/api/projects"))
        .json(&json!({"name": "soak"}))
        .send()
        .and_then(|r| r.json())
        .expect("project");
    let project = project["id"].as_str().expect("project id");
    let graph = json!({
        "name": "soak",
        "nodes": [
            {"id": "video", "op": "source.video_file", "params": {"path": clip, "loop": true, "realtime": true}},
            {"id": "preprocess", "op": "preprocess", "params": {"width": 256, "height": 256}},
            {"id": "jpeg", "op": "encode.jpeg", "params": {}},
            {"id": "out", "op": "sink.folder", "params": {"path": dir.path().join("results"), "create": true, "retention": {"keep_last": 200}}}
        ],
        "edges": [
            {"from": "video", "to": "preprocess"},
            {"from": "preprocess", "to": "jpeg"},
            {"from": "jpeg", "to": "out"}
        ]
    });
    let pipeline: Value = http
        .post(format!("{base}/api/projects/{project}/pipelines"))
        .json(&json!({"name": "soak", "graph": graph}))
        .send()
        .and_then(|r| r.json())
        .expect("pipeline");
    let pipeline = pipeline["id"]
        .as_str()
        .unwrap_or_else(|| panic!("pipeline: {pipeline}"))
        .to_string();
    let started: Value = http
        .post(format!("{base}/api/active-pipelines"))
        .json(&json!({"pipeline_id": pipeline}))
        .send()
        .and_then(|r| r.json())
        .expect("start");
    assert_eq!(started["status"], "running", "{started}");
    let sink = |field: &str| -> Value {
        let status: Value = http
            .get(format!("{base}/api/active-pipelines/{pipeline}"))
            .send()
            .and_then(|r| r.json())
            .unwrap_or(Value::Null);
        status["metrics"]["nodes"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["id"] == "out"))
            .map(|node| node[field].clone())
            .unwrap_or(Value::Null)
    };
    println!(
        "soak: {minutes} min, a sample every {} s, {} cores",
        sample.as_secs(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:>7} {:>8} {:>8} {:>12} {:>12} {:>9} {:>10} {:>10} {:>10}",
        "minute",
        "RSS MB",
        "FPS",
        "e2e p50 ms",
        "e2e p99 ms",
        "API req",
        "API p50",
        "API p99",
        "non-2xx"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let record = Arc::new(Churn::default());
    let client = {
        let (stop, record, base) = (Arc::clone(&stop), Arc::clone(&record), base.clone());
        std::thread::spawn(move || churn(&base, &stop, &record))
    };
    let began = Instant::now();
    let end = began + Duration::from_secs_f64(minutes * 60.0);
    let mut frames_before = sink("packets_in").as_u64().unwrap_or(0);
    while Instant::now() < end {
        let window_start = Instant::now();
        std::thread::sleep(sample.min(end - window_start));
        let frames = sink("packets_in").as_u64().unwrap_or(0);
        let fps = (frames - frames_before) as f64 / window_start.elapsed().as_secs_f64();
        frames_before = frames;
        let e2e = sink("end_to_end_ms");
        let mut latencies = std::mem::take(&mut *record.latencies.lock().expect("latencies"));
        latencies.sort();
        println!(
            "{:>7.1} {:>8.1} {:>8.1} {:>12.1} {:>12.1} {:>9} {:>10.1} {:>10.1} {:>10}",
            began.elapsed().as_secs_f64() / 60.0,
            rss_mb(server.child.id()),
            fps,
            e2e["p50"].as_f64().unwrap_or(f64::NAN),
            e2e["p99"].as_f64().unwrap_or(f64::NAN),
            latencies.len(),
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            record.unexpected.swap(0, Ordering::SeqCst),
        );
    }
    stop.store(true, Ordering::SeqCst);
    let _ = client.join();
    let stopped: Value = http
        .delete(format!("{base}/api/active-pipelines/{pipeline}"))
        .send()
        .and_then(|r| r.json())
        .unwrap_or(Value::Null);
    println!(
        "stopped: {} (failure: {})",
        stopped["status"], stopped["failure"]
    );
}
