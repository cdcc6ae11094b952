//! `sink.nats`: publishes each result as a prediction message (JSON) to NATS JetStream, at least
//! once.
//!
//! A background thread runs the NATS client (async-nats on a single-threaded tokio runtime). The
//! client connects, and reconnects by itself when the server goes away; the sink shows offline in
//! the metrics meanwhile. Every message carries a message id, `{pipeline}/{run}/{stream}/
//! {sequence}` (the `Nats-Msg-Id` header), and is published until JetStream acknowledges it: a
//! publish that fails or whose acknowledgement does not come within `ack_timeout_ms` is sent
//! again after a doubling backoff, with the same id, so JetStream stores it once (within the
//! stream's duplicate window) however often it was sent. At most `max_in_flight` messages wait
//! for acknowledgement; beyond that the sink waits, and its input edge decides (by its policy)
//! whether the pipeline waits too or old results are dropped and counted. Nothing is lost across
//! a server restart as long as the stream is kept on disk (file storage, the default of a stream
//! this sink creates).
//!
//! The run part of the id is the same for every engine that runs one fleet pipeline's desired
//! state, so when a pipeline moves to another engine and replays its file from the start,
//! JetStream drops the results it already has (acknowledged as duplicates, counted here as
//! `skipped`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, message::PublishMessage, stream};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::Deserialize;

use super::message::{
    Dispatch, DispatchParams, InlineImages, OutputFormat, check_ca_file, check_credentials,
    sign_in_password,
};
use crate::contract::{
    EndpointHealth, OpError, OperatorInstance, OperatorKind, PortType, Sink, SinkContext,
    StopSignal,
};
use crate::packet::Packet;
use crate::registry::{OperatorDescriptor, ParamError};
use crate::retry::RetrySettings;
use crate::transform::encode::check_quality;

/// TLS settings of `sink.nats`.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NatsTls {
    /// PEM file of the certificate authority that signed the server's certificate; the
    /// system's trusted authorities when not given.
    #[schemars(with = "Option<crate::params::FileParam>")]
    pub ca_file: Option<PathBuf>,
}

/// Parameters of `sink.nats`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NatsParams {
    /// Server address, `nats://host:port` (`tls://host:port` for TLS); several separated by
    /// commas for a cluster.
    #[schemars(length(min = 1))]
    pub url: String,
    /// Subject to publish to; `{pipeline}`, `{stream}` and `{node}` are replaced (characters
    /// that NATS reserves in subjects become `_`).
    #[schemars(length(min = 1))]
    pub subject: String,
    /// JetStream stream to create when it does not exist, capturing this sink's subjects (each
    /// `{...}` placeholder as a `*` wildcard), kept on disk. Without it, a stream capturing the
    /// subject must exist.
    pub stream: Option<String>,
    /// How long JetStream remembers message ids to drop copies sent again, in seconds (a
    /// stream this sink creates).
    #[serde(default = "default_duplicate_window_s")]
    #[schemars(range(min = 1))]
    pub duplicate_window_s: u64,
    /// User name.
    pub username: Option<String>,
    /// Password (prefer `password_env`, which keeps it out of the graph file).
    pub password: Option<String>,
    /// Name of the environment variable that holds the password (not one of inspectflow's own
    /// `INSPECTFLOW_*` settings).
    pub password_env: Option<String>,
    /// TLS to the server; plain TCP when not given (unless the URL says `tls://`).
    pub tls: Option<NatsTls>,
    /// Messages that may wait for JetStream's acknowledgement at once.
    #[serde(default = "default_max_in_flight")]
    #[schemars(range(min = 1, max = 65535))]
    pub max_in_flight: u32,
    /// How long to wait for JetStream's acknowledgement of one publish before sending it again,
    /// in milliseconds.
    #[serde(default = "default_ack_timeout_ms")]
    #[schemars(range(min = 10))]
    pub ack_timeout_ms: u64,
    /// The wait between attempts (`initial_backoff_ms`, `max_backoff_ms`).
    #[serde(flatten)]
    pub retry: RetrySettings,
    /// At the end of a run, how long to wait for JetStream to acknowledge what was sent.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// JPEG quality of the images sent inline (1-100).
    #[serde(default = "default_image_quality")]
    #[schemars(range(min = 1, max = 100))]
    pub image_quality: u8,
    /// Which results are published and what they carry (default output format: `predictions`).
    #[serde(flatten)]
    pub dispatch: DispatchParams,
}

fn default_duplicate_window_s() -> u64 {
    600
}
fn default_max_in_flight() -> u32 {
    256
}
fn default_ack_timeout_ms() -> u64 {
    5_000
}
fn default_drain_timeout_ms() -> u64 {
    30_000
}
fn default_image_quality() -> u8 {
    85
}

/// Characters NATS gives a meaning in subjects (separators, wildcards, white space).
const SUBJECT_RESERVED: [char; 7] = ['.', '*', '>', ' ', '\t', '\n', '\r'];

impl NatsParams {
    /// The rules the schema cannot express: a subject without wildcards or empty tokens, a
    /// stream name NATS accepts, the backoff in order, one way of giving the password and a
    /// user name with it, the dispatch settings and the JPEG quality. (Whether `password_env` is
    /// set and `tls.ca_file` exists are checked when the sink is built, where it runs.)
    pub fn validate(&self) -> Result<(), ParamError> {
        if self.url.split(',').any(|url| url.trim().is_empty()) {
            return Err(ParamError::new(
                "url",
                format!("'{}' names an empty server address", self.url),
            ));
        }
        let wildcard = self.subject.split('.').any(|token| {
            token.is_empty() || token == "*" || token == ">" || token.contains([' ', '\t', '\n'])
        });
        if wildcard {
            return Err(ParamError::new(
                "subject",
                format!(
                    "'{}' is not a subject to publish to (dot-separated tokens, none empty, no * \
                     or > wildcards, no white space)",
                    self.subject
                ),
            ));
        }
        if let Some(name) = &self.stream
            && (name.is_empty()
                || name.len() > 255
                || name.contains(['.', '*', '>', '/', '\\', ' ', '\t', '\n']))
        {
            return Err(ParamError::new(
                "stream",
                format!(
                    "'{name}' is not a JetStream stream name (1-255 characters, no . * > / \\ or \
                     white space)"
                ),
            ));
        }
        if self.max_in_flight == 0 || self.max_in_flight > 65535 {
            return Err(ParamError::new(
                "max_in_flight",
                format!("must be 1-65535, got {}", self.max_in_flight),
            ));
        }
        self.retry.validate()?;
        check_credentials(&self.username, &self.password, &self.password_env)?;
        self.dispatch.validate()?;
        check_quality("image_quality", self.image_quality)
    }

    /// The subjects a stream created by the sink captures: each placeholder a `*`.
    fn stream_subject(&self) -> String {
        self.subject
            .replace("{pipeline}", "*")
            .replace("{stream}", "*")
            .replace("{node}", "*")
    }
}

/// The registry entry.
pub fn descriptor() -> OperatorDescriptor {
    OperatorDescriptor::builder::<NatsParams>(
        "sink.nats",
        OperatorKind::Sink,
        "Publishes each result as a JSON prediction message to NATS JetStream, at least once: acknowledged publishes with message ids that JetStream de-duplicates, sent again across outages and server restarts; waits (backpressure) while the server is away.",
    )
    .input("in", PortType::Image)
    .validate(NatsParams::validate)
    .build_with(|params, _context| Ok(OperatorInstance::Sink(Box::new(NatsSink::new(params)?))))
}

/// Counters shared with the client thread.
#[derive(Default)]
struct Progress {
    /// Messages handed to the client thread.
    handed: AtomicU64,
    /// Messages JetStream acknowledged (stored, or recognised as a duplicate).
    acknowledged: AtomicU64,
    /// Of those, the ones JetStream already had (a message id it had seen).
    duplicates: AtomicU64,
    /// Messages the server can never take (larger than its payload limit), counted as failed
    /// when refused.
    refused: AtomicU64,
    /// The sink gives up on what is not acknowledged: the thread ends.
    closing: AtomicBool,
}

impl Progress {
    fn outstanding(&self) -> u64 {
        let handed = self.handed.load(Ordering::SeqCst);
        handed.saturating_sub(
            self.acknowledged.load(Ordering::SeqCst) + self.refused.load(Ordering::SeqCst),
        )
    }
}

/// One message for the client thread.
struct Outgoing {
    subject: String,
    id: String,
    payload: Bytes,
}

/// What the client thread needs.
struct ClientSettings {
    servers: Vec<String>,
    credentials: Option<(String, String)>,
    tls_ca_file: Option<PathBuf>,
    tls: bool,
    stream: Option<stream::Config>,
    ack_timeout: Duration,
    max_in_flight: usize,
    retry: RetrySettings,
    name: String,
}

/// The running sink.
pub struct NatsSink {
    params: NatsParams,
    password: Option<String>,
    dispatch: Dispatch,
    images: InlineImages,
    pipeline: Arc<str>,
    node: Arc<str>,
    run: Arc<str>,
    stop: StopSignal,
    health: Arc<EndpointHealth>,
    progress: Arc<Progress>,
    /// The channel to the client thread, and the thread, from `attach` on.
    client: Option<(tokio::sync::mpsc::Sender<Outgoing>, JoinHandle<()>)>,
}

impl NatsSink {
    /// Checks the parameters, the password's variable and the TLS authority's file (nothing
    /// connects before the pipeline runs).
    pub fn new(mut params: NatsParams) -> Result<Self, OpError> {
        params.validate()?;
        let password = sign_in_password(&params.password, &params.password_env)?;
        check_ca_file(params.tls.as_ref().and_then(|tls| tls.ca_file.as_ref()))?;
        let dispatch = Dispatch::new(
            std::mem::take(&mut params.dispatch),
            &[OutputFormat::Predictions],
        )?;
        Ok(Self {
            images: InlineImages::new(params.image_quality)?,
            params,
            password,
            dispatch,
            pipeline: Arc::from(""),
            node: Arc::from(""),
            run: Arc::from(""),
            stop: StopSignal::new(),
            health: Arc::default(),
            progress: Arc::default(),
            client: None,
        })
    }

    fn settings(&self) -> ClientSettings {
        ClientSettings {
            servers: self
                .params
                .url
                .split(',')
                .map(|url| url.trim().to_string())
                .collect(),
            credentials: self
                .params
                .username
                .clone()
                .map(|user| (user, self.password.clone().unwrap_or_default())),
            tls_ca_file: self.params.tls.as_ref().and_then(|t| t.ca_file.clone()),
            tls: self.params.tls.is_some(),
            stream: self.params.stream.as_ref().map(|name| stream::Config {
                name: name.clone(),
                subjects: vec![self.params.stream_subject()],
                duplicate_window: Duration::from_secs(self.params.duplicate_window_s),
                storage: stream::StorageType::File,
                ..Default::default()
            }),
            ack_timeout: Duration::from_millis(self.params.ack_timeout_ms),
            max_in_flight: self.params.max_in_flight as usize,
            retry: self.params.retry,
            name: format!("inspectflow-{}-{}", self.pipeline, self.node),
        }
    }

    /// The subject for one result.
    fn subject(&self, packet: &Packet) -> String {
        self.params
            .subject
            .replace("{pipeline}", &subject_safe(&self.pipeline))
            .replace("{node}", &subject_safe(&self.node))
            .replace("{stream}", &subject_safe(&packet.frame.stream_id))
    }

    /// Stops the client thread, giving up on what it still holds: counted as failed, and
    /// logged.
    fn close(&mut self) {
        self.progress.closing.store(true, Ordering::SeqCst);
        if let Some((sender, thread)) = self.client.take() {
            drop(sender);
            let _ = thread.join();
            let outstanding = self.progress.outstanding();
            if outstanding > 0 {
                tracing::error!(
                    "sink.nats {}: {outstanding} messages to {} given up unacknowledged",
                    self.node,
                    self.params.url
                );
                for _ in 0..outstanding {
                    self.health.count_failed();
                }
            }
        }
    }
}

impl Sink for NatsSink {
    fn attach(&mut self, ctx: &SinkContext) {
        self.close();
        self.pipeline = Arc::clone(&ctx.pipeline);
        self.node = Arc::clone(&ctx.node_id);
        self.run = Arc::clone(&ctx.run_id);
        self.stop = ctx.stop.clone();
        self.health = Arc::clone(&ctx.health);
        self.progress = Arc::default();
        let settings = self.settings();
        let (sender, messages) = tokio::sync::mpsc::channel(1);
        let progress = Arc::clone(&self.progress);
        let health = Arc::clone(&self.health);
        let stop = self.stop.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("if-{}-nats", self.node))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        health.set_offline(&format!("cannot start the NATS client: {error}"));
                        return;
                    }
                };
                runtime.block_on(drive(messages, settings, &progress, &health, &stop));
            });
        match spawned {
            Ok(thread) => self.client = Some((sender, thread)),
            Err(error) => {
                self.health
                    .set_offline(&format!("cannot start the NATS client thread: {error}"));
            }
        }
    }

    fn consume(&mut self, packet: Packet) -> Result<(), OpError> {
        if !self.dispatch.admit(&packet, &self.health) {
            return Ok(());
        }
        let images = self.images.encode(&self.dispatch, &packet)?;
        let message = self.dispatch.message(&self.pipeline, &packet, images);
        let payload = serde_json::to_vec(&message)
            .map_err(|e| OpError::Failed(format!("serialising a prediction message: {e}")))?;
        let outgoing = Outgoing {
            subject: self.subject(&packet),
            id: format!(
                "{}/{}/{}/{}",
                subject_safe(&self.pipeline),
                subject_safe(&self.run),
                subject_safe(&packet.frame.stream_id),
                packet.frame.sequence
            ),
            payload: Bytes::from(payload),
        };
        let gone = || {
            OpError::Failed(format!(
                "the NATS client for {} is not running: {}",
                self.params.url,
                self.health
                    .last_error()
                    .unwrap_or_else(|| "its thread could not start".into())
            ))
        };
        let Some((sender, _)) = &self.client else {
            self.health.count_failed();
            return Err(gone());
        };
        // Blocks while `max_in_flight` messages wait for acknowledgement (the server is away or
        // slow): the pipeline feels it.
        match sender.blocking_send(outgoing) {
            Ok(()) => {
                self.progress.handed.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            Err(_) => {
                self.health.count_failed();
                Err(gone())
            }
        }
    }

    fn finish(&mut self) -> Result<(), OpError> {
        // No more messages: the client thread ends once the last one is acknowledged.
        if let Some((sender, thread)) = self.client.take() {
            drop(sender);
            let deadline = Instant::now() + Duration::from_millis(self.params.drain_timeout_ms);
            // When the pipeline is stopping, each message gets one more attempt (see `give_up`),
            // so the thread ends soon.
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            self.progress.closing.store(true, Ordering::SeqCst);
            let _ = thread.join();
        }
        for _ in 0..self.progress.duplicates.swap(0, Ordering::SeqCst) {
            self.health.count_skipped();
        }
        let outstanding = self.progress.outstanding();
        if outstanding > 0 {
            for _ in 0..outstanding {
                self.health.count_failed();
            }
            return Err(OpError::Failed(format!(
                "{outstanding} messages were not acknowledged by JetStream at {} within \
                 drain_timeout_ms ({} ms)",
                self.params.url, self.params.drain_timeout_ms
            )));
        }
        Ok(())
    }
}

impl Drop for NatsSink {
    fn drop(&mut self) {
        self.close();
    }
}

/// The client thread: connects (retrying in the background), makes sure the stream exists,
/// then publishes what the sink hands over, at most `max_in_flight` at once, each until it is
/// acknowledged. Ends when the sink drops its sender and everything is acknowledged, or when
/// the sink gives up (`closing`).
async fn drive(
    mut messages: tokio::sync::mpsc::Receiver<Outgoing>,
    settings: ClientSettings,
    progress: &Progress,
    health: &Arc<EndpointHealth>,
    stop: &StopSignal,
) {
    let servers = settings.servers.join(",");
    let retry = settings.retry;
    let mut options = async_nats::ConnectOptions::new()
        .name(&settings.name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(move |attempt| retry.before_attempt(attempt))
        .connection_timeout(Duration::from_secs(2));
    if let Some((user, password)) = settings.credentials.clone() {
        options = options.user_and_password(user, password);
    }
    if let Some(ca_file) = settings.tls_ca_file.clone() {
        options = options.add_root_certificates(ca_file);
    }
    if settings.tls {
        options = options.require_tls(true);
    }
    let events = Arc::clone(health);
    let servers_for_events = servers.clone();
    options = options.event_callback(move |event| {
        let health = Arc::clone(&events);
        let servers = servers_for_events.clone();
        async move {
            match event {
                async_nats::Event::Connected if health.set_online() => {
                    tracing::info!(%servers, "connected to NATS again");
                }
                async_nats::Event::Disconnected
                    if health.set_offline(&format!("{servers}: disconnected")) =>
                {
                    tracing::warn!(%servers, "NATS connection lost");
                }
                _ => {}
            }
        }
    });
    let client = match options.connect(settings.servers.as_slice()).await {
        Ok(client) => client,
        Err(error) => {
            health.set_offline(&format!("{servers}: {error}"));
            return;
        }
    };
    let jetstream = jetstream::ContextBuilder::new()
        .timeout(settings.ack_timeout)
        .ack_timeout(settings.ack_timeout)
        .max_ack_inflight(settings.max_in_flight)
        .build(client);
    if let Some(config) = &settings.stream {
        let mut backoff = settings.retry.initial();
        while let Err(error) = jetstream.get_or_create_stream(config.clone()).await {
            let reason = format!("{servers}: creating stream {}: {error}", config.name);
            if health.set_offline(&reason) {
                tracing::warn!("{reason}");
            }
            if give_up(progress, stop) {
                return;
            }
            pause(backoff, progress).await;
            backoff = settings.retry.next(backoff);
        }
    }
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            message = messages.recv(), if open && in_flight.len() < settings.max_in_flight => {
                match message {
                    Some(message) => in_flight.push(deliver(
                        &jetstream, message, &settings, &servers, progress, health, stop,
                    )),
                    None => open = false,
                }
            }
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                if progress.closing.load(Ordering::SeqCst) {
                    return;
                }
            }
        }
        if !open && in_flight.is_empty() {
            return;
        }
    }
}

/// Publishes one message until JetStream acknowledges it, or the sink gives up.
async fn deliver(
    jetstream: &jetstream::Context,
    message: Outgoing,
    settings: &ClientSettings,
    servers: &str,
    progress: &Progress,
    health: &EndpointHealth,
    stop: &StopSignal,
) {
    let mut backoff = settings.retry.initial();
    loop {
        let publish = PublishMessage::build()
            .payload(message.payload.clone())
            .message_id(&message.id);
        let attempt = async {
            let acknowledgement = jetstream
                .send_publish(message.subject.clone(), publish)
                .await
                .map_err(|e| {
                    let permanent = e.kind() == PublishErrorKind::MaxPayloadExceeded;
                    (e.to_string(), permanent)
                })?;
            acknowledgement.await.map_err(|e| (e.to_string(), false))
        };
        match attempt.await {
            Ok(ack) => {
                if ack.duplicate {
                    progress.duplicates.fetch_add(1, Ordering::SeqCst);
                }
                progress.acknowledged.fetch_add(1, Ordering::SeqCst);
                health.set_online();
                return;
            }
            Err((error, true)) => {
                // Sending it again cannot help: count it and go on.
                tracing::error!(
                    "{servers}: message {} to {} refused: {error}",
                    message.id,
                    message.subject
                );
                progress.refused.fetch_add(1, Ordering::SeqCst);
                health.count_failed();
                return;
            }
            Err((error, false)) => {
                let reason = format!("{servers}: publishing to {}: {error}", message.subject);
                if health.set_offline(&reason) {
                    tracing::warn!("{reason}");
                }
            }
        }
        if give_up(progress, stop) {
            return;
        }
        pause(backoff, progress).await;
        backoff = settings.retry.next(backoff);
    }
}

/// Waits `backoff`, or less when the sink gives up meanwhile.
async fn pause(backoff: Duration, progress: &Progress) {
    let until = tokio::time::Instant::now() + backoff;
    while tokio::time::Instant::now() < until && !progress.closing.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(50).min(backoff)).await;
    }
}

/// Whether to stop trying after a failed attempt: the sink gave up, or the pipeline is stopping
/// (one attempt per message then, as the sink contract says).
fn give_up(progress: &Progress, stop: &StopSignal) -> bool {
    progress.closing.load(Ordering::SeqCst) || stop.is_raised()
}

/// `value` with the characters NATS reserves in subjects replaced by `_`.
fn subject_safe(value: &str) -> String {
    value.replace(SUBJECT_RESERVED, "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(json: serde_json::Value) -> Result<NatsParams, String> {
        let params: NatsParams = serde_json::from_value(json).map_err(|e| e.to_string())?;
        params.validate().map_err(|e| e.to_string())?;
        Ok(params)
    }

    #[test]
    fn subjects_with_wildcards_or_empty_tokens_are_refused_naming_the_field() {
        for subject in ["results.>", "results.*.x", "a..b", ".a", "a b"] {
            let error =
                params(serde_json::json!({"url": "nats://127.0.0.1:4222", "subject": subject}))
                    .expect_err(subject);
            assert!(error.contains("subject"), "{subject}: {error}");
        }
        let error = params(serde_json::json!({
            "url": "nats://127.0.0.1:4222", "subject": "r", "stream": "a.b"
        }))
        .expect_err("dotted stream");
        assert!(error.contains("stream"), "{error}");
        let error = params(serde_json::json!({
            "url": "nats://127.0.0.1:4222", "subject": "r", "password": "p"
        }))
        .expect_err("password without user");
        assert!(error.contains("username"), "{error}");
    }

    #[test]
    fn placeholders_become_safe_tokens_and_stream_wildcards() {
        let params = params(serde_json::json!({
            "url": "nats://127.0.0.1:4222",
            "subject": "plant.{pipeline}.{stream}",
            "stream": "RESULTS"
        }))
        .expect("valid");
        assert_eq!(params.stream_subject(), "plant.*.*");
        assert_eq!(subject_safe("line 1.cam*>"), "line_1_cam__");
    }
}
