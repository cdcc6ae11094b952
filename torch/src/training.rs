//! The training loop every gradient-trained family shares: seeded mini-batches with Adam, a
//! validation loss per epoch on normal images never trained on, early stopping after
//! `patience` epochs without improvement, and the best epoch's weights restored at the end.

use std::collections::HashMap;

use tch::nn::{self, OptimizerConfig};
use tch::{Kind, Tensor};

use inspectflow::train::{EpochReport, TrainingPhase};

use super::TrainError;

/// How a network is trained.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Passes over the training images at most.
    pub epochs: usize,
    /// Images per optimisation step.
    pub batch_size: usize,
    /// Adam's learning rate.
    pub learning_rate: f64,
    /// Epochs without a lower validation loss before stopping (0: never early).
    pub patience: usize,
    /// Seeds the initial weights and the order of the images.
    pub seed: u64,
}

/// What a training loop did.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Epochs trained.
    pub epochs_run: usize,
    /// The epoch whose weights the store holds now.
    pub best_epoch: usize,
}

/// Trains the variables of `store` to lower `loss` on `images` (`[n, 3, h, w]`); `loss(batch,
/// train)` is the batch's loss, with BatchNorm in training mode when `train`. With
/// `validation` images the mean validation loss is measured after every epoch, training stops
/// after `patience` epochs without a new lowest one, and the store ends with the weights of the
/// lowest. `phase` names the loop in the reports `progress` hears.
pub fn train(
    store: &nn::VarStore,
    images: &Tensor,
    validation: Option<&Tensor>,
    settings: &Settings,
    phase: TrainingPhase,
    loss: &dyn Fn(&Tensor, bool) -> Tensor,
    progress: &mut dyn FnMut(&EpochReport),
) -> Result<Outcome, TrainError> {
    let count = images.size()[0];
    if count == 0 {
        return Err(format!("{phase}: no training images"));
    }
    let mut optimiser = nn::Adam::default()
        .build(store, settings.learning_rate)
        .map_err(|e| format!("{phase}: optimiser: {e}"))?;
    let batch = settings.batch_size.max(1) as i64;
    let mut best: Option<(f64, usize, HashMap<String, Tensor>)> = None;
    let mut epochs_run = 0;
    for epoch in 1..=settings.epochs {
        let order = Tensor::randperm(count, (Kind::Int64, images.device()));
        let (mut total, mut steps) = (0.0, 0);
        for indices in batches(&order, batch) {
            let value = loss(&images.index_select(0, &indices), true);
            optimiser.backward_step(&value);
            total += value.double_value(&[]);
            steps += 1;
        }
        let training_loss = total / f64::from(steps.max(1));
        if !training_loss.is_finite() {
            return Err(format!(
                "{phase}: the loss became {training_loss} in epoch {epoch} (try a lower \
                 learning_rate)"
            ));
        }
        epochs_run = epoch;
        let validation_loss = validation.map(|images| mean_loss(images, batch, loss));
        progress(&EpochReport {
            phase,
            epoch,
            epochs: settings.epochs,
            loss: training_loss,
            validation_loss,
        });
        let Some(current) = validation_loss else {
            continue;
        };
        let improved = best.as_ref().is_none_or(|(lowest, _, _)| current < *lowest);
        if improved {
            best = Some((current, epoch, copy_variables(store)));
        } else if let Some((_, best_epoch, _)) = &best
            && settings.patience > 0
            && epoch - best_epoch >= settings.patience
        {
            break;
        }
    }
    let best_epoch = match best {
        Some((_, epoch, weights)) => {
            restore_variables(store, &weights);
            epoch
        }
        None => epochs_run,
    };
    Ok(Outcome {
        epochs_run,
        best_epoch,
    })
}

/// The mean of `loss` over `images` in evaluation mode, in batches of `batch`.
fn mean_loss(images: &Tensor, batch: i64, loss: &dyn Fn(&Tensor, bool) -> Tensor) -> f64 {
    tch::no_grad(|| {
        let total: f64 = batches(images, batch)
            .map(|part| loss(&part, false).double_value(&[]) * part.size()[0] as f64)
            .sum();
        total / images.size()[0].max(1) as f64
    })
}

/// `tensor` along its first axis in consecutive parts of at most `size` (views, no copies).
pub fn batches(tensor: &Tensor, size: i64) -> impl Iterator<Item = Tensor> + '_ {
    let count = tensor.size()[0];
    let size = size.max(1);
    (0..count)
        .step_by(size as usize)
        .map(move |start| tensor.narrow(0, start, size.min(count - start)))
}

/// Copies of every variable of `store` (parameters and BatchNorm statistics).
fn copy_variables(store: &nn::VarStore) -> HashMap<String, Tensor> {
    tch::no_grad(|| {
        store
            .variables()
            .into_iter()
            .map(|(name, tensor)| (name, tensor.copy()))
            .collect()
    })
}

/// Puts copies made by [`copy_variables`] back.
fn restore_variables(store: &nn::VarStore, weights: &HashMap<String, Tensor>) {
    tch::no_grad(|| {
        for (name, mut variable) in store.variables() {
            if let Some(saved) = weights.get(&name) {
                variable.copy_(saved);
            }
        }
    });
}

/// Images as one `[n, 3, size, size]` tensor, RGB in [0, 1] (resized bilinearly, as
/// `preprocess` does for serving).
pub fn load_images(files: &[std::path::PathBuf], size: usize) -> Result<Tensor, TrainError> {
    let side = size as u32;
    let mut planes = Vec::with_capacity(files.len() * 3 * size * size);
    for file in files {
        let image = image::open(file)
            .map_err(|e| format!("{}: {e}", file.display()))?
            .to_rgb8();
        let image =
            image::imageops::resize(&image, side, side, image::imageops::FilterType::Triangle);
        for channel in 0..3 {
            planes.extend(image.pixels().map(|p| f32::from(p[channel]) / 255.0));
        }
    }
    Ok(Tensor::from_slice(&planes).view([files.len() as i64, 3, size as i64, size as i64]))
}
