//! Transforms: one input, one or more outputs per packet.

pub mod anomaly;
pub mod encode;
pub mod heatmap;
pub mod identity;
pub mod preprocess;
