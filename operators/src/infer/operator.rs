//! `infer.openvino`: runs a model on each packet's tensor with OpenVINO and attaches the outputs.
//!
//! Several infer requests are kept in flight (`requests`): a packet's inference is started
//! asynchronously and the operator returns at once for the next packet, so that preprocessing and
//! the rest of the pipeline overlap inference; results are emitted in arrival order. With `batch`
//! on the node, one request runs a whole batch (the model is reshaped to the batch size; a short
//! last batch is padded and the padding's outputs dropped).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openvino::InferRequest;
use serde::Deserialize;

use super::model::{CompileOptions, LoadedModel, ModelError, PerformanceHint, Precision, call};
use super::shared;
use crate::contract::{
    Emitter, Held, OpError, OperatorInstance, OperatorKind, OutputType, PortType, Transform,
};
use crate::packet::{ModelOutput, Packet};
use crate::pool::BufferPool;
use crate::registry::OperatorDescriptor;

/// Parameters of `infer.openvino`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InferParams {
    /// OpenVINO IR (`.xml`, with its `.bin` beside it) or ONNX model.
    #[schemars(with = "crate::params::FileParam")]
    pub model: PathBuf,
    /// Inference device: `CPU`, `GPU`, `NPU`, `AUTO` or an indexed name (`GPU.1`); see
    /// `inspectflow devices`.
    #[serde(default = "default_device")]
    pub device: String,
    /// OpenVINO performance hint. When absent: `latency` if a live source feeds the node and it
    /// is the pipeline's only one (a camera: each frame's result as soon as it can be, one
    /// stream's memory); `throughput` otherwise: files and folders (frames per second), and
    /// several cameras, whose frames are parallel work that one stream spread over every core
    /// would run one at a time.
    #[serde(default)]
    pub hint: Option<PerformanceHint>,
    /// Infer requests in flight. When absent: 2 for a live source (a camera's next frame is
    /// filled while the last one runs); otherwise twice the number OpenVINO finds best for the
    /// device and hint (one set runs while the runtime hands the other's results on and fills
    /// it), at least 2 and at most 32.
    #[serde(default)]
    #[schemars(range(min = 1, max = 32))]
    pub requests: Option<usize>,
    /// CPU threads for inference; OpenVINO's choice when absent.
    #[serde(default)]
    #[schemars(range(min = 1, max = 1024))]
    pub threads: Option<usize>,
    /// Parallel inference streams (OpenVINO's NUM_STREAMS); the hint's choice when absent.
    #[serde(default)]
    #[schemars(range(min = 1, max = 64))]
    pub streams: Option<usize>,
    /// Arithmetic precision: `f32` (default) gives the results training calibrated on; `bf16` or
    /// `f16` are faster where the device supports them; `device` takes the device's default.
    #[serde(default = "default_precision")]
    pub precision: Precision,
    /// Batch size the model runs with (set the node's `batch.max_size` to the same value).
    #[serde(default = "default_batch")]
    #[schemars(range(min = 1, max = 256))]
    pub batch: usize,
}

fn default_device() -> String {
    super::model::DEFAULT_DEVICE.into()
}
/// The hint when a graph sets none (see [`InferParams::hint`]): latency for a node that the
/// pipeline's only live source feeds, throughput otherwise. With four 360p cameras on one model
/// on 2 cores, the latency hint's one stream of two threads kept 17.2-20.4 frames a second per
/// camera, the throughput hint's two single-thread streams 22.1-24.4 (f32; bf16: 27.2 against
/// 29.6): under the latency hint OpenVINO's two threads meet after every layer and spin while
/// the cameras' decoders and post-processing hold the cores (BENCHMARKS.md, issue 08).
fn default_hint(live_input: bool, live_sources: usize) -> PerformanceHint {
    if live_input && live_sources <= 1 {
        PerformanceHint::Latency
    } else {
        PerformanceHint::Throughput
    }
}

/// Requests in flight when a graph sets none (see [`InferParams::requests`]). A camera paces
/// its frames, so 2 keep it busy; files and folders get twice OpenVINO's optimal number: with
/// only the optimal number in flight, a stream waits while its finished request is emptied and
/// refilled. On 2 cores under the throughput hint, 4 requests gave 2-5% more frames a second
/// than 2 on the 1080p job of `benches/e2e_vs_python.sh` and the same at 360p (BENCHMARKS.md,
/// issue 08).
fn default_requests(optimal: usize, live_input: bool) -> usize {
    if live_input {
        2
    } else {
        (2 * optimal).clamp(2, 32)
    }
}
fn default_precision() -> Precision {
    Precision::F32
}
fn default_batch() -> usize {
    1
}

/// The registry entry.
pub fn descriptor() -> OperatorDescriptor {
    OperatorDescriptor::builder::<InferParams>(
        "infer.openvino",
        OperatorKind::Transform,
        "Runs an OpenVINO IR or ONNX model on each packet's tensor with several requests in flight (`requests`), each result handed on as soon as its request completes (even when no more input comes); optional batching, device `CPU`, `GPU`, `NPU` or `AUTO`, latency or throughput hint, threads, streams, precision.",
    )
    .input("in", PortType::Tensor)
    .output("out", OutputType::Fixed(PortType::Inference))
    .batching()
    .build_with(|params, context| {
        let hint = params
            .hint
            .unwrap_or(default_hint(context.live_input, context.live_sources));
        let mut infer = Infer::new(params, hint, context.live_input)?;
        infer.keep_tensor = context.tensor_wanted_downstream;
        Ok(OperatorInstance::Transform(Box::new(infer)))
    })
}

fn model_error(error: ModelError) -> OpError {
    match error {
        ModelError::UnknownDevice { .. } => OpError::param("device", error.to_string()),
        ModelError::Missing(_) | ModelError::Unreadable { .. } => {
            OpError::param("model", error.to_string())
        }
        other => OpError::Failed(other.to_string()),
    }
}

/// A request with the packets whose inference it runs.
struct InFlight {
    request: InferRequest,
    packets: Vec<Packet>,
}

/// The running operator.
pub struct Infer {
    /// Shared with every other node that names the same model and settings.
    model: Arc<LoadedModel>,
    batch: usize,
    idle: Vec<InferRequest>,
    in_flight: VecDeque<InFlight>,
    outputs: BufferPool<f32>,
    /// Whether packets keep their tensor once it is written into a request: only when a node
    /// downstream reads it. Otherwise its buffer goes back to the preprocess pool at once
    /// instead of travelling to the sinks (196 KB of pixels a packet at 256x256 RGB).
    keep_tensor: bool,
}

/// Runs every request once on a zero input, all at once, before the first frame: OpenVINO sets
/// up a request's memory and each stream's kernels on their first inference, which would
/// otherwise land on the first frames of a camera (tens of milliseconds at 1080p).
fn warm_up(model: &LoadedModel, requests: &mut [InferRequest]) -> Result<(), ModelError> {
    for request in requests.iter_mut() {
        let mut tensor = model.input_tensor(request)?;
        call("filling the warm-up input", tensor.get_data_mut::<f32>())?.fill(0.0);
        call("starting the warm-up inference", request.infer_async())?;
    }
    for request in requests.iter_mut() {
        call("waiting for the warm-up inference", request.wait(600_000))?;
    }
    Ok(())
}

impl Infer {
    /// Takes the model compiled with `hint` (compiling it unless another node already holds it)
    /// and creates this node's requests.
    pub fn new(
        params: InferParams,
        hint: PerformanceHint,
        live_input: bool,
    ) -> Result<Self, OpError> {
        let model = shared::load(
            &params.model,
            &CompileOptions {
                device: params.device.clone(),
                hint,
                threads: params.threads,
                streams: params.streams,
                precision: params.precision,
                batch: params.batch,
            },
        )
        .map_err(model_error)?;
        let requests = params
            .requests
            .unwrap_or_else(|| default_requests(model.optimal_requests, live_input));
        let mut idle = (0..requests)
            .map(|_| model.request())
            .collect::<Result<Vec<_>, _>>()
            .map_err(model_error)?;
        warm_up(&model, &mut idle).map_err(model_error)?;
        Ok(Self {
            model,
            batch: params.batch,
            idle,
            in_flight: VecDeque::new(),
            outputs: BufferPool::new(64),
            keep_tensor: true,
        })
    }

    /// Starts inference of up to `batch` packets on an idle request (waiting for the oldest one
    /// to finish when none is idle).
    fn start(&mut self, mut packets: Vec<Packet>, out: &mut Emitter) -> Result<(), OpError> {
        if self.idle.is_empty() {
            self.complete_oldest(out)?;
        }
        let Some(mut request) = self.idle.pop() else {
            return Err(OpError::Failed("no infer request available".into()));
        };
        let per_frame = self.model.input_len() / self.batch;
        let mut tensor = self.model.input_tensor(&request).map_err(model_error)?;
        let input = call("filling the input", tensor.get_data_mut::<f32>()).map_err(model_error)?;
        for (slot, packet) in packets.iter().enumerate() {
            let Some(tensor) = packet.tensor.as_ref() else {
                return Err(OpError::UnsupportedInput(
                    "packet has no tensor: put a `preprocess` node before `infer.openvino`".into(),
                ));
            };
            if tensor.len() != per_frame {
                return Err(OpError::UnsupportedInput(format!(
                    "tensor has {} values but model {} expects input shape {:?}",
                    tensor.len(),
                    self.model.path.display(),
                    self.model.input.shape
                )));
            }
            // The normalised values go straight into the request's own input buffer.
            tensor.write_to(&mut input[slot * per_frame..(slot + 1) * per_frame]);
        }
        // A short batch: zero the unused slots (their outputs are dropped).
        input[packets.len() * per_frame..].fill(0.0);
        if !self.keep_tensor {
            packets.iter_mut().for_each(|packet| packet.tensor = None);
        }
        call("starting inference", request.infer_async()).map_err(model_error)?;
        self.in_flight.push_back(InFlight { request, packets });
        Ok(())
    }

    /// Waits for the oldest request and emits its packets with their outputs.
    fn complete_oldest(&mut self, out: &mut Emitter) -> Result<(), OpError> {
        let Some(InFlight {
            mut request,
            packets,
        }) = self.in_flight.pop_front()
        else {
            return Ok(());
        };
        // OpenVINO rejects an infinite wait; ten minutes means the device is stuck.
        let waited = call(
            "waiting for inference (10 minutes at most)",
            request.wait(600_000),
        )
        .map_err(model_error);
        let result = waited.and_then(|()| self.attach_outputs(&request, packets, out));
        self.idle.push(request);
        result
    }

    /// Copies each output's slice for each packet into pooled buffers and emits the packets.
    fn attach_outputs(
        &self,
        request: &InferRequest,
        packets: Vec<Packet>,
        out: &mut Emitter,
    ) -> Result<(), OpError> {
        let mut per_packet: Vec<Vec<ModelOutput>> = packets
            .iter()
            .map(|_| Vec::with_capacity(self.model.outputs.len()))
            .collect();
        for (index, port) in self.model.outputs.iter().enumerate() {
            let tensor = call(
                "reading an output",
                request.get_output_tensor_by_index(index),
            )
            .map_err(model_error)?;
            let values =
                call("reading output values", tensor.get_data::<f32>()).map_err(model_error)?;
            let per_frame = values.len() / self.batch;
            let mut shape: Vec<usize> = port.shape.iter().map(|&d| d.max(0) as usize).collect();
            if let Some(first) = shape.first_mut() {
                *first = 1;
            }
            for (slot, outputs) in per_packet.iter_mut().enumerate() {
                let mut buffer = self.outputs.get(per_frame);
                buffer.copy_from_slice(&values[slot * per_frame..(slot + 1) * per_frame]);
                outputs.push(ModelOutput {
                    name: port.name.clone(),
                    shape: shape.clone(),
                    values: buffer,
                });
            }
        }
        for (mut packet, outputs) in packets.into_iter().zip(per_packet) {
            packet.inference = Some(Arc::from(outputs));
            out.emit(0, packet);
        }
        Ok(())
    }
}

impl Transform for Infer {
    fn process(&mut self, packet: Packet, out: &mut Emitter) -> Result<(), OpError> {
        self.start(vec![packet], out)
    }

    /// Emits every request that has finished, in order, waiting up to `wait` for the oldest.
    fn poll(&mut self, wait: Duration, out: &mut Emitter) -> Result<Held, OpError> {
        let mut timeout_ms = wait.as_millis().min(i64::MAX as u128) as i64;
        while let Some(oldest) = self.in_flight.front_mut() {
            match oldest.request.wait(timeout_ms) {
                Ok(()) => self.complete_oldest(out)?,
                Err(error) if error.kind == openvino::InferenceErrorKind::ResultNotReady => break,
                Err(error) => call("waiting for inference", Err(error)).map_err(model_error)?,
            }
            // Later requests are only collected if they are done already.
            timeout_ms = 0;
        }
        Ok(if self.in_flight.is_empty() {
            Held::Nothing
        } else {
            Held::InFlight
        })
    }

    fn process_batch(&mut self, batch: &mut Vec<Packet>, out: &mut Emitter) -> Result<(), OpError> {
        while !batch.is_empty() {
            let take = batch.len().min(self.batch);
            let packets: Vec<Packet> = batch.drain(..take).collect();
            self.start(packets, out)?;
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Emitter) -> Result<(), OpError> {
        while !self.in_flight.is_empty() {
            self.complete_oldest(out)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_camera_gets_the_latency_hint_several_cameras_and_files_the_throughput_hint() {
        assert_eq!(default_hint(true, 1), PerformanceHint::Latency);
        assert_eq!(default_hint(true, 4), PerformanceHint::Throughput);
        assert_eq!(default_hint(false, 0), PerformanceHint::Throughput);
        assert_eq!(default_hint(false, 2), PerformanceHint::Throughput);
    }

    #[test]
    fn cameras_keep_two_requests_and_files_twice_the_optimal_number() {
        assert_eq!(default_requests(1, true), 2);
        assert_eq!(default_requests(2, true), 2);
        assert_eq!(default_requests(1, false), 2);
        assert_eq!(default_requests(2, false), 4);
        assert_eq!(default_requests(40, false), 32);
    }
}
