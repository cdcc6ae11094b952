//! Sustained throughput of the network sinks against real receivers on 127.0.0.1: `sink.mqtt`
//! (QoS 1) into a mosquitto broker, `sink.nats` into a nats-server with JetStream (each message
//! acknowledged, stored on disk), and `sink.webhook` into a warp HTTP server that answers 204.
//! Each runs `source.synthetic` (640x480) into the sink over a `block` edge, so every message is
//! delivered, once with prediction messages only and once with the frame attached as an inline
//! JPEG (`output_formats: [predictions, image_original]`).
//!
//!     cargo bench --bench sinks [-- MESSAGES]
//!
//! Prints messages per second (whole graph, start to end, the MQTT and NATS sinks waiting for
//! every acknowledgement) and the average message size.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use inspectflow::graph;
use inspectflow::operators::Registry;
use inspectflow::runtime::Pipeline;
use warp::Filter;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A mosquitto broker on a free port; killed when dropped.
struct Broker(Child, u16);

impl Broker {
    fn start(dir: &std::path::Path) -> Self {
        let port = free_port();
        let config = dir.join("mosquitto.conf");
        std::fs::write(
            &config,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\n"),
        )
        .expect("write mosquitto.conf");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (scripts/setup.sh installs it)");
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "mosquitto");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self(child, port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A nats-server with JetStream storing under `dir`, on a free port; killed when dropped.
struct Nats(Child, u16);

impl Nats {
    fn start(dir: &std::path::Path) -> Self {
        let port = free_port();
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.join("jetstream"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (scripts/setup.sh installs it)");
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(10), "nats-server");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self(child, port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A warp server answering 204 to every POST, counting requests and bytes.
fn start_receiver(requests: Arc<AtomicU64>, bytes: Arc<AtomicU64>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let route = warp::post()
        .and(warp::body::bytes())
        .map(move |body: bytes::Bytes| {
            requests.fetch_add(1, Ordering::Relaxed);
            bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
            warp::http::StatusCode::NO_CONTENT
        });
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        runtime.block_on(async move {
            listener.set_nonblocking(true).expect("non-blocking");
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            warp::serve(route).incoming(listener).run().await;
        });
    });
    port
}

/// Runs `sink` (a YAML node body) behind `source.synthetic`; returns messages per second.
fn run(registry: &Registry, messages: u64, sink: &str) -> f64 {
    let yaml = format!(
        "name: bench\nnodes:\n  - {{id: camera, op: source.synthetic, params: {{width: 640, height: 480, frames: {messages}}}}}\n  - {{id: out, {sink}}}\nedges:\n  - {{from: camera, to: out, queue: {{capacity: 16, policy: block}}}}\n"
    );
    let graph = graph::load_str(
        "bench.yaml",
        &yaml,
        false,
        registry,
        &graph::GraphLimits::DEFAULT,
    )
    .unwrap_or_else(|errors| panic!("{errors}"));
    let started = Instant::now();
    let pipeline = Pipeline::start(&graph).unwrap_or_else(|e| panic!("{e}"));
    let outcome = pipeline.wait();
    let seconds = started.elapsed().as_secs_f64();
    assert!(outcome.failure.is_none(), "{:?}", outcome.failure);
    messages as f64 / seconds
}

fn main() {
    let messages: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5000);
    let with_images = (messages / 10).max(100);
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = Broker::start(dir.path());
    let nats = Nats::start(dir.path());
    let (requests, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let port = start_receiver(Arc::clone(&requests), Arc::clone(&bytes));
    let registry = Registry::builtin();
    let images = "output_formats: [predictions, image_original], image_quality: 85";
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("sinks on 127.0.0.1, {cores} cores, 640x480 frames, block edges");
    let source_alone = run(&registry, messages, "op: sink.null");
    println!("source.synthetic -> sink.null (the ceiling): {source_alone:.0} frames/s");
    for (label, count, extra) in [
        ("messages only", messages, ""),
        ("with a JPEG", with_images, images),
    ] {
        let mqtt = format!(
            "op: sink.mqtt, params: {{host: 127.0.0.1, port: {}, topic: \"bench/{{stream}}\", qos: 1, {extra}}}",
            broker.1
        );
        let rate = run(&registry, count, &mqtt);
        println!("sink.mqtt QoS 1, {label}: {rate:.0} messages/s ({count} messages)");
        // A stream per round, so that every round's messages are new (no duplicates).
        let jetstream = format!(
            "op: sink.nats, params: {{url: \"nats://127.0.0.1:{}\", subject: \"bench.{}.{{stream}}\", stream: BENCH_{}, {extra}}}",
            nats.1,
            count,
            extra.len()
        );
        let rate = run(&registry, count, &jetstream);
        println!("sink.nats JetStream, {label}: {rate:.0} messages/s ({count} messages)");
        let (before_requests, before_bytes) = (
            requests.load(Ordering::Relaxed),
            bytes.load(Ordering::Relaxed),
        );
        let webhook =
            format!("op: sink.webhook, params: {{url: \"http://127.0.0.1:{port}/\", {extra}}}");
        let rate = run(&registry, count, &webhook);
        let sent = requests.load(Ordering::Relaxed) - before_requests;
        let size = (bytes.load(Ordering::Relaxed) - before_bytes) / sent.max(1);
        assert_eq!(sent, count, "every request arrived");
        println!(
            "sink.webhook POST, {label}: {rate:.0} requests/s ({count} requests, {size} bytes each)"
        );
    }
}
