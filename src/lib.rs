//! inspectflow: a dataflow engine for visual anomaly inspection.
//!
//! - [`backbone`]: importing pretrained backbones (PyTorch checkpoints) into OpenVINO IR;
//! - [`graph`]: graph files (YAML/JSON), validation with precise errors, schemas, DOT;
//! - [`onnx`]: exporting a model package's IR as ONNX;
//! - [`predictor`]: scoring single images with a model package (CLI `predict`, API `:predict`);
//! - [`roots`]: the folders file and folder parameters must stay in (links resolved);
//! - [`runtime`]: queues with backpressure policies, one thread per node, metrics;
//! - [`server`]: the REST API (`inspectflow serve`) over a redb store;
//! - [`train`]: fitting anomaly models and exporting them as model packages.
//!
//! Operators and the packet types live in the `inspectflow-operators` crate, re-exported here as
//! [`operators`].

pub mod anomalib;
pub mod backbone;
pub mod graph;
pub mod onnx;
pub mod predictor;
pub mod roots;
pub mod runtime;
pub mod server;
pub mod synth;
pub mod train;

pub use inspectflow_operators as operators;
