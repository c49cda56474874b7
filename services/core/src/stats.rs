//! Statistics over [`RewardMetrics`] records: merging sufficient statistics
//! and the derived numbers the rewarder exposes and the gate decides on.
//! Kept here so every consumer computes them the same way.

use crate::records::RewardMetrics;

/// z for a two-sided 95 % interval.
pub const Z_95: f64 = 1.959_963_984_540_054;

/// Wilson score interval for `successes` out of `trials` at normal quantile
/// `z`; `None` without trials. Unlike the normal approximation it stays inside
/// [0, 1] and behaves at rates near 0 or 1, which is where small adapters live.
pub fn wilson_interval(successes: u64, trials: u64, z: f64) -> Option<(f64, f64)> {
    if trials == 0 {
        return None;
    }
    let n = trials as f64;
    let p = successes as f64 / n;
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    Some(((centre - half).max(0.0), (centre + half).min(1.0)))
}

/// The lower median (nearest-rank 50th percentile) of ascending `values`.
pub fn lower_median(values: &[i64]) -> Option<i64> {
    (!values.is_empty()).then(|| values[(values.len() - 1) / 2])
}

/// Merges two ascending slices into one ascending vector.
fn merge_sorted(a: &[i64], b: &[i64]) -> Vec<i64> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i] <= b[j] {
            out.push(a[i]);
            i += 1;
        } else {
            out.push(b[j]);
            j += 1;
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

impl RewardMetrics {
    /// Adds `other`'s statistics to these. Identity fields and the window are
    /// left as they are; the caller merges records that share them.
    /// `distinct_users` adds up, so after a merge it is an upper bound.
    pub fn absorb(&mut self, other: &RewardMetrics) {
        self.shown += other.shown;
        self.accepted += other.accepted;
        self.rejected += other.rejected;
        self.dismissed += other.dismissed;
        self.ignored += other.ignored;
        self.reward_sum += other.reward_sum;
        self.reward_sum_sq += other.reward_sum_sq;
        self.rated += other.rated;
        self.rating_sum += other.rating_sum;
        self.completion_chars_sum += other.completion_chars_sum;
        self.distinct_users += other.distinct_users;
        self.edit_measured += other.edit_measured;
        self.edit_distance_sum += other.edit_distance_sum;
        self.time_to_accept_ms = merge_sorted(&self.time_to_accept_ms, &other.time_to_accept_ms);
        self.emitted_at_offset = self.emitted_at_offset.max(other.emitted_at_offset);
    }

    /// Accepted / shown.
    pub fn accept_rate(&self) -> Option<f64> {
        (self.shown > 0).then(|| self.accepted as f64 / self.shown as f64)
    }

    /// Wilson 95 % interval of the accept rate.
    pub fn accept_rate_wilson_95(&self) -> Option<(f64, f64)> {
        wilson_interval(self.accepted.max(0) as u64, self.shown.max(0) as u64, Z_95)
    }

    /// Mean reward per shown suggestion.
    pub fn mean_reward(&self) -> Option<f64> {
        (self.shown > 0).then(|| self.reward_sum / self.shown as f64)
    }

    /// Sample variance of the reward (n − 1 denominator).
    pub fn reward_variance(&self) -> Option<f64> {
        (self.shown > 1).then(|| {
            let n = self.shown as f64;
            ((self.reward_sum_sq - self.reward_sum * self.reward_sum / n) / (n - 1.0)).max(0.0)
        })
    }

    /// Mean edit distance after accept, over accepted suggestions whose edit was measured.
    pub fn mean_edit_distance(&self) -> Option<f64> {
        (self.edit_measured > 0).then(|| self.edit_distance_sum as f64 / self.edit_measured as f64)
    }

    /// Exact lower median of time to accept.
    pub fn p50_time_to_accept_ms(&self) -> Option<i64> {
        lower_median(&self.time_to_accept_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_published_values() {
        // Reference: Wilson (1927) / Newcombe (1998) table, 81 of 263 → 0.2553–0.3662.
        let (lo, hi) = wilson_interval(81, 263, Z_95).unwrap();
        assert!((lo - 0.2553).abs() < 5e-4 && (hi - 0.3662).abs() < 5e-4, "{lo} {hi}");
        // Boundaries stay inside [0, 1] and are not degenerate.
        let (lo, hi) = wilson_interval(0, 10, Z_95).unwrap();
        assert_eq!(lo, 0.0);
        assert!(hi > 0.25 && hi < 0.35, "{hi}");
        let (lo, hi) = wilson_interval(10, 10, Z_95).unwrap();
        assert!(lo > 0.65 && lo < 0.75 && (1.0 - hi) < 1e-12, "{lo} {hi}");
        assert_eq!(wilson_interval(0, 0, Z_95), None);
    }

    #[test]
    fn medians_and_merges() {
        assert_eq!(lower_median(&[]), None);
        assert_eq!(lower_median(&[5]), Some(5));
        assert_eq!(lower_median(&[1, 9]), Some(1));
        assert_eq!(lower_median(&[1, 2, 9]), Some(2));
        assert_eq!(merge_sorted(&[1, 4, 9], &[2, 4, 10, 11]), vec![1, 2, 4, 4, 9, 10, 11]);
    }
}
