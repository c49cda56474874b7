//! The `flywheel` command-line tool: runs the embedded broker, creates the
//! topic map, produces and tails Avro records as JSON, and runs the loop
//! locally (`flywheel demo`).

// Printing results to stdout is what a CLI is for; logs go to stderr.
#![allow(clippy::print_stdout)]

pub mod broker;
pub mod chat_product;
pub mod http;
pub mod simulate;
pub mod supervise;
pub mod up;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use flywheel_core::kafka::{ClientRole, KafkaArgs, create_topics};
use flywheel_core::records::TrainRequest;
use flywheel_core::runtime::LogArgs;
use flywheel_core::topics::{Topic, TopicsArgs, TopicsConfig};
use flywheel_core::{Codec, RecordKind};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::broker::{BrokerError, LocalBroker};

/// Errors of the CLI's library part.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// From the core library.
    #[error(transparent)]
    Core(#[from] flywheel_core::Error),
    /// From the local broker.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// From the collector.
    #[error(transparent)]
    Collector(#[from] flywheel_collector::CollectorError),
    /// From the lake.
    #[error(transparent)]
    Lake(#[from] flywheel_lake::LakeError),
    /// From an HTTP exchange.
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    /// Bad input the user can fix.
    #[error("{0}")]
    Usage(String),
}

/// Result alias for the CLI.
pub type Result<T> = std::result::Result<T, CliError>;

/// Flywheel: turn product interactions into a better model, continuously.
#[derive(Debug, Parser)]
#[command(name = "flywheel", version, about)]
pub struct Cli {
    /// Kafka connection.
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Topic layout.
    #[command(flatten)]
    pub topics: TopicsArgs,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the embedded Kafka-protocol broker (tansu, SQLite storage) in the foreground.
    Broker(BrokerArgs),
    /// Manage the topic map.
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// Produce records given as JSON (array or one object per line) onto a topic, Avro-encoded.
    Produce(ProduceArgs),
    /// Print a topic's records as JSON lines (decoding Avro; undecodable records are reported, not skipped).
    Tail(TailArgs),
    /// Run the flywheel locally on the embedded broker.
    Demo(DemoArgs),
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
pub struct TrainArgs {
    /// A train request as JSON; without it the request is read from the topic.
    #[arg(long, env = "FLYWHEEL_TRAIN_REQUEST_FILE")]
    pub request_file: Option<PathBuf>,
    /// Which request on `train-requests` (default: the latest).
    #[arg(long, env = "FLYWHEEL_TRAIN_REQUEST_ID", conflicts_with = "request_file")]
    pub request_id: Option<String>,
    /// Models, adapters, limits and device.
    #[command(flatten)]
    pub job: flywheel_trainer::job::JobSettings,
}

/// `flywheel model` subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
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
pub struct LakeRootArgs {
    /// Lake root: a directory, `file:///path`, or an object store URL.
    #[arg(long = "lake-root", env = "FLYWHEEL_LAKE_ROOT", default_value = ".flywheel/lake")]
    pub lake_root: String,
}

/// `flywheel lake` subcommands.
#[derive(Debug, Subcommand)]
pub enum LakeCommand {
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
pub enum FilesFormat {
    /// Aligned columns.
    Table,
    /// One JSON object per file.
    Json,
    /// Full paths only.
    Paths,
}

/// Where the embedded broker runs.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// Listener address; also advertised to clients.
    #[arg(long = "broker-listen", env = "FLYWHEEL_BROKER_LISTEN", default_value = "127.0.0.1:9092")]
    pub listen: SocketAddr,
    /// Directory for the broker's SQLite database and log.
    #[arg(long = "broker-data-dir", env = "FLYWHEEL_BROKER_DATA_DIR", default_value = ".flywheel/broker")]
    pub data_dir: PathBuf,
    /// The tansu binary (installed by `make setup`).
    #[arg(long = "tansu-bin", env = "FLYWHEEL_TANSU_BIN", default_value = ".tools/bin/tansu")]
    pub tansu_bin: PathBuf,
}

/// Topic subcommands.
#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
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
pub struct StrimziArgs {
    /// Name of the `Kafka` resource (the `strimzi.io/cluster` label the topic operator watches for).
    #[arg(long, env = "FLYWHEEL_STRIMZI_CLUSTER")]
    pub cluster: String,
    /// Namespace of the resources: the one the topic operator watches (by default the Kafka cluster's).
    #[arg(long, env = "FLYWHEEL_STRIMZI_NAMESPACE")]
    pub namespace: Option<String>,
}

/// `flywheel produce`.
#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Logical topic name (e.g. interactions); its schema decides how records are checked.
    pub topic: String,
    /// JSON file: an array of records or one record per line.
    pub file: PathBuf,
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

/// `flywheel demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The embedded broker.
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Folder of example records (`<kind>.<name>.json`).
    #[arg(long = "fixtures", env = "FLYWHEEL_FIXTURES", default_value = "schemas/fixtures")]
    pub fixtures: PathBuf,
    /// Where the demo's collector listens.
    #[arg(long = "collector-listen", env = "FLYWHEEL_DEMO_COLLECTOR_LISTEN", default_value = "127.0.0.1:8080")]
    pub collector_listen: SocketAddr,
}

/// Runs a parsed command until done or until `shutdown` is cancelled.
pub async fn run(cli: Cli, shutdown: CancellationToken) -> Result<()> {
    let topics = cli.topics.load()?;
    match cli.command {
        Command::Broker(args) => run_broker(&args, shutdown).await,
        Command::Topics(TopicsCommand::Create) => {
            let created = create_topics(&cli.kafka, &topics.specs(), Duration::from_secs(30)).await?;
            tracing::info!(created = created.len(), total = Topic::ALL.len(), "topics ready");
            for name in created {
                println!("created {name}");
            }
            Ok(())
        }
        Command::Topics(TopicsCommand::List) => list_topics(&cli.kafka, &topics),
        Command::Topics(TopicsCommand::Strimzi(args)) => {
            let source = cli.topics.topics_config.as_ref().map(|p| p.display().to_string());
            print!("{}", strimzi_topics(&topics, source.as_deref(), &args.cluster, args.namespace.as_deref())?);
            Ok(())
        }
        Command::Produce(args) => {
            let n = produce_file(&cli.kafka, &topics, &args.topic, &args.file).await?;
            println!("produced {n} records to {}", args.topic);
            Ok(())
        }
        Command::Tail(args) => {
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            tail(&cli.kafka, &topics, &args, &shutdown, &mut out).map(|_| ())
        }
        Command::Demo(args) => demo(&cli.kafka, &topics, cli.topics.topics_config.as_deref(), &args, shutdown).await,
        Command::Model(ModelCommand::Tiny { out, seed }) => {
            let model = flywheel_trainer::tiny::tiny_model(seed).map_err(|e| CliError::Usage(e.to_string()))?;
            flywheel_trainer::tiny::save(&model, &out).map_err(|e| CliError::Usage(e.to_string()))?;
            let c = &model.config;
            println!(
                "wrote {} ({} layers, width {}, {} heads / {} kv heads, vocabulary {})",
                out.display(),
                c.num_hidden_layers,
                c.hidden_size,
                c.num_attention_heads,
                c.kv_heads(),
                c.vocab_size
            );
            Ok(())
        }
        Command::Model(ModelCommand::ImportGguf { file, out, dtype }) => {
            let report = flywheel_trainer::import::import_gguf(&file, &out, dtype)
                .map_err(|e| CliError::Usage(e.to_string()))?;
            println!("{report}");
            Ok(())
        }
        Command::Simulate(args) => {
            let stats = simulate::simulate(&args, shutdown, |s| {
                tracing::info!(requests = s.requests, events = s.events, errors = s.errors, "simulating")
            })
            .await?;
            for (version, (shown, _)) in &stats.by_version {
                let rate = stats.accept_rate(version).unwrap_or(f64::NAN);
                println!("{version}: {shown} shown, accept rate {rate:.3}");
            }
            Ok(())
        }
        Command::Up(args) => {
            up::up(&cli.kafka, &topics, cli.topics.topics_config.as_deref(), &args, shutdown).await.map(|_| ())
        }
        Command::Train(args) => {
            let runtime = tokio::runtime::Handle::current();
            tokio::task::block_in_place(|| train(&cli.kafka, &topics, &args, &runtime))
        }
        Command::Lake(command) => {
            let runtime = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || lake_command(command, runtime))
                .await
                .map_err(|e| CliError::Usage(format!("lake command failed: {e}")))?
        }
    }
}

/// The train request `args` name: from its file, or from the topic.
fn train_request(kafka: &KafkaArgs, topics: &TopicsConfig, args: &TrainArgs) -> Result<TrainRequest> {
    if let Some(path) = &args.request_file {
        let text = std::fs::read(path).map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
        return serde_json::from_slice(&text)
            .map_err(|e| CliError::Usage(format!("{} is not a train request: {e}", path.display())));
    }
    let topic = topics.name(Topic::TrainRequests);
    let requests: Vec<TrainRequest> =
        flywheel_core::kafka::read_topic(kafka, "flywheel-cli", &topic, Duration::from_secs(30))?;
    let found = match &args.request_id {
        Some(id) => requests.into_iter().rev().find(|r| &r.request_id == id),
        None => requests.into_iter().next_back(),
    };
    found.ok_or_else(|| {
        CliError::Usage(match &args.request_id {
            Some(id) => format!("no train request {id} on {topic}"),
            None => format!("{topic} holds no train request"),
        })
    })
}

fn train(kafka: &KafkaArgs, topics: &TopicsConfig, args: &TrainArgs, runtime: &tokio::runtime::Handle) -> Result<()> {
    let req = train_request(kafka, topics, args)?;
    // Drawn only on a terminal; logs and pipes get the tracing lines.
    let bar = indicatif::ProgressBar::new(req.objective.max_steps.max(1) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:32} {pos}/{len} steps  {msg}  ETA {eta}")
            .map_err(|e| CliError::Usage(e.to_string()))?,
    );
    let (candidate, dir) = flywheel_trainer::job::run_job(&req, &args.job, runtime, &mut |p| {
        bar.set_position(p.step);
        bar.set_message(format!("loss {:.4}  {:.0} tokens/s", p.loss, p.tokens_per_second()));
    })
    .map_err(|e| CliError::Usage(format!("request {}: {e}", req.request_id)))?;
    bar.finish_and_clear();
    eprintln!("adapter written to {}", dir.display());
    let json = serde_json::to_string_pretty(&candidate).map_err(|e| CliError::Usage(e.to_string()))?;
    println!("{json}");
    Ok(())
}

fn lake_command(command: LakeCommand, runtime: tokio::runtime::Handle) -> Result<()> {
    match command {
        LakeCommand::Files { root, format } => {
            let lake = flywheel_lake::open_lake(&root.lake_root, runtime)?;
            let stdout = std::io::stdout();
            print_files(&lake, format, &mut stdout.lock())
        }
        LakeCommand::Compact { root, target_bytes, older_than_hours } => {
            let mut lake = flywheel_lake::open_lake(&root.lake_root, runtime)?;
            let opts = flywheel_lake::compact::CompactOptions {
                target_bytes,
                closed_before_ms: flywheel_core::now_millis() - older_than_hours as i64 * 3_600_000,
                settings: Default::default(),
                writer: format!("flywheel lake compact/{}", std::process::id()),
                vacuum_retention: None,
                max_merges: None,
            };
            let report = flywheel_lake::compact::compact(&mut lake, &opts)?;
            println!(
                "merged {} files into {} ({} rows); table version {}",
                report.files_in,
                report.files_out,
                report.rows,
                lake.version().map_or("-".into(), |v| v.to_string())
            );
            Ok(())
        }
        LakeCommand::Vacuum { root, retention_hours } => {
            if retention_hours == 0 {
                // A writer's file exists for a moment before the commit naming it.
                return Err(CliError::Usage(
                    "--retention-hours must be at least 1: less could delete a running writer's file before its commit"
                        .into(),
                ));
            }
            let mut lake = flywheel_lake::open_lake(&root.lake_root, runtime)?;
            let retention = Duration::from_secs(retention_hours.saturating_mul(3600));
            let report = lake.vacuum(retention)?;
            println!("deleted {} files unreferenced for over {retention_hours} h", report.deleted);
            Ok(())
        }
        LakeCommand::Checkpoint { root } => {
            let lake = flywheel_lake::open_lake(&root.lake_root, runtime)?;
            lake.checkpoint()?;
            println!("checkpoint written at version {}", lake.version().map_or("-".into(), |v| v.to_string()));
            Ok(())
        }
    }
}

/// Writes the committed files of `lake` in `format`.
pub fn print_files(lake: &flywheel_lake::table::Lake, format: FilesFormat, out: &mut impl Write) -> Result<()> {
    let files = lake.files()?;
    let base = lake.storage().url();
    let full = |path: &str| match base.strip_prefix("file://") {
        Some(dir) => format!("{dir}/{path}"),
        None => format!("{}/{path}", base.trim_end_matches('/')),
    };
    let io = |e: std::io::Error| CliError::Usage(format!("writing output: {e}"));
    match format {
        FilesFormat::Table => {
            writeln!(out, "{:>10} {:>12} path", "rows", "bytes").map_err(io)?;
            for f in &files {
                writeln!(out, "{:>10} {:>12} {}", f.rows, f.bytes, f.path).map_err(io)?;
            }
            let rows: u64 = files.iter().map(|f| f.rows).sum();
            let version = lake.version().map_or("-".into(), |v| v.to_string());
            writeln!(out, "{} files, {rows} rows, table version {version}", files.len()).map_err(io)?;
        }
        FilesFormat::Json => {
            for f in &files {
                let line = serde_json::json!({
                    "path": f.path, "uri": full(&f.path), "rows": f.rows, "bytes": f.bytes,
                });
                writeln!(out, "{line}").map_err(io)?;
            }
        }
        FilesFormat::Paths => {
            for f in &files {
                writeln!(out, "{}", full(&f.path)).map_err(io)?;
            }
        }
    }
    Ok(())
}

async fn run_broker(args: &BrokerArgs, shutdown: CancellationToken) -> Result<()> {
    let mut broker = LocalBroker::start(&args.tansu_bin, args.listen, &args.data_dir, Duration::from_secs(30))?;
    println!(
        "broker listening on {} (data in {}, log {}); Ctrl-C stops it",
        broker.bootstrap(),
        args.data_dir.display(),
        broker.log_path().display()
    );
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                broker.stop();
                return Ok(());
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if let Some(status) = broker.exit_status() {
                    return Err(CliError::Usage(format!(
                        "broker exited unexpectedly ({status}); see {}",
                        broker.log_path().display()
                    )));
                }
            }
        }
    }
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

/// The topic map as Strimzi `KafkaTopic` resources, one YAML document each,
/// after a header naming how it was made (`source`: the topics file, or the
/// built-in map when `None`). Kubernetes names are the topic names in lower
/// case with `_` as `-`; `spec.topicName` always carries the exact name.
pub fn strimzi_topics(
    topics: &TopicsConfig,
    source: Option<&str>,
    cluster: &str,
    namespace: Option<&str>,
) -> Result<String> {
    let dns_label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    if !dns_label(cluster) {
        return Err(CliError::Usage(format!("--cluster '{cluster}' is not a Kubernetes resource name")));
    }
    if let Some(ns) = namespace.filter(|ns| !dns_label(ns)) {
        return Err(CliError::Usage(format!("--namespace '{ns}' is not a Kubernetes namespace name")));
    }
    let mut command = String::from("flywheel");
    if let Some(path) = source {
        command.push_str(&format!(" --topics-config {path}"));
    }
    command.push_str(&format!(" topics strimzi --cluster {cluster}"));
    if let Some(ns) = namespace {
        command.push_str(&format!(" --namespace {ns}"));
    }
    let mut out = format!(
        "# Generated by `{command}`:\n# edit {} and run it again; a test fails when this file and its output differ.\n",
        source.unwrap_or("the built-in topic map")
    );
    for spec in topics.specs() {
        let name: String = spec.name.to_ascii_lowercase().replace('_', "-");
        let valid = name.len() <= 253
            && name.split('.').all(|part| {
                !part.is_empty()
                    && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !valid {
            return Err(CliError::Usage(format!(
                "topic '{}' gives no valid Kubernetes resource name; choose another prefix",
                spec.name
            )));
        }
        out.push_str("---\napiVersion: kafka.strimzi.io/v1\nkind: KafkaTopic\nmetadata:\n");
        out.push_str(&format!("  name: {name}\n"));
        if let Some(ns) = namespace {
            out.push_str(&format!("  namespace: {ns}\n"));
        }
        out.push_str(&format!(
            "  labels:\n    strimzi.io/cluster: {cluster}\n    app.kubernetes.io/part-of: flywheel\n"
        ));
        out.push_str(&format!(
            "spec:\n  topicName: \"{}\"\n  partitions: {}\n  replicas: {}\n  config:\n    cleanup.policy: {}\n",
            spec.name,
            spec.partitions,
            spec.replication_factor,
            spec.cleanup_policy.as_str()
        ));
        if let Some(retention) = spec.retention_ms {
            out.push_str(&format!("    retention.ms: {retention}\n"));
        }
    }
    Ok(out)
}

fn list_topics(kafka: &KafkaArgs, topics: &TopicsConfig) -> Result<()> {
    let consumer: BaseConsumer = kafka
        .client_config(&ClientRole::Admin)?
        .create()
        .map_err(|e| flywheel_core::Error::kafka("creating metadata client", e))?;
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| flywheel_core::Error::kafka("fetching metadata", e))?;
    println!("{:<28} {:<16} {:>10} {:>9} {:<8} key", "topic", "record", "partitions", "on broker", "cleanup");
    for spec in topics.specs() {
        let on_broker = metadata
            .topics()
            .iter()
            .find(|t| t.name() == spec.name)
            .map_or("missing".to_string(), |t| t.partitions().len().to_string());
        println!(
            "{:<28} {:<16} {:>10} {:>9} {:<8} {}",
            spec.name,
            spec.topic.record_kind().to_string(),
            spec.partitions,
            on_broker,
            spec.cleanup_policy.as_str(),
            spec.topic.key_fields().join("/")
        );
    }
    Ok(())
}

/// The Kafka key of a record in JSON form: its key fields joined with `/`
/// (null values as empty strings).
fn key_of(topic: Topic, json: &serde_json::Value) -> Option<String> {
    let fields = topic.key_fields();
    if fields.is_empty() {
        return None;
    }
    let parts: Vec<String> = fields
        .iter()
        .map(|f| match json.get(f) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        })
        .collect();
    Some(parts.join("/"))
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
        encoded.push((key_of(topic, json), bytes));
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

/// Example records under a fixtures folder for one kind (`<kind>.*.json`), sorted by name.
pub fn fixtures_of(dir: &Path, kind: RecordKind) -> Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| flywheel_core::Error::io(format!("reading {}", dir.display()), e))?;
    let prefix = format!("{}.", kind.file_stem());
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".json"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// A fixture interaction in the form a product posts it to the collector:
/// the product's own user id, no tenant or received time (the collector sets
/// them), and the given event time and id.
pub fn product_form(fixture: &serde_json::Value, user_id: &str, event_time: i64, event_id: &str) -> serde_json::Value {
    let mut event = fixture.clone();
    if let Some(obj) = event.as_object_mut() {
        obj.remove("received_time");
        obj.remove("tenant");
        obj.insert("user_id".into(), user_id.into());
        obj.insert("event_time".into(), event_time.into());
        obj.insert("event_id".into(), event_id.into());
    }
    event
}

const DEMO_TOKEN: &str = "demo-token-change-me-0001";

fn demo_lake_root(broker_dir: &Path) -> PathBuf {
    broker_dir.parent().unwrap_or(Path::new(".")).join("demo-lake")
}

/// Runs the trigger over the shards so far and shows its newest decision:
/// with a demo's handful of rows it explains why training does not fire.
async fn trigger_section(
    kafka: &KafkaArgs,
    topics: &TopicsConfig,
    topics_file: Option<&Path>,
    shutdown: &CancellationToken,
) -> Result<()> {
    let args = [
        "flywheel-trigger".to_string(),
        "--kafka-brokers".into(),
        kafka.brokers.clone(),
        "--ops-listen".into(),
        "127.0.0.1:0".into(),
        "--evaluate-every-ms".into(),
        "1000".into(),
        "--log-filter".into(),
        "warn".into(),
    ]
    .into_iter()
    .chain(topics_file.map(|p| ["--topics-config".to_string(), p.display().to_string()]).into_iter().flatten());
    let config = <flywheel_trigger::Config as Parser>::try_parse_from(args)
        .map_err(|e| CliError::Usage(format!("demo trigger configuration: {e}")))?;
    let stop = shutdown.child_token();
    let task = tokio::spawn(flywheel_trigger::run(config, stop.clone()));
    println!("== trigger evaluating the shards with the default policy (10,000 examples, 20 users, ...)");
    let started = std::time::Instant::now();
    let mut shown = false;
    while !shown && started.elapsed() < Duration::from_secs(20) && !shutdown.is_cancelled() {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let tail_args = TailArgs { topic: Topic::TriggerDecisions.default_name().into(), max: None, idle_secs: 2 };
        let mut buf = Vec::new();
        tail(kafka, topics, &tail_args, shutdown, &mut buf)?;
        let newest = String::from_utf8_lossy(&buf)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["record"]["tenant"] == "demo")
            .max_by_key(|v| v["record"]["evaluated_at"].as_i64());
        if let Some(v) = newest {
            let d = &v["record"];
            println!(
                "   tenant={} base_model={} fired={} over {} shards; failing gates:",
                d["tenant"].as_str().unwrap_or_default(),
                d["base_model"].as_str().unwrap_or_default(),
                d["fired"],
                d["shard_ids"].as_array().map_or(0, Vec::len)
            );
            for g in d["gates"].as_array().into_iter().flatten().filter(|g| g["passed"] == false) {
                println!("     {}", g["message"].as_str().unwrap_or_default());
            }
            shown = true;
        }
    }
    if !shown {
        println!("   (no decision within 20 s)");
    }
    stop.cancel();
    match task.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(CliError::Usage(format!("trigger failed: {e}"))),
        Err(e) => Err(CliError::Usage(format!("trigger task failed: {e}"))),
    }
}

/// Waits for the lake to commit every reward on the topic, then shows the
/// committed files and the newest shard manifest.
async fn lake_section(
    kafka: &KafkaArgs,
    topics: &TopicsConfig,
    broker_dir: &Path,
    shutdown: &CancellationToken,
) -> Result<()> {
    let root = demo_lake_root(broker_dir).display().to_string();
    let rewards_topic = topics.name(Topic::Rewards);
    let ends = flywheel_core::kafka::topic_ends(kafka, "flywheel-demo-probe", &[&rewards_topic])?;
    let ends = ends.get(&rewards_topic).cloned().unwrap_or_default();
    let runtime = tokio::runtime::Handle::current();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let buf = loop {
        let (root, runtime, ends, topic) = (root.clone(), runtime.clone(), ends.clone(), rewards_topic.clone());
        let (caught_up, buf) = tokio::task::spawn_blocking(move || -> Result<(bool, Vec<u8>)> {
            let lake = flywheel_lake::open_lake(&root, runtime)?;
            let mut caught_up = true;
            for (p, end) in &ends {
                caught_up &= *end == 0 || lake.committed_offset(&topic, *p)?.is_some_and(|c| c + 1 >= *end);
            }
            let mut buf = Vec::new();
            print_files(&lake, FilesFormat::Table, &mut buf)?;
            Ok((caught_up, buf))
        })
        .await
        .map_err(|e| CliError::Usage(e.to_string()))??;
        if caught_up || std::time::Instant::now() > deadline || shutdown.is_cancelled() {
            break buf;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!("== the lake, from its Delta log (`flywheel lake files --lake-root {root}`):");
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    for line in lines.iter().take(1).chain(lines.iter().skip(1).rev().take(4).rev()) {
        println!("   {line}");
    }
    println!(
        "   query it: duckdb -c \"select tenant, outcome, count(*), avg(reward) from delta_scan('{root}/rewards') group by all\""
    );
    Ok(())
}

async fn demo(
    kafka: &KafkaArgs,
    topics: &TopicsConfig,
    topics_file: Option<&Path>,
    args: &DemoArgs,
    shutdown: CancellationToken,
) -> Result<()> {
    println!("== Flywheel demo: embedded broker on {}", args.broker.listen);
    let broker =
        LocalBroker::start(&args.broker.tansu_bin, args.broker.listen, &args.broker.data_dir, Duration::from_secs(30))?;
    let mut kafka = kafka.clone();
    kafka.brokers = broker.bootstrap();
    let created = create_topics(&kafka, &topics.specs(), Duration::from_secs(30)).await?;
    println!("== topics: {} created, {} in the map", created.len(), Topic::ALL.len());
    list_topics(&kafka, topics)?;

    let mut collector_args = vec![
        "flywheel-collector".to_string(),
        "--kafka-brokers".into(),
        kafka.brokers.clone(),
        "--listen".into(),
        args.collector_listen.to_string(),
        "--ops-listen".into(),
        "127.0.0.1:0".into(),
        "--token".into(),
        format!("{DEMO_TOKEN}=demo"),
        "--hmac-secret".into(),
        "demo-secret-not-for-production".into(),
        "--redact-pii".into(),
        "--log-filter".into(),
        "warn".into(),
    ];
    if let Some(path) = topics_file {
        collector_args.extend(["--topics-config".to_string(), path.display().to_string()]);
    }
    let config = <flywheel_collector::Config as Parser>::try_parse_from(collector_args)
        .map_err(|e| CliError::Usage(format!("demo collector configuration: {e}")))?;
    let collector_shutdown = shutdown.child_token();
    let collector = flywheel_collector::start(config, collector_shutdown.clone()).await?;
    let api = collector.api_addr;
    println!("== collector listening on http://{api} (token for tenant 'demo': {DEMO_TOKEN})");

    let rewarder_args = [
        "flywheel-rewarder".to_string(),
        "--kafka-brokers".into(),
        kafka.brokers.clone(),
        "--ops-listen".into(),
        "127.0.0.1:0".into(),
        "--group-id".into(),
        "flywheel-demo-rewarder".into(),
        "--checkpoint-dir".into(),
        args.broker.data_dir.join("..").join("demo-rewarder").display().to_string(),
        "--outcome-window-ms".into(),
        "300000".into(),
        "--allowed-lateness-ms".into(),
        "0".into(),
        "--idle-advance-after-ms".into(),
        "2000".into(),
        "--checkpoint-every-ms".into(),
        "1000".into(),
        "--log-filter".into(),
        "warn".into(),
    ]
    .into_iter()
    .chain(topics_file.map(|p| ["--topics-config".to_string(), p.display().to_string()]).into_iter().flatten());
    let rewarder_config = <flywheel_rewarder::Config as Parser>::try_parse_from(rewarder_args)
        .map_err(|e| CliError::Usage(format!("demo rewarder configuration: {e}")))?;
    let rewarder_shutdown = shutdown.child_token();
    let rewarder = tokio::spawn(flywheel_rewarder::run(rewarder_config, rewarder_shutdown.clone()));
    println!(
        "== rewarder consuming {} (5 min outcome window, idle partitions advance by wall clock)",
        topics.name(Topic::Interactions)
    );

    let lake_root = demo_lake_root(&args.broker.data_dir);
    let lake_args = [
        "flywheel-lake-writer".to_string(),
        "--kafka-brokers".into(),
        kafka.brokers.clone(),
        "--ops-listen".into(),
        "127.0.0.1:0".into(),
        "--group-id".into(),
        "flywheel-demo-lake-writer".into(),
        "--lake-root".into(),
        lake_root.display().to_string(),
        "--roll-max-age-ms".into(),
        "2000".into(),
        "--roll-idle-ms".into(),
        "1000".into(),
        "--log-filter".into(),
        "warn".into(),
    ]
    .into_iter()
    .chain(topics_file.map(|p| ["--topics-config".to_string(), p.display().to_string()]).into_iter().flatten());
    let lake_config = <flywheel_lake_writer::Config as Parser>::try_parse_from(lake_args)
        .map_err(|e| CliError::Usage(format!("demo lake writer configuration: {e}")))?;
    let lake_shutdown = shutdown.child_token();
    let lake_writer = tokio::spawn(flywheel_lake_writer::run(lake_config, lake_shutdown.clone()));
    println!("== lake writer committing rewards to {} (files roll after 2 s in the demo)", lake_root.display());

    // Two suggestions of this run: one accepted, edited, rated, thanked and
    // completed; one rejected. Shown 400 s ago so their windows have closed.
    let now = flywheel_core::now_millis();
    let run = now / 1000;
    let base = now - 400_000;
    let fixtures: std::collections::BTreeMap<String, serde_json::Value> =
        fixtures_of(&args.fixtures, RecordKind::Interaction)?
            .iter()
            .flat_map(|f| read_json_records(f).unwrap_or_default())
            .filter_map(|v| v["payload"].as_object().and_then(|p| p.keys().next().cloned()).map(|k| (k, v.clone())))
            .collect();
    let shown_time = fixtures.get("shown").and_then(|v| v["event_time"].as_i64()).unwrap_or(0);
    let story = [
        ("accepted", "shown"),
        ("accepted", "accepted"),
        ("accepted", "edited"),
        ("accepted", "rated"),
        ("accepted", "follow_up"),
        ("accepted", "task_completed"),
        ("rejected", "shown"),
        ("rejected", "rejected"),
    ];
    let mut events = Vec::new();
    for (i, (which, kind)) in story.iter().enumerate() {
        let Some(fixture) = fixtures.get(*kind) else { continue };
        let delta = fixture["event_time"].as_i64().unwrap_or(shown_time) - shown_time;
        let id = format!("{:08x}-0000-4000-8000-{:012x}", run as u32, i);
        let mut event = product_form(fixture, "dev-42@example.com", base + delta, &id);
        event["suggestion_id"] = format!("demo-{run}-{which}").into();
        events.push(event);
    }
    let auth = format!("Bearer {DEMO_TOKEN}");
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];
    let body = serde_json::to_vec(&events).map_err(|e| CliError::Usage(e.to_string()))?;
    let started = std::time::Instant::now();
    let r = http::request(api, "POST", "/v1/events", &headers, body).await?;
    println!(
        "== POST /v1/events with {} events -> {} in {:.0?}: {}",
        events.len(),
        r.status,
        started.elapsed(),
        String::from_utf8_lossy(&r.body).chars().take(160).collect::<String>()
    );
    let mut spoofed = events[0].clone();
    spoofed["tenant"] = "someone-else".into();
    spoofed["event_id"] = format!("{:08x}-0000-4000-8000-ffffffffffff", (now / 1000) as u32).into();
    let body = serde_json::to_vec(&[spoofed]).map_err(|e| CliError::Usage(e.to_string()))?;
    let r = http::request(api, "POST", "/v1/events", &headers, body).await?;
    println!("== a batch naming another tenant -> {}: {}", r.status, String::from_utf8_lossy(&r.body));
    let r = http::request(api, "GET", "/v1/route?user_id=dev-42@example.com&surface=editor-inline", &headers, vec![])
        .await?;
    println!("== GET /v1/route -> {}: {}", r.status, String::from_utf8_lossy(&r.body));

    let tail_args = TailArgs { topic: Topic::Interactions.default_name().into(), max: None, idle_secs: 3 };
    let mut buf = Vec::new();
    let read = tail(&kafka, topics, &tail_args, &shutdown, &mut buf)?;
    println!("== {read} interactions in the topic (all demo runs so far); the newest, decoded from Avro:");
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_by_key(|l| {
        serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["record"]["received_time"].as_i64())
    });
    for line in lines.iter().rev().take(2) {
        println!("   {line}");
    }
    let r = http::request(collector.ops_addr, "GET", "/metrics", &[], vec![]).await?;
    println!("== collector metrics (excerpt):");
    for line in String::from_utf8_lossy(&r.body).lines().filter(|l| {
        l.starts_with("collector_events_total{outcome=\"accepted\"")
            || l.starts_with("collector_events_total{outcome=\"rejected\",reason=\"tenant_mismatch\"")
            || l.starts_with("collector_produce_latency_seconds_count")
    }) {
        println!("   {line}");
    }
    println!("== rewards of this run (the rewarder closes each window in event time):");
    let deadline = std::time::Instant::now() + Duration::from_secs(45);
    let mut shown_rewards = 0;
    while shown_rewards < 2 && std::time::Instant::now() < deadline && !shutdown.is_cancelled() {
        let tail_args = TailArgs { topic: Topic::Rewards.default_name().into(), max: None, idle_secs: 2 };
        let mut buf = Vec::new();
        tail(&kafka, topics, &tail_args, &shutdown, &mut buf)?;
        let ours: Vec<serde_json::Value> = String::from_utf8_lossy(&buf)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["record"]["suggestion_id"].as_str().is_some_and(|s| s.starts_with(&format!("demo-{run}-"))))
            .collect();
        if ours.len() >= 2 {
            for v in &ours {
                let r = &v["record"];
                println!(
                    "   {} outcome={} reward={:.3} components={} signals={}",
                    r["suggestion_id"].as_str().unwrap_or_default(),
                    r["outcome"].as_str().unwrap_or_default(),
                    r["reward"].as_f64().unwrap_or_default(),
                    r["components"],
                    r["signals"]
                );
            }
            shown_rewards = ours.len();
        }
    }
    if shown_rewards < 2 {
        println!("   (no rewards within 45 s; check the rewarder's logs)");
    }
    lake_section(&kafka, topics, &args.broker.data_dir, &shutdown).await?;
    trigger_section(&kafka, topics, topics_file, &shutdown).await?;
    println!(
        "== the trigger did not fire on the demo's few rows, so the trainer has nothing to do; the gate is not in this build yet; stopping"
    );
    collector_shutdown.cancel();
    rewarder_shutdown.cancel();
    lake_shutdown.cancel();
    collector.wait().await?;
    match lake_writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(CliError::Usage(format!("lake writer failed: {e}"))),
        Err(e) => return Err(CliError::Usage(format!("lake writer task failed: {e}"))),
    }
    match rewarder.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(CliError::Usage(format!("rewarder failed: {e}"))),
        Err(e) => return Err(CliError::Usage(format!("rewarder task failed: {e}"))),
    }
    drop(broker);
    Ok(())
}

#[cfg(test)]
mod cli_tests {
    #[test]
    fn every_subcommand_has_consistent_flags() {
        // clap's own checks: unique names, valid defaults, no clashes
        // between flattened groups.
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
