//! The inspectflow operator contract and the built-in operators.
//!
//! - [`packet`]: what flows on edges (frames, tensors) in pooled, reference-counted buffers;
//! - [`files`]: writing files atomically (temporary name, then rename);
//! - [`package`]: model packages (manifest + one OpenVINO IR);
//! - [`pool`]: the buffer pools behind them;
//! - [`params`]: file and folder parameters, declared so that one check confines them all;
//! - [`contract`]: operator kinds, typed ports and the `Source` / `Transform` / `Sink` traits;
//! - [`registry`]: operator descriptors (ports, parameter schema and rules, health check,
//!   factory) and the registry;
//! - [`preview`]: `sink.preview` and the hub where the server watches live previews;
//! - [`retry`]: the retry and backoff settings of every operator that reconnects or retries;
//! - [`secrets`]: passwords from environment variables, and which variables a graph may read;
//! - [`source`], [`transform`], [`sink`]: one module per operator family;
//! - [`video`]: GStreamer-backed video sources and sinks (feature `gstreamer`, on by default);
//! - [`url`]: credentials out of URLs, and their redacted form for logs and responses;
//! - [`yuv`]: I420 frames from video decoders, and their conversion to RGB.
//!
//! This crate knows nothing about threads, queues or graph files: the engine (`inspectflow`) owns
//! scheduling, so each operator can be tested alone and reused in live and batch graphs.

pub mod contract;
pub mod decode;
pub mod files;
pub mod infer;
pub mod map_upsample;
pub mod package;
pub mod packet;
pub mod params;
pub mod pool;
pub mod preview;
pub mod registry;
pub mod retry;
pub mod secrets;
pub mod sink;
pub mod source;
pub mod tensor;
pub mod transform;
pub mod url;
#[cfg(feature = "gstreamer")]
pub mod video;
pub mod yuv;

pub use contract::{
    Emitter, EndpointHealth, Held, InputPort, OpError, OperatorInstance, OperatorKind, OutputPort,
    OutputType, PortType, Sink, SinkContext, Source, SourceContext, SourcePoll, StopSignal,
    Transform,
};
pub use packet::{
    CaptureTime, Frame, ImageLayout, Packet, PixelFormat, Tensor, TensorLayout, YuvEncoding,
};
pub use pool::{BufferPool, PoolStats, PooledBuffer};
pub use registry::{BuildContext, OperatorDescriptor, ParamError, Registry, simplify_enum_schemas};
pub use retry::RetrySettings;
