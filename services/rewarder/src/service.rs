//! The rewarder service: consumes `interactions` in a consumer group, runs one
//! [`PartitionJoiner`] per assigned partition and produces rewards, late
//! events and dead letters, exactly once without Kafka transactions.
//!
//! Exactly-once, per input partition:
//! 1. Processing is deterministic (see [`crate::join`]).
//! 2. A checkpoint is taken only after the producer has flushed, so every
//!    output of the records before it is durable. It holds the join state,
//!    the next input offset and the end offsets of the output topics at that
//!    moment, and is written atomically: in a local directory as a temp
//!    file, fsynced and renamed into place; in an object store as one PUT of
//!    the whole checkpoint, which the store makes visible whole or not at
//!    all. The group offset is committed after it, for monitoring only.
//! 3. On (re)assignment a partition resumes from its checkpoint. Outputs of
//!    records after the checkpoint may already be in the output topics (the
//!    process died before the next checkpoint): they are read back from the
//!    recorded end offsets and the replay skips re-producing them. The replay
//!    regenerates identical records, so skipping by id is exact. A partition
//!    seen for the first time gets a checkpoint before its first output, so
//!    "no checkpoint" means "no outputs" and needs no read-back. A checkpoint
//!    taken while such a replay is still under way carries the ids not yet
//!    regenerated, because its read-back start lies past them.
//! 4. On revocation the partition is checkpointed before it is released, so
//!    the next owner resumes without a gap or a repeat.
//!
//! Resuming a partition (reading its checkpoint and the outputs back) runs
//! on a thread of its own while the partition is paused: the poll loop goes
//! on serving the other partitions and the group, so a long read-back never
//! makes the consumer miss `max.poll.interval.ms` and drop out of its group.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clap::Parser;
use flywheel_core::codec::{decode, encode};
use flywheel_core::kafka::{
    ClientRole, DeliveryTracker, GroupWatch, KafkaArgs, TopicOffsets, read_back, stall_after, topic_ends,
};
use flywheel_core::records::{DeadLetter, Interaction, Reward, RewardMetrics, SourcePosition};
use flywheel_core::runtime::{CommonArgs, ServiceHarness};
use flywheel_core::topics::Topic;
use flywheel_lake::store::{LocalStore, Storage, open_storage};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::join::{Emitted, JoinConfig, JoinState, PartitionJoiner};
use crate::reward_fn::RewardFunction;
use crate::window_metrics::metrics_record_id;

/// The rewarder's errors.
#[derive(Debug, thiserror::Error)]
pub enum RewarderError {
    /// From the core library.
    #[error(transparent)]
    Core(#[from] flywheel_core::Error),
    /// Bad configuration.
    #[error("configuration error: {0}")]
    Config(String),
    /// A checkpoint could not be read or written.
    #[error("checkpoint {path}: {detail}")]
    Checkpoint {
        /// The checkpoint (file or object URL) or its storage.
        path: String,
        /// What failed.
        detail: String,
    },
    /// The broker did not acknowledge outputs; the service stops so a restart
    /// resumes from the last checkpoint.
    #[error("outputs not acknowledged: {0}")]
    Delivery(String),
}

/// Rewarder configuration; every flag has an environment variable.
#[derive(Debug, Clone, Parser)]
#[command(name = "flywheel-rewarder", version, about = "Turns interaction events into rewards")]
pub struct Config {
    /// Service, Kafka and topic flags every service has.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Consumer group; instances in one group share the partitions.
    #[arg(long = "group-id", env = "FLYWHEEL_REWARDER_GROUP_ID", default_value = "flywheel-rewarder")]
    pub group_id: String,
    /// Reward function TOML; the built-in Cursor-style defaults when absent.
    #[arg(long = "reward-function", env = "FLYWHEEL_REWARD_FUNCTION")]
    pub reward_function: Option<PathBuf>,
    /// Event-time window after a suggestion is shown in which signals count.
    #[arg(long = "outcome-window-ms", env = "FLYWHEEL_REWARDER_OUTCOME_WINDOW_MS", default_value_t = 600_000)]
    pub outcome_window_ms: i64,
    /// Extra event-time wait for out-of-order events.
    #[arg(long = "allowed-lateness-ms", env = "FLYWHEEL_REWARDER_ALLOWED_LATENESS_MS", default_value_t = 60_000)]
    pub allowed_lateness_ms: i64,
    /// Most open suggestions per partition before the oldest are closed early.
    #[arg(long = "max-open-suggestions", env = "FLYWHEEL_REWARDER_MAX_OPEN_SUGGESTIONS", default_value_t = 1_000_000)]
    pub max_open_suggestions: usize,
    /// Directory for checkpoints, when no --checkpoint-store is given. Every
    /// instance that may take over a partition must see it (one host, or a
    /// shared volume).
    #[arg(long = "checkpoint-dir", env = "FLYWHEEL_REWARDER_CHECKPOINT_DIR", default_value = ".flywheel/rewarder")]
    pub checkpoint_dir: PathBuf,
    /// Keep checkpoints in this store instead of --checkpoint-dir, so an
    /// instance on any host can take over any partition. Opened like the lake
    /// writer's --lake-root: `s3://bucket/prefix`, `gs://…`, `az://…`
    /// (credentials and endpoint from the object_store environment
    /// variables), `file:///dir`, or `memory://name` (in this
    /// process only: instances of one process that name it share it).
    #[arg(long = "checkpoint-store", env = "FLYWHEEL_REWARDER_CHECKPOINT_STORE")]
    pub checkpoint_store: Option<String>,
    /// Checkpoint after this many records of a partition. Each checkpoint
    /// waits for every output to be acknowledged, so this trades throughput
    /// (BENCHMARKS.md) against how much a restart replays.
    #[arg(
        long = "checkpoint-every-records",
        env = "FLYWHEEL_REWARDER_CHECKPOINT_EVERY_RECORDS",
        default_value_t = 50_000
    )]
    pub checkpoint_every_records: u64,
    /// Checkpoint at least this often (milliseconds) while records flow.
    #[arg(long = "checkpoint-every-ms", env = "FLYWHEEL_REWARDER_CHECKPOINT_EVERY_MS", default_value_t = 5_000)]
    pub checkpoint_every_ms: u64,
    /// Off by default. When set, a partition that received no record for this
    /// many milliseconds has its watermark advanced to wall-clock time minus
    /// this delay, so quiet partitions still close windows. The trade-off:
    /// outputs then depend on when records arrived, so a replay after a crash
    /// may close windows at other points (rewards are still never duplicated:
    /// read-back skips by id).
    #[arg(long = "idle-advance-after-ms", env = "FLYWHEEL_REWARDER_IDLE_ADVANCE_AFTER_MS")]
    pub idle_advance_after_ms: Option<u64>,
    /// Lengths (milliseconds) of the tumbling event-time windows of the
    /// rolling metrics, comma-separated; published to `reward-metrics` and
    /// exposed on /metrics.
    #[arg(
        long = "metrics-windows-ms",
        env = "FLYWHEEL_REWARDER_METRICS_WINDOWS_MS",
        value_delimiter = ',',
        default_value = "60000,3600000"
    )]
    pub metrics_windows_ms: Vec<i64>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

/// Labels of the per-version window gauges.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    tenant: String,
    model_id: String,
    adapter_version: String,
    experiment_arm: String,
    surface: String,
    window: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Gauges of the latest published window per version and window length,
/// merged over this instance's partitions.
#[derive(Debug, Clone, Default)]
struct WindowGauges {
    window_end: Family<VersionLabels, FloatGauge>,
    shown: Family<VersionLabels, FloatGauge>,
    accept_rate: Family<VersionLabels, FloatGauge>,
    accept_rate_low: Family<VersionLabels, FloatGauge>,
    accept_rate_high: Family<VersionLabels, FloatGauge>,
    mean_reward: Family<VersionLabels, FloatGauge>,
    mean_edit_distance: Family<VersionLabels, FloatGauge>,
    time_to_accept_p50: Family<VersionLabels, FloatGauge>,
    latest: Arc<Mutex<HashMap<VersionLabels, RewardMetrics>>>,
}

impl WindowGauges {
    fn register(&self, r: &mut Registry) {
        let families = [
            (
                "window_end_seconds",
                "End of the latest published metrics window (event time, Unix seconds)",
                &self.window_end,
            ),
            ("window_shown", "Suggestions shown in the latest window", &self.shown),
            ("window_accept_rate", "Accepted / shown in the latest window", &self.accept_rate),
            (
                "window_accept_rate_wilson_low",
                "Lower end of the Wilson 95% interval of the accept rate",
                &self.accept_rate_low,
            ),
            (
                "window_accept_rate_wilson_high",
                "Upper end of the Wilson 95% interval of the accept rate",
                &self.accept_rate_high,
            ),
            ("window_mean_reward", "Mean reward per shown suggestion in the latest window", &self.mean_reward),
            (
                "window_mean_edit_distance",
                "Mean edit distance after accept in the latest window (characters)",
                &self.mean_edit_distance,
            ),
            (
                "window_time_to_accept_p50_seconds",
                "Exact median time to accept in the latest window",
                &self.time_to_accept_p50,
            ),
        ];
        for (name, help, family) in families {
            r.register(name, help, family.clone());
        }
    }

    /// Folds a published record in: a newer window replaces the shown one, the
    /// same window (another partition, or a late delta) is added to it.
    fn observe(&self, m: &RewardMetrics) {
        let labels = VersionLabels {
            tenant: m.tenant.clone(),
            model_id: m.model_id.clone(),
            adapter_version: m.adapter_version.clone().unwrap_or_default(),
            experiment_arm: m.experiment_arm.clone().unwrap_or_default(),
            surface: m.surface.clone().unwrap_or_default(),
            window: format!("{}s", (m.window_end - m.window_start) / 1000),
        };
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        let shown = match latest.get_mut(&labels) {
            Some(cur) if cur.window_start == m.window_start => {
                cur.absorb(m);
                cur.clone()
            }
            Some(cur) if cur.window_start > m.window_start => return,
            _ => {
                latest.insert(labels.clone(), m.clone());
                m.clone()
            }
        };
        drop(latest);
        let set = |f: &Family<VersionLabels, FloatGauge>, v: Option<f64>| {
            f.get_or_create(&labels).set(v.unwrap_or(f64::NAN));
        };
        set(&self.window_end, Some(shown.window_end as f64 / 1000.0));
        set(&self.shown, Some(shown.shown as f64));
        set(&self.accept_rate, shown.accept_rate());
        let wilson = shown.accept_rate_wilson_95();
        set(&self.accept_rate_low, wilson.map(|w| w.0));
        set(&self.accept_rate_high, wilson.map(|w| w.1));
        set(&self.mean_reward, shown.mean_reward());
        set(&self.mean_edit_distance, shown.mean_edit_distance());
        set(&self.time_to_accept_p50, shown.p50_time_to_accept_ms().map(|t| t as f64 / 1000.0));
    }
}

#[derive(Debug, Clone)]
struct Metrics {
    records: Family<ResultLabels, Counter>,
    open: Gauge,
    checkpoints: Counter,
    windows_published: Counter,
    windows: WindowGauges,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            records: Family::default(),
            open: Gauge::default(),
            checkpoints: Counter::default(),
            windows_published: Counter::default(),
            windows: WindowGauges::default(),
        };
        let r = registry.sub_registry_with_prefix("rewarder");
        r.register("records", "Input records by result", m.records.clone());
        r.register("open_suggestions", "Suggestions waiting for their window to close", m.open.clone());
        r.register("checkpoints", "Checkpoints written", m.checkpoints.clone());
        r.register("metrics_windows_published", "Reward metrics records published", m.windows_published.clone());
        m.windows.register(r);
        m
    }

    fn count(&self, result: &str, n: u64) {
        if n > 0 {
            self.records.get_or_create(&ResultLabels { result: result.into() }).inc_by(n);
        }
    }
}

/// What a checkpoint file holds.
#[derive(Debug, Serialize, Deserialize)]
struct Checkpoint {
    next_offset: i64,
    reward_fn_version: String,
    /// Output topic → partition → end offset when the checkpoint was taken.
    output_ends: TopicOffsets,
    state: JoinState,
    /// Outputs a previous owner wrote after an earlier checkpoint that the
    /// replay had not regenerated yet when this one was taken: they lie before
    /// `output_ends`, so the next owner's read-back cannot find them. Each
    /// with the input offset whose processing emits it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    skip: Vec<(String, i64)>,
}

/// Kafka header on every output: `<input topic>/<partition>/<offset>` of the
/// input record it derives from (a late event's or orphan's own record, the
/// record that closed a reward or a metrics window). Late events carry no
/// lineage in their body, so this is how a read-back tells which partition
/// wrote them, and which of several copies of one event it is.
pub const SOURCE_HEADER: &str = "flywheel-source";

/// Kafka header on every output: the input offset whose processing emitted
/// it. A replay regenerates the output while processing that offset.
pub const EMITTED_AT_HEADER: &str = "flywheel-emitted-at";

/// Where an output came from: its input partition, the input record it
/// derives from, and the offset whose processing emitted it.
#[derive(Debug, Clone, Copy)]
struct Source {
    partition: i32,
    record: i64,
    emitted_at: i64,
}

struct PartitionWork {
    joiner: PartitionJoiner,
    next_offset: i64,
    since_checkpoint: u64,
    last_record_at: Instant,
    /// Outputs already written by a previous run after the checkpoint, with
    /// the input offset whose processing emits each.
    already_written: HashMap<String, i64>,
}

struct Topics {
    input: String,
    rewards: String,
    late: String,
    dead: String,
    metrics: String,
}

/// Everything the poll loop and the rebalance callback share.
struct Core {
    topics: Topics,
    join: JoinConfig,
    reward_fn: RewardFunction,
    /// Where checkpoints live; paths below it are [`checkpoint_path`]s.
    checkpoints: Arc<dyn Storage>,
    group_id: String,
    producer: ThreadedProducer<DeliveryTracker>,
    partitions: Mutex<HashMap<i32, PartitionWork>>,
    /// Partitions being resumed on a thread: the attempt's number and the
    /// first offset to fetch again once resumed.
    resuming: Mutex<HashMap<i32, (u64, i64)>>,
    metrics: Metrics,
    kafka: KafkaArgs,
    /// End offsets of the output topics when this process started.
    startup_ends: TopicOffsets,
    /// Outputs are a function of the input alone (no idle advance), so an
    /// id not regenerated by the time its emitting offset is processed never
    /// will be (a reward function change renames rewards) and can be forgotten.
    deterministic: bool,
}

struct RebalanceContext {
    core: Arc<Core>,
}

impl ClientContext for RebalanceContext {}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(?revoked, "partitions revoked; checkpointing them before release");
            if let Err(e) = self.core.checkpoint(&revoked, Some(consumer)) {
                // The next owner resumes from the previous checkpoint and
                // skips what this instance already wrote: nothing is lost.
                tracing::error!(error = %e, "checkpoint on revoke failed");
            }
            let mut parts = self.core.partitions.lock().unwrap_or_else(|p| p.into_inner());
            let mut resuming = self.core.resuming.lock().unwrap_or_else(|p| p.into_inner());
            for p in revoked {
                parts.remove(&p);
                resuming.remove(&p); // a resume still running is discarded when it ends
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // A partition paused for a resume that a rebalance overtook must not
        // stay paused when it is assigned again.
        if let Rebalance::Assign(tpl) = rebalance
            && let Err(e) = consumer.resume(tpl)
        {
            tracing::warn!(error = %e, "resuming newly assigned partitions failed");
        }
    }
}

/// A partition's resume, finished on its thread: (partition, attempt, work).
type Resumed = (i32, u64, Result<PartitionWork, RewarderError>);

/// Starts resuming `partition` on a thread unless that is under way: the
/// partition is paused, and fetched again from `offset` once resumed.
fn start_resume(
    core: &Arc<Core>,
    consumer: &BaseConsumer<RebalanceContext>,
    partition: i32,
    offset: i64,
    attempts: &mut u64,
    done: &std::sync::mpsc::Sender<Resumed>,
) {
    let mut resuming = core.resuming.lock().unwrap_or_else(|p| p.into_inner());
    if resuming.contains_key(&partition) {
        return; // its records come again after the seek
    }
    *attempts += 1;
    resuming.insert(partition, (*attempts, offset));
    drop(resuming);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&core.topics.input, partition);
    if let Err(e) = consumer.pause(&tpl) {
        tracing::warn!(partition, error = %e, "pausing a partition while it resumes failed");
    }
    let (core, done, attempt) = (core.clone(), done.clone(), *attempts);
    std::thread::spawn(move || {
        let _ = done.send((partition, attempt, core.resume(partition)));
    });
}

/// Takes in a finished resume if its partition is still ours and waiting for
/// it: the partition is fetched again from its first unprocessed record.
fn finish_resume(
    core: &Core,
    consumer: &BaseConsumer<RebalanceContext>,
    (partition, attempt, work): Resumed,
) -> Result<(), RewarderError> {
    let mut resuming = core.resuming.lock().unwrap_or_else(|p| p.into_inner());
    let Some((current, offset)) = resuming.get(&partition).copied() else { return Ok(()) };
    if current != attempt {
        return Ok(()); // revoked and assigned again meanwhile: a newer resume runs
    }
    resuming.remove(&partition);
    core.partitions.lock().unwrap_or_else(|p| p.into_inner()).insert(partition, work?);
    drop(resuming);
    let topic = &core.topics.input;
    if let Err(e) = consumer.seek(topic, partition, Offset::Offset(offset), Duration::from_secs(10)) {
        tracing::warn!(partition, error = %e, "seeking a resumed partition failed");
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    if let Err(e) = consumer.resume(&tpl) {
        tracing::warn!(partition, error = %e, "resuming a paused partition failed");
    }
    Ok(())
}

/// A partition's checkpoint, relative to the checkpoint storage:
/// `<group>/<input topic>/<partition>.json` (the layout of the directory
/// store before object stores were supported, so existing checkpoints load).
pub fn checkpoint_path(group_id: &str, topic: &str, partition: i32) -> String {
    format!("{group_id}/{topic}/{partition}.json")
}

/// Opens the checkpoint storage `config` names: `--checkpoint-store` when
/// given, else the local `--checkpoint-dir` (created if missing). Storage
/// calls block on `runtime`: make them from blocking threads.
pub fn open_checkpoint_storage(
    config: &Config,
    runtime: tokio::runtime::Handle,
) -> Result<Arc<dyn Storage>, RewarderError> {
    let fail = |at: &str, e: flywheel_lake::LakeError| RewarderError::Checkpoint {
        path: at.to_string(),
        detail: e.to_string(),
    };
    let Some(url) = &config.checkpoint_store else {
        let dir = &config.checkpoint_dir;
        return Ok(Arc::new(LocalStore::open(dir).map_err(|e| fail(&dir.display().to_string(), e))?));
    };
    if url.starts_with("memory://") {
        // One in-memory store per URL and process, so that several instances
        // in one process (tests, trials) can hand partitions to each other.
        static MEMORY: OnceLock<Mutex<HashMap<String, Arc<dyn Storage>>>> = OnceLock::new();
        let mut stores = MEMORY.get_or_init(Mutex::default).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(store) = stores.get(url) {
            return Ok(store.clone());
        }
        let store = open_storage(url, runtime).map_err(|e| fail(url, e))?;
        stores.insert(url.clone(), store.clone());
        return Ok(store);
    }
    open_storage(url, runtime).map_err(|e| fail(url, e))
}

impl Core {
    /// Lower bounds of where outputs written from now on will land: the end
    /// offsets seen at start-up, raised by every acknowledged write.
    fn output_ends(&self) -> TopicOffsets {
        self.producer.context().ends_over(&self.startup_ends)
    }

    /// Flushes outputs, then writes a checkpoint for each partition in `which`.
    fn checkpoint(
        &self,
        which: &[i32],
        consumer: Option<&BaseConsumer<RebalanceContext>>,
    ) -> Result<(), RewarderError> {
        self.producer.flush(Duration::from_secs(30)).map_err(|e| RewarderError::Delivery(e.to_string()))?;
        if let Some(first) = self.producer.context().first_error() {
            return Err(RewarderError::Delivery(first));
        }
        let ends = self.output_ends();
        let mut parts = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        let mut offsets = TopicPartitionList::new();
        for p in which {
            let Some(work) = parts.get_mut(p) else { continue };
            if self.deterministic {
                let next = work.next_offset;
                work.already_written.retain(|_, emitted_at| *emitted_at >= next);
            }
            let mut skip: Vec<(String, i64)> = work.already_written.iter().map(|(id, o)| (id.clone(), *o)).collect();
            skip.sort();
            let checkpoint = Checkpoint {
                next_offset: work.next_offset,
                reward_fn_version: work.joiner.reward_fn_version().to_string(),
                output_ends: ends.clone(),
                state: work.joiner.state().clone(),
                skip,
            };
            self.write_checkpoint(*p, &checkpoint)?;
            work.since_checkpoint = 0;
            self.metrics.checkpoints.inc();
            let _ = offsets.add_partition_offset(&self.topics.input, *p, Offset::Offset(work.next_offset));
        }
        drop(parts);
        if let Some(c) = consumer
            && offsets.count() > 0
            && let Err(e) = c.commit(&offsets, rdkafka::consumer::CommitMode::Async)
        {
            tracing::warn!(error = %e, "committing group offsets failed (monitoring only)");
        }
        Ok(())
    }

    /// Loads a partition's checkpoint (or starts empty) and collects what a
    /// previous run already wrote after it.
    fn resume(&self, partition: i32) -> Result<PartitionWork, RewarderError> {
        let path = checkpoint_path(&self.group_id, &self.topics.input, partition);
        let fail = |detail: String| RewarderError::Checkpoint { path: self.checkpoint_url(&path), detail };
        let checkpoint: Option<Checkpoint> = match self.checkpoints.get(&path).map_err(|e| fail(e.to_string()))? {
            Some(bytes) => Some(parse_checkpoint(&bytes).map_err(|e| fail(e.to_string()))?),
            None => None,
        };
        let Some(cp) = checkpoint else {
            // Every owner writes a partition's first checkpoint before any
            // output of it, so a partition without one has no outputs to read
            // back. Writing it now keeps that true for the next owner.
            let joiner = PartitionJoiner::new(&self.topics.input, partition, self.join.clone(), self.reward_fn.clone());
            let initial = Checkpoint {
                next_offset: 0,
                reward_fn_version: self.reward_fn.version.clone(),
                output_ends: self.output_ends(),
                state: joiner.state().clone(),
                skip: Vec::new(),
            };
            self.write_checkpoint(partition, &initial)?;
            tracing::info!(partition, "no checkpoint; starting from the beginning of the partition");
            return Ok(PartitionWork {
                joiner,
                next_offset: 0,
                since_checkpoint: 0,
                last_record_at: Instant::now(),
                already_written: HashMap::new(),
            });
        };
        if cp.reward_fn_version != self.reward_fn.version {
            tracing::warn!(
                partition,
                checkpoint = %cp.reward_fn_version,
                now = %self.reward_fn.version,
                "reward function changed since the checkpoint; open suggestions close under the new one"
            );
        }
        let started = Instant::now();
        let mut already_written = self.written_since(partition, &cp.output_ends)?;
        tracing::info!(partition, took = ?started.elapsed(), "read back outputs written after the checkpoint");
        let carried = cp.skip.len();
        already_written.extend(cp.skip);
        tracing::info!(
            partition,
            next_offset = cp.next_offset,
            skip = already_written.len(),
            carried,
            "resumed from checkpoint"
        );
        Ok(PartitionWork {
            joiner: PartitionJoiner::restore(
                &self.topics.input,
                partition,
                self.join.clone(),
                self.reward_fn.clone(),
                cp.state,
            ),
            next_offset: cp.next_offset,
            since_checkpoint: 0,
            last_record_at: Instant::now(),
            already_written,
        })
    }

    /// Output ids written for `partition` after the given end offsets, each
    /// with the input offset whose processing emitted it.
    fn written_since(&self, partition: i32, ends: &TopicOffsets) -> Result<HashMap<String, i64>, RewarderError> {
        let topics =
            [&self.topics.rewards, &self.topics.late, &self.topics.dead, &self.topics.metrics].map(String::as_str);
        let (mut seen, mut unplaced) = (HashMap::new(), Vec::new());
        read_back(&self.kafka, "flywheel-rewarder-readback", &topics, ends, Duration::from_secs(60), |msg| match self
            .output_id_for(msg.topic(), msg, partition)
        {
            Some((id, Some(at))) => _ = seen.insert(id, at),
            Some((id, None)) => unplaced.push(id),
            None => {}
        })?;
        // Late events and dead letters of releases before the source header
        // say neither partition nor emitting offset: kept as skips until the
        // replay passes the furthest offset known to have emitted an output.
        let horizon = seen.values().copied().max().unwrap_or(i64::MAX);
        for id in unplaced {
            seen.entry(id).or_insert(horizon);
        }
        Ok(seen)
    }

    /// The id of an output record if it was produced for input `partition`,
    /// and the input offset that emitted it when known.
    fn output_id_for(&self, topic: &str, msg: &BorrowedMessage<'_>, partition: i32) -> Option<(String, Option<i64>)> {
        let payload = msg.payload()?;
        let header = |name: &str| {
            let value = msg.headers()?.iter().find(|h| h.key == name)?.value?;
            std::str::from_utf8(value).ok().map(str::to_string)
        };
        let source = header(SOURCE_HEADER).and_then(|v| {
            let (rest, offset) = v.rsplit_once('/')?;
            let (input, p) = rest.rsplit_once('/')?;
            Some((input.to_string(), p.parse::<i32>().ok()?, offset.parse::<i64>().ok()?))
        });
        if let Some((input, p, _)) = &source
            && (*input != self.topics.input || *p != partition)
        {
            return None;
        }
        let emitted_at = header(EMITTED_AT_HEADER).and_then(|v| v.parse::<i64>().ok());
        if topic == self.topics.rewards {
            let r: Reward = decode(payload).ok()?;
            (r.lineage.topic == self.topics.input && r.lineage.partition == partition)
                .then(|| (format!("r:{}", r.reward_id), Some(r.lineage.last_offset)))
        } else if topic == self.topics.late {
            let e: Interaction = decode(payload).ok()?;
            // Several copies of one event can each be late: the input offset
            // tells them apart (releases before the header: the event id).
            let id = source.map_or_else(|| format!("l:{}", e.event_id), |(_, _, record)| format!("l:@{record}"));
            Some((id, emitted_at))
        } else if topic == self.topics.metrics {
            let m: RewardMetrics = decode(payload).ok()?;
            (m.source_partition == partition).then(|| (metrics_record_id(&m), Some(m.emitted_at_offset)))
        } else {
            let d: DeadLetter = decode(payload).ok()?;
            (d.service == "rewarder" && d.source.topic == self.topics.input && d.source.partition == partition)
                .then(|| (format!("d:{}", d.source.offset), emitted_at))
        }
    }

    /// Sends one output tagged with where it came from ([`SOURCE_HEADER`],
    /// [`EMITTED_AT_HEADER`]), waiting while the producer's queue is full.
    fn send(&self, topic: &str, key: &str, value: &[u8], source: Source) -> Result<(), RewarderError> {
        let tag = format!("{}/{}/{}", self.topics.input, source.partition, source.record);
        let at = source.emitted_at.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: SOURCE_HEADER, value: Some(&tag) })
            .insert(Header { key: EMITTED_AT_HEADER, value: Some(&at) });
        let mut record = BaseRecord::to(topic).key(key).payload(value).headers(headers);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(RewarderError::Delivery(format!("producing to {topic}: {e}"))),
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn dead_letter(
        &self,
        partition: i32,
        offset: i64,
        emitted_at: i64,
        code: &str,
        reason: String,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<(), RewarderError> {
        let dl = DeadLetter {
            service: "rewarder".into(),
            reason_code: code.into(),
            reason,
            source: SourcePosition { topic: self.topics.input.clone(), partition, offset },
            original_key: key.map(<[u8]>::to_vec),
            original_value: value.map(<[u8]>::to_vec),
            failed_at: flywheel_core::now_millis(),
        };
        let bytes = encode(&dl)?;
        let source = Source { partition, record: offset, emitted_at };
        self.send(&self.topics.dead, &String::from_utf8_lossy(key.unwrap_or_default()), &bytes, source)
    }

    /// Processes one input record of a resumed partition; false when the
    /// partition has not been resumed (nothing was done).
    fn handle(&self, msg: &BorrowedMessage<'_>) -> Result<bool, RewarderError> {
        let (partition, offset) = (msg.partition(), msg.offset());
        let mut parts = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        let Some(work) = parts.get_mut(&partition) else { return Ok(false) };
        if offset < work.next_offset {
            return Ok(true); // before the checkpoint: already processed
        }
        work.next_offset = offset + 1;
        work.since_checkpoint += 1;
        let event: Interaction = match msg.payload().map(decode::<Interaction>) {
            Some(Ok(e)) => e,
            Some(Err(e)) => {
                self.metrics.count("malformed", 1);
                if work.already_written.remove(&format!("d:{offset}")).is_none() {
                    let reason = e.to_string();
                    self.dead_letter(partition, offset, offset, e.reason_code(), reason, msg.key(), msg.payload())?;
                }
                return Ok(true);
            }
            None => {
                self.metrics.count("malformed", 1);
                if work.already_written.remove(&format!("d:{offset}")).is_none() {
                    let reason = "record has no value".to_string();
                    self.dead_letter(partition, offset, offset, "empty_value", reason, msg.key(), None)?;
                }
                return Ok(true);
            }
        };
        work.last_record_at = Instant::now();
        let before = work.joiner.counters();
        let mut out = Vec::new();
        work.joiner.process(offset, event, &mut out);
        let after = work.joiner.counters();
        self.metrics.count("processed", 1);
        self.metrics.count("duplicate", after.duplicates - before.duplicates);
        self.metrics.count("closed_early", after.closed_early - before.closed_early);
        self.emit(partition, offset, work, out)?;
        self.metrics.open.set(parts.values().map(|w| w.joiner.open_suggestions() as i64).sum());
        Ok(true)
    }
}

impl Core {
    /// Produces what the joiner emitted while processing input offset `at`,
    /// skipping what a previous owner already wrote.
    fn emit(&self, partition: i32, at: i64, work: &mut PartitionWork, out: Vec<Emitted>) -> Result<(), RewarderError> {
        let source = |record: i64| Source { partition, record, emitted_at: at };
        for emitted in out {
            match emitted {
                Emitted::Reward(r) => {
                    self.metrics.count("reward", 1);
                    if work.already_written.remove(&format!("r:{}", r.reward_id)).is_none() {
                        let from = source(r.lineage.last_offset);
                        self.send(&self.topics.rewards, &r.suggestion_id, &encode(r.as_ref())?, from)?;
                    }
                }
                Emitted::Late { offset: o, event } => {
                    self.metrics.count("late", 1);
                    let written = work.already_written.remove(&format!("l:@{o}"));
                    // A predecessor of the release before the source header named it by event id.
                    if written.or_else(|| work.already_written.remove(&format!("l:{}", event.event_id))).is_none() {
                        self.send(&self.topics.late, &event.suggestion_id, &encode(event.as_ref())?, source(o))?;
                    }
                }
                Emitted::Metrics(m) => {
                    self.metrics.windows_published.inc();
                    self.metrics.windows.observe(&m);
                    if work.already_written.remove(&metrics_record_id(&m)).is_none() {
                        let key =
                            format!("{}/{}/{}", m.tenant, m.model_id, m.adapter_version.as_deref().unwrap_or_default());
                        self.send(&self.topics.metrics, &key, &encode(m.as_ref())?, source(m.emitted_at_offset))?;
                    }
                }
                Emitted::Orphan { offset: o, event } => {
                    self.metrics.count("orphan", 1);
                    if work.already_written.remove(&format!("d:{o}")).is_none() {
                        let bytes = encode(event.as_ref())?;
                        let reason = format!(
                            "no suggestion_shown for suggestion {} within its window; event {} dropped from rewards",
                            event.suggestion_id, event.event_id
                        );
                        self.dead_letter(
                            partition,
                            o,
                            at,
                            "orphan_event",
                            reason,
                            Some(event.suggestion_id.as_bytes()),
                            Some(&bytes),
                        )?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Advances the watermark of partitions idle for longer than `idle`.
    fn advance_idle(&self, idle: Duration) -> Result<(), RewarderError> {
        let mut parts = self.partitions.lock().unwrap_or_else(|p| p.into_inner());
        let now = flywheel_core::now_millis();
        for (partition, work) in parts.iter_mut() {
            if work.last_record_at.elapsed() < idle || work.joiner.open_suggestions() == 0 {
                continue;
            }
            let mut out = Vec::new();
            let target = now - idle.as_millis() as i64;
            work.joiner.advance_to(target, work.next_offset - 1, &mut out);
            if !out.is_empty() {
                work.since_checkpoint += 1;
                let at = work.next_offset - 1;
                self.emit(*partition, at, work, out)?;
            }
        }
        Ok(())
    }
}

/// Parses a checkpoint, migrating the join state of older releases.
fn parse_checkpoint(bytes: &[u8]) -> Result<Checkpoint, serde_json::Error> {
    let mut value: serde_json::Value = serde_json::from_slice(bytes)?;
    if let Some(state) = value.get_mut("state").map(serde_json::Value::take)
        && let Some(migrated) = JoinState::migrate_json(state)
    {
        value["state"] = migrated;
    }
    serde_json::from_value(value)
}

impl Core {
    /// Where a checkpoint path lies, for messages.
    fn checkpoint_url(&self, path: &str) -> String {
        format!("{}/{path}", self.checkpoints.url().trim_end_matches('/'))
    }

    /// Writes a partition's checkpoint whole or not at all: the storage's
    /// `put` is a temp file, fsync, rename and directory fsync on local disk,
    /// and a single PUT of the whole object on an object store, so a reader
    /// (the next owner, after any crash) sees the previous checkpoint or this
    /// one, never part of one.
    fn write_checkpoint(&self, partition: i32, checkpoint: &Checkpoint) -> Result<(), RewarderError> {
        let path = checkpoint_path(&self.group_id, &self.topics.input, partition);
        let fail = |detail: String| RewarderError::Checkpoint { path: self.checkpoint_url(&path), detail };
        let bytes = serde_json::to_vec(checkpoint).map_err(|e| fail(e.to_string()))?;
        self.checkpoints.put(&path, &bytes).map_err(|e| fail(e.to_string()))
    }
}

/// Runs the rewarder until `shutdown`, then checkpoints and exits.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RewarderError> {
    let topics_config = config.common.topics.load()?;
    let reward_fn = match &config.reward_function {
        Some(p) => RewardFunction::load(p).map_err(|e| RewarderError::Config(e.to_string()))?,
        None => RewardFunction::default(),
    };
    if config.outcome_window_ms <= 0 || config.allowed_lateness_ms < 0 || config.max_open_suggestions == 0 {
        return Err(RewarderError::Config(
            "outcome window must be > 0, lateness >= 0 and max open suggestions >= 1".into(),
        ));
    }
    if let Some(bad) = config.metrics_windows_ms.iter().find(|w| **w < 1000) {
        return Err(RewarderError::Config(format!("metrics window {bad} ms is shorter than one second")));
    }
    let mut harness = ServiceHarness::new("rewarder", &config.common.service);
    let metrics = Metrics::register(harness.registry());
    let readiness = harness.readiness();
    readiness.set("consuming", false);
    // A partition's owner commits its group offset at every checkpoint.
    let stall = stall_after(config.common.kafka.session_timeout_ms, Duration::from_millis(config.checkpoint_every_ms));
    let input = topics_config.name(Topic::Interactions);
    let mut watch =
        GroupWatch::new(&input, stall, readiness.clone(), harness.registry().sub_registry_with_prefix("rewarder"));
    let runtime = tokio::runtime::Handle::current();
    harness
        .run_blocking(shutdown, move |loop_shutdown| -> Result<(), RewarderError> {
            let checkpoints = open_checkpoint_storage(&config, runtime)?;
            let producer = config.common.kafka.tracked_producer()?;
            let outputs = [Topic::Rewards, Topic::InteractionsLate, Topic::DeadLetters, Topic::RewardMetrics]
                .map(|t| topics_config.name(t));
            let startup_ends =
                topic_ends(&config.common.kafka, "flywheel-rewarder-probe", &outputs.each_ref().map(String::as_str))?;
            let core = Arc::new(Core {
                topics: Topics {
                    input,
                    rewards: topics_config.name(Topic::Rewards),
                    late: topics_config.name(Topic::InteractionsLate),
                    dead: topics_config.name(Topic::DeadLetters),
                    metrics: topics_config.name(Topic::RewardMetrics),
                },
                join: JoinConfig {
                    outcome_window_ms: config.outcome_window_ms,
                    allowed_lateness_ms: config.allowed_lateness_ms,
                    max_open_suggestions: config.max_open_suggestions,
                    metrics_windows_ms: config.metrics_windows_ms.clone(),
                    ..JoinConfig::default()
                },
                reward_fn,
                checkpoints,
                group_id: config.group_id.clone(),
                producer,
                partitions: Mutex::new(HashMap::new()),
                resuming: Mutex::new(HashMap::new()),
                metrics,
                kafka: config.common.kafka.clone(),
                startup_ends,
                deterministic: config.idle_advance_after_ms.is_none(),
            });
            let consumer: BaseConsumer<RebalanceContext> = config
                .common
                .kafka
                .client_config(&ClientRole::Consumer { group_id: config.group_id.clone() })?
                .create_with_context(RebalanceContext { core: core.clone() })
                .map_err(|e| flywheel_core::Error::kafka("creating consumer", e))?;
            consumer.subscribe(&[&core.topics.input]).map_err(|e| flywheel_core::Error::kafka("subscribing", e))?;
            tracing::info!(
                input = %core.topics.input,
                group = %config.group_id,
                reward_fn = %core.reward_fn.version,
                checkpoints = %core.checkpoints.url(),
                "rewarder started"
            );

            let every_records = config.checkpoint_every_records.max(1);
            let idle_advance = config.idle_advance_after_ms.map(Duration::from_millis);
            let every = Duration::from_millis(config.checkpoint_every_ms.max(100));
            let mut last_checkpoint = Instant::now();
            let (resumed_tx, resumed) = std::sync::mpsc::channel::<Resumed>();
            let mut attempts = 0u64;
            while !loop_shutdown.is_cancelled() {
                while let Ok(done) = resumed.try_recv() {
                    finish_resume(&core, &consumer, done)?;
                }
                if let Some(result) = consumer.poll(Duration::from_millis(100)) {
                    readiness.set("consuming", true);
                    match result {
                        Ok(msg) => {
                            if !core.handle(&msg)? {
                                start_resume(
                                    &core,
                                    &consumer,
                                    msg.partition(),
                                    msg.offset(),
                                    &mut attempts,
                                    &resumed_tx,
                                );
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "consume error"),
                    }
                }
                if let Some(idle) = idle_advance {
                    core.advance_idle(idle)?;
                }
                watch.tick(&consumer);
                let due: Vec<i32> = {
                    let parts = core.partitions.lock().unwrap_or_else(|p| p.into_inner());
                    let time_due = last_checkpoint.elapsed() >= every;
                    parts
                        .iter()
                        .filter(|(_, w)| w.since_checkpoint >= every_records || (time_due && w.since_checkpoint > 0))
                        .map(|(p, _)| *p)
                        .collect()
                };
                if !due.is_empty() {
                    core.checkpoint(&due, Some(&consumer))?;
                    last_checkpoint = Instant::now();
                }
            }
            let all: Vec<i32> = core.partitions.lock().unwrap_or_else(|p| p.into_inner()).keys().copied().collect();
            core.checkpoint(&all, Some(&consumer))?;
            consumer.unsubscribe();
            tracing::info!("rewarder stopped after a final checkpoint");
            Ok(())
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_of_the_release_before_fingerprinted_ids_still_load() {
        // Written by the rewarder before closed suggestion ids became fingerprints.
        let legacy = br#"{"next_offset":24,"reward_fn_version":"cursor-default-v1","output_ends":{"rewards":{"0":0,"1":1}},"state":{"open":{},"by_deadline":[],"closed":{"sugg-000042":1795424700000},"closed_by_deadline":[[1795424700000,"sugg-000042"]],"max_event_time":1795433720945,"counters":{"duplicates":0,"late":16,"orphans":0,"closed_early":0,"rewards":1}}}"#;
        let cp = parse_checkpoint(legacy).unwrap();
        assert_eq!(cp.next_offset, 24);
        let state = serde_json::to_value(&cp.state).unwrap();
        let digest = <sha2::Sha256 as sha2::Digest>::digest(b"sugg-000042");
        let fingerprint = u64::from_be_bytes(digest[..8].try_into().unwrap());
        assert_eq!(state["closed"][fingerprint.to_string()], serde_json::json!(1_795_424_700_000_i64));
        assert_eq!(state["closed_by_deadline"][0][1], serde_json::json!(fingerprint));
        // A current checkpoint round-trips unchanged.
        let current = serde_json::to_vec(&cp).unwrap();
        assert_eq!(serde_json::to_value(parse_checkpoint(&current).unwrap().state).unwrap(), state);
    }

    fn config(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("flywheel-rewarder").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn checkpoint_storage_is_the_directory_by_default_and_a_store_when_named() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = checkpoint_path("group", "interactions", 3);
        assert_eq!(path, "group/interactions/3.json");
        // The directory store keeps the layout of earlier releases.
        let local = config(&["--checkpoint-dir", dir.path().to_str().unwrap()]);
        open_checkpoint_storage(&local, runtime.handle().clone()).unwrap().put(&path, b"{}").unwrap();
        assert_eq!(std::fs::read(dir.path().join("group/interactions/3.json")).unwrap(), b"{}");
        // A file:// URL is the same local store (fsync and rename).
        let url = format!("file://{}", dir.path().display());
        let store = open_checkpoint_storage(&config(&["--checkpoint-store", &url]), runtime.handle().clone()).unwrap();
        assert_eq!(store.get(&path).unwrap().as_deref(), Some(&b"{}"[..]));
        // memory:// is one store per URL in a process: two instances share it.
        let a = open_checkpoint_storage(&config(&["--checkpoint-store", "memory://a"]), runtime.handle().clone());
        let again = open_checkpoint_storage(&config(&["--checkpoint-store", "memory://a"]), runtime.handle().clone());
        let other = open_checkpoint_storage(&config(&["--checkpoint-store", "memory://b"]), runtime.handle().clone());
        a.unwrap().put(&path, b"1").unwrap();
        assert_eq!(again.unwrap().get(&path).unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(other.unwrap().get(&path).unwrap(), None);
    }
}
