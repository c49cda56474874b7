//! The trigger policy: what "enough good signal" means, as checks over the
//! statistics of the shards accumulated since the last train request.
//!
//! Pure functions of (policy, manifests, clock, request history), so a
//! restarted trigger that replays the same manifests reaches the same
//! decisions, and every decision can be explained with numbers.

use std::collections::BTreeMap;

use flywheel_core::policy::CheckPolicy;
use flywheel_core::records::{CheckResult, EpochMillis, ObjectiveKind, ShardManifest, TrainingObjective};
use serde::{Deserialize, Serialize};

use crate::TriggerError;

/// Thresholds of one (tenant, base model); every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Version recorded in decisions and requests; change it with any threshold.
    pub version: String,
    /// Examples (rewarded suggestions) needed to fire.
    pub min_examples: u64,
    /// Distinct users needed.
    pub min_distinct_users: u64,
    /// Largest share of the examples one user may contribute (influence cap).
    pub max_user_share: f64,
    /// Reward variance floor: all-accept or all-reject data teaches nothing.
    pub min_reward_variance: f64,
    /// Accepted examples needed (positive outcome represented).
    pub min_accepted: u64,
    /// Rejected or dismissed examples needed (negative outcome represented).
    pub min_rejected: u64,
    /// Ceiling on the share of rated examples whose rating contradicts their
    /// implicit outcome: a label-noise estimate.
    pub max_rating_disagreement: f64,
    /// Rated examples needed before the noise check judges (fewer: it holds).
    pub min_rated_for_noise: u64,
    /// Minimum time between two requests (ms).
    pub cooldown_ms: i64,
    /// Most requests per UTC day.
    pub max_runs_per_day: u32,
    /// When the oldest unused shard is this old (ms), `stale_min_examples`
    /// is enough volume (the other checks still apply).
    pub max_staleness_ms: i64,
    /// Volume that suffices once the data is stale.
    pub stale_min_examples: u64,
    /// Share of suggestions the trainer holds out for evaluation.
    pub holdout_fraction: f64,
    /// Training settings of the requests (`[default.objective]`).
    pub objective: ObjectiveSettings,
}

/// Training settings a policy may set; unset fields keep the built-in ones
/// (`service::default_objective`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObjectiveSettings {
    /// `REINFORCE`, `KTO` or `SFT`.
    pub kind: Option<ObjectiveKind>,
    /// LoRA rank.
    pub lora_rank: Option<i32>,
    /// LoRA alpha (scale alpha / rank).
    pub lora_alpha: Option<f64>,
    /// Modules that get adapters: any of q_proj … down_proj.
    pub target_modules: Option<Vec<String>>,
    /// Peak learning rate.
    pub learning_rate: Option<f64>,
    /// AdamW weight decay.
    pub weight_decay: Option<f64>,
    /// Warm-up steps.
    pub warmup_steps: Option<i32>,
    /// Optimisation steps.
    pub max_steps: Option<i32>,
    /// Examples per step.
    pub batch_size: Option<i32>,
    /// Gradient-norm clip.
    pub max_grad_norm: Option<f64>,
    /// KL penalty to the base (REINFORCE).
    pub kl_coef: Option<f64>,
    /// PPO clip range when behaviour log-probs were logged (REINFORCE).
    pub ppo_clip: Option<f64>,
    /// Floor under rejected completions, nats per token below their
    /// behaviour log-probability (REINFORCE without `ppo_clip`).
    pub reject_floor: Option<f64>,
    /// KTO β.
    pub kto_beta: Option<f64>,
}

impl ObjectiveSettings {
    /// Overrides the fields this policy sets.
    pub fn apply(&self, o: &mut TrainingObjective) {
        fn set<T: Clone>(target: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *target = v.clone();
            }
        }
        set(&mut o.kind, &self.kind);
        set(&mut o.lora_rank, &self.lora_rank);
        set(&mut o.lora_alpha, &self.lora_alpha);
        set(&mut o.target_modules, &self.target_modules);
        set(&mut o.learning_rate, &self.learning_rate);
        set(&mut o.weight_decay, &self.weight_decay);
        set(&mut o.warmup_steps, &self.warmup_steps);
        set(&mut o.max_steps, &self.max_steps);
        set(&mut o.batch_size, &self.batch_size);
        set(&mut o.max_grad_norm, &self.max_grad_norm);
        set(&mut o.kl_coef, &self.kl_coef);
        if self.ppo_clip.is_some() {
            o.ppo_clip = self.ppo_clip;
        }
        if self.reject_floor.is_some() {
            o.reject_floor = self.reject_floor;
        }
        set(&mut o.kto_beta, &self.kto_beta);
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            version: "trigger-default-v1".into(),
            min_examples: 10_000,
            min_distinct_users: 20,
            max_user_share: 0.10,
            min_reward_variance: 0.01,
            min_accepted: 200,
            min_rejected: 200,
            max_rating_disagreement: 0.30,
            min_rated_for_noise: 50,
            cooldown_ms: 3_600_000,
            max_runs_per_day: 4,
            max_staleness_ms: 24 * 3_600_000,
            stale_min_examples: 1_000,
            holdout_fraction: 0.1,
            objective: ObjectiveSettings::default(),
        }
    }
}

impl Policy {
    /// Parses a TOML policy (fields left out keep their defaults) and checks it.
    pub fn from_toml(text: &str) -> Result<Policy, TriggerError> {
        let policy: Policy = toml::from_str(text).map_err(|e| TriggerError::Config(e.to_string()))?;
        policy.check().map_err(TriggerError::Config)?;
        Ok(policy)
    }
}

impl CheckPolicy for Policy {
    /// Rejects thresholds that make no sense.
    fn check(&self) -> Result<(), String> {
        let bad = |what: String| Err(what);
        if self.version.trim().is_empty() {
            return bad("policy version is empty".into());
        }
        for (name, v) in
            [("max_user_share", self.max_user_share), ("max_rating_disagreement", self.max_rating_disagreement)]
        {
            if !(0.0..=1.0).contains(&v) {
                return bad(format!("{name} = {v} is not a share in [0, 1]"));
            }
        }
        if self.min_reward_variance < 0.0 || self.cooldown_ms < 0 || self.max_staleness_ms <= 0 {
            return bad("variance floor, cooldown and staleness must not be negative".into());
        }
        if !(self.holdout_fraction > 0.0 && self.holdout_fraction < 1.0) {
            return bad(format!("holdout_fraction = {} is not in (0, 1)", self.holdout_fraction));
        }
        if self.objective.lora_rank.is_some_and(|r| r < 1) || self.objective.max_steps.is_some_and(|s| s < 1) {
            return bad("objective lora_rank and max_steps must be at least 1".into());
        }
        if self.stale_min_examples > self.min_examples {
            return bad("stale_min_examples must not exceed min_examples".into());
        }
        Ok(())
    }
}

/// Statistics accumulated over the shards of one (tenant, base model) since
/// its last train request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Accumulated {
    /// Shard ids, in arrival order.
    pub shard_ids: Vec<String>,
    /// Examples of this base model.
    pub examples: u64,
    /// Accepted.
    pub accepted: u64,
    /// Rejected or dismissed.
    pub rejected: u64,
    /// Ignored.
    pub ignored: u64,
    /// Σ reward.
    pub reward_sum: f64,
    /// Σ reward².
    pub reward_sum_sq: f64,
    /// Rated rows and those contradicting their outcome (tenant-level in the
    /// manifest: exact when a shard holds one base model).
    pub rated: u64,
    /// Rated rows contradicting their outcome.
    pub disagreements: u64,
    /// Rows per user (tenant-level, as above).
    pub user_rows: BTreeMap<String, i64>,
    /// Commit time of the oldest shard not yet used.
    pub oldest_shard_at: Option<EpochMillis>,
}

impl Accumulated {
    /// Adds one shard's manifest, counting only rows of `base_model`.
    pub fn add(&mut self, m: &ShardManifest, base_model: &str) {
        let versions: Vec<_> = m.versions.iter().filter(|v| v.model_id == base_model).collect();
        if versions.is_empty() {
            return;
        }
        self.shard_ids.push(m.shard_id.clone());
        for v in &versions {
            self.examples += v.rows.max(0) as u64;
            self.accepted += v.accepted.max(0) as u64;
            self.rejected += (v.rejected + v.dismissed).max(0) as u64;
            self.ignored += v.ignored.max(0) as u64;
            self.reward_sum += v.reward_sum;
            self.reward_sum_sq += v.reward_sum_sq;
        }
        self.rated += m.stats.rated.max(0) as u64;
        self.disagreements += m.stats.rating_outcome_disagreements.max(0) as u64;
        for (user, rows) in &m.stats.user_rows {
            *self.user_rows.entry(user.clone()).or_default() += rows;
        }
        self.oldest_shard_at = Some(self.oldest_shard_at.map_or(m.committed_at, |t| t.min(m.committed_at)));
    }

    /// Population variance of the reward.
    pub fn reward_variance(&self) -> f64 {
        if self.examples == 0 {
            return 0.0;
        }
        let n = self.examples as f64;
        let mean = self.reward_sum / n;
        (self.reward_sum_sq / n - mean * mean).max(0.0)
    }

    /// Largest share of the rows one user contributed.
    pub fn max_user_share(&self) -> f64 {
        let total: i64 = self.user_rows.values().sum();
        let max = self.user_rows.values().copied().max().unwrap_or(0);
        if total == 0 { 0.0 } else { max as f64 / total as f64 }
    }
}

/// When earlier requests of this (tenant, base model) were made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestHistory {
    /// Creation times of earlier requests (ms).
    pub created_at: Vec<EpochMillis>,
}

pub(crate) fn check(name: &str, observed: f64, comparison: &str, threshold: f64, label: &str) -> CheckResult {
    let passed = match comparison {
        ">=" => observed >= threshold,
        ">" => observed > threshold,
        "<=" => observed <= threshold,
        _ => observed < threshold,
    };
    let verdict = if passed { "holds" } else { "fails" };
    let negated = match comparison {
        ">=" => "<",
        ">" => "<=",
        "<=" => ">",
        _ => ">=",
    };
    let shown = if passed { comparison } else { negated };
    CheckResult {
        check: name.into(),
        passed,
        observed,
        threshold,
        comparison: comparison.into(),
        message: format!("{name} {} {shown} {label} {} ({verdict})", number(observed), number(threshold)),
    }
}

/// A number as people read it: integers without decimals, others to four
/// significant decimals.
fn number(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.is_finite() {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        v.to_string()
    }
}

/// Evaluates every check at `now`. The request fires only if all hold.
pub fn evaluate(policy: &Policy, acc: &Accumulated, history: &RequestHistory, now: EpochMillis) -> Vec<CheckResult> {
    let stale = acc.oldest_shard_at.is_some_and(|t| now - t >= policy.max_staleness_ms);
    let volume = if stale { policy.stale_min_examples } else { policy.min_examples };
    let last = history.created_at.iter().copied().max();
    let since_last = last.map_or(f64::INFINITY, |t| (now - t) as f64);
    let day = now.div_euclid(86_400_000);
    let today = history.created_at.iter().filter(|t| t.div_euclid(86_400_000) == day).count();
    let noise = if acc.rated >= policy.min_rated_for_noise && acc.rated > 0 {
        acc.disagreements as f64 / acc.rated as f64
    } else {
        0.0
    };
    vec![
        check("examples", acc.examples as f64, ">=", volume as f64, if stale { "stale minimum" } else { "minimum" }),
        check("distinct_users", acc.user_rows.len() as f64, ">=", policy.min_distinct_users as f64, "minimum"),
        check("max_user_share", acc.max_user_share(), "<=", policy.max_user_share, "cap"),
        check("reward_variance", acc.reward_variance(), ">=", policy.min_reward_variance, "floor"),
        check("accepted", acc.accepted as f64, ">=", policy.min_accepted as f64, "minimum"),
        check("rejected", acc.rejected as f64, ">=", policy.min_rejected as f64, "minimum"),
        check("rating_disagreement", noise, "<=", policy.max_rating_disagreement, "ceiling"),
        check("since_last_request_ms", since_last, ">=", policy.cooldown_ms as f64, "cooldown"),
        check("runs_today", today as f64, "<", policy.max_runs_per_day as f64, "budget"),
    ]
}

/// A hex SHA-256 over `parts` separated by NUL, for deterministic ids.
pub fn stable_id(parts: &[&str]) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    flywheel_core::hex(&h.finalize())
}

/// The id of the request for a shard set: the same shards under the same
/// policy always give the same id, so a replay can never train twice.
pub fn request_id(tenant: &str, base_model: &str, policy: &Policy, shard_ids: &[String]) -> String {
    let mut sorted: Vec<&str> = shard_ids.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    let mut parts = vec![tenant, base_model, policy.version.as_str()];
    parts.extend(sorted);
    stable_id(&parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_core::records::ShardVersionStats;

    /// A shard of `rows` rows for `users` users, `accepted` accepted, the
    /// rest rejected, rewards +1 / -1.
    fn shard(id: &str, rows: i64, users: i64, accepted: i64, committed_at: i64) -> ShardManifest {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../schemas/fixtures/shard_manifest.committed.json");
        let mut m: ShardManifest = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        m.shard_id = id.into();
        m.committed_at = committed_at;
        m.stats.user_rows = (0..users).map(|u| (format!("u{u}"), rows / users + i64::from(u < rows % users))).collect();
        m.stats.rated = 0;
        m.stats.rating_outcome_disagreements = 0;
        let rejected = rows - accepted;
        m.versions = vec![ShardVersionStats {
            model_id: "base".into(),
            rows,
            accepted,
            rejected,
            reward_sum: (accepted - rejected) as f64,
            reward_sum_sq: rows as f64,
            distinct_users: users,
            ..Default::default()
        }];
        m
    }

    fn policy() -> Policy {
        Policy { min_examples: 1_000, min_accepted: 100, min_rejected: 100, ..Policy::default() }
    }

    fn failing(checks: &[CheckResult]) -> Vec<&str> {
        checks.iter().filter(|g| !g.passed).map(|g| g.check.as_str()).collect()
    }

    #[test]
    fn fires_only_once_the_volume_threshold_is_crossed() {
        let mut acc = Accumulated::default();
        acc.add(&shard("s1", 600, 40, 300, 0), "base");
        let checks = evaluate(&policy(), &acc, &RequestHistory::default(), 1_000);
        assert_eq!(failing(&checks), vec!["examples"]);
        assert_eq!(checks[0].message, "examples 600 < minimum 1000 (fails)");
        acc.add(&shard("s2", 600, 40, 300, 10), "base");
        assert!(failing(&evaluate(&policy(), &acc, &RequestHistory::default(), 1_000)).is_empty());
    }

    #[test]
    fn each_check_refuses_with_its_numbers() {
        let now = 10 * 86_400_000;
        // One heavy user: 2 users share 1,200 rows.
        let mut acc = Accumulated::default();
        acc.add(&shard("s", 1_200, 2, 600, now), "base");
        let checks = evaluate(&policy(), &acc, &RequestHistory::default(), now);
        assert_eq!(failing(&checks), vec!["distinct_users", "max_user_share"]);
        let share = checks.iter().find(|g| g.check == "max_user_share").unwrap();
        assert_eq!((share.observed, share.threshold), (0.5, 0.10));
        // All accepted: no variance, no negative outcome.
        let mut acc = Accumulated::default();
        acc.add(&shard("s", 1_200, 40, 1_200, now), "base");
        assert_eq!(
            failing(&evaluate(&policy(), &acc, &RequestHistory::default(), now)),
            vec!["reward_variance", "rejected"]
        );
        // Noisy labels: ratings contradict outcomes half the time.
        let mut noisy = shard("s", 1_200, 40, 600, now);
        noisy.stats.rated = 200;
        noisy.stats.rating_outcome_disagreements = 100;
        let mut acc = Accumulated::default();
        acc.add(&noisy, "base");
        let checks = evaluate(&policy(), &acc, &RequestHistory::default(), now);
        assert_eq!(failing(&checks), vec!["rating_disagreement"]);
        assert_eq!(checks[6].message, "rating_disagreement 0.5 > ceiling 0.3 (fails)");
        // Cooldown and daily budget.
        let mut acc = Accumulated::default();
        acc.add(&shard("s", 1_200, 40, 600, now), "base");
        let recent = RequestHistory { created_at: vec![now - 60_000] };
        assert_eq!(failing(&evaluate(&policy(), &acc, &recent, now)), vec!["since_last_request_ms"]);
        let busy = RequestHistory { created_at: (1..=4).map(|h| now + h * 3_600_000 * 2).collect() };
        let later = now + 12 * 3_600_000;
        assert_eq!(failing(&evaluate(&policy(), &acc, &busy, later)), vec!["runs_today"]);
    }

    #[test]
    fn stale_data_lowers_the_volume_bar_but_not_the_other_checks() {
        let p = Policy { stale_min_examples: 200, ..policy() };
        let mut acc = Accumulated::default();
        acc.add(&shard("s", 400, 40, 200, 0), "base");
        assert_eq!(failing(&evaluate(&p, &acc, &RequestHistory::default(), 3_600_000)), vec!["examples"]);
        let day_later = p.max_staleness_ms;
        assert!(failing(&evaluate(&p, &acc, &RequestHistory::default(), day_later)).is_empty());
        let mut all_accept = Accumulated::default();
        all_accept.add(&shard("s", 400, 40, 400, 0), "base");
        assert_eq!(
            failing(&evaluate(&p, &all_accept, &RequestHistory::default(), day_later)),
            vec!["reward_variance", "rejected"]
        );
    }

    #[test]
    fn other_base_models_do_not_count_and_ids_are_deterministic() {
        let mut acc = Accumulated::default();
        acc.add(&shard("s", 1_200, 40, 600, 0), "another-model");
        assert_eq!(acc, Accumulated::default());
        let p = policy();
        let a = request_id("t", "base", &p, &["s2".into(), "s1".into()]);
        assert_eq!(a, request_id("t", "base", &p, &["s1".into(), "s2".into()]), "order does not matter");
        assert_ne!(
            a,
            request_id("t", "base", &Policy { version: "v2".into(), ..p.clone() }, &["s1".into(), "s2".into()])
        );
        assert_ne!(a, request_id("t", "base", &p, &["s1".into()]));
    }

    #[test]
    fn policies_parse_from_toml_and_nonsense_is_refused() {
        let p = Policy::from_toml("version = \"acme-v3\"\nmin_examples = 50000\nmax_user_share = 0.05\n").unwrap();
        assert_eq!((p.min_examples, p.max_user_share, p.min_distinct_users), (50_000, 0.05, 20));
        assert!(Policy::from_toml("max_user_share = 1.5").is_err());
        assert!(Policy::from_toml("min_exampels = 5").unwrap_err().to_string().contains("unknown field"));
        // Objective settings override only what they name.
        let p =
            Policy::from_toml("[objective]\nkind = \"KTO\"\nmax_steps = 30\ntarget_modules = [\"o_proj\"]\n").unwrap();
        let mut o = crate::service::default_objective(1);
        let before = o.clone();
        p.objective.apply(&mut o);
        assert_eq!(
            (o.kind, o.max_steps, o.target_modules.clone()),
            (ObjectiveKind::Kto, 30, vec!["o_proj".to_string()])
        );
        assert_eq!((o.learning_rate, o.lora_rank, o.seed), (before.learning_rate, before.lora_rank, before.seed));
        assert!(Policy::from_toml("[objective]\nlora_rank = 0").is_err());
        assert!(Policy::from_toml("holdout_fraction = 1.0").is_err());
        // Per-pair files: overrides, and errors that name the table.
        let file = "[default]\nmin_examples = 2000\n[overrides.\"acme/tiny\"]\nmin_examples = 3000\n";
        let ps = crate::service::Policies::parse(file, "policy.toml").unwrap();
        assert_eq!((ps.of("acme", "tiny").min_examples, ps.of("acme", "other").min_examples), (3000, 2000));
        let example = include_str!("../../../deploy/trigger-policy.toml.example");
        let documented = crate::service::Policies::parse(example, "trigger-policy.toml.example").unwrap();
        assert_eq!(documented.default, Policy::default(), "the example documents the defaults");
        let bad = crate::service::Policies::parse("[overrides.\"a/b\"]\nmax_user_share = 2.0\n", "p.toml");
        assert!(bad.unwrap_err().to_string().contains("override a/b: max_user_share = 2"));
    }
}
