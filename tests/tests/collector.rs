//! The collector over real HTTP against the real broker: what is accepted is
//! in the topic unchanged (but pseudonymised), what is not is rejected with a
//! reason, and a broker outage answers 503 and claims nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use flywheel_cli::broker::{LocalBroker, default_binary, free_local_addr};
use flywheel_cli::product_form;
use flywheel_collector::privacy::Pseudonymizer;
use flywheel_collector::{Config, Running, start};
use flywheel_core::codec::{decode, encode};
use flywheel_core::kafka::{ClientRole, KafkaArgs, create_topics};
use flywheel_core::records::{AdapterRef, Canary, Interaction, InteractionPayload, RegistryEntry};
use flywheel_core::topics::{Topic, TopicsConfig};
use flywheel_tests::{HttpResponse, http, kafka_args, unique_topic, workspace_binary, workspace_root};
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
    _dir: PathBuf,
}

impl Collector {
    async fn start(kafka: KafkaArgs, extra: &[&str]) -> Collector {
        let prefix = format!("{}.", unique_topic("col"));
        let topics = TopicsConfig { prefix: prefix.clone(), ..TopicsConfig::default() };
        let specs = [topics.spec(Topic::Interactions), topics.spec(Topic::ModelRegistry)];
        create_topics(&kafka, &specs, Duration::from_secs(30)).await.unwrap();
        let dir = std::env::temp_dir().join(unique_topic("collector-cfg"));
        std::fs::create_dir_all(&dir).unwrap();
        let topics_file = dir.join("topics.toml");
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
    let binary =
        std::env::var_os("FLYWHEEL_TANSU_BIN").map(PathBuf::from).unwrap_or_else(|| default_binary(&workspace_root()));
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
    let dir = std::env::temp_dir().join(unique_topic("term-cfg"));
    std::fs::create_dir_all(&dir).unwrap();
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
