//! Batch graphs: a model run over a list of image files with the same operators as live
//! pipelines (`source.files` → `preprocess` → `infer.openvino`), collected by an in-process sink.
//! Training uses it to extract backbone features, calibration and evaluation to score images, so
//! all three decode and preprocess exactly as serving does.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc;
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

/// Hands each packet's model outputs, with the image's index, to the trainer's thread.
struct Collector {
    arrived: mpsc::Sender<(usize, ImageOutputs)>,
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
        // The trainer stops listening only when it has failed; the pipeline is ending then.
        let _ = self.arrived.send((index, by_name));
        Ok(())
    }
}

/// Runs the IR at `model_xml` over `files` (RGB, bilinear resize to `input_size`, [0, 1]) and
/// returns every image's outputs in file order. `progress` gets the fraction done as images
/// complete. A file that cannot be read fails the run with its path.
pub fn run_model(
    model_xml: &Path,
    device: &str,
    files: &[PathBuf],
    input_size: usize,
    progress: &mut dyn FnMut(f32),
) -> Result<Vec<ImageOutputs>, TrainError> {
    let mut results = Vec::with_capacity(files.len());
    run_model_each(
        model_xml,
        device,
        files,
        input_size,
        progress,
        &mut |outputs| {
            results.push(outputs);
            Ok(())
        },
    )?;
    Ok(results)
}

/// Like [`run_model`], but hands each image's outputs to `consume`, in file order, as soon as
/// they and those of every earlier image are in, instead of keeping them all: training keeps
/// only what it needs of each image's features.
pub fn run_model_each(
    model_xml: &Path,
    device: &str,
    files: &[PathBuf],
    input_size: usize,
    progress: &mut dyn FnMut(f32),
    consume: &mut dyn FnMut(ImageOutputs) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    if files.is_empty() {
        return Ok(());
    }
    let (arrived_tx, arrived_rx) = mpsc::channel();
    let mut registry = Registry::builtin();
    {
        let arrived = Mutex::new(arrived_tx);
        registry.register(
            OperatorDescriptor::builder::<CollectParams>(
                "collect",
                OperatorKind::Sink,
                "Hands model outputs to the trainer.",
            )
            .input("in", PortType::Inference)
            .build_with(move |_params, _node| {
                let arrived = arrived.lock().unwrap_or_else(|p| p.into_inner()).clone();
                Ok(OperatorInstance::Sink(Box::new(Collector { arrived })))
            }),
        );
    }
    let graph = serde_json::json!({
        "name": "batch",
        "nodes": [
            {"id": "images", "op": "source.files", "params": {"paths": files}},
            {"id": "preprocess", "op": "preprocess", "params": super::preprocess_params(input_size)},
            {"id": "model", "op": "infer.openvino", "params": {"model": model_xml, "device": device, "requests": 2}},
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
    // The registry holds a sender: drop it so that the channel closes with the pipeline.
    drop(registry);
    let pipeline = Pipeline::start(&graph).map_err(|e| TrainError::Invalid(e.to_string()))?;
    drop(graph);
    let mut waiting: BTreeMap<usize, ImageOutputs> = BTreeMap::new();
    let mut next = 0usize;
    let mut consumed = Ok(());
    progress(0.0);
    loop {
        let finished = pipeline.is_finished();
        match arrived_rx.recv_timeout(Duration::from_millis(100)) {
            Ok((index, outputs)) => {
                waiting.insert(index, outputs);
                while let Some(outputs) = waiting.remove(&next) {
                    if consumed.is_ok() {
                        consumed = consume(outputs);
                    }
                    next += 1;
                    progress(next as f32 / files.len() as f32);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) if !finished => {}
            Err(_) => break,
        }
    }
    let outcome = pipeline.wait();
    if let Some(failure) = outcome.failure {
        return Err(TrainError::Invalid(failure.message));
    }
    consumed?;
    match files.get(next) {
        Some(file) => Err(TrainError::Invalid(format!(
            "no model output for {}",
            file.display()
        ))),
        None => Ok(()),
    }
}
