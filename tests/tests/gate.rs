//! The gate against the real broker: a candidate that passes the offline
//! gate becomes a canary, better canary metrics promote it, worse ones roll
//! the next one back, a stale candidate is rejected with its reason, and a
//! restart decides nothing twice.

use std::time::Duration;

use clap::Parser;
use flywheel_core::codec::encode;
use flywheel_core::kafka::ClientRole;
use flywheel_core::records::{ModelCandidate, RegistryEntry, ReleaseAction, RewardMetrics};
use flywheel_core::topics::{Topic, TopicsConfig};
use flywheel_tests::{TestTopics, kafka_args, read_all, service_args, test_topics, wait_until, workspace_root};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

fn fixture<T: flywheel_core::AvroRecord>(name: &str) -> T {
    serde_json::from_slice(&std::fs::read(workspace_root().join("schemas/fixtures").join(name)).unwrap()).unwrap()
}

fn candidate(version: &str, parent: Option<&str>, accuracy: f64) -> ModelCandidate {
    let mut c: ModelCandidate = fixture("model_candidate.trained.json");
    c.adapter_version = version.into();
    c.request_id = format!("req-{version}");
    c.tenant = "acme".into();
    c.base_model = "tiny".into();
    c.parent_adapter_version = parent.map(str::to_string);
    c.candidate_metrics = [("implicit_reward_accuracy".to_string(), accuracy)].into();
    c.parent_metrics = [("implicit_reward_accuracy".to_string(), 0.5)].into();
    c
}

/// A one-minute window of one served version starting now-ish.
fn window(adapter: Option<&str>, start: i64, shown: i64, accepted: i64, partition: i32) -> RewardMetrics {
    let mut m: RewardMetrics = fixture("reward_metrics.window.json");
    m.tenant = "acme".into();
    m.model_id = "tiny".into();
    m.adapter_version = adapter.map(str::to_string);
    m.window_start = start;
    m.window_end = start + 60_000;
    m.shown = shown;
    m.accepted = accepted;
    m.rejected = shown - accepted;
    m.dismissed = 0;
    m.ignored = 0;
    m.reward_sum = 0.75 * accepted as f64 - 0.25 * (shown - accepted) as f64;
    m.reward_sum_sq = 0.5625 * accepted as f64 + 0.0625 * (shown - accepted) as f64;
    m.rated = 0;
    m.rating_sum = 0.0;
    m.completion_chars_sum = shown * 12;
    m.distinct_users = (shown / 4).max(1);
    m.source_partition = partition;
    m.emitted_at_offset = start / 60_000;
    m
}

struct Setup {
    topics: TopicsConfig,
    args: Vec<String>,
    producer: FutureProducer,
}

impl Setup {
    async fn send<T: flywheel_core::AvroRecord>(&self, topic: Topic, key: &str, record: &T) {
        let bytes = encode(record).unwrap();
        self.producer
            .send(FutureRecord::to(&self.topics.name(topic)).key(key).payload(&bytes), Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    fn registry(&self) -> Vec<RegistryEntry> {
        read_all::<RegistryEntry>(&kafka_args(), &self.topics.name(Topic::ModelRegistry))
            .into_iter()
            .map(|r| r.2)
            .collect()
    }

    /// Waits for the registry's newest entry to have `revision`.
    fn wait_revision(&self, revision: i64) -> RegistryEntry {
        wait_until(60, || self.registry().into_iter().max_by_key(|e| e.revision).filter(|e| e.revision >= revision))
    }

    fn start(&self) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let config = flywheel_gate::Config::try_parse_from(&self.args).unwrap();
        let token = CancellationToken::new();
        let t = token.clone();
        (token, tokio::spawn(async move { flywheel_gate::run(config, t).await.unwrap() }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canaries_are_promoted_or_rolled_back_on_their_metrics_and_restarts_decide_nothing_twice() {
    let wanted = [Topic::ModelCandidates, Topic::RewardMetrics, Topic::ModelRegistry];
    let test = test_topics("gate", &wanted, None).await;
    let policy = test.dir.join("release.toml");
    std::fs::write(&policy, "[default]\nversion = \"test-release\"\nmin_shown_per_arm = 100\ncanary_share = 0.25\n")
        .unwrap();
    let policy = policy.display().to_string();
    let args = service_args("flywheel-gate", &test, &["--policy", &policy, "--evaluate-every-ms", "300"]);
    let TestTopics { kafka, topics, .. } = test;
    let producer = kafka.client_config(&ClientRole::Producer).unwrap().create().unwrap();
    let s = Setup { topics, args, producer };
    let (stop, task) = s.start();

    // A good candidate from the base: canary at the policy's share.
    s.send(Topic::ModelCandidates, "acme/tiny", &candidate("a1", None, 0.8)).await;
    let e = s.wait_revision(1);
    let canary = e.canary.as_ref().expect("a canary");
    assert_eq!((canary.adapter.adapter_version.as_str(), canary.traffic_share), ("a1", 0.25));
    assert!(e.live.is_none());
    assert!(e.history[0].reason.contains("req-a1") && e.history[0].reason.contains("test-release"));

    // Windows after the canary started, over two partitions: accept rate
    // 0.45 on the canary vs 0.2 on the base.
    let start = (canary.started_at / 60_000 + 1) * 60_000;
    for i in 0..12 {
        let at = start + i * 60_000;
        for partition in 0..2 {
            s.send(Topic::RewardMetrics, "acme", &window(Some("a1"), at, 10, 5 - partition as i64, partition)).await;
            s.send(Topic::RewardMetrics, "acme", &window(None, at, 30, 6, partition)).await;
        }
    }
    let e = s.wait_revision(2);
    let promoted = e.history.last().unwrap();
    assert_eq!(promoted.action, ReleaseAction::Promoted, "{}", promoted.reason);
    assert_eq!(e.live.as_ref().unwrap().adapter_version, "a1");
    assert!(e.canary.is_none());
    assert!(promoted.statistics["mean_reward_p_value"] <= 0.05);
    assert!((promoted.statistics["canary_accept_rate"] - 0.45).abs() < 0.1, "{:?}", promoted.statistics);

    // Restart: the history is read back; a1 again (a replayed candidate)
    // is not decided twice, a stale candidate is rejected with its reason.
    stop.cancel();
    task.await.unwrap();
    let (stop, task) = s.start();
    s.send(Topic::ModelCandidates, "acme/tiny", &candidate("a1", None, 0.8)).await;
    s.send(Topic::ModelCandidates, "acme/tiny", &candidate("a2", None, 0.9)).await;
    let e = s.wait_revision(3);
    let rejected = e.history.last().unwrap();
    assert_eq!((rejected.action, rejected.adapter_version.as_str()), (ReleaseAction::Rejected, "a2"));
    assert!(rejected.reason.contains("stale: trained from the base but a1 is live"), "{}", rejected.reason);

    // A candidate from a1 whose canary does worse: rolled back, a1 stays live.
    s.send(Topic::ModelCandidates, "acme/tiny", &candidate("a3", Some("a1"), 0.7)).await;
    let e = s.wait_revision(4);
    let started_at = e.canary.as_ref().unwrap().started_at;
    let start = (started_at / 60_000 + 1) * 60_000;
    for i in 0..20 {
        let at = start + i * 60_000;
        s.send(Topic::RewardMetrics, "acme", &window(Some("a3"), at, 10, 1, 0)).await;
        s.send(Topic::RewardMetrics, "acme", &window(Some("a1"), at, 30, 14, 0)).await;
    }
    let e = s.wait_revision(5);
    let rolled = e.history.last().unwrap();
    assert_eq!(
        (rolled.action, rolled.adapter_version.as_str()),
        (ReleaseAction::RolledBack, "a3"),
        "{}",
        rolled.reason
    );
    assert_eq!(e.live.as_ref().unwrap().adapter_version, "a1");
    stop.cancel();
    task.await.unwrap();

    // Every revision once, in order, and each adapter decided once per action.
    let all = s.registry();
    let revisions: Vec<i64> = all.iter().map(|e| e.revision).collect();
    assert_eq!(revisions, (1..=5).collect::<Vec<_>>(), "one entry per decision, none repeated");
    let actions: Vec<(String, ReleaseAction)> =
        e.history.iter().map(|d| (d.adapter_version.clone(), d.action)).collect();
    assert_eq!(
        actions,
        [
            ("a1", ReleaseAction::CanaryStarted),
            ("a1", ReleaseAction::Promoted),
            ("a2", ReleaseAction::Rejected),
            ("a3", ReleaseAction::CanaryStarted),
            ("a3", ReleaseAction::RolledBack)
        ]
        .map(|(v, a)| (v.to_string(), a))
    );
}

/// The gate binary on SIGTERM: it exits cleanly within its drain timeout
/// with its decision published, and the next instance, replaying the same
/// candidate, decides nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_within_the_drain_timeout_and_the_next_instance_decides_nothing_twice() {
    use flywheel_tests::{Reaped, metric, metrics_when, terminate_within, workspace_binary};
    const DRAIN_TIMEOUT_SECS: u64 = 30;
    let wanted = [Topic::ModelCandidates, Topic::RewardMetrics, Topic::ModelRegistry];
    let test = test_topics("gate-term", &wanted, None).await;
    let args = service_args("flywheel-gate", &test, &["--evaluate-every-ms", "300"]);
    let TestTopics { kafka, topics, .. } = test;
    let producer = kafka.client_config(&ClientRole::Producer).unwrap().create().unwrap();
    let s = Setup { topics, args, producer };
    let spawn = || {
        let ops = flywheel_devkit::free_local_addr().unwrap();
        let mut args = s.args.clone();
        let at = args.iter().position(|a| a == "--ops-listen").unwrap() + 1;
        args[at] = ops.to_string();
        args.extend(["--drain-timeout-secs".to_string(), DRAIN_TIMEOUT_SECS.to_string()]);
        (Reaped(std::process::Command::new(workspace_binary("flywheel-gate")).args(&args[1..]).spawn().unwrap()), ops)
    };
    let stop = |mut gate: Reaped| {
        let status = terminate_within(&mut gate, DRAIN_TIMEOUT_SECS);
        assert!(status.success(), "the gate did not exit cleanly on SIGTERM: {status}");
    };
    let (gate, _) = spawn();
    s.send(Topic::ModelCandidates, "acme/tiny", &candidate("a1", None, 0.8)).await;
    let first = tokio::task::block_in_place(|| s.wait_revision(1));
    assert!(first.canary.is_some());
    tokio::task::block_in_place(|| stop(gate));

    let (gate, ops) = spawn();
    s.send(Topic::ModelCandidates, "acme/tiny", &candidate("a1", None, 0.8)).await;
    // Both copies of a1 read (the history and the replay)...
    let both = |exposed: &str| metric(exposed, "gate_candidates_total").unwrap_or_default() >= 2.0;
    metrics_when(ops, 60, "the gate reading both candidates", both).await;
    // ...and its turn of the loop ends before the drain does.
    tokio::task::block_in_place(|| stop(gate));
    assert_eq!(s.registry().len(), 1, "the replayed candidate was decided again");
}
