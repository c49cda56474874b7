//! Record types carried on Flywheel's topics.
//!
//! Each type mirrors one schema in `schemas/*.avsc` field for field; the Avro
//! codec ([`crate::codec`]) maps between the two, and the evolution test keeps
//! them honest. Timestamps are milliseconds since the Unix epoch (UTC).
//! The JSON form of every record is serde's: enums of records are externally
//! tagged with snake_case names (`{"shown": {...}}`), Avro enums use their
//! upper-case symbols.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, UTC.
pub type EpochMillis = i64;

/// One user interaction with an AI suggestion (topic `interactions`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interaction {
    /// Producer-assigned UUID; the idempotency key for client retries.
    pub event_id: String,
    /// When it happened on the client.
    pub event_time: EpochMillis,
    /// When the collector accepted it.
    pub received_time: EpochMillis,
    /// Tenant, from the authenticated token.
    pub tenant: String,
    /// Pseudonymous user id (HMAC of the product's id).
    pub user_id: String,
    /// Optional client session id.
    #[serde(default)]
    pub session_id: Option<String>,
    /// Suggestion the event is about; the Kafka key.
    pub suggestion_id: String,
    /// What happened.
    pub payload: InteractionPayload,
    /// Free-form attributes.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// The kind-specific part of an [`Interaction`]. Variant order is the Avro
/// union order: new kinds go at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InteractionPayload {
    /// A suggestion was shown.
    Shown(SuggestionShown),
    /// The user accepted it.
    Accepted(SuggestionAccepted),
    /// The user explicitly rejected it.
    Rejected(SuggestionRejected),
    /// It went away without an explicit decision.
    Dismissed(SuggestionDismissed),
    /// The user edited the text after accepting.
    Edited(SuggestionEdited),
    /// The user rated it.
    Rated(SuggestionRated),
    /// A follow-up action.
    FollowUp(FollowUp),
    /// The surrounding task completed.
    TaskCompleted(TaskCompleted),
}

impl InteractionPayload {
    /// Stable snake_case name of the kind, for metrics labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Shown(_) => "shown",
            Self::Accepted(_) => "accepted",
            Self::Rejected(_) => "rejected",
            Self::Dismissed(_) => "dismissed",
            Self::Edited(_) => "edited",
            Self::Rated(_) => "rated",
            Self::FollowUp(_) => "follow_up",
            Self::TaskCompleted(_) => "task_completed",
        }
    }
}

/// A suggestion was shown to the user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuggestionShown {
    /// Base model that produced it.
    pub model_id: String,
    /// Adapter version served; `None` for the base model.
    #[serde(default)]
    pub adapter_version: Option<String>,
    /// Experiment arm the user was routed to.
    #[serde(default)]
    pub experiment_arm: Option<String>,
    /// Product surface.
    pub surface: String,
    /// Prompt/context as the model saw it.
    pub prompt: String,
    /// The suggested completion.
    pub completion: String,
    /// Log-probability of the completion under the serving policy.
    #[serde(default)]
    pub behavior_logprob: Option<f64>,
    /// Request-to-display latency.
    pub latency_ms: i64,
}

/// The user accepted the suggestion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuggestionAccepted {
    /// Shown-to-accepted delay.
    pub time_to_accept_ms: i64,
}

/// The user explicitly rejected the suggestion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SuggestionRejected {
    /// Optional client reason code.
    #[serde(default)]
    pub reason: Option<String>,
}

/// The suggestion went away without an explicit decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SuggestionDismissed {
    /// Optional client reason code.
    #[serde(default)]
    pub reason: Option<String>,
}

/// The user edited the text after accepting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SuggestionEdited {
    /// Final text, when shareable.
    #[serde(default)]
    pub final_text: Option<String>,
    /// Levenshtein distance completion → final text, when computed client-side.
    #[serde(default)]
    pub edit_distance: Option<i64>,
}

/// An explicit rating.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuggestionRated {
    /// The rating, within `[scale_min, scale_max]`.
    pub score: f64,
    /// Lowest possible rating.
    pub scale_min: f64,
    /// Highest possible rating.
    pub scale_max: f64,
}

impl SuggestionRated {
    /// The rating mapped linearly onto `[-1, 1]`; `None` for a degenerate or
    /// violated scale.
    pub fn normalized(&self) -> Option<f64> {
        let span = self.scale_max - self.scale_min;
        let valid = span.is_finite() && span > 0.0 && (self.scale_min..=self.scale_max).contains(&self.score);
        if !valid {
            return None;
        }
        Some(2.0 * (self.score - self.scale_min) / span - 1.0)
    }
}

/// A follow-up action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FollowUp {
    /// What the user did.
    pub action: FollowUpAction,
    /// Optional free text.
    #[serde(default)]
    pub detail: Option<String>,
}

/// Kinds of follow-up action (Avro enum; unknown symbols read as `Other`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FollowUpAction {
    /// Asked for another suggestion.
    Regenerate,
    /// Undid the accepted suggestion.
    Undo,
    /// Copied the suggestion.
    Copy,
    /// Complained about it.
    Complaint,
    /// Thanked the assistant.
    Thanks,
    /// Anything else.
    Other,
}

/// The task the suggestion was part of completed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskCompleted {
    /// Shown-to-completion duration.
    pub duration_ms: i64,
    /// Whether it succeeded, when known.
    #[serde(default)]
    pub success: Option<bool>,
}

/// Source position of a derived record (see ARCHITECTURE.md, exactly-once).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lineage {
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Lowest contributing source offset.
    pub first_offset: i64,
    /// Source offset whose processing emitted the record.
    pub last_offset: i64,
}

/// Primary outcome of a shown suggestion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Outcome {
    /// Accepted.
    Accepted,
    /// Explicitly rejected.
    Rejected,
    /// Dismissed without decision.
    Dismissed,
    /// No response within the window.
    Ignored,
}

/// One suggestion's outcome and reward (topic `rewards`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reward {
    /// Deterministic id (tenant, suggestion, reward function version).
    pub reward_id: String,
    /// Tenant.
    pub tenant: String,
    /// Pseudonymous user id.
    pub user_id: String,
    /// Client session id.
    #[serde(default)]
    pub session_id: Option<String>,
    /// Suggestion id; the Kafka key.
    pub suggestion_id: String,
    /// Base model.
    pub model_id: String,
    /// Adapter version served.
    #[serde(default)]
    pub adapter_version: Option<String>,
    /// Experiment arm.
    #[serde(default)]
    pub experiment_arm: Option<String>,
    /// Product surface.
    pub surface: String,
    /// Prompt/context.
    pub prompt: String,
    /// Completion.
    pub completion: String,
    /// Behaviour-policy log-probability.
    #[serde(default)]
    pub behavior_logprob: Option<f64>,
    /// When shown.
    pub shown_time: EpochMillis,
    /// When the outcome window closed (event time).
    pub window_close_time: EpochMillis,
    /// Primary outcome.
    pub outcome: Outcome,
    /// Total reward (sum of components).
    pub reward: f64,
    /// Additive reward terms.
    pub components: RewardComponents,
    /// Raw joined signals.
    pub signals: RewardSignals,
    /// Reward function version.
    pub reward_fn_version: String,
    /// Source position.
    pub lineage: Lineage,
}

/// Additive reward terms; `reward == sum()`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RewardComponents {
    /// Primary outcome term.
    pub outcome: f64,
    /// Heavy-edit discount (≤ 0).
    pub edit_penalty: f64,
    /// Explicit rating term.
    pub rating: f64,
    /// Follow-up terms.
    pub follow_up: f64,
    /// Fast-acceptance term.
    pub time_to_accept: f64,
    /// Task completion term.
    pub task_completion: f64,
}

impl RewardComponents {
    /// The total reward these components add up to.
    pub fn sum(&self) -> f64 {
        self.outcome + self.edit_penalty + self.rating + self.follow_up + self.time_to_accept + self.task_completion
    }
}

/// Raw per-suggestion signals a reward was computed from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct RewardSignals {
    /// Shown-to-accepted delay.
    #[serde(default)]
    pub time_to_accept_ms: Option<i64>,
    /// Edit distance after accept.
    #[serde(default)]
    pub edit_distance: Option<i64>,
    /// Final text after edits.
    #[serde(default)]
    pub final_text: Option<String>,
    /// Last rating on `[-1, 1]`.
    #[serde(default)]
    pub rating: Option<f64>,
    /// Follow-up actions in event-time order.
    #[serde(default)]
    pub follow_ups: Vec<FollowUpAction>,
    /// Task completion (its success flag), if seen.
    #[serde(default)]
    pub task_completed: Option<bool>,
    /// Distinct events joined.
    pub event_count: i32,
}

/// Rolling reward statistics of one served version in one window (topic `reward-metrics`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardMetrics {
    /// Tenant.
    pub tenant: String,
    /// Base model.
    pub model_id: String,
    /// Adapter version.
    #[serde(default)]
    pub adapter_version: Option<String>,
    /// Experiment arm.
    #[serde(default)]
    pub experiment_arm: Option<String>,
    /// Inclusive window start.
    pub window_start: EpochMillis,
    /// Exclusive window end.
    pub window_end: EpochMillis,
    /// Outcomes closed in the window.
    pub shown: i64,
    /// Accepted.
    pub accepted: i64,
    /// Rejected.
    pub rejected: i64,
    /// Dismissed.
    pub dismissed: i64,
    /// Ignored.
    pub ignored: i64,
    /// Σ reward.
    pub reward_sum: f64,
    /// Σ reward².
    pub reward_sum_sq: f64,
    /// Rated suggestions.
    pub rated: i64,
    /// Σ normalised rating.
    pub rating_sum: f64,
    /// Σ completion length (chars).
    pub completion_chars_sum: i64,
    /// Distinct users.
    pub distinct_users: i64,
    /// Reward function version.
    pub reward_fn_version: String,
    /// Input offset at emission.
    pub emitted_at_offset: i64,
    /// Interactions partition covered.
    pub source_partition: i32,
    /// Product surface (null before schema v2).
    #[serde(default)]
    pub surface: Option<String>,
    /// Accepted suggestions with a measured edit distance.
    #[serde(default)]
    pub edit_measured: i64,
    /// Σ edit distance after accept.
    #[serde(default)]
    pub edit_distance_sum: i64,
    /// Every time to accept (ms), ascending.
    #[serde(default)]
    pub time_to_accept_ms: Vec<i64>,
}

/// An inclusive offset range of one topic partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OffsetRange {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// First offset included.
    pub first_offset: i64,
    /// Last offset included.
    pub last_offset: i64,
}

/// A committed Parquet shard in the lake (topic `shards`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardManifest {
    /// Deterministic shard name.
    pub shard_id: String,
    /// Tenant.
    pub tenant: String,
    /// File path relative to the lake root.
    pub uri: String,
    /// Lake root URI.
    pub lake_root: String,
    /// Rows.
    pub rows: i64,
    /// File size.
    pub bytes: i64,
    /// Hex SHA-256 of the file.
    pub content_sha256: String,
    /// Earliest shown time.
    pub min_event_time: EpochMillis,
    /// Latest shown time.
    pub max_event_time: EpochMillis,
    /// Rewards-topic range covered.
    pub source: OffsetRange,
    /// Signal statistics.
    pub stats: ShardStats,
    /// Reward function version of all rows.
    pub reward_fn_version: String,
    /// The statistics per model version.
    #[serde(default)]
    pub versions: Vec<ShardVersionStats>,
    /// Lake commit sequence number.
    pub commit_seq: i64,
    /// Commit time.
    pub committed_at: EpochMillis,
}

/// Per-shard signal statistics for the trigger's gates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ShardStats {
    /// Accepted rows.
    pub accepted: i64,
    /// Rejected rows.
    pub rejected: i64,
    /// Dismissed rows.
    pub dismissed: i64,
    /// Ignored rows.
    pub ignored: i64,
    /// Σ reward.
    pub reward_sum: f64,
    /// Σ reward².
    pub reward_sum_sq: f64,
    /// Rated rows.
    pub rated: i64,
    /// Rated rows contradicting their implicit outcome.
    pub rating_outcome_disagreements: i64,
    /// Rows per pseudonymous user.
    pub user_rows: BTreeMap<String, i64>,
}

/// Statistics of one model version's rows in a shard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ShardVersionStats {
    /// Base model.
    pub model_id: String,
    /// Adapter version; `None` is the base model alone.
    #[serde(default)]
    pub adapter_version: Option<String>,
    /// Rows.
    pub rows: i64,
    /// Accepted rows.
    pub accepted: i64,
    /// Rejected rows.
    pub rejected: i64,
    /// Dismissed rows.
    pub dismissed: i64,
    /// Ignored rows.
    pub ignored: i64,
    /// Σ reward.
    pub reward_sum: f64,
    /// Σ reward².
    pub reward_sum_sq: f64,
    /// Distinct users.
    pub distinct_users: i64,
    /// Rows of the heaviest user.
    pub max_user_rows: i64,
}

/// One trigger evaluation and its signal checks (topic `trigger-decisions`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriggerDecision {
    /// Deterministic id.
    pub decision_id: String,
    /// Tenant.
    pub tenant: String,
    /// Base model.
    pub base_model: String,
    /// Evaluation time.
    pub evaluated_at: EpochMillis,
    /// Whether a train request was issued.
    pub fired: bool,
    /// The request issued, when fired.
    #[serde(default)]
    pub train_request_id: Option<String>,
    /// Trigger policy version.
    pub policy_version: String,
    /// Shards accumulated since the last request.
    pub shard_ids: Vec<String>,
    /// Every check, passed or failed. On the wire (Avro and JSON) the
    /// field keeps its first name, `gates`, so records already on the topic
    /// and analysts' queries stay valid.
    #[serde(rename = "gates")]
    pub checks: Vec<CheckResult>,
}

/// One signal check's verdict (Avro record `GateResult`, its first name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename = "GateResult")]
pub struct CheckResult {
    /// Check name (wire field `gate`).
    #[serde(rename = "gate")]
    pub check: String,
    /// Whether it held.
    pub passed: bool,
    /// Observed value.
    pub observed: f64,
    /// Threshold.
    pub threshold: f64,
    /// Required relation of observed to threshold (`>=`, `>`, `<=`, `<`).
    pub comparison: String,
    /// Human-readable verdict.
    pub message: String,
}

/// Training objectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ObjectiveKind {
    /// REINFORCE with a baseline.
    Reinforce,
    /// Kahneman-Tversky optimisation on unpaired feedback.
    Kto,
    /// Reward-weighted supervised fine-tuning.
    Sft,
}

/// An instruction to train an adapter on pinned shards (topic `train-requests`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRequest {
    /// Deterministic id.
    pub request_id: String,
    /// Tenant.
    pub tenant: String,
    /// Base model.
    pub base_model: String,
    /// Adapter to start from.
    #[serde(default)]
    pub parent_adapter_version: Option<String>,
    /// Pinned shards.
    pub shards: Vec<ShardRef>,
    /// Earliest event time covered.
    pub window_start: EpochMillis,
    /// Latest event time covered.
    pub window_end: EpochMillis,
    /// Objective and optimiser settings.
    pub objective: TrainingObjective,
    /// Holdout split rule.
    pub holdout: HoldoutRule,
    /// Trigger policy version.
    pub policy_version: String,
    /// Decision time.
    pub created_at: EpochMillis,
}

/// A pinned lake shard.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShardRef {
    /// Shard id.
    pub shard_id: String,
    /// Path relative to the lake root.
    pub uri: String,
    /// Lake root URI.
    pub lake_root: String,
    /// Expected hex SHA-256.
    pub content_sha256: String,
    /// Rows.
    pub rows: i64,
    /// The Delta table version whose snapshot holds the shard.
    #[serde(default)]
    pub table_version: Option<i64>,
}

/// Objective and optimiser settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingObjective {
    /// Objective.
    pub kind: ObjectiveKind,
    /// LoRA rank.
    pub lora_rank: i32,
    /// LoRA alpha (scale alpha / r).
    pub lora_alpha: f64,
    /// Adapted projections.
    pub target_modules: Vec<String>,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Warm-up steps.
    pub warmup_steps: i32,
    /// Optimiser steps.
    pub max_steps: i32,
    /// Examples per step.
    pub batch_size: i32,
    /// Gradient-norm clip.
    pub max_grad_norm: f64,
    /// KL penalty weight.
    pub kl_coef: f64,
    /// PPO ratio clip.
    #[serde(default)]
    pub ppo_clip: Option<f64>,
    /// REINFORCE without a PPO clip: how far (nats per completion token)
    /// below its logged behaviour log-probability a rejected completion may
    /// be pushed.
    #[serde(default)]
    pub reject_floor: Option<f64>,
    /// KTO beta.
    pub kto_beta: f64,
    /// KTO desirable weight.
    pub kto_desirable_weight: f64,
    /// KTO undesirable weight.
    pub kto_undesirable_weight: f64,
    /// Seed.
    pub seed: i64,
}

/// Deterministic holdout split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HoldoutRule {
    /// Hash salt.
    pub salt: String,
    /// Held-out fraction.
    pub fraction: f64,
}

/// A trained adapter offered for release (topic `model-candidates`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCandidate {
    /// Adapter version.
    pub adapter_version: String,
    /// Producing train request.
    pub request_id: String,
    /// Tenant.
    pub tenant: String,
    /// Base model.
    pub base_model: String,
    /// Parent adapter.
    #[serde(default)]
    pub parent_adapter_version: Option<String>,
    /// PEFT adapter directory.
    pub adapter_uri: String,
    /// Hex SHA-256 of the safetensors file.
    pub adapter_sha256: String,
    /// Objective.
    pub objective: ObjectiveKind,
    /// Training examples.
    pub train_examples: i64,
    /// Holdout examples.
    pub holdout_examples: i64,
    /// Steps run.
    pub steps: i32,
    /// Tokens processed.
    pub tokens: i64,
    /// Training wall time.
    pub train_seconds: f64,
    /// Backend used.
    pub device: String,
    /// Candidate holdout metrics.
    pub candidate_metrics: BTreeMap<String, f64>,
    /// Parent holdout metrics.
    pub parent_metrics: BTreeMap<String, f64>,
    /// Mean per-token KL to the parent.
    pub kl_to_parent: f64,
    /// Finish time.
    pub created_at: EpochMillis,
}

/// A released adapter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AdapterRef {
    /// Version.
    pub adapter_version: String,
    /// PEFT adapter directory.
    pub adapter_uri: String,
    /// Hex SHA-256 of the safetensors file.
    pub adapter_sha256: String,
}

/// A candidate under online test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Canary {
    /// The candidate.
    pub adapter: AdapterRef,
    /// Share of users routed to it.
    pub traffic_share: f64,
    /// Start time.
    pub started_at: EpochMillis,
}

/// Release decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReleaseAction {
    /// Failed the offline gate.
    Rejected,
    /// Entered canary.
    CanaryStarted,
    /// Became live.
    Promoted,
    /// Removed after losing or tripping a guardrail.
    RolledBack,
    /// Canary reached its maximum duration undecided.
    Expired,
}

/// One release decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseDecision {
    /// Decision time.
    pub at: EpochMillis,
    /// Action.
    pub action: ReleaseAction,
    /// Adapter concerned.
    pub adapter_version: String,
    /// Reason with numbers.
    pub reason: String,
    /// Statistics behind it.
    pub statistics: BTreeMap<String, f64>,
}

/// Serving state of one tenant and base model (compacted topic `model-registry`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryEntry {
    /// Tenant.
    pub tenant: String,
    /// Base model.
    pub base_model: String,
    /// Monotonic revision.
    pub revision: i64,
    /// Live adapter; `None` serves the base.
    #[serde(default)]
    pub live: Option<AdapterRef>,
    /// Canary, if any.
    #[serde(default)]
    pub canary: Option<Canary>,
    /// Decisions, oldest first.
    pub history: Vec<ReleaseDecision>,
    /// Revision time.
    pub updated_at: EpochMillis,
}

/// A single record's position in a topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SourcePosition {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// A record a service could not process (topic `dead-letters`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Rejecting service.
    pub service: String,
    /// Machine-readable reason.
    pub reason_code: String,
    /// Human-readable reason.
    pub reason: String,
    /// Where it was read from.
    pub source: SourcePosition,
    /// Original key bytes.
    #[serde(default, with = "apache_avro::serde::bytes_opt")]
    pub original_key: Option<Vec<u8>>,
    /// Original value bytes.
    #[serde(default, with = "apache_avro::serde::bytes_opt")]
    pub original_value: Option<Vec<u8>>,
    /// Failure time.
    pub failed_at: EpochMillis,
}
