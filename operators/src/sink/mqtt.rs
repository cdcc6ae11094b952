//! `sink.mqtt`: publishes each result as a prediction message (JSON) to an MQTT broker.
//!
//! A background thread drives the MQTT connection (rumqttc): it connects, reconnects with a
//! doubling backoff when the broker goes away (the sink shows offline in the metrics meanwhile),
//! and counts the broker's acknowledgements. The sink hands each message to that thread through a
//! channel without a buffer, and the thread takes new messages only while fewer than
//! `max_in_flight` wait for acknowledgement and the broker is connected; so while the broker is
//! down the sink waits, and its input edge decides (by its policy) whether the pipeline waits too
//! or old results are dropped and counted.
//!
//! Nothing is lost across a broker restart with QoS 1 or 2: the sink keeps an MQTT session
//! (`clean_session: false`, a stable client id), and messages not acknowledged when the
//! connection dropped are sent again when it is back (at least once: a subscriber may see one
//! twice). That needs a broker that keeps sessions over a restart (mosquitto: `persistence true`).
//! When the broker comes back without the session, the messages it had not acknowledged are
//! counted as `failed` and logged; they are never silently gone. At the end of a run the sink
//! waits up to `drain_timeout_ms` for the last acknowledgements.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rumqttc::{
    Client, Connection, ConnectionError, Event, MqttOptions, Outgoing, Packet as MqttPacket, QoS,
    RecvTimeoutError, TlsConfiguration, Transport,
};
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

/// TLS settings of `sink.mqtt`.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MqttTls {
    /// PEM file of the certificate authority that signed the broker's certificate; the
    /// system's trusted authorities when not given.
    #[schemars(with = "Option<crate::params::FileParam>")]
    pub ca_file: Option<PathBuf>,
}

/// Parameters of `sink.mqtt`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MqttParams {
    /// Broker host name or address.
    #[schemars(length(min = 1))]
    pub host: String,
    /// Broker port (1883 plain, usually 8883 with TLS).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Topic to publish to; `{pipeline}`, `{stream}` and `{node}` are replaced (characters that
    /// MQTT reserves become `_`).
    #[schemars(length(min = 1))]
    pub topic: String,
    /// Quality of service: 0 (at most once), 1 (at least once), 2 (exactly once).
    #[serde(default = "default_qos")]
    #[schemars(range(max = 2))]
    pub qos: u8,
    /// Client id; `inspectflow-{pipeline}-{node}` when not given. The broker keeps the session
    /// (unacknowledged messages) under this id.
    pub client_id: Option<String>,
    /// User name.
    pub username: Option<String>,
    /// Password (prefer `password_env`, which keeps it out of the graph file).
    pub password: Option<String>,
    /// Name of the environment variable that holds the password (not one of inspectflow's own
    /// `INSPECTFLOW_*` settings).
    pub password_env: Option<String>,
    /// Publish with the retain flag.
    #[serde(default)]
    pub retain: bool,
    /// TLS to the broker; plain TCP when not given.
    pub tls: Option<MqttTls>,
    /// Keep-alive interval in seconds.
    #[serde(default = "default_keep_alive_s")]
    #[schemars(range(min = 5))]
    pub keep_alive_s: u64,
    /// Messages that may wait for the broker's acknowledgement at once.
    #[serde(default = "default_max_in_flight")]
    #[schemars(range(min = 1))]
    pub max_in_flight: u16,
    /// The wait between reconnection attempts (`initial_backoff_ms`, `max_backoff_ms`).
    #[serde(flatten)]
    pub retry: RetrySettings,
    /// At the end of a run, how long to wait for the broker to acknowledge what was sent.
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

fn default_port() -> u16 {
    1883
}
fn default_qos() -> u8 {
    1
}
fn default_keep_alive_s() -> u64 {
    30
}
fn default_max_in_flight() -> u16 {
    100
}
fn default_drain_timeout_ms() -> u64 {
    30_000
}
fn default_image_quality() -> u8 {
    85
}

impl MqttParams {
    /// The rules the schema cannot express: a QoS, a topic without wildcards, the backoff in
    /// order, one way of giving the password and a user name with it, the dispatch settings and
    /// the JPEG quality. (Whether `password_env` is set and `tls.ca_file` exists are checked
    /// when the sink is built, where it runs.)
    pub fn validate(&self) -> Result<(), ParamError> {
        qos(self.qos)?;
        if self.topic.contains(['+', '#']) || self.topic.is_empty() {
            return Err(ParamError::new(
                "topic",
                format!(
                    "'{}' is not a topic to publish to (no + or # wildcards)",
                    self.topic
                ),
            ));
        }
        self.retry.validate()?;
        check_credentials(&self.username, &self.password, &self.password_env)?;
        self.dispatch.validate()?;
        check_quality("image_quality", self.image_quality)
    }
}

/// The QoS level of a number.
fn qos(level: u8) -> Result<QoS, ParamError> {
    match level {
        0 => Ok(QoS::AtMostOnce),
        1 => Ok(QoS::AtLeastOnce),
        2 => Ok(QoS::ExactlyOnce),
        other => Err(ParamError::new(
            "qos",
            format!("{other} is not an MQTT QoS (0, 1 or 2)"),
        )),
    }
}

/// The registry entry.
pub fn descriptor() -> OperatorDescriptor {
    OperatorDescriptor::builder::<MqttParams>(
        "sink.mqtt",
        OperatorKind::Sink,
        "Publishes each result as a JSON prediction message to an MQTT broker (QoS 0-2, TLS, credentials), reconnecting by itself; nothing is lost across a broker restart with QoS 1.",
    )
    .input("in", PortType::Image)
    .validate(MqttParams::validate)
    .build_with(|params, _context| Ok(OperatorInstance::Sink(Box::new(MqttSink::new(params)?))))
}

/// Counters shared with the connection thread.
#[derive(Default)]
struct Progress {
    /// Messages handed to the connection.
    handed: AtomicU64,
    /// Messages the broker acknowledged (QoS 0: written to the socket).
    acknowledged: AtomicU64,
    /// Messages a broker that lost the session never acknowledged.
    lost: AtomicU64,
    /// The sink is done: the thread ends after the disconnect, or when the broker is down.
    closing: AtomicBool,
}

impl Progress {
    fn outstanding(&self) -> u64 {
        let handed = self.handed.load(Ordering::SeqCst);
        handed.saturating_sub(
            self.acknowledged.load(Ordering::SeqCst) + self.lost.load(Ordering::SeqCst),
        )
    }
}

/// What the connection thread needs.
struct ConnectionSettings {
    qos: QoS,
    retry: RetrySettings,
    broker: String,
}

/// The running sink.
pub struct MqttSink {
    params: MqttParams,
    password: Option<String>,
    qos: QoS,
    dispatch: Dispatch,
    images: InlineImages,
    pipeline: Arc<str>,
    node: Arc<str>,
    stop: StopSignal,
    health: Arc<EndpointHealth>,
    progress: Arc<Progress>,
    /// The client and its connection thread, from `attach` on.
    connection: Option<(Client, JoinHandle<()>)>,
}

impl MqttSink {
    /// Checks the parameters, the password's variable and the TLS authority's file (nothing
    /// connects before the pipeline runs).
    pub fn new(mut params: MqttParams) -> Result<Self, OpError> {
        params.validate()?;
        let qos = qos(params.qos)?;
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
            qos,
            dispatch,
            pipeline: Arc::from(""),
            node: Arc::from(""),
            stop: StopSignal::new(),
            health: Arc::default(),
            progress: Arc::default(),
            connection: None,
        })
    }

    fn options(&self) -> Result<MqttOptions, OpError> {
        let client_id = self.params.client_id.clone().unwrap_or_else(|| {
            format!(
                "inspectflow-{}-{}",
                topic_safe(&self.pipeline),
                topic_safe(&self.node)
            )
        });
        let mut options = MqttOptions::new(client_id, &self.params.host, self.params.port);
        options
            .set_clean_session(false)
            .set_keep_alive(Duration::from_secs(self.params.keep_alive_s))
            .set_inflight(self.params.max_in_flight);
        if let Some(username) = &self.params.username {
            options.set_credentials(username, self.password.clone().unwrap_or_default());
        }
        if let Some(tls) = &self.params.tls {
            let config = match &tls.ca_file {
                Some(ca_file) => TlsConfiguration::SimpleNative {
                    ca: std::fs::read(ca_file).map_err(|e| {
                        OpError::io(format!("reading tls.ca_file {}", ca_file.display()), e)
                    })?,
                    client_auth: None,
                },
                None => TlsConfiguration::Native,
            };
            options.set_transport(Transport::tls_with_config(config));
        }
        Ok(options)
    }

    /// The topic for one result.
    fn topic(&self, packet: &Packet) -> String {
        self.params
            .topic
            .replace("{pipeline}", &topic_safe(&self.pipeline))
            .replace("{node}", &topic_safe(&self.node))
            .replace("{stream}", &topic_safe(&packet.frame.stream_id))
    }

    fn publish(&mut self, topic: String, payload: Vec<u8>) -> Result<(), OpError> {
        let Some((client, _)) = &self.connection else {
            return Err(OpError::Failed(
                "the MQTT connection was not started".into(),
            ));
        };
        // Blocks until the connection thread takes the message: while the broker is down, or
        // `max_in_flight` messages wait for acknowledgement, the pipeline feels it.
        match client.publish(topic, self.qos, self.params.retain, payload) {
            Ok(()) => {
                self.progress.handed.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            Err(_) => {
                // The connection thread ended: the pipeline is stopping with the broker down.
                self.health.count_failed();
                Ok(())
            }
        }
    }
}

impl Sink for MqttSink {
    fn attach(&mut self, ctx: &SinkContext) {
        self.pipeline = Arc::clone(&ctx.pipeline);
        self.node = Arc::clone(&ctx.node_id);
        self.stop = ctx.stop.clone();
        self.health = Arc::clone(&ctx.health);
        if let Some((client, thread)) = self.connection.take() {
            let _ = client.disconnect();
            let _ = thread.join();
        }
        let options = match self.options() {
            Ok(options) => options,
            Err(error) => {
                self.health.set_offline(&error.to_string());
                return;
            }
        };
        let (client, connection) = Client::new(options, 0);
        let settings = ConnectionSettings {
            qos: self.qos,
            retry: self.params.retry,
            broker: format!("{}:{}", self.params.host, self.params.port),
        };
        let progress = Arc::clone(&self.progress);
        let health = Arc::clone(&self.health);
        let stop = self.stop.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("if-{}-mqtt", self.node))
            .spawn(move || drive(connection, settings, &progress, &health, &stop));
        match spawned {
            Ok(thread) => self.connection = Some((client, thread)),
            Err(error) => {
                self.health
                    .set_offline(&format!("cannot start the MQTT connection thread: {error}"));
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
        let topic = self.topic(&packet);
        self.publish(topic, payload)
    }

    fn finish(&mut self) -> Result<(), OpError> {
        let deadline = Instant::now() + Duration::from_millis(self.params.drain_timeout_ms);
        while self.progress.outstanding() > 0 && Instant::now() < deadline {
            if !self
                .stop
                .sleep_until(Instant::now() + Duration::from_millis(10))
                && !self.health.is_online()
            {
                break; // stopping with the broker down: do not wait for it
            }
        }
        let outstanding = self.progress.outstanding();
        self.progress.closing.store(true, Ordering::SeqCst);
        if let Some((client, thread)) = self.connection.take() {
            let _ = client.disconnect();
            drop(client);
            let _ = thread.join();
        }
        if outstanding > 0 {
            for _ in 0..outstanding {
                self.health.count_failed();
            }
            return Err(OpError::Failed(format!(
                "{outstanding} messages were not acknowledged by the broker at {}:{} within \
                 drain_timeout_ms ({} ms)",
                self.params.host, self.params.port, self.params.drain_timeout_ms
            )));
        }
        Ok(())
    }
}

impl Drop for MqttSink {
    fn drop(&mut self) {
        self.progress.closing.store(true, Ordering::SeqCst);
        if let Some((client, thread)) = self.connection.take() {
            let _ = client.disconnect();
            drop(client);
            let _ = thread.join();
        }
    }
}

/// The connection thread: polls the MQTT event loop, which connects, sends, receives
/// acknowledgements and reconnects; ends after the disconnect, or when the sink is closing (or
/// the pipeline stopping) while the broker is unreachable.
fn drive(
    mut connection: Connection,
    settings: ConnectionSettings,
    progress: &Progress,
    health: &EndpointHealth,
    stop: &StopSignal,
) {
    let mut connected_before = false;
    let mut backoff = settings.retry.initial();
    loop {
        match connection.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(Event::Incoming(MqttPacket::ConnAck(ack)))) => {
                backoff = settings.retry.initial();
                if health.set_online() || !connected_before {
                    tracing::info!(broker = %settings.broker, "connected to the MQTT broker");
                }
                let lost = progress.outstanding();
                if connected_before && !ack.session_present && lost > 0 {
                    // The broker forgot our session: what it had not acknowledged is gone.
                    progress.lost.fetch_add(lost, Ordering::SeqCst);
                    for _ in 0..lost {
                        health.count_failed();
                    }
                    tracing::error!(
                        broker = %settings.broker,
                        "the MQTT broker came back without our session: {lost} unacknowledged \
                         messages are lost (enable persistence on the broker)"
                    );
                }
                connected_before = true;
            }
            Ok(Ok(Event::Incoming(MqttPacket::PubAck(_)))) if settings.qos == QoS::AtLeastOnce => {
                progress.acknowledged.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Ok(Event::Incoming(MqttPacket::PubComp(_)))) if settings.qos == QoS::ExactlyOnce => {
                progress.acknowledged.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Ok(Event::Outgoing(Outgoing::Publish(_)))) if settings.qos == QoS::AtMostOnce => {
                progress.acknowledged.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) => return,
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                let reason = describe(&settings.broker, &error);
                if health.set_offline(&reason) {
                    tracing::warn!("MQTT broker lost: {reason}");
                }
                if progress.closing.load(Ordering::SeqCst) || stop.is_raised() {
                    return;
                }
                stop.sleep_until(Instant::now() + backoff);
                backoff = settings.retry.next(backoff);
            }
            Err(RecvTimeoutError::Timeout) => {
                if progress.closing.load(Ordering::SeqCst) && !health.is_online() {
                    return;
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// A connection error in one line (credentials never appear in rumqttc's errors).
fn describe(broker: &str, error: &ConnectionError) -> String {
    format!("{broker}: {error}")
}

/// `value` with the characters MQTT reserves in topics (`/`, `+`, `#`) replaced by `_`.
fn topic_safe(value: &str) -> String {
    value.replace(['/', '+', '#'], "_")
}
