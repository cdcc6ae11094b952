//! `sink.null`: discards packets (after an optional delay), like GStreamer's fakesink. Useful for
//! measuring a pipeline without I/O and for simulating a slow consumer.

use std::time::Duration;

use serde::Deserialize;

use crate::contract::{OpError, OperatorInstance, OperatorKind, PortType, Sink};
use crate::packet::Packet;
use crate::registry::OperatorDescriptor;
use crate::transform::identity::non_negative_ms;

/// Parameters of `sink.null`.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NullParams {
    /// Milliseconds to wait per packet, simulating a slow consumer.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 60000.0))]
    pub sleep_ms: f64,
}

/// The registry entry.
pub fn descriptor() -> OperatorDescriptor {
    OperatorDescriptor::builder::<NullParams>(
        "sink.null",
        OperatorKind::Sink,
        "Discards packets; an optional delay simulates a slow consumer.",
    )
    .input("in", PortType::Any)
    .validate(|params| non_negative_ms("sleep_ms", params.sleep_ms))
    .build_with(|params, _context| {
        Ok(OperatorInstance::Sink(Box::new(NullSink {
            delay: (params.sleep_ms > 0.0)
                .then(|| Duration::from_secs_f64(params.sleep_ms / 1000.0)),
        })))
    })
}

struct NullSink {
    delay: Option<Duration>,
}

impl Sink for NullSink {
    fn consume(&mut self, _packet: Packet) -> Result<(), OpError> {
        if let Some(delay) = self.delay {
            std::thread::sleep(delay);
        }
        Ok(())
    }
}
