//! The libtorch side of inspectflow's training (see the `inspectflow-torch` program, which
//! `inspectflow train` runs for the gradient-trained families): MobileNetV2's feature layers in
//! tch ([`mobilenet`]) and STFPM ([`stfpm`]), trained here and exported as OpenVINO IR through
//! inspectflow's IR writer. Serving, and every other inspectflow program, never load libtorch.

pub mod mobilenet;
pub mod stfpm;
