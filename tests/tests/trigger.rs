//! The trigger against the real broker: a volume threshold crossing fires
//! exactly once with the shards accumulated so far, a refused evaluation is
//! explained on the decisions topic, and a restart neither fires again for
//! the same shards nor loses any.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use flywheel_core::codec::encode;
use flywheel_core::kafka::ClientRole;
use flywheel_core::records::{ShardManifest, ShardVersionStats, TrainRequest, TriggerDecision};
use flywheel_core::topics::{Topic, TopicsConfig};
use flywheel_tests::{TestDir, kafka_args, read_all, service_args, test_topics, wait_until, workspace_root};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

fn manifest(id: &str) -> ShardManifest {
    let path = workspace_root().join("schemas/fixtures/shard_manifest.committed.json");
    let mut m: ShardManifest = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    // Times relative to now: the policy's staleness rule reads the age of the
    // data, so a fixture with fixed dates would change the decision as it ages.
    let now = flywheel_core::now_millis();
    m.min_event_time = now - 3_600_000;
    m.max_event_time = now - 60_000;
    m.committed_at = now;
    let dir = flywheel_lake::table::partition_dir("acme", m.min_event_time).unwrap();
    m.shard_id = id.into();
    m.tenant = "acme".into();
    m.uri = format!("{}/{id}.parquet", dir.display());
    m.rows = 600;
    m.stats.user_rows = (0..40).map(|u| (format!("user-{u}"), 15)).collect();
    m.stats.rated = 0;
    m.stats.rating_outcome_disagreements = 0;
    m.versions = vec![ShardVersionStats {
        model_id: "base".into(),
        rows: 600,
        accepted: 300,
        rejected: 300,
        reward_sum: 0.0,
        reward_sum_sq: 600.0,
        distinct_users: 40,
        max_user_rows: 15,
        ..Default::default()
    }];
    m
}

struct Setup {
    topics: TopicsConfig,
    args: Vec<String>,
    /// Holds the policy and the topics file.
    _dir: Arc<TestDir>,
}

async fn setup() -> Setup {
    let wanted = [Topic::Shards, Topic::TrainRequests, Topic::TriggerDecisions, Topic::ModelRegistry];
    let test = test_topics("trigger", &wanted, None).await;
    let policy = test.dir.join("policy.toml");
    std::fs::write(
        &policy,
        "[default]\nmin_examples = 1000\nmin_accepted = 100\nmin_rejected = 100\ncooldown_ms = 0\n",
    )
    .unwrap();
    let policy = policy.display().to_string();
    let args = service_args("flywheel-trigger", &test, &["--policy", &policy, "--evaluate-every-ms", "300"]);
    Setup { topics: test.topics, args, _dir: Arc::new(test.dir) }
}

async fn produce(s: &Setup, ids: &[&str]) {
    let producer: FutureProducer = kafka_args().client_config(&ClientRole::Producer).unwrap().create().unwrap();
    for id in ids {
        let bytes = encode(&manifest(id)).unwrap();
        producer
            .send(FutureRecord::to(&s.topics.name(Topic::Shards)).key("acme").payload(&bytes), Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

/// Runs the trigger in process until the returned token is cancelled.
fn start(s: &Setup) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let config = flywheel_trigger::Config::try_parse_from(&s.args).unwrap();
    let token = CancellationToken::new();
    let t = token.clone();
    (token, tokio::spawn(async move { flywheel_trigger::run(config, t).await.unwrap() }))
}

fn requests(s: &Setup) -> Vec<TrainRequest> {
    read_all::<TrainRequest>(&kafka_args(), &s.topics.name(Topic::TrainRequests)).into_iter().map(|r| r.2).collect()
}

fn decisions(s: &Setup) -> Vec<TriggerDecision> {
    read_all::<TriggerDecision>(&kafka_args(), &s.topics.name(Topic::TriggerDecisions))
        .into_iter()
        .map(|r| r.2)
        .collect()
}

fn shard_set(r: &TrainRequest) -> Vec<String> {
    let mut ids: Vec<String> = r.shards.iter().map(|s| s.shard_id.clone()).collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fires_once_per_threshold_crossing_explains_refusals_and_survives_restarts() {
    let s = setup().await;
    let (stop, task) = start(&s);
    produce(&s, &["s1"]).await;
    // 600 examples < 1000: refused, and the decision says why with numbers.
    let refused = tokio::task::block_in_place(|| {
        wait_until(30, || decisions(&s).into_iter().find(|d| !d.fired && d.shard_ids == vec!["s1".to_string()]))
    });
    let examples = refused.checks.iter().find(|g| g.check == "examples").unwrap();
    assert!(!examples.passed && examples.observed == 600.0 && examples.threshold == 1000.0, "{examples:?}");
    assert_eq!(examples.message, "examples 600 < minimum 1000 (fails)");
    assert!(refused.checks.iter().filter(|g| g.check != "examples").all(|g| g.passed), "{:?}", refused.checks);
    assert!(requests(&s).is_empty());

    produce(&s, &["s2"]).await;
    let first = tokio::task::block_in_place(|| wait_until(30, || requests(&s).into_iter().next()));
    assert_eq!(shard_set(&first), vec!["s1", "s2"]);
    assert_eq!((first.tenant.as_str(), first.base_model.as_str()), ("acme", "base"));
    assert!(first.shards.iter().all(|r| r.rows == 600 && !r.content_sha256.is_empty()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(requests(&s).len(), 1, "fired once for the crossing");
    let fired: Vec<TriggerDecision> = decisions(&s).into_iter().filter(|d| d.fired).collect();
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].train_request_id.as_deref(), Some(first.request_id.as_str()));

    // Restart: the state comes back from the topics; nothing fires again.
    stop.cancel();
    task.await.unwrap();
    let (stop, task) = start(&s);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(requests(&s).len(), 1, "a restart fired again for the same shards");

    // New shards after the restart make the next request, with only them.
    produce(&s, &["s3", "s4"]).await;
    let all = tokio::task::block_in_place(|| wait_until(30, || Some(requests(&s)).filter(|r| r.len() >= 2)));
    assert_eq!(all.len(), 2);
    assert_eq!(shard_set(&all[1]), vec!["s3", "s4"]);
    assert_ne!(all[0].request_id, all[1].request_id);
    stop.cancel();
    task.await.unwrap();
}

/// SIGTERM to the trigger binary while shards stream in and requests go
/// out: it exits cleanly within its drain timeout, and after a restart every
/// shard is in exactly one train request (none lost, none used twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_firing_exits_within_the_drain_timeout_and_loses_no_shard() {
    use flywheel_tests::{Reaped, terminate_within, workspace_binary};
    const DRAIN_TIMEOUT_SECS: u64 = 30;
    let s = setup().await;
    // The day's run budget would stop it after four requests.
    let policy = &s.args[s.args.iter().position(|a| a == "--policy").unwrap() + 1];
    std::fs::write(
        policy,
        "[default]\nmin_examples = 1000\nmin_accepted = 100\nmin_rejected = 100\ncooldown_ms = 0\nmax_runs_per_day = 1000\n",
    )
    .unwrap();
    let spawn = || {
        let mut args = s.args.clone();
        args.extend(["--drain-timeout-secs".to_string(), DRAIN_TIMEOUT_SECS.to_string()]);
        Reaped(std::process::Command::new(workspace_binary("flywheel-trigger")).args(&args[1..]).spawn().unwrap())
    };
    let stop_within_drain = |mut trigger: Reaped| {
        let status = terminate_within(&mut trigger, DRAIN_TIMEOUT_SECS);
        assert!(status.success(), "the trigger did not exit cleanly on SIGTERM: {status}");
    };
    let ids: Vec<String> = (0..120).map(|i| format!("t{i:03}")).collect();
    let mut trigger = spawn();
    // Two shards per request (600 examples each, 1000 needed), streamed in
    // pairs: requests go out while shards arrive. The signal comes once
    // some requests are out, the stream goes on while the trigger is down.
    let stream = Setup { topics: s.topics.clone(), args: s.args.clone(), _dir: s._dir.clone() };
    let streamed = ids.clone();
    let streaming = tokio::spawn(async move {
        for pair in streamed.chunks(2) {
            produce(&stream, &pair.iter().map(String::as_str).collect::<Vec<_>>()).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    tokio::task::block_in_place(|| wait_until(60, || Some(()).filter(|_| requests(&s).len() >= 3)));
    eprintln!(
        "signalled with {} requests out, shards still arriving: {}",
        requests(&s).len(),
        !streaming.is_finished()
    );
    tokio::task::block_in_place(|| stop_within_drain(trigger));
    streaming.await.unwrap();
    trigger = spawn();
    let made = tokio::task::block_in_place(|| {
        wait_until(90, || {
            let made = requests(&s);
            let used: usize = made.iter().map(|r| r.shards.len()).sum();
            Some(made).filter(|_| used >= ids.len())
        })
    });
    let mut used: Vec<String> = made.iter().flat_map(shard_set).collect();
    used.sort();
    let total = used.len();
    used.dedup();
    assert_eq!(used.len(), total, "a shard was used by two requests");
    assert_eq!(used, ids, "every shard is in a request");
    tokio::task::block_in_place(|| stop_within_drain(trigger));
}
