//! Serving decisions: which base model and adapter a user gets, from the
//! compacted model-registry topic, with stable hash-based canary assignment.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use flywheel_core::codec::decode;
use flywheel_core::kafka::{ClientRole, KafkaArgs};
use flywheel_core::records::RegistryEntry;
use flywheel_core::runtime::Readiness;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::CollectorError;

/// Latest registry entry per (tenant, base model).
#[derive(Debug, Clone, Default)]
pub(crate) struct RegistryView {
    entries: Arc<RwLock<HashMap<(String, String), RegistryEntry>>>,
}

impl RegistryView {
    /// Keeps `entry` if it is newer (by revision) than what is held.
    pub(crate) fn apply(&self, entry: RegistryEntry) {
        let key = (entry.tenant.clone(), entry.base_model.clone());
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if entries.get(&key).is_none_or(|held| held.revision < entry.revision) {
            entries.insert(key, entry);
        }
    }

    /// The entry for a tenant and base model, if any.
    pub(crate) fn get(&self, tenant: &str, base_model: &str) -> Option<RegistryEntry> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        entries.get(&(tenant.to_string(), base_model.to_string())).cloned()
    }
}

/// The answer of `GET /v1/route`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct RouteDecision {
    /// Base model to serve.
    pub model_id: String,
    /// Adapter to apply, or null for the base model alone.
    pub adapter_version: Option<String>,
    /// Where the adapter's PEFT files are.
    pub adapter_uri: Option<String>,
    /// `base` (no registry entry or no live adapter), `live` or `canary`;
    /// echo it back as `experiment_arm` in the shown event.
    pub experiment_arm: String,
    /// Registry revision the decision was made from (0 without an entry).
    pub registry_revision: i64,
}

/// A user's stable position in [0, 1) for one experiment: the first 8 bytes
/// of SHA-256(salt, pseudonymous user id). Changing the salt (the canary's
/// adapter version) re-draws the split for the next experiment.
pub(crate) fn bucket(salt: &str, pseudonymous_user_id: &str) -> f64 {
    let digest =
        Sha256::new().chain_update(salt.as_bytes()).chain_update([0]).chain_update(pseudonymous_user_id).finalize();
    let n = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    (n >> 11) as f64 / (1u64 << 53) as f64
}

/// Decides what to serve from an optional registry entry.
pub(crate) fn decide(entry: Option<&RegistryEntry>, base_model: &str, pseudonymous_user_id: &str) -> RouteDecision {
    let Some(entry) = entry else {
        return RouteDecision {
            model_id: base_model.to_string(),
            adapter_version: None,
            adapter_uri: None,
            experiment_arm: "base".into(),
            registry_revision: 0,
        };
    };
    let (adapter, arm) = match &entry.canary {
        Some(c) if bucket(&c.adapter.adapter_version, pseudonymous_user_id) < c.traffic_share => {
            (Some(&c.adapter), "canary")
        }
        _ => match &entry.live {
            Some(live) => (Some(live), "live"),
            None => (None, "base"),
        },
    };
    RouteDecision {
        model_id: entry.base_model.clone(),
        adapter_version: adapter.map(|a| a.adapter_version.clone()),
        adapter_uri: adapter.map(|a| a.adapter_uri.clone()),
        experiment_arm: arm.into(),
        registry_revision: entry.revision,
    }
}

/// Follows the registry topic from the beginning into `view`; marks the
/// `registry` readiness check once it has caught up with the end offsets seen
/// at start. Runs on a blocking thread until `shutdown`.
pub(crate) fn follow_registry(
    kafka: &KafkaArgs,
    topic: &str,
    view: RegistryView,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), CollectorError> {
    readiness.set("registry", false);
    // Assigned, never subscribed: the group id is only a required name.
    let config = kafka.client_config(&ClientRole::Consumer { group_id: "flywheel-collector-registry".into() })?;
    let consumer: BaseConsumer =
        config.create().map_err(|e| flywheel_core::Error::kafka("creating registry consumer", e))?;
    // Wait for the topic: the collector must start (and answer 503 from
    // readiness) even while the broker is still coming up.
    let partitions = loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        match consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            Ok(m) if m.topics().first().is_some_and(|t| !t.partitions().is_empty()) => {
                break m.topics()[0].partitions().len() as i32;
            }
            Ok(_) => tracing::warn!(topic, "registry topic missing; run `flywheel topics create`"),
            Err(e) => tracing::warn!(topic, error = %e, "registry metadata unavailable; retrying"),
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let mut assignment = TopicPartitionList::new();
    let mut targets = HashMap::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .map_err(|e| flywheel_core::Error::kafka("building registry assignment", e))?;
        let (low, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .map_err(|e| flywheel_core::Error::kafka("fetching registry watermarks", e))?;
        if high > low {
            targets.insert(p, high - 1);
        }
    }
    consumer.assign(&assignment).map_err(|e| flywheel_core::Error::kafka("assigning registry partitions", e))?;
    if targets.is_empty() {
        readiness.set("registry", true);
    }
    while !shutdown.is_cancelled() {
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else { continue };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "registry read failed; retrying");
                continue;
            }
        };
        match msg.payload().map(decode::<RegistryEntry>) {
            Some(Ok(entry)) => view.apply(entry),
            Some(Err(e)) => tracing::error!(offset = msg.offset(), error = %e, "undecodable registry entry skipped"),
            None => {} // a tombstone: compaction deletes the key; keep serving the last entry
        }
        if targets.get(&msg.partition()).is_some_and(|&t| msg.offset() >= t) {
            targets.remove(&msg.partition());
            if targets.is_empty() {
                tracing::info!("model registry loaded");
                readiness.set("registry", true);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_core::records::{AdapterRef, Canary};

    fn adapter(v: &str) -> AdapterRef {
        AdapterRef { adapter_version: v.into(), adapter_uri: format!("file:///a/{v}"), adapter_sha256: "00".into() }
    }

    #[test]
    fn canary_share_is_respected_and_stable() {
        let entry = RegistryEntry {
            tenant: "t".into(),
            base_model: "m".into(),
            revision: 3,
            live: Some(adapter("live-1")),
            canary: Some(Canary { adapter: adapter("cand-2"), traffic_share: 0.2, started_at: 0 }),
            history: vec![],
            updated_at: 0,
        };
        let users: Vec<String> = (0..5000).map(|i| format!("user-{i}")).collect();
        let canary = users.iter().filter(|u| decide(Some(&entry), "m", u).experiment_arm == "canary").count();
        assert!((850..1150).contains(&canary), "about 20% in canary, got {canary}");
        for u in users.iter().take(50) {
            assert_eq!(decide(Some(&entry), "m", u), decide(Some(&entry), "m", u));
        }
        let base = decide(None, "m", "u");
        assert_eq!((base.experiment_arm.as_str(), base.adapter_version), ("base", None));
    }

    #[test]
    fn older_revisions_never_replace_newer_ones() {
        let view = RegistryView::default();
        let mut e = RegistryEntry {
            tenant: "t".into(),
            base_model: "m".into(),
            revision: 5,
            live: Some(adapter("new")),
            canary: None,
            history: vec![],
            updated_at: 0,
        };
        view.apply(e.clone());
        e.revision = 4;
        e.live = Some(adapter("old"));
        view.apply(e);
        assert_eq!(view.get("t", "m").unwrap().live.unwrap().adapter_version, "new");
    }
}
