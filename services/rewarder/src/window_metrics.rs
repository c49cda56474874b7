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

use std::collections::BTreeMap;

use flywheel_core::records::{EpochMillis, Outcome, Reward, RewardMetrics};
use foldhash::{HashMap, HashSet};
use serde::{Deserialize, Serialize};

/// Which window of which version closes when; versions are interned so the
/// per-reward path compares integers and allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct WindowKey {
    due: EpochMillis,
    window_ms: i64,
    start: EpochMillis,
    version: u32,
}

/// One window's running statistics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OpenWindow {
    due: EpochMillis,
    metrics: RewardMetrics,
    users: HashSet<String>,
}

/// tenant, model, adapter, arm and surface joined by NUL: one string per
/// served version.
fn version_of(m: &RewardMetrics) -> String {
    let mut out = String::new();
    write_version(&mut out, [&m.tenant, &m.model_id, opt(&m.adapter_version), opt(&m.experiment_arm), opt(&m.surface)]);
    out
}

fn opt(s: &Option<String>) -> &str {
    s.as_deref().unwrap_or("")
}

fn write_version(out: &mut String, parts: [&str; 5]) {
    out.clear();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            out.push('\0');
        }
        out.push_str(p);
    }
}

/// The open windows of one partition, ordered by when they are due; a
/// checkpoint stores them as a list (JSON maps need string keys).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(from = "Vec<OpenWindow>", into = "Vec<OpenWindow>")]
pub(crate) struct WindowedMetrics {
    open: BTreeMap<WindowKey, OpenWindow>,
    versions: Vec<String>,
    version_ids: HashMap<String, u32>,
    scratch: String,
}

impl From<Vec<OpenWindow>> for WindowedMetrics {
    fn from(list: Vec<OpenWindow>) -> Self {
        let mut out = WindowedMetrics::default();
        for w in list {
            let version = out.intern(&version_of(&w.metrics));
            let m = &w.metrics;
            let key =
                WindowKey { due: w.due, window_ms: m.window_end - m.window_start, start: m.window_start, version };
            out.open.insert(key, w);
        }
        out
    }
}

impl From<WindowedMetrics> for Vec<OpenWindow> {
    fn from(m: WindowedMetrics) -> Self {
        m.open.into_values().collect()
    }
}

impl WindowedMetrics {
    /// Windows not yet published.
    pub(crate) fn open_windows(&self) -> usize {
        self.open.len()
    }

    fn intern(&mut self, version: &str) -> u32 {
        if let Some(id) = self.version_ids.get(version) {
            return *id;
        }
        let id = self.versions.len() as u32;
        self.versions.push(version.to_string());
        self.version_ids.insert(version.to_string(), id);
        id
    }

    /// Adds `reward` to its window of each length in `windows_ms`. `wait` is
    /// how long after a shown time its suggestion may still close (outcome
    /// window + lateness).
    pub(crate) fn add(&mut self, reward: &Reward, windows_ms: &[i64], wait: i64) {
        let mut scratch = std::mem::take(&mut self.scratch);
        write_version(
            &mut scratch,
            [
                &reward.tenant,
                &reward.model_id,
                opt(&reward.adapter_version),
                opt(&reward.experiment_arm),
                &reward.surface,
            ],
        );
        let version = self.intern(&scratch);
        self.scratch = scratch;
        let completion_chars = reward.completion.chars().count() as i64;
        for &len in windows_ms {
            let start = reward.shown_time.div_euclid(len) * len;
            let end = start.saturating_add(len);
            let due = (end - 1).saturating_add(wait);
            let key = WindowKey { due, window_ms: len, start, version };
            let w = self.open.entry(key).or_insert_with(|| OpenWindow {
                due,
                metrics: empty(reward, start, end),
                users: HashSet::default(),
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
            m.completion_chars_sum += completion_chars;
            if reward.outcome == Outcome::Accepted {
                if let Some(d) = reward.signals.edit_distance {
                    m.edit_measured += 1;
                    m.edit_distance_sum += d;
                }
                if let Some(t) = reward.signals.time_to_accept_ms {
                    m.time_to_accept_ms.push(t);
                }
            }
            if !w.users.contains(&reward.user_id) {
                w.users.insert(reward.user_id.clone());
                w.metrics.distinct_users += 1;
            }
        }
    }

    /// Removes and returns every window due at `watermark`, stamped with where
    /// it was published, in an order that depends only on the windows (not on
    /// interning order, which a restore changes).
    pub(crate) fn take_due(
        &mut self,
        watermark: EpochMillis,
        reward_fn_version: &str,
        partition: i32,
        offset: i64,
    ) -> Vec<RewardMetrics> {
        let mut due = Vec::new();
        while let Some(entry) = self.open.first_entry()
            && entry.key().due <= watermark
        {
            let key = *entry.key();
            due.push((key, entry.remove().metrics));
        }
        due.sort_by(|(a, _), (b, _)| {
            (a.due, a.window_ms, a.start, &self.versions[a.version as usize]).cmp(&(
                b.due,
                b.window_ms,
                b.start,
                &self.versions[b.version as usize],
            ))
        });
        let out = due
            .into_iter()
            .map(|(_, mut m)| {
                m.time_to_accept_ms.sort_unstable();
                m.reward_fn_version = reward_fn_version.to_string();
                m.source_partition = partition;
                m.emitted_at_offset = offset;
                m
            })
            .collect();
        // Versions no longer served leave the interner once it is mostly stale.
        if self.versions.len() > 1024 && self.versions.len() > 4 * self.open.len() {
            *self = WindowedMetrics::from(Vec::<OpenWindow>::from(std::mem::take(self)));
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
