//! Inference with OpenVINO: finding the runtime ([`runtime`]), loading models ([`model`]) and the
//! `infer.openvino` operator ([`operator`]).

pub mod model;
pub mod operator;
pub mod runtime;
