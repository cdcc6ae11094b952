//! Fleet mode of `inspectflow serve` (`--fleet-nats`): engines on several machines share the
//! desired state, the pipelines to run, in NATS JetStream key-value buckets, and each runs the
//! part it holds a lease on. There is no coordinator of our own: NATS's compare-and-set and
//! per-bucket time-to-live are the whole protocol.
//!
//! Buckets (`<fleet>` is `--fleet-name`, `inspectflow` by default):
//! - `<fleet>-desired`: pipeline id → [`DesiredPipeline`] (a graph). Its revision is the
//!   pipeline's *generation*: a changed graph is a new generation, which restarts it.
//! - `<fleet>-leases`: pipeline id → [`Lease`] (engine, generation). Created with
//!   compare-and-set (only when absent), renewed every tick by an update that names the
//!   revision the engine last wrote, and kept at most `--fleet-lease-s` seconds: the bucket's
//!   maximum age makes the lease of an engine that died lapse by itself.
//! - `<fleet>-engines`: engine id → [`EngineRecord`] (capacity, its runs with their metrics),
//!   written every tick with the same maximum age: the live engines.
//! - `<fleet>-outcomes`: pipeline id → [`Outcome`] of a generation that ended by itself (a file
//!   read to its end, a failure): it is not started again until its graph changes.
//!
//! Every tick (a sixth of the lease) an engine stops the runs whose desired state went away or
//! changed, records the runs that ended, publishes its record, and claims pipelines nobody holds
//! while it has capacity and no live engine runs fewer than it does (so a fleet started together
//! shares the work evenly). Leases are renewed by a task of their own
//! ([`super::fleet_leases`]), each call bounded by a tick; a run whose last renewal could lapse
//! before the next one is aborted by a local watchdog, and a lease is handed back only once its
//! run has ended, so one engine's run has ended before another can claim the pipeline (unless
//! an engine is paused longer than a lease, which no lease protocol can tell from death).
//! A failed generation is tried again, on any engine, after a backoff, up to [`MAX_ATTEMPTS`]
//! times; a graph an engine cannot even start (invalid there) fails for good.
//!
//! A pipeline taken over starts again from its beginning. When its sources replay the same
//! frames (files), it runs under the same run id on every engine (fleet name and generation),
//! so `sink.nats` sends the results again under the same message ids and JetStream keeps one
//! copy of each; live sources (cameras) get a run id per claim, as their frames are new.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;

pub use super::fleet_buckets::{Buckets, FleetError, live_entry, valid_id};
use super::fleet_leases::{FleetRun, Stopping};
pub use super::fleet_records::{
    DesiredPipeline, EngineRecord, EngineRun, FleetSettings, FleetState, Lease, Outcome,
};
use super::http::now;
use super::state::AppState;
use crate::graph::ValidatedGraph;
use crate::operators::RetrySettings;
use crate::runtime::metrics::MetricsReport;
use crate::runtime::pipeline::RunMode;

/// This engine's part of the fleet.
pub struct Fleet {
    pub engine: String,
    pub capacity: usize,
    /// `--fleet-name`: part of run ids, so fleets sharing a results stream never collide.
    name: String,
    pub(super) lease: Duration,
    pub(super) tick: Duration,
    api: String,
    started_at: String,
    pub buckets: Buckets,
    pub(super) runs: Mutex<HashMap<String, FleetRun>>,
    /// Pipelines this engine failed to start, and when it may try again.
    backoff: Mutex<HashMap<String, Instant>>,
}

impl Fleet {
    /// Connects to the fleet's NATS (within 10 s) and opens or creates its buckets; refuses an
    /// engine id another live engine uses.
    pub async fn join(settings: &FleetSettings, api: String) -> Result<Self, FleetError> {
        let Some(servers) = &settings.nats else {
            return Err(FleetError("fleet mode needs --fleet-nats".into()));
        };
        let engine = match &settings.engine_id {
            Some(id) => id.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|name| name.trim().replace('.', "-"))
                .map_err(|e| {
                    FleetError(format!(
                        "--engine-id: not given, and the host name cannot be read ({e})"
                    ))
                })?,
        };
        if !valid_id(&engine) {
            return Err(FleetError(format!(
                "--engine-id: '{engine}' is not an engine id (1-64 letters, digits, - or _)"
            )));
        }
        if settings.capacity == 0 {
            return Err(FleetError("--fleet-capacity: must be at least 1".into()));
        }
        if !(2..=3600).contains(&settings.lease_s) {
            return Err(FleetError(format!(
                "--fleet-lease-s: must be 2-3600 seconds, got {}",
                settings.lease_s
            )));
        }
        if !valid_id(&settings.name) {
            return Err(FleetError(format!(
                "--fleet-name: '{}' is not a bucket prefix (1-64 letters, digits, - or _)",
                settings.name
            )));
        }
        let addresses: Vec<String> = servers.split(',').map(|s| s.trim().to_string()).collect();
        let lease = Duration::from_secs(settings.lease_s);
        let tick = (lease / 6).max(Duration::from_millis(200));
        // async-nats's own reconnect backoff grows to 4 s: after an outage of 2-3 s the
        // renewals stopped for the outage plus the last wait, and the watchdog aborted every
        // run (lease 6 s). Attempts at most a quarter tick apart notice the server's return
        // within 250 ms at the default lease, for a few connection attempts a second meanwhile.
        let reconnect = RetrySettings {
            initial_backoff_ms: 2,
            max_backoff_ms: (tick / 4).as_millis().max(2) as u64,
        };
        let client = tokio::time::timeout(
            Duration::from_secs(10),
            async_nats::ConnectOptions::new()
                .name(format!("inspectflow-engine-{engine}"))
                .max_reconnects(None)
                .reconnect_delay_callback(move |attempt| reconnect.before_attempt(attempt))
                .connect(addresses.as_slice()),
        )
        .await
        .map_err(|_| {
            FleetError(format!(
                "--fleet-nats: no answer from {servers} within 10 s"
            ))
        })?
        .map_err(|e| FleetError(format!("--fleet-nats: cannot connect to {servers}: {e}")))?;
        let jetstream = jetstream::new(client);
        let buckets = Buckets::open(&jetstream, &settings.name, lease).await?;
        if let Ok(Some(_)) = buckets.engines.get(&engine).await {
            return Err(FleetError(format!(
                "--engine-id: engine '{engine}' is already in the fleet (another process, or one \
                 that stopped less than {} s ago)",
                settings.lease_s
            )));
        }
        Ok(Self {
            engine,
            capacity: settings.capacity,
            name: settings.name.clone(),
            lease,
            tick,
            api,
            started_at: now(),
            buckets,
            runs: Mutex::new(HashMap::new()),
            backoff: Mutex::new(HashMap::new()),
        })
    }

    /// Runs the fleet loop until `stopping` turns true, then stops this engine's runs and
    /// hands their leases back.
    pub async fn run(
        self: Arc<Self>,
        state: Arc<AppState>,
        mut stopping: tokio::sync::watch::Receiver<bool>,
    ) {
        tracing::info!(engine = %self.engine, capacity = self.capacity, "joined the fleet");
        let renewals = tokio::spawn(Arc::clone(&self).renew_forever());
        loop {
            if let Err(error) = self.reconcile(&state).await {
                tracing::warn!(engine = %self.engine, "fleet: {error}");
            }
            tokio::select! {
                () = tokio::time::sleep(self.tick) => {}
                _ = stopping.wait_for(|stop| *stop) => break,
            }
        }
        self.leave().await;
        renewals.abort();
    }

    /// One tick (leases are renewed by a task of their own): stop, record, report, claim.
    async fn reconcile(&self, state: &Arc<AppState>) -> Result<(), FleetError> {
        let desired = self.buckets.desired_pipelines().await;
        self.settle_runs(desired.as_ref().ok()).await;
        self.report().await?;
        let desired = desired?;
        self.claim(state, &desired).await
    }

    /// Asks runs whose desired state is gone or changed to stop (`desired` is None when it
    /// could not be read), and settles runs that ended: their outcome is recorded (unless this
    /// engine stopped them for another reason than leaving) before their lease is handed back;
    /// when the outcome cannot be stored, the run and its lease stay until the next tick.
    async fn settle_runs(&self, desired: Option<&HashMap<String, (u64, DesiredPipeline)>>) {
        let mut ended = Vec::new();
        if let Ok(mut runs) = self.runs.lock() {
            for (id, run) in runs.iter_mut() {
                let wanted =
                    desired.is_none_or(|d| d.get(id).is_some_and(|(g, _)| *g == run.generation));
                if run.is_finished() {
                    ended.push(id.clone());
                } else if !wanted && run.stopping.is_none() {
                    tracing::info!(pipeline = %id, "fleet: desired state removed or changed; stopping");
                    run.stop(Stopping::Unwanted, false);
                }
            }
        }
        for id in ended {
            let Some((generation, revision, stopping, pipeline)) =
                self.runs.lock().ok().and_then(|runs| {
                    runs.get(&id).map(|run| {
                        (
                            run.generation,
                            run.lease_revision,
                            run.stopping,
                            Arc::clone(&run.pipeline),
                        )
                    })
                })
            else {
                continue;
            };
            let taken = pipeline.lock().ok().and_then(|mut p| p.take());
            let outcome = match taken {
                Some(run) => tokio::task::spawn_blocking(move || run.wait()).await.ok(),
                None => None,
            };
            let ended_by_itself = outcome
                .as_ref()
                .is_some_and(|o| o.failure.is_some() || o.report.state == "completed");
            let record = match stopping {
                None => true,
                Some((Stopping::Leaving, _)) => ended_by_itself,
                Some(_) => false,
            };
            if record {
                let (state, failure, metrics) = match outcome {
                    Some(outcome) => (
                        if outcome.failure.is_some() {
                            FleetState::Failed
                        } else {
                            FleetState::Completed
                        },
                        outcome.failure.map(|f| f.to_string()),
                        Some(outcome.report),
                    ),
                    None => (
                        FleetState::Failed,
                        Some("the run's threads could not be joined".into()),
                        None,
                    ),
                };
                tracing::info!(pipeline = %id, generation, ?state, "fleet: run ended");
                if !self
                    .record_outcome(&id, generation, state, failure, metrics, false)
                    .await
                {
                    continue; // keep the run (finished) and its lease; try again next tick
                }
            }
            if let Ok(mut runs) = self.runs.lock() {
                runs.remove(&id);
            }
            if stopping.is_none_or(|(why, _)| why != Stopping::LeaseLost) {
                self.release(&id, revision).await;
            }
        }
    }

    /// Stores how `generation` of pipeline `id` ended. A failure counts as an attempt: it is
    /// tried again (on any engine) after a backoff, up to [`MAX_ATTEMPTS`]; `permanent` (a graph
    /// that cannot run) uses them all. Returns whether the outcome was stored.
    async fn record_outcome(
        &self,
        id: &str,
        generation: u64,
        state: FleetState,
        failure: Option<String>,
        metrics: Option<MetricsReport>,
        permanent: bool,
    ) -> bool {
        let earlier = live_entry(&self.buckets.outcomes, id)
            .await
            .ok()
            .flatten()
            .and_then(|entry| serde_json::from_slice::<Outcome>(&entry.value).ok())
            .filter(|o| o.generation == generation)
            .map_or(0, |o| o.attempts);
        let attempts = match state {
            FleetState::Failed if permanent => MAX_ATTEMPTS,
            // Read from the shared bucket: a forged count saturates instead of overflowing.
            FleetState::Failed => earlier.saturating_add(1),
            _ => earlier,
        };
        let outcome = Outcome {
            generation,
            state,
            engine: self.engine.clone(),
            finished_at: now(),
            failure,
            metrics,
            attempts,
            retry_after_unix_ms: (state == FleetState::Failed && attempts < MAX_ATTEMPTS)
                .then(|| unix_ms() + RETRY_BACKOFF_MS * u64::from(attempts)),
        };
        let value = serde_json::to_vec(&outcome).unwrap_or_default();
        match self.buckets.outcomes.put(id, value.into()).await {
            Ok(_) => true,
            Err(error) => {
                tracing::error!(
                    pipeline = %id,
                    "fleet: cannot record the outcome in bucket {}: {error}",
                    self.buckets.outcomes.name
                );
                false
            }
        }
    }

    /// This engine's record now.
    pub fn record(&self) -> EngineRecord {
        let runs = self
            .runs
            .lock()
            .map(|runs| {
                let mut list: Vec<EngineRun> = runs
                    .iter()
                    .map(|(id, run)| EngineRun {
                        pipeline_id: id.clone(),
                        generation: run.generation,
                        started_at: run.started_at.clone(),
                        metrics: run.report(),
                    })
                    .collect();
                list.sort_by(|a, b| a.pipeline_id.cmp(&b.pipeline_id));
                list
            })
            .unwrap_or_default();
        EngineRecord {
            engine: self.engine.clone(),
            api: self.api.clone(),
            capacity: self.capacity,
            started_at: self.started_at.clone(),
            updated_at: now(),
            runs,
        }
    }

    async fn report(&self) -> Result<(), FleetError> {
        let value = serde_json::to_vec(&self.record()).unwrap_or_default();
        self.buckets
            .engines
            .put(&self.engine, value.into())
            .await
            .map(|_| ())
            .map_err(|e| FleetError(format!("publishing this engine's record: {e}")))
    }

    fn running(&self) -> usize {
        self.runs.lock().map_or(usize::MAX, |runs| runs.len())
    }

    /// Claims pipelines nobody holds, one at a time, while this engine has capacity and no live
    /// engine runs fewer pipelines.
    async fn claim(
        &self,
        state: &Arc<AppState>,
        desired: &HashMap<String, (u64, DesiredPipeline)>,
    ) -> Result<(), FleetError> {
        if self.running() >= self.capacity {
            return Ok(());
        }
        let least_elsewhere = self
            .buckets
            .engine_records()
            .await?
            .iter()
            .filter(|e| e.engine != self.engine && e.runs.len() < e.capacity)
            .map(|e| e.runs.len())
            .min();
        let mut ids: Vec<&String> = desired.keys().collect();
        ids.sort();
        for id in ids {
            let running = self.running();
            if running >= self.capacity || least_elsewhere.is_some_and(|least| running > least) {
                break;
            }
            if self.runs.lock().is_ok_and(|runs| runs.contains_key(id)) {
                continue;
            }
            if self.backoff.lock().is_ok_and(|b| {
                b.get(id.as_str())
                    .is_some_and(|until| Instant::now() < *until)
            }) {
                continue;
            }
            let (generation, pipeline) = &desired[id];
            if live_entry(&self.buckets.leases, id).await?.is_some() {
                continue;
            }
            if let Some(entry) = live_entry(&self.buckets.outcomes, id).await?
                && let Ok(outcome) = serde_json::from_slice::<Outcome>(&entry.value)
                && outcome.generation == *generation
                && !outcome.may_retry(unix_ms())
            {
                continue;
            }
            let revision = match self
                .buckets
                .leases
                .create(id, self.lease_value(*generation))
                .await
            {
                Ok(revision) => revision,
                // The create may have landed with its acknowledgement lost.
                Err(_) => match self.own_revision(id, *generation).await {
                    Ok(Some(revision)) => revision,
                    // Another engine was faster, or the lease cannot be read now: if this
                    // engine's create landed after all, the unused lease lapses by itself.
                    Ok(None) | Err(_) => continue,
                },
            };
            self.start(state, id, *generation, revision, pipeline).await;
        }
        Ok(())
    }

    /// Starts a claimed pipeline; one that cannot start is recorded as failed (for good when
    /// its graph is invalid here) and this engine leaves it to others for a while.
    async fn start(
        &self,
        state: &Arc<AppState>,
        id: &str,
        generation: u64,
        lease_revision: u64,
        desired: &DesiredPipeline,
    ) {
        let claimed = Instant::now();
        let (started, permanent) =
            match super::pipelines::graph_from_value(state, id, &desired.graph) {
                Ok(mut graph) => {
                    graph.name = id.to_string();
                    let run_id = self.run_id(&graph, generation, lease_revision);
                    let launched = state
                        .pipelines
                        .launch_run(graph, RunMode::Running, Some(run_id))
                        .await;
                    (launched, false)
                }
                Err(errors) => (Err(errors.to_string()), true),
            };
        match started {
            Ok(pipeline) => {
                tracing::info!(pipeline = %id, generation, engine = %self.engine, "fleet: started");
                if let Ok(mut runs) = self.runs.lock() {
                    runs.insert(
                        id.to_string(),
                        FleetRun {
                            generation,
                            lease_revision,
                            renewed: claimed,
                            started_at: now(),
                            pipeline: Arc::new(Mutex::new(Some(pipeline))),
                            stopping: None,
                        },
                    );
                }
            }
            Err(error) => {
                tracing::error!(pipeline = %id, "fleet: cannot start: {error}");
                if let Ok(mut backoff) = self.backoff.lock() {
                    backoff.insert(
                        id.to_string(),
                        Instant::now() + Duration::from_millis(RETRY_BACKOFF_MS),
                    );
                }
                self.record_outcome(
                    id,
                    generation,
                    FleetState::Failed,
                    Some(error),
                    None,
                    permanent,
                )
                .await;
                self.release(id, lease_revision).await;
            }
        }
    }

    /// The run id sinks put in message ids. The same on every engine for a graph whose sources
    /// replay the same frames when started again (files, synthetic frames), so copies resent
    /// after a hand-over are recognised; unique per claim for live sources (cameras, watched
    /// folders), whose frames after a hand-over are new ones.
    fn run_id(&self, graph: &ValidatedGraph, generation: u64, claim: u64) -> String {
        let replayable = graph
            .nodes
            .iter()
            .filter(|node| node.descriptor.kind == inspectflow_operators::OperatorKind::Source)
            .all(|node| REPLAYABLE_SOURCES.contains(&node.descriptor.name));
        if replayable {
            format!("{}-g{generation}", self.name)
        } else {
            format!("{}-g{generation}-c{claim}", self.name)
        }
    }

    /// Prometheus text of this engine's fleet runs.
    pub fn prometheus_texts(&self) -> Vec<String> {
        self.runs
            .lock()
            .map(|runs| {
                runs.values()
                    .filter_map(FleetRun::report)
                    .map(|report| report.to_prometheus())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Leaves the fleet: asks every run to stop (draining, all at once, the leases renewed
    /// meanwhile), records the outcomes of runs that ended by themselves, hands the leases
    /// back so that other engines take the pipelines over at once, and removes this engine's
    /// record. A run still draining after half a lease is aborted.
    async fn leave(&self) {
        if let Ok(mut runs) = self.runs.lock() {
            for run in runs.values_mut() {
                run.stop(Stopping::Leaving, false);
            }
        }
        let deadline = Instant::now() + self.lease / 2;
        loop {
            self.settle_runs(None).await;
            if self.runs.lock().map_or(true, |runs| runs.is_empty()) {
                break;
            }
            if Instant::now() >= deadline
                && let Ok(mut runs) = self.runs.lock()
            {
                for run in runs.values_mut() {
                    run.stop(Stopping::Leaving, true);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.buckets.engines.purge(&self.engine).await;
        tracing::info!(engine = %self.engine, "left the fleet");
    }
}

/// Sources that produce the same frames when started again.
const REPLAYABLE_SOURCES: [&str; 3] = ["source.video_file", "source.files", "source.synthetic"];

/// Failed starts or runs of one generation before the fleet gives up on it.
pub const MAX_ATTEMPTS: u32 = 3;

/// The wait before a failed generation is tried again, times its attempts so far.
const RETRY_BACKOFF_MS: u64 = 10_000;

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
