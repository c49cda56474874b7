//! Chaos: the rewarder and the lake writer killed with SIGKILL again and again
//! (each restarted at once, while its killed predecessor's group session is
//! still open) and the broker restarted once, all while interactions keep
//! arriving. Afterwards the topics and the lake must hold exactly what an
//! uninterrupted run computes from the same input: one reward per shown
//! suggestion on `rewards` and in the lake (read by DuckDB), every metrics
//! record, late event and dead letter once, every committed file announced
//! once, nothing lost.
//!
//! The short run here (about 45 s of load) is part of `make test`; `make
//! chaos` runs a long one: `FLYWHEEL_CHAOS_SECONDS` sets the load's length
//! and `FLYWHEEL_CHAOS_SEED` replays a schedule (the seed is printed).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use flywheel_core::codec::encode;
use flywheel_core::kafka::{ClientRole, KafkaArgs};
use flywheel_core::records::*;
use flywheel_core::rng::SplitMix;
use flywheel_core::topics::Topic;
use flywheel_lake::store::{LocalStore, Storage};
use flywheel_rewarder::join::{Emitted, JoinConfig, PartitionJoiner};
use flywheel_rewarder::reward_fn::RewardFunction;
use flywheel_rewarder::window_metrics::metrics_record_id;
use flywheel_tests::{
    DedicatedBroker, Reaped, TestTopics, delta_query, read_all, read_all_within, test_topics_on, with_lake,
    workspace_binary,
};
use rdkafka::producer::{FutureProducer, FutureRecord};

const T0: i64 = 1_795_424_400_000;
const WINDOW_MS: i64 = 2_000;
const METRICS_WINDOW_MS: i64 = 10_000;
/// Suggestions per second of load (about 2.5 events each).
const RATE: usize = 80;
/// Longest time to read a whole topic back (a long run's topics are big, and
/// the small batches of a trickling load make reading them slow).
const READ_LIMIT: Duration = Duration::from_secs(900);

fn event(id: u64, suggestion: &str, t: i64, payload: InteractionPayload) -> Interaction {
    Interaction {
        event_id: format!("c4a05000-0000-4000-8000-{id:012}"),
        event_time: t,
        received_time: t,
        tenant: "acme".into(),
        user_id: format!("user-{}", id % 31),
        session_id: None,
        suggestion_id: suggestion.into(),
        payload,
        attributes: BTreeMap::new(),
    }
}

fn shown(id: u64, suggestion: &str, t: i64) -> Interaction {
    event(
        id,
        suggestion,
        t,
        InteractionPayload::Shown(SuggestionShown {
            model_id: "tiny".into(),
            adapter_version: id.is_multiple_of(3).then(|| "v2".to_string()),
            experiment_arm: Some("live".into()),
            surface: "editor".into(),
            prompt: format!("prompt {id}"),
            completion: format!("completion {id}"),
            behavior_logprob: None,
            latency_ms: 5,
        }),
    )
}

/// The records of suggestion `i` (shown at `T0 + 10 ms · i` in event time):
/// an outcome for most, a client retry of the shown event for some, a
/// rating that arrives after the window for some (late), an event of a
/// suggestion never shown for some (orphan). Values are Avro, except now
/// and then a record that is not (dead-lettered).
fn records_of(i: u64) -> Vec<(String, Vec<u8>)> {
    let s = format!("sugg-{i}");
    let t = T0 + i as i64 * 10;
    let id = 10 * i;
    let mut out = vec![shown(id, &s, t)];
    match i % 5 {
        0 | 1 => out.push(event(
            id + 1,
            &s,
            t + 400,
            InteractionPayload::Accepted(SuggestionAccepted { time_to_accept_ms: 400 + (i % 7) as i64 }),
        )),
        2 => out.push(event(id + 1, &s, t + 300, InteractionPayload::Rejected(SuggestionRejected::default()))),
        3 => out.push(event(id + 1, &s, t + 900, InteractionPayload::Dismissed(SuggestionDismissed::default()))),
        _ => {}
    }
    if i.is_multiple_of(7) {
        out.push(shown(id, &s, t)); // a client retry
    }
    if i.is_multiple_of(23) {
        let ghost = format!("ghost-{i}");
        out.push(event(id + 3, &ghost, t, InteractionPayload::Rejected(SuggestionRejected::default())));
    }
    let mut records: Vec<(String, Vec<u8>)> =
        out.iter().map(|e| (e.suggestion_id.clone(), encode(e).expect("encodable"))).collect();
    if i.is_multiple_of(37) && i >= 1000 {
        // A rating of a suggestion 1,000 earlier: its window closed long ago.
        let old = i - 1000;
        let rated = event(
            10 * old + 4,
            &format!("sugg-{old}"),
            T0 + old as i64 * 10 + 8_000,
            InteractionPayload::Rated(SuggestionRated { score: 4.0, scale_min: 1.0, scale_max: 5.0 }),
        );
        records.push((rated.suggestion_id.clone(), encode(&rated).expect("encodable")));
    }
    if i.is_multiple_of(997) {
        records.push((s.clone(), b"\x00not an interaction".to_vec()));
    }
    records
}

/// Produces `records` until each is acknowledged. A send that fails (the
/// broker is restarting) is sent again with a fresh producer: a record may
/// land twice, as a client retry would, and downstream deduplicates.
async fn produce_all(kafka: &KafkaArgs, producer: &mut FutureProducer, topic: &str, records: &[(String, Vec<u8>)]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut pending: Vec<&(String, Vec<u8>)> = records.iter().collect();
    while !pending.is_empty() {
        // Queue the whole batch first, then wait for the acknowledgements.
        let queued: Vec<_> = pending
            .iter()
            .map(|(key, value)| producer.send_result(FutureRecord::to(topic).key(key).payload(value)).ok())
            .collect();
        let mut failed = Vec::new();
        for (record, delivery) in pending.into_iter().zip(queued) {
            let acked = match delivery {
                Some(d) => matches!(d.await, Ok(Ok(_))),
                None => false,
            };
            if !acked {
                failed.push(record);
            }
        }
        pending = failed;
        if !pending.is_empty() {
            assert!(Instant::now() < deadline, "{} records not acknowledged in 120 s", pending.len());
            eprintln!("{} sends failed; retrying with a new producer", pending.len());
            tokio::time::sleep(Duration::from_secs(1)).await;
            *producer = kafka.client_config(&ClientRole::Producer).unwrap().create().unwrap();
        }
    }
}

fn join_config() -> JoinConfig {
    JoinConfig {
        outcome_window_ms: WINDOW_MS,
        allowed_lateness_ms: 0,
        metrics_windows_ms: vec![METRICS_WINDOW_MS],
        ..JoinConfig::default()
    }
}

/// What an uninterrupted run computes from the input topic as it stands.
#[derive(Default)]
struct Expected {
    rewards: BTreeMap<String, Reward>,
    metrics: BTreeSet<String>,
    late: usize,
    orphans: usize,
}

fn expected(kafka: &KafkaArgs, input: &str) -> (Expected, usize) {
    let mut joiners: HashMap<i32, PartitionJoiner> = HashMap::new();
    let mut out = Vec::new();
    let records = read_all_within::<Interaction>(kafka, input, READ_LIMIT);
    let events = records.len();
    for (p, o, e) in records {
        joiners
            .entry(p)
            .or_insert_with(|| PartitionJoiner::new(input, p, join_config(), RewardFunction::default()))
            .process(o, e, &mut out);
    }
    let mut x = Expected::default();
    for e in out {
        match e {
            Emitted::Reward(r) => assert!(x.rewards.insert(r.reward_id.clone(), *r).is_none(), "reward ids are unique"),
            Emitted::Metrics(m) => _ = x.metrics.insert(metrics_record_id(&m)),
            Emitted::Late { .. } => x.late += 1,
            Emitted::Orphan { .. } => x.orphans += 1,
        }
    }
    (x, events)
}

/// A service under test, started again whenever it exits or is killed.
struct Service {
    name: &'static str,
    args: Vec<String>,
    child: Reaped,
    kills: u32,
    crashes: u32,
}

impl Service {
    fn start(name: &'static str, args: Vec<String>) -> Service {
        let child = Self::spawn(name, &args);
        Service { name, args, child, kills: 0, crashes: 0 }
    }

    fn spawn(name: &str, args: &[String]) -> Reaped {
        Reaped(Command::new(workspace_binary(name)).args(args).spawn().expect("starting a service"))
    }

    /// SIGKILL, then a new instance at once.
    fn kill_and_restart(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaping");
        self.kills += 1;
        self.child = Self::spawn(self.name, &self.args);
    }

    /// Restarts it if it exited on its own (a supervisor's job); returns how it ended.
    fn restart_if_exited(&mut self) -> Option<String> {
        let status = self.child.try_wait().ok().flatten()?;
        self.crashes += 1;
        self.child = Self::spawn(self.name, &self.args);
        Some(status.to_string())
    }

    fn stop(&mut self) {
        flywheel_tests::signal(self.child.id(), "TERM");
        let status = self.child.wait().expect("reaping");
        assert!(status.success(), "{} did not exit cleanly on SIGTERM: {status}", self.name);
    }
}

fn common_args(kafka: &KafkaArgs, t: &TestTopics, group: &str) -> Vec<String> {
    let log = std::env::var("CHAOS_TEST_LOG").unwrap_or_else(|_| "warn".into());
    [
        "--kafka-brokers",
        &kafka.brokers,
        "--kafka-session-timeout-ms",
        "6000",
        // A killed member must leave a rebalance quickly: tansu waits up to
        // the rebalance timeout (max.poll.interval.ms) for it.
        "-X",
        "max.poll.interval.ms=20000",
        "--topics-config",
        &t.file.display().to_string(),
        "--ops-listen",
        "127.0.0.1:0",
        "--group-id",
        group,
        "--log-filter",
        &log,
    ]
    .map(String::from)
    .to_vec()
}

/// `next_offset` of every partition's rewarder checkpoint.
fn checkpoints(dir: &Path) -> BTreeMap<i32, i64> {
    let Ok(entries) = std::fs::read_dir(dir) else { return BTreeMap::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let p: i32 = name.strip_suffix(".json")?.parse().ok()?;
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
            Some((p, v["next_offset"].as_i64()?))
        })
        .collect()
}

/// End offset of every non-empty partition of `topic`.
fn ends(kafka: &KafkaArgs, topic: &str) -> BTreeMap<i32, i64> {
    let probe: rdkafka::consumer::BaseConsumer =
        kafka.client_config(&ClientRole::Consumer { group_id: "chaos-probe".into() }).unwrap().create().unwrap();
    flywheel_core::kafka::end_offsets(&probe, &[topic]).unwrap()[topic]
        .iter()
        .filter(|(_, e)| **e > 0)
        .map(|(p, e)| (*p, *e))
        .collect()
}

fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not reached in {secs} s");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Restarts services that exited on their own, saying so.
fn supervise(services: &mut [Service], started: Instant) {
    for s in services.iter_mut() {
        if let Some(status) = s.restart_if_exited() {
            eprintln!(
                "[{:>5.1}s] {} exited on its own ({status}); started again",
                started.elapsed().as_secs_f64(),
                s.name
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_kills_and_a_broker_restart_under_load_lose_and_duplicate_nothing() {
    let seconds: u64 = std::env::var("FLYWHEEL_CHAOS_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(45);
    let seed: u64 = std::env::var("FLYWHEEL_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("chaos: {seconds} s of load, seed {seed} (FLYWHEEL_CHAOS_SEED={seed} replays the schedule)");
    let started = Instant::now();
    let mut broker = DedicatedBroker::start("chaos");
    let kafka = broker.kafka();
    let wanted = [
        Topic::Interactions,
        Topic::InteractionsLate,
        Topic::Rewards,
        Topic::RewardMetrics,
        Topic::Shards,
        Topic::DeadLetters,
    ];
    let t = test_topics_on(kafka.clone(), "chaos", &wanted, None).await;
    let (input, rewards_topic) = (t.topics.name(Topic::Interactions), t.topics.name(Topic::Rewards));
    let checkpoint_root = t.dir.join("checkpoints");
    let lake_root: PathBuf = t.dir.join("lake");
    let rewarder_group = format!("{}rewarder", t.topics.prefix);
    let mut rewarder_args = common_args(&kafka, &t, &rewarder_group);
    rewarder_args.extend(
        [
            "--checkpoint-dir",
            &checkpoint_root.display().to_string(),
            // Checkpoints every 3 s leave seconds of outputs to replay after
            // a kill, and one every 100 records of a partition lands in the
            // middle of such a replay.
            "--checkpoint-every-records",
            "100",
            "--checkpoint-every-ms",
            "3000",
            "--outcome-window-ms",
            &WINDOW_MS.to_string(),
            "--allowed-lateness-ms",
            "0",
            "--metrics-windows-ms",
            &METRICS_WINDOW_MS.to_string(),
        ]
        .map(String::from),
    );
    let mut lake_args = common_args(&kafka, &t, &format!("{}lake-writer", t.topics.prefix));
    lake_args.extend(
        [
            "--lake-root",
            &lake_root.display().to_string(),
            "--roll-max-rows",
            "2000",
            "--roll-max-age-ms",
            "1000",
            "--roll-idle-ms",
            "500",
        ]
        .map(String::from),
    );
    let mut services =
        [Service::start("flywheel-rewarder", rewarder_args), Service::start("flywheel-lake-writer", lake_args)];

    // The load: RATE suggestions per second, in event-time order, from a task.
    let load_stop = tokio_util::sync::CancellationToken::new();
    let load = {
        let (kafka, input, stop) = (kafka.clone(), input.clone(), load_stop.clone());
        tokio::spawn(async move {
            let mut producer: FutureProducer = kafka.client_config(&ClientRole::Producer).unwrap().create().unwrap();
            let mut next = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            while !stop.is_cancelled() {
                tick.tick().await;
                let records: Vec<(String, Vec<u8>)> = (next..next + RATE as u64 / 4).flat_map(records_of).collect();
                produce_all(&kafka, &mut producer, &input, &records).await;
                next += RATE as u64 / 4;
            }
            (next, producer)
        })
    };

    // The chaos: a SIGKILL every 1.5-8 s, of each service in turn, and one
    // time in three a second kill of the same service 0.5-2.5 s after the
    // first (while its replacement resumes and replays); the broker restarted
    // once, half-way. Services that exit on their own (the broker was away)
    // are started again, as `flywheel up`'s supervisor does.
    let mut rng = SplitMix(seed);
    let pause = |rng: &mut SplitMix| Duration::from_millis(1_500 + rng.below(6_500));
    let mut next_kill = Instant::now() + pause(&mut rng);
    let mut turn = 0;
    let mut broker_restarted = false;
    let load_started = Instant::now();
    while load_started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        supervise(&mut services, started);
        if !broker_restarted && load_started.elapsed() >= Duration::from_secs(seconds / 2) {
            eprintln!("[{:>5.1}s] restarting the broker", started.elapsed().as_secs_f64());
            tokio::task::block_in_place(|| {
                broker.stop();
                std::thread::sleep(Duration::from_secs(2));
                broker.restart_now();
            });
            eprintln!("[{:>5.1}s] broker back", started.elapsed().as_secs_f64());
            broker_restarted = true;
        }
        if Instant::now() >= next_kill {
            let victim = &mut services[turn % 2];
            victim.kill_and_restart();
            eprintln!("[{:>5.1}s] killed {} (kill {})", started.elapsed().as_secs_f64(), victim.name, victim.kills);
            if rng.below(3) == 0 {
                next_kill = Instant::now() + Duration::from_millis(500 + rng.below(2_000));
            } else {
                turn += 1;
                next_kill = Instant::now() + pause(&mut rng);
            }
        }
    }
    load_stop.cancel();
    let (suggestions, mut producer) = load.await.expect("the load task");
    // Far-future events close every window on every partition.
    let ticks: Vec<(String, Vec<u8>)> = (0..64u64)
        .map(|n| {
            let e = shown(9_000_000 + n, &format!("tick-{n}"), T0 + 86_400_000);
            (e.suggestion_id.clone(), encode(&e).unwrap())
        })
        .collect();
    produce_all(&kafka, &mut producer, &input, &ticks).await;
    let load_secs = load_started.elapsed().as_secs_f64();

    // Every partition processed (rewarder checkpoints at the input's ends),
    // then everything committed to the lake.
    let input_ends = tokio::task::block_in_place(|| ends(&kafka, &input));
    let checkpoint_dir = checkpoint_root.join(&rewarder_group).join(&input);
    eprintln!("[{:>5.1}s] load stopped; input ends {input_ends:?}", started.elapsed().as_secs_f64());
    tokio::task::block_in_place(|| {
        let mut shown = Instant::now();
        wait_for("rewarder checkpoints at the input's end", 300, || {
            supervise(&mut services, started);
            let now = checkpoints(&checkpoint_dir);
            if shown.elapsed() >= Duration::from_secs(10) {
                eprintln!("[{:>5.1}s] rewarder checkpoints {now:?}", started.elapsed().as_secs_f64());
                shown = Instant::now();
            }
            now == input_ends
        });
        let reward_ends = ends(&kafka, &rewards_topic);
        eprintln!("[{:>5.1}s] rewarder done; rewards ends {reward_ends:?}", started.elapsed().as_secs_f64());
        wait_for("lake commit log covering every reward", 300, || {
            supervise(&mut services, started);
            lake_root.join("rewards/_delta_log").exists()
                && with_lake(&lake_root, |lake| {
                    reward_ends.iter().all(|(p, end)| {
                        lake.committed_offset(&rewards_topic, *p).unwrap().is_some_and(|c| c + 1 >= *end)
                    })
                })
        });
        eprintln!("[{:>5.1}s] lake writer done", started.elapsed().as_secs_f64());
    });
    for s in services.iter_mut() {
        s.stop();
    }
    let settled_secs = started.elapsed().as_secs_f64();

    // Ground truth: an uninterrupted run over the same input.
    let (want, events) = tokio::task::block_in_place(|| expected(&kafka, &input));
    assert!(want.rewards.len() as u64 >= suggestions, "{} rewards for {suggestions} suggestions", want.rewards.len());

    // The rewards topic: each reward once, equal to the uninterrupted run's.
    let got: Vec<Reward> =
        read_all_within::<Reward>(&kafka, &rewards_topic, READ_LIMIT).into_iter().map(|r| r.2).collect();
    let mut by_id: BTreeMap<&str, &Reward> = BTreeMap::new();
    let topic_duplicates = got.iter().filter(|r| by_id.insert(&r.reward_id, r).is_some()).count();
    let topic_lost = want.rewards.keys().filter(|id| !by_id.contains_key(id.as_str())).count();
    for (id, r) in &want.rewards {
        if let Some(g) = by_id.get(id.as_str()) {
            assert_eq!(*g, r, "reward {id} differs from the uninterrupted run's");
        }
    }
    let extra: Vec<&&str> = by_id.keys().filter(|id| !want.rewards.contains_key(**id)).collect();
    assert!(extra.is_empty(), "rewards the uninterrupted run does not compute: {extra:?}");

    // Metrics, late events, dead letters: each once.
    let metrics: Vec<RewardMetrics> =
        read_all_within::<RewardMetrics>(&kafka, &t.topics.name(Topic::RewardMetrics), READ_LIMIT)
            .into_iter()
            .map(|r| r.2)
            .collect();
    let metric_ids: BTreeSet<String> = metrics.iter().map(metrics_record_id).collect();
    let late = read_all_within::<Interaction>(&kafka, &t.topics.name(Topic::InteractionsLate), READ_LIMIT).len();
    let dead: Vec<DeadLetter> = read_all_within::<DeadLetter>(&kafka, &t.topics.name(Topic::DeadLetters), READ_LIMIT)
        .into_iter()
        .map(|r| r.2)
        .collect();
    let rewarder_dead: Vec<&DeadLetter> = dead.iter().filter(|d| d.service == "rewarder").collect();
    let dead_positions: BTreeSet<(i32, i64)> =
        rewarder_dead.iter().map(|d| (d.source.partition, d.source.offset)).collect();
    let malformed = rewarder_dead.iter().filter(|d| d.reason_code != "orphan_event").count();

    // The lake, read by DuckDB's delta_scan: one row per reward, with its value.
    let table = lake_root.join("rewards").display().to_string();
    let rows = delta_query("duckdb", &table, "select reward_id, reward from TABLE", &[]);
    let mut lake_ids: BTreeMap<String, f64> = BTreeMap::new();
    let lake_duplicates = rows
        .iter()
        .filter(|r| lake_ids.insert(r[0].as_str().unwrap().to_string(), r[1].as_f64().unwrap()).is_some())
        .count();
    let lake_lost = want.rewards.keys().filter(|id| !lake_ids.contains_key(*id)).count();
    for (id, value) in &lake_ids {
        let r = want.rewards.get(id).unwrap_or_else(|| panic!("{id} is in the lake but no suggestion earned it"));
        assert_eq!(*value, r.reward, "reward {id} in the lake");
    }

    // Files: the directory holds the table's files plus, at most, files a
    // killed writer created but never committed; a vacuum deletes exactly
    // those. Each committed file is announced once.
    let data_files = || -> BTreeSet<String> {
        let listed = LocalStore::open(&lake_root).unwrap().list("rewards").unwrap().into_iter();
        listed.filter(|p| !p.starts_with("rewards/_delta_log/")).collect()
    };
    let committed: BTreeSet<String> =
        with_lake(&lake_root, |lake| lake.files().unwrap().into_iter().map(|f| f.path).collect());
    let before_vacuum = data_files();
    assert!(before_vacuum.is_superset(&committed), "a committed file is missing");
    let orphans = before_vacuum.len() - committed.len();
    let vacuumed = with_lake(&lake_root, |lake| lake.vacuum(Duration::ZERO).unwrap());
    assert_eq!(vacuumed.deleted, orphans, "vacuum deletes exactly the uncommitted leftovers");
    let on_disk = data_files();
    let manifests: Vec<ShardManifest> =
        read_all_within::<ShardManifest>(&kafka, &t.topics.name(Topic::Shards), READ_LIMIT)
            .into_iter()
            .map(|r| r.2)
            .collect();
    let announced: BTreeSet<&str> = manifests.iter().map(|m| m.uri.as_str()).collect();
    let kills: Vec<String> = services.iter().map(|s| format!("{} {}", s.name, s.kills)).collect();
    let crashes: Vec<String> = services.iter().map(|s| format!("{} {}", s.name, s.crashes)).collect();
    eprintln!(
        "chaos summary: {load_secs:.0} s of load, {suggestions} suggestions, {events} input records; kills: {}; \
         exits after the broker restart: {}; 1 broker restart; rewards {} (topic: {topic_duplicates} duplicates, \
         {topic_lost} lost; lake: {} rows, {lake_duplicates} duplicates, {lake_lost} lost); metrics records {}; \
         late events {late}; dead letters {}; files {} (announced {} times); settled after {settled_secs:.0} s",
        kills.join(", "),
        crashes.join(", "),
        want.rewards.len(),
        rows.len(),
        metrics.len(),
        rewarder_dead.len(),
        committed.len(),
        manifests.len(),
    );
    assert_eq!((topic_duplicates, topic_lost), (0, 0), "rewards topic: duplicates and lost rewards");
    assert_eq!((lake_duplicates, lake_lost), (0, 0), "lake: duplicate and lost rows");
    assert_eq!(metrics.len(), metric_ids.len(), "a metrics record was published twice");
    assert_eq!(metric_ids, want.metrics, "metrics records vs the uninterrupted run");
    assert_eq!(late, want.late, "late events vs the uninterrupted run");
    assert_eq!(dead_positions.len(), rewarder_dead.len(), "a dead letter was published twice");
    assert_eq!(rewarder_dead.len() - malformed, want.orphans, "orphan dead letters vs the uninterrupted run");
    assert!(malformed > 0, "the malformed records were dead-lettered");
    assert!(dead.iter().all(|d| d.service == "rewarder"), "the lake writer rejected a valid reward");
    assert_eq!(on_disk, committed, "directory scan after vacuum vs the table");
    assert_eq!(announced.len(), manifests.len(), "a shard was announced twice");
    assert_eq!(announced.into_iter().map(String::from).collect::<BTreeSet<_>>(), committed, "manifests vs files");
    assert!(services.iter().all(|s| s.kills > 0) || seconds < 20, "both services were killed at least once");
}

/// Records on `topic` so far (duplicates included): the sum of its end offsets.
fn count(kafka: &KafkaArgs, topic: &str) -> i64 {
    ends(kafka, topic).values().sum()
}

/// The pid of the process whose program name ends with `program` and one of
/// whose arguments is `arg` (the process itself, not its watchdog shell).
fn pid_of(program: &str, arg: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let named = args.first().is_some_and(|a| a.ends_with(program.as_bytes()));
        (named && args.contains(&arg.as_bytes())).then_some(pid)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flywheel_up_survives_its_broker_being_killed() {
    // `flywheel up` with its embedded broker on a port of this test's own;
    // the broker process is killed (SIGKILL) while the simulated product
    // runs. The supervisor starts the broker again on the same data, any
    // service that exited meanwhile is started again, and the flywheel keeps
    // turning: new rewards and new shards after the restart, nothing twice.
    let work = tempfile::tempdir().unwrap();
    let broker_dir = flywheel_tests::workspace_root()
        .join("target")
        .join("test-broker")
        .join(format!("{}-up-restart", std::process::id()));
    let _ = std::fs::remove_dir_all(&broker_dir);
    let addr = flywheel_devkit::free_local_addr().unwrap();
    let collector = flywheel_devkit::free_local_addr().unwrap();
    let tansu = flywheel_devkit::tansu_binary();
    let out_path = work.path().join("up.out");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut up = Reaped(
        Command::new(workspace_binary("flywheel"))
            .args(["up", "--broker-listen", &addr.to_string(), "--broker-data-dir", &broker_dir.display().to_string()])
            .args(["--tansu-bin", &tansu.display().to_string()])
            .args(["--work-dir", &work.path().join("up").display().to_string()])
            .args(["--collector-listen", &collector.to_string(), "--rate", "20", "--seed", "5"])
            .args(["--summary-every-s", "5", "--freeze-training"])
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("starting flywheel up"),
    );
    let kafka = KafkaArgs::local(addr.to_string());
    let (rewards, shards) = ("rewards", "shards");
    let output = || std::fs::read_to_string(&out_path).unwrap_or_default();
    let running = |up: &mut Reaped| {
        if let Some(status) = up.try_wait().unwrap() {
            panic!("flywheel up exited ({status}):\n{}", output());
        }
    };
    // On failure, show what `flywheel up` printed.
    struct ShowOutput(PathBuf);
    impl Drop for ShowOutput {
        fn drop(&mut self) {
            if std::thread::panicking() {
                eprintln!("flywheel up printed:\n{}", std::fs::read_to_string(&self.0).unwrap_or_default());
            }
        }
    }
    let _show = ShowOutput(out_path.clone());
    tokio::task::block_in_place(|| {
        wait_for("the flywheel turning (rewards and a shard)", 180, || {
            running(&mut up);
            output().contains("== simulated product") && count(&kafka, rewards) >= 30 && count(&kafka, shards) >= 1
        });
    });
    let before = (count(&kafka, rewards), count(&kafka, shards));
    let pid = pid_of("tansu", &format!("tcp://{addr}")).expect("the embedded broker's process");
    flywheel_tests::signal(pid, "KILL");
    eprintln!("killed the broker (pid {pid}) with {} rewards and {} shards on the topics", before.0, before.1);
    tokio::task::block_in_place(|| {
        wait_for("the broker started again", 60, || {
            running(&mut up);
            output().contains("== the broker exited")
        });
        wait_for("new rewards and shards after the restart", 180, || {
            running(&mut up);
            count(&kafka, rewards) >= before.0 + 60 && count(&kafka, shards) > before.1
        });
    });
    // A service that dies is started again, and the summary says so.
    let checkpoints = work.path().join("up").join("rewarder").display().to_string();
    let pid = pid_of("flywheel-rewarder", &checkpoints).expect("the rewarder's process");
    flywheel_tests::signal(pid, "KILL");
    let before = count(&kafka, rewards);
    tokio::task::block_in_place(|| {
        wait_for("the rewarder started again and named in the summary", 60, || {
            running(&mut up);
            let text = output();
            text.contains("== flywheel-rewarder exited (")
                && text.contains("== flywheel-rewarder started again (restart 1)")
                && text.contains("restarts: flywheel-rewarder 1")
        });
        wait_for("new rewards from the restarted rewarder", 120, || {
            running(&mut up);
            count(&kafka, rewards) >= before + 40
        });
    });
    flywheel_tests::signal(up.id(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(150);
    let status = loop {
        if let Some(s) = up.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "flywheel up did not stop in 150 s:\n{}", output());
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let text = output();
    eprintln!(
        "{}",
        text.lines().filter(|l| l.contains("==") || l.contains("restarts:")).collect::<Vec<_>>().join("\n")
    );
    assert!(status.success(), "flywheel up exited with {status}:\n{text}");
    // The broker is gone with `flywheel up`; start it again to read what it kept.
    let broker = flywheel_devkit::LocalBroker::start(&tansu, addr, &broker_dir, Duration::from_secs(60)).unwrap();
    let got: Vec<Reward> = read_all::<Reward>(&kafka, rewards).into_iter().map(|r| r.2).collect();
    let ids: BTreeSet<&str> = got.iter().map(|r| r.reward_id.as_str()).collect();
    assert_eq!(ids.len(), got.len(), "a reward is on the topic twice");
    let lake = work.path().join("up").join("lake");
    let table = lake.join("rewards").display().to_string();
    let rows = delta_query("duckdb", &table, "select reward_id from TABLE", &[]);
    let lake_ids: BTreeSet<&str> = rows.iter().map(|r| r[0].as_str().unwrap()).collect();
    assert_eq!(lake_ids.len(), rows.len(), "a reward is in the lake twice");
    assert!(lake_ids.is_subset(&ids), "the lake holds a reward the topic does not");
    eprintln!("after the broker kill: {} rewards on the topic, {} in the lake, each once", ids.len(), lake_ids.len());
    drop(broker);
    let _ = std::fs::remove_dir_all(&broker_dir);
}
