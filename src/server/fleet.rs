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
//! Every tick (a sixth of the lease) an engine renews its leases, stops the runs whose desired
//! state went away or changed, records the runs that ended, publishes its record, and claims
//! pipelines nobody holds while it has capacity, and while no live engine runs fewer than it
//! does (so a fleet started together shares the work evenly). A lease it cannot renew is given
//! up before it can lapse: the run stops when its last renewal is older than the lease less one
//! tick, so two engines never run one pipeline knowingly. A pipeline taken over starts again
//! from its beginning under the same run id (the generation), so `sink.nats` sends its
//! results under the same message ids and JetStream keeps one copy of each.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};

pub use super::fleet_buckets::{Buckets, FleetError, live_entry, valid_id};
pub use super::fleet_records::{
    DesiredPipeline, EngineRecord, EngineRun, FleetSettings, FleetState, Lease, Outcome,
};
use super::http::now;
use super::state::AppState;
use crate::runtime::metrics::MetricsReport;
use crate::runtime::pipeline::{Pipeline, RunMode};

/// One pipeline this engine runs.
struct FleetRun {
    generation: u64,
    lease_revision: u64,
    renewed: Instant,
    started_at: String,
    pipeline: Arc<Mutex<Option<Pipeline>>>,
}

impl FleetRun {
    fn report(&self) -> Option<MetricsReport> {
        self.pipeline.lock().ok()?.as_ref().map(Pipeline::report)
    }

    fn is_finished(&self) -> bool {
        self.pipeline
            .lock()
            .ok()
            .is_none_or(|p| p.as_ref().is_none_or(Pipeline::is_finished))
    }
}

/// This engine's part of the fleet.
pub struct Fleet {
    pub engine: String,
    pub capacity: usize,
    lease: Duration,
    tick: Duration,
    api: String,
    started_at: String,
    pub buckets: Buckets,
    runs: Mutex<HashMap<String, FleetRun>>,
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
                .unwrap_or_else(|_| "engine".into()),
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
        let client = tokio::time::timeout(
            Duration::from_secs(10),
            async_nats::ConnectOptions::new()
                .name(format!("inspectflow-engine-{engine}"))
                .max_reconnects(None)
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
        let lease = Duration::from_secs(settings.lease_s);
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
            lease,
            tick: (lease / 6).max(Duration::from_millis(200)),
            api,
            started_at: now(),
            buckets,
            runs: Mutex::new(HashMap::new()),
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
    }

    /// One tick: renew, stop, record, report, claim.
    async fn reconcile(&self, state: &Arc<AppState>) -> Result<(), FleetError> {
        self.renew_leases().await;
        let desired = self.buckets.desired_pipelines().await;
        self.settle_runs(desired.as_ref().ok()).await;
        self.report().await?;
        let desired = desired?;
        self.claim(state, &desired).await
    }

    /// Renews every lease this engine holds; a run whose lease was taken is aborted, and one
    /// whose lease could not be renewed for almost a lease is stopped (another engine may take
    /// it once it lapses).
    async fn renew_leases(&self) {
        let held: Vec<(String, u64, u64)> = self
            .runs
            .lock()
            .map(|runs| {
                runs.iter()
                    .map(|(id, run)| (id.clone(), run.generation, run.lease_revision))
                    .collect()
            })
            .unwrap_or_default();
        for (id, generation, revision) in held {
            let lease = self.lease_value(generation);
            let renewed = self.buckets.leases.update(&id, lease, revision).await;
            let Ok(mut runs) = self.runs.lock() else {
                return;
            };
            let Some(run) = runs.get_mut(&id) else {
                continue;
            };
            match renewed {
                Ok(revision) => {
                    run.lease_revision = revision;
                    run.renewed = Instant::now();
                }
                Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    tracing::error!(pipeline = %id, "fleet: lost the lease to another engine; stopping");
                    if let Some(run) = runs.remove(&id) {
                        stop_in_background(id, run, true);
                    }
                }
                Err(error) if run.renewed.elapsed() + self.tick >= self.lease => {
                    tracing::error!(
                        pipeline = %id,
                        "fleet: cannot renew the lease ({error}); stopping before it lapses"
                    );
                    if let Some(run) = runs.remove(&id) {
                        stop_in_background(id, run, false);
                    }
                }
                Err(error) => {
                    tracing::warn!(pipeline = %id, "fleet: lease renewal failed: {error}")
                }
            }
        }
    }

    /// Records runs that ended by themselves and hands their leases back; stops runs whose
    /// desired state is gone or changed (`desired` is None when it could not be read).
    async fn settle_runs(&self, desired: Option<&HashMap<String, (u64, DesiredPipeline)>>) {
        let mut ended = Vec::new();
        let mut unwanted = Vec::new();
        if let Ok(mut runs) = self.runs.lock() {
            let ids: Vec<String> = runs.keys().cloned().collect();
            for id in ids {
                let Some(run) = runs.get(&id) else { continue };
                let still_wanted =
                    desired.is_none_or(|d| d.get(&id).is_some_and(|(g, _)| *g == run.generation));
                if run.is_finished() {
                    if let Some(run) = runs.remove(&id) {
                        ended.push((id, run));
                    }
                } else if !still_wanted && let Some(run) = runs.remove(&id) {
                    unwanted.push((id, run));
                }
            }
        }
        for (id, run) in ended {
            let pipeline = run.pipeline.lock().ok().and_then(|mut p| p.take());
            let outcome = match pipeline {
                Some(pipeline) => tokio::task::spawn_blocking(move || pipeline.wait())
                    .await
                    .ok(),
                None => None,
            };
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
                None => (FleetState::Failed, Some("the run was lost".into()), None),
            };
            tracing::info!(pipeline = %id, generation = run.generation, ?state, "fleet: run ended");
            self.record_outcome(&id, run.generation, state, failure, metrics)
                .await;
            self.release(&id, run.lease_revision).await;
        }
        for (id, run) in unwanted {
            tracing::info!(pipeline = %id, "fleet: desired state removed or changed; stopping");
            let revision = run.lease_revision;
            stop_in_background(id.clone(), run, false);
            self.release(&id, revision).await;
        }
    }

    async fn record_outcome(
        &self,
        id: &str,
        generation: u64,
        state: FleetState,
        failure: Option<String>,
        metrics: Option<MetricsReport>,
    ) {
        let outcome = Outcome {
            generation,
            state,
            engine: self.engine.clone(),
            finished_at: now(),
            failure,
            metrics,
        };
        let value = serde_json::to_vec(&outcome).unwrap_or_default();
        if let Err(error) = self.buckets.outcomes.put(id, value.into()).await {
            tracing::error!(pipeline = %id, "fleet: cannot record the outcome: {error}");
        }
    }

    /// Hands a lease back (only if still ours).
    async fn release(&self, id: &str, revision: u64) {
        if let Err(error) = self
            .buckets
            .leases
            .purge_expect_revision(id, Some(revision))
            .await
        {
            tracing::debug!(pipeline = %id, "fleet: lease not handed back ({error}); it lapses");
        }
    }

    fn lease_value(&self, generation: u64) -> bytes::Bytes {
        let lease = Lease {
            engine: self.engine.clone(),
            generation,
            claimed_at: now(),
        };
        serde_json::to_vec(&lease).unwrap_or_default().into()
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
            let (generation, pipeline) = &desired[id];
            if live_entry(&self.buckets.leases, id).await?.is_some() {
                continue;
            }
            if let Some(entry) = live_entry(&self.buckets.outcomes, id).await?
                && serde_json::from_slice::<Outcome>(&entry.value)
                    .is_ok_and(|o| o.generation == *generation)
            {
                continue;
            }
            let Ok(revision) = self
                .buckets
                .leases
                .create(id, self.lease_value(*generation))
                .await
            else {
                continue; // another engine was faster
            };
            self.start(state, id, *generation, revision, pipeline).await;
        }
        Ok(())
    }

    /// Starts a claimed pipeline; one that cannot start is recorded as failed.
    async fn start(
        &self,
        state: &Arc<AppState>,
        id: &str,
        generation: u64,
        lease_revision: u64,
        desired: &DesiredPipeline,
    ) {
        let started = match super::pipelines::graph_from_value(state, id, &desired.graph) {
            Ok(mut graph) => {
                graph.name = id.to_string();
                state
                    .pipelines
                    .launch_run(graph, RunMode::Running, Some(format!("g{generation}")))
                    .await
            }
            Err(errors) => Err(errors.to_string()),
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
                            renewed: Instant::now(),
                            started_at: now(),
                            pipeline: Arc::new(Mutex::new(Some(pipeline))),
                        },
                    );
                }
            }
            Err(error) => {
                tracing::error!(pipeline = %id, "fleet: cannot start: {error}");
                self.record_outcome(id, generation, FleetState::Failed, Some(error), None)
                    .await;
                self.release(id, lease_revision).await;
            }
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

    /// Leaves the fleet: stops every run (draining), hands its leases back so that other
    /// engines take the pipelines over at once, and removes this engine's record.
    async fn leave(&self) {
        let runs: Vec<(String, FleetRun)> = self
            .runs
            .lock()
            .map(|mut runs| runs.drain().collect())
            .unwrap_or_default();
        for (id, run) in runs {
            let revision = run.lease_revision;
            let pipeline = run.pipeline.lock().ok().and_then(|mut p| p.take());
            if let Some(pipeline) = pipeline {
                let _ = tokio::task::spawn_blocking(move || stop_and_wait(pipeline, false)).await;
            }
            self.release(&id, revision).await;
        }
        let _ = self.buckets.engines.purge(&self.engine).await;
        tracing::info!(engine = %self.engine, "left the fleet");
    }
}

/// Stops a run off the async threads: `abort` drops what is queued (a lease taken by another
/// engine), otherwise it drains for up to 10 s.
fn stop_in_background(id: String, run: FleetRun, abort: bool) {
    let pipeline = run.pipeline.lock().ok().and_then(|mut p| p.take());
    if let Some(pipeline) = pipeline {
        std::thread::spawn(move || {
            stop_and_wait(pipeline, abort);
            tracing::info!(pipeline = %id, "fleet: stopped");
        });
    }
}

fn stop_and_wait(pipeline: Pipeline, abort: bool) {
    let handle = pipeline.stop_handle();
    if abort {
        handle.abort();
    } else {
        handle.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !pipeline.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !pipeline.is_finished() {
            handle.abort();
        }
    }
    pipeline.wait();
}
