//! Rewarder throughput through the real broker against the raw consume rate
//! of the same input, side by side in one run.
//!
//! Starts the embedded broker (tansu), and per round: writes a fresh input
//! topic (a realistic mix of shown events, outcomes, follow-ups and ratings),
//! (a) reads it with a bare consumer as fast as it can (no decoding), then
//! (b) runs an in-process rewarder in a fresh consumer group and times it
//! from its first record until every reward the input implies is on the
//! rewards topic (so the rate includes decoding, the join, the metrics,
//! producing and checkpointing). Prints medians. Run with `make bench`.

#![allow(clippy::print_stdout)]

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use clap::Parser;
use flywheel_cli::http::request;
use flywheel_core::codec::{decode, encode};
use flywheel_core::kafka::{ClientRole, KafkaArgs, create_topics};
use flywheel_core::records::*;
use flywheel_core::topics::{Topic, TopicOverride, TopicsConfig};
use flywheel_devkit::{LocalBroker, free_local_addr, tansu_binary, workspace_root};
use flywheel_rewarder::join::{JoinConfig, PartitionJoiner};
use flywheel_rewarder::reward_fn::RewardFunction;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

#[path = "../../rewarder/examples/common/bench_stream.rs"]
mod bench_stream;
use bench_stream::{T0, bench_stream, shown};

const SUGGESTIONS: usize = 60_000;
const PARTITIONS: i32 = 4;
const ROUNDS: usize = 3;
const WINDOW_MS: i64 = 5_000;

async fn produce(kafka: &KafkaArgs, topic: &str, events: &[Interaction]) {
    let producer: FutureProducer = kafka.client_config(&ClientRole::Producer).unwrap().create().unwrap();
    let mut pending: Vec<rdkafka::producer::DeliveryFuture> = Vec::with_capacity(events.len());
    for e in events {
        if pending.len() >= 20_000 {
            for p in pending.drain(..) {
                p.await.unwrap().map_err(|(e, _)| e).unwrap();
            }
        }
        let bytes = encode(e).unwrap();
        pending.push(
            producer
                .send_result(FutureRecord::to(topic).key(&e.suggestion_id).payload(&bytes))
                .map_err(|(e, _)| e)
                .unwrap(),
        );
    }
    // One event per partition far enough ahead to close every window.
    let end = T0 + SUGGESTIONS as i64 * 10 + 10 * WINDOW_MS;
    for p in 0..PARTITIONS {
        let tick = shown(10_000_000 + p as usize, &format!("tick-{p}"), end);
        let bytes = encode(&tick).unwrap();
        pending.push(
            producer
                .send_result(FutureRecord::to(topic).partition(p).key(&tick.suggestion_id).payload(&bytes))
                .map_err(|(e, _)| e)
                .unwrap(),
        );
    }
    for p in pending {
        p.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

fn reader(kafka: &KafkaArgs) -> BaseConsumer {
    kafka.client_config(&ClientRole::Consumer { group_id: "bench-reader".into() }).unwrap().create().unwrap()
}

/// End offsets of every partition of `topic`, in one request.
fn ends(c: &BaseConsumer, topic: &str) -> HashMap<i32, i64> {
    let ends = flywheel_core::kafka::end_offsets(c, &[topic]).unwrap();
    ends.get(topic).map(|m| m.iter().map(|(p, e)| (*p, *e)).collect()).unwrap_or_default()
}

/// Reads the whole topic; returns records/s and the records.
fn raw_consume(kafka: &KafkaArgs, topic: &str) -> (f64, Vec<(i32, i64, Vec<u8>)>) {
    let c = reader(kafka);
    let mut remaining = ends(&c, topic);
    remaining.retain(|_, high| *high > 0);
    let mut tpl = TopicPartitionList::new();
    for p in remaining.keys() {
        tpl.add_partition_offset(topic, *p, Offset::Beginning).unwrap();
    }
    let started = Instant::now();
    c.assign(&tpl).unwrap();
    let mut records = Vec::new();
    while !remaining.is_empty() {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            if remaining.get(&m.partition()).is_some_and(|high| m.offset() + 1 >= *high) {
                remaining.remove(&m.partition());
            }
            records.push((m.partition(), m.offset(), m.payload().unwrap_or_default().to_vec()));
        }
    }
    (records.len() as f64 / started.elapsed().as_secs_f64(), records)
}

fn join_config() -> JoinConfig {
    JoinConfig { outcome_window_ms: WINDOW_MS, allowed_lateness_ms: 0, ..JoinConfig::default() }
}

/// How many rewards an uninterrupted run emits from these records.
fn expected_rewards(topic: &str, records: &[(i32, i64, Vec<u8>)]) -> u64 {
    let mut joiners: HashMap<i32, PartitionJoiner> = HashMap::new();
    let mut out = Vec::new();
    for (p, o, bytes) in records {
        let j = joiners
            .entry(*p)
            .or_insert_with(|| PartitionJoiner::new(topic, *p, join_config(), RewardFunction::default()));
        j.process(*o, decode(bytes).unwrap(), &mut out);
        out.clear();
    }
    joiners.values().map(|j| j.counters().rewards).sum()
}

async fn rewarder_round(
    kafka: &KafkaArgs,
    dir: &Path,
    topics: &TopicsConfig,
    label: &str,
    checkpoint_every: &str,
    rewards: u64,
) -> f64 {
    let topics_file = dir.join(format!("topics-{label}.toml"));
    std::fs::write(
        &topics_file,
        format!("prefix = \"{}\"\n[topics.interactions]\npartitions = {PARTITIONS}\n", topics.prefix),
    )
    .unwrap();
    let ops = free_local_addr().unwrap();
    let config = flywheel_rewarder::Config::try_parse_from([
        "flywheel-rewarder",
        "--kafka-brokers",
        &kafka.brokers,
        "--topics-config",
        topics_file.to_str().unwrap(),
        "--ops-listen",
        &ops.to_string(),
        "--group-id",
        &format!("bench-rewarder-{label}"),
        "--checkpoint-dir",
        dir.join(format!("checkpoints-{label}")).to_str().unwrap(),
        "--checkpoint-every-records",
        checkpoint_every,
        "--outcome-window-ms",
        &WINDOW_MS.to_string(),
        "--allowed-lateness-ms",
        "0",
        "--log-filter",
        &std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into()),
    ])
    .unwrap();
    if label == "r0c0" && std::env::var_os("BENCH_LOG").is_some() {
        let _ = flywheel_core::runtime::init_tracing(&config.common.service.log);
    }
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(flywheel_rewarder::run(config, shutdown.clone()));
    // Timing starts when the rewarder has its first record (group join and
    // start-up are not throughput).
    loop {
        assert!(!task.is_finished(), "the rewarder stopped before reading: {:?}", task.await);
        if let Ok(Ok(r)) =
            tokio::time::timeout(Duration::from_secs(1), request(ops, "GET", "/readyz", &[], vec![])).await
            && r.status == 200
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let watch = reader(kafka);
    let rewards_topic = topics.name(Topic::Rewards);
    loop {
        let written: i64 = tokio::task::block_in_place(|| ends(&watch, &rewards_topic)).values().sum();
        if written as u64 >= rewards {
            break;
        }
        assert!(!task.is_finished(), "the rewarder stopped after {written} of {rewards} rewards: {:?}", task.await);
        assert!(started.elapsed() < Duration::from_secs(300), "only {written} of {rewards} rewards after 5 minutes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    shutdown.cancel();
    task.await.unwrap().unwrap();
    elapsed
}

/// Checkpoint cadences compared: ten times more often than the default, and the default.
const CADENCES: [(&str, &str); 2] = [("every 5,000 records", "5000"), ("default (50,000 records)", "50000")];

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let binary = tansu_binary();
    let data = workspace_root().join("target").join("bench-rewarder");
    let _ = std::fs::remove_dir_all(&data);
    // Durable storage, as in the tests and the demo.
    let storage = "sqlite://broker.db";
    let broker =
        LocalBroker::start_with_storage(&binary, free_local_addr().unwrap(), &data, storage, Duration::from_secs(60))
            .expect("the benchmark needs the broker: run `make setup`");
    let kafka = KafkaArgs::local(broker.bootstrap());
    let events = bench_stream(SUGGESTIONS);
    let mut raw = Vec::new();
    let mut rewarder = vec![Vec::new(); CADENCES.len()];
    let mut rewards = 0;
    for round in 0..ROUNDS {
        for (c, (_, every)) in CADENCES.iter().enumerate() {
            let label = format!("r{round}c{c}");
            let mut topics = TopicsConfig { prefix: format!("{label}."), ..TopicsConfig::default() };
            topics
                .topics
                .insert("interactions".into(), TopicOverride { partitions: Some(PARTITIONS), ..Default::default() });
            let specs: Vec<_> = [
                Topic::Interactions,
                Topic::Rewards,
                Topic::InteractionsLate,
                Topic::DeadLetters,
                Topic::RewardMetrics,
            ]
            .map(|t| topics.spec(t))
            .into();
            create_topics(&kafka, &specs, Duration::from_secs(30)).await.unwrap();
            let input_topic = topics.name(Topic::Interactions);
            produce(&kafka, &input_topic, &events).await;
            let (rate, records) = tokio::task::block_in_place(|| raw_consume(&kafka, &input_topic));
            raw.push(rate);
            rewards = expected_rewards(&input_topic, &records);
            let secs = rewarder_round(&kafka, &data, &topics, &label, every, rewards).await;
            rewarder[c].push(records.len() as f64 / secs);
            eprintln!("{label}: raw consume {rate:.0}/s, rewarder {:.0}/s", records.len() as f64 / secs);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let raw_m = median(&mut raw);
    println!(
        "rewarder_bench: {} events ({SUGGESTIONS} suggestions, {rewards} rewards) on {PARTITIONS} partitions, {ROUNDS} rounds, tansu storage {storage}",
        events.len() + PARTITIONS as usize
    );
    println!("  raw consume (no decoding)                 {raw_m:>8.0} events/s (median)");
    for ((label, _), rates) in CADENCES.iter().zip(&mut rewarder) {
        let m = median(rates);
        println!("  rewarder, checkpoint {label:<22} {m:>8.0} events/s ({:.1} % of raw)", 100.0 * m / raw_m);
    }
    drop(broker);
}
