//! The rewarder against the real broker: a `kill -9` mid-stream with an
//! immediate restart, a checkpoint taken in the middle of a replay, and a
//! rebalance between two instances leave exactly the rewards an
//! uninterrupted run produces, each once. The kill and rebalance tests run
//! twice: with checkpoints in a local directory, and in an object store
//! (`--checkpoint-store`: a `file://` URL across processes, the in-memory
//! object store between two instances in one process).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use flywheel_core::codec::encode;
use flywheel_core::kafka::{ClientRole, KafkaArgs};
use flywheel_core::records::*;
use flywheel_core::topics::{Topic, TopicsConfig};
use flywheel_lake::store::Storage;
use flywheel_rewarder::join::{Emitted, JoinConfig, PartitionJoiner};
use flywheel_rewarder::reward_fn::RewardFunction;
use flywheel_rewarder::window_metrics::metrics_record_id;
use flywheel_tests::metrics_oracle::{assert_published_match, published, recompute};
use flywheel_tests::{Reaped, TestDir, metrics_when, read_all, test_topics, unique_topic, workspace_binary};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

const T0: i64 = 1_795_424_400_000;
const WINDOW_MS: i64 = 60_000;
const PARTITIONS: i32 = 3;

struct Setup {
    group: String,
    kafka: KafkaArgs,
    topics: TopicsConfig,
    topics_file: PathBuf,
    checkpoints: PathBuf,
    /// `--checkpoint-store` URL; the `checkpoints` directory when `None`.
    store: Option<String>,
    /// Holds the topics file and the checkpoints.
    _dir: TestDir,
}

/// Where the instances of a test keep their checkpoints.
#[derive(Debug, Clone, Copy)]
enum Checkpoints {
    /// `--checkpoint-dir`, the default.
    Directory,
    /// `--checkpoint-store file:///…`: the lake's storage layer by URL.
    FileUrl,
    /// `--checkpoint-store memory://…`: the in-memory object store, shared
    /// by the instances of one process.
    Memory,
}

async fn setup(label: &str) -> Setup {
    setup_with(label, Checkpoints::Directory).await
}

async fn setup_with(label: &str, checkpoints: Checkpoints) -> Setup {
    let wanted =
        [Topic::Interactions, Topic::Rewards, Topic::InteractionsLate, Topic::DeadLetters, Topic::RewardMetrics];
    let t = test_topics(label, &wanted, Some((Topic::Interactions, PARTITIONS))).await;
    let group = unique_topic(&format!("{label}-group"));
    let store = match checkpoints {
        Checkpoints::Directory => None,
        Checkpoints::FileUrl => Some(format!("file://{}", t.dir.join("checkpoint-store").display())),
        Checkpoints::Memory => Some(format!("memory://{group}")),
    };
    Setup {
        group,
        kafka: t.kafka,
        topics: t.topics,
        topics_file: t.file,
        checkpoints: t.dir.join("checkpoints"),
        store,
        _dir: t.dir,
    }
}

/// The checkpoint storage the instances of `s` use, opened as they open it.
/// Blocks on the runtime: call it outside async code (`block_in_place`).
fn checkpoint_storage(s: &Setup) -> Arc<dyn Storage> {
    let config = flywheel_rewarder::Config::try_parse_from(rewarder_args(s, &[])).unwrap();
    flywheel_rewarder::service::open_checkpoint_storage(&config, tokio::runtime::Handle::current()).unwrap()
}

fn event(n: usize, suggestion: &str, t: i64, payload: InteractionPayload) -> Interaction {
    Interaction {
        event_id: format!("5d000000-0000-4000-8000-{n:012}"),
        event_time: t,
        received_time: t,
        tenant: "acme".into(),
        user_id: format!("user-{}", n % 7),
        session_id: None,
        suggestion_id: suggestion.into(),
        payload,
        attributes: BTreeMap::new(),
    }
}

fn shown(n: usize, suggestion: &str, t: i64) -> Interaction {
    event(
        n,
        suggestion,
        t,
        InteractionPayload::Shown(SuggestionShown {
            model_id: "tiny".into(),
            adapter_version: None,
            experiment_arm: Some("live".into()),
            surface: "editor".into(),
            prompt: format!("prompt {n}"),
            completion: format!("completion {n}"),
            behavior_logprob: None,
            latency_ms: 5,
        }),
    )
}

/// A realistic stream: suggestions shown over time with accepts, rejects,
/// silence, retries (duplicate event ids), a follow-up, and orphans.
fn stream(suggestions: usize, offset: usize) -> Vec<Interaction> {
    let mut out = Vec::new();
    for i in offset..offset + suggestions {
        let s = format!("sugg-{i}");
        let t = T0 + i as i64 * 1000;
        out.push(shown(10 * i, &s, t));
        match i % 5 {
            0 | 1 => out.push(event(
                10 * i + 1,
                &s,
                t + 500,
                InteractionPayload::Accepted(SuggestionAccepted { time_to_accept_ms: 500 }),
            )),
            2 => out.push(event(10 * i + 1, &s, t + 300, InteractionPayload::Rejected(SuggestionRejected::default()))),
            _ => {}
        }
        if i % 7 == 0 {
            // A client retry of the same event.
            out.push(shown(10 * i, &s, t));
            out.push(event(
                10 * i + 2,
                &s,
                t + 900,
                InteractionPayload::FollowUp(FollowUp { action: FollowUpAction::Thanks, detail: None }),
            ));
        }
        if i % 23 == 0 {
            out.push(event(
                10 * i + 3,
                &format!("ghost-{i}"),
                t,
                InteractionPayload::Rejected(SuggestionRejected::default()),
            ));
        }
    }
    out
}

async fn produce(kafka: &KafkaArgs, topic: &str, events: &[Interaction]) {
    let producer: FutureProducer = kafka.client_config(&ClientRole::Producer).unwrap().create().unwrap();
    for e in events {
        producer
            .send(FutureRecord::to(topic).key(&e.suggestion_id).payload(&encode(e).unwrap()), Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

/// Moves every partition's watermark past the windows of all suggestions
/// shown before `suggestions_so_far` (one per second from T0).
async fn tick_all(kafka: &KafkaArgs, topic: &str, n: usize, suggestions_so_far: usize) {
    let producer: FutureProducer = kafka.client_config(&ClientRole::Producer).unwrap().create().unwrap();
    for p in 0..PARTITIONS {
        let t = T0 + suggestions_so_far as i64 * 1000 + WINDOW_MS + 1000;
        let e = shown(1_000_000 + n * 10 + p as usize, &format!("tick-{n}-{p}"), t);
        producer
            .send(
                FutureRecord::to(topic).partition(p).key(&e.suggestion_id).payload(&encode(&e).unwrap()),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

fn join_config() -> JoinConfig {
    JoinConfig { outcome_window_ms: WINDOW_MS, allowed_lateness_ms: 0, ..JoinConfig::default() }
}

/// What an uninterrupted run produces from the input topic as it stands:
/// rewards and metrics records, by id.
fn expected_outputs(s: &Setup) -> (BTreeMap<String, Reward>, BTreeMap<String, RewardMetrics>) {
    let input = s.topics.name(Topic::Interactions);
    let mut joiners: HashMap<i32, PartitionJoiner> = HashMap::new();
    let mut out = Vec::new();
    for (p, o, e) in read_all::<Interaction>(&s.kafka, &input) {
        joiners
            .entry(p)
            .or_insert_with(|| PartitionJoiner::new(&input, p, join_config(), RewardFunction::default()))
            .process(o, e, &mut out);
    }
    let (mut rewards, mut metrics) = (BTreeMap::new(), BTreeMap::new());
    for e in out {
        match e {
            Emitted::Reward(r) => {
                rewards.insert(r.reward_id.clone(), *r);
            }
            Emitted::Metrics(m) => {
                metrics.insert(metrics_record_id(&m), *m);
            }
            _ => {}
        }
    }
    (rewards, metrics)
}

/// The published metrics are exactly the uninterrupted run's, each once, and
/// equal a recomputation from the rewards on the rewards topic.
fn assert_metrics(s: &Setup, expected: &BTreeMap<String, RewardMetrics>, rewards: &[Reward]) {
    let got: Vec<RewardMetrics> =
        read_all::<RewardMetrics>(&s.kafka, &s.topics.name(Topic::RewardMetrics)).into_iter().map(|r| r.2).collect();
    let mut by_id = BTreeMap::new();
    for m in &got {
        assert!(by_id.insert(metrics_record_id(m), m).is_none(), "metrics record published twice: {m:?}");
    }
    assert_eq!(by_id.len(), expected.len(), "metrics record count");
    for (id, m) in expected {
        assert_eq!(by_id.get(id).copied(), Some(m), "metrics record {id:?}");
    }
    let compared = assert_published_match(&published(&got, WINDOW_MS), &recompute(rewards, WINDOW_MS));
    assert!(compared >= 3, "only {compared} one-minute windows published");
}

/// /metrics shows the latest one-minute window, merged over the partitions.
fn assert_exposed_latest_window(exposed: &str, expected: &BTreeMap<String, RewardMetrics>) {
    let minute: Vec<&RewardMetrics> =
        expected.values().filter(|m| m.window_end - m.window_start == WINDOW_MS).collect();
    let latest = minute.iter().map(|m| m.window_start).max().unwrap();
    let (accepted, shown) =
        minute.iter().filter(|m| m.window_start == latest).fold((0, 0), |(a, n), m| (a + m.accepted, n + m.shown));
    let gauge = |name: &str| -> f64 {
        let line = exposed
            .lines()
            .find(|l| l.starts_with(&format!("rewarder_{name}{{")) && l.contains("window=\"60s\""))
            .unwrap_or_else(|| panic!("no {name} gauge in\n{exposed}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(gauge("window_end_seconds"), (latest + WINDOW_MS) as f64 / 1000.0);
    assert_eq!(gauge("window_shown"), shown as f64);
    let rate = gauge("window_accept_rate");
    assert!((rate - accepted as f64 / shown as f64).abs() < 1e-9, "{rate} vs {accepted}/{shown}");
    assert!(gauge("window_accept_rate_wilson_low") < rate && rate < gauge("window_accept_rate_wilson_high"));
    assert_eq!(gauge("window_time_to_accept_p50_seconds"), 0.5, "every accept in the stream takes 500 ms");
}

fn rewarder_args(s: &Setup, extra: &[&str]) -> Vec<String> {
    rewarder_args_checkpointing(s, 40, 1000, extra)
}

/// The command line with a checkpoint every `records` records of a
/// partition or every `ms` milliseconds.
fn rewarder_args_checkpointing(s: &Setup, records: u64, ms: u64, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "flywheel-rewarder".into(),
        "--kafka-brokers".into(),
        s.kafka.brokers.clone(),
        "--kafka-session-timeout-ms".into(),
        "6000".into(),
        // A killed member must leave the group quickly: tansu waits up to
        // the rebalance timeout (max.poll.interval.ms) for it.
        "-X".into(),
        "max.poll.interval.ms=20000".into(),
        "--topics-config".into(),
        s.topics_file.display().to_string(),
        "--ops-listen".into(),
        "127.0.0.1:0".into(),
        "--outcome-window-ms".into(),
        WINDOW_MS.to_string(),
        "--allowed-lateness-ms".into(),
        "0".into(),
        "--checkpoint-dir".into(),
        s.checkpoints.display().to_string(),
        "--checkpoint-every-records".into(),
        records.to_string(),
        "--checkpoint-every-ms".into(),
        ms.to_string(),
        "--log-filter".into(),
        std::env::var("REWARDER_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        "--group-id".into(),
        s.group.clone(),
    ];
    if let Some(store) = &s.store {
        args.extend(["--checkpoint-store".to_string(), store.clone()]);
    }
    args.extend(extra.iter().map(|x| x.to_string()));
    args
}

fn wait_for_rewards(s: &Setup, at_least: usize, secs: u64) -> Vec<Reward> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let got: Vec<Reward> =
            read_all::<Reward>(&s.kafka, &s.topics.name(Topic::Rewards)).into_iter().map(|(_, _, r)| r).collect();
        if got.len() >= at_least || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn assert_exactly(expected: &BTreeMap<String, Reward>, got: &[Reward]) {
    let mut by_id: BTreeMap<String, &Reward> = BTreeMap::new();
    for r in got {
        if let Some(first) = by_id.insert(r.reward_id.clone(), r) {
            panic!("reward for {} emitted twice: lineage {:?} and {:?}", r.suggestion_id, first.lineage, r.lineage);
        }
    }
    assert_eq!(by_id.len(), expected.len(), "reward count");
    for (id, r) in expected {
        assert_eq!(by_id.get(id).copied(), Some(r), "reward for {} differs", r.suggestion_id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_then_restart_gives_exactly_the_uninterrupted_rewards() {
    stopped_mid_stream(Checkpoints::Directory, Stop::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_with_checkpoints_in_an_object_store_url_gives_exactly_the_uninterrupted_rewards() {
    stopped_mid_stream(Checkpoints::FileUrl, Stop::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_exits_within_the_drain_timeout_and_a_restart_gives_exactly_the_uninterrupted_rewards() {
    stopped_mid_stream(Checkpoints::Directory, Stop::Term).await;
}

/// SIGTERM writes a final checkpoint: with periodic checkpoints off, a
/// rewarder that has read everything and is then signalled leaves its
/// successor nothing to re-read. A consumer reads in offset order, so once
/// the successor has processed the new records, any re-read would show in
/// its count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_checkpoints_so_the_successor_rereads_nothing() {
    const NEVER: u64 = 1_000_000_000;
    let s = setup_with("rw-drain", Checkpoints::Directory).await;
    let input = s.topics.name(Topic::Interactions);
    produce(&s.kafka, &input, &stream(100, 0)).await;
    tick_all(&s.kafka, &input, 1, 100).await;
    let total = read_all::<Interaction>(&s.kafka, &input).len();
    let spawn = |ops: std::net::SocketAddr| {
        let drain = DRAIN_TIMEOUT_SECS.to_string();
        spawn_rewarder(rewarder_args_checkpointing(&s, NEVER, NEVER, &["--drain-timeout-secs", &drain]), ops)
    };
    let processed = |body: &str| flywheel_tests::metric(body, "rewarder_records_total{result=\"processed\"}");
    let first_ops = flywheel_devkit::free_local_addr().unwrap();
    let mut first = spawn(first_ops);
    let read_everything = |b: &str| processed(b) == Some(total as f64);
    metrics_when(first_ops, 60, "the first rewarder reading every record", read_everything).await;
    let status = tokio::task::block_in_place(|| flywheel_tests::terminate_within(&mut first, DRAIN_TIMEOUT_SECS));
    assert!(status.success(), "exit on SIGTERM: {status}");

    let second_ops = flywheel_devkit::free_local_addr().unwrap();
    let mut second = spawn(second_ops);
    let assigned = format!("rewarder_assigned_partitions {PARTITIONS}");
    metrics_when(second_ops, 60, "the successor holding every partition", |b| b.contains(&assigned)).await;
    tick_all(&s.kafka, &input, 2, 100).await;
    let new = PARTITIONS as f64;
    let read_new = |b: &str| processed(b).is_some_and(|n| n >= new);
    let body = metrics_when(second_ops, 60, "the successor reading the new records", read_new).await;
    assert_eq!(processed(&body), Some(new), "the successor re-read records checkpointed at SIGTERM");
    let status = tokio::task::block_in_place(|| flywheel_tests::terminate_within(&mut second, DRAIN_TIMEOUT_SECS));
    assert!(status.success(), "exit on SIGTERM: {status}");
    let rewards = read_all::<Reward>(&s.kafka, &s.topics.name(Topic::Rewards));
    let ids: std::collections::BTreeSet<&str> = rewards.iter().map(|(_, _, r)| r.reward_id.as_str()).collect();
    assert_eq!(ids.len(), rewards.len(), "a reward was published twice");
}

/// The rewarder binary with `args` (from [`rewarder_args`]) and its ops
/// endpoint on `ops`.
fn spawn_rewarder(mut args: Vec<String>, ops: std::net::SocketAddr) -> Reaped {
    let at = args.iter().position(|a| a == "--ops-listen").unwrap() + 1;
    args[at] = ops.to_string();
    Reaped(std::process::Command::new(workspace_binary("flywheel-rewarder")).args(&args[1..]).spawn().unwrap())
}

/// How the first rewarder is stopped while it works.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    /// SIGKILL: no warning.
    Kill,
    /// SIGTERM: it must exit cleanly within its drain timeout.
    Term,
}

/// The first rewarder's drain timeout.
const DRAIN_TIMEOUT_SECS: u64 = 30;

async fn stopped_mid_stream(checkpoints: Checkpoints, stop: Stop) {
    let s = setup_with("rw-kill", checkpoints).await;
    let input = s.topics.name(Topic::Interactions);
    let first = stream(200, 0);
    produce(&s.kafka, &input, &first).await;
    tick_all(&s.kafka, &input, 1, 200).await;

    let spawn = |ops: std::net::SocketAddr| {
        let drain = DRAIN_TIMEOUT_SECS.to_string();
        spawn_rewarder(rewarder_args(&s, &["--drain-timeout-secs", &drain]), ops)
    };
    let mut child = spawn(flywheel_devkit::free_local_addr().unwrap());
    // Let it emit part of the first half, then kill it without warning.
    let partial = tokio::task::block_in_place(|| wait_for_rewards(&s, 60, 60));
    assert!(partial.len() >= 60, "rewarder produced only {} rewards", partial.len());
    match stop {
        Stop::Kill => {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
        }
        Stop::Term => {
            let status =
                tokio::task::block_in_place(|| flywheel_tests::terminate_within(&mut child, DRAIN_TIMEOUT_SECS));
            assert!(status.success(), "exit on SIGTERM while busy: {status}");
        }
    }
    // Restarted at once, while the killed member's session is still open:
    // it may be assigned only part of the topic (or nothing) at first, and
    // must rejoin once the dead member's partitions show no progress.
    let ops = flywheel_devkit::free_local_addr().unwrap();
    let mut child = spawn(ops);
    let second = stream(150, 200);
    produce(&s.kafka, &input, &second).await;
    tick_all(&s.kafka, &input, 2, 350).await;
    let (expected, expected_metrics) = tokio::task::block_in_place(|| expected_outputs(&s));
    // One reward per shown suggestion, the first round's tick suggestions included.
    assert_eq!(expected.len(), 350 + PARTITIONS as usize);
    let got = tokio::task::block_in_place(|| wait_for_rewards(&s, expected.len(), 90));
    // A little longer: nothing beyond the expected may arrive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got_final: Vec<Reward> =
        read_all::<Reward>(&s.kafka, &s.topics.name(Topic::Rewards)).into_iter().map(|(_, _, r)| r).collect();
    assert!(got_final.len() >= got.len());
    let exposed = String::from_utf8(flywheel_tests::http(ops, "GET", "/metrics", &[], vec![]).await.body).unwrap();
    // Readiness follows the assignment: the replacement holds every partition.
    let ready = flywheel_tests::http(ops, "GET", "/readyz", &[], vec![]).await;
    assert_eq!(ready.status, 200, "{}", String::from_utf8_lossy(&ready.body));
    assert!(exposed.contains(&format!("rewarder_assigned_partitions {PARTITIONS}")), "{exposed}");
    let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    assert!(child.wait().unwrap().success(), "clean exit on SIGTERM");
    assert_exactly(&expected, &got_final);
    tokio::task::block_in_place(|| assert_metrics(&s, &expected_metrics, &got_final));
    assert_exposed_latest_window(&exposed, &expected_metrics);

    // Orphans went to the dead-letter topic once each, with a reason.
    let dead: Vec<DeadLetter> =
        read_all::<DeadLetter>(&s.kafka, &s.topics.name(Topic::DeadLetters)).into_iter().map(|(_, _, d)| d).collect();
    let ghosts = (0..350).filter(|i| i % 23 == 0).count();
    assert_eq!(dead.len(), ghosts, "one dead letter per orphan event");
    assert!(dead.iter().all(|d| d.reason_code == "orphan_event" && d.reason.contains("ghost-")));
    assert_checkpoints_in_their_storage(&s, &input);
}

/// Every partition has a checkpoint in the storage the test chose, and a
/// store named by URL left the default directory untouched.
fn assert_checkpoints_in_their_storage(s: &Setup, input: &str) {
    let listed = tokio::task::block_in_place(|| checkpoint_storage(s).list(&format!("{}/{input}", s.group)).unwrap());
    let expected: Vec<String> = (0..PARTITIONS).map(|p| format!("{}/{input}/{p}.json", s.group)).collect();
    assert_eq!(listed, expected, "a checkpoint per partition in {:?}", s.store);
    if s.store.is_some() {
        assert!(!s.checkpoints.exists(), "--checkpoint-store given, yet {} was written", s.checkpoints.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_partitions_across_a_rebalance_without_loss_or_duplicates() {
    rebalance(Checkpoints::Directory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_partitions_across_a_rebalance_with_checkpoints_in_an_object_store() {
    rebalance(Checkpoints::Memory).await;
}

async fn rebalance(checkpoints: Checkpoints) {
    let s = setup_with("rw-rebalance", checkpoints).await;
    let input = s.topics.name(Topic::Interactions);
    produce(&s.kafka, &input, &stream(150, 0)).await;
    // A record that is not Avro: dead-lettered with its bytes, processing goes on.
    let producer: FutureProducer = s.kafka.client_config(&ClientRole::Producer).unwrap().create().unwrap();
    producer
        .send(FutureRecord::to(&input).key("sugg-garbage").payload("{\"oops\":1}"), Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    tick_all(&s.kafka, &input, 1, 150).await;

    let start = |name: &str| {
        let config = flywheel_rewarder::Config::try_parse_from(rewarder_args(&s, &[])).unwrap();
        let token = CancellationToken::new();
        let t = token.clone();
        let name = name.to_string();
        let handle = tokio::spawn(async move {
            flywheel_rewarder::run(config, t).await.unwrap_or_else(|e| panic!("instance {name} failed: {e}"))
        });
        (token, handle)
    };
    // If an assertion fails, stop both instances so the runtime can exit.
    struct CancelOnDrop(Vec<CancellationToken>);
    impl Drop for CancelOnDrop {
        fn drop(&mut self) {
            self.0.iter().for_each(CancellationToken::cancel);
        }
    }
    let (a_stop, a) = start("a");
    let partial = tokio::task::block_in_place(|| wait_for_rewards(&s, 40, 60));
    assert!(partial.len() >= 40);
    // A second member joins: the group rebalances and partitions move.
    let (b_stop, b) = start("b");
    let _guard = CancelOnDrop(vec![a_stop.clone(), b_stop.clone()]);
    tokio::time::sleep(Duration::from_secs(8)).await;
    produce(&s.kafka, &input, &stream(150, 150)).await;
    tick_all(&s.kafka, &input, 2, 300).await;
    let (expected, expected_metrics) = tokio::task::block_in_place(|| expected_outputs(&s));
    assert_eq!(expected.len(), 300 + PARTITIONS as usize);
    let _ = tokio::task::block_in_place(|| wait_for_rewards(&s, expected.len(), 120));
    tokio::time::sleep(Duration::from_secs(3)).await;
    a_stop.cancel();
    b_stop.cancel();
    a.await.unwrap();
    b.await.unwrap();
    let got: Vec<Reward> =
        read_all::<Reward>(&s.kafka, &s.topics.name(Topic::Rewards)).into_iter().map(|(_, _, r)| r).collect();
    assert_exactly(&expected, &got);
    tokio::task::block_in_place(|| assert_metrics(&s, &expected_metrics, &got));
    let dead: Vec<DeadLetter> =
        read_all::<DeadLetter>(&s.kafka, &s.topics.name(Topic::DeadLetters)).into_iter().map(|(_, _, d)| d).collect();
    let malformed: Vec<&DeadLetter> = dead.iter().filter(|d| d.reason_code == "bad_magic").collect();
    assert_eq!(malformed.len(), 1, "{dead:?}");
    assert_eq!(malformed[0].original_value.as_deref(), Some(&b"{\"oops\":1}"[..]));
    assert_eq!(malformed[0].original_key.as_deref(), Some(&b"sugg-garbage"[..]));
    assert_eq!(dead.len() - 1, (0..300).filter(|i| i % 23 == 0).count(), "plus one orphan dead letter per ghost event");
    // Every partition was checkpointed (on revoke, periodically or at stop).
    assert_checkpoints_in_their_storage(&s, &input);
}

/// `next_offset` of every partition's checkpoint file (absent: no checkpoint).
fn checkpoint_offsets(s: &Setup, input: &str) -> BTreeMap<i32, i64> {
    let dir = s.checkpoints.join(&s.group).join(input);
    (0..PARTITIONS)
        .filter_map(|p| {
            let bytes = std::fs::read(dir.join(format!("{p}.json"))).ok()?;
            let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
            Some((p, v["next_offset"].as_i64()?))
        })
        .collect()
}

/// End offset of every partition of `topic`.
fn partition_ends(s: &Setup, topic: &str) -> BTreeMap<i32, i64> {
    let mut ends = BTreeMap::new();
    for (p, o, _) in read_all::<Interaction>(&s.kafka, topic) {
        let e = ends.entry(p).or_insert(0);
        *e = (*e).max(o + 1);
    }
    ends
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_taken_during_a_replay_still_skips_what_the_crashed_owner_wrote() {
    // Instance 1 writes every output but keeps only its first checkpoint
    // (offset 0). Instance 2 resumes there, reads instance 1's outputs back
    // and replays, checkpointing every 5 records, and is stopped in the
    // middle of that replay. Instance 3 resumes from instance 2's checkpoint:
    // what instance 1 wrote beyond it lies before that checkpoint's
    // read-back start, and must still not be written again.
    let s = setup("rw-replay").await;
    let input = s.topics.name(Topic::Interactions);
    produce(&s.kafka, &input, &stream(600, 0)).await;
    tick_all(&s.kafka, &input, 1, 600).await;
    let spawn = |records: u64, ms: u64| {
        let args = rewarder_args_checkpointing(&s, records, ms, &[]);
        Reaped(std::process::Command::new(workspace_binary("flywheel-rewarder")).args(&args[1..]).spawn().unwrap())
    };
    let (expected, expected_metrics) = tokio::task::block_in_place(|| expected_outputs(&s));
    let mut first = spawn(1_000_000_000, 3_600_000_000);
    let got = tokio::task::block_in_place(|| wait_for_rewards(&s, expected.len(), 120));
    assert_eq!(got.len(), expected.len(), "instance 1 wrote every reward");
    first.kill().unwrap(); // SIGKILL: no checkpoint beyond the first
    first.wait().unwrap();
    assert!(checkpoint_offsets(&s, &input).values().all(|o| *o == 0), "{:?}", checkpoint_offsets(&s, &input));

    let ends = tokio::task::block_in_place(|| partition_ends(&s, &input));
    let mut second = spawn(5, 3_600_000_000);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if checkpoint_offsets(&s, &input).values().any(|o| *o > 0) {
            break;
        }
        assert!(Instant::now() < deadline, "instance 2 wrote no checkpoint in 120 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    // Frozen the moment its first replay checkpoint appears, then killed.
    flywheel_tests::signal(second.id(), "STOP");
    second.kill().unwrap();
    second.wait().unwrap();
    let mid: Vec<(i32, i64)> =
        checkpoint_offsets(&s, &input).into_iter().filter(|(p, o)| *o > 0 && *o < ends[p]).collect();
    assert!(
        !mid.is_empty(),
        "instance 2 was not stopped inside its replay: {:?} of {ends:?}",
        checkpoint_offsets(&s, &input)
    );
    eprintln!("instance 2 stopped with checkpoints inside its replay at {mid:?} of {ends:?}");

    let mut third = spawn(40, 1000);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Instance 3 is done once every partition's checkpoint is at its end.
    let deadline = Instant::now() + Duration::from_secs(120);
    while checkpoint_offsets(&s, &input) != ends {
        assert!(
            Instant::now() < deadline,
            "instance 3 did not finish: {:?} of {ends:?}",
            checkpoint_offsets(&s, &input)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = std::process::Command::new("kill").args(["-TERM", &third.id().to_string()]).status();
    assert!(third.wait().unwrap().success(), "clean exit on SIGTERM");
    let got: Vec<Reward> =
        read_all::<Reward>(&s.kafka, &s.topics.name(Topic::Rewards)).into_iter().map(|(_, _, r)| r).collect();
    assert_exactly(&expected, &got);
    tokio::task::block_in_place(|| assert_metrics(&s, &expected_metrics, &got));
    let dead: Vec<DeadLetter> =
        read_all::<DeadLetter>(&s.kafka, &s.topics.name(Topic::DeadLetters)).into_iter().map(|(_, _, d)| d).collect();
    let ghosts = (0..600).filter(|i| i % 23 == 0).count();
    let offsets: std::collections::BTreeSet<(i32, i64)> =
        dead.iter().map(|d| (d.source.partition, d.source.offset)).collect();
    assert_eq!(offsets.len(), dead.len(), "an orphan was dead-lettered twice");
    assert_eq!(dead.len(), ghosts, "one dead letter per orphan event");
}
