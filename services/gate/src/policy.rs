//! The release policy: what a candidate must show offline, and how its
//! canary is run and judged.

use flywheel_core::policy::CheckPolicy;
use serde::Deserialize;

/// Release policy of one (tenant, base model); every field has a default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReleasePolicy {
    /// Recorded in every decision; change it with any threshold.
    pub version: String,
    /// Offline: the candidate's holdout implicit-reward accuracy must exceed
    /// its parent's by at least this much.
    pub min_accuracy_gain: f64,
    /// Offline: holdout examples needed to judge at all.
    pub min_holdout_examples: i64,
    /// Offline: largest |mean per-token log-ratio to the parent| (nats), the
    /// KL budget that keeps one release from moving the policy too far.
    pub max_kl_to_parent: f64,
    /// Online: share of users routed to the canary.
    pub canary_share: f64,
    /// Online: level of the always-valid tests.
    pub alpha: f64,
    /// Online: mixing standard deviation of the mean-reward test (the
    /// effect size, in reward units, the test is tuned to find).
    pub reward_tau: f64,
    /// Online: mixing standard deviation of the accept-rate test.
    pub accept_rate_tau: f64,
    /// Online: suggestions shown per arm before any test or guardrail is read.
    pub min_shown_per_arm: i64,
    /// Online: a canary undecided after this long is ended (expired).
    pub max_canary_ms: i64,
    /// Metrics windows of this length are read (the rewarder publishes
    /// several lengths; reading one avoids counting a suggestion twice).
    pub metrics_window_ms: i64,
    /// Guardrail: canary suggestions per user below this share of the
    /// control's rolls back (suggestion-rate collapse).
    pub min_suggestion_rate_ratio: f64,
    /// Guardrail: canary mean completion length below this share of the
    /// control's rolls back (completion-length collapse).
    pub min_completion_length_ratio: f64,
    /// Guardrail: canary mean explicit rating this far below the control's
    /// rolls back (ratings are normalised to [0, 1]).
    pub max_rating_drop: f64,
    /// Guardrail: rated suggestions per arm before the rating guardrail is read.
    pub min_rated_per_arm: i64,
}

impl Default for ReleasePolicy {
    fn default() -> Self {
        ReleasePolicy {
            version: "release-v1".into(),
            min_accuracy_gain: 0.02,
            min_holdout_examples: 50,
            max_kl_to_parent: 0.5,
            canary_share: 0.2,
            alpha: 0.05,
            reward_tau: 0.1,
            accept_rate_tau: 0.05,
            min_shown_per_arm: 200,
            max_canary_ms: 24 * 3_600_000,
            metrics_window_ms: 60_000,
            min_suggestion_rate_ratio: 0.5,
            min_completion_length_ratio: 0.5,
            max_rating_drop: 0.2,
            min_rated_per_arm: 30,
        }
    }
}

impl CheckPolicy for ReleasePolicy {
    fn check(&self) -> Result<(), String> {
        if self.version.trim().is_empty() {
            return Err("version is empty".into());
        }
        if !(self.canary_share > 0.0 && self.canary_share < 1.0) {
            return Err(format!("canary_share = {} is not in (0, 1)", self.canary_share));
        }
        if !(self.alpha > 0.0 && self.alpha < 0.5) {
            return Err(format!("alpha = {} is not in (0, 0.5)", self.alpha));
        }
        if self.reward_tau <= 0.0 || self.accept_rate_tau <= 0.0 {
            return Err("reward_tau and accept_rate_tau must be positive".into());
        }
        if self.max_kl_to_parent < 0.0 || self.max_rating_drop < 0.0 {
            return Err("max_kl_to_parent and max_rating_drop must not be negative".into());
        }
        if self.min_shown_per_arm < 2 || self.max_canary_ms <= 0 || self.metrics_window_ms <= 0 {
            return Err("min_shown_per_arm ≥ 2, max_canary_ms > 0 and metrics_window_ms > 0 are required".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_is_the_defaults_and_nonsense_is_refused() {
        let example = include_str!("../../../deploy/release-policy.toml.example");
        let p = crate::service::Policies::parse(example, "release-policy.toml.example").unwrap();
        assert_eq!(p.default, ReleasePolicy::default());
        let bad = crate::service::Policies::parse("[default]\ncanary_share = 1.5\n", "p.toml").unwrap_err();
        assert!(bad.to_string().contains("canary_share = 1.5 is not in (0, 1)"), "{bad}");
    }
}
