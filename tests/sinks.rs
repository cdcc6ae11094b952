//! Result sinks against real receivers on 127.0.0.1: a mosquitto broker (started, restarted and
//! stopped by the tests), a warp HTTP server that fails before it accepts, a TCP listener that
//! never answers, and folders. Every message is checked against the published JSON Schema.

mod common;

use std::collections::BTreeSet;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{graph_from_yaml, registry_with_probe, run_to_end};
use inspectflow::runtime::{MetricsReport, NodeReport};

const LIMIT: Duration = Duration::from_secs(90);

fn message_schema() -> jsonschema::Validator {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/prediction-message.schema.json"),
    )
    .expect("schemas/prediction-message.schema.json (run `inspectflow schemas`)");
    let schema: serde_json::Value = serde_json::from_str(&text).expect("schema is JSON");
    jsonschema::validator_for(&schema).expect("schema compiles")
}

/// Parses `payload` and checks it against the message schema.
fn valid_message(validator: &jsonschema::Validator, payload: &[u8]) -> serde_json::Value {
    let message: serde_json::Value = serde_json::from_slice(payload).expect("payload is JSON");
    let errors: Vec<String> = validator
        .iter_errors(&message)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:?} in {message}");
    message
}

fn node<'a>(report: &'a MetricsReport, id: &str) -> &'a NodeReport {
    report
        .nodes
        .iter()
        .find(|n| n.id == id)
        .unwrap_or_else(|| panic!("node {id} in the report"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A mosquitto broker on 127.0.0.1 that keeps sessions on disk, stopped when dropped.
struct Broker {
    config: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Broker {
    fn start(dir: &Path) -> Self {
        let port = free_port();
        let config = dir.join("mosquitto.conf");
        // Started as root, mosquitto switches to the user `mosquitto`, which cannot write the
        // session store into our temporary directory: stay the current user.
        let user = Command::new("id")
            .arg("-un")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .expect("id runs");
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nuser {user}\npersistence true\n\
                 persistence_location {}/\nmax_queued_messages 100000\n",
                dir.display()
            ),
        )
        .expect("write mosquitto.conf");
        let mut broker = Self {
            config,
            port,
            child: None,
        };
        broker.resume();
        broker
    }

    fn resume(&mut self) {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto runs (scripts/setup.sh installs it)");
        self.child = Some(child);
        let port = self.port;
        wait_for("mosquitto to listen", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// SIGTERM, as a service manager stops it (mosquitto saves its sessions), and wait.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let status = Command::new("sh")
                .arg("-c")
                .arg(format!("kill -TERM {}", child.id()))
                .status()
                .expect("sh runs");
            assert!(status.success());
            let started = Instant::now();
            while child.try_wait().expect("wait").is_none() {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "mosquitto hangs"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A subscriber with a persistent session that collects every payload, reconnecting by itself.
struct Subscriber {
    payloads: Arc<Mutex<Vec<Vec<u8>>>>,
    client: rumqttc::Client,
}

impl Subscriber {
    fn start(port: u16, topic: &str) -> Self {
        let mut options = rumqttc::MqttOptions::new("test-subscriber", "127.0.0.1", port);
        options.set_clean_session(false);
        let (client, mut connection) = rumqttc::Client::new(options, 16);
        let payloads: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let subscribed = Arc::new(AtomicUsize::new(0));
        let (seen, acked) = (Arc::clone(&payloads), Arc::clone(&subscribed));
        let resubscribe = client.clone();
        let topic = topic.to_string();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        let _ = resubscribe.try_subscribe(topic.clone(), rumqttc::QoS::AtLeastOnce);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(publish))) => {
                        seen.lock()
                            .expect("payloads")
                            .push(publish.payload.to_vec());
                    }
                    Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        wait_for("the subscription", Duration::from_secs(10), || {
            subscribed.load(Ordering::SeqCst) > 0
        });
        Self { payloads, client }
    }

    fn count(&self) -> usize {
        self.payloads.lock().expect("payloads").len()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
    }
}

#[test]
fn mqtt_qos1_loses_nothing_across_a_broker_restart_and_every_message_matches_the_schema() {
    const FRAMES: u64 = 200;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut broker = Broker::start(dir.path());
    let subscriber = Subscriber::start(broker.port, "lines/#");
    let (registry, _) = registry_with_probe();
    // A live-paced camera (100 FPS for 2 s) so that the restart falls in the middle of the run;
    // the edge into the sink blocks, so nothing is dropped while the broker is away.
    let yaml = format!(
        r#"
name: line-7
nodes:
  - {{id: camera, op: source.synthetic, params: {{width: 64, height: 48, frames: {FRAMES}, fps: 100, realtime: true}}}}
  - {{id: verdict, op: test.verdict, params: {{anomalous_every: 4}}}}
  - id: mqtt
    op: sink.mqtt
    params: {{host: 127.0.0.1, port: {}, topic: "lines/{{pipeline}}/{{stream}}", qos: 1, initial_backoff_ms: 50, max_backoff_ms: 200}}
edges:
  - {{from: camera, to: verdict, queue: {{policy: block}}}}
  - {{from: verdict, to: mqtt, queue: {{capacity: 8, policy: block}}}}
"#,
        broker.port
    );
    let graph = graph_from_yaml(&registry, &yaml);
    let outcome = std::thread::scope(|scope| {
        let run = scope.spawn(|| run_to_end(&graph, LIMIT));
        wait_for("the first messages", LIMIT, || subscriber.count() >= 40);
        broker.stop();
        std::thread::sleep(Duration::from_millis(500));
        broker.resume();
        run.join().expect("run thread")
    });
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    let received = || -> BTreeSet<u64> {
        let payloads = subscriber.payloads.lock().expect("payloads");
        payloads
            .iter()
            .filter_map(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
            .filter_map(|m| m["sequence"].as_u64())
            .collect()
    };
    let started = Instant::now();
    while received().len() as u64 != FRAMES {
        let missing: Vec<u64> = (0..FRAMES).filter(|n| !received().contains(n)).collect();
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the subscriber lacks {} messages: {missing:?} (sink: {:?})",
            missing.len(),
            node(&outcome.report, "mqtt").sink
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let schema = message_schema();
    let payloads = subscriber.payloads.lock().expect("payloads").clone();
    let mut sequences = BTreeSet::new();
    for payload in &payloads {
        let message = valid_message(&schema, payload);
        assert_eq!(message["pipeline"], "line-7");
        assert_eq!(message["stream"], "camera");
        let sequence = message["sequence"].as_u64().expect("sequence");
        assert_eq!(
            message["prediction"]["anomalous"].as_bool(),
            Some(sequence.is_multiple_of(4))
        );
        assert_eq!(message["prediction"]["model"], "test-model");
        sequences.insert(sequence);
    }
    assert_eq!(sequences, (0..FRAMES).collect::<BTreeSet<_>>());
    let sink = node(&outcome.report, "mqtt")
        .sink
        .clone()
        .expect("sink report");
    assert!(
        sink.outages >= 1,
        "the restart shows as an outage: {sink:?}"
    );
    assert_eq!(sink.failed, 0, "{sink:?}");
    assert_eq!(sink.state, "online");
}

/// An HTTP receiver (warp) that answers 503 to the first `failures` requests, then records each
/// body and answers 200.
struct Receiver {
    url: String,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
    requests: Arc<AtomicUsize>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start(failures: usize) -> Self {
        use warp::Filter;
        let bodies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let requests = Arc::new(AtomicUsize::new(0));
        let (seen, count) = (Arc::clone(&bodies), Arc::clone(&requests));
        let route = warp::post()
            .and(warp::path("hook"))
            .and(warp::header::exact("content-type", "application/json"))
            .and(warp::header::exact("x-line", "7"))
            .and(warp::body::bytes())
            .map(move |body: bytes::Bytes| {
                if count.fetch_add(1, Ordering::SeqCst) < failures {
                    return warp::http::StatusCode::SERVICE_UNAVAILABLE;
                }
                seen.lock().expect("bodies").push(body.to_vec());
                warp::http::StatusCode::NO_CONTENT
            });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            runtime.block_on(async move {
                listener.set_nonblocking(true).expect("non-blocking");
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                warp::serve(route)
                    .incoming(listener)
                    .graceful(async {
                        let _ = stopped.await;
                    })
                    .run()
                    .await;
            });
        });
        Self {
            url: format!("http://127.0.0.1:{port}/hook"),
            bodies,
            requests,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn webhook_retries_a_receiver_that_answers_503_and_delivers_every_result_once_in_order() {
    const FRAMES: u64 = 60;
    let receiver = Receiver::start(3);
    let (registry, _) = registry_with_probe();
    let yaml = format!(
        r#"
name: line-7
nodes:
  - {{id: camera, op: source.synthetic, params: {{width: 64, height: 48, frames: {FRAMES}}}}}
  - {{id: verdict, op: test.verdict, params: {{anomalous_every: 5}}}}
  - id: hook
    op: sink.webhook
    params:
      url: "{}"
      headers: {{x-line: "7"}}
      retries: 5
      initial_backoff_ms: 20
      output_formats: [predictions, image_with_predictions]
edges:
  - {{from: camera, to: verdict}}
  - {{from: verdict, to: hook, queue: {{capacity: 4, policy: block}}}}
"#,
        receiver.url
    );
    let outcome = run_to_end(&graph_from_yaml(&registry, &yaml), LIMIT);
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    let schema = message_schema();
    let bodies = receiver.bodies.lock().expect("bodies").clone();
    let sequences: Vec<u64> = bodies
        .iter()
        .map(|body| {
            let message = valid_message(&schema, body);
            assert_eq!(message["images"]["with_predictions"]["format"], "jpeg");
            assert!(message["images"].get("original").is_none());
            message["sequence"].as_u64().expect("sequence")
        })
        .collect();
    assert_eq!(
        sequences,
        (0..FRAMES).collect::<Vec<_>>(),
        "once each, in order"
    );
    assert_eq!(
        receiver.requests.load(Ordering::SeqCst),
        FRAMES as usize + 3
    );
    let sink = node(&outcome.report, "hook")
        .sink
        .clone()
        .expect("sink report");
    assert_eq!(
        (sink.outages, sink.failed, sink.state.as_str()),
        (1, 0, "online")
    );
}

#[test]
fn a_receiver_that_never_answers_makes_the_webhook_drop_by_its_policy_while_the_folder_gets_everything()
 {
    const FRAMES: u64 = 150;
    // Accepts connections and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("address").port();
    let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let holder = Arc::clone(&held);
    std::thread::spawn(move || {
        for stream in silent.incoming().flatten() {
            holder.lock().expect("held").push(stream);
        }
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let (registry, _) = registry_with_probe();
    let yaml = format!(
        r#"
nodes:
  - {{id: camera, op: source.synthetic, params: {{width: 64, height: 48, frames: {FRAMES}}}}}
  - {{id: hook, op: sink.webhook, params: {{url: "http://127.0.0.1:{port}/hook", timeout_ms: 100, retries: 0}}}}
  - {{id: records, op: sink.folder, params: {{path: "{}", format: none}}}}
edges:
  - {{from: camera, to: hook, queue: {{capacity: 4, policy: drop_oldest}}}}
  - {{from: camera, to: records, queue: {{capacity: 4, policy: block}}}}
"#,
        dir.path().display()
    );
    let outcome = run_to_end(&graph_from_yaml(&registry, &yaml), LIMIT);
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    let lines = std::fs::read_to_string(dir.path().join("results.jsonl")).expect("index");
    assert_eq!(
        lines.lines().count() as u64,
        FRAMES,
        "the folder got every frame"
    );
    let hook = node(&outcome.report, "hook");
    let sink = hook.sink.clone().expect("sink report");
    assert!(hook.drops > 0, "the webhook's edge dropped: {hook:?}");
    assert_eq!(
        hook.packets_in + hook.drops,
        FRAMES,
        "every frame is delivered or counted"
    );
    assert_eq!(
        sink.failed, hook.packets_in,
        "each attempt timed out and was counted"
    );
    assert_eq!(sink.state, "offline");
    assert_eq!(node(&outcome.report, "records").drops, 0);
}

fn folder_lines(dir: &Path) -> Vec<serde_json::Value> {
    let schema = message_schema();
    std::fs::read_to_string(dir.join("results.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|line| valid_message(&schema, line.as_bytes()))
        .collect()
}

fn run_folder(
    params: &str,
    frames: u64,
) -> (tempfile::TempDir, Vec<serde_json::Value>, NodeReport) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (registry, _) = registry_with_probe();
    // 30 FPS on test.verdict's fixed clock; every third frame anomalous.
    let yaml = format!(
        r#"
nodes:
  - {{id: camera, op: source.synthetic, params: {{width: 32, height: 24, frames: {frames}}}}}
  - {{id: verdict, op: test.verdict, params: {{anomalous_every: 3, fps: 30}}}}
  - {{id: records, op: sink.folder, params: {{path: "{}", {params}}}}}
edges:
  - {{from: camera, to: verdict}}
  - {{from: verdict, to: records, queue: {{policy: block}}}}
"#,
        dir.path().display()
    );
    let outcome = run_to_end(&graph_from_yaml(&registry, &yaml), LIMIT);
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    let lines = folder_lines(dir.path());
    let report = node(&outcome.report, "records").clone();
    (dir, lines, report)
}

fn sequences(lines: &[serde_json::Value]) -> Vec<u64> {
    lines
        .iter()
        .map(|l| l["sequence"].as_u64().expect("sequence"))
        .collect()
}

#[test]
fn rate_limit_and_anomalous_only_give_exact_counts() {
    // 90 frames at 30 FPS limited to 5 per second: every sixth frame.
    let (_dir, lines, report) = run_folder("format: none, rate_limit: 5", 90);
    assert_eq!(sequences(&lines), (0..90).step_by(6).collect::<Vec<_>>());
    assert_eq!(report.sink.expect("sink report").skipped, 75);

    // Every third frame is anomalous: 30 of 90.
    let (_dir, lines, _) = run_folder("format: none, only_anomalous: true", 90);
    assert_eq!(sequences(&lines), (0..90).step_by(3).collect::<Vec<_>>());
    assert!(
        lines
            .iter()
            .all(|l| l["prediction"]["label"] == "Anomalous")
    );

    // Both: anomalous frames, at most 2 per second (one per 15 frames).
    let (_dir, lines, _) = run_folder("format: none, only_anomalous: true, rate_limit: 2", 90);
    assert_eq!(sequences(&lines), vec![0, 15, 30, 45, 60, 75]);
}

#[test]
fn folder_writes_the_images_asked_for_and_keeps_only_the_last_ones() {
    let (dir, lines, _) = run_folder(
        "format: png, output_formats: [image_original, image_with_predictions, predictions], \
         retention: {keep_last: 10}",
        30,
    );
    assert_eq!(lines.len(), 30);
    let mut files: Vec<String> = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".png"))
        .collect();
    files.sort();
    // Two images per frame, the last ten images: frames 25 to 29.
    let expected: Vec<String> = (25..30)
        .flat_map(|n| {
            [
                format!("camera_{n:08}.png"),
                format!("camera_{n:08}_original.png"),
            ]
        })
        .collect();
    assert_eq!(files, expected);
    let last = lines.last().expect("a line");
    assert_eq!(
        last["images"]["original"]["file"],
        "camera_00000029_original.png"
    );
    assert_eq!(
        last["images"]["with_predictions"]["file"],
        "camera_00000029.png"
    );
    assert!(last["prediction"]["score"].as_f64().is_some());
}

#[test]
fn folder_sink_into_a_missing_or_unwritable_directory_fails_before_the_run_and_says_where() {
    let (registry, _) = registry_with_probe();
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("not-there");
    // /proc refuses new files even to root, so this holds when the tests run as root.
    for (path, expected) in [
        (missing.display().to_string(), "does not exist"),
        ("/proc".to_string(), "cannot write the index"),
    ] {
        let yaml = format!(
            "nodes:\n  - {{id: camera, op: source.synthetic, params: {{frames: 1}}}}\n  - {{id: records, op: sink.folder, params: {{path: \"{path}\"}}}}\nedges:\n  - {{from: camera, to: records}}\n"
        );
        let graph = graph_from_yaml(&registry, &yaml);
        let error = inspectflow::runtime::Pipeline::start(&graph)
            .err()
            .map(|e| e.to_string())
            .expect("refused");
        assert!(error.contains("records"), "{error}");
        assert!(error.contains(expected), "{error}");
        assert!(error.contains(&path), "{error}");
    }
}
