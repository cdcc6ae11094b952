//! `identity`: forwards packets unchanged, like GStreamer's element of the same name. Its optional
//! delay and injected failure let users (and tests) see how a pipeline behaves with a slow or
//! failing stage; it accepts batches, so batching can be tried on any graph.

use std::time::Duration;

use serde::Deserialize;

use crate::contract::{
    Emitter, OpError, OperatorInstance, OperatorKind, OutputType, PortType, Transform,
};
use crate::packet::Packet;
use crate::registry::OperatorDescriptor;

/// Parameters of `identity`.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentityParams {
    /// Milliseconds to wait per packet (per batch when batching), simulating a slow stage.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 60000.0))]
    pub sleep_ms: f64,
    /// Fail with an error on this packet number (1 = the first packet); absent: never fail.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub error_after: Option<u64>,
}

/// The registry entry.
pub fn descriptor() -> OperatorDescriptor {
    OperatorDescriptor::builder::<IdentityParams>(
        "identity",
        OperatorKind::Transform,
        "Pass-through: forwards packets unchanged; optional per-packet delay and injected failure for trying out pipelines.",
    )
    .input("in", PortType::Any)
    .output("out", OutputType::SameAsInput)
    .batching()
    .build_with(|params, _node_id| Ok(OperatorInstance::Transform(Box::new(Identity::new(params)?))))
}

/// The running operator.
pub struct Identity {
    delay: Option<Duration>,
    error_after: Option<u64>,
    seen: u64,
}

impl Identity {
    /// Checks the parameters.
    pub fn new(params: IdentityParams) -> Result<Self, OpError> {
        if !(params.sleep_ms.is_finite() && params.sleep_ms >= 0.0) {
            return Err(OpError::param("sleep_ms", "must be a non-negative number"));
        }
        Ok(Self {
            delay: (params.sleep_ms > 0.0)
                .then(|| Duration::from_secs_f64(params.sleep_ms / 1000.0)),
            error_after: params.error_after,
            seen: 0,
        })
    }

    fn count(&mut self, packets: u64) -> Result<(), OpError> {
        let before = self.seen;
        self.seen += packets;
        match self.error_after {
            Some(limit) if before < limit && self.seen >= limit => Err(OpError::Failed(format!(
                "injected failure at packet {limit} (error_after)"
            ))),
            _ => Ok(()),
        }
    }
}

impl Transform for Identity {
    fn process(&mut self, packet: Packet, out: &mut Emitter) -> Result<(), OpError> {
        self.count(1)?;
        if let Some(delay) = self.delay {
            std::thread::sleep(delay);
        }
        out.emit(0, packet);
        Ok(())
    }

    fn process_batch(&mut self, batch: &mut Vec<Packet>, out: &mut Emitter) -> Result<(), OpError> {
        self.count(batch.len() as u64)?;
        if let Some(delay) = self.delay {
            std::thread::sleep(delay);
        }
        for packet in batch.drain(..) {
            out.emit(0, packet);
        }
        Ok(())
    }
}
