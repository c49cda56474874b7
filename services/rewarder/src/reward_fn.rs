//! The reward function: a versioned, configurable mapping from a suggestion's
//! joined signals to additive reward components.
//!
//! Defaults follow Cursor's published scheme for the primary outcome
//! (+0.75 accepted, −0.25 shown and rejected, 0 ignored) and add bounded
//! terms for edits, ratings, follow-ups, speed of acceptance and task
//! completion. Every term is stored separately in the reward record, so
//! analysts can recompute rewards under another function.

use std::path::Path;

use flywheel_core::records::{FollowUpAction, Outcome, RewardComponents, RewardSignals};
use serde::Deserialize;

/// A reward function configuration (TOML).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardFunction {
    /// Version recorded in every reward; change it whenever any weight changes.
    pub(crate) version: String,
    /// Primary outcome terms.
    #[serde(default)]
    pub(crate) outcome: OutcomeWeights,
    /// Discount for accepted suggestions that were heavily edited afterwards.
    #[serde(default)]
    pub(crate) edit: EditPenalty,
    /// Weight of an explicit rating mapped to [−1, 1].
    #[serde(default = "default_rating_weight")]
    pub(crate) rating_weight: f64,
    /// Terms per follow-up action (summed over all follow-ups of the suggestion).
    #[serde(default)]
    pub(crate) follow_up: FollowUpWeights,
    /// Optional bonus for fast acceptance: `weight · 2^(−t / half_life_ms)`.
    #[serde(default)]
    pub(crate) time_to_accept: Option<TimeToAccept>,
    /// Terms for task completion.
    #[serde(default)]
    pub(crate) task: TaskWeights,
}

fn default_rating_weight() -> f64 {
    0.5
}

/// Primary outcome terms.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct OutcomeWeights {
    /// Accepted.
    pub(crate) accepted: f64,
    /// Explicitly rejected.
    pub(crate) rejected: f64,
    /// Dismissed without a decision (an implicit, weaker rejection).
    pub(crate) dismissed: f64,
    /// No response within the window.
    pub(crate) ignored: f64,
}

impl Default for OutcomeWeights {
    fn default() -> Self {
        OutcomeWeights { accepted: 0.75, rejected: -0.25, dismissed: -0.1, ignored: 0.0 }
    }
}

/// Edit discount: with `ratio = edit_distance / completion length` (capped at
/// 1), the term is `−weight · max(0, ratio − free_ratio) / (1 − free_ratio)`,
/// so small touch-ups cost nothing and a full rewrite costs `weight`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct EditPenalty {
    /// Penalty of a complete rewrite.
    pub(crate) weight: f64,
    /// Edit ratio below which there is no penalty.
    pub(crate) free_ratio: f64,
}

impl Default for EditPenalty {
    fn default() -> Self {
        EditPenalty { weight: 0.5, free_ratio: 0.1 }
    }
}

/// Terms per follow-up action.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct FollowUpWeights {
    /// Asked for another suggestion.
    pub(crate) regenerate: f64,
    /// Undid the suggestion.
    pub(crate) undo: f64,
    /// Copied it.
    pub(crate) copy: f64,
    /// Complained.
    pub(crate) complaint: f64,
    /// Thanked.
    pub(crate) thanks: f64,
    /// Anything else.
    pub(crate) other: f64,
}

impl Default for FollowUpWeights {
    fn default() -> Self {
        FollowUpWeights { regenerate: -0.25, undo: -0.5, copy: 0.1, complaint: -0.5, thanks: 0.25, other: 0.0 }
    }
}

impl FollowUpWeights {
    fn of(&self, action: FollowUpAction) -> f64 {
        match action {
            FollowUpAction::Regenerate => self.regenerate,
            FollowUpAction::Undo => self.undo,
            FollowUpAction::Copy => self.copy,
            FollowUpAction::Complaint => self.complaint,
            FollowUpAction::Thanks => self.thanks,
            FollowUpAction::Other => self.other,
        }
    }
}

/// Fast-acceptance bonus.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TimeToAccept {
    /// Bonus for an instant acceptance.
    pub(crate) weight: f64,
    /// Delay at which the bonus has halved.
    pub(crate) half_life_ms: f64,
}

/// Task completion terms.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct TaskWeights {
    /// Task completed successfully (or without a success flag).
    pub(crate) success: f64,
    /// Task completed and reported failed.
    pub(crate) failure: f64,
}

impl Default for TaskWeights {
    fn default() -> Self {
        TaskWeights { success: 0.25, failure: -0.1 }
    }
}

impl Default for RewardFunction {
    fn default() -> Self {
        RewardFunction {
            version: "cursor-default-v1".into(),
            outcome: OutcomeWeights::default(),
            edit: EditPenalty::default(),
            rating_weight: default_rating_weight(),
            follow_up: FollowUpWeights::default(),
            time_to_accept: None,
            task: TaskWeights::default(),
        }
    }
}

/// Errors loading a reward function.
#[derive(Debug, thiserror::Error)]
pub enum RewardFunctionError {
    /// The file could not be read.
    #[error("reading reward function {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid reward function.
    #[error("invalid reward function {path}: {detail}")]
    Invalid {
        /// File.
        path: String,
        /// What is wrong.
        detail: String,
    },
}

impl RewardFunction {
    /// Loads and validates a TOML reward function.
    pub fn load(path: &Path) -> Result<RewardFunction, RewardFunctionError> {
        let p = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| RewardFunctionError::Read { path: p.clone(), source })?;
        let f: RewardFunction = toml::from_str(&text)
            .map_err(|e| RewardFunctionError::Invalid { path: p.clone(), detail: e.to_string() })?;
        f.validate().map_err(|detail| RewardFunctionError::Invalid { path: p, detail })?;
        Ok(f)
    }

    /// Rejects configurations that cannot produce sensible rewards.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.version.trim().is_empty() {
            return Err("version must not be empty".into());
        }
        if !(0.0..1.0).contains(&self.edit.free_ratio) {
            return Err(format!("edit.free_ratio must be in [0, 1), got {}", self.edit.free_ratio));
        }
        if let Some(t) = &self.time_to_accept
            && !(t.half_life_ms.is_finite() && t.half_life_ms > 0.0)
        {
            return Err(format!("time_to_accept.half_life_ms must be > 0, got {}", t.half_life_ms));
        }
        let weights = [
            self.outcome.accepted,
            self.outcome.rejected,
            self.outcome.dismissed,
            self.outcome.ignored,
            self.edit.weight,
            self.rating_weight,
            self.task.success,
            self.task.failure,
        ];
        if weights.iter().any(|w| !w.is_finite()) {
            return Err("every weight must be a finite number".into());
        }
        Ok(())
    }

    /// The reward components of one suggestion.
    pub(crate) fn components(&self, outcome: Outcome, signals: &RewardSignals, completion: &str) -> RewardComponents {
        let outcome_term = match outcome {
            Outcome::Accepted => self.outcome.accepted,
            Outcome::Rejected => self.outcome.rejected,
            Outcome::Dismissed => self.outcome.dismissed,
            Outcome::Ignored => self.outcome.ignored,
        };
        let edit_penalty = match (outcome, signals.edit_distance) {
            (Outcome::Accepted, Some(distance)) => {
                let len = completion.chars().count().max(1) as f64;
                let ratio = (distance as f64 / len).min(1.0);
                let excess = (ratio - self.edit.free_ratio).max(0.0) / (1.0 - self.edit.free_ratio);
                -self.edit.weight * excess
            }
            _ => 0.0,
        };
        let rating = signals.rating.map_or(0.0, |r| self.rating_weight * r);
        // fold from +0.0: an empty f64 `sum()` is -0.0, which reads oddly in records.
        let follow_up = signals.follow_ups.iter().fold(0.0, |acc, a| acc + self.follow_up.of(*a));
        let time_to_accept = match (&self.time_to_accept, outcome, signals.time_to_accept_ms) {
            (Some(t), Outcome::Accepted, Some(ms)) => t.weight * (-(ms.max(0) as f64) / t.half_life_ms).exp2(),
            _ => 0.0,
        };
        let task_completion = match signals.task_completed {
            Some(true) => self.task.success,
            Some(false) => self.task.failure,
            None => 0.0,
        };
        RewardComponents { outcome: outcome_term, edit_penalty, rating, follow_up, time_to_accept, task_completion }
    }
}

/// Character-level Levenshtein distance, used when a product sends the final
/// text but not the distance.
pub(crate) fn edit_distance(a: &str, b: &str) -> i64 {
    strsim::levenshtein(a, b) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signals() -> RewardSignals {
        RewardSignals { event_count: 2, ..RewardSignals::default() }
    }

    #[test]
    fn defaults_follow_the_published_outcome_scheme() {
        let f = RewardFunction::default();
        let c = |o| f.components(o, &signals(), "abc").sum();
        assert_eq!((c(Outcome::Accepted), c(Outcome::Rejected), c(Outcome::Ignored)), (0.75, -0.25, 0.0));
    }

    #[test]
    fn edits_ratings_follow_ups_and_tasks_add_up() {
        let f = RewardFunction {
            time_to_accept: Some(TimeToAccept { weight: 0.2, half_life_ms: 1000.0 }),
            ..Default::default()
        };
        let s = RewardSignals {
            time_to_accept_ms: Some(1000),
            edit_distance: Some(55), // of 100 chars: ratio 0.55 → excess 0.5
            rating: Some(-1.0),
            follow_ups: vec![FollowUpAction::Undo, FollowUpAction::Thanks],
            task_completed: Some(false),
            ..signals()
        };
        let c = f.components(Outcome::Accepted, &s, &"x".repeat(100));
        assert_eq!(c.outcome, 0.75);
        assert!((c.edit_penalty + 0.25).abs() < 1e-12, "{c:?}");
        assert_eq!(c.rating, -0.5);
        assert_eq!(c.follow_up, -0.25);
        assert!((c.time_to_accept - 0.1).abs() < 1e-12);
        assert_eq!(c.task_completion, -0.1);
        // Small edits are free; rejected suggestions get no edit penalty.
        let light = RewardSignals { edit_distance: Some(5), ..signals() };
        assert_eq!(f.components(Outcome::Accepted, &light, &"x".repeat(100)).edit_penalty, 0.0);
        assert_eq!(f.components(Outcome::Rejected, &s, "abc").edit_penalty, 0.0);
    }

    #[test]
    fn configs_load_from_toml_and_bad_ones_are_rejected() {
        let dir = std::env::temp_dir().join(format!("rf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, "version = \"strict-v2\"\n[outcome]\nrejected = -0.5\n[follow_up]\nthanks = 0.5\n")
            .unwrap();
        let f = RewardFunction::load(&good).unwrap();
        assert_eq!(
            (f.version.as_str(), f.outcome.rejected, f.outcome.accepted, f.follow_up.thanks),
            ("strict-v2", -0.5, 0.75, 0.5)
        );
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "version = \"x\"\n[edit]\nfree_ratio = 1.5\n").unwrap();
        assert!(RewardFunction::load(&bad).unwrap_err().to_string().contains("free_ratio"));
        std::fs::write(&bad, "version = \"x\"\nbonus = 1\n").unwrap();
        assert!(RewardFunction::load(&bad).unwrap_err().to_string().contains("bonus"));
        std::fs::remove_dir_all(dir).unwrap();
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
