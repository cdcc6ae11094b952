//! The training worker: runs each queued job as an `inspectflow train` child process on a
//! dataset snapshot (the one the job names, or one taken of the project's media when it starts;
//! its images hard-linked into a per-job dataset folder), so a cancel is a kill, a crash
//! in training cannot take the server down, and the child dies with the server
//! (`PR_SET_PDEATHSIG`). The job's settings reach the child as a JSON file (`--settings`), its
//! progress comes back as typed [`TrainEvent`] lines. The package is written to
//! `models/.<model id>.partial` and renamed into place; the model record and the job's
//! `completed` status commit in one transaction, so a failed or interrupted job registers no
//! model. Jobs found `running` when the server starts are marked `failed`; `pending` ones are
//! queued again. At most `max_jobs` run at once (default 1).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use inspectflow_operators::files;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, broadcast, watch};

use super::http::{blocking, now};
use super::job_log::{count_log_lines, log_path};
use super::jobs::{Job, JobStatus};
use super::models::Model;
use super::snapshot_store::{self, Snapshot, SnapshotOrigin};
use super::state::AppState;
use super::store::{JOBS, MODELS, SNAPSHOTS};
use crate::train::TrainEvent;

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
pub(crate) struct LiveJob {
    pub(crate) state: watch::Sender<Job>,
    /// Each line with its number in the job's log file (from 0), so that a reader of the
    /// file can tell which broadcast lines it has already read.
    pub(crate) lines: broadcast::Sender<(u64, String)>,
    pub(crate) cancel: watch::Sender<bool>,
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

    pub(crate) fn live(&self, id: &str) -> Option<Arc<LiveJob>> {
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

fn remove_job_files(data_dir: &Path, job: &Job) {
    remove_partial_package(data_dir, &job.model_id);
    let _ = std::fs::remove_dir_all(job_dir(data_dir, &job.id));
}

/// Registers `job` with the worker and starts its task.
pub(crate) fn submit(state: &Arc<AppState>, job: Job) {
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
        let lines_before = count_log_lines(&log_path(data_dir, job_id)).await;
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

/// The job's dataset snapshot: the one it names, else one taken of the project's media now
/// (recorded in the job's payload, so the snapshot cannot be deleted under it).
async fn snapshot_of(
    state: &Arc<AppState>,
    live: &LiveJob,
    job: &mut Job,
) -> Result<Snapshot, Ended> {
    let failed = |e: String| Ended::Failed(format!("dataset snapshot: {e}"));
    if let Some(id) = job.payload.dataset_snapshot_id.clone() {
        let key = id.clone();
        return blocking(state, move |store| store.get::<Snapshot>(SNAPSHOTS, &key))
            .await
            .map_err(|_| failed("cannot read the store".into()))?
            .ok_or_else(|| failed(format!("snapshot {id} is gone")));
    }
    let (shared, project_id) = (Arc::clone(state), job.project_id.clone());
    let snapshot = tokio::task::spawn_blocking(move || {
        snapshot_store::take(
            &shared.store,
            &shared.data_dir,
            &project_id,
            SnapshotOrigin::Training,
        )
    })
    .await
    .map_err(|e| failed(e.to_string()))?
    .map_err(|e| failed(e.to_string()))?;
    job.payload.dataset_snapshot_id = Some(snapshot.id.clone());
    publish(state, live, job).await;
    Ok(snapshot)
}

/// Links the job's dataset snapshot into a dataset folder, runs `inspectflow train` on it and
/// moves the package into place.
async fn train(
    state: &Arc<AppState>,
    live: &LiveJob,
    job: &mut Job,
    log: &Log,
    canceled: &mut watch::Receiver<bool>,
) -> Result<Model, Ended> {
    let data_dir = state.data_dir.clone();
    let snapshot = snapshot_of(state, live, job).await?;
    log.line(live, &format!("dataset snapshot {}", snapshot.id))
        .await;
    let dataset = job_dir(&data_dir, &job.id).join("dataset");
    let folders = {
        let dataset = dataset.clone();
        let data_dir = data_dir.clone();
        let manifest = snapshot_store::manifest_path(&data_dir, &snapshot.id);
        tokio::task::spawn_blocking(move || {
            let rows = snapshot_store::read_manifest(&manifest).map_err(|e| e.to_string())?;
            snapshot_store::link_dataset(&data_dir, &rows, &dataset)
        })
        .await
        .map_err(|e| Ended::Failed(e.to_string()))?
        .map_err(Ended::Failed)?
    };
    log.line(
        live,
        &format!(
            "dataset: {} normal, {} anomalous images ({} with a mask)",
            folders.normal_count, folders.anomalous_count, folders.mask_count
        ),
    )
    .await;
    let out = partial_model_dir(&data_dir, &job.model_id);
    let _ = std::fs::remove_dir_all(&out);
    let settings = job_dir(&data_dir, &job.id).join("settings.json");
    let text = serde_json::to_vec_pretty(&job.payload.config)
        .map_err(|e| Ended::Failed(format!("cannot write the training settings: {e}")))?;
    std::fs::write(&settings, text)
        .map_err(|e| Ended::Failed(format!("cannot write {}: {e}", settings.display())))?;
    let executable = std::env::current_exe()
        .map_err(|e| Ended::Failed(format!("cannot find the inspectflow executable: {e}")))?;
    let mut command = tokio::process::Command::new(executable);
    command
        .arg("train")
        .arg("--normal")
        .arg(dataset.join("normal"))
        .arg("--settings")
        .arg(&settings)
        .arg("--snapshots")
        .arg(job_dir(&data_dir, &job.id).join("snapshot-cache"))
        .arg("--out")
        .arg(&out)
        .args(["--progress", "json"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if folders.anomalous_count > 0 {
        command.arg("--anomalous").arg(dataset.join("anomalous"));
    }
    if folders.mask_count > 0 {
        command.arg("--masks").arg(dataset.join("masks"));
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
    // Read as bytes, not as UTF-8 text: a stray byte must not stop the reading, or the child
    // would block on a full pipe and the job would never end.
    let mut stdout = BufReader::new(stdout).split(b'\n');
    let mut stderr = BufReader::new(stderr).split(b'\n');
    let mut last_error = None;
    let mut saved_percent = 0u8;
    let mut stdout_open = true;
    let mut stderr_open = true;
    while stdout_open || stderr_open {
        tokio::select! {
            line = stdout.next_segment(), if stdout_open => match line {
                Ok(Some(line)) => log.line(live, &output_line(&line)).await,
                _ => stdout_open = false,
            },
            line = stderr.next_segment(), if stderr_open => match line.map(|l| l.map(|l| output_line(&l))) {
                Ok(Some(line)) => match TrainEvent::parse(&line) {
                    Some(TrainEvent::Progress { stage, percent }) => {
                        let percent = percent.min(100);
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
                    }
                    Some(TrainEvent::Epoch(report)) => {
                        log.line(live, &report.to_string()).await;
                    }
                    // The CLI's own snapshot is of the job's folder; the model names the server's.
                    Some(TrainEvent::Finished { .. }) => {}
                    None => {
                        last_error = Some(line.clone());
                        log.line(live, &line).await;
                    }
                },
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
    // The package is on disk before its name, and its name before its record: a power loss
    // cannot leave a model record over empty files.
    let (from, to) = (out.clone(), model_dir.clone());
    tokio::task::spawn_blocking(move || {
        files::sync_folder(&from)?;
        std::fs::rename(&from, &to)?;
        // A package left in models/ without a record would never be cleaned up.
        files::sync_parent(&to).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&to);
        })
    })
    .await
    .map_err(std::io::Error::other)
    .flatten()
    .map_err(|e| {
        Ended::Failed(format!(
            "cannot move the package to {}: {e}",
            model_dir.display()
        ))
    })?;
    Model::from_package(&model_dir, job, Some(snapshot.id)).map_err(|error| {
        let _ = std::fs::remove_dir_all(&model_dir);
        Ended::Failed(error)
    })
}

/// Returns once the cancel switch is on (or its sender is gone).
async fn until_canceled(canceled: &mut watch::Receiver<bool>) {
    let _ = canceled.wait_for(|c| *c).await.map(|_| ());
}

/// The job once it has ended (None when the worker is gone).
pub(crate) async fn until_final(updates: &mut watch::Receiver<Job>) -> Option<Job> {
    updates
        .wait_for(|job| job.status.is_final())
        .await
        .ok()
        .map(|job| job.clone())
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

/// The longest line of the training process's output kept in the job's log, in bytes.
const MAX_OUTPUT_LINE: usize = 8 << 10;

/// One line of the training process's output as log text: without its `\r`, bytes that are not
/// UTF-8 replaced, and cut at [`MAX_OUTPUT_LINE`] bytes.
fn output_line(bytes: &[u8]) -> String {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    let kept = &bytes[..bytes.len().min(MAX_OUTPUT_LINE)];
    String::from_utf8_lossy(kept).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_that_is_not_utf8_or_too_long_is_still_a_log_line() {
        assert_eq!(output_line(b"epoch 1\r"), "epoch 1");
        assert_eq!(output_line(b"bad \xff byte"), "bad \u{fffd} byte");
        assert_eq!(
            output_line(&vec![b'x'; 3 * MAX_OUTPUT_LINE]).len(),
            MAX_OUTPUT_LINE
        );
    }
}
