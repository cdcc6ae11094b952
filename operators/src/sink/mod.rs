//! Sinks: where results leave the engine.

pub mod folder;
pub mod message;
pub mod mqtt;
pub mod nats;
pub mod null;
pub mod webhook;
