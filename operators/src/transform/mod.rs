//! Transforms: one input, one or more outputs per packet.

pub mod identity;
pub mod preprocess;
