//! The fleet's four JetStream key-value buckets (see [`super::fleet`] for what each holds):
//! opening or creating them, and reading them whole.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;

use super::fleet_records::{DesiredPipeline, EngineRecord};

/// A fleet error, in one line.
#[derive(Debug)]
pub struct FleetError(pub String);

impl std::fmt::Display for FleetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Key names the buckets accept for pipeline and engine ids, and bucket name prefixes.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

/// The fleet's buckets.
pub struct Buckets {
    /// Pipeline id → [`DesiredPipeline`]; the revision is the generation.
    pub desired: kv::Store,
    /// Pipeline id → [`super::fleet_records::Lease`], kept at most a lease.
    pub leases: kv::Store,
    /// Engine id → [`EngineRecord`], kept at most a lease.
    pub engines: kv::Store,
    /// Pipeline id → [`super::fleet_records::Outcome`].
    pub outcomes: kv::Store,
}

impl Buckets {
    /// Opens `<prefix>-desired`, `-leases`, `-engines` and `-outcomes`, creating the missing
    /// ones (leases and engine records expire after `lease`).
    pub async fn open(
        jetstream: &jetstream::Context,
        prefix: &str,
        lease: Duration,
    ) -> Result<Self, FleetError> {
        Ok(Self {
            desired: bucket(jetstream, &format!("{prefix}-desired"), Duration::ZERO).await?,
            leases: bucket(jetstream, &format!("{prefix}-leases"), lease).await?,
            engines: bucket(jetstream, &format!("{prefix}-engines"), lease).await?,
            outcomes: bucket(jetstream, &format!("{prefix}-outcomes"), Duration::ZERO).await?,
        })
    }

    /// Every desired pipeline with its generation.
    pub async fn desired_pipelines(
        &self,
    ) -> Result<HashMap<String, (u64, DesiredPipeline)>, FleetError> {
        let mut desired = HashMap::new();
        for key in keys(&self.desired).await? {
            if let Some(entry) = live_entry(&self.desired, &key).await?
                && let Ok(pipeline) = serde_json::from_slice::<DesiredPipeline>(&entry.value)
            {
                desired.insert(key, (entry.revision, pipeline));
            }
        }
        Ok(desired)
    }

    /// Every live engine's record, by id.
    pub async fn engine_records(&self) -> Result<Vec<EngineRecord>, FleetError> {
        let mut engines = Vec::new();
        for key in keys(&self.engines).await? {
            if let Some(entry) = live_entry(&self.engines, &key).await?
                && let Ok(record) = serde_json::from_slice::<EngineRecord>(&entry.value)
            {
                engines.push(record);
            }
        }
        engines.sort_by(|a, b| a.engine.cmp(&b.engine));
        Ok(engines)
    }
}

/// The live entry of `key` (none when absent, deleted, purged or expired).
pub async fn live_entry(store: &kv::Store, key: &str) -> Result<Option<kv::Entry>, FleetError> {
    let entry = store
        .entry(key)
        .await
        .map_err(|e| FleetError(format!("reading {key} of bucket {}: {e}", store.name)))?;
    Ok(entry.filter(|e| e.operation == kv::Operation::Put))
}

/// The keys of `store` that hold a message (a value, or the marker of a deletion).
///
/// Read from the stream's subject counts in one request: async-nats's `keys()` makes a consumer
/// that waits for as many messages as were pending when it was made, so it never ends when one
/// of them expires first (engine records and leases expire all the time), and a fleet view
/// hung until the client gave up.
async fn keys(store: &kv::Store) -> Result<Vec<String>, FleetError> {
    let listing = |e: &dyn std::fmt::Display| {
        FleetError(format!("listing the keys of bucket {}: {e}", store.name))
    };
    let prefix = format!("$KV.{}.", store.name);
    let mut subjects = store
        .stream
        .info_with_subjects(format!("{prefix}>"))
        .await
        .map_err(|e| listing(&e))?;
    let mut found = Vec::new();
    while let Some(subject) = subjects.next().await {
        let (subject, _count) = subject.map_err(|e| listing(&e))?;
        if let Some(key) = subject.strip_prefix(&prefix) {
            found.push(key.to_string());
        }
    }
    Ok(found)
}

/// Opens bucket `name`, creating it when missing.
async fn bucket(
    jetstream: &jetstream::Context,
    name: &str,
    max_age: Duration,
) -> Result<kv::Store, FleetError> {
    if let Ok(store) = jetstream.get_key_value(name).await {
        // Every engine must agree on how long a lease lasts: one computing its renewals from a
        // longer lease than the bucket keeps would lose its leases while it still runs them.
        let kept = store.stream.cached_info().config.max_age;
        if kept != max_age {
            return Err(FleetError(format!(
                "bucket {name} keeps entries {} s, but this engine was started with {} s \
                 (--fleet-lease-s must be the same on every engine of a fleet)",
                kept.as_secs(),
                max_age.as_secs()
            )));
        }
        return Ok(store);
    }
    // The bucket's stream made here, with the key-value conventions: async-nats's
    // create_key_value first asks for the account's limits in a shape that Debian's
    // nats-server 2.9 does not answer in.
    let creating = |e: &dyn std::fmt::Display| FleetError(format!("creating bucket {name}: {e}"));
    jetstream
        .get_or_create_stream(jetstream::stream::Config {
            name: format!("KV_{name}"),
            subjects: vec![format!("$KV.{name}.>")],
            max_messages_per_subject: 1,
            max_age,
            storage: jetstream::stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: jetstream::stream::DiscardPolicy::New,
            num_replicas: 1,
            ..Default::default()
        })
        .await
        .map_err(|e| creating(&e))?;
    jetstream
        .get_key_value(name)
        .await
        .map_err(|e| creating(&e))
}
