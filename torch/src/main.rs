//! `inspectflow-torch --request FILE`: trains a gradient-trained family's networks with
//! libtorch and writes them as one OpenVINO IR. `inspectflow train` runs it and reads its
//! events; the request and the events are declared in `inspectflow::train::gradient`. CUDA is
//! used when libtorch finds a GPU, the CPU otherwise.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use inspectflow::train::gradient::{HelperEvent, StudentRequest};
use inspectflow::train::{Architecture, EpochReport};
use inspectflow_torch::{efficient_ad, mobilenet, reverse_distillation, stfpm, training};

/// Trains a gradient-trained model family (run by `inspectflow train`).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The request (JSON), as `inspectflow train` writes it.
    #[arg(long)]
    request: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Writes one event line on standard output.
fn emit(event: &HelperEvent) {
    if let Ok(line) = serde_json::to_string(event) {
        println!("{line}");
    }
}

fn run(args: &Args) -> Result<(), String> {
    let text = std::fs::read(&args.request)
        .map_err(|e| format!("reading {}: {e}", args.request.display()))?;
    let request: StudentRequest =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", args.request.display()))?;
    if !request.family.is_gradient_trained() {
        return Err(format!(
            "{}: family {} is not gradient-trained",
            args.request.display(),
            request.family.name()
        ));
    }
    let device = tch::Device::cuda_if_available();
    let (_teacher_store, teacher) = mobilenet::teacher(device)?;
    let images = training::load_images(&request.images, request.input_size)?.to_device(device);
    let validation = if request.validation.is_empty() {
        None
    } else {
        Some(training::load_images(&request.validation, request.input_size)?.to_device(device))
    };
    let settings = training::Settings {
        epochs: request.epochs,
        batch_size: request.batch_size,
        learning_rate: request.learning_rate,
        patience: request.patience,
        seed: request.seed,
    };
    let started = Instant::now();
    let mut epochs_trained = 0;
    let mut progress = |report: &EpochReport| {
        epochs_trained += 1;
        emit(&HelperEvent::Epoch(report.clone()));
    };
    let validation = validation.as_ref();
    let size = request.input_size;
    let outcome = match request.family {
        Architecture::ReverseDistillation => {
            let (decoder, outcome) =
                reverse_distillation::fit(&teacher, &images, validation, &settings, &mut progress)?;
            reverse_distillation::export(&decoder, size, &request.out)?;
            outcome
        }
        Architecture::EfficientAd => {
            let (model, outcome) =
                efficient_ad::fit(&teacher, &images, validation, &settings, &mut progress)?;
            model.export(size, &request.out)?;
            outcome
        }
        // STFPM (the other families were refused above).
        _ => {
            let (student, outcome) =
                stfpm::fit(&teacher, &images, validation, &settings, &mut progress)?;
            stfpm::export(&student, size, &request.out)?;
            outcome
        }
    };
    let seconds_per_epoch = started.elapsed().as_secs_f64() / f64::from(epochs_trained.max(1));
    emit(&HelperEvent::Exported {
        device: format!("{device:?}"),
        seconds_per_epoch,
        epochs_run: outcome.epochs_run,
        best_epoch: outcome.best_epoch,
    });
    Ok(())
}
