//! Inference with OpenVINO: finding the runtime ([`runtime`]).

pub mod runtime;
