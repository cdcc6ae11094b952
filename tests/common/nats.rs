//! A real `nats-server` with JetStream on 127.0.0.1 (Debian's package; scripts/setup.sh installs
//! it), started, killed and restarted by the tests, and a reader of what a stream holds.

use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A nats-server keeping JetStream data in a folder, killed when dropped.
pub struct NatsServer {
    pub port: u16,
    store: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts one on a free port with JetStream stored under `dir`.
    pub fn start(dir: &Path) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut server = Self {
            port,
            store: dir.join("jetstream"),
            log: dir.join("nats-server.log"),
            child: None,
        };
        server.resume();
        server
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server again on the same port and store.
    pub fn resume(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("nats-server log file");
        let child = Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server runs (scripts/setup.sh installs it)");
        self.child = Some(child);
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "nats-server does not listen on {}: {}",
                self.port,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash: nothing is flushed or said goodbye to.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `work` on a fresh single-threaded tokio runtime.
pub fn block_on<T>(work: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(work)
}

/// One message of a stream: its `Nats-Msg-Id` and its payload as JSON.
#[derive(Debug, Clone)]
pub struct Stored {
    pub id: String,
    pub subject: String,
    pub message: serde_json::Value,
}

/// Every message stream `stream` holds (empty when the stream does not exist yet or the server
/// does not answer).
pub fn stored_messages(url: &str, stream: &str) -> Vec<Stored> {
    block_on(async {
        let Ok(client) = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(url)
            .await
        else {
            return Vec::new();
        };
        let jetstream = async_nats::jetstream::new(client);
        let Ok(mut handle) = jetstream.get_stream(stream).await else {
            return Vec::new();
        };
        let Ok(info) = handle.info().await else {
            return Vec::new();
        };
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let mut found = Vec::new();
        for sequence in first.max(1)..=last {
            let Ok(message) = handle.get_raw_message(sequence).await else {
                continue;
            };
            let id = message
                .headers
                .get("Nats-Msg-Id")
                .map(|v| v.as_str().to_string())
                .unwrap_or_default();
            found.push(Stored {
                id,
                subject: message.subject.to_string(),
                message: serde_json::from_slice(&message.payload).expect("a JSON message"),
            });
        }
        found
    })
}

/// How many messages stream `stream` holds now (0 when it cannot be asked).
pub fn stored_count(url: &str, stream: &str) -> u64 {
    block_on(async {
        let Ok(client) = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(url)
            .await
        else {
            return 0;
        };
        let jetstream = async_nats::jetstream::new(client);
        let Ok(mut handle) = jetstream.get_stream(stream).await else {
            return 0;
        };
        handle.info().await.map_or(0, |info| info.state.messages)
    })
}

/// Message ids seen more than once, with their counts.
pub fn repeated_ids(messages: &[Stored]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for message in messages {
        *counts.entry(message.id.clone()).or_insert(0) += 1;
    }
    counts.retain(|_, n| *n > 1);
    counts
}
