//! Inference with OpenVINO: finding the runtime ([`runtime`]), loading models ([`model`]), sharing
//! one compiled model among every node that names it ([`shared`]) and the `infer.openvino`
//! operator ([`operator`]).

pub mod model;
pub mod operator;
pub mod runtime;
pub mod shared;
