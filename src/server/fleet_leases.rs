//! The runs an engine holds in the fleet, and their leases (see [`super::fleet`]): renewal on a
//! timer of its own, a local watchdog that aborts a run before its lease can lapse, and handing
//! a lease back only once its run has ended.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;

use super::fleet::Fleet;
use super::fleet_buckets::{FleetError, live_entry};
use super::fleet_records::Lease;
use super::http::now;
use crate::runtime::metrics::MetricsReport;
use crate::runtime::pipeline::Pipeline;

/// Why this engine asked one of its runs to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stopping {
    /// Its desired state was removed or changed: no outcome is recorded.
    Unwanted,
    /// The engine is leaving the fleet: a run that ended by itself still records its outcome.
    Leaving,
    /// Its lease was lost or could not be renewed in time: it was aborted and the lease is no
    /// longer this engine's to hand back.
    LeaseLost,
}

/// One pipeline this engine runs (or is stopping).
pub(super) struct FleetRun {
    pub(super) generation: u64,
    pub(super) lease_revision: u64,
    /// When the last renewal that succeeded was sent (the lease lasts from then).
    pub(super) renewed: Instant,
    pub(super) started_at: String,
    pub(super) pipeline: Arc<Mutex<Option<Pipeline>>>,
    pub(super) stopping: Option<(Stopping, Instant)>,
}

impl FleetRun {
    pub(super) fn report(&self) -> Option<MetricsReport> {
        self.pipeline.lock().ok()?.as_ref().map(Pipeline::report)
    }

    pub(super) fn is_finished(&self) -> bool {
        self.pipeline
            .lock()
            .ok()
            .is_none_or(|p| p.as_ref().is_none_or(Pipeline::is_finished))
    }

    /// Asks the run to stop: drain (`abort` false) or drop what is queued.
    pub(super) fn stop(&mut self, why: Stopping, abort: bool) {
        if let Ok(pipeline) = self.pipeline.lock()
            && let Some(pipeline) = pipeline.as_ref()
        {
            let handle = pipeline.stop_handle();
            if abort { handle.abort() } else { handle.stop() }
        }
        if self.stopping.is_none() || why == Stopping::LeaseLost {
            self.stopping = Some((why, Instant::now()));
        }
    }
}

/// What one renewal found.
enum Renewal {
    Renewed(u64),
    /// Another engine (or no one) holds the lease now.
    Taken,
    /// No answer, or an error: the lease may still be ours.
    Failed,
}

/// How long a run asked to stop may drain before it is aborted.
const DRAIN: Duration = Duration::from_secs(10);

impl Fleet {
    /// Renews the leases every tick until the task is dropped.
    pub(super) async fn renew_forever(self: Arc<Self>) {
        loop {
            self.renew_leases().await;
            tokio::time::sleep(self.tick).await;
        }
    }

    /// Renews every lease this engine holds (each call bounded by a tick). A run whose lease
    /// another engine holds now is aborted; so is one whose last renewal is so old that the
    /// lease could lapse before the next tick (the watchdog), and one that drained too long.
    pub(super) async fn renew_leases(&self) {
        let held: Vec<(String, u64, u64)> = self
            .runs
            .lock()
            .map(|runs| {
                runs.iter()
                    .filter(|(_, run)| {
                        run.stopping
                            .is_none_or(|(why, _)| why != Stopping::LeaseLost)
                    })
                    .map(|(id, run)| (id.clone(), run.generation, run.lease_revision))
                    .collect()
            })
            .unwrap_or_default();
        for (id, generation, revision) in held {
            let sent = Instant::now();
            let update = self
                .buckets
                .leases
                .update(&id, self.lease_value(generation), revision);
            let renewed = match tokio::time::timeout(self.tick, update).await {
                Ok(Ok(revision)) => Renewal::Renewed(revision),
                Ok(Err(error)) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    // Our write may have landed with its acknowledgement lost: adopt the
                    // lease if it still names this engine and generation (read within a tick
                    // too, so the watchdog below is never held up).
                    let read = tokio::time::timeout(self.tick, self.own_revision(&id, generation))
                        .await
                        .unwrap_or_else(|_| Err(FleetError("no answer in a tick".into())));
                    match read {
                        Ok(Some(revision)) => Renewal::Renewed(revision),
                        Ok(None) => Renewal::Taken,
                        Err(error) => {
                            // Not knowing is not losing: the watchdog aborts the run if this
                            // lasts until the lease could lapse.
                            tracing::warn!(pipeline = %id, "fleet: lease renewal unconfirmed: reading the lease: {error}");
                            Renewal::Failed
                        }
                    }
                }
                Ok(Err(error)) => {
                    tracing::warn!(pipeline = %id, "fleet: lease renewal failed: {error}");
                    Renewal::Failed
                }
                Err(_) => {
                    tracing::warn!(pipeline = %id, "fleet: lease renewal got no answer in a tick");
                    Renewal::Failed
                }
            };
            let Ok(mut runs) = self.runs.lock() else {
                return;
            };
            let Some(run) = runs.get_mut(&id) else {
                continue;
            };
            match renewed {
                Renewal::Renewed(revision) => {
                    run.lease_revision = revision;
                    run.renewed = sent;
                }
                Renewal::Taken => {
                    tracing::error!(pipeline = %id, "fleet: another engine holds the lease; aborting");
                    run.stop(Stopping::LeaseLost, true);
                }
                Renewal::Failed => {} // the watchdog decides
            }
        }
        self.watchdog();
    }

    /// Aborts runs whose lease could lapse before the next renewal, and runs that drained
    /// longer than [`DRAIN`].
    fn watchdog(&self) {
        let Ok(mut runs) = self.runs.lock() else {
            return;
        };
        for (id, run) in runs.iter_mut() {
            let lost = run
                .stopping
                .is_some_and(|(why, _)| why == Stopping::LeaseLost);
            if !lost && run.renewed.elapsed() + 2 * self.tick >= self.lease {
                tracing::error!(
                    pipeline = %id,
                    "fleet: lease not renewed for {:.1} s; aborting the run before it can lapse",
                    run.renewed.elapsed().as_secs_f64()
                );
                run.stop(Stopping::LeaseLost, true);
            } else if let Some((_, since)) = run.stopping
                && since.elapsed() > DRAIN
            {
                run.stop(Stopping::Unwanted, true);
            }
        }
    }

    /// The lease's current revision when it still names this engine and `generation`; None
    /// when it is gone or names another; an error when it could not be read (which says
    /// nothing about who holds it).
    pub(super) async fn own_revision(
        &self,
        id: &str,
        generation: u64,
    ) -> Result<Option<u64>, FleetError> {
        let Some(entry) = live_entry(&self.buckets.leases, id).await? else {
            return Ok(None);
        };
        let mine = serde_json::from_slice::<Lease>(&entry.value)
            .is_ok_and(|lease| lease.engine == self.engine && lease.generation == generation);
        Ok(mine.then_some(entry.revision))
    }

    /// Hands a lease back (only if it is still at `revision`, i.e. ours).
    pub(super) async fn release(&self, id: &str, revision: u64) {
        if let Err(error) = self
            .buckets
            .leases
            .purge_expect_revision(id, Some(revision))
            .await
        {
            tracing::debug!(pipeline = %id, "fleet: lease not handed back ({error}); it lapses");
        }
    }

    pub(super) fn lease_value(&self, generation: u64) -> bytes::Bytes {
        let lease = Lease {
            engine: self.engine.clone(),
            generation,
            claimed_at: now(),
        };
        serde_json::to_vec(&lease).unwrap_or_default().into()
    }
}
