//! The lake-writer service: consumes `rewards` in a consumer group, buffers
//! each assigned partition, and commits it to the Delta table when a rolling
//! threshold is reached; then announces the new shards on `shards` and the
//! rejected records on `dead-letters`.
//!
//! Exactly once, per source partition:
//! 1. The table is the source of truth for offsets: each commit carries the
//!    partition's last offset as a Delta `txn` action, and on assignment the
//!    partition starts at that offset + 1 (the group offset is committed
//!    afterwards, for monitoring only).
//! 2. A commit covers a contiguous offset range and is refused if the table
//!    shows another writer committed the partition meanwhile (a zombie after a
//!    rebalance), or if one does while it commits (Delta's conflict check on
//!    the same `txn` id), so no range is written twice.
//! 3. Manifests and dead letters are derived from commits and published
//!    after them. Progress is kept per partition (`_flywheel_state/published`)
//!    with the output topics' end offsets at that point; a new owner reads
//!    back from there and publishes only what is missing.
//! 4. Replays from upstream (the same reward id again) are dropped against
//!    the ids of the partition's recent rows, refilled from the lake on start.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use flywheel_core::codec::{decode, encode};
use flywheel_core::kafka::{
    ClientRole, DeliveryTracker, GroupWatch, TopicOffsets, group_leave_limit, leave_group, read_back, send_blocking,
    stall_after, topic_ends,
};
use flywheel_core::records::{DeadLetter, ShardManifest, SourcePosition};
use flywheel_core::runtime::{CommonArgs, ServiceHarness};
use flywheel_core::topics::Topic;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{Producer, ThreadedProducer};
use rdkafka::types::RDKafkaRespErr as RespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use flywheel_lake::LakeError;
use flywheel_lake::parquet::{ParquetSettings, RewardSchemas};
use flywheel_lake::shard::{PreparedFile, RecentIds, ShardContext, ids_in_file, prepare, read_file, shard_stats};
use flywheel_lake::store::{Storage, open_storage};
use flywheel_lake::table::{Commit, Lake, PartitionCommit, Rejected, file_prefix, source_key};

use crate::WriterError;
use crate::partition::{
    Arrival, PartitionState, Publication, PublishedMarker, RollLimits, due, marker_path, over_memory_cap, publication,
    replay_filter_sources,
};

/// Lake writer configuration; every flag has an environment variable.
#[derive(Debug, Clone, Parser)]
#[command(name = "flywheel-lake-writer", version, about = "Writes rewards into the Parquet lake, exactly once")]
pub struct Config {
    /// Service, Kafka and topic flags every service has.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Consumer group; instances in one group share the partitions.
    #[arg(long = "group-id", env = "FLYWHEEL_LAKE_GROUP_ID", default_value = "flywheel-lake-writer")]
    pub group_id: String,
    /// Lake root: a directory, `file:///path`, `memory://` (in-process, for
    /// trials), or `s3://`, `gs://`, `az://` (credentials and endpoint from
    /// the usual `AWS_*`, `GOOGLE_*`, `AZURE_*` variables). The table is
    /// `<root>/rewards`.
    #[arg(long = "lake-root", env = "FLYWHEEL_LAKE_ROOT", default_value = ".flywheel/lake")]
    pub lake_root: String,
    /// Commit a partition once it buffers this many records.
    #[arg(long = "roll-max-rows", env = "FLYWHEEL_LAKE_ROLL_MAX_ROWS", default_value_t = 2_000_000)]
    pub roll_max_rows: usize,
    /// Commit a partition once its buffered records take this many bytes
    /// (Avro; Parquet files come out several times smaller).
    #[arg(long = "roll-max-bytes", env = "FLYWHEEL_LAKE_ROLL_MAX_BYTES", default_value_t = 512 * 1024 * 1024)]
    pub roll_max_bytes: usize,
    /// Commit a partition once its oldest buffered record waited this long:
    /// the bound on event-to-visible latency. 55 s leaves room for delivery
    /// and the commit itself, so p99 event-to-visible stays under a minute.
    #[arg(long = "roll-max-age-ms", env = "FLYWHEEL_LAKE_ROLL_MAX_AGE_MS", default_value_t = 55_000)]
    pub roll_max_age_ms: u64,
    /// Commit a partition that received nothing for this long.
    #[arg(long = "roll-idle-ms", env = "FLYWHEEL_LAKE_ROLL_IDLE_MS", default_value_t = 10_000)]
    pub roll_idle_ms: u64,
    /// Cap on buffered bytes over all partitions: above it the largest
    /// buffer is committed before anything more is consumed.
    #[arg(long = "max-buffered-bytes", env = "FLYWHEEL_LAKE_MAX_BUFFERED_BYTES", default_value_t = 1024 * 1024 * 1024)]
    pub max_buffered_bytes: usize,
    /// Rows per Parquet row group.
    #[arg(long = "row-group-rows", env = "FLYWHEEL_LAKE_ROW_GROUP_ROWS", default_value_t = 128 * 1024)]
    pub row_group_rows: usize,
    /// zstd level of Parquet pages (1-22).
    #[arg(long = "zstd-level", env = "FLYWHEEL_LAKE_ZSTD_LEVEL", default_value_t = 3)]
    pub zstd_level: i32,
    /// Reward ids remembered per partition to drop upstream replays.
    #[arg(long = "dedupe-window", env = "FLYWHEEL_LAKE_DEDUPE_WINDOW", default_value_t = 1_000_000)]
    pub dedupe_window: usize,
}

impl Config {
    fn check(&self) -> Result<(), WriterError> {
        let bad = |what: &str| Err(WriterError::Config(what.to_string()));
        if self.roll_max_rows == 0 || self.roll_max_bytes == 0 {
            return bad("--roll-max-rows and --roll-max-bytes must be > 0");
        }
        if self.roll_max_age_ms == 0 || self.roll_idle_ms == 0 {
            return bad("--roll-max-age-ms and --roll-idle-ms must be > 0");
        }
        if self.max_buffered_bytes < self.roll_max_bytes.min(64 * 1024 * 1024) {
            return bad("--max-buffered-bytes must be at least --roll-max-bytes (or 64 MiB)");
        }
        if !(1..=22).contains(&self.zstd_level) || self.row_group_rows == 0 {
            return bad("--zstd-level must be 1-22 and --row-group-rows > 0");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Debug, Clone)]
struct Metrics {
    records: Family<ResultLabels, Counter>,
    flushes: Family<ReasonLabels, Counter>,
    commits: Counter,
    conflicts: Counter,
    files: Counter,
    file_bytes: Counter,
    buffered_bytes: Gauge,
    buffered_records: Gauge,
    visible_latency: Histogram,
    commit_seconds: Histogram,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Metrics {
        let buckets = [0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 300.0];
        let m = Metrics {
            records: Family::default(),
            flushes: Family::default(),
            commits: Counter::default(),
            conflicts: Counter::default(),
            files: Counter::default(),
            file_bytes: Counter::default(),
            buffered_bytes: Gauge::default(),
            buffered_records: Gauge::default(),
            visible_latency: Histogram::new(buckets),
            commit_seconds: Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        };
        let r = registry.sub_registry_with_prefix("lake_writer");
        r.register("records", "Records by result: written, replay (dropped), rejected", m.records.clone());
        r.register("flushes", "Partition commits by what triggered them", m.flushes.clone());
        r.register("commits", "Delta commits written", m.commits.clone());
        r.register("conflicts", "Commits refused because another writer owns the partition", m.conflicts.clone());
        r.register("files", "Parquet files committed", m.files.clone());
        r.register("file_bytes", "Bytes of Parquet committed", m.file_bytes.clone());
        r.register("buffered_bytes", "Record bytes waiting for a commit", m.buffered_bytes.clone());
        r.register("buffered_records", "Records waiting for a commit", m.buffered_records.clone());
        r.register(
            "visible_latency_seconds",
            "From a reward's Kafka timestamp to the commit that makes it visible",
            m.visible_latency.clone(),
        );
        r.register("commit_seconds", "Time to encode and commit one partition's buffer", m.commit_seconds.clone());
        m
    }

    fn count(&self, result: &str, n: u64) {
        if n > 0 {
            self.records.get_or_create(&ResultLabels { result: result.into() }).inc_by(n);
        }
    }
}

struct Names {
    rewards: String,
    shards: String,
    dead: String,
}

/// Rebalance events, handled by the poll loop.
struct RebalanceContext {
    lake: Arc<Mutex<Lake>>,
    topic: String,
    assigned: Mutex<Vec<i32>>,
    revoked: Mutex<Vec<i32>>,
    /// Set when an assignment could not be started: the writer stops.
    fatal: Mutex<Option<String>>,
}

impl ClientContext for RebalanceContext {}

impl ConsumerContext for RebalanceContext {
    // Assignment is done here, not by the default handler, so each partition
    // starts where the table says rather than at the group offset.
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RespErr, tpl: &mut TopicPartitionList) {
        match err {
            RespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut lake = self.lake.lock().unwrap_or_else(|p| p.into_inner());
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                // The table says where each partition resumes; a storage
                // hiccup is retried, and if it persists the writer stops (an
                // assignment it cannot start would sit idle until the next
                // rebalance).
                let mut starts = Err(LakeError::Config("not read".into()));
                for attempt in 1..=3 {
                    starts = lake.refresh().and_then(|()| {
                        parts.iter().map(|p| lake.committed_offset(&self.topic, *p)).collect::<Result<Vec<_>, _>>()
                    });
                    match &starts {
                        Ok(_) => break,
                        Err(e) => tracing::warn!(attempt, error = %e, "reading the table on assignment failed"),
                    }
                    std::thread::sleep(Duration::from_secs(attempt));
                }
                let starts = match starts {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read where the assigned partitions resume; stopping");
                        *self.fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                        return;
                    }
                };
                for (p, committed) in parts.iter().zip(starts) {
                    let start = committed.map_or(Offset::Beginning, |o| Offset::Offset(o + 1));
                    if let Err(e) = tpl.set_partition_offset(&self.topic, *p, start) {
                        tracing::error!(partition = p, error = %e, "setting a start offset failed");
                    }
                }
                drop(lake);
                tracing::info!(?parts, "partitions assigned; starting at the table's offsets");
                if let Err(e) = consumer.assign(tpl) {
                    tracing::error!(error = %e, "assigning partitions failed");
                }
                self.assigned.lock().unwrap_or_else(|p| p.into_inner()).extend(parts);
            }
            RespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(?parts, "partitions revoked; their uncommitted buffers are dropped");
                self.revoked.lock().unwrap_or_else(|p| p.into_inner()).extend(parts);
                if let Err(e) = consumer.unassign() {
                    tracing::error!(error = %e, "unassigning partitions failed");
                }
            }
            other => tracing::error!(error = ?other, "rebalance error"),
        }
    }
}

/// The writer's state, owned by the poll loop.
struct Writer {
    config: Config,
    names: Names,
    lake: Arc<Mutex<Lake>>,
    storage: Arc<dyn Storage>,
    lake_url: String,
    settings: ParquetSettings,
    schemas: RewardSchemas,
    producer: ThreadedProducer<DeliveryTracker>,
    startup_ends: TopicOffsets,
    parts: HashMap<i32, PartitionState>,
    metrics: Metrics,
}

/// The dead letter of a rejected record.
pub(crate) fn dead_letter_of(r: &Rejected, failed_at: i64) -> DeadLetter {
    DeadLetter {
        service: "lake-writer".into(),
        reason_code: r.reason_code.clone(),
        reason: r.reason.clone(),
        source: SourcePosition { topic: r.topic.clone(), partition: r.partition, offset: r.offset },
        original_key: r.key.clone(),
        original_value: r.value.clone(),
        failed_at,
    }
}

/// The manifest of a committed file, rebuilt from the file itself (used when
/// a crash lost the manifest computed at commit time).
pub(crate) fn manifest_from_file(
    storage: &dyn Storage,
    commit: &Commit,
    path: &str,
    topic: &str,
    partition: i32,
) -> Result<ShardManifest, LakeError> {
    let added = commit
        .added
        .iter()
        .find(|f| f.path == path)
        .ok_or_else(|| LakeError::Integrity(format!("{path} is not in commit {}", commit.seq)))?;
    let bytes = storage.get(path)?.ok_or_else(|| LakeError::Integrity(format!("committed file {path} is missing")))?;
    let batches = read_file(bytes)?;
    let schema = batches.first().map(|b| b.schema()).ok_or_else(|| LakeError::Integrity(format!("{path} is empty")))?;
    let batch = arrow_select::concat::concat_batches(&schema, &batches)
        .map_err(|source| LakeError::Arrow { context: "reading a file".into(), source })?;
    let (stats, versions, min_t, max_t) = shard_stats(&batch)?;
    let column = |name: &str| -> Result<String, LakeError> {
        use arrow_array::Array as _;
        use arrow_array::cast::AsArray as _;
        let col = batch.column_by_name(name).and_then(|c| c.as_string_opt::<i32>());
        col.filter(|c| !c.is_empty())
            .map(|c| c.value(0).to_string())
            .ok_or_else(|| LakeError::Integrity(format!("{path}: no {name}")))
    };
    let (first, last) = added.sources.get(&source_key(topic, partition)).copied().unwrap_or_default();
    let name = path.rsplit('/').next().unwrap_or(path);
    Ok(ShardManifest {
        shard_id: name.trim_end_matches(".parquet").to_string(),
        tenant: column("tenant")?,
        uri: path.to_string(),
        lake_root: storage.url(),
        rows: added.rows as i64,
        bytes: added.bytes as i64,
        content_sha256: added.sha256.clone(),
        min_event_time: min_t,
        max_event_time: max_t,
        source: flywheel_core::records::OffsetRange {
            topic: topic.to_string(),
            partition,
            first_offset: first,
            last_offset: last,
        },
        stats,
        reward_fn_version: column("reward_fn_version")?,
        versions,
        commit_seq: commit.seq as i64,
        committed_at: commit.committed_at,
    })
}

impl Writer {
    fn lake(&self) -> std::sync::MutexGuard<'_, Lake> {
        self.lake.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, topic: &str, key: &str, value: &[u8]) -> Result<(), WriterError> {
        Ok(send_blocking(&self.producer, topic, key, value)?)
    }

    fn flush_producer(&self) -> Result<TopicOffsets, WriterError> {
        self.producer
            .flush(Duration::from_secs(30))
            .map_err(|source| WriterError::Kafka { context: "flushing the producer", source })?;
        if let Some(e) = self.producer.context().first_error() {
            return Err(WriterError::Undelivered(e));
        }
        Ok(self.producer.context().ends_over(&self.startup_ends))
    }

    fn write_marker(&self, prefix: &str, marker: &PublishedMarker) -> Result<(), WriterError> {
        let bytes = serde_json::to_vec(marker)
            .map_err(|source| WriterError::Json { context: "writing the publication marker", source })?;
        Ok(self.storage.put(&marker_path(prefix), &bytes)?)
    }

    /// Takes over a partition: cleans up a crashed commit, publishes what a
    /// previous owner committed but did not announce, refills the replay
    /// filter, and sets where reading resumes.
    fn take_over(&mut self, partition: i32) -> Result<(), WriterError> {
        let started = Instant::now();
        let topic = self.names.rewards.clone();
        let prefix = file_prefix(&topic, partition)?;
        let key = source_key(&topic, partition);
        // A writer killed mid-put leaves temp files (local store only).
        self.storage.discard_temp(&prefix)?;
        let (previous, files) = {
            let mut lake = self.lake();
            lake.refresh()?;
            (lake.committed_offset(&topic, partition)?, lake.files()?)
        };
        self.publish_pending(partition, &prefix, &key, previous)?;
        let mut recent = RecentIds::new(self.config.dedupe_window);
        let mut ids = Vec::new();
        for path in replay_filter_sources(files.iter().map(|f| f.path.as_str()), &prefix) {
            if ids.len() >= self.config.dedupe_window {
                break;
            }
            let bytes = self
                .storage
                .get(&path)?
                .ok_or_else(|| LakeError::Integrity(format!("committed file {path} is missing")))?;
            ids.extend(ids_in_file(bytes, partition)?);
        }
        ids.sort_by_key(|(offset, _)| *offset);
        let skip = ids.len().saturating_sub(self.config.dedupe_window);
        for (_, id) in ids.into_iter().skip(skip) {
            recent.insert(id);
        }
        tracing::info!(
            partition,
            resume_at = previous.map_or("beginning".to_string(), |o| (o + 1).to_string()),
            recent_ids = recent.len(),
            took = ?started.elapsed(),
            "partition taken over"
        );
        self.parts.insert(partition, PartitionState::resuming_after(previous, recent));
        Ok(())
    }

    /// Publishes the manifests and dead letters of the commits of source
    /// partition `key` that are not on their topics yet.
    fn publish_pending(
        &mut self,
        partition: i32,
        prefix: &str,
        key: &str,
        committed: Option<i64>,
    ) -> Result<(), WriterError> {
        let marker: Option<PublishedMarker> = match self.storage.get(&marker_path(prefix))? {
            Some(bytes) => Some(
                serde_json::from_slice(&bytes)
                    .map_err(|e| LakeError::Integrity(format!("publisher progress {}: {e}", marker_path(prefix))))?,
            ),
            None => None,
        };
        let (after, ends) = match publication(marker, committed) {
            Publication::UpToDate => return Ok(()),
            Publication::Everything => {
                let pending = self.lake().commits_of(key, None)?;
                let ends = self.flush_producer()?;
                self.write_marker(prefix, &PublishedMarker { through_seq: None, through_offset: None, ends })?;
                return self.publish(partition, prefix, &pending, &HashSet::new(), &HashSet::new());
            }
            Publication::Since { after_seq, ends } => (after_seq, ends),
        };
        let pending: Vec<Commit> = self.lake().commits_of(key, after)?;
        if pending.is_empty() {
            return Ok(());
        }
        let (mut shards, mut dead) = (HashSet::new(), HashSet::new());
        let topics = [self.names.shards.as_str(), self.names.dead.as_str()];
        let reader = format!("{}-readback", self.config.group_id);
        read_back(&self.config.common.kafka, &reader, &topics, &ends, Duration::from_secs(60), |msg| {
            let Some(payload) = msg.payload() else { return };
            if msg.topic() == self.names.shards {
                if let Ok(m) = decode::<ShardManifest>(payload)
                    && m.lake_root == self.lake_url
                {
                    shards.insert(m.shard_id);
                }
            } else if let Ok(d) = decode::<DeadLetter>(payload)
                && d.service == "lake-writer"
                && d.source.topic == self.names.rewards
                && d.source.partition == partition
            {
                dead.insert(d.source.offset);
            }
        })?;
        tracing::info!(partition, commits = pending.len(), "publishing what a previous owner did not announce");
        self.publish(partition, prefix, &pending, &shards, &dead)
    }

    fn publish(
        &mut self,
        partition: i32,
        prefix: &str,
        commits: &[Commit],
        skip_shards: &HashSet<String>,
        skip_dead: &HashSet<i64>,
    ) -> Result<(), WriterError> {
        let Some(last) = commits.last() else { return Ok(()) };
        for c in commits {
            for f in &c.added {
                let m = manifest_from_file(self.storage.as_ref(), c, &f.path, &self.names.rewards, partition)?;
                if !skip_shards.contains(&m.shard_id) {
                    self.send(&self.names.shards, &m.tenant, &encode(&m)?)?;
                }
            }
            for r in c.rejected.iter().filter(|r| !skip_dead.contains(&r.offset)) {
                let key = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).to_string();
                self.send(&self.names.dead, &key, &encode(&dead_letter_of(r, c.committed_at))?)?;
            }
        }
        let ends = self.flush_producer()?;
        let through_offset = last.offsets.get(&source_key(&self.names.rewards, partition)).map(|r| r.1);
        self.write_marker(prefix, &PublishedMarker { through_seq: Some(last.seq), through_offset, ends })
    }

    /// Buffers one record of an owned partition.
    fn handle(
        &mut self,
        consumer: &BaseConsumer<RebalanceContext>,
        msg: &BorrowedMessage<'_>,
    ) -> Result<(), WriterError> {
        let (partition, offset, limits) = (msg.partition(), msg.offset(), self.limits());
        let Some(state) = self.parts.get_mut(&partition) else {
            return Ok(()); // not ours (revoked meanwhile)
        };
        let timestamp = msg.timestamp().to_millis().unwrap_or_else(flywheel_core::now_millis);
        match state.arrive(offset, msg.key(), msg.payload(), timestamp, &limits) {
            Arrival::AlreadyCommitted | Arrival::Buffered { roll: None } => Ok(()),
            Arrival::Buffered { roll: Some(reason) } => self.flush(partition, reason),
            Arrival::Gap { expected } => {
                tracing::warn!(partition, expected, got = offset, "offset gap; seeking back");
                if let Err(e) =
                    consumer.seek(&self.names.rewards, partition, Offset::Offset(expected), Duration::from_secs(10))
                {
                    tracing::warn!(partition, error = %e, "seek failed");
                }
                Ok(())
            }
        }
    }

    /// Commits partitions whose buffer is old or idle, and the largest one
    /// while all buffers together exceed the memory cap.
    fn flush_due(&mut self) -> Result<(), WriterError> {
        let limits = self.limits();
        for (p, reason) in due(&self.parts, &limits, Instant::now()) {
            self.flush(p, reason)?;
        }
        loop {
            self.metrics.buffered_bytes.set(self.parts.values().map(|s| s.buffer.bytes() as i64).sum());
            self.metrics.buffered_records.set(self.parts.values().map(|s| s.buffer.len() as i64).sum());
            let Some(largest) = over_memory_cap(&self.parts, &limits) else { return Ok(()) };
            self.flush(largest, "memory")?;
        }
    }

    fn limits(&self) -> RollLimits {
        RollLimits {
            max_rows: self.config.roll_max_rows,
            max_bytes: self.config.roll_max_bytes,
            max_age: Duration::from_millis(self.config.roll_max_age_ms),
            idle: Duration::from_millis(self.config.roll_idle_ms),
            max_buffered_bytes: self.config.max_buffered_bytes,
        }
    }

    /// Commits one partition's buffer and announces it.
    fn flush(&mut self, partition: i32, reason: &str) -> Result<(), WriterError> {
        let Some(state) = self.parts.get_mut(&partition) else { return Ok(()) };
        let Some(range) = state.buffer.range() else { return Ok(()) };
        let started = Instant::now();
        let buffer = std::mem::take(&mut state.buffer);
        let previous = state.previous;
        let ctx = ShardContext {
            topic: &self.names.rewards,
            partition,
            lake_url: &self.lake_url,
            settings: &self.settings,
            schemas: &self.schemas,
        };
        let prepared = prepare(&ctx, &buffer, &state.recent)?;
        let (files, mut manifests): (Vec<_>, Vec<_>) =
            prepared.files.into_iter().map(|PreparedFile { file, manifest }| (file, manifest)).unzip();
        let rows: u64 = files.iter().map(|f| f.rows).sum();
        let now = flywheel_core::now_millis();
        let rejected = prepared.rejected;
        let result = {
            let mut lake = self.lake.lock().unwrap_or_else(|p| p.into_inner());
            let topic = &self.names.rewards;
            let c = PartitionCommit { topic, partition, previous, range, files, rejected, committed_at: now };
            lake.commit_partition(c)
        };
        let commit = match result {
            Ok(c) => c,
            Err(LakeError::Conflict(why)) => {
                self.metrics.conflicts.inc();
                tracing::warn!(partition, %why, "another writer committed this partition; dropping the buffer");
                self.parts.remove(&partition);
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let state = self.parts.get_mut(&partition).expect("present above");
        state.previous = Some(range.1);
        for id in prepared.written {
            state.recent.insert(id);
        }
        self.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
        self.metrics.flushes.get_or_create(&ReasonLabels { reason: reason.into() }).inc();
        self.metrics.commits.inc();
        self.metrics.count("written", rows);
        self.metrics.count("replay", prepared.replays);
        self.metrics.count("rejected", commit.rejected.len() as u64);
        for (m, f) in manifests.iter_mut().zip(&commit.added) {
            m.commit_seq = commit.seq as i64;
            m.committed_at = commit.committed_at;
            m.content_sha256 = f.sha256.clone();
            m.bytes = f.bytes as i64;
            self.metrics.files.inc();
            self.metrics.file_bytes.inc_by(f.bytes);
        }
        let visible = flywheel_core::now_millis();
        for t in buffer.timestamps() {
            self.metrics.visible_latency.observe((visible - t).max(0) as f64 / 1000.0);
        }
        for m in &manifests {
            self.send(&self.names.shards, &m.tenant, &encode(m)?)?;
        }
        for r in &commit.rejected {
            let key = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).to_string();
            self.send(&self.names.dead, &key, &encode(&dead_letter_of(r, commit.committed_at))?)?;
        }
        let ends = self.flush_producer()?;
        let prefix = file_prefix(&self.names.rewards, partition)?;
        let marker = PublishedMarker { through_seq: Some(commit.seq), through_offset: Some(range.1), ends };
        self.write_marker(&prefix, &marker)?;
        tracing::debug!(partition, reason, rows, files = commit.added.len(), seq = commit.seq, took = ?started.elapsed(), "committed");
        Ok(())
    }
}

/// Runs the lake writer until `shutdown`, then commits what it buffered.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), WriterError> {
    config.check()?;
    let topics_config = config.common.topics.load()?;
    let mut harness = ServiceHarness::new("lake-writer", &config.common.service);
    let metrics = Metrics::register(harness.registry());
    let readiness = harness.readiness();
    readiness.set("consuming", false);
    let names = Names {
        rewards: topics_config.name(Topic::Rewards),
        shards: topics_config.name(Topic::Shards),
        dead: topics_config.name(Topic::DeadLetters),
    };
    // A partition's owner moves its group offset at each commit, at least
    // every --roll-max-age-ms while records wait, and mirrors it within a second.
    let progress_every = Duration::from_millis(config.roll_max_age_ms) + Duration::from_secs(2);
    let stall = stall_after(config.common.kafka.session_timeout_ms, progress_every);
    let leave_limit = group_leave_limit(config.common.kafka.session_timeout_ms, config.common.service.drain_timeout());
    let mut watch = GroupWatch::new(
        &names.rewards,
        stall,
        readiness.clone(),
        harness.registry().sub_registry_with_prefix("lake_writer"),
    );
    let runtime = tokio::runtime::Handle::current();
    harness
        .run_blocking(shutdown, move |loop_shutdown| -> Result<(), WriterError> {
            let storage = open_storage(&config.lake_root, runtime.clone())?;
            let schemas = RewardSchemas::released()?;
            let lake = Arc::new(Mutex::new(Lake::create_or_open(storage.clone(), runtime, &schemas.file_schema()?)?));
            let producer = config.common.kafka.tracked_producer()?;
            let probe = format!("{}-probe", config.group_id);
            let startup_ends = topic_ends(&config.common.kafka, &probe, &[&names.shards, &names.dead])?;
            let context = RebalanceContext {
                lake: lake.clone(),
                topic: names.rewards.clone(),
                assigned: Mutex::default(),
                revoked: Mutex::default(),
                fatal: Mutex::default(),
            };
            let consumer: BaseConsumer<RebalanceContext> = config
                .common
                .kafka
                .client_config(&ClientRole::Consumer { group_id: config.group_id.clone() })?
                .set("partition.assignment.strategy", "range,roundrobin")
                .set("queued.max.messages.kbytes", "65536")
                .create_with_context(context)
                .map_err(|e| flywheel_core::Error::kafka("creating consumer", e))?;
            consumer.subscribe(&[&names.rewards]).map_err(|e| flywheel_core::Error::kafka("subscribing", e))?;
            let lake_url = storage.url();
            tracing::info!(input = %names.rewards, lake = %lake_url, group = %config.group_id, "lake writer started");
            let mut writer = Writer {
                settings: ParquetSettings { row_group_rows: config.row_group_rows, zstd_level: config.zstd_level },
                schemas,
                config,
                names,
                lake,
                storage,
                lake_url,
                producer,
                startup_ends,
                parts: HashMap::new(),
                metrics,
            };
            let (mut last_check, mut last_group_commit) = (Instant::now(), Instant::now());
            let mut mirrored: HashMap<i32, i64> = HashMap::new();
            while !loop_shutdown.is_cancelled() {
                let polled = consumer.poll(Duration::from_millis(100));
                if let Some(why) = consumer.context().fatal.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    return Err(LakeError::Io { context: "reading the table on assignment".into(), detail: why }.into());
                }
                let revoked: Vec<i32> =
                    std::mem::take(&mut *consumer.context().revoked.lock().unwrap_or_else(|p| p.into_inner()));
                for p in revoked {
                    writer.parts.remove(&p);
                }
                let assigned: Vec<i32> =
                    std::mem::take(&mut *consumer.context().assigned.lock().unwrap_or_else(|p| p.into_inner()));
                for p in assigned {
                    writer.take_over(p)?;
                }
                match polled {
                    Some(Ok(msg)) => {
                        readiness.set("consuming", true);
                        writer.handle(&consumer, &msg)?;
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "consume error"),
                    None => readiness.set("consuming", true),
                }
                if last_check.elapsed() >= Duration::from_millis(100) {
                    writer.flush_due()?;
                    last_check = Instant::now();
                }
                if last_group_commit.elapsed() >= Duration::from_secs(1) {
                    commit_group_offsets(&consumer, &writer, &mut mirrored);
                    last_group_commit = Instant::now();
                }
                watch.tick(&consumer);
            }
            let owned: Vec<i32> = writer.parts.keys().copied().collect();
            for p in owned {
                writer.flush(p, "shutdown")?;
            }
            commit_group_offsets(&consumer, &writer, &mut mirrored);
            tracing::info!("lake writer committed its buffers; leaving the group");
            leave_group(consumer, leave_limit);
            Ok(())
        })
        .await
}

/// Mirrors the commit log's offsets into the consumer group, so lag
/// dashboards work (and other members see this one make progress: see
/// [`GroupWatch`]); never read back. `mirrored` holds what was sent last,
/// so an unchanged offset is not sent again.
fn commit_group_offsets(consumer: &BaseConsumer<RebalanceContext>, writer: &Writer, mirrored: &mut HashMap<i32, i64>) {
    let mut tpl = TopicPartitionList::new();
    for (p, s) in &writer.parts {
        if let Some(prev) = s.previous
            && mirrored.insert(*p, prev + 1) != Some(prev + 1)
        {
            let _ = tpl.add_partition_offset(&writer.names.rewards, *p, Offset::Offset(prev + 1));
        }
    }
    if tpl.count() > 0
        && let Err(e) = consumer.commit(&tpl, CommitMode::Async)
    {
        tracing::debug!(error = %e, "committing group offsets failed (monitoring only)");
    }
}
