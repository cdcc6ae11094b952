//! `identity`: forwards packets unchanged, like GStreamer's element of the same name. Its optional
//! delay and injected failure let users (and tests) see how a pipeline behaves with a slow or
//! failing stage; it accepts batches, so batching can be tried on any graph.

use std::time::Duration;

use serde::Deserialize;

use crate::contract::{
    Emitter, OpError, OperatorInstance, OperatorKind, OutputType, PortType, Transform,
};
use crate::packet::Packet;
use crate::registry::{OperatorDescriptor, ParamError};

/// Parameters of `identity`.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentityParams {
    /// Milliseconds to wait per packet (per batch when batching), simulating a slow stage.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 60000.0))]
    pub sleep_ms: f64,
    /// Fail with an error on this packet number (1 = the first packet; counted by each replica
    /// of the node on its own); absent: never fail.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub error_after: Option<u64>,
}

/// The registry entry.
pub fn descriptor() -> OperatorDescriptor {
    OperatorDescriptor::builder::<IdentityParams>(
        "identity",
        OperatorKind::Transform,
        "Pass-through: forwards packets unchanged; an optional per-packet delay and an injected failure (`error_after`) to try out backpressure, batching and restarts.",
    )
    .input("in", PortType::Any)
    .output("out", OutputType::SameAsInput)
    .batching()
    .replicable()
    .validate(IdentityParams::validate)
    .build_with(|params, _context| Ok(OperatorInstance::Transform(Box::new(Identity::new(params)?))))
}

impl IdentityParams {
    /// The rules the schema cannot express.
    pub fn validate(&self) -> Result<(), ParamError> {
        non_negative_ms("sleep_ms", self.sleep_ms)
    }
}

/// A delay in milliseconds must be a finite number, zero or more.
pub(crate) fn non_negative_ms(field: &str, value: f64) -> Result<(), ParamError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(ParamError::new(
            field,
            format!("must be a non-negative number, got {value}"),
        ))
    }
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
        params.validate()?;
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
