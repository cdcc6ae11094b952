//! Training jobs: `POST /api/projects/{id}/train` queues one, a worker runs it, and
//! `/api/jobs` shows it (status, progress percent and stage, log lines, also as server-sent
//! events) and cancels it.
//!
//! A job runs `inspectflow train` as a child process on the project's media (hard-linked into a
//! per-job dataset folder), so a cancel is a kill, a crash in training cannot take the server
//! down, and the child dies with the server (`PR_SET_PDEATHSIG`). The package is written to
//! `models/.<model id>.partial` and renamed into place; the model record and the job's
//! `completed` status commit in one transaction, so a failed or interrupted job registers no
//! model. Jobs found `running` when the server starts are marked `failed`; `pending` ones are
//! queued again. At most `max_jobs` run at once (default 1).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, broadcast, watch};
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::api::{ApiError, AppState, Project, ProjectPage, action, blocking, now, paginate};
use super::media::Media;
use super::models::Model;
use super::store::{JOBS, MEDIA, MODELS, PROJECTS};
use crate::train::Architecture;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Queued, waiting for a free worker.
    Pending,
    /// Training.
    Running,
    /// Done; the model is registered.
    Completed,
    /// Ended with an error (see `message`); no model.
    Failed,
    /// Canceled by a user; no model.
    Canceled,
}

impl JobStatus {
    /// Every status, in the order of a job's life.
    pub const ALL: [JobStatus; 5] = [
        Self::Pending,
        Self::Running,
        Self::Completed,
        Self::Failed,
        Self::Canceled,
    ];

    /// The status as the API writes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
        }
    }

    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Canceled)
    }
}

/// What to train: the body of `POST /api/projects/{id}/train`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainPayload {
    /// Model family: `padim` or `patchcore` (see `/api/trainable-models`).
    pub model_name: String,
    /// Display name of the model (default: family and time).
    #[serde(default)]
    pub name: Option<String>,
    /// `mobilenet_v2` or `efficientnet_lite0`.
    #[serde(default = "default_backbone")]
    pub backbone: String,
    /// Square input size, a multiple of 32 from 64 to 1024; absent: PaDiM 256, PatchCore the
    /// training images' shorter side from 256 to 512.
    #[serde(default)]
    pub input_size: Option<usize>,
    /// Tile size in pixels (a multiple of 32, smaller than the input size); absent: no tiling.
    #[serde(default)]
    pub tile: Option<usize>,
    /// Seed of every random choice.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// PaDiM: channels kept.
    #[serde(default = "default_padim_channels")]
    pub padim_channels: usize,
    /// PatchCore: memory bank rows; absent: 10% of the training patches, at most 1024.
    #[serde(default)]
    pub memory_bank: Option<usize>,
}

fn default_backbone() -> String {
    "mobilenet_v2".into()
}
fn default_seed() -> u64 {
    42
}
fn default_padim_channels() -> usize {
    100
}

impl TrainPayload {
    /// Checks every field, naming the first bad one.
    fn check(&self) -> Result<Architecture, Rejection> {
        let invalid = |message: String| ApiError::reject(StatusCode::UNPROCESSABLE_ENTITY, message);
        let architecture = match self.model_name.as_str() {
            "padim" => Architecture::Padim,
            "patchcore" => Architecture::Patchcore,
            other => {
                return Err(invalid(format!(
                    "model_name: {other:?} is not a trainable model (padim, patchcore)"
                )));
            }
        };
        if crate::backbone::Backbone::from_name(&self.backbone).is_none() {
            return Err(invalid(format!(
                "backbone: {:?} is not available (mobilenet_v2, efficientnet_lite0)",
                self.backbone
            )));
        }
        if let Some(size) = self.input_size
            && (!(64..=1024).contains(&size) || !size.is_multiple_of(32))
        {
            return Err(invalid(format!(
                "input_size: {size} must be a multiple of 32 from 64 to 1024"
            )));
        }
        if let Some(tile) = self.tile
            && (!(64..=1024).contains(&tile) || !tile.is_multiple_of(32))
        {
            return Err(invalid(format!(
                "tile: {tile} must be a multiple of 32 from 64 to 1024"
            )));
        }
        if let (Some(tile), Some(size)) = (self.tile, self.input_size)
            && tile >= size
        {
            return Err(invalid(format!(
                "tile: {tile} must be smaller than input_size {size}"
            )));
        }
        if !(1..=1000).contains(&self.padim_channels) {
            return Err(invalid("padim_channels: must be 1 to 1000".into()));
        }
        if self
            .memory_bank
            .is_some_and(|rows| !(1..=100_000).contains(&rows))
        {
            return Err(invalid("memory_bank: must be 1 to 100000".into()));
        }
        if let Some(name) = &self.name
            && (name.trim().is_empty() || name.len() > 200)
        {
            return Err(invalid("name: must be 1 to 200 characters".into()));
        }
        Ok(architecture)
    }
}

/// `[flag, value]` when there is a value, nothing otherwise: settings left to the trainer's
/// defaults are not passed on.
fn optional_flag(flag: &str, value: Option<usize>) -> Vec<String> {
    value
        .map(|value| vec![flag.to_string(), value.to_string()])
        .unwrap_or_default()
}

/// A job record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    /// UUID.
    pub id: String,
    /// The project trained.
    pub project_id: String,
    /// Always `training` for now.
    #[serde(rename = "type")]
    pub job_type: String,
    /// Status.
    pub status: JobStatus,
    /// 0 to 100.
    pub progress: u8,
    /// Training stage: snapshot, features, fitting, calibration, export.
    pub stage: Option<String>,
    /// Why it failed, or what it produced.
    pub message: Option<String>,
    /// What was asked for.
    pub payload: TrainPayload,
    /// The model it registers (reserved at submission, registered on completion).
    pub model_id: String,
    /// Submission time.
    pub created_at: String,
    /// When it started running.
    pub start_time: Option<String>,
    /// When it ended.
    pub end_time: Option<String>,
}

/// Share of the whole job each training stage takes, in percent (sums to 100).
const STAGES: [(&str, u8); 5] = [
    ("snapshot", 5),
    ("features", 50),
    ("fitting", 15),
    ("calibration", 25),
    ("export", 5),
];

/// Whole-job percent at `percent` of `stage`.
fn overall_percent(stage: &str, percent: u8) -> u8 {
    let mut before = 0u32;
    for (name, share) in STAGES {
        if name == stage {
            return (before + u32::from(share) * u32::from(percent.min(100)) / 100).min(99) as u8;
        }
        before += u32::from(share);
    }
    before.min(99) as u8
}

/// A job the worker holds: its latest state, its log lines and its cancel switch.
struct LiveJob {
    state: watch::Sender<Job>,
    /// Each line with its number in the job's log file (from 0), so that a reader of the
    /// file can tell which broadcast lines it has already read.
    lines: broadcast::Sender<(u64, String)>,
    cancel: watch::Sender<bool>,
}

/// The training worker: queued and running jobs, and the limit on how many run at once.
pub struct JobRunner {
    slots: Arc<Semaphore>,
    live: Mutex<HashMap<String, Arc<LiveJob>>>,
}

impl JobRunner {
    /// A worker running at most `max_jobs` jobs at once.
    pub fn new(max_jobs: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_jobs.max(1))),
            live: Mutex::new(HashMap::new()),
        }
    }

    fn live(&self, id: &str) -> Option<Arc<LiveJob>> {
        self.live.lock().ok()?.get(id).cloned()
    }

    /// Marks jobs left `running` by a previous server as failed (removing their half-written
    /// packages) and queues `pending` ones again. Runs before the server answers requests.
    pub fn recover(state: &Arc<AppState>) -> Result<(), String> {
        let jobs: Vec<Job> = state.store.all(JOBS).map_err(|e| e.to_string())?;
        for mut job in jobs {
            match job.status {
                JobStatus::Running => {
                    remove_job_files(&state.data_dir, &job);
                    job.status = JobStatus::Failed;
                    job.message =
                        Some("interrupted: the server stopped while this job was running".into());
                    job.end_time = Some(now());
                    state
                        .store
                        .put(JOBS, &job.id, &job)
                        .map_err(|e| e.to_string())?;
                    tracing::warn!(job = %job.id, "marked failed: interrupted by a server stop");
                }
                JobStatus::Pending => {
                    remove_job_files(&state.data_dir, &job);
                    submit(state, job);
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The package folder of a model being trained.
fn partial_model_dir(data_dir: &Path, model_id: &str) -> PathBuf {
    data_dir.join("models").join(format!(".{model_id}.partial"))
}

/// Removes a half-written package and the scratch folder training keeps beside it.
fn remove_partial_package(data_dir: &Path, model_id: &str) {
    let _ = std::fs::remove_dir_all(partial_model_dir(data_dir, model_id));
    let scratch = data_dir
        .join("models")
        .join(format!("..{model_id}.partial.scratch"));
    let _ = std::fs::remove_dir_all(scratch);
}

/// A job's working folder (its dataset links) and log file.
fn job_dir(data_dir: &Path, job_id: &str) -> PathBuf {
    data_dir.join("jobs").join(job_id)
}

fn log_path(data_dir: &Path, job_id: &str) -> PathBuf {
    data_dir.join("jobs").join(format!("{job_id}.log"))
}

fn remove_job_files(data_dir: &Path, job: &Job) {
    remove_partial_package(data_dir, &job.model_id);
    let _ = std::fs::remove_dir_all(job_dir(data_dir, &job.id));
}

/// Registers `job` with the worker and starts its task.
fn submit(state: &Arc<AppState>, job: Job) {
    let (lines, _) = broadcast::channel(256);
    let (cancel, _) = watch::channel(false);
    let live = Arc::new(LiveJob {
        state: watch::channel(job.clone()).0,
        lines,
        cancel,
    });
    if let Ok(mut all) = state.jobs.live.lock() {
        all.insert(job.id.clone(), Arc::clone(&live));
    }
    let state = Arc::clone(state);
    tokio::spawn(async move {
        let id = job.id.clone();
        run(&state, &live, job).await;
        if let Ok(mut all) = state.jobs.live.lock() {
            all.remove(&id);
        }
    });
}

/// Saves `job` and tells watchers.
async fn publish(state: &Arc<AppState>, live: &LiveJob, job: &Job) {
    let stored = job.clone();
    if let Err(error) = blocking(state, move |store| store.put(JOBS, &stored.id, &stored)).await {
        tracing::error!(job = %job.id, "cannot save the job: {error:?}");
    }
    live.state.send_replace(job.clone());
}

/// One job, from the queue to its end.
async fn run(state: &Arc<AppState>, live: &LiveJob, mut job: Job) {
    let mut canceled = live.cancel.subscribe();
    let permit = tokio::select! {
        permit = Arc::clone(&state.jobs.slots).acquire_owned() => permit.ok(),
        _ = until_canceled(&mut canceled) => None,
    };
    if permit.is_none() {
        job.status = JobStatus::Canceled;
        job.message = Some("canceled before it started".into());
        job.end_time = Some(now());
        publish(state, live, &job).await;
        return;
    }
    job.status = JobStatus::Running;
    job.start_time = Some(now());
    job.stage = Some(STAGES[0].0.into());
    publish(state, live, &job).await;
    let log = Log::open(&state.data_dir, &job.id).await;
    let outcome = train(state, live, &mut job, &log, &mut canceled).await;
    let data_dir = &state.data_dir;
    match outcome {
        Ok(model) => {
            job.status = JobStatus::Completed;
            job.progress = 100;
            job.message = Some(format!("model {} registered", model.id));
            job.end_time = Some(now());
            let stored_job = job.clone();
            let registered = blocking(state, move |store| {
                store.write(|tx| {
                    tx.put(MODELS, &model.id, &model)?;
                    tx.put(JOBS, &stored_job.id, &stored_job)
                })
            })
            .await;
            if registered.is_ok() {
                log.line(live, "completed").await;
                live.state.send_replace(job.clone());
            } else {
                let _ = std::fs::remove_dir_all(data_dir.join("models").join(&job.model_id));
                job.status = JobStatus::Failed;
                job.message = Some("the model could not be registered in the store".into());
                publish(state, live, &job).await;
            }
        }
        Err(Ended::Canceled) => {
            job.status = JobStatus::Canceled;
            job.message = Some("canceled".into());
            job.end_time = Some(now());
            log.line(live, "canceled").await;
            publish(state, live, &job).await;
        }
        Err(Ended::Failed(message)) => {
            job.status = JobStatus::Failed;
            log.line(live, &format!("failed: {message}")).await;
            job.message = Some(message);
            job.end_time = Some(now());
            publish(state, live, &job).await;
        }
    }
    remove_partial_package(data_dir, &job.model_id);
    let _ = std::fs::remove_dir_all(job_dir(data_dir, &job.id));
}

/// How a training run ended without a model.
enum Ended {
    Canceled,
    Failed(String),
}

/// A job's log: `jobs/<id>.log`, `logs/training.log` (prefixed with the job id), and the live
/// subscribers.
struct Log {
    job_id: String,
    files: tokio::sync::Mutex<LogFiles>,
}

/// The open files of a job's log (`None` when one could not be opened: logged, not fatal).
struct LogFiles {
    /// `jobs/<id>.log`.
    job: Option<tokio::fs::File>,
    /// `logs/training.log`, shared by every job.
    training: Option<tokio::fs::File>,
    /// Lines the job's file holds: the number the next line gets.
    job_lines: u64,
}

impl Log {
    async fn open(data_dir: &Path, job_id: &str) -> Self {
        let append = |path: PathBuf| async move {
            if let Some(parent) = path.parent() {
                tokio::fs::create_dir_all(parent).await.ok()?;
            }
            tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .await
                .map_err(|e| tracing::error!("cannot open {}: {e}", path.display()))
                .ok()
        };
        // A job queued again after a restart appends to the lines of its first attempt.
        let lines_before = tokio::fs::read_to_string(log_path(data_dir, job_id))
            .await
            .map(|text| text.lines().count() as u64)
            .unwrap_or(0);
        let job_file = append(log_path(data_dir, job_id)).await;
        let training_file = append(data_dir.join("logs").join("training.log")).await;
        Self {
            job_id: job_id.to_string(),
            files: tokio::sync::Mutex::new(LogFiles {
                job: job_file,
                training: training_file,
                job_lines: lines_before,
            }),
        }
    }

    /// Appends one line to both files and sends it to subscribers.
    async fn line(&self, live: &LiveJob, text: &str) {
        let stamped = format!("{} {text}", now());
        let mut files = self.files.lock().await;
        if let Some(file) = files.job.as_mut() {
            let _ = file.write_all(format!("{stamped}\n").as_bytes()).await;
        }
        if let Some(file) = files.training.as_mut() {
            let line = format!("{} job {} {text}\n", now(), self.job_id);
            let _ = file.write_all(line.as_bytes()).await;
        }
        let number = files.job_lines;
        files.job_lines += 1;
        let _ = live.lines.send((number, stamped));
    }
}

/// Links the project's media into a dataset folder, runs `inspectflow train` on it and moves
/// the package into place.
async fn train(
    state: &Arc<AppState>,
    live: &LiveJob,
    job: &mut Job,
    log: &Log,
    canceled: &mut watch::Receiver<bool>,
) -> Result<Model, Ended> {
    let data_dir = state.data_dir.clone();
    let project_id = job.project_id.clone();
    let media: Vec<Media> = blocking(state, |store| store.all(MEDIA))
        .await
        .map_err(|_| Ended::Failed("cannot read the project's media".into()))?
        .into_iter()
        .filter(|m: &Media| m.project_id == project_id)
        .collect();
    let dataset = job_dir(&data_dir, &job.id).join("dataset");
    let folders = {
        let dataset = dataset.clone();
        let data_dir = data_dir.clone();
        tokio::task::spawn_blocking(move || link_dataset(&data_dir, &media, &dataset))
            .await
            .map_err(|e| Ended::Failed(e.to_string()))?
            .map_err(Ended::Failed)?
    };
    log.line(
        live,
        &format!(
            "dataset: {} normal, {} anomalous images",
            folders.normal_count, folders.anomalous_count
        ),
    )
    .await;
    let payload = &job.payload;
    let out = partial_model_dir(&data_dir, &job.model_id);
    let _ = std::fs::remove_dir_all(&out);
    let executable = std::env::current_exe()
        .map_err(|e| Ended::Failed(format!("cannot find the inspectflow executable: {e}")))?;
    let mut command = tokio::process::Command::new(executable);
    command
        .arg("train")
        .arg("--normal")
        .arg(dataset.join("normal"))
        .args(["--model", &payload.model_name])
        .args(["--backbone", &payload.backbone])
        .args(optional_flag("--image-size", payload.input_size))
        .args(["--seed", &payload.seed.to_string()])
        .args(optional_flag("--tile", payload.tile))
        .args(["--padim-channels", &payload.padim_channels.to_string()])
        .args(optional_flag("--memory-bank", payload.memory_bank))
        .arg("--snapshots")
        .arg(data_dir.join("snapshots"))
        .arg("--out")
        .arg(&out)
        .args(["--progress", "json"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if folders.anomalous_count > 0 {
        command
            .arg("--anomalous")
            .arg(dataset.join("anomalous"))
            .arg("--masks")
            .arg(dataset.join("masks"));
    }
    die_with_parent(&mut command);
    let mut child = command
        .spawn()
        .map_err(|e| Ended::Failed(format!("cannot start training: {e}")))?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let (Some(stdout), Some(stderr)) = (stdout, stderr) else {
        return Err(Ended::Failed("training's output is not readable".into()));
    };
    let mut stdout = BufReader::new(stdout).lines();
    let mut stderr = BufReader::new(stderr).lines();
    let mut last_error = None;
    let mut snapshot_id = None;
    let mut saved_percent = 0u8;
    let mut stdout_open = true;
    let mut stderr_open = true;
    while stdout_open || stderr_open {
        tokio::select! {
            line = stdout.next_line(), if stdout_open => match line {
                Ok(Some(line)) => {
                    if let Some(id) = line.strip_prefix("dataset snapshot ") {
                        snapshot_id = Some(id.trim().to_string());
                    }
                    log.line(live, &line).await;
                }
                _ => stdout_open = false,
            },
            line = stderr.next_line(), if stderr_open => match line {
                Ok(Some(line)) => {
                    if let Some((stage, percent)) = progress_line(&line) {
                        let overall = overall_percent(&stage, percent);
                        let stage_changed = job.stage.as_deref() != Some(stage.as_str());
                        job.progress = overall;
                        job.stage = Some(stage.clone());
                        if stage_changed {
                            log.line(live, &format!("stage: {stage}")).await;
                        }
                        if stage_changed || overall >= saved_percent.saturating_add(5) {
                            saved_percent = overall;
                            publish(state, live, job).await;
                        } else {
                            live.state.send_replace(job.clone());
                        }
                    } else {
                        last_error = Some(line.clone());
                        log.line(live, &line).await;
                    }
                }
                _ => stderr_open = false,
            },
            _ = until_canceled(canceled) => {
                let _ = child.kill().await;
                return Err(Ended::Canceled);
            }
        }
    }
    let status = tokio::select! {
        status = child.wait() => status.map_err(|e| Ended::Failed(format!("training: {e}")))?,
        _ = until_canceled(canceled) => {
            let _ = child.kill().await;
            return Err(Ended::Canceled);
        }
    };
    if !status.success() {
        return Err(Ended::Failed(last_error.map_or_else(
            || format!("training exited with {status}"),
            |line| line.trim_start_matches("error: ").to_string(),
        )));
    }
    let model_dir = data_dir.join("models").join(&job.model_id);
    std::fs::rename(&out, &model_dir).map_err(|e| {
        Ended::Failed(format!(
            "cannot move the package to {}: {e}",
            model_dir.display()
        ))
    })?;
    Model::from_package(&model_dir, job, snapshot_id).map_err(|error| {
        let _ = std::fs::remove_dir_all(&model_dir);
        Ended::Failed(error)
    })
}

/// Returns once the cancel switch is on (or its sender is gone).
async fn until_canceled(canceled: &mut watch::Receiver<bool>) {
    let _ = canceled.wait_for(|c| *c).await.map(|_| ());
}

/// The job once it has ended (None when the worker is gone).
async fn until_final(updates: &mut watch::Receiver<Job>) -> Option<Job> {
    updates
        .wait_for(|job| job.status.is_final())
        .await
        .ok()
        .map(|job| job.clone())
}

/// `{"stage": "features", "percent": 40}` as printed by `inspectflow train --progress json`.
fn progress_line(line: &str) -> Option<(String, u8)> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let stage = value.get("stage")?.as_str()?.to_string();
    let percent = value.get("percent")?.as_u64()?.min(100) as u8;
    Some((stage, percent))
}

/// Asks the kernel to kill the child when the server dies, so a SIGKILLed server leaves no
/// training behind.
fn die_with_parent(command: &mut tokio::process::Command) {
    // SAFETY: the closure only calls prctl, which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The dataset folders of a job.
struct DatasetFolders {
    normal_count: usize,
    anomalous_count: usize,
}

/// Hard-links (or copies, across file systems) each image into `normal/` or `anomalous/`, and
/// each mask into `masks/` under the anomalous image's name.
fn link_dataset(
    data_dir: &Path,
    media: &[Media],
    dataset: &Path,
) -> Result<DatasetFolders, String> {
    let _ = std::fs::remove_dir_all(dataset);
    let mut folders = DatasetFolders {
        normal_count: 0,
        anomalous_count: 0,
    };
    for folder in ["normal", "anomalous", "masks"] {
        std::fs::create_dir_all(dataset.join(folder))
            .map_err(|e| format!("cannot create {}: {e}", dataset.join(folder).display()))?;
    }
    for item in media {
        let image = item.image_path(data_dir);
        let Some(name) = image.file_name() else {
            continue;
        };
        let folder = if item.label == "anomalous" {
            folders.anomalous_count += 1;
            "anomalous"
        } else {
            folders.normal_count += 1;
            "normal"
        };
        link(&image, &dataset.join(folder).join(name))?;
        if item.label == "anomalous" && item.has_mask {
            link(
                &item.mask_path(data_dir),
                &dataset.join("masks").join(format!("{}.png", item.id)),
            )?;
        }
    }
    Ok(folders)
}

fn link(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::hard_link(from, to)
        .or_else(|_| std::fs::copy(from, to).map(|_| ()))
        .map_err(|e| format!("cannot link {} into the dataset: {e}", from.display()))
}

/// Normal images training needs: 2 to fit and 1 to calibrate.
const MIN_NORMAL_IMAGES: usize = 3;

/// The job routes.
pub fn routes(state: Arc<AppState>) -> BoxedFilter<(Response,)> {
    let with_state = warp::any().map(move || Arc::clone(&state));
    let train = warp::path!("api" / "projects" / String / "train")
        .and(warp::post())
        .and(super::api::json_body::<TrainPayload>())
        .and(with_state.clone())
        .and_then(start_training);
    let list = warp::path!("api" / "jobs")
        .and(warp::get())
        .and(warp::query::<ProjectPage>())
        .and(with_state.clone())
        .and_then(list);
    let get = warp::path!("api" / "jobs" / String)
        .and(warp::get())
        .and(with_state.clone())
        .and_then(get);
    let cancel = warp::path("api")
        .and(warp::path("jobs"))
        .and(action("cancel"))
        .and(warp::path::end())
        .and(warp::post())
        .and(with_state.clone())
        .and_then(cancel);
    let progress = warp::path!("api" / "jobs" / String / "progress")
        .and(warp::get())
        .and(with_state.clone())
        .and_then(progress_events);
    let logs = warp::path!("api" / "jobs" / String / "logs")
        .and(warp::get())
        .and(with_state)
        .and_then(log_events);
    train
        .or(list)
        .unify()
        .or(get)
        .unify()
        .or(cancel)
        .unify()
        .or(progress)
        .unify()
        .or(logs)
        .unify()
        .boxed()
}

async fn start_training(
    project_id: String,
    payload: TrainPayload,
    state: Arc<AppState>,
) -> Result<Response, Rejection> {
    payload.check()?;
    let key = project_id.clone();
    let (project, normal) = blocking(&state, move |store| {
        let project = store.get::<Project>(PROJECTS, &key)?;
        let media: Vec<Media> = store.all(MEDIA)?;
        let normal = media
            .iter()
            .filter(|m| m.project_id == key && m.label == "normal")
            .count();
        Ok((project, normal))
    })
    .await?;
    if project.is_none() {
        return Err(ApiError::not_found("project", &project_id));
    }
    if normal < MIN_NORMAL_IMAGES {
        return Err(ApiError::reject(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "the project has {normal} normal images; training needs at least {MIN_NORMAL_IMAGES}"
            ),
        ));
    }
    let job = Job {
        id: uuid::Uuid::new_v4().to_string(),
        project_id,
        job_type: "training".into(),
        status: JobStatus::Pending,
        progress: 0,
        stage: None,
        message: None,
        payload,
        model_id: uuid::Uuid::new_v4().to_string(),
        created_at: now(),
        start_time: None,
        end_time: None,
    };
    super::api::put_in_project(&state, &job.project_id, JOBS, &job.id, job.clone()).await?;
    submit(&state, job.clone());
    Ok(warp::reply::with_status(warp::reply::json(&job), StatusCode::CREATED).into_response())
}

async fn list(query: ProjectPage, state: Arc<AppState>) -> Result<Response, Rejection> {
    let mut jobs: Vec<Job> = blocking(&state, |store| store.all(JOBS)).await?;
    jobs.retain(|job| {
        query
            .project_id
            .as_ref()
            .is_none_or(|id| &job.project_id == id)
    });
    jobs.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
    let (items, pagination) = paginate(jobs, &query.page())?;
    Ok(
        warp::reply::json(&serde_json::json!({"jobs": items, "pagination": pagination}))
            .into_response(),
    )
}

/// The job as the worker sees it now (fresher than the store between saves), else as stored.
async fn current(state: &Arc<AppState>, id: &str) -> Result<Job, Rejection> {
    if let Some(live) = state.jobs.live(id) {
        return Ok(live.state.borrow().clone());
    }
    let key = id.to_string();
    blocking(state, move |store| store.get::<Job>(JOBS, &key))
        .await?
        .ok_or_else(|| ApiError::not_found("job", id))
}

async fn get(id: String, state: Arc<AppState>) -> Result<Response, Rejection> {
    Ok(warp::reply::json(&current(&state, &id).await?).into_response())
}

/// Cancels a pending or running job and answers once it has stopped (at most 10 s).
async fn cancel(id: String, state: Arc<AppState>) -> Result<Response, Rejection> {
    let job = current(&state, &id).await?;
    let Some(live) = state.jobs.live(&id).filter(|_| !job.status.is_final()) else {
        return Err(ApiError::reject(
            StatusCode::CONFLICT,
            format!("job {id} has already ended ({:?})", job.status).to_lowercase(),
        ));
    };
    live.cancel.send_replace(true);
    let mut updates = live.state.subscribe();
    let ended = tokio::time::timeout(Duration::from_secs(10), until_final(&mut updates)).await;
    let job = match ended {
        Ok(Some(job)) => job,
        _ => current(&state, &id).await?,
    };
    Ok(warp::reply::json(&job).into_response())
}

/// `GET /api/jobs/{id}/progress`: a `progress` event with the job on every change, ending
/// after the final status.
async fn progress_events(id: String, state: Arc<AppState>) -> Result<Response, Rejection> {
    let job = current(&state, &id).await?;
    let updates = state.jobs.live(&id).map(|live| live.state.subscribe());
    let events = futures::stream::unfold(
        (Some(job), updates, false),
        |(first, mut updates, done)| async move {
            if done {
                return None;
            }
            let job = match first {
                Some(job) => job,
                None => {
                    let receiver = updates.as_mut()?;
                    receiver.changed().await.ok()?;
                    receiver.borrow_and_update().clone()
                }
            };
            let last = job.status.is_final() || updates.is_none();
            let event = warp::sse::Event::default()
                .event("progress")
                .json_data(&job)
                .map_err(|e| std::io::Error::other(e.to_string()));
            Some((event, (None, updates, last)))
        },
    );
    Ok(warp::sse::reply(warp::sse::keep_alive().stream(events)).into_response())
}

/// The next line already queued on `receiver` that the log file did not hold (numbered `seen`
/// or later).
fn queued_line(receiver: &mut broadcast::Receiver<(u64, String)>, seen: u64) -> Option<String> {
    loop {
        match receiver.try_recv() {
            Ok((number, _)) if number < seen => continue,
            Ok((_, line)) => return Some(line),
            Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
            Err(_) => return None,
        }
    }
}

/// `GET /api/jobs/{id}/logs`: the job's log lines so far, then new ones as they come, as `log`
/// events; the stream ends with the job.
async fn log_events(id: String, state: Arc<AppState>) -> Result<Response, Rejection> {
    current(&state, &id).await?;
    let live = state.jobs.live(&id);
    // Subscribe before reading the file, so no line falls between the two.
    let receiver = live.as_ref().map(|live| live.lines.subscribe());
    let written = tokio::fs::read_to_string(log_path(&state.data_dir, &id))
        .await
        .unwrap_or_default();
    let past: Vec<String> = written.lines().map(str::to_string).collect();
    // Lines numbered below this were in the file already.
    let seen = past.len() as u64;
    let ended = live.map(|live| live.state.subscribe());
    let past = futures::stream::iter(past.into_iter().map(Ok::<String, std::io::Error>));
    let future = futures::stream::unfold(
        (receiver, ended, seen),
        |(receiver, ended, seen)| async move {
            let mut receiver = receiver?;
            let Some(mut ended) = ended else {
                // The job has ended: drain what was sent before its final status.
                return queued_line(&mut receiver, seen)
                    .map(|line| (Ok(line), (Some(receiver), None, seen)));
            };
            loop {
                let next = tokio::select! {
                    line = receiver.recv() => Some(line),
                    _ = until_final(&mut ended) => None,
                };
                match next {
                    Some(Ok((number, _))) if number < seen => continue,
                    Some(Ok((_, line))) => {
                        return Some((Ok(line), (Some(receiver), Some(ended), seen)));
                    }
                    Some(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                    Some(Err(broadcast::error::RecvError::Closed)) => return None,
                    // The job ended: lines sent before its final status are still queued.
                    None => {
                        return queued_line(&mut receiver, seen)
                            .map(|line| (Ok(line), (Some(receiver), None, seen)));
                    }
                }
            }
        },
    );
    use futures::StreamExt;
    let events = past
        .chain(future)
        .map(|line| line.map(|text| warp::sse::Event::default().event("log").data(text)));
    Ok(warp::sse::reply(warp::sse::keep_alive().stream(events)).into_response())
}
