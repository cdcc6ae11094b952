//! The operator contract: what an operator sees (packets, its parameters, a stop signal) and what
//! it promises (typed ports, one of three kinds). Operators never own threads or queues; the
//! runtime does, so the same operator runs in a live pipeline, a training batch graph or a test.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::packet::Packet;

/// The kind of payload a port carries. Payloads accumulate along a pipeline (a packet that went
/// through `preprocess` still carries its frame, one that went through inference still carries
/// its tensor), so the types form a chain and a richer payload satisfies an input that asks for a
/// poorer one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PortType {
    /// Accepts whatever arrives (inputs only).
    Any,
    /// A decoded image.
    Image,
    /// An image plus the model input tensor made from it.
    Tensor,
    /// An image, its tensor and the model's raw outputs for it. (`infer.openvino` lets the
    /// tensor go once used when no node downstream asks for a tensor.)
    Inference,
    /// All of the above plus the anomaly prediction (score, label, map).
    Prediction,
}

impl PortType {
    /// Position in the chain of payloads (`Any` first).
    pub const fn level(self) -> u8 {
        match self {
            PortType::Any => 0,
            PortType::Image => 1,
            PortType::Tensor => 2,
            PortType::Inference => 3,
            PortType::Prediction => 4,
        }
    }

    /// Whether packets of type `self` satisfy an input that asks for `wanted`.
    pub fn satisfies(self, wanted: PortType) -> bool {
        wanted == PortType::Any || (self != PortType::Any && self.level() >= wanted.level())
    }

    /// Name as shown in errors and DOT output.
    pub const fn name(self) -> &'static str {
        match self {
            PortType::Any => "any",
            PortType::Image => "image",
            PortType::Tensor => "tensor",
            PortType::Inference => "inference",
            PortType::Prediction => "prediction",
        }
    }
}

/// What an output port emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputType {
    /// Always this type.
    Fixed(PortType),
    /// Whatever the operator's input received (pass-through operators).
    SameAsInput,
}

/// An input port: name and the payload it needs.
#[derive(Debug, Clone, Copy)]
pub struct InputPort {
    /// Name used in graph files (`node.port`).
    pub name: &'static str,
    /// Payload the operator needs.
    pub accepts: PortType,
}

/// An output port: name and the payload it emits.
#[derive(Debug, Clone, Copy)]
pub struct OutputPort {
    /// Name used in graph files (`node.port`).
    pub name: &'static str,
    /// Payload it emits.
    pub emits: OutputType,
}

/// The three operator kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OperatorKind {
    /// Produces packets; no inputs.
    Source,
    /// One input, one or more outputs.
    Transform,
    /// Consumes packets; no outputs.
    Sink,
}

impl OperatorKind {
    /// Lower-case name.
    pub const fn name(self) -> &'static str {
        match self {
            OperatorKind::Source => "source",
            OperatorKind::Transform => "transform",
            OperatorKind::Sink => "sink",
        }
    }
}

/// An error raised by an operator while building or running.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The parameters were accepted by the schema but cannot work (a size of zero, a directory
    /// that does not exist). `field` names the parameter.
    #[error("parameter '{field}': {message}")]
    InvalidParam {
        /// Parameter name (dotted path for nested ones).
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// An I/O operation failed; `context` says which one.
    #[error("{context}: {source}")]
    Io {
        /// What the operator was doing (with the path it touched).
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The operator received a packet it cannot handle.
    #[error("unsupported input: {0}")]
    UnsupportedInput(String),
    /// Anything else, described.
    #[error("{0}")]
    Failed(String),
}

impl OpError {
    /// An [`OpError::Io`] with its context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        OpError::Io {
            context: context.into(),
            source,
        }
    }

    /// An [`OpError::InvalidParam`].
    pub fn param(field: impl Into<String>, message: impl Into<String>) -> Self {
        OpError::InvalidParam {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// What a source call produced.
// The packet is the common case: boxing it would cost an allocation per frame.
#[allow(clippy::large_enum_variant)]
pub enum SourcePoll {
    /// A new packet.
    Packet(Packet),
    /// Nothing yet (a camera between frames, a folder with no new file); ask again.
    Pending,
    /// The stream is over (end of file, frame count reached).
    EndOfStream,
}

/// Shared flag the runtime raises to ask sources to stop (Ctrl-C, a failing node, a stop request).
#[derive(Clone, Default)]
pub struct StopSignal(Arc<AtomicBool>);

impl StopSignal {
    /// A signal that is not raised.
    pub fn new() -> Self {
        Self::default()
    }

    /// Raise it.
    pub fn raise(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether it was raised.
    pub fn is_raised(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Sleep until `deadline` or until the signal is raised, whichever comes first. Returns `false`
    /// when the signal interrupted the sleep.
    pub fn sleep_until(&self, deadline: Instant) -> bool {
        const SLICE: Duration = Duration::from_millis(20);
        loop {
            if self.is_raised() {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            std::thread::sleep((deadline - now).min(SLICE));
        }
    }
}

/// Whether a node's outside end (a camera or server feeding a source, a broker or receiver behind
/// a sink) is reachable, and how often it was not. The operator updates it; the runtime shows it
/// in metrics. Endpoints start online; one that is lost goes offline (an outage is counted) until
/// it works again. Sinks also count results they gave up on (`failed`) and results their
/// dispatch settings left out on purpose (`skipped`: rate limit, anomalous only); live sources
/// count the frames their camera sent that they let go because the graph fell behind
/// (`dropped`).
#[derive(Default)]
pub struct EndpointHealth {
    offline: AtomicBool,
    outages: AtomicU64,
    last_error: Mutex<Option<String>>,
    failed: AtomicU64,
    skipped: AtomicU64,
    dropped: AtomicU64,
}

impl EndpointHealth {
    /// Frames flow. Returns true when this ends an outage.
    pub fn set_online(&self) -> bool {
        self.offline.swap(false, Ordering::SeqCst)
    }

    /// Frames stopped, because of `reason`. Returns true when this starts an outage (counted).
    pub fn set_offline(&self, reason: &str) -> bool {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_string());
        let started = !self.offline.swap(true, Ordering::SeqCst);
        if started {
            self.outages.fetch_add(1, Ordering::SeqCst);
        }
        started
    }

    /// Whether frames flow.
    pub fn is_online(&self) -> bool {
        !self.offline.load(Ordering::SeqCst)
    }

    /// Outages so far.
    pub fn outages(&self) -> u64 {
        self.outages.load(Ordering::SeqCst)
    }

    /// A result that could not be delivered and was given up (after retries).
    pub fn count_failed(&self) {
        self.failed.fetch_add(1, Ordering::SeqCst);
    }

    /// Results given up so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    /// A result left out on purpose (rate limit, anomalous only).
    pub fn count_skipped(&self) {
        self.skipped.fetch_add(1, Ordering::SeqCst);
    }

    /// Results left out on purpose so far.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::SeqCst)
    }

    /// `frames` sent by the camera that the source let go (the graph fell behind).
    pub fn count_dropped(&self, frames: u64) {
        if frames > 0 {
            self.dropped.fetch_add(frames, Ordering::SeqCst);
        }
    }

    /// Frames let go so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::SeqCst)
    }

    /// Why the endpoint last went offline.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// What a source may ask of the runtime.
pub struct SourceContext {
    /// Raised when the source should stop producing; `next` should return soon after.
    pub stop: StopSignal,
    /// The node id, used as the default stream id.
    pub node_id: Arc<str>,
    /// Where the source reports whether its camera or server delivers.
    pub health: Arc<EndpointHealth>,
}

impl SourceContext {
    /// A context for running a source outside a pipeline (tests, tools).
    pub fn detached(node_id: &str) -> Self {
        Self {
            stop: StopSignal::new(),
            node_id: Arc::from(node_id),
            health: Arc::default(),
        }
    }
}

/// Produces packets. `next` may block for up to about 100 ms (waiting for a camera), and must
/// return promptly once `ctx.stop` is raised.
pub trait Source: Send {
    /// The next packet, `Pending` when none is ready yet, or `EndOfStream`.
    fn next(&mut self, ctx: &SourceContext) -> Result<SourcePoll, OpError>;
}

/// Collects what a transform emits during one call; the runtime forwards it downstream. Reused
/// between calls, so emitting allocates nothing in steady state.
#[derive(Default)]
pub struct Emitter {
    emitted: Vec<(usize, Packet)>,
}

impl Emitter {
    /// An empty emitter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Emit `packet` on output port number `port` (0 for the first declared output).
    pub fn emit(&mut self, port: usize, packet: Packet) {
        self.emitted.push((port, packet));
    }

    /// Hand over what was emitted, leaving the emitter empty.
    pub fn drain(&mut self) -> std::vec::Drain<'_, (usize, Packet)> {
        self.emitted.drain(..)
    }
}

/// Whether a transform still holds work that will complete without more input (see
/// [`Transform::poll`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Nothing is held: the runtime may wait for input indefinitely.
    Nothing,
    /// Work is in flight (inference requests running): the runtime keeps polling.
    InFlight,
}

/// One input, zero or more outputs per packet.
pub trait Transform: Send {
    /// Handle one packet.
    fn process(&mut self, packet: Packet, out: &mut Emitter) -> Result<(), OpError>;

    /// Handle a batch (only called for nodes configured with `batch`). The default handles the
    /// packets one by one; operators that gain from batching (inference) override it.
    fn process_batch(&mut self, batch: &mut Vec<Packet>, out: &mut Emitter) -> Result<(), OpError> {
        for packet in batch.drain(..) {
            self.process(packet, out)?;
        }
        Ok(())
    }

    /// Emits held work that has completed (an inference request that finished), waiting up to
    /// `wait` for the oldest, and says whether work is still held. The runtime calls it after
    /// every call to `process` (with no wait) and, while work is held and no input is waiting,
    /// with a short wait: results leave as soon as they are ready, even when input stops (a
    /// triggered camera, a watched folder). Operators that finish each packet inside `process`
    /// keep the default.
    fn poll(&mut self, _wait: Duration, _out: &mut Emitter) -> Result<Held, OpError> {
        Ok(Held::Nothing)
    }

    /// End of stream: emit anything held back.
    fn finish(&mut self, _out: &mut Emitter) -> Result<(), OpError> {
        Ok(())
    }
}

/// What a sink may ask of the runtime; handed to [`Sink::attach`] before the first packet.
#[derive(Clone)]
pub struct SinkContext {
    /// Raised when the pipeline is asked to stop: a sink stops waiting (retry backoffs) and
    /// drains what it has with one attempt per result.
    pub stop: StopSignal,
    /// The pipeline's name, for the messages a sink sends.
    pub pipeline: Arc<str>,
    /// The node id.
    pub node_id: Arc<str>,
    /// The run's id: unique per run, except that every engine running one fleet pipeline's
    /// desired state gets the same, so results sent again after a hand-over carry the same
    /// message ids (`sink.nats`).
    pub run_id: Arc<str>,
    /// Where the sink reports whether its receiver or broker is reachable, and what it gave up
    /// on or skipped.
    pub health: Arc<EndpointHealth>,
}

impl SinkContext {
    /// A context for running a sink outside a pipeline (tests, tools).
    pub fn detached(pipeline: &str, node_id: &str) -> Self {
        Self {
            stop: StopSignal::new(),
            pipeline: Arc::from(pipeline),
            node_id: Arc::from(node_id),
            run_id: Arc::from("detached"),
            health: Arc::default(),
        }
    }
}

/// Consumes packets.
pub trait Sink: Send {
    /// Called once before the first packet (and again after a restart rebuilt the sink).
    fn attach(&mut self, _ctx: &SinkContext) {}

    /// Handle one packet. Returning only after the result is durable (written, sent) is what lets
    /// the runtime promise that a `block` edge loses nothing.
    fn consume(&mut self, packet: Packet) -> Result<(), OpError>;

    /// End of stream: flush and close.
    fn finish(&mut self) -> Result<(), OpError> {
        Ok(())
    }
}

/// A built operator, ready to run.
pub enum OperatorInstance {
    /// See [`Source`].
    Source(Box<dyn Source>),
    /// See [`Transform`].
    Transform(Box<dyn Transform>),
    /// See [`Sink`].
    Sink(Box<dyn Sink>),
}
