//! The libtorch side of inspectflow's training (see the `inspectflow-torch` program, which
//! `inspectflow train` runs for the gradient-trained families): MobileNetV2's feature layers in
//! tch ([`mobilenet`]), the layers and the training loop the families share ([`layers`],
//! [`training`]), and the families, STFPM ([`stfpm`]), Reverse Distillation
//! ([`reverse_distillation`]) and EfficientAD ([`efficient_ad`]), each trained here and exported
//! as one OpenVINO IR through inspectflow's IR writer. Serving, and every other inspectflow
//! program, never load libtorch.

pub mod efficient_ad;
pub mod layers;
pub mod mobilenet;
pub mod reverse_distillation;
pub mod stfpm;
pub mod training;

/// Training or export failed: what and where, in one line.
pub type TrainError = String;
