//! Collector throughput against the raw producer rate, side by side in one run.
//!
//! Starts the embedded broker (tansu, SQLite storage) and an in-process
//! collector, then alternates: (a) a raw idempotent producer sending
//! pre-encoded interaction records, (b) concurrent HTTP clients posting
//! batches of 100 events to `POST /v1/events` over loopback. Prints medians.
//! Run with `make bench` (needs `make setup`).

#![allow(clippy::print_stdout)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use flywheel_collector::{Config, start};
use flywheel_core::codec::encode;
use flywheel_core::kafka::{ClientRole, KafkaArgs, create_topics};
use flywheel_core::records::{Interaction, InteractionPayload, SuggestionShown};
use flywheel_core::topics::{Topic, TopicsConfig};
use flywheel_devkit::{LocalBroker, free_local_addr, tansu_binary, workspace_root};
use http_body_util::BodyExt;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const EVENTS_PER_ROUND: usize = 20_000;
const BATCH: usize = 100;
const CLIENTS: usize = 32;
const ROUNDS: usize = 3;
const TOKEN: &str = "bench-token-0123456789";

fn event_json(i: usize, now: i64) -> serde_json::Value {
    json!({
        "event_id": format!("3b000000-0000-4000-8000-{i:012}"),
        "event_time": now - 1000,
        "user_id": format!("user-{}", i % 997),
        "suggestion_id": format!("sugg-{i}"),
        "payload": {"shown": {
            "model_id": "flywheel/tiny-llama", "adapter_version": null, "experiment_arm": "live",
            "surface": "editor-inline", "prompt": "def fibonacci(n):\n    ",
            "completion": "if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
            "behavior_logprob": -7.25, "latency_ms": 180
        }},
        "attributes": {"client": "vscode/1.96"}
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn raw_round(producer: &FutureProducer, topic: &str, round: usize) -> f64 {
    let now = flywheel_core::now_millis();
    let records: Vec<(String, Vec<u8>)> = (0..EVENTS_PER_ROUND)
        .map(|i| {
            let r = Interaction {
                event_id: format!("4c000000-0000-4000-8000-{:012}", round * EVENTS_PER_ROUND + i),
                event_time: now,
                received_time: now,
                tenant: "bench".into(),
                user_id: format!("{:064x}", i % 997),
                session_id: None,
                suggestion_id: format!("sugg-{i}"),
                payload: InteractionPayload::Shown(SuggestionShown {
                    model_id: "flywheel/tiny-llama".into(),
                    adapter_version: None,
                    experiment_arm: Some("live".into()),
                    surface: "editor-inline".into(),
                    prompt: "def fibonacci(n):\n    ".into(),
                    completion: "if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)".into(),
                    behavior_logprob: Some(-7.25),
                    latency_ms: 180,
                }),
                attributes: [("client".to_string(), "vscode/1.96".to_string())].into(),
            };
            (r.suggestion_id.clone(), encode(&r).unwrap())
        })
        .collect();
    let started = Instant::now();
    let mut pending = Vec::with_capacity(records.len());
    for (key, bytes) in &records {
        pending
            .push(producer.send_result(FutureRecord::to(topic).key(key).payload(bytes)).map_err(|(e, _)| e).unwrap());
    }
    for p in pending {
        p.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
    EVENTS_PER_ROUND as f64 / started.elapsed().as_secs_f64()
}

async fn collector_round(api: SocketAddr, round: usize) -> (f64, Vec<f64>) {
    let now = flywheel_core::now_millis();
    let per_client = EVENTS_PER_ROUND / CLIENTS;
    let started = Instant::now();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let bodies: Vec<Vec<u8>> = (0..per_client / BATCH)
            .map(|b| {
                let base = 1_000_000 * (round + 1) + c * per_client + b * BATCH;
                let batch: Vec<_> = (0..BATCH).map(|i| event_json(base + i, now)).collect();
                serde_json::to_vec(&batch).unwrap()
            })
            .collect();
        clients.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(api).await.unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
            tokio::spawn(conn);
            let mut latencies = Vec::new();
            for body in bodies {
                let req = hyper::Request::post("/v1/events")
                    .header("host", api.to_string())
                    .header("authorization", format!("Bearer {TOKEN}"))
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
                    .unwrap();
                let t = Instant::now();
                let resp = sender.send_request(req).await.unwrap();
                let status = resp.status();
                let bytes = resp.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for c in clients {
        latencies.extend(c.await.unwrap());
    }
    let rate = (per_client / BATCH * BATCH * CLIENTS) as f64 / started.elapsed().as_secs_f64();
    (rate, latencies)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    for storage in ["sqlite://broker.db", "memory://tansu/"] {
        bench_with(storage).await;
    }
}

async fn bench_with(storage: &str) {
    let binary = tansu_binary();
    let data = workspace_root().join("target").join("bench-broker");
    let _ = std::fs::remove_dir_all(&data);
    let broker =
        LocalBroker::start_with_storage(&binary, free_local_addr().unwrap(), &data, storage, Duration::from_secs(60))
            .expect("the benchmark needs the broker: run `make setup`");
    let kafka = KafkaArgs::local(broker.bootstrap());
    let raw_topics = TopicsConfig { prefix: "raw.".into(), ..TopicsConfig::default() };
    let col_topics = TopicsConfig { prefix: "col.".into(), ..TopicsConfig::default() };
    for t in [&raw_topics, &col_topics] {
        create_topics(&kafka, &[t.spec(Topic::Interactions), t.spec(Topic::ModelRegistry)], Duration::from_secs(30))
            .await
            .unwrap();
    }
    let topics_file = data.join("collector-topics.toml");
    std::fs::write(&topics_file, "prefix = \"col.\"\n").unwrap();
    let config = Config::try_parse_from([
        "flywheel-collector",
        "--kafka-brokers",
        &broker.bootstrap(),
        "--topics-config",
        topics_file.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--ops-listen",
        "127.0.0.1:0",
        "--token",
        &format!("{TOKEN}=bench"),
        "--hmac-secret",
        "bench-secret-0123456789",
        "--log-filter",
        "warn",
    ])
    .unwrap();
    let shutdown = CancellationToken::new();
    let running = start(config, shutdown.clone()).await.unwrap();

    // A warm producer (connected, producer id assigned), as the collector's is.
    let producer: FutureProducer = kafka.client_config(&ClientRole::Producer).unwrap().create().unwrap();
    let raw_topic = raw_topics.name(Topic::Interactions);
    producer.send(FutureRecord::to(&raw_topic).key("warm-up").payload("x"), Duration::from_secs(10)).await.unwrap();
    let (mut raw, mut col, mut lat) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        raw.push(raw_round(&producer, &raw_topic, round).await);
        let (rate, latencies) = collector_round(running.api_addr, round).await;
        col.push(rate);
        lat.extend(latencies);
    }
    lat.sort_by(f64::total_cmp);
    let (raw_m, col_m) = (median(raw), median(col));
    println!(
        "collector_bench: {EVENTS_PER_ROUND} events/round, {ROUNDS} rounds alternating, {CLIENTS} clients x batches of {BATCH}, tansu storage {storage}"
    );
    println!("  raw idempotent producer   {raw_m:>10.0} events/s (median)");
    println!("  collector POST /v1/events {col_m:>10.0} events/s (median)");
    println!("  collector / raw           {:>10.1} %", 100.0 * col_m / raw_m);
    println!(
        "  request latency (batch of {BATCH}) p50 {:.1} ms, p99 {:.1} ms over {} requests",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.len()
    );
    shutdown.cancel();
    running.wait().await.unwrap();
    drop(broker);
}
