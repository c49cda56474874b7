//! The per-partition event-time join: interaction events of one suggestion
//! (one Kafka key, hence one partition) are collected until the suggestion's
//! window closes in event time, then exactly one reward is emitted.
//!
//! Everything here is a deterministic function of the input records in offset
//! order and of the configuration: no wall clock, no hash-map iteration order.
//! A replay from the same offset with the same state therefore emits the same
//! records with the same ids and lineage, which is what the exactly-once
//! contract rests on (ARCHITECTURE.md).

use std::collections::BTreeSet;

use foldhash::HashMap;

use flywheel_core::records::{
    EpochMillis, Interaction, InteractionPayload, Lineage, Outcome, Reward, RewardMetrics, RewardSignals,
    SuggestionShown,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::reward_fn::{RewardFunction, edit_distance};
use crate::window_metrics::WindowedMetrics;

/// Join settings.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinConfig {
    /// How long after being shown a suggestion's signals count.
    pub outcome_window_ms: i64,
    /// Extra event-time wait for out-of-order events before a window closes.
    pub allowed_lateness_ms: i64,
    /// Most suggestions held open at once; beyond it the ones closest to
    /// closing are closed early (counted), never an out-of-memory.
    pub max_open_suggestions: usize,
    /// How long (event time) closed suggestion ids are remembered so that
    /// their stragglers are recognised as late rather than as orphans.
    pub closed_retention_ms: i64,
    /// Lengths of the tumbling metrics windows; empty disables metrics.
    pub metrics_windows_ms: Vec<i64>,
}

impl Default for JoinConfig {
    fn default() -> Self {
        JoinConfig {
            outcome_window_ms: 10 * 60 * 1000,
            allowed_lateness_ms: 60 * 1000,
            max_open_suggestions: 1_000_000,
            closed_retention_ms: 24 * 3600 * 1000,
            metrics_windows_ms: vec![60_000, 3_600_000],
        }
    }
}

/// What processing a record produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Emitted {
    /// A suggestion's reward.
    Reward(Box<Reward>),
    /// An event that arrived after its suggestion's window closed.
    Late {
        /// Its offset.
        offset: i64,
        /// The event.
        event: Box<Interaction>,
    },
    /// An event whose suggestion was never shown within the window.
    Orphan {
        /// Its offset.
        offset: i64,
        /// The event.
        event: Box<Interaction>,
    },
    /// A metrics window's statistics (see [`crate::window_metrics`]).
    Metrics(Box<RewardMetrics>),
}

/// Counts for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinCounters {
    /// Events ignored because their event_id was already seen.
    pub duplicates: u64,
    /// Events emitted as late.
    pub late: u64,
    /// Events emitted as orphans.
    pub orphans: u64,
    /// Suggestions closed early because of the open-suggestion cap.
    pub closed_early: u64,
    /// Rewards emitted.
    pub rewards: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Held {
    offset: i64,
    event: Interaction,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OpenSuggestion {
    shown: Option<Held>,
    others: Vec<Held>,
    deadline: EpochMillis,
}

/// Everything a partition's join remembers; serialisable so it can be
/// checkpointed and restored on another instance.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct JoinState {
    open: HashMap<String, OpenSuggestion>,
    by_deadline: BTreeSet<(EpochMillis, String)>,
    /// Closed suggestions by [`id_fingerprint`]: a million of them per
    /// partition per day, so 8 bytes each instead of the id.
    closed: HashMap<u64, EpochMillis>,
    closed_by_deadline: BTreeSet<(EpochMillis, u64)>,
    max_event_time: EpochMillis,
    counters: JoinCounters,
    #[serde(default)]
    metrics: WindowedMetrics,
}

/// The join of one input partition: its state plus the configuration that
/// decides what the state turns into.
#[derive(Debug)]
pub struct PartitionJoiner {
    topic: String,
    partition: i32,
    config: JoinConfig,
    reward_fn: RewardFunction,
    state: JoinState,
}

/// The first 8 bytes of SHA-256 of a suggestion id: stable across versions and
/// restarts (it is checkpointed), and collision-free in practice (about 1 in
/// 10^13 per new suggestion against a million remembered ones; a collision
/// would send that suggestion's events to the late topic, never drop them).
fn id_fingerprint(suggestion_id: &str) -> u64 {
    let digest = Sha256::digest(suggestion_id.as_bytes());
    u64::from_be_bytes(digest[..8].try_into().expect("8 of 32 bytes"))
}

/// Deterministic reward id.
pub(crate) fn reward_id(tenant: &str, suggestion_id: &str, reward_fn_version: &str) -> String {
    let digest = Sha256::new()
        .chain_update(tenant)
        .chain_update([0])
        .chain_update(suggestion_id)
        .chain_update([0])
        .chain_update(reward_fn_version)
        .finalize();
    flywheel_core::hex(&digest)
}

impl JoinState {
    /// Rewrites the JSON of a state checkpointed before closed suggestions
    /// were kept as fingerprints (ids as strings) into the current form; a
    /// current state is returned unchanged. `None` when it is neither.
    pub(crate) fn migrate_json(mut state: serde_json::Value) -> Option<serde_json::Value> {
        use serde_json::Value;
        let legacy = state["closed_by_deadline"]
            .as_array()
            .is_some_and(|entries| entries.iter().any(|e| e.get(1).is_some_and(Value::is_string)));
        if !legacy {
            return Some(state);
        }
        let closed = state.get_mut("closed")?.as_object_mut()?;
        let migrated: serde_json::Map<String, Value> =
            closed.iter().map(|(id, t)| (id_fingerprint(id).to_string(), t.clone())).collect();
        *closed = migrated;
        for entry in state.get_mut("closed_by_deadline")?.as_array_mut()? {
            let id = entry.get(1)?.as_str()?.to_string();
            entry[1] = Value::from(id_fingerprint(&id));
        }
        Some(state)
    }
}

impl PartitionJoiner {
    /// An empty joiner for one partition of `topic`.
    pub fn new(topic: &str, partition: i32, config: JoinConfig, reward_fn: RewardFunction) -> Self {
        PartitionJoiner {
            topic: topic.to_string(),
            partition,
            config,
            reward_fn,
            state: JoinState { max_event_time: i64::MIN, ..JoinState::default() },
        }
    }

    /// A joiner resuming from a checkpointed state.
    pub(crate) fn restore(
        topic: &str,
        partition: i32,
        config: JoinConfig,
        reward_fn: RewardFunction,
        state: JoinState,
    ) -> Self {
        PartitionJoiner { topic: topic.to_string(), partition, config, reward_fn, state }
    }

    /// The state, for checkpoints.
    pub(crate) fn state(&self) -> &JoinState {
        &self.state
    }

    /// The reward function version in use.
    pub(crate) fn reward_fn_version(&self) -> &str {
        &self.reward_fn.version
    }

    /// Counters so far.
    pub fn counters(&self) -> JoinCounters {
        self.state.counters
    }

    /// Suggestions currently open.
    pub fn open_suggestions(&self) -> usize {
        self.state.open.len()
    }

    fn window_end(&self, start: EpochMillis) -> EpochMillis {
        start.saturating_add(self.config.outcome_window_ms).saturating_add(self.config.allowed_lateness_ms)
    }

    /// Processes the record at `offset`, appending what it produced to `out`.
    pub fn process(&mut self, offset: i64, event: Interaction, out: &mut Vec<Emitted>) {
        self.state.max_event_time = self.state.max_event_time.max(event.event_time);
        if self.state.closed.contains_key(&id_fingerprint(&event.suggestion_id)) {
            self.state.counters.late += 1;
            out.push(Emitted::Late { offset, event: Box::new(event) });
        } else {
            self.add(offset, event);
        }
        self.close_due(offset, out);
        self.evict_if_over_cap(offset, out);
        self.publish_due_metrics(offset, out);
        self.forget_old_closed();
    }

    /// Advances event time without a record (an idle partition, when the
    /// operator enabled processing-time advance) and closes what is due.
    pub fn advance_to(&mut self, event_time: EpochMillis, offset: i64, out: &mut Vec<Emitted>) {
        self.state.max_event_time = self.state.max_event_time.max(event_time);
        self.close_due(offset, out);
        self.publish_due_metrics(offset, out);
        self.forget_old_closed();
    }

    /// Metrics windows not yet published.
    pub fn open_metrics_windows(&self) -> usize {
        self.state.metrics.open_windows()
    }

    fn publish_due_metrics(&mut self, offset: i64, out: &mut Vec<Emitted>) {
        let due =
            self.state.metrics.take_due(self.state.max_event_time, &self.reward_fn.version, self.partition, offset);
        out.extend(due.into_iter().map(|m| Emitted::Metrics(Box::new(m))));
    }

    fn add(&mut self, offset: i64, event: Interaction) {
        let default_deadline = self.window_end(event.event_time);
        let is_shown = matches!(event.payload, InteractionPayload::Shown(_));
        let id = event.suggestion_id.clone();
        let entry = self.state.open.entry(id.clone()).or_insert_with(|| OpenSuggestion {
            shown: None,
            others: Vec::new(),
            deadline: default_deadline,
        });
        // A handful of events per suggestion: a scan beats a set.
        let seen = entry.shown.iter().chain(&entry.others).any(|h| h.event.event_id == event.event_id);
        if seen || (is_shown && entry.shown.is_some()) {
            // Same event_id again (client retry), or a second "shown" for the
            // same suggestion: the first one wins.
            self.state.counters.duplicates += 1;
            return;
        }
        let old_deadline = entry.deadline;
        if is_shown {
            entry.deadline = default_deadline;
            entry.shown = Some(Held { offset, event });
        } else {
            entry.others.push(Held { offset, event });
        }
        let new_deadline = entry.deadline;
        if old_deadline != new_deadline {
            self.state.by_deadline.remove(&(old_deadline, id.clone()));
        }
        self.state.by_deadline.insert((new_deadline, id));
    }

    fn close_due(&mut self, offset: i64, out: &mut Vec<Emitted>) {
        while let Some((deadline, _)) = self.state.by_deadline.first()
            && *deadline <= self.state.max_event_time
        {
            let (_, id) = self.state.by_deadline.pop_first().expect("non-empty");
            self.close(&id, offset, out);
        }
    }

    fn evict_if_over_cap(&mut self, offset: i64, out: &mut Vec<Emitted>) {
        while self.state.open.len() > self.config.max_open_suggestions {
            let (_, id) = self.state.by_deadline.pop_first().expect("open suggestions are indexed");
            self.state.counters.closed_early += 1;
            self.close(&id, offset, out);
        }
    }

    fn forget_old_closed(&mut self) {
        let horizon = self.state.max_event_time.saturating_sub(self.config.closed_retention_ms);
        while let Some((deadline, _)) = self.state.closed_by_deadline.first()
            && *deadline < horizon
        {
            let (_, id) = self.state.closed_by_deadline.pop_first().expect("non-empty");
            self.state.closed.remove(&id);
        }
    }

    fn close(&mut self, id: &str, offset: i64, out: &mut Vec<Emitted>) {
        let Some(mut s) = self.state.open.remove(id) else { return };
        let fingerprint = id_fingerprint(id);
        self.state.closed.insert(fingerprint, s.deadline);
        self.state.closed_by_deadline.insert((s.deadline, fingerprint));
        s.others.sort_by_key(|h| (h.event.event_time, h.offset));
        let Some(shown) = s.shown else {
            for h in s.others {
                self.state.counters.orphans += 1;
                out.push(Emitted::Orphan { offset: h.offset, event: Box::new(h.event) });
            }
            return;
        };
        // Signals after the window are not part of this reward: they are late.
        let (inside, outside): (Vec<Held>, Vec<Held>) =
            s.others.into_iter().partition(|h| h.event.event_time <= s.deadline);
        for h in outside {
            self.state.counters.late += 1;
            out.push(Emitted::Late { offset: h.offset, event: Box::new(h.event) });
        }
        let reward = self.reward(shown, &inside, s.deadline, offset);
        self.state.counters.rewards += 1;
        let wait = self.config.outcome_window_ms.saturating_add(self.config.allowed_lateness_ms);
        self.state.metrics.add(&reward, &self.config.metrics_windows_ms, wait);
        out.push(Emitted::Reward(Box::new(reward)));
    }

    fn reward(&self, shown: Held, others: &[Held], deadline: EpochMillis, offset: i64) -> Reward {
        let Held { offset: shown_offset, event: e } = shown;
        let InteractionPayload::Shown(s) = e.payload else { unreachable!("shown holds a shown event") };
        let s: SuggestionShown = s;
        let mut outcome = Outcome::Ignored;
        let mut signals = RewardSignals { event_count: 1 + others.len() as i32, ..RewardSignals::default() };
        for h in others {
            match &h.event.payload {
                InteractionPayload::Accepted(a) if outcome == Outcome::Ignored => {
                    outcome = Outcome::Accepted;
                    signals.time_to_accept_ms = Some(a.time_to_accept_ms);
                }
                InteractionPayload::Rejected(_) if outcome == Outcome::Ignored => outcome = Outcome::Rejected,
                InteractionPayload::Dismissed(_) if outcome == Outcome::Ignored => outcome = Outcome::Dismissed,
                InteractionPayload::Edited(e) => {
                    if let Some(t) = &e.final_text {
                        signals.final_text = Some(t.clone());
                    }
                    signals.edit_distance =
                        e.edit_distance.or_else(|| e.final_text.as_deref().map(|t| edit_distance(&s.completion, t)));
                }
                InteractionPayload::Rated(r) => {
                    if let Some(n) = r.normalized() {
                        signals.rating = Some(n);
                    }
                }
                InteractionPayload::FollowUp(f) => signals.follow_ups.push(f.action),
                InteractionPayload::TaskCompleted(t) => signals.task_completed = Some(t.success.unwrap_or(true)),
                _ => {}
            }
        }
        let components = self.reward_fn.components(outcome, &signals, &s.completion);
        let first_offset = others.iter().map(|h| h.offset).chain([shown_offset]).min().unwrap_or(shown_offset);
        Reward {
            reward_id: reward_id(&e.tenant, &e.suggestion_id, &self.reward_fn.version),
            tenant: e.tenant,
            user_id: e.user_id,
            session_id: e.session_id,
            suggestion_id: e.suggestion_id,
            model_id: s.model_id,
            adapter_version: s.adapter_version,
            experiment_arm: s.experiment_arm,
            surface: s.surface,
            prompt: s.prompt,
            completion: s.completion,
            behavior_logprob: s.behavior_logprob,
            shown_time: e.event_time,
            window_close_time: deadline,
            outcome,
            reward: components.sum(),
            components,
            signals,
            reward_fn_version: self.reward_fn.version.clone(),
            lineage: Lineage {
                topic: self.topic.clone(),
                partition: self.partition,
                first_offset,
                last_offset: offset,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_core::records::*;

    const T0: i64 = 1_795_424_400_000;
    const MIN: i64 = 60_000;

    fn event(n: u32, suggestion: &str, t: i64, payload: InteractionPayload) -> Interaction {
        Interaction {
            event_id: format!("00000000-0000-4000-8000-{n:012}"),
            event_time: t,
            received_time: t,
            tenant: "acme".into(),
            user_id: "u1".into(),
            session_id: None,
            suggestion_id: suggestion.into(),
            payload,
            attributes: Default::default(),
        }
    }

    fn shown(n: u32, suggestion: &str, t: i64) -> Interaction {
        event(
            n,
            suggestion,
            t,
            InteractionPayload::Shown(SuggestionShown {
                model_id: "m".into(),
                adapter_version: Some("a1".into()),
                experiment_arm: Some("live".into()),
                surface: "editor".into(),
                prompt: "p".into(),
                completion: "0123456789".into(),
                behavior_logprob: Some(-1.0),
                latency_ms: 10,
            }),
        )
    }

    fn joiner() -> PartitionJoiner {
        // 10 min window + 1 min lateness.
        PartitionJoiner::new("interactions", 3, JoinConfig::default(), RewardFunction::default())
    }

    /// Feeds events at consecutive offsets from 100 and returns every output.
    fn run(j: &mut PartitionJoiner, events: Vec<Interaction>) -> Vec<Emitted> {
        let mut out = Vec::new();
        for (i, e) in events.into_iter().enumerate() {
            j.process(100 + i as i64, e, &mut out);
        }
        out
    }

    fn rewards(out: &[Emitted]) -> Vec<&Reward> {
        out.iter().filter_map(|e| if let Emitted::Reward(r) = e { Some(r.as_ref()) } else { None }).collect()
    }

    /// An event on another suggestion far in event time, to move the watermark.
    fn tick(n: u32, t: i64) -> Interaction {
        shown(n, &format!("tick-{n}"), t)
    }

    #[test]
    fn accepted_edited_rated_thanked_completed() {
        let mut j = joiner();
        let out = run(
            &mut j,
            vec![
                shown(1, "s", T0),
                event(2, "s", T0 + 1000, InteractionPayload::Accepted(SuggestionAccepted { time_to_accept_ms: 1000 })),
                // "0123456789" → "01234567xx": distance 2 of 10 chars.
                event(
                    3,
                    "s",
                    T0 + 5000,
                    InteractionPayload::Edited(SuggestionEdited {
                        final_text: Some("01234567xx".into()),
                        edit_distance: None,
                    }),
                ),
                event(
                    4,
                    "s",
                    T0 + 6000,
                    InteractionPayload::Rated(SuggestionRated { score: 5.0, scale_min: 1.0, scale_max: 5.0 }),
                ),
                event(
                    5,
                    "s",
                    T0 + 7000,
                    InteractionPayload::FollowUp(FollowUp { action: FollowUpAction::Thanks, detail: None }),
                ),
                event(
                    6,
                    "s",
                    T0 + 8000,
                    InteractionPayload::TaskCompleted(TaskCompleted { duration_ms: 8000, success: None }),
                ),
                tick(7, T0 + 11 * MIN),
            ],
        );
        let r = rewards(&out);
        assert_eq!(r.len(), 1);
        let r = r[0];
        assert_eq!(r.outcome, Outcome::Accepted);
        // Hand-computed under the defaults: 0.75 accepted; edit ratio 0.2 →
        // -0.5 * (0.2 - 0.1) / 0.9; rating +1 * 0.5; thanks +0.25; task +0.25.
        let expected = 0.75 - 0.5 * 0.1 / 0.9 + 0.5 + 0.25 + 0.25;
        assert!((r.reward - expected).abs() < 1e-12, "{} vs {expected}", r.reward);
        assert_eq!(r.signals.edit_distance, Some(2));
        assert_eq!(r.signals.time_to_accept_ms, Some(1000));
        assert_eq!(r.signals.rating, Some(1.0));
        assert_eq!(r.signals.follow_ups, vec![FollowUpAction::Thanks]);
        assert_eq!(r.signals.task_completed, Some(true));
        assert_eq!(r.signals.event_count, 6);
        assert_eq!(r.window_close_time, T0 + 11 * MIN);
        assert_eq!(
            r.lineage,
            Lineage { topic: "interactions".into(), partition: 3, first_offset: 100, last_offset: 106 }
        );
        assert_eq!(r.reward_id, reward_id("acme", "s", "cursor-default-v1"));
        assert_eq!((r.adapter_version.as_deref(), r.experiment_arm.as_deref()), (Some("a1"), Some("live")));
    }

    #[test]
    fn rejected_dismissed_and_ignored() {
        let mut j = joiner();
        let out = run(
            &mut j,
            vec![
                shown(1, "r", T0),
                event(2, "r", T0 + 1, InteractionPayload::Rejected(SuggestionRejected::default())),
                shown(3, "d", T0),
                event(4, "d", T0 + 1, InteractionPayload::Dismissed(SuggestionDismissed::default())),
                shown(5, "i", T0),
                tick(6, T0 + 11 * MIN),
            ],
        );
        let by_id: HashMap<&str, (Outcome, f64)> =
            rewards(&out).into_iter().map(|r| (r.suggestion_id.as_str(), (r.outcome, r.reward))).collect();
        assert_eq!(by_id["r"], (Outcome::Rejected, -0.25));
        assert_eq!(by_id["d"], (Outcome::Dismissed, -0.1));
        assert_eq!(by_id["i"], (Outcome::Ignored, 0.0));
    }

    #[test]
    fn windows_close_only_when_the_watermark_passes_them() {
        let mut j = joiner();
        let out = run(&mut j, vec![shown(1, "s", T0), tick(2, T0 + 11 * MIN - 1)]);
        assert!(rewards(&out).is_empty(), "not closed one millisecond early");
        let out = run(&mut j, vec![tick(3, T0 + 11 * MIN)]);
        assert_eq!(rewards(&out).len(), 1, "closed exactly at shown + window + lateness");
    }

    #[test]
    fn duplicates_out_of_order_late_and_orphans() {
        let mut j = joiner();
        let accepted =
            event(2, "s", T0 + 1000, InteractionPayload::Accepted(SuggestionAccepted { time_to_accept_ms: 1000 }));
        let out = run(
            &mut j,
            vec![
                // The outcome arrives before the shown event (out of order).
                accepted.clone(),
                shown(1, "s", T0),
                accepted.clone(),      // client retry: same event_id
                shown(9, "s", T0 + 5), // a second shown for the same suggestion
                // An event for a suggestion never shown.
                event(3, "ghost", T0 + 2000, InteractionPayload::Rejected(SuggestionRejected::default())),
                tick(4, T0 + 12 * MIN),
                // After close: late.
                event(
                    5,
                    "s",
                    T0 + 3000,
                    InteractionPayload::Rated(SuggestionRated { score: 1.0, scale_min: 1.0, scale_max: 5.0 }),
                ),
            ],
        );
        let r = rewards(&out);
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].outcome, r[0].signals.event_count), (Outcome::Accepted, 2));
        assert_eq!(r[0].lineage.first_offset, 100);
        let orphans: Vec<_> = out.iter().filter(|e| matches!(e, Emitted::Orphan { .. })).collect();
        assert!(matches!(orphans.as_slice(), [Emitted::Orphan { offset: 104, .. }]), "{orphans:?}");
        assert!(matches!(out.last(), Some(Emitted::Late { offset: 106, .. })));
        let c = j.counters();
        assert_eq!((c.duplicates, c.late, c.orphans, c.rewards), (2, 1, 1, 1));
    }

    #[test]
    fn signals_after_the_window_are_late_not_part_of_the_reward() {
        let mut j = joiner();
        let out = run(
            &mut j,
            vec![
                shown(1, "s", T0),
                // Event time past the window, but arriving before it closed.
                event(2, "s", T0 + 20 * MIN, InteractionPayload::Accepted(SuggestionAccepted { time_to_accept_ms: 1 })),
            ],
        );
        let r = rewards(&out);
        assert_eq!(r[0].outcome, Outcome::Ignored);
        assert!(out.iter().any(|e| matches!(e, Emitted::Late { offset: 101, .. })));
    }

    #[test]
    fn advancing_an_idle_partition_closes_due_windows() {
        let mut j = joiner();
        let mut out = run(&mut j, vec![shown(1, "s", T0)]);
        j.advance_to(T0 + 11 * MIN - 1, 100, &mut out);
        assert!(rewards(&out).is_empty());
        j.advance_to(T0 + 11 * MIN, 100, &mut out);
        let r = rewards(&out);
        assert_eq!((r.len(), r[0].outcome, r[0].lineage.last_offset), (1, Outcome::Ignored, 100));
        assert_eq!(r[0].components.follow_up.to_bits(), 0.0f64.to_bits(), "+0.0, not -0.0");
    }

    #[test]
    fn the_open_suggestion_cap_closes_the_oldest_early() {
        let config = JoinConfig { max_open_suggestions: 2, ..JoinConfig::default() };
        let mut j = PartitionJoiner::new("interactions", 0, config, RewardFunction::default());
        let out = run(&mut j, vec![shown(1, "a", T0), shown(2, "b", T0 + 1), shown(3, "c", T0 + 2)]);
        let r = rewards(&out);
        assert_eq!((r.len(), r[0].suggestion_id.as_str(), r[0].outcome), (1, "a", Outcome::Ignored));
        assert_eq!((j.open_suggestions(), j.counters().closed_early), (2, 1));
    }

    #[test]
    fn a_restored_checkpoint_continues_exactly_like_the_original() {
        let input: Vec<Interaction> = vec![
            shown(1, "s1", T0),
            event(2, "s1", T0 + 5, InteractionPayload::Accepted(SuggestionAccepted { time_to_accept_ms: 5 })),
            shown(3, "s2", T0 + 10),
            event(4, "s3", T0 + 15, InteractionPayload::Rejected(SuggestionRejected::default())),
            event(5, "s2", T0 + 20, InteractionPayload::Rejected(SuggestionRejected::default())),
            tick(6, T0 + 30 * MIN),
            event(
                7,
                "s1",
                T0 + 40,
                InteractionPayload::Rated(SuggestionRated { score: 2.0, scale_min: 1.0, scale_max: 5.0 }),
            ),
        ];
        let uninterrupted = run(&mut joiner(), input.clone());
        for cut in 0..input.len() {
            let mut first = joiner();
            let mut out = run(&mut first, input[..cut].to_vec());
            let json = serde_json::to_string(first.state()).unwrap();
            let state: JoinState = serde_json::from_str(&json).unwrap();
            let mut resumed =
                PartitionJoiner::restore("interactions", 3, JoinConfig::default(), RewardFunction::default(), state);
            for (i, e) in input[cut..].iter().cloned().enumerate() {
                resumed.process(100 + (cut + i) as i64, e, &mut out);
            }
            assert_eq!(out, uninterrupted, "cut at {cut}");
        }
    }

    fn metrics(out: &[Emitted]) -> Vec<&RewardMetrics> {
        out.iter().filter_map(|e| if let Emitted::Metrics(m) = e { Some(m.as_ref()) } else { None }).collect()
    }

    #[test]
    fn a_metrics_window_is_published_once_every_suggestion_shown_in_it_has_closed() {
        let config = JoinConfig { metrics_windows_ms: vec![MIN], ..JoinConfig::default() };
        let mut j = PartitionJoiner::new("interactions", 3, config, RewardFunction::default());
        // Window [T0, T0 + 1 min): due at T0 + 1 min - 1 + 10 min + 1 min.
        let accept = |n, s: &str, t, tta| {
            event(n, s, t, InteractionPayload::Accepted(SuggestionAccepted { time_to_accept_ms: tta }))
        };
        let mut out = run(
            &mut j,
            vec![
                shown(1, "a", T0),
                accept(2, "a", T0 + 700, 700),
                shown(3, "b", T0 + MIN - 1),
                accept(4, "b", T0 + MIN + 100, 101),
                shown(5, "c", T0 + 30_000),
                event(6, "c", T0 + 30_001, InteractionPayload::Rejected(SuggestionRejected::default())),
                tick(7, T0 + 12 * MIN - 2),
            ],
        );
        assert_eq!(rewards(&out).len(), 2, "a and c closed");
        assert!(metrics(&out).is_empty(), "b, shown in the window, is still open");
        j.process(200, tick(8, T0 + 12 * MIN - 1), &mut out);
        let m = metrics(&out);
        assert_eq!(m.len(), 1);
        let m = m[0];
        assert_eq!((m.window_start, m.window_end, m.source_partition, m.emitted_at_offset), (T0, T0 + MIN, 3, 200));
        assert_eq!((m.shown, m.accepted, m.rejected, m.ignored), (3, 2, 1, 0));
        assert_eq!(m.time_to_accept_ms, vec![101, 700], "ascending");
        assert_eq!((m.surface.as_deref(), m.adapter_version.as_deref()), (Some("editor"), Some("a1")));
        assert!((m.reward_sum - (0.75 + 0.75 - 0.25)).abs() < 1e-12);
        assert_eq!((j.open_metrics_windows(), j.open_suggestions()), (0, 2), "the ticks are still open suggestions");
    }

    #[test]
    fn a_reward_for_an_already_published_window_is_published_as_an_extra_record() {
        let config = JoinConfig { metrics_windows_ms: vec![MIN], ..JoinConfig::default() };
        let mut j = PartitionJoiner::new("interactions", 0, config, RewardFunction::default());
        let out = run(&mut j, vec![shown(1, "a", T0), tick(2, T0 + 13 * MIN), shown(3, "late", T0 + 5)]);
        let m = metrics(&out);
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!((m[0].window_start, m[0].shown, m[0].emitted_at_offset), (T0, 1, 101));
        assert_eq!((m[1].window_start, m[1].shown, m[1].emitted_at_offset), (T0, 1, 102));
        assert_ne!(
            crate::window_metrics::metrics_record_id(m[0]),
            crate::window_metrics::metrics_record_id(m[1]),
            "both records of the window are kept apart by consumers"
        );
    }

    #[test]
    fn replays_are_identical_and_versions_change_ids() {
        let input = || {
            vec![
                shown(1, "s1", T0),
                shown(2, "s2", T0 + 10),
                event(3, "s2", T0 + 20, InteractionPayload::Rejected(SuggestionRejected::default())),
                event(
                    4,
                    "s1",
                    T0 + 30,
                    InteractionPayload::FollowUp(FollowUp { action: FollowUpAction::Regenerate, detail: None }),
                ),
                tick(5, T0 + 30 * MIN),
            ]
        };
        let a = run(&mut joiner(), input());
        let b = run(&mut joiner(), input());
        assert_eq!(a, b);
        let strict = RewardFunction { version: "strict-v2".into(), ..RewardFunction::default() };
        let c = run(&mut PartitionJoiner::new("interactions", 3, JoinConfig::default(), strict), input());
        assert_ne!(rewards(&a)[0].reward_id, rewards(&c)[0].reward_id);
        assert_eq!(rewards(&c)[0].reward_fn_version, "strict-v2");
    }
}
