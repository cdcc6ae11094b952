//! Sinks: where results leave the engine.

pub mod folder;
pub mod null;
