//! Running a validated graph: one thread per node, bounded queues between them, end-of-stream
//! propagation, error handling with restart policies, drain on stop and abort on failure.
//!
//! Every operator is built before any thread starts, so a bad parameter (a missing directory)
//! fails the start with the node named and nothing half-running. Once running, a node's thread
//! loops: take a packet (or a batch) from its input queue, call the operator, send what it emitted
//! to every outgoing edge (clones of `Arc`s: fan-out never copies pixels). End of stream closes a
//! node's outgoing edges, which ends its consumers in turn. A failing operator either restarts
//! (restart policy) or aborts the graph: every queue wakes its waiters, every thread exits, and
//! [`Pipeline::wait`] returns the error with the node named.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use inspectflow_operators::{
    BuildContext, Emitter, EndpointHealth, Frame, Held, OpError, OperatorDescriptor,
    OperatorInstance, OperatorKind, Packet, Sink, SinkContext, Source, SourceContext, SourcePoll,
    StopSignal, Transform,
};

use super::metrics::{
    EdgeReport, MetricsReport, NodeMetrics, NodeReport, QueueReport, SinkReport, SourceReport,
};
use super::queue::{EdgeSender, EdgeStats, InputQueue, PopOutcome};
use super::replicas::{NodeOutputs, Replicas};
use crate::graph::{RestartPolicy, ValidatedGraph, ValidatedNode};

/// How long a node whose operator holds work in flight waits for that work before it looks at
/// its input again: a packet arriving meanwhile waits at most this long to be started.
const HELD_WORK_POLL: Duration = Duration::from_millis(2);

/// A node failed and the graph stopped.
#[derive(Debug, Clone, thiserror::Error)]
#[error("node '{node}' ({op}) failed: {message}")]
pub struct NodeFailure {
    /// Node id.
    pub node: String,
    /// Operator name.
    pub op: String,
    /// The operator's error.
    pub message: String,
}

/// Why a pipeline could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start pipeline '{pipeline}':\n{}", failures.iter().map(|f| format!("  {f}")).collect::<Vec<_>>().join("\n"))]
pub struct StartError {
    /// Pipeline name.
    pub pipeline: String,
    /// Every node that could not be built.
    pub failures: Vec<NodeFailure>,
}

/// State shared by all node threads of one pipeline.
struct Control {
    started: Instant,
    /// Sources stop producing (drain).
    stop: StopSignal,
    /// Set on failure: everything stops now.
    aborted: AtomicBool,
    failure: Mutex<Option<NodeFailure>>,
    queues: Vec<Arc<InputQueue>>,
    /// Node threads not yet ended.
    running_threads: std::sync::atomic::AtomicUsize,
    /// Turns true when the last node thread ends.
    ended: tokio::sync::watch::Sender<bool>,
    /// [`RunMode::Active`]: sources feed only their `sink.preview` edges.
    previewing_only: AtomicBool,
}

/// Counts a node thread out when it ends, however it ends (a panic included).
struct ThreadEnd(Arc<Control>);

impl Drop for ThreadEnd {
    fn drop(&mut self) {
        if self.0.running_threads.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.ended.send_replace(true);
        }
    }
}

impl Control {
    fn fail(&self, failure: NodeFailure) {
        tracing::error!("{failure}");
        {
            let mut slot = self.failure.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = Some(failure);
            }
        }
        self.abort();
    }

    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        self.stop.raise();
        for queue in &self.queues {
            queue.abort();
        }
    }
}

/// A handle that stops a running pipeline from another thread (Ctrl-C, an API call).
#[derive(Clone)]
pub struct StopHandle {
    control: Arc<Control>,
}

impl StopHandle {
    /// Graceful stop: sources stop, queued packets drain through to the sinks, then the run ends.
    pub fn stop(&self) {
        self.control.stop.raise();
    }

    /// Immediate stop: queued packets are dropped.
    pub fn abort(&self) {
        self.control.abort();
    }
}

/// What a running pipeline does with its sources' frames.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum RunMode {
    /// Inspection: every edge carries frames; the model runs and the sinks get results.
    #[default]
    Running,
    /// Preview only: the sources run (and `sink.preview` nodes and captures see their frames),
    /// but nothing leaves a source towards any other node, so no inference runs. Switching back
    /// to `running` resumes inspection without restarting the camera.
    Active,
}

impl RunMode {
    /// Every mode.
    pub const ALL: [RunMode; 2] = [RunMode::Running, RunMode::Active];

    /// The name the API and the metrics use.
    pub const fn name(self) -> &'static str {
        match self {
            RunMode::Running => "running",
            RunMode::Active => "active",
        }
    }
}

/// How a run ended.
pub struct RunOutcome {
    /// Final metrics.
    pub report: MetricsReport,
    /// The failure that stopped the graph, if any.
    pub failure: Option<NodeFailure>,
}

/// A running pipeline.
pub struct Pipeline {
    name: String,
    control: Arc<Control>,
    threads: Vec<JoinHandle<()>>,
    nodes: Vec<NodeInfo>,
    edges: Vec<EdgeInfo>,
}

struct NodeInfo {
    id: String,
    op: &'static str,
    kind: &'static str,
    metrics: Arc<NodeMetrics>,
    /// A source's most recent frame (sources only).
    latest: Option<Arc<LatestFrame>>,
    queue: Option<Arc<InputQueue>>,
    incoming: Vec<Arc<EdgeStats>>,
}

struct EdgeInfo {
    from: String,
    to: String,
    queue: Arc<InputQueue>,
    stats: Arc<EdgeStats>,
}

/// What the graph around a node tells its operator when it is built ([`BuildContext`]).
#[derive(Clone, Copy)]
struct Surroundings {
    /// Whether a live source feeds the node.
    live_input: bool,
    /// How many live sources the pipeline has.
    live_sources: usize,
    /// Whether a node downstream reads the tensor.
    tensor_wanted_downstream: bool,
}

impl Surroundings {
    /// The build context of node `node_id`.
    fn context(self, node_id: &str) -> BuildContext<'_> {
        BuildContext::new(node_id)
            .with_live_input(self.live_input)
            .with_live_sources(self.live_sources)
            .with_tensor_wanted_downstream(self.tensor_wanted_downstream)
    }
}

/// Everything a node's thread needs besides its operator.
struct NodeRuntime {
    pipeline: Arc<str>,
    /// The run's id (see [`Pipeline::start_run`]).
    run_id: Arc<str>,
    id: Arc<str>,
    descriptor: Arc<OperatorDescriptor>,
    params: serde_json::Value,
    restart: crate::graph::RestartSpec,
    restarts_done: u32,
    batch: Option<(usize, Duration)>,
    input: Option<Arc<InputQueue>>,
    /// What the graph tells the node's operator (it is rebuilt with the same on a restart).
    surroundings: Surroundings,
    delivery: Delivery,
    metrics: Arc<NodeMetrics>,
    latest: Option<Arc<LatestFrame>>,
    control: Arc<Control>,
}

/// Where a node's thread sends what its operator emits.
enum Delivery {
    /// The node's one instance sends straight on.
    Direct(NodeOutputs),
    /// One of several replicas: results go out in the order their packets arrived.
    Replica(Arc<Replicas>),
}

/// The most recent frame a source produced, kept for captures (saving what a camera sees now).
/// Holding it costs a reference, not a copy: the frame's buffer goes back to its pool when the
/// next frame replaces it.
#[derive(Default)]
struct LatestFrame(Mutex<Option<Frame>>);

impl LatestFrame {
    fn set(&self, frame: &Frame) {
        let previous = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(frame.clone());
        // The previous frame (maybe its buffer's last reference) is released outside the lock.
        drop(previous);
    }

    fn get(&self) -> Option<Frame> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Pipeline {
    /// Builds every operator, then starts one thread per node, inspecting.
    pub fn start(graph: &ValidatedGraph) -> Result<Pipeline, StartError> {
        Self::start_in(graph, RunMode::Running)
    }

    /// [`Pipeline::start`] in `mode` from its first frame, under a run id of its own.
    pub fn start_in(graph: &ValidatedGraph, mode: RunMode) -> Result<Pipeline, StartError> {
        Self::start_run(graph, mode, &uuid::Uuid::new_v4().simple().to_string())
    }

    /// [`Pipeline::start_in`] under the given run id, which sinks put in the ids of the messages
    /// they send (a fleet pipeline's run id is the same on every engine that runs it, so results
    /// replayed after a hand-over are recognised as copies).
    pub fn start_run(
        graph: &ValidatedGraph,
        mode: RunMode,
        run_id: &str,
    ) -> Result<Pipeline, StartError> {
        let run_id: Arc<str> = Arc::from(run_id);
        // Whether a live source feeds each node (an operator may pick latency over throughput).
        let mut live_input = vec![false; graph.nodes.len()];
        for edge in &graph.edges {
            live_input[edge.to] |= edge.live;
        }
        // Several cameras share the cores (an operator may pick throughput for them).
        let live_sources = graph
            .nodes
            .iter()
            .filter(|node| {
                node.descriptor.kind == OperatorKind::Source
                    && node.descriptor.is_live(&node.params)
            })
            .count();
        // Whether a node downstream reads the tensor (an operator may let it go once used).
        let tensor_wanted_downstream = graph.tensor_wanted_downstream();
        let surroundings = |index: usize| Surroundings {
            live_input: live_input[index],
            live_sources,
            tensor_wanted_downstream: tensor_wanted_downstream[index],
        };
        // Every instance of every node (one per replica).
        let mut instances: Vec<Vec<OperatorInstance>> = Vec::with_capacity(graph.nodes.len());
        let mut failures = Vec::new();
        for (index, node) in graph.nodes.iter().enumerate() {
            let context = surroundings(index).context(&node.id);
            let mut built = Vec::with_capacity(node.replicas.max(1));
            for _ in 0..node.replicas.max(1) {
                match node.descriptor.build(node.params.clone(), &context) {
                    Ok(instance) => built.push(instance),
                    Err(error) => {
                        failures.push(failure_of(node, &error));
                        break;
                    }
                }
            }
            instances.push(built);
        }
        if !failures.is_empty() {
            return Err(StartError {
                pipeline: graph.name.clone(),
                failures,
            });
        }

        // One queue per connected input port (nodes have at most one input port today).
        let mut queues: Vec<Option<Arc<InputQueue>>> = vec![None; graph.nodes.len()];
        for edge in &graph.edges {
            if queues[edge.to].is_none() {
                let producers = graph.edges.iter().filter(|e| e.to == edge.to).count();
                queues[edge.to] = Some(Arc::new(InputQueue::new(
                    edge.capacity,
                    edge.policy,
                    producers,
                )));
            }
        }
        let control = Arc::new(Control {
            started: Instant::now(),
            stop: StopSignal::new(),
            aborted: AtomicBool::new(false),
            failure: Mutex::new(None),
            queues: queues.iter().flatten().cloned().collect(),
            running_threads: std::sync::atomic::AtomicUsize::new(
                graph.nodes.iter().map(|node| node.replicas.max(1)).sum(),
            ),
            ended: tokio::sync::watch::Sender::new(false),
            previewing_only: AtomicBool::new(mode == RunMode::Active),
        });

        let metrics: Vec<Arc<NodeMetrics>> = graph
            .nodes
            .iter()
            .map(|_| Arc::new(NodeMetrics::default()))
            .collect();
        let mut outputs: Vec<Vec<Vec<EdgeSender>>> = graph
            .nodes
            .iter()
            .map(|node| node.descriptor.outputs.iter().map(|_| Vec::new()).collect())
            .collect();
        let mut inspection: Vec<Vec<Vec<bool>>> = outputs
            .iter()
            .map(|ports| ports.iter().map(|_| Vec::new()).collect())
            .collect();
        let mut incoming: Vec<Vec<Arc<EdgeStats>>> = vec![Vec::new(); graph.nodes.len()];
        let mut edges = Vec::new();
        for edge in &graph.edges {
            let Some(queue) = queues[edge.to].clone() else {
                continue;
            };
            let stats = Arc::new(EdgeStats::default());
            outputs[edge.from][edge.from_port]
                .push(EdgeSender::new(Arc::clone(&queue), Arc::clone(&stats)));
            inspection[edge.from][edge.from_port].push(
                graph.nodes[edge.from].descriptor.kind == OperatorKind::Source
                    && graph.nodes[edge.to].descriptor.name
                        != inspectflow_operators::preview::OPERATOR,
            );
            incoming[edge.to].push(Arc::clone(&stats));
            edges.push(EdgeInfo {
                from: graph.from_label(edge),
                to: graph.to_label(edge),
                queue,
                stats,
            });
        }

        let latest: Vec<Option<Arc<LatestFrame>>> = graph
            .nodes
            .iter()
            .map(|node| {
                (node.descriptor.kind == OperatorKind::Source)
                    .then(|| Arc::new(LatestFrame::default()))
            })
            .collect();
        let nodes: Vec<NodeInfo> = graph
            .nodes
            .iter()
            .enumerate()
            .map(|(i, node)| NodeInfo {
                id: node.id.to_string(),
                op: node.descriptor.name,
                kind: node.descriptor.kind.name(),
                metrics: Arc::clone(&metrics[i]),
                latest: latest[i].clone(),
                queue: queues[i].clone(),
                incoming: std::mem::take(&mut incoming[i]),
            })
            .collect();

        let mut threads = Vec::with_capacity(graph.nodes.len());
        for (index, (node, node_instances)) in graph.nodes.iter().zip(instances).enumerate() {
            let outputs = NodeOutputs {
                ports: std::mem::take(&mut outputs[index]),
                inspection: std::mem::take(&mut inspection[index]),
            };
            let mut deliveries = if node_instances.len() > 1 {
                let shared = Arc::new(Replicas::new(node_instances.len(), outputs));
                (0..node_instances.len())
                    .map(|_| Delivery::Replica(Arc::clone(&shared)))
                    .collect()
            } else {
                vec![Delivery::Direct(outputs)]
            };
            for (replica, (instance, delivery)) in node_instances
                .into_iter()
                .zip(deliveries.drain(..))
                .enumerate()
            {
                let runtime = NodeRuntime {
                    pipeline: Arc::from(graph.name.as_str()),
                    run_id: Arc::clone(&run_id),
                    id: Arc::clone(&node.id),
                    descriptor: Arc::clone(&node.descriptor),
                    params: node.params.clone(),
                    restart: node.restart.clone(),
                    restarts_done: 0,
                    batch: node.batch.as_ref().map(|b| {
                        (
                            b.max_size,
                            Duration::from_secs_f64(b.max_wait_ms.max(0.0) / 1000.0),
                        )
                    }),
                    input: queues[index].clone(),
                    surroundings: surroundings(index),
                    delivery,
                    metrics: Arc::clone(&metrics[index]),
                    latest: latest[index].clone(),
                    control: Arc::clone(&control),
                };
                let end = ThreadEnd(Arc::clone(&control));
                let name = match replica {
                    0 => format!("if-{}", node.id),
                    n => format!("if-{}.{n}", node.id),
                };
                let spawned = std::thread::Builder::new().name(name).spawn(move || {
                    let _end = end;
                    runtime.run(instance)
                });
                match spawned {
                    Ok(handle) => threads.push(handle),
                    Err(error) => {
                        control.abort();
                        for handle in threads {
                            let _ = handle.join();
                        }
                        return Err(StartError {
                            pipeline: graph.name.clone(),
                            failures: vec![NodeFailure {
                                node: node.id.to_string(),
                                op: node.descriptor.name.to_string(),
                                message: format!("cannot start a thread: {error}"),
                            }],
                        });
                    }
                }
            }
        }
        tracing::info!(pipeline = %graph.name, nodes = graph.nodes.len(), "pipeline started");
        Ok(Pipeline {
            name: graph.name.clone(),
            control,
            threads,
            nodes,
            edges,
        })
    }

    /// A handle for stopping the pipeline from elsewhere.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            control: Arc::clone(&self.control),
        }
    }

    /// Switches between inspection and preview only (see [`RunMode`]); the sources keep
    /// running either way.
    pub fn set_mode(&self, mode: RunMode) {
        self.control
            .previewing_only
            .store(mode == RunMode::Active, Ordering::SeqCst);
        tracing::info!(pipeline = %self.name, ?mode, "mode");
    }

    /// The current mode.
    pub fn mode(&self) -> RunMode {
        if self.control.previewing_only.load(Ordering::SeqCst) {
            RunMode::Active
        } else {
            RunMode::Running
        }
    }

    /// Whether every node thread has finished.
    pub fn is_finished(&self) -> bool {
        self.control.running_threads.load(Ordering::SeqCst) == 0
    }

    /// Turns true when every node thread has finished (the source ended and everything
    /// drained, a failure, or a stop): a supervisor awaits it instead of polling.
    pub fn ended(&self) -> tokio::sync::watch::Receiver<bool> {
        self.control.ended.subscribe()
    }

    /// The most recent frame of source node `node`, or of the first source that has produced
    /// one when `node` is `None`, with the source's node id. `None` before any frame arrived (or
    /// when `node` is not a source).
    pub fn latest_frame(&self, node: Option<&str>) -> Option<(String, Frame)> {
        self.nodes
            .iter()
            .filter(|info| node.is_none_or(|id| info.id == id))
            .find_map(|info| Some((info.id.clone(), info.latest.as_ref()?.get()?)))
    }

    /// Ids of the source nodes.
    pub fn source_nodes(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|info| info.latest.is_some())
            .map(|info| info.id.clone())
            .collect()
    }

    /// Current metrics.
    pub fn report(&self) -> MetricsReport {
        let failed = self
            .control
            .failure
            .lock()
            .map(|f| f.is_some())
            .unwrap_or(true);
        let state = if failed {
            "failed"
        } else if !self.is_finished() {
            "running"
        } else if self.control.stop.is_raised() {
            "stopped"
        } else {
            "completed"
        };
        self.report_with_state(state)
    }

    fn report_with_state(&self, state: &str) -> MetricsReport {
        let nodes = self
            .nodes
            .iter()
            .map(|node| {
                let m = &node.metrics;
                NodeReport {
                    id: node.id.clone(),
                    op: node.op.to_string(),
                    kind: node.kind.to_string(),
                    packets_in: m.packets_in.load(Ordering::Relaxed),
                    packets_out: m.packets_out.load(Ordering::Relaxed),
                    fps: m.rate(),
                    latency_ms: m.latency.summary(),
                    queue: node.queue.as_ref().map(|q| QueueReport {
                        capacity: q.capacity(),
                        policy: q.policy().name().to_string(),
                        depth: q.depth(),
                        max_depth: q.max_depth(),
                    }),
                    drops: node
                        .incoming
                        .iter()
                        .map(|s| s.dropped.load(Ordering::Relaxed))
                        .sum(),
                    errors: m.errors.load(Ordering::Relaxed),
                    restarts: m.restarts.load(Ordering::Relaxed),
                    batches: m.batches.load(Ordering::Relaxed),
                    end_to_end_ms: m.end_to_end.summary(),
                    source: (node.kind == "source").then(|| {
                        let (state, outages, last_error) = endpoint_state(&m.endpoint_health);
                        SourceReport {
                            state,
                            outages,
                            last_error,
                            dropped: m.endpoint_health.dropped(),
                        }
                    }),
                    sink: (node.kind == "sink").then(|| {
                        let (state, outages, last_error) = endpoint_state(&m.endpoint_health);
                        SinkReport {
                            state,
                            outages,
                            last_error,
                            failed: m.endpoint_health.failed(),
                            skipped: m.endpoint_health.skipped(),
                        }
                    }),
                }
            })
            .collect();
        let edges = self
            .edges
            .iter()
            .map(|edge| EdgeReport {
                from: edge.from.clone(),
                to: edge.to.clone(),
                policy: edge.queue.policy().name().to_string(),
                capacity: edge.queue.capacity(),
                sent: edge.stats.sent.load(Ordering::Relaxed),
                dropped: edge.stats.dropped.load(Ordering::Relaxed),
            })
            .collect();
        MetricsReport {
            pipeline: self.name.clone(),
            state: state.to_string(),
            mode: self.mode(),
            elapsed_s: self.control.started.elapsed().as_secs_f64(),
            nodes,
            edges,
        }
    }

    /// Waits for every node to finish and returns the final metrics and the failure, if any.
    pub fn wait(mut self) -> RunOutcome {
        for handle in self.threads.drain(..) {
            // Panics are caught inside the thread and reported as failures.
            let _ = handle.join();
        }
        let failure = self.control.failure.lock().ok().and_then(|f| f.clone());
        let report = self.report();
        tracing::info!(pipeline = %self.name, state = %report.state, "pipeline finished");
        RunOutcome { report, failure }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.control.abort();
            for handle in self.threads.drain(..) {
                let _ = handle.join();
            }
        }
    }
}

fn failure_of(node: &ValidatedNode, error: &OpError) -> NodeFailure {
    NodeFailure {
        node: node.id.to_string(),
        op: node.descriptor.name.to_string(),
        message: error.to_string(),
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl NodeRuntime {
    fn run(mut self, instance: OperatorInstance) {
        let control = Arc::clone(&self.control);
        let outcome = catch_unwind(AssertUnwindSafe(|| match instance {
            OperatorInstance::Source(source) => self.run_source(source),
            OperatorInstance::Transform(transform) => self.run_transform(transform),
            OperatorInstance::Sink(sink) => self.run_sink(sink),
        }));
        if let Err(payload) = outcome {
            control.fail(NodeFailure {
                node: self.id.to_string(),
                op: self.descriptor.name.to_string(),
                message: format!("operator panicked: {}", panic_message(payload.as_ref())),
            });
        }
        // End of stream downstream, and upstream learns that nobody listens any more (once the
        // last replica of the node ends).
        let last = match &mut self.delivery {
            Delivery::Direct(outputs) => {
                outputs.close();
                true
            }
            Delivery::Replica(replicas) => replicas.finish_one(),
        };
        if last && let Some(input) = &self.input {
            input.consumer_done();
        }
    }

    fn failure(&self, error: &OpError) -> NodeFailure {
        NodeFailure {
            node: self.id.to_string(),
            op: self.descriptor.name.to_string(),
            message: error.to_string(),
        }
    }

    /// After an operator error: a rebuilt operator when the restart policy allows one, or `None`
    /// after reporting the failure (which aborts the graph).
    fn recover(&mut self, error: OpError) -> Option<OperatorInstance> {
        self.metrics.errors.fetch_add(1, Ordering::Relaxed);
        let allowed = self.restart.policy == RestartPolicy::OnFailure
            && self.restarts_done < self.restart.max_restarts;
        if !allowed {
            let mut failure = self.failure(&error);
            if self.restart.policy == RestartPolicy::OnFailure {
                failure.message = format!(
                    "{} (after {} restarts)",
                    failure.message, self.restarts_done
                );
            }
            self.control.fail(failure);
            return None;
        }
        tracing::warn!(node = %self.id, "operator failed, restarting: {error}");
        let backoff = Instant::now() + Duration::from_millis(self.restart.backoff_ms);
        while Instant::now() < backoff && !self.control.aborted.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5).min(backoff - Instant::now()));
        }
        match self
            .descriptor
            .build(self.params.clone(), &self.surroundings.context(&self.id))
        {
            Ok(instance) => {
                self.restarts_done += 1;
                self.metrics.restarts.fetch_add(1, Ordering::Relaxed);
                Some(instance)
            }
            Err(rebuild_error) => {
                let mut failure = self.failure(&rebuild_error);
                failure.message = format!("restart after '{error}' failed: {}", failure.message);
                self.control.fail(failure);
                None
            }
        }
    }

    /// Sends a source's packet to every edge of `port`. False when nobody downstream listens.
    fn forward_from_source(&mut self, port: usize, packet: Packet) -> bool {
        let previewing_only = self.control.previewing_only.load(Ordering::Relaxed);
        match &mut self.delivery {
            Delivery::Direct(outputs) => outputs.forward(previewing_only, port, packet),
            // Validation refuses replicas of sources (no source is replicable).
            Delivery::Replica(_) => false,
        }
    }

    /// Sends on what the operator emitted for the packet with `ticket` (its place in the input's
    /// order; only replicas use it). False when nobody downstream listens.
    fn forward_emitted(&mut self, emitter: &mut Emitter, ticket: u64) -> bool {
        let previewing_only = self.control.previewing_only.load(Ordering::Relaxed);
        let metrics = &self.metrics;
        let emitted = emitter.drain().inspect(|_| {
            metrics.packets_out.fetch_add(1, Ordering::Relaxed);
        });
        match &mut self.delivery {
            Delivery::Direct(outputs) => {
                let mut listening = true;
                for (port, packet) in emitted {
                    listening = outputs.forward(previewing_only, port, packet);
                }
                listening
            }
            Delivery::Replica(replicas) => replicas.deliver(ticket, emitted, previewing_only),
        }
    }

    fn run_source(&mut self, mut source: Box<dyn Source>) {
        let ctx = SourceContext {
            stop: self.control.stop.clone(),
            node_id: Arc::clone(&self.id),
            health: Arc::clone(&self.metrics.endpoint_health),
        };
        // A rebuilt source counts its frames from 0 again. Its frames continue after the last
        // one sent instead, so that every frame of a run keeps a sequence of its own: sinks key
        // on it (JetStream message ids would drop the new frames as duplicates, file names
        // would be overwritten).
        let (mut offset, mut next_sequence) = (0u64, 0u64);
        while !ctx.stop.is_raised() {
            match source.next(&ctx) {
                Ok(SourcePoll::Packet(mut packet)) => {
                    packet.frame.sequence += offset;
                    next_sequence = next_sequence.max(packet.frame.sequence + 1);
                    self.metrics.packets_out.fetch_add(1, Ordering::Relaxed);
                    if let Some(latest) = &self.latest {
                        latest.set(&packet.frame);
                    }
                    self.metrics
                        .mark_activity(self.control.started, Instant::now(), 1);
                    if !self.forward_from_source(0, packet) {
                        break;
                    }
                }
                Ok(SourcePoll::Pending) => {}
                Ok(SourcePoll::EndOfStream) => break,
                Err(error) => match self.recover(error) {
                    Some(OperatorInstance::Source(rebuilt)) => {
                        source = rebuilt;
                        offset = next_sequence;
                    }
                    _ => break,
                },
            }
        }
    }

    fn run_transform(&mut self, mut transform: Box<dyn Transform>) {
        let Some(input) = self.input.clone() else {
            return;
        };
        let (max, fill_wait) = match self.batch {
            Some((size, wait)) => (size, Some(wait)),
            None => (1, None),
        };
        let mut batch = Vec::with_capacity(max);
        let mut emitter = Emitter::new();
        let replicas = match &self.delivery {
            Delivery::Replica(replicas) => Some(Arc::clone(replicas)),
            Delivery::Direct(_) => None,
        };
        // Whether the operator holds work in flight: then the node never waits for input
        // without polling it, so results leave as soon as they are ready. (Replicable operators
        // never hold work.)
        let mut held = Held::Nothing;
        loop {
            batch.clear();
            let idle_wait = (held == Held::InFlight).then_some(Duration::ZERO);
            let (outcome, ticket) = match &replicas {
                Some(replicas) => replicas.take(&input, &mut batch),
                None => (input.pop(max, fill_wait, idle_wait, &mut batch), 0),
            };
            match outcome {
                PopOutcome::Aborted => return,
                PopOutcome::Idle => {
                    let polled = transform.poll(HELD_WORK_POLL, &mut emitter);
                    match self.after_call(polled, &mut emitter, &mut transform, ticket) {
                        Some(now_held) => held = now_held,
                        None => return,
                    }
                    continue;
                }
                PopOutcome::EndOfStream => {
                    let ticket = replicas.as_ref().map_or(0, |r| r.closing_ticket());
                    match transform.finish(&mut emitter) {
                        Ok(()) => {
                            self.forward_emitted(&mut emitter, ticket);
                        }
                        Err(error) => self.control.fail(self.failure(&error)),
                    }
                    return;
                }
                PopOutcome::Packets => {}
            }
            let count = batch.len() as u64;
            self.metrics.packets_in.fetch_add(count, Ordering::Relaxed);
            let started = Instant::now();
            let result = if self.batch.is_some() {
                self.metrics.batches.fetch_add(1, Ordering::Relaxed);
                transform.process_batch(&mut batch, &mut emitter)
            } else {
                match batch.pop() {
                    Some(packet) => transform.process(packet, &mut emitter),
                    None => Ok(()),
                }
            };
            let finished = Instant::now();
            self.metrics.latency.record_n(finished - started, count);
            self.metrics
                .mark_activity(self.control.started, finished, count);
            // Collect whatever finished meanwhile, without waiting.
            let polled = result.and_then(|()| transform.poll(Duration::ZERO, &mut emitter));
            match self.after_call(polled, &mut emitter, &mut transform, ticket) {
                Some(Held::InFlight) if replicas.is_some() => {
                    // Its later results would have no place in the order.
                    self.control.fail(
                        self.failure(&OpError::Failed(
                            "the operator is declared replicable but holds work in flight; run it \
                         without `replicas`"
                                .into(),
                        )),
                    );
                    return;
                }
                Some(now_held) => held = now_held,
                None => return,
            }
        }
    }

    /// Forwards what a transform emitted for the packet with `ticket` and handles its failure
    /// (restart or stop). Returns whether it holds work, or `None` when the node must stop.
    fn after_call(
        &mut self,
        result: Result<Held, OpError>,
        emitter: &mut Emitter,
        transform: &mut Box<dyn Transform>,
        ticket: u64,
    ) -> Option<Held> {
        match result {
            Ok(held) => self.forward_emitted(emitter, ticket).then_some(held),
            Err(error) => {
                // Whatever the operator emitted before failing still goes on.
                self.forward_emitted(emitter, ticket);
                match self.recover(error) {
                    Some(OperatorInstance::Transform(rebuilt)) => {
                        *transform = rebuilt;
                        Some(Held::Nothing)
                    }
                    _ => None,
                }
            }
        }
    }

    fn run_sink(&mut self, mut sink: Box<dyn Sink>) {
        let Some(input) = self.input.clone() else {
            return;
        };
        let ctx = SinkContext {
            stop: self.control.stop.clone(),
            pipeline: Arc::clone(&self.pipeline),
            node_id: Arc::clone(&self.id),
            run_id: Arc::clone(&self.run_id),
            health: Arc::clone(&self.metrics.endpoint_health),
        };
        sink.attach(&ctx);
        let mut batch = Vec::with_capacity(1);
        loop {
            batch.clear();
            match input.pop(1, None, None, &mut batch) {
                PopOutcome::Aborted => return,
                PopOutcome::EndOfStream => {
                    if let Err(error) = sink.finish() {
                        self.control.fail(self.failure(&error));
                    }
                    return;
                }
                // No idle wait was asked for.
                PopOutcome::Idle | PopOutcome::Packets => {}
            }
            let Some(packet) = batch.pop() else { continue };
            self.metrics.packets_in.fetch_add(1, Ordering::Relaxed);
            let captured = packet.frame.capture.instant;
            let started = Instant::now();
            let result = sink.consume(packet);
            let finished = Instant::now();
            self.metrics.latency.record(finished - started);
            self.metrics
                .mark_activity(self.control.started, finished, 1);
            match result {
                Ok(()) => self
                    .metrics
                    .end_to_end
                    .record(finished.saturating_duration_since(captured)),
                Err(error) => match self.recover(error) {
                    Some(OperatorInstance::Sink(rebuilt)) => {
                        sink = rebuilt;
                        sink.attach(&ctx);
                    }
                    _ => return,
                },
            }
        }
    }
}

/// `online`/`offline`, outages and the last error of a node's outside end.
fn endpoint_state(health: &EndpointHealth) -> (String, u64, Option<String>) {
    let state = if health.is_online() {
        "online"
    } else {
        "offline"
    };
    (state.to_string(), health.outages(), health.last_error())
}
