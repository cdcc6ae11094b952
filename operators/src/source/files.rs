//! `source.files`: reads a list of image files (PNG or JPEG) in order, one frame each, then ends.
//! Batch graphs use it (training and evaluation read their datasets through it, so they decode
//! exactly as serving does); the frame's sequence is the file's position in the list, so results
//! can be matched back to files. Images may differ in size: preprocessing resizes them. A file
//! that cannot be read or decoded fails the node with its path.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use crate::contract::{
    OpError, OperatorInstance, OperatorKind, OutputType, PortType, Source, SourceContext,
    SourcePoll,
};
use crate::decode;
use crate::packet::Packet;
use crate::pool::BufferPool;
use crate::registry::{OperatorDescriptor, ParamError};

/// Parameters of `source.files`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FilesParams {
    /// Image files, read in this order.
    #[schemars(with = "Vec<crate::params::FileParam>", length(min = 1))]
    pub paths: Vec<PathBuf>,
}

/// The registry entry.
pub fn descriptor() -> OperatorDescriptor {
    OperatorDescriptor::builder::<FilesParams>(
        "source.files",
        OperatorKind::Source,
        "Reads a list of PNG or JPEG files in order, one frame each (sequence = position in the list), then ends the stream; the batch graphs of training and evaluation use it.",
    )
    .output("out", OutputType::Fixed(PortType::Image))
    .validate(|params| {
        if params.paths.is_empty() {
            return Err(ParamError::new("paths", "must list at least one file"));
        }
        Ok(())
    })
    .build_with(|params, _context| {
        Ok(OperatorInstance::Source(Box::new(FilesSource {
            paths: params.paths,
            next: 0,
            pool: BufferPool::new(8),
        })))
    })
}

/// Reads the files one by one.
struct FilesSource {
    paths: Vec<PathBuf>,
    next: usize,
    pool: BufferPool<u8>,
}

impl Source for FilesSource {
    fn next(&mut self, ctx: &SourceContext) -> Result<SourcePoll, OpError> {
        let Some(path) = self.paths.get(self.next) else {
            return Ok(SourcePoll::EndOfStream);
        };
        let mut frame = decode::read_rgb(path, &self.pool, self.next as u64)?;
        frame.stream_id = Arc::clone(&ctx.node_id);
        self.next += 1;
        Ok(SourcePoll::Packet(Packet::from_frame(frame)))
    }
}
