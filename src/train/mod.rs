//! Training: fitting anomaly models on normal images and exporting them as model packages (one
//! OpenVINO IR holding backbone and head, plus a manifest).

pub mod padim;
