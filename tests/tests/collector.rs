//! The collector over real HTTP against the real broker: what is accepted is
//! in the topic unchanged (but pseudonymised), what is not is rejected with a
//! reason, and a broker outage answers 503 and claims nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use flywheel_collector::privacy::Pseudonymizer;
use flywheel_collector::{Config, Running, start};
use flywheel_core::codec::{decode, encode};
use flywheel_core::kafka::{ClientRole, KafkaArgs, create_topics};
use flywheel_core::records::{AdapterRef, Canary, Interaction, InteractionPayload, RegistryEntry};
use flywheel_core::topics::{Topic, TopicsConfig};
use flywheel_devkit::{LocalBroker, free_local_addr, tansu_binary};
use flywheel_tests::{HttpResponse, http, kafka_args, product_form, unique_topic, workspace_binary, workspace_root};
use proptest::prelude::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "acme-token-0123456789";
const OTHER_TOKEN: &str = "other-token-0123456789";
const SECRET: &str = "test-hmac-secret-0123456789";

struct Collector {
    api: SocketAddr,
    ops: SocketAddr,
    topics: TopicsConfig,
    kafka: KafkaArgs,
    shutdown: CancellationToken,
    running: Option<Running>,
    /// Holds the topics file; removed with the collector.
    _dir: tempfile::TempDir,
}

impl Collector {
    async fn start(kafka: KafkaArgs, extra: &[&str]) -> Collector {
        let prefix = format!("{}.", unique_topic("col"));
        let topics = TopicsConfig { prefix: prefix.clone(), ..TopicsConfig::default() };
        let specs = [topics.spec(Topic::Interactions), topics.spec(Topic::ModelRegistry)];
        create_topics(&kafka, &specs, Duration::from_secs(30)).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let topics_file = dir.path().join("topics.toml");
        std::fs::write(&topics_file, format!("prefix = \"{prefix}\"\n")).unwrap();
        let mut args: Vec<String> = vec![
            "flywheel-collector".into(),
            "--kafka-brokers".into(),
            kafka.brokers.clone(),
            "--kafka-session-timeout-ms".into(),
            "6000".into(),
            "--topics-config".into(),
            topics_file.display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--ops-listen".into(),
            "127.0.0.1:0".into(),
            "--token".into(),
            format!("{TOKEN}=acme"),
            "--token".into(),
            format!("{OTHER_TOKEN}=other"),
            "--hmac-secret".into(),
            SECRET.into(),
            "--drain-timeout-secs".into(),
            "5".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let config = Config::try_parse_from(args).unwrap();
        let shutdown = CancellationToken::new();
        let running = start(config, shutdown.clone()).await.unwrap();
        Collector {
            api: running.api_addr,
            ops: running.ops_addr,
            topics,
            kafka,
            shutdown,
            running: Some(running),
            _dir: dir,
        }
    }

    async fn post(&self, token: Option<&str>, body: impl Into<Vec<u8>>) -> HttpResponse {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        http(self.api, "POST", "/v1/events", &headers, body.into()).await
    }

    async fn post_events(&self, events: &[Value]) -> HttpResponse {
        self.post(Some(TOKEN), serde_json::to_vec(events).unwrap()).await
    }

    /// Every interaction in the topic, read from the beginning until `n` arrived.
    fn read(&self, n: usize) -> Vec<Interaction> {
        read_topic(&self.kafka, &self.topics.name(Topic::Interactions), n)
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            running.wait().await.unwrap();
        }
    }
}

impl Drop for Collector {
    // A failed assertion must not leave the collector's blocking registry
    // reader running: the test runtime would wait for it forever.
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn read_topic(kafka: &KafkaArgs, topic: &str, n: usize) -> Vec<Interaction> {
    let mut config = kafka.client_config(&ClientRole::Admin).unwrap();
    config.set("group.id", "collector-test-reader");
    let consumer: BaseConsumer = config.create().unwrap();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..metadata.topics()[0].partitions().len() as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < n && Instant::now() < deadline {
        if let Some(Ok(msg)) = consumer.poll(Duration::from_millis(200)) {
            let record: Interaction = decode(msg.payload().unwrap()).unwrap();
            assert_eq!(msg.key(), Some(record.suggestion_id.as_bytes()), "keyed by suggestion_id");
            out.push(record);
        }
    }
    // Nothing more than expected.
    let grace = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < grace {
        if let Some(Ok(msg)) = consumer.poll(Duration::from_millis(100)) {
            out.push(decode(msg.payload().unwrap()).unwrap());
        }
    }
    out
}

/// The eight fixture interactions in the form a product sends them: raw user
/// id, no received_time, event time shortly before now.
fn product_events(user: &str) -> Vec<Value> {
    let dir = workspace_root().join("schemas/fixtures");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("interaction."))
        .collect();
    files.sort();
    let now = flywheel_core::now_millis();
    files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let fixture: Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
            let id = format!("2a000000-0000-4000-8000-{:012}", rand_suffix() + i as u64);
            product_form(&fixture, user, now - 60_000 + i as i64, &id)
        })
        .collect()
}

fn rand_suffix() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    (nanos % 1_000_000_000) * 1000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_batch_is_in_the_topic_unchanged_but_pseudonymised() {
    let c = Collector::start(kafka_args(), &[]).await;
    let events = product_events("alice@example.com");
    let r = c.post_events(&events).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let body = r.json();
    assert_eq!((body["accepted"].as_u64(), body["rejected"].as_u64()), (Some(8), Some(0)));

    let got = c.read(events.len());
    assert_eq!(got.len(), events.len(), "exactly the accepted events, once each");
    let pseudonym = Pseudonymizer::new(SECRET.as_bytes()).unwrap().pseudonymize("acme", "alice@example.com");
    let sent: BTreeMap<String, &Value> =
        events.iter().map(|e| (e["event_id"].as_str().unwrap().to_string(), e)).collect();
    for record in &got {
        let original = sent[&record.event_id];
        assert_eq!(record.tenant, "acme");
        assert_eq!(record.user_id, pseudonym, "raw user ids never reach Kafka");
        assert!(record.received_time >= record.event_time);
        // Everything the product sent comes back as sent.
        let mut back = serde_json::to_value(record).unwrap();
        let back = back.as_object_mut().unwrap();
        back.remove("received_time");
        back.remove("tenant");
        back.insert("user_id".into(), json!("alice@example.com"));
        assert_eq!(&Value::Object(back.clone()), original);
    }

    // The metrics saw it.
    let metrics = http(c.ops, "GET", "/metrics", &[], vec![]).await;
    let text = String::from_utf8(metrics.body).unwrap();
    assert!(text.contains("collector_events_total{outcome=\"accepted\",reason=\"\"} 8"), "{text}");
    assert!(text.contains("collector_produce_latency_seconds_count 1"), "{text}");
    c.stop().await;
}

/// Regression: the service waited on its drain timeout from start, so the
/// binary stopped serving 30 s after it began. It must serve until shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_collector_serves_past_its_drain_timeout_until_shutdown() {
    let mut c = Collector::start(kafka_args(), &[]).await;
    let waiting = tokio::spawn(c.running.take().unwrap().wait());
    tokio::time::sleep(Duration::from_secs(7)).await; // the drain timeout is 5 s
    assert!(!waiting.is_finished(), "the collector stopped without a shutdown");
    let r = c.post_events(&product_events("late@example.com")).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    c.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("drains after shutdown").unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_right_status_and_a_reason() {
    let c = Collector::start(kafka_args(), &["--max-body-bytes", "20000", "--max-batch-events", "50"]).await;
    let good = product_events("bob");

    // Per-event rejections; the valid events of the batch are still accepted.
    let mut spoofed = good[0].clone();
    spoofed["tenant"] = json!("other");
    let mut future = good[1].clone();
    future["event_time"] = json!(flywheel_core::now_millis() + 48 * 3600 * 1000);
    let mut unknown_kind = good[2].clone();
    unknown_kind["payload"] = json!({"teleported": {"where": "mars"}});
    let batch = vec![spoofed, good[3].clone(), future, unknown_kind, good[3].clone(), json!("not an event")];
    let r = c.post_events(&batch).await;
    assert_eq!(r.status, 200);
    let body = r.json();
    let codes: Vec<Option<&str>> = body["results"].as_array().unwrap().iter().map(|x| x["code"].as_str()).collect();
    assert_eq!(
        codes,
        vec![
            Some("tenant_mismatch"),
            None,
            Some("event_time_out_of_range"),
            Some("invalid_event"),
            Some("duplicate_in_batch"),
            Some("invalid_event")
        ]
    );
    assert_eq!(body["accepted"], 1);
    assert!(body["results"][0]["reason"].as_str().unwrap().contains("'other'"));
    assert!(body["results"][3]["reason"].as_str().unwrap().contains("teleported"));

    // All rejected → 422 with the same shape.
    let r = c.post_events(&[json!({"event_id": "x"})]).await;
    assert_eq!((r.status, r.json()["rejected"].as_u64()), (422, Some(1)));

    // Authentication.
    let r = c.post(None, serde_json::to_vec(&good).unwrap()).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.headers.get("www-authenticate").unwrap(), "Bearer");
    assert_eq!(c.post(Some("wrong-token-0123456789"), "[]").await.status, 401);
    // A token of another tenant cannot write events naming this tenant.
    let mut acme_named = good[4].clone();
    acme_named["tenant"] = json!("acme");
    let r = c.post(Some(OTHER_TOKEN), serde_json::to_vec(&[acme_named]).unwrap()).await;
    assert_eq!((r.status, r.json()["results"][0]["code"].as_str()), (422, Some("tenant_mismatch")));

    // Size limits.
    let big = format!("[{}]", vec!["{}"; 10_000].join(","));
    let r = c.post(Some(TOKEN), big).await;
    assert_eq!((r.status, r.json()["error"].as_str()), (413, Some("body_too_large")));
    let many = serde_json::to_vec(&vec![json!({}); 51]).unwrap();
    let r = c.post(Some(TOKEN), many).await;
    assert_eq!((r.status, r.json()["error"].as_str()), (413, Some("batch_too_large")));

    // Malformed JSON names the position; invalid UTF-8 names the byte.
    let r = c.post(Some(TOKEN), "[\n  {\"event_id\": }\n]").await;
    let body = r.json();
    assert_eq!((r.status, body["error"].as_str(), body["line"].as_u64()), (400, Some("invalid_json"), Some(2)));
    assert!(body["reason"].as_str().unwrap().contains("line 2 column"), "{body}");
    let r = c.post(Some(TOKEN), vec![b'[', b'"', 0xff, b'"', b']']).await;
    assert_eq!(
        (r.status, r.json()["reason"].as_str()),
        (400, Some("the body is not valid UTF-8: invalid byte at offset 2"))
    );
    let r = c.post(Some(TOKEN), "{\"event_id\": 1}").await;
    assert_eq!((r.status, r.json()["error"].as_str()), (400, Some("not_a_batch")));

    // Only the valid event of the mixed batch reached the topic.
    let got = c.read(1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].event_id, good[3]["event_id"].as_str().unwrap());

    let text = String::from_utf8(http(c.ops, "GET", "/metrics", &[], vec![]).await.body).unwrap();
    assert!(text.contains("collector_events_total{outcome=\"rejected\",reason=\"tenant_mismatch\"} 2"), "{text}");
    assert!(text.contains("collector_requests_total{route=\"/v1/events\",status=\"401\"} 2"), "{text}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pii_is_redacted_when_enabled() {
    let c = Collector::start(kafka_args(), &["--redact-pii"]).await;
    let mut events: Vec<Value> =
        product_events("carol").into_iter().filter(|e| e["payload"].get("shown").is_some()).collect();
    events[0]["payload"]["shown"]["prompt"] = json!("# contact jane.doe@example.org or +1 415 555 0100\n");
    assert_eq!(c.post_events(&events).await.status, 200);
    let got = c.read(1);
    match &got[0].payload {
        InteractionPayload::Shown(s) => assert_eq!(s.prompt, "# contact [EMAIL] or [PHONE]\n"),
        other => panic!("expected shown, got {other:?}"),
    }
    let text = String::from_utf8(http(c.ops, "GET", "/metrics", &[], vec![]).await.body).unwrap();
    assert!(text.contains("collector_redactions_total{kind=\"email\"} 1"), "{text}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_follow_the_registry_with_a_stable_canary_split() {
    let c = Collector::start(kafka_args(), &["--base-model", "tiny"]).await;
    // Ready once broker and (empty) registry are seen.
    let deadline = Instant::now() + Duration::from_secs(30);
    while http(c.ops, "GET", "/readyz", &[], vec![]).await.status != 200 {
        assert!(Instant::now() < deadline, "collector never became ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let auth = format!("Bearer {TOKEN}");
    let route = |user: String| {
        let auth = auth.clone();
        async move {
            http(c.api, "GET", &format!("/v1/route?user_id={user}&surface=chat"), &[("authorization", &auth)], vec![])
                .await
        }
    };
    let r = route("u1".into()).await;
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!((body["model_id"].as_str(), body["experiment_arm"].as_str()), (Some("tiny"), Some("base")));
    assert!(body["adapter_version"].is_null());
    assert_eq!(http(c.api, "GET", "/v1/route?user_id=u1", &[], vec![]).await.status, 401);
    assert_eq!(http(c.api, "GET", "/v1/route", &[("authorization", &auth)], vec![]).await.status, 400);

    let adapter = |v: &str| AdapterRef {
        adapter_version: v.into(),
        adapter_uri: format!("file:///a/{v}"),
        adapter_sha256: "ab".into(),
    };
    let entry = RegistryEntry {
        tenant: "acme".into(),
        base_model: "tiny".into(),
        revision: 2,
        live: Some(adapter("live-1")),
        canary: Some(Canary { adapter: adapter("cand-2"), traffic_share: 0.5, started_at: 0 }),
        history: vec![],
        updated_at: 0,
    };
    let producer: FutureProducer = c.kafka.client_config(&ClientRole::Producer).unwrap().create().unwrap();
    producer
        .send(
            FutureRecord::to(&c.topics.name(Topic::ModelRegistry)).key("acme/tiny").payload(&encode(&entry).unwrap()),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while route("u1".into()).await.json()["registry_revision"] != 2 {
        assert!(Instant::now() < deadline, "registry entry never applied");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut canary = 0;
    for i in 0..200 {
        let first = route(format!("user-{i}")).await.json();
        let again = route(format!("user-{i}")).await.json();
        assert_eq!(first, again, "a user's arm is stable");
        match first["experiment_arm"].as_str().unwrap() {
            "canary" => {
                canary += 1;
                assert_eq!(first["adapter_version"], "cand-2");
            }
            "live" => assert_eq!(first["adapter_version"], "live-1"),
            other => panic!("unexpected arm {other}"),
        }
    }
    assert!((60..=140).contains(&canary), "about half in the canary, got {canary}/200");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_answers_503_claims_nothing_and_recovers() {
    // A broker of its own, so stopping it does not disturb other tests.
    let addr = free_local_addr().unwrap();
    let dir = workspace_root().join("target").join("test-broker").join(format!("{}-outage", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let binary = tansu_binary();
    let mut broker = LocalBroker::start(&binary, addr, &dir, Duration::from_secs(60)).expect("dedicated broker");
    let kafka = KafkaArgs::local(broker.bootstrap());
    let c = Collector::start(kafka, &["--produce-timeout-ms", "3000", "--max-in-flight-events", "10"]).await;

    let before = product_events("dave");
    assert_eq!(c.post_events(&before[..4]).await.status, 200);

    broker.stop();
    let during = product_events("dave");
    let slow = {
        let events = during[..8].to_vec();
        let (api, auth) = (c.api, format!("Bearer {TOKEN}"));
        tokio::spawn(async move {
            http(api, "POST", "/v1/events", &[("authorization", &auth)], serde_json::to_vec(&events).unwrap()).await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // While 8 of 10 in-flight slots wait for the dead broker, 4 more do not fit.
    let r = c.post_events(&during[..4]).await;
    assert_eq!((r.status, r.json()["error"].as_str()), (429, Some("overloaded")));
    assert_eq!(r.headers.get("retry-after").unwrap(), "1");
    let r = slow.await.unwrap();
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.headers.get("retry-after").unwrap(), "5");
    assert_eq!(r.json()["accepted"], 0);

    // The broker comes back with its data; the client retries the failed batch unchanged.
    broker = LocalBroker::start(&binary, addr, &dir, Duration::from_secs(60)).expect("broker restart");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = c.post_events(&during[..8]).await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503);
        assert!(Instant::now() < deadline, "collector never recovered: {}", String::from_utf8_lossy(&r.body));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let got = c.read(12);
    let ids: std::collections::BTreeSet<&str> = got.iter().map(|r| r.event_id.as_str()).collect();
    let expected: std::collections::BTreeSet<&str> =
        before[..4].iter().chain(&during[..8]).map(|e| e["event_id"].as_str().unwrap()).collect();
    // Retries may deliver an event twice (downstream deduplicates by
    // event_id) but never lose one or mint a new id.
    assert_eq!(ids, expected);
    c.stop().await;
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

fn arbitrary_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
        prop_oneof![Just("event_id"), Just("payload"), Just("shown"), Just("tenant")].prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("event_id".to_string()),
                    Just("event_time".to_string()),
                    Just("user_id".to_string()),
                    Just("suggestion_id".to_string()),
                    Just("payload".to_string()),
                    Just("accepted".to_string()),
                    "[a-z]{1,6}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn arbitrary_bodies_never_crash_the_handler() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let c = rt.block_on(Collector::start(kafka_args(), &[]));
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 96, ..ProptestConfig::default() });
    let body = prop_oneof![
        arbitrary_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        prop::collection::vec(any::<u8>(), 0..200),
    ];
    runner
        .run(&body, |bytes| {
            let r = rt.block_on(c.post(Some(TOKEN), bytes));
            prop_assert!(matches!(r.status, 200 | 400 | 413 | 422), "status {}", r.status);
            let v: Value = serde_json::from_slice(&r.body).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(v.get("error").is_some() || v.get("results").is_some(), "{v}");
            Ok(())
        })
        .unwrap();
    rt.block_on(c.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_cleanly() {
    let kafka = kafka_args();
    let topics = TopicsConfig { prefix: format!("{}.", unique_topic("term")), ..TopicsConfig::default() };
    create_topics(
        &kafka,
        &[topics.spec(Topic::Interactions), topics.spec(Topic::ModelRegistry)],
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let config_dir = tempfile::tempdir().unwrap();
    let dir = config_dir.path();
    std::fs::write(dir.join("topics.toml"), format!("prefix = \"{}\"\n", topics.prefix)).unwrap();
    let api = free_local_addr().unwrap();
    let mut child = std::process::Command::new(workspace_binary("flywheel-collector"))
        .env_clear()
        .env("FLYWHEEL_KAFKA_BROKERS", &kafka.brokers)
        .env("FLYWHEEL_TOPICS_CONFIG", dir.join("topics.toml"))
        .env("FLYWHEEL_COLLECTOR_LISTEN", api.to_string())
        .env("FLYWHEEL_OPS_LISTEN", "127.0.0.1:0")
        .env("FLYWHEEL_COLLECTOR_TOKENS", format!("{TOKEN}=acme"))
        .env("FLYWHEEL_COLLECTOR_HMAC_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(api).await.is_err() {
        assert!(Instant::now() < deadline, "collector binary did not start listening");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = product_events("erin");
    let auth = format!("Bearer {TOKEN}");
    let in_flight = {
        let events = events.clone();
        let auth = auth.clone();
        tokio::spawn(async move {
            http(api, "POST", "/v1/events", &[("authorization", &auth)], serde_json::to_vec(&events).unwrap()).await
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let killed = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200, "the request in flight at SIGTERM completes: {}", String::from_utf8_lossy(&r.body));
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "clean exit after drain, got {status}");
    // New connections are refused once it has stopped, and nothing was lost.
    assert!(tokio::net::TcpStream::connect(api).await.is_err());
    let got = read_topic(&kafka, &topics.name(Topic::Interactions), events.len());
    assert_eq!(got.len(), events.len());
    std::fs::remove_dir_all(dir).unwrap();
}

/// The issue-17 event: every field within its documented limit, yet about
/// 1 MB once encoded, above what one Kafka record may hold.
fn oversized_shown(base: &Value) -> Value {
    let mut e = base.clone();
    let text = "x".repeat(32_768);
    e["payload"]["shown"]["prompt"] = json!(text);
    e["payload"]["shown"]["completion"] = json!(text);
    let attributes: serde_json::Map<String, Value> = (0..29).map(|i| (format!("attr-{i:02}"), json!(text))).collect();
    e["attributes"] = Value::Object(attributes);
    e
}

/// Bytes the collector's record for `event` has (key + Avro value), computed
/// with its own validation, pseudonymisation and codec.
fn record_size(event: &Value) -> usize {
    use flywheel_collector::validate::{Limits, validate};
    let mut i = validate(&event.to_string(), "acme", flywheel_core::now_millis(), &Limits::default()).unwrap();
    i.user_id = Pseudonymizer::new(SECRET.as_bytes()).unwrap().pseudonymize("acme", &i.user_id);
    i.suggestion_id.len() + encode(&i).unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_too_large_for_a_kafka_record_is_rejected_alone_and_never_answered_503() {
    let c = Collector::start(kafka_args(), &[]).await;
    let events = product_events("frank");
    let shown = events.iter().find(|e| e["payload"].get("shown").is_some()).unwrap().clone();
    let small = events.iter().find(|e| e["payload"].get("accepted").is_some()).unwrap().clone();
    let huge = oversized_shown(&shown);
    let body = serde_json::to_vec(&[&small, &huge]).unwrap();
    assert!(body.len() < 1 << 20, "within the body limit: {} bytes", body.len());
    let max = 1_000_000 - flywheel_collector::RECORD_OVERHEAD_BYTES;
    assert!(record_size(&huge) > max);

    // Rejected on its own; the valid event of the batch is accepted.
    let r = c.post(Some(TOKEN), body).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let results = r.json()["results"].clone();
    assert_eq!(
        (results[0]["status"].as_str(), results[1]["code"].as_str()),
        (Some("accepted"), Some("event_too_large"))
    );
    assert!(results[1]["reason"].as_str().unwrap().contains(&format!("at most {max}")), "{results}");
    // Alone, again and again: a 4xx every time, never a broker outage.
    for _ in 0..3 {
        let r = c.post_events(std::slice::from_ref(&huge)).await;
        assert_eq!((r.status, r.json()["results"][0]["code"].as_str()), (422, Some("event_too_large")));
    }

    // The limit is exactly what the producer and broker take: an event of
    // exactly `max` bytes is delivered, one byte more is refused.
    let mut fitting = shown.clone();
    let attributes: serde_json::Map<String, Value> =
        (0..30).map(|i| (format!("attr-{i:02}"), json!("y".repeat(32_768)))).collect();
    fitting["attributes"] = Value::Object(attributes);
    let base = record_size(&fitting) - shown["payload"]["shown"]["prompt"].as_str().unwrap().len();
    let with_prompt = |n: usize, id: &str| {
        let mut e = fitting.clone();
        e["payload"]["shown"]["prompt"] = json!("p".repeat(n));
        e["event_id"] = json!(id);
        e
    };
    let probe = "2b000000-0000-4000-8000-000000000000";
    let mut n = max - base;
    while record_size(&with_prompt(n, probe)) > max {
        n -= 1;
    }
    assert_eq!(record_size(&with_prompt(n, probe)), max, "an event of exactly the limit");
    let over_id = "2b000000-0000-4000-8000-000000000002";
    let r = c.post_events(&[with_prompt(n + 1, over_id)]).await;
    assert_eq!((r.status, r.json()["results"][0]["code"].as_str()), (422, Some("event_too_large")));
    let exact_id = "2b000000-0000-4000-8000-000000000001";
    let r = c.post_events(&[with_prompt(n, exact_id)]).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    let got = c.read(2);
    let ids: std::collections::BTreeSet<&str> = got.iter().map(|i| i.event_id.as_str()).collect();
    assert_eq!(ids, [small["event_id"].as_str().unwrap(), exact_id].into_iter().collect());
    let text = String::from_utf8(http(c.ops, "GET", "/metrics", &[], vec![]).await.body).unwrap();
    assert!(text.contains("collector_events_total{outcome=\"rejected\",reason=\"event_too_large\"} 5"), "{text}");
    assert!(text.contains("collector_producer_replacements_total 0"), "a per-record error keeps the producer: {text}");
    assert!(!text.contains("status=\"503\""), "{text}");
    c.stop().await;
}

/// Sends `bytes` on a new connection; returns it for more.
async fn open(addr: SocketAddr, bytes: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    s
}

/// Reads until the server closes the connection (at most 20 s); returns what it sent.
async fn until_closed(mut s: tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
    read.expect("the collector closes the connection").ok();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_closed_within_the_limits_while_others_are_served() {
    let (headers_limit, body_limit) = (Duration::from_millis(1500), Duration::from_millis(2500));
    let c = Collector::start(
        kafka_args(),
        &["--header-read-timeout-ms", "1500", "--body-read-timeout-ms", "2500", "--max-connections", "32"],
    )
    .await;
    let started = Instant::now();
    // No token is needed to hold a connection by never finishing the headers.
    let mut header_stalls = Vec::new();
    for _ in 0..3 {
        header_stalls.push(open(c.api, b"").await);
        header_stalls.push(open(c.api, b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Le").await);
    }
    let mut body_stalls = Vec::new();
    for _ in 0..3 {
        let head = format!(
            "POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n[{{\"event_id\": \"2c000000-0000-4000-8000-"
        );
        body_stalls.push(open(c.api, head.as_bytes()).await);
    }
    // Each slow connection is watched from now on, so the time it was closed is known.
    let watch = |limit: Duration, s: tokio::net::TcpStream| {
        (limit, tokio::spawn(async move { (until_closed(s).await, Instant::now()) }))
    };
    let closing: Vec<_> = header_stalls
        .into_iter()
        .map(|s| watch(headers_limit, s))
        .chain(body_stalls.into_iter().map(|s| watch(body_limit, s)))
        .collect();

    // Normal clients are served meanwhile.
    let mut sent = Vec::new();
    for i in 0..4 {
        let events = product_events(&format!("grace-{i}"));
        let r = c.post_events(&events).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        sent.extend(events);
    }
    let auth = format!("Bearer {TOKEN}");
    assert_eq!(http(c.api, "GET", "/v1/route?user_id=u1", &[("authorization", &auth)], vec![]).await.status, 200);

    // The slow ones are closed once their limit passed, not before.
    let slack = Duration::from_secs(5);
    for (limit, task) in closing {
        let (answer, closed_at) = task.await.unwrap();
        let held = closed_at - started;
        assert!(held >= limit && held <= limit + slack, "held {held:?} with a limit of {limit:?}");
        if limit == body_limit {
            assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
            assert!(answer.contains("body_timeout"), "{answer}");
        } else {
            assert!(answer.is_empty(), "{answer}");
        }
    }
    let text = String::from_utf8(http(c.ops, "GET", "/metrics", &[], vec![]).await.body).unwrap();
    assert!(text.contains("collector_client_timeouts_total{phase=\"headers\"} 6"), "{text}");
    assert!(text.contains("collector_client_timeouts_total{phase=\"body\"} 3"), "{text}");
    // Nothing of the stalled bodies was claimed or produced.
    assert_eq!(c.read(sent.len()).len(), sent.len());
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_connection_cap_clients_wait_for_a_free_slot() {
    let c = Collector::start(kafka_args(), &["--header-read-timeout-ms", "1000", "--max-connections", "3"]).await;
    let started = Instant::now();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(open(c.api, b"GET /v1/route HTTP/1.1\r\n").await);
    }
    // Queued in the backlog while the three slots are held, then served.
    let r = tokio::time::timeout(Duration::from_secs(20), c.post_events(&product_events("heidi")))
        .await
        .expect("served once a slot is free");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(started.elapsed() >= Duration::from_millis(1000), "served before a slot was free: {:?}", started.elapsed());
    for s in held {
        assert_eq!(until_closed(s).await, "");
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_bodies_unknown_payload_fields_character_counts_and_exact_doubles() {
    use tokio::io::AsyncWriteExt;
    let c = Collector::start(kafka_args(), &[]).await;
    let head = |extra: &str| {
        format!(
            "POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n{extra}\r\n"
        )
    };
    // Bad chunked encoding: 400, not 413.
    let answer = until_closed(
        open(c.api, format!("{}zz\r\n[]\r\n0\r\n\r\n", head("Transfer-Encoding: chunked\r\n")).as_bytes()).await,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"invalid_body\""), "{answer}");
    // A body cut short (the client stops sending): 400, not 413.
    let mut s = open(c.api, format!("{}[{{\"event_id\":", head("Content-Length: 500\r\n")).as_bytes()).await;
    s.shutdown().await.unwrap();
    let answer = until_closed(s).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"invalid_body\""), "{answer}");

    // `/v1/route` counts user_id in characters, as `/v1/events` does.
    let auth = format!("Bearer {TOKEN}");
    let cjk = |n: usize| "%E6%BC%A2".repeat(n);
    let route = |n: usize| {
        let auth = auth.clone();
        async move {
            http(c.api, "GET", &format!("/v1/route?user_id={}", cjk(n)), &[("authorization", &auth)], vec![]).await
        }
    };
    assert_eq!(route(256).await.status, 200, "256 three-byte characters are within the limit");
    let r = route(257).await;
    assert_eq!((r.status, r.json()["reason"].as_str()), (400, Some("user_id must be 1 to 256 characters")));
    let mut event =
        product_events("漢".repeat(256).as_str()).into_iter().find(|e| e["payload"].get("shown").is_some()).unwrap();

    // An unknown field inside the payload is refused like one at the top level.
    let mut typo = event.clone();
    typo["payload"]["shown"]["behaviour_logprob"] = json!(-1.5);
    let mut top = event.clone();
    top["sesion_id"] = json!("s");
    let r = c.post_events(&[typo, top]).await;
    assert_eq!(r.status, 422);
    let results = r.json()["results"].clone();
    assert_eq!(
        (results[0]["code"].as_str(), results[1]["code"].as_str()),
        (Some("invalid_event"), Some("invalid_event"))
    );
    assert!(results[0]["reason"].as_str().unwrap().contains("unknown field `behaviour_logprob`"), "{results}");
    assert!(results[1]["reason"].as_str().unwrap().contains("unknown field `sesion_id`"), "{results}");

    // Doubles arrive in the topic bit for bit (serde_json's float_roundtrip).
    let text = "-1.1031496661141227";
    event["payload"]["shown"]["behavior_logprob"] = json!(0.0);
    let body = serde_json::to_string(&[&event])
        .unwrap()
        .replace("\"behavior_logprob\":0.0", &format!("\"behavior_logprob\":{text}"));
    assert!(body.contains(text));
    let r = c.post(Some(TOKEN), body).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let got = c.read(1);
    match &got[0].payload {
        InteractionPayload::Shown(s) => {
            assert_eq!(s.behavior_logprob.map(f64::to_bits), Some(text.parse::<f64>().unwrap().to_bits()))
        }
        other => panic!("expected shown, got {other:?}"),
    }
    c.stop().await;
}
