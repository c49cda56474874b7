//! The topic map: every topic Flywheel uses, its record schema, key and
//! defaults, plus the TOML overrides operators set per deployment
//! (`deploy/topics.toml`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::codec::RecordKind;
use crate::error::{Error, Result};

/// A logical topic of the flywheel. Data flows one way, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    /// collector → rewarder
    Interactions,
    /// rewarder → (operators): interactions that arrived after their window closed
    InteractionsLate,
    /// rewarder → lake-writer
    Rewards,
    /// rewarder → gate
    RewardMetrics,
    /// lake-writer → trigger
    Shards,
    /// trigger → (operators)
    TriggerDecisions,
    /// trigger → trainer
    TrainRequests,
    /// trainer → gate
    ModelCandidates,
    /// gate → collector, trigger (compacted)
    ModelRegistry,
    /// every service → (operators)
    DeadLetters,
}

/// How the broker retires old records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CleanupPolicy {
    /// Delete by retention.
    Delete,
    /// Keep the latest record per key.
    Compact,
}

impl CleanupPolicy {
    /// The broker's `cleanup.policy` value.
    pub fn as_str(self) -> &'static str {
        match self {
            CleanupPolicy::Delete => "delete",
            CleanupPolicy::Compact => "compact",
        }
    }
}

impl Topic {
    /// Every topic, upstream first.
    pub const ALL: [Topic; 10] = [
        Topic::Interactions,
        Topic::InteractionsLate,
        Topic::Rewards,
        Topic::RewardMetrics,
        Topic::Shards,
        Topic::TriggerDecisions,
        Topic::TrainRequests,
        Topic::ModelCandidates,
        Topic::ModelRegistry,
        Topic::DeadLetters,
    ];

    /// Default (unprefixed) topic name.
    pub fn default_name(self) -> &'static str {
        match self {
            Topic::Interactions => "interactions",
            Topic::InteractionsLate => "interactions-late",
            Topic::Rewards => "rewards",
            Topic::RewardMetrics => "reward-metrics",
            Topic::Shards => "shards",
            Topic::TriggerDecisions => "trigger-decisions",
            Topic::TrainRequests => "train-requests",
            Topic::ModelCandidates => "model-candidates",
            Topic::ModelRegistry => "model-registry",
            Topic::DeadLetters => "dead-letters",
        }
    }

    /// Schema of the records on this topic.
    pub fn record_kind(self) -> RecordKind {
        match self {
            Topic::Interactions | Topic::InteractionsLate => RecordKind::Interaction,
            Topic::Rewards => RecordKind::Reward,
            Topic::RewardMetrics => RecordKind::RewardMetrics,
            Topic::Shards => RecordKind::ShardManifest,
            Topic::TriggerDecisions => RecordKind::TriggerDecision,
            Topic::TrainRequests => RecordKind::TrainRequest,
            Topic::ModelCandidates => RecordKind::ModelCandidate,
            Topic::ModelRegistry => RecordKind::RegistryEntry,
            Topic::DeadLetters => RecordKind::DeadLetter,
        }
    }

    /// Record fields that form the Kafka key, joined with `/`; empty when the
    /// key is carried over from elsewhere (dead letters keep the original key).
    pub fn key_fields(self) -> &'static [&'static str] {
        match self {
            Topic::Interactions | Topic::InteractionsLate | Topic::Rewards => &["suggestion_id"],
            Topic::RewardMetrics => &["tenant", "model_id", "adapter_version"],
            Topic::Shards => &["tenant"],
            Topic::TriggerDecisions | Topic::ModelCandidates | Topic::ModelRegistry => &["tenant", "base_model"],
            Topic::TrainRequests => &["request_id"],
            Topic::DeadLetters => &[],
        }
    }

    /// The Kafka key of a record of this topic in JSON form: its
    /// [`key_fields`](Topic::key_fields) joined with `/` (a null or missing
    /// field as an empty string, a number as its decimal text); `None` for a
    /// topic whose key is carried over (dead letters).
    pub fn key_of_json(self, json: &serde_json::Value) -> Option<String> {
        let fields = self.key_fields();
        if fields.is_empty() {
            return None;
        }
        let parts: Vec<String> = fields
            .iter()
            .map(|f| match json.get(f) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            })
            .collect();
        Some(parts.join("/"))
    }

    /// Refuses a record type of another kind than this topic carries.
    pub fn check_kind<R: crate::AvroRecord>(self) -> Result<()> {
        if self.record_kind() != R::KIND {
            return Err(Error::WrongKind { expected: self.record_kind(), found: R::KIND });
        }
        Ok(())
    }

    /// The Kafka key of a typed record of this topic (see
    /// [`key_of_json`](Topic::key_of_json)). For control-plane records:
    /// it goes through a JSON value.
    pub fn key_of<R: serde::Serialize>(self, record: &R) -> Result<Option<String>> {
        if self.key_fields().is_empty() {
            return Ok(None);
        }
        let json = serde_json::to_value(record)
            .map_err(|e| Error::Encode { kind: self.record_kind(), detail: format!("reading its key fields: {e}") })?;
        Ok(self.key_of_json(&json))
    }

    /// Default partition count. High-volume topics get several; control-plane
    /// topics one, so their order is total.
    pub fn default_partitions(self) -> i32 {
        match self {
            Topic::Interactions | Topic::Rewards => 6,
            Topic::InteractionsLate | Topic::RewardMetrics | Topic::DeadLetters => 3,
            _ => 1,
        }
    }

    /// Default cleanup policy: only the registry is compacted.
    pub fn default_cleanup(self) -> CleanupPolicy {
        match self {
            Topic::ModelRegistry => CleanupPolicy::Compact,
            _ => CleanupPolicy::Delete,
        }
    }

    /// Looks a topic up by its default name.
    pub fn from_default_name(name: &str) -> Option<Topic> {
        Topic::ALL.into_iter().find(|t| t.default_name() == name)
    }
}

/// The `--topics-config` flag every binary shares.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TopicsArgs {
    /// Topic layout file (prefix, partitions, replication, retention); the built-in map when absent.
    #[arg(long = "topics-config", env = "FLYWHEEL_TOPICS_CONFIG", global = true)]
    pub topics_config: Option<std::path::PathBuf>,
}

impl TopicsArgs {
    /// The layout from the file, or the built-in defaults.
    pub fn load(&self) -> Result<TopicsConfig> {
        match &self.topics_config {
            Some(path) => TopicsConfig::load(path),
            None => Ok(TopicsConfig::default()),
        }
    }
}

/// Per-topic overrides in the TOML file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicOverride {
    /// Partition count.
    pub partitions: Option<i32>,
    /// `retention.ms`; -1 keeps forever.
    pub retention_ms: Option<i64>,
    /// Cleanup policy.
    pub cleanup_policy: Option<CleanupPolicy>,
}

/// Topic layout of one deployment (`deploy/topics.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    /// Prefix for every topic name (e.g. `prod.`), so environments can share a cluster.
    #[serde(default)]
    pub prefix: String,
    /// Replication factor for created topics (1 for the local broker, ≥ 3 in production).
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// Overrides keyed by default topic name.
    #[serde(default)]
    pub topics: BTreeMap<String, TopicOverride>,
}

fn default_replication() -> i32 {
    1
}

impl Default for TopicsConfig {
    fn default() -> Self {
        TopicsConfig { prefix: String::new(), replication_factor: 1, topics: BTreeMap::new() }
    }
}

/// A fully resolved topic: what `flywheel topics create` asks the broker for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// Logical topic.
    pub topic: Topic,
    /// Actual name, prefix included.
    pub name: String,
    /// Partitions.
    pub partitions: i32,
    /// Replication factor.
    pub replication_factor: i32,
    /// Cleanup policy.
    pub cleanup_policy: CleanupPolicy,
    /// Retention, if overridden.
    pub retention_ms: Option<i64>,
}

impl TopicsConfig {
    /// Reads and validates a TOML topics file.
    pub fn load(path: &Path) -> Result<TopicsConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let config: TopicsConfig =
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        config.validate()?;
        Ok(config)
    }

    /// Rejects unknown topic names and impossible numbers.
    pub fn validate(&self) -> Result<()> {
        for (name, o) in &self.topics {
            if Topic::from_default_name(name).is_none() {
                let known: Vec<_> = Topic::ALL.iter().map(|t| t.default_name()).collect();
                return Err(Error::Config(format!(
                    "unknown topic '{name}' in topics config; known: {}",
                    known.join(", ")
                )));
            }
            if let Some(p) = o.partitions
                && p < 1
            {
                return Err(Error::Config(format!("topic '{name}': partitions must be >= 1, got {p}")));
            }
        }
        if self.replication_factor < 1 {
            return Err(Error::Config(format!("replication_factor must be >= 1, got {}", self.replication_factor)));
        }
        if !self.prefix.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
            return Err(Error::Config(format!("topic prefix '{}' may only contain [a-zA-Z0-9._-]", self.prefix)));
        }
        Ok(())
    }

    /// Actual name of a topic under this configuration.
    pub fn name(&self, topic: Topic) -> String {
        format!("{}{}", self.prefix, topic.default_name())
    }

    /// The resolved spec of one topic.
    pub fn spec(&self, topic: Topic) -> TopicSpec {
        let o = self.topics.get(topic.default_name()).cloned().unwrap_or_default();
        TopicSpec {
            topic,
            name: self.name(topic),
            partitions: o.partitions.unwrap_or(topic.default_partitions()),
            replication_factor: self.replication_factor,
            cleanup_policy: o.cleanup_policy.unwrap_or(topic.default_cleanup()),
            retention_ms: o.retention_ms,
        }
    }

    /// Specs of every topic, upstream first.
    pub fn specs(&self) -> Vec<TopicSpec> {
        Topic::ALL.into_iter().map(|t| self.spec(t)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_and_unknown_topics_are_rejected() {
        let c: TopicsConfig =
            toml::from_str("prefix = \"prod.\"\nreplication_factor = 3\n[topics.interactions]\npartitions = 12\n")
                .unwrap();
        c.validate().unwrap();
        let s = c.spec(Topic::Interactions);
        assert_eq!((s.name.as_str(), s.partitions, s.replication_factor), ("prod.interactions", 12, 3));
        assert_eq!(c.spec(Topic::ModelRegistry).cleanup_policy, CleanupPolicy::Compact);

        let bad: TopicsConfig = toml::from_str("[topics.interaction]\npartitions = 2\n").unwrap();
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("unknown topic 'interaction'"), "{err}");
        let bad: TopicsConfig = toml::from_str("prefix = \"../x\"\n").unwrap();
        assert!(bad.validate().is_err());
    }

    fn fixture<R: crate::AvroRecord>(name: &str) -> R {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/fixtures").join(name);
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }

    #[test]
    fn typed_keys_are_the_key_fields_joined() {
        use crate::records::{DeadLetter, RegistryEntry, RewardMetrics, TrainRequest};
        let entry: RegistryEntry = fixture("registry_entry.canary.json");
        let key = Topic::ModelRegistry.key_of(&entry).unwrap();
        assert_eq!(key, Some(format!("{}/{}", entry.tenant, entry.base_model)));
        let request: TrainRequest = fixture("train_request.reinforce.json");
        assert_eq!(Topic::TrainRequests.key_of(&request).unwrap(), Some(request.request_id.clone()));
        let mut window: RewardMetrics = fixture("reward_metrics.window.json");
        window.adapter_version = None;
        let key = Topic::RewardMetrics.key_of(&window).unwrap().unwrap();
        assert_eq!(key, format!("{}/{}/", window.tenant, window.model_id), "a missing field is an empty part");
        let letter: DeadLetter = fixture("dead_letter.malformed.json");
        assert_eq!(Topic::DeadLetters.key_of(&letter).unwrap(), None, "dead letters carry the original key");
    }

    #[test]
    fn a_topic_refuses_records_of_another_kind() {
        use crate::records::{RegistryEntry, Reward};
        // The Publisher's first check (no Kafka client here: librdkafka
        // hangs under libfaketime, where this test also runs).
        let err = Topic::Rewards.check_kind::<RegistryEntry>().unwrap_err();
        assert!(matches!(err, Error::WrongKind { .. }), "{err}");
        Topic::Rewards.check_kind::<Reward>().unwrap();
    }

    #[test]
    fn the_shipped_production_layout_loads() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/topics.toml");
        let c = TopicsConfig::load(&path).unwrap();
        assert_eq!(c.replication_factor, 3);
        assert_eq!(c.spec(Topic::Interactions).partitions, 24);
        assert_eq!(c.spec(Topic::Shards).retention_ms, Some(-1));
        assert_eq!(c.spec(Topic::ModelRegistry).cleanup_policy, CleanupPolicy::Compact);
    }
}
