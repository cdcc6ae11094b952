//! Helpers shared by the integration tests: a registry with a recording sink, and graph runners.

#![allow(dead_code)] // each test binary uses a different subset

pub mod nats;
pub mod server;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use inspectflow::graph::{self, ValidatedGraph};
use inspectflow::operators::packet::Prediction;
use inspectflow::operators::{
    BufferPool, BuildContext, CaptureTime, Emitter, Frame, OpError, OperatorDescriptor,
    OperatorInstance, OperatorKind, OutputType, Packet, PortType, Registry, Sink, Source,
    SourceContext, SourcePoll, Transform,
};
use inspectflow::runtime::{Pipeline, RunOutcome};

/// What a probe sink saw of one packet.
#[derive(Debug, Clone)]
pub struct Seen {
    pub sequence: u64,
    pub pixels_addr: usize,
    pub end_to_end: Duration,
    pub had_tensor: bool,
    /// Name and shape of each model output attached to the packet.
    pub inference: Vec<(String, Vec<usize>)>,
    /// The frame itself (shares the pixels), when the probe has `keep_frames: true`. Off by
    /// default: kept frames never return to their pool.
    pub frame: Option<Frame>,
    /// Format and bytes of the encoding attached to the packet, if any.
    pub encoded: Option<(&'static str, Vec<u8>)>,
}

impl Seen {
    /// The kept frame; panics when the probe did not keep frames.
    pub fn kept_frame(&self) -> &Frame {
        self.frame
            .as_ref()
            .expect("the probe keeps frames only with `keep_frames: true`")
    }
}

/// Records, per probe node id, every packet it consumed.
pub type Recordings = Arc<Mutex<HashMap<String, Vec<Seen>>>>;

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ProbeParams {
    #[serde(default)]
    sleep_ms: f64,
    #[serde(default)]
    keep_frames: bool,
}

struct Probe {
    node: String,
    delay: Duration,
    keep_frames: bool,
    recordings: Recordings,
}

impl Sink for Probe {
    fn consume(&mut self, packet: Packet) -> Result<(), OpError> {
        std::thread::sleep(self.delay);
        let seen = Seen {
            sequence: packet.frame.sequence,
            pixels_addr: packet.frame.pixels_addr(),
            end_to_end: packet.frame.capture.instant.elapsed(),
            had_tensor: packet.tensor.is_some(),
            frame: self.keep_frames.then(|| packet.frame.clone()),
            encoded: packet
                .encoded
                .as_ref()
                .map(|encoded| (encoded.format, encoded.bytes().to_vec())),
            inference: packet
                .inference
                .iter()
                .flat_map(|outputs| outputs.iter())
                .map(|output| {
                    assert_eq!(output.values.len(), output.shape.iter().product::<usize>());
                    (output.name.clone(), output.shape.clone())
                })
                .collect(),
        };
        self.recordings
            .lock()
            .expect("recordings lock")
            .entry(self.node.clone())
            .or_default()
            .push(seen);
        Ok(())
    }
}

/// The built-in operators plus `test.probe`, a sink that records what it sees (optionally
/// slowly), and `test.tensor_sink`, a sink that needs tensors (for port type checks).
pub fn registry_with_probe() -> (Registry, Recordings) {
    let recordings: Recordings = Arc::default();
    let mut registry = Registry::builtin();
    let shared = Arc::clone(&recordings);
    registry.register(
        OperatorDescriptor::builder::<ProbeParams>(
            "test.probe",
            OperatorKind::Sink,
            "Records packets.",
        )
        .input("in", PortType::Any)
        .build_with(move |params, context| {
            Ok(OperatorInstance::Sink(Box::new(Probe {
                node: context.node_id.to_string(),
                delay: Duration::from_secs_f64(params.sleep_ms / 1000.0),
                keep_frames: params.keep_frames,
                recordings: Arc::clone(&shared),
            })))
        }),
    );
    let tensors = Arc::clone(&recordings);
    registry.register(
        OperatorDescriptor::builder::<ProbeParams>(
            "test.tensor_sink",
            OperatorKind::Sink,
            "Needs tensors.",
        )
        .input("in", PortType::Tensor)
        .build_with(move |params, context| {
            Ok(OperatorInstance::Sink(Box::new(Probe {
                node: context.node_id.to_string(),
                delay: Duration::from_secs_f64(params.sleep_ms / 1000.0),
                keep_frames: params.keep_frames,
                recordings: Arc::clone(&tensors),
            })))
        }),
    );
    registry.register(
        OperatorDescriptor::builder::<VerdictParams>(
            "test.verdict",
            OperatorKind::Transform,
            "Attaches a made-up verdict and restamps capture times on a fixed clock.",
        )
        .input("in", PortType::Image)
        .output("out", OutputType::Fixed(PortType::Prediction))
        .build_with(|params, _context| {
            Ok(OperatorInstance::Transform(Box::new(Verdict {
                params,
                base: None,
                pool: BufferPool::new(8),
            })))
        }),
    );
    let synthetic = Arc::clone(registry.get("source.synthetic").expect("built in"));
    let built = Arc::new(std::sync::atomic::AtomicU64::new(0));
    registry.register(
        OperatorDescriptor::builder::<FlakySourceParams>(
            "test.flaky_source",
            OperatorKind::Source,
            "source.synthetic's 32x32 frames; its first `failing_instances` instances fail after `error_after` frames.",
        )
        .output("out", OutputType::Fixed(PortType::Image))
        .build_with(move |params, context: &BuildContext| {
            let inner = synthetic.build(
                serde_json::json!({"width": 32, "height": 32, "frames": params.frames}),
                context,
            )?;
            let OperatorInstance::Source(inner) = inner else {
                return Err(OpError::Failed("source.synthetic is a source".into()));
            };
            let instance = built.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(OperatorInstance::Source(Box::new(FlakySource {
                inner,
                left: (instance < params.failing_instances).then_some(params.error_after),
            })))
        }),
    );
    (registry, recordings)
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct FlakySourceParams {
    /// How many instances (the first built, then those rebuilt after a failure) fail.
    failing_instances: u64,
    /// Frames before the injected failure of a failing instance.
    error_after: u64,
    /// Frames of each instance before its stream ends.
    frames: u64,
}

/// `test.flaky_source`: a source that fails after some frames (a camera that drops out), and
/// counts from 0 again when it is rebuilt.
struct FlakySource {
    inner: Box<dyn Source>,
    /// Frames left before the failure; none for an instance that does not fail.
    left: Option<u64>,
}

impl Source for FlakySource {
    fn next(&mut self, ctx: &SourceContext) -> Result<SourcePoll, OpError> {
        if self.left == Some(0) {
            return Err(OpError::Failed("injected source failure".into()));
        }
        let polled = self.inner.next(ctx)?;
        if let (SourcePoll::Packet(_), Some(left)) = (&polled, &mut self.left) {
            *left -= 1;
        }
        Ok(polled)
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct VerdictParams {
    /// Frames whose sequence is a multiple of this are anomalous.
    anomalous_every: u64,
    /// When given, frame n is stamped as captured n/fps seconds after the first one (so rate
    /// limits give exact counts whatever the machine's speed).
    #[serde(default)]
    fps: Option<f64>,
}

/// `test.verdict`: a stand-in for `infer.openvino` + `anomaly` with a known answer.
struct Verdict {
    params: VerdictParams,
    base: Option<CaptureTime>,
    pool: BufferPool<f32>,
}

impl Transform for Verdict {
    fn process(&mut self, mut packet: Packet, out: &mut Emitter) -> Result<(), OpError> {
        let sequence = packet.frame.sequence;
        if let Some(fps) = self.params.fps {
            let base = *self.base.get_or_insert(packet.frame.capture);
            let offset = Duration::from_secs_f64(sequence as f64 / fps);
            packet.frame.capture = CaptureTime {
                instant: base.instant + offset,
                unix_nanos: base.unix_nanos + offset.as_nanos(),
            };
        }
        let anomalous = sequence.is_multiple_of(self.params.anomalous_every);
        let score = if anomalous { 0.9 } else { 0.1 };
        let mut map = self.pool.get(4);
        map.iter_mut().for_each(|value| *value = score);
        packet.prediction = Some(Arc::new(Prediction {
            raw_score: score * 10.0,
            score,
            threshold: 0.5,
            anomalous,
            model: Arc::from("test-model"),
            map,
            map_width: 2,
            map_height: 2,
        }));
        out.emit(0, packet);
        Ok(())
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct NoParams {}

/// Hands every packet on unchanged.
struct PassOn;

impl Transform for PassOn {
    fn process(&mut self, packet: Packet, out: &mut Emitter) -> Result<(), OpError> {
        out.emit(0, packet);
        Ok(())
    }
}

/// Registers `name`: a transform without parameters that hands packets on unchanged, and calls
/// `on_build` with its build context each time it is built (to record the context, or to take
/// time as a model compiling does).
pub fn register_pass_on(
    registry: &mut Registry,
    name: &'static str,
    summary: &'static str,
    on_build: impl Fn(&BuildContext) + Send + Sync + 'static,
) {
    registry.register(
        OperatorDescriptor::builder::<NoParams>(name, OperatorKind::Transform, summary)
            .input("in", PortType::Any)
            .output("out", OutputType::SameAsInput)
            .build_with(move |_, context| {
                on_build(context);
                Ok(OperatorInstance::Transform(Box::new(PassOn)))
            }),
    );
}

/// Validates YAML graph text, panicking with the errors when invalid.
pub fn graph_from_yaml(registry: &Registry, yaml: &str) -> ValidatedGraph {
    graph::load_str(
        "test.yaml",
        yaml,
        false,
        registry,
        &graph::GraphLimits::DEFAULT,
    )
    .unwrap_or_else(|errors| panic!("invalid graph:\n{errors}"))
}

/// Runs a graph to its end, failing the test if it takes longer than `limit` (a hang).
pub fn run_to_end(graph: &ValidatedGraph, limit: Duration) -> RunOutcome {
    let pipeline = Pipeline::start(graph).unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    while !pipeline.is_finished() {
        assert!(
            started.elapsed() < limit,
            "pipeline did not finish within {limit:?}: it hangs"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    pipeline.wait()
}

/// The recordings of one probe node.
pub fn seen_by(recordings: &Recordings, node: &str) -> Vec<Seen> {
    recordings
        .lock()
        .expect("recordings lock")
        .get(node)
        .cloned()
        .unwrap_or_default()
}
