//! The release state machine, free of I/O: candidates, metrics windows and
//! registry entries in; new registry entries (each with its decision) out.
//!
//! Per (tenant, base model): a candidate first meets the offline gate
//! (trained from the live adapter, enough holdout, accuracy gain over its
//! parent, KL budget). If it passes it becomes the canary, served to a share
//! of users; every new metrics window re-reads the canary and control arms
//! since the canary started. Guardrails and significantly worse accept rate
//! or mean reward roll it back; a significantly better mean reward with an
//! accept rate not significantly worse promotes it; past the maximum
//! duration it expires. One canary at a time: later candidates queue.

use std::collections::{BTreeMap, HashMap, VecDeque};

use flywheel_core::records::{
    AdapterRef, Canary, EpochMillis, ModelCandidate, RegistryEntry, ReleaseAction, ReleaseDecision, RewardMetrics,
};

use crate::policy::ReleasePolicy;
use crate::sequential::{Moments, msprt};

/// Decisions kept in a registry entry's history (oldest dropped first), so
/// the compacted record stays small.
pub(crate) const HISTORY_LIMIT: usize = 200;

type Pair = (String, String);
/// (tenant, model, adapter version).
type Version = (String, String, Option<String>);
/// (window start, window end, source partition, emission offset,
/// experiment arm, surface): a window record's whole identity (the
/// rewarder's `metrics_record_id`), so records of one version that differ
/// only in arm or surface — around a promotion the same adapter is served as
/// canary and as live in one window — are all counted.
type WindowKey = (i64, i64, i32, i64, String, String);

/// Metrics windows per (tenant, model, adapter), deduplicated by window,
/// source partition and emission offset.
#[derive(Debug, Default)]
pub(crate) struct MetricsStore {
    windows: HashMap<Version, BTreeMap<WindowKey, RewardMetrics>>,
}

impl MetricsStore {
    /// Keeps a window record; false when it was already held.
    pub(crate) fn add(&mut self, m: RewardMetrics) -> bool {
        let key = (m.tenant.clone(), m.model_id.clone(), m.adapter_version.clone());
        let at = (
            m.window_start,
            m.window_end,
            m.source_partition,
            m.emitted_at_offset,
            m.experiment_arm.clone().unwrap_or_default(),
            m.surface.clone().unwrap_or_default(),
        );
        self.windows.entry(key).or_default().insert(at, m).is_none()
    }

    /// Sum of the windows of length `window_ms` starting at or after `since`
    /// for one served version (`adapter` `None` = the base model).
    pub(crate) fn arm(&self, tenant: &str, model: &str, adapter: Option<&str>, since: i64, window_ms: i64) -> ArmStats {
        let key = (tenant.to_string(), model.to_string(), adapter.map(str::to_string));
        let mut stats = ArmStats::default();
        let from = (since, i64::MIN, i32::MIN, i64::MIN, String::new(), String::new());
        for ((start, end, ..), m) in self.windows.get(&key).into_iter().flat_map(|w| w.range(from.clone()..)) {
            if end - start == window_ms {
                stats.add(m);
            }
        }
        stats
    }
}

/// One arm's totals over a canary.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct ArmStats {
    /// Suggestions shown.
    pub shown: i64,
    /// Accepted.
    pub accepted: i64,
    /// Σ reward, Σ reward².
    pub reward_sum: f64,
    /// Σ reward².
    pub reward_sum_sq: f64,
    /// Rated suggestions and Σ normalised rating.
    pub rated: i64,
    /// Σ normalised rating.
    pub rating_sum: f64,
    /// Σ completion length (chars).
    pub completion_chars: i64,
    /// Σ distinct users over windows (an upper bound of the true count).
    pub user_windows: i64,
    /// Windows read.
    pub windows: i64,
}

impl ArmStats {
    fn add(&mut self, m: &RewardMetrics) {
        self.shown += m.shown;
        self.accepted += m.accepted;
        self.reward_sum += m.reward_sum;
        self.reward_sum_sq += m.reward_sum_sq;
        self.rated += m.rated;
        self.rating_sum += m.rating_sum;
        self.completion_chars += m.completion_chars_sum;
        self.user_windows += m.distinct_users;
        self.windows += 1;
    }

    fn ratio(a: f64, b: f64) -> f64 {
        if b > 0.0 { a / b } else { f64::NAN }
    }

    /// Accepted / shown.
    pub(crate) fn accept_rate(&self) -> f64 {
        Self::ratio(self.accepted as f64, self.shown as f64)
    }

    /// Mean reward per shown suggestion.
    pub(crate) fn mean_reward(&self) -> f64 {
        Self::ratio(self.reward_sum, self.shown as f64)
    }

    /// Suggestions per user-window (the suggestion rate).
    pub(crate) fn suggestion_rate(&self) -> f64 {
        Self::ratio(self.shown as f64, self.user_windows as f64)
    }

    /// Mean completion length in chars.
    pub(crate) fn completion_length(&self) -> f64 {
        Self::ratio(self.completion_chars as f64, self.shown as f64)
    }

    /// Mean normalised rating.
    pub(crate) fn mean_rating(&self) -> f64 {
        Self::ratio(self.rating_sum, self.rated as f64)
    }
}

/// The gate's whole state, rebuilt from the topics on start.
#[derive(Debug, Default)]
pub(crate) struct GateState {
    /// Latest registry entry per (tenant, base model).
    pub entries: HashMap<Pair, RegistryEntry>,
    /// Candidates not yet decided, in arrival order.
    pub queued: HashMap<Pair, VecDeque<ModelCandidate>>,
    /// Metrics windows.
    pub metrics: MetricsStore,
}

fn adapter_ref(c: &ModelCandidate) -> AdapterRef {
    AdapterRef {
        adapter_version: c.adapter_version.clone(),
        adapter_uri: c.adapter_uri.clone(),
        adapter_sha256: c.adapter_sha256.clone(),
    }
}

fn decided(entry: Option<&RegistryEntry>, adapter_version: &str) -> bool {
    entry.is_some_and(|e| e.history.iter().any(|d| d.adapter_version == adapter_version))
}

impl GateState {
    /// Applies an entry read from the registry (newer revisions win).
    pub(crate) fn registry(&mut self, entry: RegistryEntry) {
        let key = (entry.tenant.clone(), entry.base_model.clone());
        if self.entries.get(&key).is_none_or(|held| held.revision < entry.revision) {
            if let Some(q) = self.queued.get_mut(&key) {
                q.retain(|c| !decided(Some(&entry), &c.adapter_version));
            }
            self.entries.insert(key, entry);
        }
    }

    /// Queues a candidate unless it was decided or is queued already.
    pub(crate) fn candidate(&mut self, c: ModelCandidate) {
        let key = (c.tenant.clone(), c.base_model.clone());
        let canary = self.entries.get(&key).and_then(|e| e.canary.as_ref());
        if decided(self.entries.get(&key), &c.adapter_version)
            || canary.is_some_and(|k| k.adapter.adapter_version == c.adapter_version)
        {
            return;
        }
        let queue = self.queued.entry(key).or_default();
        if !queue.iter().any(|q| q.adapter_version == c.adapter_version) {
            queue.push_back(c);
        }
    }

    /// Every decision due at `now`: the new registry entries, already
    /// applied to the state. `policy` gives each pair's policy.
    pub(crate) fn step<'p>(
        &mut self,
        policy: impl Fn(&str, &str) -> &'p ReleasePolicy,
        now: EpochMillis,
    ) -> Vec<RegistryEntry> {
        let mut out = Vec::new();
        let mut pairs: Vec<Pair> = self.entries.keys().chain(self.queued.keys()).cloned().collect();
        pairs.sort();
        pairs.dedup();
        for key in pairs {
            let p = policy(&key.0, &key.1);
            loop {
                let entry = self.entries.get(&key);
                let next = if entry.is_some_and(|e| e.canary.is_some()) {
                    judge_canary(entry.expect("checked"), &self.metrics, p, now).map(|d| (d, None))
                } else {
                    self.queued
                        .get_mut(&key)
                        .and_then(VecDeque::pop_front)
                        .map(|c| (offline(&c, entry, p, now), Some(c)))
                };
                let Some((decision, candidate)) = next else { break };
                let updated = apply(entry, &key, decision, candidate.as_ref(), p, now);
                self.entries.insert(key.clone(), updated.clone());
                out.push(updated);
            }
        }
        out
    }
}

/// The offline gate: `CanaryStarted` or `Rejected`, with the numbers.
pub(crate) fn offline(
    c: &ModelCandidate,
    entry: Option<&RegistryEntry>,
    p: &ReleasePolicy,
    now: EpochMillis,
) -> ReleaseDecision {
    let live = entry.and_then(|e| e.live.as_ref()).map(|a| a.adapter_version.as_str());
    let metric = |m: &BTreeMap<String, f64>| m.get("implicit_reward_accuracy").copied();
    let (cand, parent) = (metric(&c.candidate_metrics), metric(&c.parent_metrics));
    let mut statistics = BTreeMap::from([
        ("holdout_examples".to_string(), c.holdout_examples as f64),
        ("kl_to_parent".to_string(), c.kl_to_parent),
        ("max_kl_to_parent".to_string(), p.max_kl_to_parent),
        ("min_accuracy_gain".to_string(), p.min_accuracy_gain),
    ]);
    let mut failures = Vec::new();
    if c.parent_adapter_version.as_deref() != live {
        failures.push(format!(
            "stale: trained from {} but {} is live",
            c.parent_adapter_version.as_deref().unwrap_or("the base"),
            live.unwrap_or("the base")
        ));
    }
    if c.holdout_examples < p.min_holdout_examples {
        failures.push(format!("holdout {} < {} examples", c.holdout_examples, p.min_holdout_examples));
    }
    match (cand, parent) {
        (Some(cand), Some(parent)) => {
            statistics.insert("candidate_accuracy".into(), cand);
            statistics.insert("parent_accuracy".into(), parent);
            statistics.insert("accuracy_gain".into(), cand - parent);
            if cand - parent < p.min_accuracy_gain {
                failures.push(format!(
                    "implicit-reward accuracy {cand:.3} vs parent {parent:.3}: gain {:.3} < {:.3}",
                    cand - parent,
                    p.min_accuracy_gain
                ));
            }
        }
        _ => failures.push("holdout lacks accepted or rejected examples: no implicit-reward accuracy".into()),
    }
    if c.kl_to_parent.is_nan() || c.kl_to_parent.abs() > p.max_kl_to_parent {
        failures.push(format!("KL to parent {:.3} > budget {:.3}", c.kl_to_parent.abs(), p.max_kl_to_parent));
    }
    let (action, reason) = if failures.is_empty() {
        (
            ReleaseAction::CanaryStarted,
            format!(
                "offline gate passed (accuracy gain {:.3} ≥ {:.3}, KL {:.3} ≤ {:.3}); canary at {:.0} % of users [request {}, policy {}]",
                statistics["accuracy_gain"],
                p.min_accuracy_gain,
                c.kl_to_parent.abs(),
                p.max_kl_to_parent,
                p.canary_share * 100.0,
                c.request_id,
                p.version
            ),
        )
    } else {
        (
            ReleaseAction::Rejected,
            format!("offline gate failed: {} [request {}, policy {}]", failures.join("; "), c.request_id, p.version),
        )
    };
    ReleaseDecision { at: now, action, adapter_version: c.adapter_version.clone(), reason, statistics }
}

/// Reads the running canary: a decision when one is due.
pub(crate) fn judge_canary(
    entry: &RegistryEntry,
    metrics: &MetricsStore,
    p: &ReleasePolicy,
    now: EpochMillis,
) -> Option<ReleaseDecision> {
    let canary = entry.canary.as_ref()?;
    let version = canary.adapter.adapter_version.clone();
    let live = entry.live.as_ref().map(|a| a.adapter_version.as_str());
    let arm = |adapter: Option<&str>| {
        metrics.arm(&entry.tenant, &entry.base_model, adapter, canary.started_at, p.metrics_window_ms)
    };
    let (t, c) = (arm(Some(&version)), arm(live));
    let reward = msprt(
        &Moments { n: t.shown as f64, sum: t.reward_sum, sum_sq: t.reward_sum_sq },
        &Moments { n: c.shown as f64, sum: c.reward_sum, sum_sq: c.reward_sum_sq },
        p.reward_tau,
    );
    let accept =
        msprt(&Moments::bernoulli(t.accepted, t.shown), &Moments::bernoulli(c.accepted, c.shown), p.accept_rate_tau);
    let statistics = BTreeMap::from([
        ("canary_shown".to_string(), t.shown as f64),
        ("control_shown".to_string(), c.shown as f64),
        ("canary_accept_rate".to_string(), t.accept_rate()),
        ("control_accept_rate".to_string(), c.accept_rate()),
        ("accept_rate_difference".to_string(), accept.difference),
        ("accept_rate_p_value".to_string(), accept.p_value),
        ("canary_mean_reward".to_string(), t.mean_reward()),
        ("control_mean_reward".to_string(), c.mean_reward()),
        ("mean_reward_difference".to_string(), reward.difference),
        ("mean_reward_p_value".to_string(), reward.p_value),
        ("alpha".to_string(), p.alpha),
        ("canary_ms".to_string(), (now - canary.started_at) as f64),
    ]);
    let numbers = format!(
        "accept rate {:.3} vs {:.3} (p = {:.4}), mean reward {:.4} vs {:.4} (p = {:.4}), {} vs {} shown; always-valid mSPRT at α = {}",
        t.accept_rate(),
        c.accept_rate(),
        accept.p_value,
        t.mean_reward(),
        c.mean_reward(),
        reward.p_value,
        t.shown,
        c.shown,
        p.alpha
    );
    let decision = |action, reason: String| ReleaseDecision {
        at: now,
        action,
        adapter_version: version.clone(),
        reason: format!("{reason} [policy {}]", p.version),
        statistics: statistics.clone(),
    };
    if t.shown >= p.min_shown_per_arm && c.shown >= p.min_shown_per_arm {
        let mut tripped = Vec::new();
        let rate_ratio = t.suggestion_rate() / c.suggestion_rate();
        if rate_ratio < p.min_suggestion_rate_ratio {
            tripped.push(format!(
                "suggestion rate collapsed to {:.0} % of control (floor {:.0} %)",
                rate_ratio * 100.0,
                p.min_suggestion_rate_ratio * 100.0
            ));
        }
        let length_ratio = t.completion_length() / c.completion_length();
        if length_ratio < p.min_completion_length_ratio {
            tripped.push(format!(
                "completion length collapsed to {:.0} % of control (floor {:.0} %)",
                length_ratio * 100.0,
                p.min_completion_length_ratio * 100.0
            ));
        }
        if t.rated >= p.min_rated_per_arm && c.rated >= p.min_rated_per_arm {
            let drop = c.mean_rating() - t.mean_rating();
            if drop > p.max_rating_drop {
                tripped.push(format!(
                    "mean rating {:.3} vs {:.3}: drop {drop:.3} > {:.3}",
                    t.mean_rating(),
                    c.mean_rating(),
                    p.max_rating_drop
                ));
            }
        }
        if !tripped.is_empty() {
            return Some(decision(ReleaseAction::RolledBack, format!("guardrail: {}; {numbers}", tripped.join("; "))));
        }
        let worse = |l: &crate::sequential::Look| l.significant(p.alpha) && l.difference < 0.0;
        if worse(&reward) || worse(&accept) {
            return Some(decision(ReleaseAction::RolledBack, format!("significantly worse: {numbers}")));
        }
        if reward.significant(p.alpha) && reward.difference > 0.0 {
            return Some(decision(ReleaseAction::Promoted, format!("significantly better: {numbers}")));
        }
    }
    (now - canary.started_at >= p.max_canary_ms)
        .then(|| decision(ReleaseAction::Expired, format!("undecided after {} ms: {numbers}", now - canary.started_at)))
}

/// The entry after `decision`.
fn apply(
    entry: Option<&RegistryEntry>,
    key: &Pair,
    decision: ReleaseDecision,
    candidate: Option<&ModelCandidate>,
    p: &ReleasePolicy,
    now: EpochMillis,
) -> RegistryEntry {
    let mut next = entry.cloned().unwrap_or_else(|| RegistryEntry {
        tenant: key.0.clone(),
        base_model: key.1.clone(),
        revision: 0,
        live: None,
        canary: None,
        history: Vec::new(),
        updated_at: now,
    });
    match decision.action {
        ReleaseAction::CanaryStarted => {
            let adapter = adapter_ref(candidate.expect("a canary starts from a candidate"));
            next.canary = Some(Canary { adapter, traffic_share: p.canary_share, started_at: now });
        }
        ReleaseAction::Promoted => next.live = next.canary.take().map(|c| c.adapter),
        ReleaseAction::RolledBack | ReleaseAction::Expired => next.canary = None,
        ReleaseAction::Rejected => {}
    }
    next.revision += 1;
    next.updated_at = now;
    next.history.push(decision);
    if next.history.len() > HISTORY_LIMIT {
        next.history.drain(..next.history.len() - HISTORY_LIMIT);
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_core::records::ObjectiveKind;

    fn candidate(version: &str, parent: Option<&str>, accuracy: f64, parent_accuracy: f64) -> ModelCandidate {
        ModelCandidate {
            adapter_version: version.into(),
            request_id: format!("req-{version}"),
            tenant: "acme".into(),
            base_model: "tiny".into(),
            parent_adapter_version: parent.map(str::to_string),
            adapter_uri: format!("/adapters/acme/{version}"),
            adapter_sha256: "ab".repeat(32),
            objective: ObjectiveKind::Reinforce,
            train_examples: 900,
            holdout_examples: 100,
            steps: 50,
            tokens: 10_000,
            train_seconds: 1.0,
            device: "cpu".into(),
            candidate_metrics: BTreeMap::from([("implicit_reward_accuracy".into(), accuracy)]),
            parent_metrics: BTreeMap::from([("implicit_reward_accuracy".into(), parent_accuracy)]),
            kl_to_parent: 0.05,
            created_at: 0,
        }
    }

    /// One 60 s window of `shown` suggestions of a version: `accepted` of
    /// them accepted (+0.75), the rest rejected (−0.25).
    fn window(adapter: Option<&str>, start: i64, shown: i64, accepted: i64, chars_each: i64) -> RewardMetrics {
        RewardMetrics {
            tenant: "acme".into(),
            model_id: "tiny".into(),
            adapter_version: adapter.map(str::to_string),
            experiment_arm: None,
            window_start: start,
            window_end: start + 60_000,
            shown,
            accepted,
            rejected: shown - accepted,
            dismissed: 0,
            ignored: 0,
            reward_sum: 0.75 * accepted as f64 - 0.25 * (shown - accepted) as f64,
            reward_sum_sq: 0.5625 * accepted as f64 + 0.0625 * (shown - accepted) as f64,
            rated: 0,
            rating_sum: 0.0,
            completion_chars_sum: shown * chars_each,
            distinct_users: shown / 5,
            reward_fn_version: "v1".into(),
            emitted_at_offset: start,
            source_partition: 0,
            surface: None,
            edit_measured: 0,
            edit_distance_sum: 0,
            time_to_accept_ms: Vec::new(),
        }
    }

    fn policy() -> ReleasePolicy {
        ReleasePolicy { min_shown_per_arm: 100, max_canary_ms: 3_600_000, ..ReleasePolicy::default() }
    }

    fn started(state: &mut GateState, c: ModelCandidate, now: i64) -> RegistryEntry {
        let p = policy();
        state.candidate(c);
        let out = state.step(|_, _| &p, now);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].history.last().unwrap().action, ReleaseAction::CanaryStarted, "{:?}", out[0].history);
        out[0].clone()
    }

    #[test]
    fn the_offline_gate_names_every_failure_with_its_numbers() {
        let p = policy();
        let ok = offline(&candidate("a1", None, 0.80, 0.50), None, &p, 5);
        assert_eq!(ok.action, ReleaseAction::CanaryStarted, "{}", ok.reason);
        assert!((ok.statistics["accuracy_gain"] - 0.30).abs() < 1e-12);
        let small = offline(&candidate("a2", None, 0.51, 0.50), None, &p, 5);
        assert_eq!(small.action, ReleaseAction::Rejected);
        assert!(small.reason.contains("gain 0.010 < 0.020"), "{}", small.reason);
        let live = RegistryEntry {
            tenant: "acme".into(),
            base_model: "tiny".into(),
            revision: 3,
            live: Some(AdapterRef {
                adapter_version: "a0".into(),
                adapter_uri: String::new(),
                adapter_sha256: String::new(),
            }),
            canary: None,
            history: Vec::new(),
            updated_at: 0,
        };
        let stale = offline(&candidate("a3", None, 0.9, 0.5), Some(&live), &p, 5);
        assert!(stale.reason.contains("stale: trained from the base but a0 is live"), "{}", stale.reason);
        let mut far = candidate("a4", Some("a0"), 0.9, 0.5);
        far.kl_to_parent = -0.9;
        far.holdout_examples = 10;
        let far = offline(&far, Some(&live), &p, 5);
        assert!(far.reason.contains("KL to parent 0.900 > budget 0.500"), "{}", far.reason);
        assert!(far.reason.contains("holdout 10 < 50 examples"), "{}", far.reason);
        assert!(far.reason.contains("req-a4"), "lineage in the reason: {}", far.reason);
    }

    #[test]
    fn a_better_canary_is_promoted_and_becomes_the_parent_of_the_next() {
        let (p, mut state) = (policy(), GateState::default());
        let entry = started(&mut state, candidate("a1", None, 0.8, 0.5), 1_000);
        assert_eq!((entry.revision, entry.canary.as_ref().unwrap().traffic_share), (1, 0.2));
        assert!(entry.live.is_none());
        // Too little traffic yet: no decision.
        state.metrics.add(window(Some("a1"), 60_000, 20, 8, 10));
        state.metrics.add(window(None, 60_000, 80, 16, 10));
        assert!(state.step(|_, _| &p, 61_000).is_empty());
        // A window that began before the canary does not count, nor does a
        // window of another length, nor the same window twice.
        state.metrics.add(window(Some("a1"), 0, 1000, 1000, 10));
        let mut hour = window(Some("a1"), 60_000, 1000, 1000, 10);
        hour.window_end = 60_000 + 3_600_000;
        state.metrics.add(hour);
        assert!(!state.metrics.add(window(Some("a1"), 60_000, 20, 8, 10)));
        assert_eq!(state.metrics.arm("acme", "tiny", Some("a1"), 1_000, 60_000).shown, 20);
        // Accept rate 0.4 vs 0.2 over enough windows: promoted.
        let mut out = Vec::new();
        for i in 2..40 {
            state.metrics.add(window(Some("a1"), i * 60_000, 20, 8, 10));
            state.metrics.add(window(None, i * 60_000, 80, 16, 10));
            out = state.step(|_, _| &p, i * 60_000 + 1);
            if !out.is_empty() {
                break;
            }
        }
        assert_eq!(out.len(), 1, "promoted within 40 windows");
        let d = out[0].history.last().unwrap();
        assert_eq!(d.action, ReleaseAction::Promoted, "{}", d.reason);
        assert!(d.statistics["mean_reward_p_value"] <= 0.05 && d.statistics["mean_reward_difference"] > 0.0);
        assert_eq!(out[0].live.as_ref().unwrap().adapter_version, "a1");
        assert!(out[0].canary.is_none());
        // The next candidate must come from a1.
        state.candidate(candidate("a2", None, 0.9, 0.5));
        let out = state.step(|_, _| &p, 10_000_000);
        assert_eq!(out[0].history.last().unwrap().action, ReleaseAction::Rejected);
        let entry = started(&mut state, candidate("a3", Some("a1"), 0.9, 0.8), 10_000_001);
        assert_eq!(entry.revision, 4, "canary, promotion, rejection, canary");
        // A candidate decided before is not decided again (restart replay).
        state.candidate(candidate("a2", None, 0.9, 0.5));
        state.candidate(candidate("a3", Some("a1"), 0.9, 0.8));
        assert!(state.queued.values().all(VecDeque::is_empty));
    }

    #[test]
    fn a_worse_canary_is_rolled_back_and_the_live_adapter_stays() {
        let (p, mut state) = (policy(), GateState::default());
        started(&mut state, candidate("a1", None, 0.8, 0.5), 0);
        let mut out = Vec::new();
        for i in 1..60 {
            state.metrics.add(window(Some("a1"), i * 60_000, 20, 2, 10));
            state.metrics.add(window(None, i * 60_000, 80, 24, 10));
            out = state.step(|_, _| &p, i * 60_000 + 1);
            if !out.is_empty() {
                break;
            }
        }
        let d = out[0].history.last().unwrap();
        assert_eq!(d.action, ReleaseAction::RolledBack, "{}", d.reason);
        assert!(d.reason.starts_with("significantly worse"), "{}", d.reason);
        assert!(out[0].live.is_none() && out[0].canary.is_none());
    }

    #[test]
    fn a_collapsed_completion_length_trips_the_guardrail_even_with_more_accepts() {
        let (p, mut state) = (policy(), GateState::default());
        started(&mut state, candidate("a1", None, 0.8, 0.5), 0);
        for i in 1..10 {
            state.metrics.add(window(Some("a1"), i * 60_000, 20, 10, 2));
            state.metrics.add(window(None, i * 60_000, 80, 16, 40));
        }
        let out = state.step(|_, _| &p, 10 * 60_000);
        let d = out[0].history.last().unwrap();
        assert_eq!(d.action, ReleaseAction::RolledBack);
        assert!(d.reason.contains("completion length collapsed to 5 % of control"), "{}", d.reason);
    }

    #[test]
    fn an_undecided_canary_expires_and_the_queue_moves_on() {
        let (p, mut state) = (policy(), GateState::default());
        started(&mut state, candidate("a1", None, 0.8, 0.5), 0);
        state.candidate(candidate("a2", None, 0.7, 0.5));
        for i in 1..4 {
            state.metrics.add(window(Some("a1"), i * 60_000, 50, 10, 10));
            state.metrics.add(window(None, i * 60_000, 200, 40, 10));
        }
        assert!(state.step(|_, _| &p, 3_599_999).is_empty(), "equal arms, not yet expired");
        let out = state.step(|_, _| &p, 3_600_000);
        assert_eq!(out.len(), 2, "expiry, then the queued candidate starts");
        assert_eq!(out[0].history.last().unwrap().action, ReleaseAction::Expired);
        assert_eq!(out[1].canary.as_ref().unwrap().adapter.adapter_version, "a2");
        assert_eq!(out[1].revision, out[0].revision + 1);
    }

    #[test]
    fn windows_that_differ_only_in_arm_or_surface_are_all_counted() {
        let mut store = MetricsStore::default();
        let mut canary = window(Some("a1"), 0, 10, 4, 10);
        canary.experiment_arm = Some("canary".into());
        let mut live = canary.clone();
        live.experiment_arm = Some("live".into());
        live.shown = 20;
        assert!(store.add(canary.clone()) && store.add(live));
        assert!(!store.add(canary), "the same record twice is kept once");
        let mut other_surface = window(Some("a1"), 0, 5, 0, 10);
        other_surface.experiment_arm = Some("live".into());
        other_surface.surface = Some("chat".into());
        assert!(store.add(other_surface));
        assert_eq!(store.arm("acme", "tiny", Some("a1"), 0, 60_000).shown, 35);
    }
}
