//! The CLI's produce/tail path against the real broker: every fixture goes
//! in as Avro and comes back as the same JSON; a record that is not Avro is
//! reported with its reason, not skipped.

use std::time::Duration;

use flywheel_cli::{TailArgs, produce_file, read_json_records, tail};
use flywheel_core::RecordKind;
use flywheel_core::kafka::{ClientRole, create_topics};
use flywheel_core::topics::{Topic, TopicsConfig};
use flywheel_tests::{fixtures_of, kafka_args, unique_topic, workspace_root};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixtures_round_trip_through_the_broker_and_garbage_is_reported() {
    let kafka = kafka_args();
    let topics = TopicsConfig { prefix: format!("{}.", unique_topic("cli")), ..TopicsConfig::default() };
    create_topics(&kafka, &[topics.spec(Topic::Interactions)], Duration::from_secs(30)).await.unwrap();

    let fixtures = fixtures_of(&workspace_root().join("schemas/fixtures"), RecordKind::Interaction).unwrap();
    assert_eq!(fixtures.len(), 8);
    let mut expected = Vec::new();
    for file in &fixtures {
        assert_eq!(produce_file(&kafka, &topics, "interactions", file).await.unwrap(), 1);
        expected.extend(read_json_records(file).unwrap());
    }
    let producer: FutureProducer = kafka.client_config(&ClientRole::Producer).unwrap().create().unwrap();
    producer
        .send(
            FutureRecord::to(&topics.name(Topic::Interactions)).key("k").payload("{\"not\":\"avro\"}"),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();

    let args = TailArgs { topic: "interactions".into(), max: Some(expected.len() + 1), idle_secs: 20 };
    let mut out = Vec::new();
    let kafka2 = kafka.clone();
    let (n, out) = tokio::task::spawn_blocking(move || {
        let n = tail(&kafka2, &topics, &args, &CancellationToken::new(), &mut out).unwrap();
        (n, out)
    })
    .await
    .unwrap();
    assert_eq!(n, expected.len() + 1);
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut got: Vec<serde_json::Value> = lines.iter().filter_map(|l| l.get("record").cloned()).collect();
    let key = |v: &serde_json::Value| v["event_id"].as_str().unwrap_or_default().to_string();
    got.sort_by_key(key);
    expected.sort_by_key(key);
    assert_eq!(got, expected, "every fixture comes back unchanged");
    let errors: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("error").is_some()).collect();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["reason_code"], "bad_magic");
    assert!(lines.iter().filter(|l| l.get("record").is_some()).all(|l| l["key"] == l["record"]["suggestion_id"]));
}
