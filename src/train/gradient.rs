//! The gradient-trained families (STFPM, Reverse Distillation, EfficientAD) are trained by a
//! helper program, `inspectflow-torch` (the `torch/` crate, the only one that links libtorch),
//! so that no other inspectflow program loads libtorch: about 1 GB of libraries, a third of a second at every start of a program
//! linked to it. This module is both sides' protocol: the request the helper reads, the events
//! it writes (a JSON object per line on standard output), finding the helper beside the running
//! program, and running it for `inspectflow train`.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use super::{Architecture, EpochReport, Progress, TrainConfig, TrainError, TrainingPhase};

/// The helper program's name; it is looked for beside the running program.
pub const HELPER: &str = "inspectflow-torch";

/// Overrides where the helper is (tests, installations that keep it elsewhere).
pub const HELPER_ENV: &str = "INSPECTFLOW_TORCH_HELPER";

/// What the helper is asked to do: train `family` on `images` and write its IR to `out`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentRequest {
    /// The family (a gradient-trained one).
    pub family: Architecture,
    /// The training images.
    pub images: Vec<PathBuf>,
    /// Normal images never trained on: their loss decides when training stops, and EfficientAD
    /// normalises its maps on them (on the training images when there are none).
    pub validation: Vec<PathBuf>,
    /// Square input size in pixels.
    pub input_size: usize,
    /// Passes over the images.
    pub epochs: usize,
    /// Images per optimisation step.
    pub batch_size: usize,
    /// Adam's learning rate.
    pub learning_rate: f64,
    /// Epochs without a lower validation loss before training stops (0: never early).
    pub patience: usize,
    /// Seed of the initial weights and the image order.
    pub seed: u64,
    /// The IR to write (`model.xml`, with `model.bin` beside it).
    pub out: PathBuf,
}

/// What the helper reports, one JSON object per line on standard output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum HelperEvent {
    /// An epoch ended.
    Epoch(EpochReport),
    /// The IR is written.
    Exported {
        /// Where it trained (`Cpu`, `Cuda(0)`).
        device: String,
        /// Seconds per epoch.
        seconds_per_epoch: f64,
        /// Epochs trained (fewer than asked when training stopped early).
        epochs_run: usize,
        /// The epoch whose weights were kept (the lowest validation loss; the last without
        /// validation images).
        best_epoch: usize,
    },
}

/// The helper program, when installed: `INSPECTFLOW_TORCH_HELPER`, or `inspectflow-torch`
/// beside the running program.
pub fn helper() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(HELPER_ENV) {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    let exe = std::env::current_exe().ok()?;
    let beside = exe.parent()?.join(HELPER);
    if beside.is_file() {
        return Some(beside);
    }
    // Test programs live one folder below the programs (target/debug/deps).
    let above = exe.parent()?.parent()?.join(HELPER);
    above.is_file().then_some(above)
}

/// Trains a gradient-trained family through the helper and returns the IR it wrote in
/// `scratch` and the training's metrics (loss per epoch, time per epoch, device).
pub fn train_student(
    config: &TrainConfig,
    input_size: usize,
    training: &[PathBuf],
    validation: &[PathBuf],
    scratch: &Path,
    progress: Progress,
) -> Result<(PathBuf, serde_json::Map<String, serde_json::Value>), TrainError> {
    let helper = helper().ok_or_else(|| {
        TrainError::Invalid(format!(
            "model_name: {} is trained by the {HELPER} program, which is not installed beside \
             inspectflow (scripts/setup.sh installs libtorch; `cargo build --workspace` builds it)",
            config.architecture.name()
        ))
    })?;
    let out = scratch.join(inspectflow_operators::package::MODEL_FILE);
    let request = StudentRequest {
        family: config.architecture,
        images: training.to_vec(),
        validation: validation.to_vec(),
        patience: config.patience,
        input_size,
        epochs: config.epochs,
        batch_size: config.batch_size,
        learning_rate: config.learning_rate,
        seed: config.seed,
        out: out.clone(),
    };
    let request_file = scratch.join("student-request.json");
    let text = serde_json::to_vec(&request)
        .map_err(|e| TrainError::Invalid(format!("writing the helper's request: {e}")))?;
    std::fs::write(&request_file, text).map_err(|source| TrainError::Io {
        context: format!("writing {}", request_file.display()),
        source,
    })?;
    let mut command = Command::new(&helper);
    command
        .arg("--request")
        .arg(&request_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // The helper dies with this process (a cancelled job kills `inspectflow train`).
    // SAFETY: prctl only sets a flag of the child being started.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|source| TrainError::Io {
        context: format!("starting {}", helper.display()),
        source,
    })?;
    let stderr = child.stderr.take();
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut stderr) = stderr {
            let _ = stderr.read_to_string(&mut text);
        }
        text
    });
    progress.stage("fitting", 0.0);
    let mut losses = Vec::with_capacity(config.epochs);
    let mut validation_losses = Vec::with_capacity(config.epochs);
    let mut exported = None;
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            match serde_json::from_str::<HelperEvent>(&line) {
                Ok(HelperEvent::Epoch(report)) => {
                    // EfficientAD distils its teacher first: the first half of the stage.
                    let (offset, share) = match (config.architecture, report.phase) {
                        (Architecture::EfficientAd, TrainingPhase::Distillation) => (0.0, 0.5),
                        (Architecture::EfficientAd, TrainingPhase::Training) => (0.5, 0.5),
                        _ => (0.0, 1.0),
                    };
                    if report.phase == TrainingPhase::Training {
                        losses.push(report.loss);
                        validation_losses.extend(report.validation_loss);
                    }
                    progress.epoch(&report);
                    let done = report.epoch as f32 / report.epochs.max(1) as f32;
                    progress.stage("fitting", offset + share * done);
                }
                Ok(event @ HelperEvent::Exported { .. }) => exported = Some(event),
                Err(_) => tracing::info!("{HELPER}: {line}"),
            }
        }
    }
    let status = child.wait().map_err(|source| TrainError::Io {
        context: format!("waiting for {}", helper.display()),
        source,
    })?;
    let errors = errors.join().unwrap_or_default();
    let Some(HelperEvent::Exported {
        device,
        seconds_per_epoch,
        epochs_run,
        best_epoch,
    }) = exported.filter(|_| status.success())
    else {
        let last = errors.lines().last().unwrap_or("no message");
        return Err(TrainError::Invalid(format!(
            "{HELPER} failed ({status}): {last}"
        )));
    };
    let mut metrics = serde_json::Map::new();
    metrics.insert(
        "training".into(),
        serde_json::json!({
            "epochs": config.epochs,
            "epochs_run": epochs_run,
            "best_epoch": best_epoch,
            "loss_per_epoch": losses,
            "validation_loss_per_epoch": validation_losses,
            "validation_images": validation.len(),
            "seconds_per_epoch": seconds_per_epoch,
            "device": device,
        }),
    );
    Ok((out, metrics))
}
