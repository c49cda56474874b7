//! Which record a schema describes: the kind enum, its schema files and
//! their released history. Its own module so both the codec and the error
//! type can name a kind without depending on each other.

/// Every record type with a schema in `schemas/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// `schemas/interaction.avsc`
    Interaction,
    /// `schemas/reward.avsc`
    Reward,
    /// `schemas/reward_metrics.avsc`
    RewardMetrics,
    /// `schemas/shard_manifest.avsc`
    ShardManifest,
    /// `schemas/trigger_decision.avsc`
    TriggerDecision,
    /// `schemas/train_request.avsc`
    TrainRequest,
    /// `schemas/model_candidate.avsc`
    ModelCandidate,
    /// `schemas/registry_entry.avsc`
    RegistryEntry,
    /// `schemas/dead_letter.avsc`
    DeadLetter,
}

macro_rules! schema_file {
    ($file:literal) => {
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../schemas/", $file))
    };
}

impl RecordKind {
    /// All kinds, in schema-file order.
    pub const ALL: [RecordKind; 9] = [
        RecordKind::Interaction,
        RecordKind::Reward,
        RecordKind::RewardMetrics,
        RecordKind::ShardManifest,
        RecordKind::TriggerDecision,
        RecordKind::TrainRequest,
        RecordKind::ModelCandidate,
        RecordKind::RegistryEntry,
        RecordKind::DeadLetter,
    ];

    /// File stem of the schema under `schemas/` (and its history folder).
    pub fn file_stem(self) -> &'static str {
        match self {
            Self::Interaction => "interaction",
            Self::Reward => "reward",
            Self::RewardMetrics => "reward_metrics",
            Self::ShardManifest => "shard_manifest",
            Self::TriggerDecision => "trigger_decision",
            Self::TrainRequest => "train_request",
            Self::ModelCandidate => "model_candidate",
            Self::RegistryEntry => "registry_entry",
            Self::DeadLetter => "dead_letter",
        }
    }

    /// The current (reader) schema text.
    pub fn current_schema(self) -> &'static str {
        match self {
            Self::Interaction => schema_file!("interaction.avsc"),
            Self::Reward => schema_file!("reward.avsc"),
            Self::RewardMetrics => schema_file!("reward_metrics.avsc"),
            Self::ShardManifest => schema_file!("shard_manifest.avsc"),
            Self::TriggerDecision => schema_file!("trigger_decision.avsc"),
            Self::TrainRequest => schema_file!("train_request.avsc"),
            Self::ModelCandidate => schema_file!("model_candidate.avsc"),
            Self::RegistryEntry => schema_file!("registry_entry.avsc"),
            Self::DeadLetter => schema_file!("dead_letter.avsc"),
        }
    }

    /// Every released version of the schema, oldest first
    /// (`schemas/history/<stem>/v<N>.avsc`). Records written with any of them
    /// stay readable.
    pub fn history(self) -> &'static [&'static str] {
        match self {
            Self::Interaction => &[schema_file!("history/interaction/v1.avsc")],
            Self::Reward => &[schema_file!("history/reward/v1.avsc")],
            Self::RewardMetrics => {
                &[schema_file!("history/reward_metrics/v1.avsc"), schema_file!("history/reward_metrics/v2.avsc")]
            }
            Self::ShardManifest => {
                &[schema_file!("history/shard_manifest/v1.avsc"), schema_file!("history/shard_manifest/v2.avsc")]
            }
            Self::TriggerDecision => &[schema_file!("history/trigger_decision/v1.avsc")],
            Self::TrainRequest => &[
                schema_file!("history/train_request/v1.avsc"),
                schema_file!("history/train_request/v2.avsc"),
                schema_file!("history/train_request/v3.avsc"),
            ],
            Self::ModelCandidate => &[schema_file!("history/model_candidate/v1.avsc")],
            Self::RegistryEntry => &[schema_file!("history/registry_entry/v1.avsc")],
            Self::DeadLetter => &[schema_file!("history/dead_letter/v1.avsc")],
        }
    }
}

impl std::fmt::Display for RecordKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.file_stem())
    }
}
