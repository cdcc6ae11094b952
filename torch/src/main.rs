//! `inspectflow-torch --request FILE`: trains a gradient-trained family's networks with
//! libtorch and writes them as one OpenVINO IR. `inspectflow train` runs it and reads its
//! events; the request and the events are declared in `inspectflow::train::gradient`. CUDA is
//! used when libtorch finds a GPU, the CPU otherwise.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use inspectflow::train::Architecture;
use inspectflow::train::gradient::{HelperEvent, StudentRequest};
use inspectflow_torch::stfpm;

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
fn report(event: &HelperEvent) {
    if let Ok(line) = serde_json::to_string(event) {
        println!("{line}");
    }
}

fn run(args: &Args) -> Result<(), String> {
    let text = std::fs::read(&args.request)
        .map_err(|e| format!("reading {}: {e}", args.request.display()))?;
    let request: StudentRequest =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", args.request.display()))?;
    if request.family != Architecture::Stfpm {
        return Err(format!(
            "{}: family {} is not gradient-trained",
            args.request.display(),
            request.family.name()
        ));
    }
    let device = tch::Device::cuda_if_available();
    let teacher = stfpm::teacher(device)?;
    let images = stfpm::load_images(&request.images, request.input_size)?.to_device(device);
    let settings = stfpm::StfpmSettings {
        epochs: request.epochs,
        batch_size: request.batch_size,
        learning_rate: request.learning_rate,
        seed: request.seed,
    };
    let started = Instant::now();
    let student = stfpm::fit(&teacher, &images, &settings, &mut |epoch, loss| {
        report(&HelperEvent::Epoch {
            epoch,
            epochs: settings.epochs,
            loss,
        });
    })?;
    let seconds_per_epoch = started.elapsed().as_secs_f64() / settings.epochs.max(1) as f64;
    stfpm::export(&student, request.input_size, &request.out)?;
    report(&HelperEvent::Exported {
        device: format!("{device:?}"),
        seconds_per_epoch,
    });
    Ok(())
}
