//! Kafka client configuration shared by every service.
//!
//! Any librdkafka property passes through: from a Java-style properties file
//! (`--kafka-config-file`, what a secured cluster's admins usually hand out:
//! `security.protocol`, `sasl.mechanism`, `sasl.username`, ...) and from
//! repeated `-X key=value` flags, which win. Flywheel's own defaults per client
//! role come first and are overridable, except where correctness depends on
//! them (see [`ClientRole`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::error::{Error, Result};
use crate::topics::TopicSpec;

/// Kafka connection flags; flatten into every service's config.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Bootstrap servers (host:port, comma-separated).
    #[arg(long = "kafka-brokers", env = "FLYWHEEL_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Properties file of librdkafka settings (key=value lines, # comments),
    /// e.g. the security settings of a production cluster.
    #[arg(long = "kafka-config-file", env = "FLYWHEEL_KAFKA_CONFIG_FILE")]
    pub config_file: Option<PathBuf>,
    /// Extra librdkafka settings as key=value; repeatable, or comma-separated in the env var.
    /// Applied last.
    #[arg(short = 'X', long = "kafka-option", env = "FLYWHEEL_KAFKA_OPTIONS", value_delimiter = ',', value_parser = parse_key_value)]
    pub options: Vec<(String, String)>,
    /// Consumer group session timeout in milliseconds (tests use 6000 so joins are fast).
    #[arg(long = "kafka-session-timeout-ms", env = "FLYWHEEL_KAFKA_SESSION_TIMEOUT_MS", default_value_t = 30_000)]
    pub session_timeout_ms: u32,
}

impl KafkaArgs {
    /// Arguments pointing at `brokers` with no extra settings (tests, local tools).
    pub fn local(brokers: impl Into<String>) -> KafkaArgs {
        KafkaArgs { brokers: brokers.into(), config_file: None, options: Vec::new(), session_timeout_ms: 6_000 }
    }
}

fn parse_key_value(s: &str) -> std::result::Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("expected key=value, got '{s}'"))?;
    let k = k.trim();
    if k.is_empty() {
        return Err(format!("empty key in '{s}'"));
    }
    Ok((k.to_string(), v.trim().to_string()))
}

/// Parses a Java-style properties file: `key=value` (or `key: value`) lines,
/// `#`/`!` comments, blank lines ignored.
pub fn parse_properties(text: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let sep = line.find(['=', ':']).ok_or_else(|| Error::Config(format!("line {}: expected key=value", n + 1)))?;
        let (k, v) = (line[..sep].trim(), line[sep + 1..].trim());
        if k.is_empty() {
            return Err(Error::Config(format!("line {}: empty key", n + 1)));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// What a client is for; decides Flywheel's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientRole {
    /// Idempotent producer with `acks=all`: a record acknowledged is durable
    /// and retries never duplicate it within a producer session.
    Producer,
    /// Group consumer that commits no offset by itself
    /// (`enable.auto.commit=false`, `enable.auto.offset.store=false`): the
    /// services keep their offsets in their own sinks and seek to them; a
    /// service mirrors them into the group, for lag monitoring, explicitly.
    Consumer {
        /// Consumer group id.
        group_id: String,
    },
    /// Admin client (topic creation, metadata).
    Admin,
}

/// Keys whose values never appear in logs.
fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "jaas", "token", "key.pem", "private", "ssl.key"].iter().any(|s| k.contains(s))
}

impl KafkaArgs {
    /// Builds the librdkafka configuration for a role: Flywheel defaults,
    /// then the properties file, then `-X` options.
    pub fn client_config(&self, role: &ClientRole) -> Result<ClientConfig> {
        let mut settings: Vec<(String, String)> = vec![("bootstrap.servers".into(), self.brokers.clone())];
        let mut set = |k: &str, v: &str| settings.push((k.to_string(), v.to_string()));
        match role {
            ClientRole::Producer => {
                set("enable.idempotence", "true");
                set("acks", "all");
                set("compression.type", "lz4");
                set("linger.ms", "5");
                set("message.timeout.ms", "30000");
            }
            ClientRole::Consumer { group_id } => {
                set("group.id", group_id);
                set("enable.auto.commit", "false");
                set("enable.auto.offset.store", "false");
                set("auto.offset.reset", "earliest");
                set("session.timeout.ms", &self.session_timeout_ms.to_string());
                set("heartbeat.interval.ms", &(self.session_timeout_ms / 3).max(100).to_string());
            }
            ClientRole::Admin => {}
        }
        if let Some(path) = &self.config_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::io(format!("reading Kafka config {}", path.display()), e))?;
            settings.extend(parse_properties(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?);
        }
        settings.extend(self.options.iter().cloned());
        if let ClientRole::Producer = role
            && settings.iter().rev().find(|(k, _)| k == "enable.idempotence").is_some_and(|(_, v)| v != "true")
        {
            return Err(Error::Config(
                "enable.idempotence must stay true for producers: retries would duplicate records".into(),
            ));
        }
        let mut config = ClientConfig::new();
        for (k, v) in settings {
            config.set(k, v);
        }
        Ok(config)
    }
}

/// The configuration as `key=value` pairs with secrets masked, for logs.
pub fn redacted(config: &ClientConfig) -> Vec<String> {
    let mut pairs: Vec<String> = config
        .config_map()
        .iter()
        .map(|(k, v)| if is_secret(k) { format!("{k}=***") } else { format!("{k}={v}") })
        .collect();
    pairs.sort();
    pairs
}

/// Creates every topic in `specs`; topics that already exist are left as they
/// are. Returns the names created now.
pub async fn create_topics(args: &KafkaArgs, specs: &[TopicSpec], timeout: Duration) -> Result<Vec<String>> {
    let admin: AdminClient<DefaultClientContext> =
        args.client_config(&ClientRole::Admin)?.create().map_err(|e| Error::kafka("creating admin client", e))?;
    let retention: Vec<Option<String>> = specs.iter().map(|s| s.retention_ms.map(|r| r.to_string())).collect();
    let new_topics: Vec<NewTopic<'_>> = specs
        .iter()
        .zip(&retention)
        .map(|(s, r)| {
            let mut t = NewTopic::new(&s.name, s.partitions, TopicReplication::Fixed(s.replication_factor))
                .set("cleanup.policy", s.cleanup_policy.as_str());
            if let Some(r) = r {
                t = t.set("retention.ms", r);
            }
            t
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(timeout)).request_timeout(Some(timeout));
    let results = admin.create_topics(&new_topics, &opts).await.map_err(|e| Error::kafka("creating topics", e))?;
    let mut created = Vec::new();
    for result in results {
        match result {
            Ok(name) => created.push(name),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(Error::kafka(format!("creating topic {name}"), rdkafka::error::KafkaError::AdminOp(code)));
            }
        }
    }
    Ok(created)
}

/// Topic → partition → offset.
pub type TopicOffsets = BTreeMap<String, BTreeMap<i32, i64>>;

/// End offsets of every partition of `topics`, in one offsets request (a
/// request per partition costs a round trip each on a slow broker).
pub fn end_offsets<C: ConsumerContext>(consumer: &BaseConsumer<C>, topics: &[&str]) -> Result<TopicOffsets> {
    let mut query = TopicPartitionList::new();
    for topic in topics {
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(|e| Error::kafka(format!("metadata of {topic}"), e))?;
        for part in md.topics().first().map(|t| t.partitions()).unwrap_or(&[]) {
            query
                .add_partition_offset(topic, part.id(), Offset::End)
                .map_err(|e| Error::kafka("building an end-offset query", e))?;
        }
    }
    let answer = consumer
        .offsets_for_times(query, Duration::from_secs(10))
        .map_err(|e| Error::kafka("querying end offsets", e))?;
    let mut ends: TopicOffsets = topics.iter().map(|t| (t.to_string(), BTreeMap::new())).collect();
    for e in answer.elements() {
        let Offset::Offset(end) = e.offset() else {
            return Err(Error::ReadBack(format!(
                "no end offset for {} partition {}: {:?}",
                e.topic(),
                e.partition(),
                e.offset()
            )));
        };
        ends.entry(e.topic().to_string()).or_default().insert(e.partition(), end);
    }
    Ok(ends)
}

/// Reads every record of `topics` written at or after `from` (a partition
/// missing from `from` is read from offset 0) up to the ends the topics have
/// now, calling `visit` on each. This is how services find the outputs a
/// previous owner wrote after its last durable checkpoint. `reader` names the
/// client (its group id is never joined: partitions are assigned).
pub fn read_back(
    args: &KafkaArgs,
    reader: &str,
    topics: &[&str],
    from: &TopicOffsets,
    timeout: Duration,
    mut visit: impl FnMut(&BorrowedMessage<'_>),
) -> Result<()> {
    let config = args.client_config(&ClientRole::Consumer { group_id: reader.to_string() })?;
    let consumer: BaseConsumer = config.create().map_err(|e| Error::kafka("creating read-back consumer", e))?;
    let highs = end_offsets(&consumer, topics)?;
    let mut tpl = TopicPartitionList::new();
    let mut targets = std::collections::HashMap::new();
    for (topic, parts) in &highs {
        for (p, high) in parts {
            let start = from.get(topic).and_then(|m| m.get(p)).copied().unwrap_or(0);
            if *high > start {
                tpl.add_partition_offset(topic, *p, Offset::Offset(start))
                    .map_err(|e| Error::kafka("building read-back assignment", e))?;
                targets.insert((topic.clone(), *p), *high);
            }
        }
    }
    if targets.is_empty() {
        return Ok(());
    }
    consumer.assign(&tpl).map_err(|e| Error::kafka("assigning read-back", e))?;
    let deadline = std::time::Instant::now() + timeout;
    while !targets.is_empty() && std::time::Instant::now() < deadline {
        let Some(Ok(msg)) = consumer.poll(Duration::from_millis(200)) else { continue };
        let at = (msg.topic().to_string(), msg.partition());
        if targets.get(&at).is_some_and(|high| msg.offset() + 1 >= *high) {
            targets.remove(&at);
        }
        visit(&msg);
    }
    match targets.keys().next() {
        Some((topic, p)) => {
            Err(Error::ReadBack(format!("could not read {topic} partition {p} to its end in {timeout:?}")))
        }
        None => Ok(()),
    }
}

/// Every record of `topic` from its start to its current end, decoded as
/// `T` (undecodable records are skipped with a warning): how services rebuild
/// their state from a topic on start.
pub fn read_topic<T: crate::AvroRecord>(
    args: &KafkaArgs,
    reader: &str,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    read_back(args, reader, &[topic], &TopicOffsets::new(), timeout, |m| {
        match m.payload().map(crate::codec::decode::<T>) {
            Some(Ok(r)) => out.push(r),
            _ => {
                tracing::warn!(topic, partition = m.partition(), offset = m.offset(), "skipping an undecodable record")
            }
        }
    })?;
    Ok(out)
}

/// End offsets of every partition of `topics`, through a short-lived
/// consumer named `reader` (never joins its group).
pub fn topic_ends(args: &KafkaArgs, reader: &str, topics: &[&str]) -> Result<TopicOffsets> {
    let probe: BaseConsumer = args
        .client_config(&ClientRole::Consumer { group_id: reader.to_string() })?
        .create()
        .map_err(|e| Error::kafka("creating offset probe", e))?;
    end_offsets(&probe, topics)
}

/// Assigns every partition of `topics` from the beginning and returns the
/// end offset of each non-empty partition: the history a service that keeps
/// its state in topics reads before it acts (see [`caught_up`]).
fn assign_from_beginning<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topics: &[&str],
) -> Result<std::collections::HashMap<(String, i32), i64>> {
    let ends = end_offsets(consumer, topics)?;
    let mut assignment = TopicPartitionList::new();
    for (topic, parts) in &ends {
        for p in parts.keys() {
            assignment.add_partition_offset(topic, *p, Offset::Beginning).map_err(|e| Error::kafka("assigning", e))?;
        }
    }
    consumer.assign(&assignment).map_err(|e| Error::kafka("assigning", e))?;
    Ok(ends
        .iter()
        .flat_map(|(t, parts)| parts.iter().filter(|(_, e)| **e > 0).map(|(p, e)| ((t.clone(), *p), *e)))
        .collect())
}

/// Marks `msg` read in the history left by [`assign_from_beginning`];
/// true once all of it has been read.
fn caught_up(remaining: &mut std::collections::HashMap<(String, i32), i64>, msg: &BorrowedMessage<'_>) -> bool {
    let at = (msg.topic().to_string(), msg.partition());
    if remaining.get(&at).is_some_and(|end| msg.offset() + 1 >= *end) {
        remaining.remove(&at);
    }
    remaining.is_empty()
}

/// The next message of `consumer` without blocking a runtime thread: a
/// non-blocking poll, and when nothing is waiting an async sleep of `idle`
/// (then `None`). Loops built on it have an await point every turn, so they
/// end when their task is dropped (runtime shutdown) and not only when their
/// token is cancelled, and they run on any runtime flavour.
async fn poll_async<'a, C: ConsumerContext>(
    consumer: &'a BaseConsumer<C>,
    idle: Duration,
) -> Option<rdkafka::error::KafkaResult<BorrowedMessage<'a>>> {
    // Yield even when busy, so a long backlog cannot starve the runtime (and
    // before polling: a message, which is not `Send`, is never held across
    // an await).
    tokio::task::yield_now().await;
    if let Some(polled) = consumer.poll(Duration::ZERO) {
        return Some(polled);
    }
    tokio::time::sleep(idle).await;
    None
}

/// One record read by a [`TopicFollower`], owned (control-plane records are
/// small, and an owned record can be kept across awaits).
#[derive(Debug, Clone)]
pub struct Followed {
    /// Topic name.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// The value, if the record has one.
    pub payload: Option<Vec<u8>>,
}

/// Reads topics from their beginning, knows when it has read the history
/// they held when it started, and then follows them: how a service that
/// keeps its whole state in topics (the trigger, the gate) rebuilds it on
/// start and stays current. Partitions are assigned (no group is joined).
pub struct TopicFollower {
    consumer: BaseConsumer,
    remaining: std::collections::HashMap<(String, i32), i64>,
}

impl std::fmt::Debug for TopicFollower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicFollower").field("remaining", &self.remaining).finish_non_exhaustive()
    }
}

impl TopicFollower {
    /// Assigns every partition of `topics` from offset 0 through a client
    /// named `reader`.
    pub fn from_beginning(args: &KafkaArgs, reader: &str, topics: &[&str]) -> Result<TopicFollower> {
        let consumer: BaseConsumer = args.manual_consumer(reader)?;
        let remaining = assign_from_beginning(&consumer, topics)?;
        Ok(TopicFollower { consumer, remaining })
    }

    /// The next record, or `None` after waiting `idle` with nothing to read
    /// (the wait is an async sleep, so the loop ends with its task). Consume errors are
    /// logged and read as `None`.
    pub async fn next(&mut self, idle: Duration) -> Option<Followed> {
        let followed = match poll_async(&self.consumer, idle).await? {
            Ok(msg) => {
                caught_up(&mut self.remaining, &msg);
                Followed {
                    topic: msg.topic().to_string(),
                    partition: msg.partition(),
                    offset: msg.offset(),
                    payload: msg.payload().map(<[u8]>::to_vec),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "consume error");
                return None;
            }
        };
        Some(followed)
    }

    /// Whether every record the topics held at the start has been read.
    pub fn caught_up(&self) -> bool {
        self.remaining.is_empty()
    }
}

/// Publishes typed records, each to its topic's configured name and keyed by
/// the topic's [`key_fields`](crate::topics::Topic::key_fields), and waits for
/// the broker's acknowledgement (the idempotent producer of
/// [`KafkaArgs::producer`]).
#[derive(Clone)]
pub struct Publisher {
    producer: rdkafka::producer::FutureProducer,
    topics: crate::topics::TopicsConfig,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").field("topics", &self.topics).finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher with its own producer.
    pub fn new(args: &KafkaArgs, topics: &crate::topics::TopicsConfig) -> Result<Publisher> {
        Ok(Publisher { producer: args.producer()?, topics: topics.clone() })
    }

    /// Encodes `record`, keys it and sends it to `topic`; refuses a record of
    /// another kind than the topic carries.
    pub async fn publish<R: crate::AvroRecord>(&self, topic: crate::topics::Topic, record: &R) -> Result<()> {
        topic.check_kind::<R>()?;
        let bytes = crate::codec::encode(record)?;
        let key = topic.key_of(record)?;
        let name = self.topics.name(topic);
        let mut message = rdkafka::producer::FutureRecord::to(&name).payload(&bytes);
        if let Some(key) = &key {
            message = message.key(key);
        }
        self.producer
            .send(message, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| Error::kafka(format!("publishing a {} record to {name}", R::KIND), e))?;
        Ok(())
    }
}

impl KafkaArgs {
    /// An idempotent producer (`acks=all`) for async sends.
    pub fn producer(&self) -> Result<rdkafka::producer::FutureProducer> {
        self.client_config(&ClientRole::Producer)?.create().map_err(|e| Error::kafka("creating producer", e))
    }

    /// A consumer in `group` that never commits offsets itself: the service
    /// keeps its own (state in topics or in its sink).
    pub fn manual_consumer<C: rdkafka::config::FromClientConfig>(&self, group: &str) -> Result<C> {
        let config = self.client_config(&ClientRole::Consumer { group_id: group.into() })?;
        config.create().map_err(|e| Error::kafka("creating consumer", e))
    }

    /// A producer whose [`DeliveryTracker`] records failures and the ends it
    /// wrote (the services that read their own outputs back use it).
    pub fn tracked_producer(&self) -> Result<ThreadedProducer<DeliveryTracker>> {
        self.client_config(&ClientRole::Producer)?
            .create_with_context(DeliveryTracker::default())
            .map_err(|e| Error::kafka("creating producer", e))
    }
}

/// Producer context that remembers the first failed delivery and, per output
/// partition, the end of what this producer has written. After a flush,
/// anything written later lands beyond those ends: the lower bound a resumed
/// owner reads back from, with no offset query per checkpoint.
#[derive(Debug, Default)]
pub struct DeliveryTracker {
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
    written_end: Mutex<TopicOffsets>,
}

impl DeliveryTracker {
    /// The first delivery error since creation, if any delivery failed.
    pub fn first_error(&self) -> Option<String> {
        if self.failed.load(Ordering::SeqCst) == 0 {
            return None;
        }
        Some(self.first_error.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_default())
    }

    /// `base` raised by every acknowledged write: a lower bound of where
    /// records written from now on will land.
    pub fn ends_over(&self, base: &TopicOffsets) -> TopicOffsets {
        let mut ends = base.clone();
        let written = self.written_end.lock().unwrap_or_else(|p| p.into_inner());
        for (topic, parts) in written.iter() {
            let per = ends.entry(topic.clone()).or_default();
            for (p, end) in parts {
                let e = per.entry(*p).or_insert(0);
                *e = (*e).max(*end);
            }
        }
        ends
    }
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(m) => {
                let mut ends = self.written_end.lock().unwrap_or_else(|p| p.into_inner());
                let end = ends.entry(m.topic().to_string()).or_default().entry(m.partition()).or_insert(0);
                *end = (*end).max(m.offset() + 1);
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::SeqCst);
                self.first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// Sends one record on a threaded producer, waiting while its queue is full.
pub fn send_blocking<C: ProducerContext<DeliveryOpaque = ()>>(
    producer: &ThreadedProducer<C>,
    topic: &str,
    key: &str,
    value: &[u8],
) -> Result<()> {
    let mut record = BaseRecord::to(topic).key(key).payload(value);
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((e, _)) => return Err(Error::kafka(format!("producing to {topic}"), e)),
        }
    }
}

/// Readiness check a [`GroupWatch`] fails while its member holds no
/// partition of the topic (`/readyz` then says "not ready: no partitions assigned").
pub const NO_PARTITIONS_ASSIGNED: &str = "no partitions assigned";

/// How long a partition's group offset must stand still, with records
/// waiting behind it, before a member that does not hold it concludes nobody
/// does: the group's session timeout (a dead owner is out of the group by
/// then), plus twice the longest time a working owner may take between
/// offset commits (`progress_every`), plus a margin.
pub fn stall_after(session_timeout_ms: u32, progress_every: Duration) -> Duration {
    Duration::from_millis(u64::from(session_timeout_ms))
        .saturating_add(progress_every.saturating_mul(2))
        .saturating_add(Duration::from_secs(5))
}

/// How long a stopping member may spend leaving its consumer group: its
/// session timeout (the coordinator drops a member that did not leave by
/// then anyway), and at most a third of the drain timeout, which is for
/// committing work, not for the group.
pub fn group_leave_limit(session_timeout_ms: u32, drain_timeout: Duration) -> Duration {
    Duration::from_millis(u64::from(session_timeout_ms)).min(drain_timeout / 3)
}

/// Closes a group member: it revokes its partitions and leaves the group,
/// polling so that the rebalance callbacks run. rdkafka's `Drop` does the
/// same with no time limit, so a coordinator that does not answer (a hung
/// broker, a rebalance waiting on a dead member) would hold a stopping
/// service past its drain timeout. After `limit` (or when the close cannot
/// start) the consumer is leaked instead, with a warning: the process is
/// exiting, nothing it holds needs releasing, and the coordinator drops the
/// member when its session times out.
pub fn leave_group<C: ConsumerContext>(consumer: BaseConsumer<C>, limit: Duration) {
    let started = std::time::Instant::now();
    if let Err(e) = consumer.close_queue() {
        tracing::warn!(error = %e, "leaving the consumer group failed to start; stopping without it");
        std::mem::forget(consumer);
        return;
    }
    while !consumer.closed() {
        if started.elapsed() >= limit {
            tracing::warn!(?limit, "the consumer group was not left in time; stopping without it");
            std::mem::forget(consumer);
            return;
        }
        // Records still delivered are not processed: whatever was not
        // committed is read again by the next owner.
        let _ = consumer.poll(Duration::from_millis(100));
    }
}

/// Keeps a consumer-group member from idling while partitions of its topic
/// go unconsumed, and tells readiness and metrics what the member holds.
///
/// Why: a broker may leave partitions assigned to a member that was killed
/// (`kill -9`) if its replacement joined before the dead member's session
/// expired, and then start no rebalance when that session expires (tansu 0.6
/// does: its session check can drop the dead member without telling the
/// others). The live members then keep their partial (or empty) assignment
/// for good. Kafka itself rebalances there, but no request every broker
/// answers shows the other members' assignments, so the watch judges from
/// what any member can read: a partition this member does not hold, whose
/// group offset has not moved for `stall` while records wait behind it, has
/// no working owner (every service commits its group offset as it makes
/// progress). The member then rejoins the group (unsubscribe, subscribe),
/// and the rebalance that follows includes live members only.
///
/// Consecutive rejoins back off (`stall` × 2, then × 4), so a member idle for
/// a legitimate reason (more members than partitions, an owner slower than
/// `stall`) costs at most a rebalance every few stall periods. A member that holds every
/// partition never queries the broker.
pub struct GroupWatch {
    topic: String,
    stall: Duration,
    every: Duration,
    readiness: crate::runtime::Readiness,
    held: Option<std::collections::BTreeSet<i32>>,
    /// Per partition not held: its group offset when last seen with records
    /// waiting behind it, and since when that offset has not moved.
    waiting: std::collections::HashMap<i32, (Option<i64>, std::time::Instant)>,
    last_look: std::time::Instant,
    last_check: Option<std::time::Instant>,
    last_rejoin: Option<std::time::Instant>,
    rejoins_in_a_row: u32,
    assigned: prometheus_client::metrics::gauge::Gauge,
    rejoins: prometheus_client::metrics::counter::Counter,
}

impl std::fmt::Debug for GroupWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupWatch").field("topic", &self.topic).field("held", &self.held).finish_non_exhaustive()
    }
}

impl GroupWatch {
    /// A watch over `topic` that rejoins after `stall` (see [`stall_after`]);
    /// marks `readiness` not ready until a partition is held, and registers
    /// `assigned_partitions` and `group_rejoins` in `registry` (pass the
    /// service's prefixed sub-registry).
    pub fn new(
        topic: &str,
        stall: Duration,
        readiness: crate::runtime::Readiness,
        registry: &mut prometheus_client::registry::Registry,
    ) -> GroupWatch {
        readiness.set(NO_PARTITIONS_ASSIGNED, false);
        let watch = GroupWatch {
            topic: topic.to_string(),
            stall,
            every: (stall / 4).clamp(Duration::from_millis(500), Duration::from_secs(10)),
            readiness,
            held: None,
            waiting: std::collections::HashMap::new(),
            last_look: std::time::Instant::now(),
            last_check: None,
            last_rejoin: None,
            rejoins_in_a_row: 0,
            assigned: Default::default(),
            rejoins: Default::default(),
        };
        registry.register(
            "assigned_partitions",
            "Partitions of the input topic this member holds",
            watch.assigned.clone(),
        );
        registry.register(
            "group_rejoins",
            "Times this member rejoined its group because partitions had no working owner",
            watch.rejoins.clone(),
        );
        watch
    }

    /// Partitions held at the last look (empty before the first assignment).
    pub fn held(&self) -> Vec<i32> {
        self.held.iter().flatten().copied().collect()
    }

    /// Call on every turn of the poll loop (cheap: it looks at the
    /// assignment twice a second and queries the broker only when partitions
    /// are held elsewhere). Rejoins the group when a partition held by no
    /// working member is found, and returns why it did.
    pub fn tick<C: ConsumerContext, K: Consumer<C>>(&mut self, consumer: &K) -> Option<String> {
        let now = std::time::Instant::now();
        if self.held.is_some() && now.duration_since(self.last_look) < Duration::from_millis(500) {
            return None;
        }
        self.last_look = now;
        let held: std::collections::BTreeSet<i32> = match consumer.assignment() {
            Ok(tpl) => tpl.elements_for_topic(&self.topic).iter().map(|e| e.partition()).collect(),
            Err(e) => {
                tracing::debug!(error = %e, "reading the assignment failed");
                return None;
            }
        };
        if self.held.as_ref() != Some(&held) {
            tracing::info!(topic = %self.topic, partitions = ?held, "assignment changed");
            self.readiness.set(NO_PARTITIONS_ASSIGNED, !held.is_empty());
            self.assigned.set(held.len() as i64);
            self.held = Some(held);
            self.waiting.clear();
        }
        if self.last_check.is_some_and(|t| now.duration_since(t) < self.every) {
            return None;
        }
        self.last_check = Some(now);
        let stalled = match self.stalled_elsewhere(consumer, now) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "checking the group's progress failed");
                return None;
            }
        };
        if stalled.is_empty() {
            if self.waiting.is_empty() {
                self.rejoins_in_a_row = 0;
            }
            return None;
        }
        let wait = self.stall.saturating_mul(2u32.pow(self.rejoins_in_a_row.min(2)));
        if self.last_rejoin.is_some_and(|t| now.duration_since(t) < wait) {
            return None;
        }
        let why = format!(
            "partitions {stalled:?} of {} have records waiting and no progress for {:?}, and this member holds {:?}",
            self.topic,
            self.stall,
            self.held()
        );
        tracing::warn!(reason = %why, "rejoining the consumer group");
        consumer.unsubscribe();
        if let Err(e) = consumer.subscribe(&[&self.topic]) {
            tracing::error!(error = %e, "subscribing again failed");
        }
        self.rejoins.inc();
        self.rejoins_in_a_row += 1;
        self.last_rejoin = Some(now);
        self.waiting.clear();
        self.held = None;
        Some(why)
    }

    /// Partitions not held here whose group offset stood still for `stall`
    /// with records behind it.
    fn stalled_elsewhere<C: ConsumerContext, K: Consumer<C>>(
        &mut self,
        consumer: &K,
        now: std::time::Instant,
    ) -> Result<Vec<i32>> {
        // Short: the caller's poll loop waits meanwhile.
        let timeout = Duration::from_secs(2);
        let held = self.held.clone().unwrap_or_default();
        let md = consumer
            .fetch_metadata(Some(&self.topic), timeout)
            .map_err(|e| Error::kafka(format!("metadata of {}", self.topic), e))?;
        let others: Vec<i32> = md
            .topics()
            .first()
            .map(|t| t.partitions().iter().map(|p| p.id()).filter(|p| !held.contains(p)).collect())
            .unwrap_or_default();
        if others.is_empty() {
            self.waiting.clear();
            return Ok(Vec::new());
        }
        let mut query = TopicPartitionList::new();
        for p in &others {
            query.add_partition(&self.topic, *p);
        }
        let committed =
            consumer.committed_offsets(query, timeout).map_err(|e| Error::kafka("reading group offsets", e))?;
        let mut stalled = Vec::new();
        for p in others {
            let offset = committed
                .find_partition(&self.topic, p)
                .and_then(|e| if let Offset::Offset(o) = e.offset() { Some(o) } else { None });
            let (low, high) = consumer
                .fetch_watermarks(&self.topic, p, timeout)
                .map_err(|e| Error::kafka(format!("watermarks of {} partition {p}", self.topic), e))?;
            if high <= offset.unwrap_or(low).max(low) {
                self.waiting.remove(&p); // nothing waits: owned or not, no one is kept waiting
                continue;
            }
            let since = match self.waiting.get(&p) {
                Some((seen, since)) if *seen == offset => *since,
                _ => {
                    self.waiting.insert(p, (offset, now));
                    now
                }
            };
            if now.duration_since(since) >= self.stall {
                stalled.push(p);
            }
        }
        Ok(stalled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_file_and_options_override_defaults_and_secrets_are_masked() {
        let dir = std::env::temp_dir().join(format!("flywheel-kafka-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("client.properties");
        std::fs::write(
            &file,
            "# production\nsecurity.protocol=SASL_SSL\nsasl.mechanism: SCRAM-SHA-512\nsasl.password=hunter2\nlinger.ms=20\n",
        )
        .unwrap();
        let mut args = KafkaArgs::local("broker:9093");
        args.config_file = Some(file);
        args.options = vec![("linger.ms".into(), "50".into())];
        let cfg = args.client_config(&ClientRole::Producer).unwrap();
        assert_eq!(cfg.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(cfg.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(cfg.get("linger.ms"), Some("50"));
        assert_eq!(cfg.get("acks"), Some("all"));
        assert_eq!(cfg.get("bootstrap.servers"), Some("broker:9093"));
        let shown = redacted(&cfg).join(" ");
        assert!(shown.contains("sasl.password=***") && !shown.contains("hunter2"), "{shown}");

        let consumer = args.client_config(&ClientRole::Consumer { group_id: "g".into() }).unwrap();
        assert_eq!(consumer.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(consumer.get("enable.auto.commit"), Some("false"), "no offset is committed behind a service's back");
        assert_eq!(consumer.get("session.timeout.ms"), Some("6000"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn producers_refuse_to_drop_idempotence() {
        let mut args = KafkaArgs::local("b:1");
        args.options = vec![("enable.idempotence".into(), "false".into())];
        let err = args.client_config(&ClientRole::Producer).unwrap_err().to_string();
        assert!(err.contains("enable.idempotence"), "{err}");
        assert!(parse_properties("novalue\n").is_err());
        assert!(parse_key_value("=x").is_err());
    }
}
