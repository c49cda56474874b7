//! An independent recomputation of the rewarder's rolling metrics from reward
//! records, written without the rewarder's code: the tests compare what the
//! rewarder published with what the rewards it emitted imply.

use std::collections::{BTreeMap, BTreeSet};

use flywheel_core::records::{Outcome, Reward, RewardMetrics};

/// Which served version, in which window.
pub type WindowId = (String, String, Option<String>, Option<String>, String, i64, i64);

/// Statistics of one window.
#[derive(Debug, Default, Clone)]
pub struct WindowTotals {
    /// Counts: shown, accepted, rejected, dismissed, ignored, rated, completion chars, edits measured, edit sum.
    pub counts: [i64; 9],
    /// Σ reward, Σ reward², Σ rating.
    pub sums: [f64; 3],
    /// Times to accept, ascending.
    pub time_to_accept_ms: Vec<i64>,
    /// Distinct users (recomputed) or the sum of the records' distinct counts (published).
    pub users: BTreeSet<String>,
    /// Published records added up.
    pub records: usize,
    /// Σ distinct_users over published records.
    pub distinct_users_sum: i64,
}

/// Groups `rewards` into tumbling windows of `window_ms` by shown time.
pub fn recompute(rewards: &[Reward], window_ms: i64) -> BTreeMap<WindowId, WindowTotals> {
    let mut out: BTreeMap<WindowId, WindowTotals> = BTreeMap::new();
    for r in rewards {
        let start = r.shown_time - r.shown_time.rem_euclid(window_ms);
        let id = (
            r.tenant.clone(),
            r.model_id.clone(),
            r.adapter_version.clone(),
            r.experiment_arm.clone(),
            r.surface.clone(),
            start,
            start + window_ms,
        );
        let t = out.entry(id).or_default();
        let outcome_slot = match r.outcome {
            Outcome::Accepted => 1,
            Outcome::Rejected => 2,
            Outcome::Dismissed => 3,
            Outcome::Ignored => 4,
        };
        t.counts[0] += 1;
        t.counts[outcome_slot] += 1;
        t.sums[0] += r.reward;
        t.sums[1] += r.reward * r.reward;
        if let Some(rating) = r.signals.rating {
            t.counts[5] += 1;
            t.sums[2] += rating;
        }
        t.counts[6] += r.completion.chars().count() as i64;
        if r.outcome == Outcome::Accepted {
            if let Some(d) = r.signals.edit_distance {
                t.counts[7] += 1;
                t.counts[8] += d;
            }
            t.time_to_accept_ms.extend(r.signals.time_to_accept_ms);
        }
        t.users.insert(r.user_id.clone());
    }
    for t in out.values_mut() {
        t.time_to_accept_ms.sort_unstable();
    }
    out
}

/// Adds up published records per window (only windows of `window_ms`).
pub fn published(records: &[RewardMetrics], window_ms: i64) -> BTreeMap<WindowId, WindowTotals> {
    let mut out: BTreeMap<WindowId, WindowTotals> = BTreeMap::new();
    for m in records.iter().filter(|m| m.window_end - m.window_start == window_ms) {
        let id = (
            m.tenant.clone(),
            m.model_id.clone(),
            m.adapter_version.clone(),
            m.experiment_arm.clone(),
            m.surface.clone().unwrap_or_default(),
            m.window_start,
            m.window_end,
        );
        let t = out.entry(id).or_default();
        let add = [
            m.shown,
            m.accepted,
            m.rejected,
            m.dismissed,
            m.ignored,
            m.rated,
            m.completion_chars_sum,
            m.edit_measured,
            m.edit_distance_sum,
        ];
        for (c, a) in t.counts.iter_mut().zip(add) {
            *c += a;
        }
        t.sums[0] += m.reward_sum;
        t.sums[1] += m.reward_sum_sq;
        t.sums[2] += m.rating_sum;
        t.time_to_accept_ms.extend(&m.time_to_accept_ms);
        t.time_to_accept_ms.sort_unstable();
        t.records += 1;
        t.distinct_users_sum += m.distinct_users;
    }
    out
}

/// Asserts that every published window equals the recomputation from the
/// rewards (exact counts and values, sums to 1e-9), and that a window with a
/// single record has the exact distinct-user count. Returns how many windows
/// were compared.
pub fn assert_published_match(
    published: &BTreeMap<WindowId, WindowTotals>,
    recomputed: &BTreeMap<WindowId, WindowTotals>,
) -> usize {
    for (id, p) in published {
        let r = recomputed.get(id).unwrap_or_else(|| panic!("published window {id:?} has no rewards"));
        assert_eq!(p.counts, r.counts, "counts of {id:?}");
        for (a, b) in p.sums.iter().zip(r.sums) {
            assert!((a - b).abs() < 1e-9, "sums of {id:?}: {:?} vs {:?}", p.sums, r.sums);
        }
        assert_eq!(p.time_to_accept_ms, r.time_to_accept_ms, "times to accept of {id:?}");
        if p.records == 1 {
            assert_eq!(p.distinct_users_sum, r.users.len() as i64, "distinct users of {id:?}");
        } else {
            assert!(p.distinct_users_sum >= r.users.len() as i64, "distinct users of {id:?}");
        }
    }
    published.len()
}
