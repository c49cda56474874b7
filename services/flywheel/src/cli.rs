//! The command line: every subcommand and its flags (`flywheel up` and
//! `flywheel simulate` keep their larger flag sets beside their code).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use flywheel_core::kafka::KafkaArgs;
use flywheel_core::runtime::LogArgs;
use flywheel_core::topics::TopicsArgs;

use crate::{simulate, up};

/// Flywheel: turn product interactions into a better model, continuously.
#[derive(Debug, Parser)]
#[command(name = "flywheel", version, about)]
pub struct Cli {
    /// Kafka connection.
    #[command(flatten)]
    pub(crate) kafka: KafkaArgs,
    /// Topic layout.
    #[command(flatten)]
    pub(crate) topics: TopicsArgs,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the embedded Kafka-protocol broker (tansu, SQLite storage) in the foreground.
    Broker(BrokerArgs),
    /// Manage the topic map.
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// Produce records given as JSON (array or one object per line) onto a topic, Avro-encoded.
    Produce(ProduceArgs),
    /// Print a topic's records as JSON lines (decoding Avro; undecodable records are reported, not skipped).
    Tail(TailArgs),
    /// Inspect and maintain the reward lake.
    #[command(subcommand)]
    Lake(LakeCommand),
    /// Model files.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Run one train request here, with a progress bar: from a JSON file
    /// (as `flywheel tail` prints it) or from `train-requests` (by id, else
    /// the latest). Writes the adapter and prints the candidate as JSON;
    /// publishes nothing.
    Train(TrainArgs),
    /// The simulated product alone, against a running collector.
    Simulate(simulate::SimulateArgs),
    /// The whole flywheel here: broker, topics, every service as a
    /// supervised process, the simulated product and a live summary.
    Up(up::UpArgs),
}

/// `flywheel train` arguments.
#[derive(Debug, Args)]
pub(crate) struct TrainArgs {
    /// A train request as JSON; without it the request is read from the topic.
    #[arg(long, env = "FLYWHEEL_TRAIN_REQUEST_FILE")]
    pub(crate) request_file: Option<PathBuf>,
    /// Which request on `train-requests` (default: the latest).
    #[arg(long, env = "FLYWHEEL_TRAIN_REQUEST_ID", conflicts_with = "request_file")]
    pub(crate) request_id: Option<String>,
    /// Models, adapters, limits and device.
    #[command(flatten)]
    pub(crate) job: flywheel_trainer::job::JobSettings,
}

/// `flywheel model` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum ModelCommand {
    /// Write the deterministic tiny Llama-family checkpoint (HF layout:
    /// config.json + model.safetensors) used by tests and the demo.
    Tiny {
        /// Output directory.
        #[arg(long, env = "FLYWHEEL_MODEL_OUT", default_value = ".flywheel/models/tiny")]
        out: PathBuf,
        /// Seed of the random weights.
        #[arg(long, env = "FLYWHEEL_MODEL_SEED", default_value_t = 7)]
        seed: u64,
    },
    /// Convert a Llama-family GGUF file (llama.cpp's format) into an HF
    /// model directory the trainer loads: config.json, model.safetensors,
    /// tokenizer.json, tokenizer_config.json (chat template),
    /// generation_config.json. Quantised (e.g. 4-bit) weights are expanded
    /// to full precision: the model keeps the quality of the quantised file.
    ImportGguf {
        /// The GGUF file.
        #[arg(env = "FLYWHEEL_GGUF_FILE")]
        file: PathBuf,
        /// Output directory (created; files of the same names are replaced).
        #[arg(long, env = "FLYWHEEL_MODEL_OUT")]
        out: PathBuf,
        /// Precision of the written weights.
        #[arg(long, env = "FLYWHEEL_MODEL_DTYPE", value_enum, default_value_t = flywheel_trainer::import::WeightDtype::Bf16)]
        dtype: flywheel_trainer::import::WeightDtype,
    },
}

/// Where the lake is.
#[derive(Debug, Clone, Args)]
pub(crate) struct LakeRootArgs {
    /// Lake root: a directory, `file:///path`, or an object store URL.
    #[arg(long = "lake-root", env = "FLYWHEEL_LAKE_ROOT", default_value = ".flywheel/lake")]
    pub(crate) lake_root: String,
}

/// `flywheel lake` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum LakeCommand {
    /// List the table's files in its latest snapshot (from the Delta log:
    /// never a partial or uncommitted file, never a compacted-away one).
    Files {
        /// The lake.
        #[command(flatten)]
        root: LakeRootArgs,
        /// Output: a table, JSON lines, or one path per line.
        #[arg(long, env = "FLYWHEEL_LAKE_FILES_FORMAT", value_enum, default_value_t = FilesFormat::Table)]
        format: FilesFormat,
    },
    /// Merge small files of closed hours into larger ones, one Delta commit
    /// per merged file (`dataChange = false`); row content is unchanged. The
    /// old files stay for older snapshots until `flywheel lake vacuum`.
    Compact {
        /// The lake.
        #[command(flatten)]
        root: LakeRootArgs,
        /// Size merged files aim at; files this big are left alone.
        #[arg(long = "target-bytes", env = "FLYWHEEL_LAKE_COMPACT_TARGET_BYTES", default_value_t = 256 * 1024 * 1024)]
        target_bytes: u64,
        /// Only hours that ended at least this long ago (late rewards may
        /// still land in recent hours; shards pinned by pending train
        /// requests should be older than this).
        #[arg(long = "older-than-hours", env = "FLYWHEEL_LAKE_COMPACT_OLDER_THAN_HOURS", default_value_t = 24)]
        older_than_hours: u64,
    },
    /// Delete files no snapshot within the retention period references:
    /// compacted-away files, and files a crashed writer created but never
    /// committed. Training jobs read pinned snapshots: keep the retention
    /// longer than the oldest train request still pending.
    Vacuum {
        /// The lake.
        #[command(flatten)]
        root: LakeRootArgs,
        /// Keep files unreferenced for less than this many hours (at least 1;
        /// at most 720, the table's tombstone retention).
        #[arg(long = "retention-hours", env = "FLYWHEEL_LAKE_VACUUM_RETENTION_HOURS", default_value_t = 168)]
        retention_hours: u64,
    },
    /// Write a Delta checkpoint of the latest version (Delta writes one
    /// every 100 commits by itself), so readers open the table fast.
    Checkpoint {
        /// The lake.
        #[command(flatten)]
        root: LakeRootArgs,
    },
}

/// Output format of `flywheel lake files`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum FilesFormat {
    /// Aligned columns.
    Table,
    /// One JSON object per file.
    Json,
    /// Full paths only.
    Paths,
}

/// Where the embedded broker runs.
#[derive(Debug, Clone, Args)]
pub(crate) struct BrokerArgs {
    /// Listener address; also advertised to clients.
    #[arg(long = "broker-listen", env = "FLYWHEEL_BROKER_LISTEN", default_value = "127.0.0.1:9092")]
    pub(crate) listen: SocketAddr,
    /// Directory for the broker's SQLite database and log.
    #[arg(long = "broker-data-dir", env = "FLYWHEEL_BROKER_DATA_DIR", default_value = ".flywheel/broker")]
    pub(crate) data_dir: PathBuf,
    /// The tansu binary (installed by `make setup`).
    #[arg(long = "tansu-bin", env = "FLYWHEEL_TANSU_BIN", default_value = ".tools/bin/tansu")]
    pub(crate) tansu_bin: PathBuf,
}

/// Topic subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum TopicsCommand {
    /// Create every topic of the map that does not exist yet (idempotent).
    Create,
    /// Show the topic map with what the broker reports.
    List,
    /// Print the topic map as Strimzi `KafkaTopic` resources (YAML) for a
    /// cluster run by the Strimzi operator: the names, partitions, replicas,
    /// cleanup policy and retention `topics create` would use, so the two
    /// cannot drift. Needs no broker.
    Strimzi(StrimziArgs),
}

/// `flywheel topics strimzi`.
#[derive(Debug, Args)]
pub(crate) struct StrimziArgs {
    /// Name of the `Kafka` resource (the `strimzi.io/cluster` label the topic operator watches for).
    #[arg(long, env = "FLYWHEEL_STRIMZI_CLUSTER")]
    pub(crate) cluster: String,
    /// Namespace of the resources: the one the topic operator watches (by default the Kafka cluster's).
    #[arg(long, env = "FLYWHEEL_STRIMZI_NAMESPACE")]
    pub(crate) namespace: Option<String>,
}

/// `flywheel produce`.
#[derive(Debug, Args)]
pub(crate) struct ProduceArgs {
    /// Logical topic name (e.g. interactions); its schema decides how records are checked.
    pub(crate) topic: String,
    /// JSON file: an array of records or one record per line.
    pub(crate) file: PathBuf,
}

/// `flywheel tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    /// Logical topic name (e.g. interactions, dead-letters).
    pub topic: String,
    /// Stop after this many records.
    #[arg(long, env = "FLYWHEEL_TAIL_MAX")]
    pub max: Option<usize>,
    /// Stop after this many seconds without a new record.
    #[arg(long = "idle-secs", env = "FLYWHEEL_TAIL_IDLE_SECS", default_value_t = 5)]
    pub idle_secs: u64,
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_subcommand_has_consistent_flags() {
        // clap's own checks: unique names, valid defaults, no clashes
        // between flattened groups.
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
