//! Rolling reward metrics: tumbling event-time windows over the rewards one
//! partition emits, keyed by the served version (tenant, model, adapter,
//! experiment arm, surface).
//!
//! A reward belongs to the window containing its suggestion's shown time. A
//! window is published once every suggestion shown in it has closed, i.e. when
//! the partition watermark reaches `window_end - 1 + outcome window +
//! lateness`. A reward that still lands in a published window (its shown event
//! arrived after that point) is published at once as an extra record for the
//! same window. The records are sufficient statistics, so adding all records of
//! a window gives exactly the statistics of every reward shown in it: the
//! numbers are reproducible from the reward records alone.

use std::collections::{BTreeMap, HashSet};

use flywheel_core::records::{EpochMillis, Outcome, Reward, RewardMetrics};
use serde::{Deserialize, Serialize};

/// Which window, of which version, closes when.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct WindowKey {
    due: EpochMillis,
    window_ms: i64,
    start: EpochMillis,
    tenant: String,
    model_id: String,
    adapter_version: Option<String>,
    experiment_arm: Option<String>,
    surface: String,
}

/// One window's running statistics.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct OpenWindow {
    due: EpochMillis,
    metrics: RewardMetrics,
    users: HashSet<String>,
}

impl OpenWindow {
    fn key(&self) -> WindowKey {
        let m = &self.metrics;
        WindowKey {
            due: self.due,
            window_ms: m.window_end - m.window_start,
            start: m.window_start,
            tenant: m.tenant.clone(),
            model_id: m.model_id.clone(),
            adapter_version: m.adapter_version.clone(),
            experiment_arm: m.experiment_arm.clone(),
            surface: m.surface.clone().unwrap_or_default(),
        }
    }
}

/// The open windows of one partition, ordered by when they are due; a
/// checkpoint stores them as a list (JSON maps need string keys).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(from = "Vec<OpenWindow>", into = "Vec<OpenWindow>")]
pub struct WindowedMetrics {
    open: BTreeMap<WindowKey, OpenWindow>,
}

impl From<Vec<OpenWindow>> for WindowedMetrics {
    fn from(list: Vec<OpenWindow>) -> Self {
        WindowedMetrics { open: list.into_iter().map(|w| (w.key(), w)).collect() }
    }
}

impl From<WindowedMetrics> for Vec<OpenWindow> {
    fn from(m: WindowedMetrics) -> Self {
        m.open.into_values().collect()
    }
}

impl WindowedMetrics {
    /// Windows not yet published.
    pub fn open_windows(&self) -> usize {
        self.open.len()
    }

    /// Adds `reward` to its window of each length in `windows_ms`. `wait` is
    /// how long after a shown time its suggestion may still close (outcome
    /// window + lateness).
    pub fn add(&mut self, reward: &Reward, windows_ms: &[i64], wait: i64) {
        for &len in windows_ms {
            let start = reward.shown_time.div_euclid(len) * len;
            let end = start.saturating_add(len);
            let key = WindowKey {
                due: (end - 1).saturating_add(wait),
                window_ms: len,
                start,
                tenant: reward.tenant.clone(),
                model_id: reward.model_id.clone(),
                adapter_version: reward.adapter_version.clone(),
                experiment_arm: reward.experiment_arm.clone(),
                surface: reward.surface.clone(),
            };
            let w = self.open.entry(key).or_insert_with(|| OpenWindow {
                due: (end - 1).saturating_add(wait),
                metrics: empty(reward, start, end),
                users: HashSet::new(),
            });
            let m = &mut w.metrics;
            m.shown += 1;
            match reward.outcome {
                Outcome::Accepted => m.accepted += 1,
                Outcome::Rejected => m.rejected += 1,
                Outcome::Dismissed => m.dismissed += 1,
                Outcome::Ignored => m.ignored += 1,
            }
            m.reward_sum += reward.reward;
            m.reward_sum_sq += reward.reward * reward.reward;
            if let Some(r) = reward.signals.rating {
                m.rated += 1;
                m.rating_sum += r;
            }
            m.completion_chars_sum += reward.completion.chars().count() as i64;
            if reward.outcome == Outcome::Accepted {
                if let Some(d) = reward.signals.edit_distance {
                    m.edit_measured += 1;
                    m.edit_distance_sum += d;
                }
                if let Some(t) = reward.signals.time_to_accept_ms {
                    m.time_to_accept_ms.push(t);
                }
            }
            if w.users.insert(reward.user_id.clone()) {
                w.metrics.distinct_users += 1;
            }
        }
    }

    /// Removes and returns, in a deterministic order, every window due at
    /// `watermark`, stamped with where it was published.
    pub fn take_due(
        &mut self,
        watermark: EpochMillis,
        reward_fn_version: &str,
        partition: i32,
        offset: i64,
    ) -> Vec<RewardMetrics> {
        let mut out = Vec::new();
        while let Some(entry) = self.open.first_entry()
            && entry.key().due <= watermark
        {
            let mut m = entry.remove().metrics;
            m.time_to_accept_ms.sort_unstable();
            m.reward_fn_version = reward_fn_version.to_string();
            m.source_partition = partition;
            m.emitted_at_offset = offset;
            out.push(m);
        }
        out
    }
}

fn empty(reward: &Reward, start: EpochMillis, end: EpochMillis) -> RewardMetrics {
    RewardMetrics {
        tenant: reward.tenant.clone(),
        model_id: reward.model_id.clone(),
        adapter_version: reward.adapter_version.clone(),
        experiment_arm: reward.experiment_arm.clone(),
        window_start: start,
        window_end: end,
        shown: 0,
        accepted: 0,
        rejected: 0,
        dismissed: 0,
        ignored: 0,
        reward_sum: 0.0,
        reward_sum_sq: 0.0,
        rated: 0,
        rating_sum: 0.0,
        completion_chars_sum: 0,
        distinct_users: 0,
        reward_fn_version: String::new(),
        emitted_at_offset: 0,
        source_partition: 0,
        surface: Some(reward.surface.clone()),
        edit_measured: 0,
        edit_distance_sum: 0,
        time_to_accept_ms: Vec::new(),
    }
}

/// A stable id of a metrics record: replays publish the same record under
/// the same id, so read-back can skip it.
pub fn metrics_record_id(m: &RewardMetrics) -> String {
    format!(
        "m:{}:{}:{}:{}:{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}",
        m.source_partition,
        m.emitted_at_offset,
        m.window_start,
        m.window_end,
        m.tenant,
        m.model_id,
        m.adapter_version.as_deref().unwrap_or(""),
        m.experiment_arm.as_deref().unwrap_or(""),
        m.surface.as_deref().unwrap_or("")
    )
}
