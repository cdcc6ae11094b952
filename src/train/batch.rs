//! Batch graphs: a model run over a list of image files with the same operators as live
//! pipelines (`source.files` → `preprocess` → `infer.openvino`), collected by an in-process sink.
//! Training uses it to extract backbone features, calibration and evaluation to score images, so
//! all three decode and preprocess exactly as serving does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use inspectflow_operators::{
    OpError, OperatorDescriptor, OperatorInstance, OperatorKind, Packet, PortType, Registry, Sink,
};

use super::TrainError;
use crate::runtime::Pipeline;

/// A model's named outputs for one image.
pub type ImageOutputs = HashMap<String, Vec<f32>>;

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct CollectParams {}

/// Keeps each packet's model outputs by sequence number and reports how many arrived.
struct Collector {
    results: Arc<Mutex<Vec<Option<ImageOutputs>>>>,
    arrived: mpsc::Sender<()>,
}

impl Sink for Collector {
    fn consume(&mut self, packet: Packet) -> Result<(), OpError> {
        let outputs = packet
            .inference
            .as_ref()
            .ok_or_else(|| OpError::UnsupportedInput("packet without model outputs".into()))?;
        let by_name: ImageOutputs = outputs
            .iter()
            .map(|output| (output.name.clone(), output.values.to_vec()))
            .collect();
        let index = packet.frame.sequence as usize;
        let mut results = self.results.lock().unwrap_or_else(|p| p.into_inner());
        match results.get_mut(index) {
            Some(slot) => *slot = Some(by_name),
            None => {
                return Err(OpError::UnsupportedInput(format!(
                    "result for image {index} of {}",
                    results.len()
                )));
            }
        }
        let _ = self.arrived.send(());
        Ok(())
    }
}

/// Runs the IR at `model_xml` over `files` (RGB, bilinear resize to `input_size`, [0, 1]) and
/// returns every image's outputs in file order. `progress` gets the fraction done as images
/// complete. A file that cannot be read fails the run with its path.
pub fn run_model(
    model_xml: &Path,
    files: &[PathBuf],
    input_size: usize,
    progress: &mut dyn FnMut(f32),
) -> Result<Vec<ImageOutputs>, TrainError> {
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let results = Arc::new(Mutex::new(vec![None; files.len()]));
    let (arrived_tx, arrived_rx) = mpsc::channel();
    let mut registry = Registry::builtin();
    {
        let results = Arc::clone(&results);
        let arrived = Mutex::new(arrived_tx);
        registry.register(
            OperatorDescriptor::builder::<CollectParams>(
                "collect",
                OperatorKind::Sink,
                "Keeps model outputs in memory for the trainer.",
            )
            .input("in", PortType::Inference)
            .build_with(move |_params, _node| {
                let arrived = arrived.lock().unwrap_or_else(|p| p.into_inner()).clone();
                Ok(OperatorInstance::Sink(Box::new(Collector {
                    results: Arc::clone(&results),
                    arrived,
                })))
            }),
        );
    }
    let graph = serde_json::json!({
        "name": "batch",
        "nodes": [
            {"id": "images", "op": "source.files", "params": {"paths": files}},
            {"id": "preprocess", "op": "preprocess", "params": super::preprocess_params(input_size)},
            {"id": "model", "op": "infer.openvino", "params": {"model": model_xml, "requests": 2}},
            {"id": "collect", "op": "collect", "params": {}}
        ],
        "edges": [
            {"from": "images", "to": "preprocess"},
            {"from": "preprocess", "to": "model"},
            {"from": "model", "to": "collect"}
        ]
    });
    let graph = crate::graph::load_str(
        "batch graph",
        &graph.to_string(),
        true,
        &registry,
        &crate::graph::GraphLimits::DEFAULT,
    )
    .map_err(|errors| TrainError::Invalid(errors.to_string()))?;
    let pipeline = Pipeline::start(&graph).map_err(|e| TrainError::Invalid(e.to_string()))?;
    let mut done = 0usize;
    progress(0.0);
    while !pipeline.is_finished() {
        if arrived_rx.recv_timeout(Duration::from_millis(100)).is_ok() {
            done += 1;
            progress(done as f32 / files.len() as f32);
        }
    }
    let outcome = pipeline.wait();
    if let Some(failure) = outcome.failure {
        return Err(TrainError::Invalid(failure.message));
    }
    let mut results = results.lock().unwrap_or_else(|p| p.into_inner());
    results
        .drain(..)
        .zip(files)
        .map(|(outputs, file)| {
            outputs.ok_or_else(|| {
                TrainError::Invalid(format!("no model output for {}", file.display()))
            })
        })
        .collect()
}
