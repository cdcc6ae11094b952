//! A model compiled for a device, with its input and output descriptions, and errors that say
//! what is wrong in a user's terms (a missing or corrupt file, a device that is not there, an
//! input of the wrong size).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use openvino::{CompiledModel, DeviceType, InferRequest, PropertyKey, RwPropertyKey, Tensor};

use super::runtime::{self, RuntimeError};

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The runtime is missing or broken.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The model file does not exist.
    #[error("model file {0} does not exist")]
    Missing(PathBuf),
    /// OpenVINO could not read the file.
    #[error(
        "cannot read model {path}: {message} (is it an OpenVINO IR .xml with its .bin, or an ONNX file?)"
    )]
    Unreadable {
        /// The model file.
        path: PathBuf,
        /// OpenVINO's message.
        message: String,
    },
    /// The device name is not one this machine has.
    #[error("device '{device}' is not available here; available: {available}")]
    UnknownDevice {
        /// Requested device.
        device: String,
        /// What OpenVINO lists (plus AUTO).
        available: String,
    },
    /// Compiling for the device failed.
    #[error("cannot compile {path} for {device}: {message}")]
    Compile {
        /// The model file.
        path: PathBuf,
        /// The device.
        device: String,
        /// OpenVINO's message.
        message: String,
    },
    /// A call on a compiled model failed.
    #[error("{context}: {message}")]
    Call {
        /// What was being done.
        context: String,
        /// OpenVINO's message.
        message: String,
    },
    /// The input does not match what the model expects.
    #[error("input has {actual} values but the model expects shape {expected:?}")]
    InputSize {
        /// Values given.
        actual: usize,
        /// The model's input shape.
        expected: Vec<i64>,
    },
}

/// Maps an OpenVINO error to a [`ModelError::Call`] that says what was being done.
pub fn call<T>(
    context: impl Into<String>,
    result: Result<T, openvino::InferenceError>,
) -> Result<T, ModelError> {
    result.map_err(|e| ModelError::Call {
        context: context.into(),
        message: e.to_string(),
    })
}

/// OpenVINO's performance hint.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum PerformanceHint {
    /// Lowest latency per request.
    Latency,
    /// Highest throughput with several requests in flight.
    Throughput,
}

/// Arithmetic precision of inference.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit float: results match training and calibration exactly.
    F32,
    /// bfloat16 where the CPU supports it (faster, about 3 significant digits).
    Bf16,
    /// 16-bit float (GPUs, NPUs).
    F16,
    /// The device's default (bf16 on CPUs with AVX-512 BF16 or AMX).
    Device,
}

/// The device inference runs on unless told otherwise (graph files, training, the API).
pub const DEFAULT_DEVICE: &str = "CPU";

/// Settings for compiling a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileOptions {
    /// `CPU`, `GPU`, `NPU`, `AUTO` or an indexed name such as `GPU.1`.
    pub device: String,
    /// Latency or throughput.
    pub hint: PerformanceHint,
    /// CPU threads for inference; OpenVINO decides when `None`.
    pub threads: Option<usize>,
    /// Parallel inference streams; the hint decides when `None`.
    pub streams: Option<usize>,
    /// Arithmetic precision.
    pub precision: Precision,
    /// Batch size of the input (the model is reshaped when it differs).
    pub batch: usize,
}

impl Default for CompileOptions {
    /// One frame at a time on the CPU, latency hint, f32: what tools and training use.
    fn default() -> Self {
        Self {
            device: DEFAULT_DEVICE.into(),
            hint: PerformanceHint::Latency,
            threads: None,
            streams: None,
            precision: Precision::F32,
            batch: 1,
        }
    }
}

/// Name and static shape of a model input or output.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PortInfo {
    /// Tensor name.
    pub name: String,
    /// Dimensions.
    pub shape: Vec<i64>,
}

/// One output of a synchronous run.
#[derive(Debug, Clone)]
pub struct OutputValues {
    /// Tensor name.
    pub name: String,
    /// Dimensions.
    pub shape: Vec<i64>,
    /// Values in row-major order.
    pub values: Vec<f32>,
}

/// Fails with [`ModelError::UnknownDevice`] unless OpenVINO has `device_name` here (`CPU`,
/// `GPU`, `NPU`, `AUTO` or an indexed name such as `GPU.1`).
pub fn require_device(device_name: &str) -> Result<(), ModelError> {
    let base = device_name.split(['.', ':']).next().unwrap_or(device_name);
    // The CPU plugin is always there. Any other device is checked against the list, which
    // loads every plugin (the GPU plugin alone costs about 15 MB of resident libraries and
    // its OpenCL probe), so a CPU pipeline does not pay for it.
    if base == "CPU" {
        return Ok(());
    }
    let known = runtime::available_devices()?;
    if known
        .iter()
        .any(|d| d.name == device_name || d.name.split('.').next() == Some(base))
    {
        return Ok(());
    }
    Err(ModelError::UnknownDevice {
        device: device_name.to_string(),
        available: known
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// A model compiled for a device. Its infer requests are independent, so one compiled model can
/// serve several nodes and pipelines at once (see [`super::shared`]).
pub struct LoadedModel {
    compiled: Mutex<CompiledModel>,
    /// The model's input.
    pub input: PortInfo,
    /// The model's outputs, in order.
    pub outputs: Vec<PortInfo>,
    /// The file it came from.
    pub path: PathBuf,
    /// Infer requests OpenVINO finds best for the device and hint (its
    /// `OPTIMAL_NUMBER_OF_INFER_REQUESTS`; 1 when the device does not say).
    pub optimal_requests: usize,
}

impl LoadedModel {
    /// Reads an IR (`.xml` with its `.bin`) or ONNX file and compiles it.
    pub fn load(path: &Path, options: &CompileOptions) -> Result<Self, ModelError> {
        if !path.is_file() {
            return Err(ModelError::Missing(path.to_path_buf()));
        }
        let mut core = runtime::core()?;
        let device_name = options.device.as_str();
        require_device(device_name)?;
        let weights = if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("xml"))
        {
            path.with_extension("bin").display().to_string()
        } else {
            String::new()
        };
        let mut model = core
            .read_model_from_file(&path.display().to_string(), &weights)
            .map_err(|e| ModelError::Unreadable {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let input_node = call("reading the model input", model.get_input_by_index(0))?;
        let input_shape = call("reading the input shape", input_node.get_partial_shape())?;
        let dims: Vec<i64> = input_shape
            .get_dimensions()
            .iter()
            .map(|d| d.get_min())
            .collect();
        if dims.first().is_some_and(|&b| b != options.batch as i64) || input_shape.is_dynamic() {
            let mut target = dims.clone();
            if let Some(first) = target.first_mut() {
                *first = options.batch as i64;
            }
            let partial = call(
                "describing the batch shape",
                openvino::PartialShape::new_static(target.len() as i64, &target),
            )?;
            call(
                "reshaping the model to the batch size",
                model.reshape_single_input(&partial),
            )?;
        }
        let device = DeviceType::from(device_name);
        let hint = match options.hint {
            PerformanceHint::Latency => "LATENCY",
            PerformanceHint::Throughput => "THROUGHPUT",
        };
        let configure_device = if device_name == "AUTO" {
            DeviceType::CPU
        } else {
            device.to_owned()
        };
        call(
            "setting the performance hint",
            core.set_property(&configure_device, &RwPropertyKey::HintPerformanceMode, hint),
        )?;
        if let Some(threads) = options.threads {
            call(
                "setting the thread count",
                core.set_property(
                    &DeviceType::CPU,
                    &RwPropertyKey::InferenceNumThreads,
                    &threads.to_string(),
                ),
            )?;
        }
        let precision = match options.precision {
            Precision::F32 => Some("f32"),
            Precision::Bf16 => Some("bf16"),
            Precision::F16 => Some("f16"),
            Precision::Device => None,
        };
        if let Some(precision) = precision {
            call(
                "setting the inference precision",
                core.set_property(
                    &configure_device,
                    &RwPropertyKey::HintInferencePrecision,
                    precision,
                ),
            )?;
        }
        if let Some(streams) = options.streams {
            call(
                "setting the stream count",
                core.set_property(
                    &configure_device,
                    &RwPropertyKey::NumStreams,
                    &streams.to_string(),
                ),
            )?;
        }
        let compiled = core
            .compile_model(&model, device)
            .map_err(|e| ModelError::Compile {
                path: path.to_path_buf(),
                device: device_name.to_string(),
                message: e.to_string(),
            })?;
        let describe = |node: openvino::Node| -> Result<PortInfo, ModelError> {
            let name = call("reading a port name", node.get_name())?;
            let shape = call("reading a port shape", node.get_shape())?;
            Ok(PortInfo {
                name,
                shape: shape.get_dimensions().to_vec(),
            })
        };
        let input = describe(call(
            "reading the compiled input",
            compiled.get_input_by_index(0),
        )?)?;
        let count = call("counting outputs", compiled.get_output_size())?;
        let outputs = (0..count)
            .map(|i| describe(call("reading an output", compiled.get_output_by_index(i))?))
            .collect::<Result<Vec<_>, _>>()?;
        let optimal_requests = compiled
            .get_property(&PropertyKey::OptimalNumberOfInferRequests)
            .ok()
            .and_then(|value| value.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or(1);
        Ok(Self {
            compiled: Mutex::new(compiled),
            input,
            outputs,
            path: path.to_path_buf(),
            optimal_requests,
        })
    }

    /// A new infer request (each can have one inference in flight).
    pub fn request(&self) -> Result<InferRequest, ModelError> {
        let mut compiled = self.compiled.lock().map_err(|_| ModelError::Call {
            context: "creating an infer request".into(),
            message: "another thread panicked while creating one".into(),
        })?;
        call("creating an infer request", compiled.create_infer_request())
    }

    /// Values in one input (the product of the input shape).
    pub fn input_len(&self) -> usize {
        self.input
            .shape
            .iter()
            .map(|&d| d.max(0) as usize)
            .product()
    }

    /// Copies `input` into the request's own input tensor (no tensor is allocated).
    pub fn set_input(&self, request: &mut InferRequest, input: &[f32]) -> Result<(), ModelError> {
        if input.len() != self.input_len() {
            return Err(ModelError::InputSize {
                actual: input.len(),
                expected: self.input.shape.clone(),
            });
        }
        let mut tensor = call("getting the input tensor", request.get_input_tensor())?;
        call("filling the input", tensor.get_data_mut::<f32>())?.copy_from_slice(input);
        Ok(())
    }

    /// The request's input tensor, to be filled in place (`len` values).
    pub fn input_tensor(&self, request: &InferRequest) -> Result<Tensor, ModelError> {
        call("getting the input tensor", request.get_input_tensor())
    }

    /// Runs `input` synchronously and returns every output (for tools and tests; pipelines use the
    /// asynchronous `infer.openvino` operator).
    pub fn infer(&self, input: &[f32]) -> Result<Vec<OutputValues>, ModelError> {
        let mut request = self.request()?;
        self.set_input(&mut request, input)?;
        call("running inference", request.infer())?;
        self.outputs
            .iter()
            .enumerate()
            .map(|(index, port)| {
                let tensor = call(
                    "reading an output",
                    request.get_output_tensor_by_index(index),
                )?;
                let values = call("reading output values", tensor.get_data::<f32>())?.to_vec();
                Ok(OutputValues {
                    name: port.name.clone(),
                    shape: port.shape.clone(),
                    values,
                })
            })
            .collect()
    }
}
