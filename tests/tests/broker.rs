//! Against the real broker: idempotent produce and group consume lose and
//! duplicate nothing, a two-member group splits partitions, and the topic map
//! is created idempotently.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use flywheel_core::codec::{decode, encode};
use flywheel_core::kafka::{ClientRole, create_topics};
use flywheel_core::records::{Interaction, InteractionPayload, SuggestionAccepted};
use flywheel_core::topics::{CleanupPolicy, Topic, TopicsConfig};
use flywheel_tests::{broker, create_unique_topic, kafka_args, unique_topic};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

fn interaction(i: usize) -> Interaction {
    Interaction {
        event_id: format!("00000000-0000-4000-8000-{i:012}"),
        event_time: 1_795_424_400_000 + i as i64,
        received_time: 1_795_424_400_050 + i as i64,
        tenant: "acme".into(),
        user_id: format!("user-{}", i % 17),
        session_id: None,
        suggestion_id: format!("sugg-{}", i % 101),
        payload: InteractionPayload::Accepted(SuggestionAccepted { time_to_accept_ms: i as i64 }),
        attributes: BTreeMap::new(),
    }
}

/// Produces `n` interactions with the idempotent producer; returns the
/// partition each event id landed in, as acknowledged by the broker.
async fn produce(topic: &str, n: usize) -> HashMap<String, i32> {
    let producer: FutureProducer = kafka_args().client_config(&ClientRole::Producer).unwrap().create().unwrap();
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        let record = interaction(i);
        let bytes = encode(&record).unwrap();
        let key = record.suggestion_id.clone();
        let producer = producer.clone();
        let topic = topic.to_string();
        pending.push(tokio::spawn(async move {
            let delivery = producer
                .send(FutureRecord::to(&topic).key(&key).payload(&bytes), Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)
                .expect("broker acknowledges");
            (record.event_id, delivery.partition)
        }));
    }
    let mut acked = HashMap::new();
    for p in pending {
        let (id, partition) = p.await.unwrap();
        acked.insert(id, partition);
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    acked
}

/// A group consumer in the at-least-once pattern: offsets stored after
/// each record is handled, committed by librdkafka's auto-commit.
fn consumer(group: &str, topic: &str) -> BaseConsumer {
    let mut config = kafka_args().client_config(&ClientRole::Consumer { group_id: group.into() }).unwrap();
    let c: BaseConsumer = config.set("enable.auto.commit", "true").create().unwrap();
    c.subscribe(&[topic]).unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_produce_then_group_consume_yields_exactly_n() {
    let topic = create_unique_topic("exactly-n", 3).await;
    const N: usize = 2_000;
    let acked = produce(&topic, N).await;
    assert_eq!(acked.len(), N, "every event id acknowledged once");
    assert!(acked.values().collect::<BTreeSet<_>>().len() > 1, "keys spread over partitions");

    let topic2 = topic.clone();
    let seen = tokio::task::spawn_blocking(move || {
        let c = consumer(&unique_topic("g"), &topic2);
        let mut seen: Vec<(String, i32)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(90);
        while seen.len() < N && Instant::now() < deadline {
            if let Some(msg) = c.poll(Duration::from_millis(200)) {
                let msg = msg.expect("consume");
                let record: Interaction = decode(msg.payload().expect("payload")).expect("decodes");
                assert_eq!(msg.key(), Some(record.suggestion_id.as_bytes()));
                seen.push((record.event_id, msg.partition()));
                c.store_offset_from_message(&msg).unwrap();
            }
        }
        // Nothing beyond N arrives.
        let grace = Instant::now() + Duration::from_secs(2);
        while Instant::now() < grace {
            if let Some(Ok(msg)) = c.poll(Duration::from_millis(200)) {
                let record: Interaction = decode(msg.payload().unwrap()).unwrap();
                seen.push((record.event_id, msg.partition()));
            }
        }
        c.commit_consumer_state(rdkafka::consumer::CommitMode::Sync).unwrap();
        seen
    })
    .await
    .unwrap();

    assert_eq!(seen.len(), N, "consumed exactly N records");
    let unique: BTreeSet<&String> = seen.iter().map(|(id, _)| id).collect();
    assert_eq!(unique.len(), N, "no duplicates");
    for (id, partition) in &seen {
        assert_eq!(acked.get(id), Some(partition), "{id} read from the partition it was acknowledged in");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_member_group_splits_partitions_without_overlap() {
    const PARTITIONS: i32 = 4;
    const N: usize = 400;
    let topic = create_unique_topic("split", PARTITIONS).await;
    let acked = produce(&topic, N).await;
    let used: BTreeSet<i32> = acked.values().copied().collect();
    assert_eq!(used.len(), PARTITIONS as usize, "test data covers every partition");

    let topic2 = topic.clone();
    let (assignments, per_member) = tokio::task::spawn_blocking(move || {
        let group = unique_topic("split-group");
        let members = [consumer(&group, &topic2), consumer(&group, &topic2)];
        let mut per_member: [Vec<(String, i32)>; 2] = [Vec::new(), Vec::new()];
        let deadline = Instant::now() + Duration::from_secs(120);
        let stable = |m: &[BaseConsumer; 2]| {
            let a: Vec<usize> = m.iter().map(|c| c.assignment().map(|a| a.count()).unwrap_or(0)).collect();
            a.iter().all(|&n| n > 0) && a.iter().sum::<usize>() == PARTITIONS as usize
        };
        let mut unique = BTreeSet::new();
        while Instant::now() < deadline && (unique.len() < N || !stable(&members)) {
            for (i, c) in members.iter().enumerate() {
                if let Some(Ok(msg)) = c.poll(Duration::from_millis(50)) {
                    let record: Interaction = decode(msg.payload().unwrap()).unwrap();
                    unique.insert(record.event_id.clone());
                    per_member[i].push((record.event_id, msg.partition()));
                    c.store_offset_from_message(&msg).unwrap();
                }
            }
        }
        let assignments: Vec<BTreeSet<i32>> = members
            .iter()
            .map(|c| c.assignment().unwrap().elements().iter().map(|e| e.partition()).collect())
            .collect();
        (assignments, per_member)
    })
    .await
    .unwrap();

    assert!(assignments.iter().all(|a| !a.is_empty()), "both members own partitions: {assignments:?}");
    assert!(assignments[0].is_disjoint(&assignments[1]), "no partition owned twice: {assignments:?}");
    let union: BTreeSet<i32> = assignments[0].union(&assignments[1]).copied().collect();
    assert_eq!(union, (0..PARTITIONS).collect(), "every partition owned");
    let all: Vec<&String> = per_member.iter().flatten().map(|(id, _)| id).collect();
    let unique: BTreeSet<&String> = all.iter().copied().collect();
    assert_eq!(unique.len(), N, "every record consumed");
    // A record may be read twice only across a rebalance (at-least-once,
    // offsets not yet stored): the exactly-once contract deduplicates
    // downstream. What must hold: after the group settled, each member reads
    // only its own partitions.
    for (i, member) in per_member.iter().enumerate() {
        let tail: Vec<i32> = member.iter().rev().take(20).map(|(_, p)| *p).collect();
        assert!(
            tail.iter().all(|p| assignments[i].contains(p)),
            "member {i} read {tail:?} outside {:?}",
            assignments[i]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_map_creation_is_idempotent_and_honours_the_config() {
    broker();
    let prefix = format!("{}.", unique_topic("map"));
    let config: TopicsConfig = toml_config(&format!("prefix = \"{prefix}\"\n[topics.interactions]\npartitions = 5\n"));
    let specs = config.specs();
    let created = create_topics(&kafka_args(), &specs, Duration::from_secs(30)).await.unwrap();
    assert_eq!(created.len(), Topic::ALL.len(), "all topics created: {created:?}");
    let again = create_topics(&kafka_args(), &specs, Duration::from_secs(30)).await.unwrap();
    assert!(again.is_empty(), "second run creates nothing: {again:?}");

    let client: BaseConsumer = kafka_args().client_config(&ClientRole::Admin).unwrap().create().unwrap();
    let metadata = client.fetch_metadata(None, Duration::from_secs(10)).unwrap();
    for spec in &specs {
        let t =
            metadata.topics().iter().find(|t| t.name() == spec.name).unwrap_or_else(|| panic!("{} missing", spec.name));
        assert_eq!(t.partitions().len() as i32, spec.partitions, "{}", spec.name);
    }
    assert_eq!(config.spec(Topic::Interactions).partitions, 5);
    assert_eq!(config.spec(Topic::ModelRegistry).cleanup_policy, CleanupPolicy::Compact);
}

fn toml_config(text: &str) -> TopicsConfig {
    let dir = std::env::temp_dir().join(unique_topic("cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("topics.toml");
    std::fs::write(&path, text).unwrap();
    let config = TopicsConfig::load(&path).unwrap();
    std::fs::remove_dir_all(dir).unwrap();
    config
}
