//! The flywheel on pure noise: when every click is a coin flip, nothing may
//! ship. `flywheel up` runs the whole system with 100 % label noise for as
//! long as a clean run needs to promote (see `closed_loop.rs`); afterwards
//! the registry holds no promotion, and the trigger either refused (naming
//! its check) or every candidate was rejected or rolled back.

use std::path::Path;

use flywheel_core::records::{ModelCandidate, RegistryEntry, ReleaseAction, TriggerDecision};
use flywheel_core::topics::Topic;
use flywheel_tests::{flywheel_up, read_all, test_topics};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_pure_label_noise_nothing_is_promoted() {
    let test = test_topics("noise", &Topic::ALL, None).await;
    let work: &Path = &test.dir.join("work");
    let (kafka, topics) = (&test.kafka, &test.topics);
    let mut child = flywheel_up(&test, work, &["--label-noise", "1.0", "--duration-s", "120"]);
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "flywheel up failed: {status}");

    let registry: Vec<RegistryEntry> =
        read_all(kafka, &topics.name(Topic::ModelRegistry)).into_iter().map(|r| r.2).collect();
    let promoted: Vec<_> =
        registry.iter().flat_map(|e| &e.history).filter(|d| d.action == ReleaseAction::Promoted).collect();
    assert!(promoted.is_empty(), "promoted on noise: {promoted:?}");
    let decisions: Vec<TriggerDecision> =
        read_all(kafka, &topics.name(Topic::TriggerDecisions)).into_iter().map(|r| r.2).collect();
    assert!(!decisions.is_empty(), "the trigger evaluated the data");
    let candidates: Vec<ModelCandidate> =
        read_all(kafka, &topics.name(Topic::ModelCandidates)).into_iter().map(|r| r.2).collect();
    if candidates.is_empty() {
        // The trigger refused, and said why: ratings contradict the clicks.
        let last = decisions.last().unwrap();
        assert!(!last.fired);
        let failing: Vec<&str> = last.checks.iter().filter(|g| !g.passed).map(|g| g.check.as_str()).collect();
        assert!(failing.contains(&"rating_disagreement"), "failing checks {failing:?}");
    } else {
        // Anything trained on noise was stopped by the gate.
        for c in &candidates {
            let fate = registry
                .iter()
                .flat_map(|e| &e.history)
                .filter(|d| d.adapter_version == c.adapter_version)
                .map(|d| d.action)
                .next_back();
            assert!(
                matches!(
                    fate,
                    Some(ReleaseAction::Rejected | ReleaseAction::RolledBack | ReleaseAction::CanaryStarted)
                ),
                "{}: {fate:?}",
                c.adapter_version
            );
        }
    }
}
