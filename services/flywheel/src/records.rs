//! `flywheel produce` and `flywheel tail`: records as JSON in, Avro on the
//! topic, JSON lines out.

use std::path::Path;
use std::time::Duration;

use flywheel_core::Codec;
use flywheel_core::kafka::{ClientRole, KafkaArgs};
use flywheel_core::topics::{Topic, TopicsConfig};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::cli::{ProduceArgs, TailArgs};
use crate::{CliError, Result};

/// `flywheel produce`.
pub(crate) async fn produce(kafka: &KafkaArgs, topics: &TopicsConfig, args: &ProduceArgs) -> Result<()> {
    let n = produce_file(kafka, topics, &args.topic, &args.file).await?;
    println!("produced {n} records to {}", args.topic);
    Ok(())
}

/// `flywheel tail`.
pub(crate) fn tail_to_stdout(
    kafka: &KafkaArgs,
    topics: &TopicsConfig,
    args: &TailArgs,
    shutdown: &CancellationToken,
) -> Result<()> {
    let stdout = std::io::stdout();
    tail(kafka, topics, args, shutdown, &mut stdout.lock()).map(|_| ())
}

fn resolve_topic(topics: &TopicsConfig, name: &str) -> Result<Topic> {
    Topic::from_default_name(name).ok_or_else(|| {
        let known: Vec<_> = Topic::ALL.iter().map(|t| t.default_name()).collect();
        CliError::Usage(format!(
            "unknown topic '{name}'; known topics: {} (prefix '{}' is added automatically)",
            known.join(", "),
            topics.prefix
        ))
    })
}

/// Reads records from a JSON file: an array, a single object, or JSON lines.
pub fn read_json_records(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| flywheel_core::Error::io(format!("reading {}", path.display()), e))?;
    let bad = |e: serde_json::Error| CliError::Usage(format!("{}: invalid JSON: {e}", path.display()));
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Array(items)) => Ok(items),
        Ok(v) => Ok(vec![v]),
        Err(_) => text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).map_err(bad)).collect(),
    }
}

/// Produces the records of a JSON file onto a logical topic; returns how many
/// the broker acknowledged.
pub async fn produce_file(kafka: &KafkaArgs, topics: &TopicsConfig, topic: &str, file: &Path) -> Result<usize> {
    let topic = resolve_topic(topics, topic)?;
    let name = topics.name(topic);
    let codec = Codec::global();
    let mut encoded = Vec::new();
    for (i, json) in read_json_records(file)?.iter().enumerate() {
        let bytes = codec
            .encode_json(topic.record_kind(), json)
            .map_err(|e| CliError::Usage(format!("{} record {}: {e}", file.display(), i + 1)))?;
        encoded.push((topic.key_of_json(json), bytes));
    }
    let producer: FutureProducer = kafka
        .client_config(&ClientRole::Producer)?
        .create()
        .map_err(|e| flywheel_core::Error::kafka("creating producer", e))?;
    for (key, bytes) in &encoded {
        let mut record = FutureRecord::to(&name).payload(bytes);
        if let Some(k) = key {
            record = record.key(k);
        }
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| flywheel_core::Error::kafka(format!("producing to {name}"), e))?;
    }
    Ok(encoded.len())
}

/// Prints a topic's records as JSON lines from the beginning, without joining
/// a consumer group. Returns the number printed.
pub fn tail(
    kafka: &KafkaArgs,
    topics: &TopicsConfig,
    args: &TailArgs,
    shutdown: &CancellationToken,
    out: &mut impl std::io::Write,
) -> Result<usize> {
    let topic = resolve_topic(topics, &args.topic)?;
    let name = topics.name(topic);
    // Assigned, never subscribed: the group id is only a required name.
    let config = kafka.client_config(&ClientRole::Consumer { group_id: "flywheel-tail".into() })?;
    let consumer: BaseConsumer = config.create().map_err(|e| flywheel_core::Error::kafka("creating consumer", e))?;
    let metadata = consumer
        .fetch_metadata(Some(&name), Duration::from_secs(10))
        .map_err(|e| flywheel_core::Error::kafka(format!("fetching metadata of {name}"), e))?;
    let partitions = metadata.topics().first().map(|t| t.partitions().len()).unwrap_or(0);
    if partitions == 0 {
        return Err(CliError::Usage(format!("topic {name} does not exist; run `flywheel topics create`")));
    }
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(&name, p as i32, Offset::Beginning)
            .map_err(|e| flywheel_core::Error::kafka("building assignment", e))?;
    }
    consumer.assign(&assignment).map_err(|e| flywheel_core::Error::kafka("assigning partitions", e))?;
    let codec = Codec::global();
    let idle = Duration::from_secs(args.idle_secs);
    let mut last = std::time::Instant::now();
    let mut printed = 0usize;
    while !shutdown.is_cancelled() && last.elapsed() < idle && args.max.is_none_or(|m| printed < m) {
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else { continue };
        let msg = msg.map_err(|e| flywheel_core::Error::kafka(format!("reading {name}"), e))?;
        last = std::time::Instant::now();
        let key = msg.key().map(|k| String::from_utf8_lossy(k).into_owned());
        let line = match msg.payload().map(|p| codec.decode_to_json(p)) {
            Some(Ok((kind, record))) => serde_json::json!({
                "partition": msg.partition(), "offset": msg.offset(), "key": key, "kind": kind.to_string(), "record": record,
            }),
            Some(Err(e)) => serde_json::json!({
                "partition": msg.partition(), "offset": msg.offset(), "key": key, "error": e.to_string(), "reason_code": e.reason_code(),
            }),
            None => {
                serde_json::json!({"partition": msg.partition(), "offset": msg.offset(), "key": key, "record": null})
            }
        };
        writeln!(out, "{line}").map_err(|e| flywheel_core::Error::io("writing output", e))?;
        printed += 1;
    }
    Ok(printed)
}
