//! The control plane under load: does a running pipeline keep its frame rate while 50 API
//! clients hammer the server, and how fast does the API answer meanwhile?
//!
//!     cargo bench --bench api_load [-- SECONDS]
//!
//! For each row it starts the release `inspectflow serve` on 127.0.0.1 with a fresh data
//! directory and a pipeline (`source.synthetic` 640x480 -> `preprocess` 256x256 ->
//! `encode.jpeg` -> `sink.null`): a camera-like one paced at 30 FPS, or one running as fast as
//! the machine allows; it measures the pipeline's frame rate (frames into the sink over the window, from the
//! API's own metrics) alone and then with 50 client threads each sending requests back to back
//! (a mix of project listings, a project read, the pipeline's status with metrics, and project
//! creation). It prints both frame rates, their ratio, and the API's request rate and latency
//! percentiles. The clients share the cores with the server; the last row runs them at nice 19,
//! as if they ran elsewhere.

#[path = "../tests/common/server.rs"]
#[allow(dead_code)]
mod server;

use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use serde_json::{Value, json};
use server::Server;

const CLIENTS: usize = 50;

fn json_call(request: reqwest::blocking::RequestBuilder) -> Value {
    let response = request.send().expect("answer");
    assert!(response.status().is_success(), "{}", response.status());
    response.json().unwrap_or(Value::Null)
}

/// Frames the sink has taken so far.
fn sink_frames(http: &Client, base: &str, pipeline: &str) -> u64 {
    let status = json_call(http.get(format!("{base}/api/active-pipelines/{pipeline}")));
    status["metrics"]["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["id"] == "out"))
        .and_then(|n| n["packets_in"].as_u64())
        .unwrap_or(0)
}

/// Frames per second into the sink over `window`.
fn frame_rate(http: &Client, base: &str, pipeline: &str, window: Duration) -> f64 {
    let before = sink_frames(http, base, pipeline);
    let started = Instant::now();
    std::thread::sleep(window);
    let after = sink_frames(http, base, pipeline);
    (after - before) as f64 / started.elapsed().as_secs_f64()
}

/// 50 clients for `window`, their threads at nice value `nice`: (requests, latencies sorted).
fn load(
    base: &str,
    project: &str,
    pipeline: &str,
    window: Duration,
    nice: i32,
) -> (usize, Vec<Duration>) {
    let deadline = Instant::now() + window;
    let workers: Vec<_> = (0..CLIENTS)
        .map(|worker| {
            let base = base.to_string();
            let project = project.to_string();
            let pipeline = pipeline.to_string();
            std::thread::spawn(move || {
                if nice != 0 {
                    // SAFETY: plain system calls on this thread's own id.
                    unsafe {
                        let thread = libc::syscall(libc::SYS_gettid) as libc::id_t;
                        libc::setpriority(libc::PRIO_PROCESS, thread, nice);
                    }
                }
                let http = Client::builder()
                    .timeout(Duration::from_secs(30))
                    .build()
                    .expect("client");
                let mut latencies = Vec::new();
                let mut turn = worker;
                while Instant::now() < deadline {
                    let request = match turn % 4 {
                        0 => http.get(format!("{base}/api/projects?limit=20")),
                        1 => http.get(format!("{base}/api/projects/{project}")),
                        2 => http.get(format!("{base}/api/active-pipelines/{pipeline}")),
                        _ => http
                            .post(format!("{base}/api/projects"))
                            .json(&json!({"name": format!("load {worker}-{turn}")})),
                    };
                    let started = Instant::now();
                    let response = request.send().expect("answer");
                    assert!(response.status().is_success(), "{}", response.status());
                    let _ = response.bytes();
                    latencies.push(started.elapsed());
                    turn += 1;
                }
                latencies
            })
        })
        .collect();
    let mut latencies: Vec<Duration> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("worker"))
        .collect();
    latencies.sort();
    (latencies.len(), latencies)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

fn main() {
    let seconds: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10);
    let window = Duration::from_secs(seconds);
    let http = Client::new();
    println!(
        "{CLIENTS} API clients, {seconds} s windows, {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    // The clients share the machine's cores with the server and the pipeline. The last row runs
    // them at the lowest priority, as if they ran on other machines (as API clients do).
    for (label, realtime, clients_nice) in [
        ("camera-paced 30 FPS", true, 0),
        ("unpaced", false, 0),
        ("unpaced, clients at nice 19", false, 19),
    ] {
        // A fresh server per row: the clients create projects, and a table grown by an earlier
        // row would make this row's listings slower.
        let dir = tempfile::tempdir().expect("temp dir");
        let server = Server::start(dir.path(), None);
        let base = server.base.clone();
        let project = json_call(
            http.post(format!("{base}/api/projects"))
                .json(&json!({"name": "load"})),
        )["id"]
            .as_str()
            .expect("project id")
            .to_string();
        let graph = json!({
            "name": "load",
            "nodes": [
                {"id": "camera", "op": "source.synthetic",
                 "params": {"width": 640, "height": 480, "fps": 30, "realtime": realtime, "pattern": "checkerboard"}},
                {"id": "preprocess", "op": "preprocess", "params": {"width": 256, "height": 256}},
                {"id": "jpeg", "op": "encode.jpeg", "params": {"quality": 85}},
                {"id": "out", "op": "sink.null"}
            ],
            "edges": [
                {"from": "camera", "to": "preprocess"},
                {"from": "preprocess", "to": "jpeg"},
                {"from": "jpeg", "to": "out"}
            ]
        });
        let pipeline = json_call(
            http.post(format!("{base}/api/projects/{project}/pipelines"))
                .json(&json!({"name": label, "graph": graph})),
        )["id"]
            .as_str()
            .expect("pipeline id")
            .to_string();
        json_call(
            http.post(format!("{base}/api/active-pipelines"))
                .json(&json!({"pipeline_id": pipeline})),
        );
        std::thread::sleep(Duration::from_secs(1));
        let alone = frame_rate(&http, &base, &pipeline, window);
        let loaded = std::thread::scope(|scope| {
            let clients = scope.spawn(|| load(&base, &project, &pipeline, window, clients_nice));
            std::thread::sleep(Duration::from_millis(200));
            let rate = frame_rate(&http, &base, &pipeline, window - Duration::from_millis(400));
            (rate, clients.join().expect("clients"))
        });
        let (under_load, (requests, latencies)) = loaded;
        json_call(http.delete(format!("{base}/api/active-pipelines/{pipeline}")));
        println!(
            "{label:<28} pipeline {alone:7.1} FPS alone, {under_load:7.1} FPS under load ({:.2}x); API {:.0} req/s, latency p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            under_load / alone,
            requests as f64 / window.as_secs_f64(),
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.95),
            percentile(&latencies, 0.99),
            percentile(&latencies, 1.0),
        );
    }
}
