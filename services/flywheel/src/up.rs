//! `flywheel up`: the whole flywheel on one machine. Starts the broker
//! (unless told to use existing brokers), creates the topics, writes the
//! tiny model and demo policies, starts every service as a supervised
//! process, runs the simulated product against the collector and prints a
//! live summary. Ctrl-C (or the duration, or the promotion count) stops the
//! product first, then each service with SIGTERM so it drains, then the
//! broker; the lake stays on disk.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use flywheel_core::codec::decode;
use flywheel_core::kafka::{ClientRole, KafkaArgs, create_topics};
use flywheel_core::records::{ModelCandidate, RegistryEntry, ReleaseAction, RewardMetrics, TriggerDecision};
use flywheel_core::topics::{Topic, TopicsConfig};
use flywheel_devkit::{LocalBroker, RestartEvent, RestartPolicy, Restarting, restart_summary};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::cli::BrokerArgs;
use crate::simulate::{ProductArgs, SimStats, SimulateArgs, demo_objective, simulate};
use crate::{CliError, Result};

/// Token of the demo tenant.
pub(crate) const UP_TOKEN: &str = "demo-token-change-me-0001";

/// The base model `flywheel up` serves and trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum UpModel {
    /// The deterministic tiny model (0.1M parameters, random weights) and
    /// the characters product: a whole loop in a few minutes.
    Tiny,
    /// SmolLM2-135M-Instruct, imported from the GGUF file `make setup`
    /// fetches, and the chat product.
    Smollm2,
}

impl UpModel {
    /// The base model's name (its directory under `models/`).
    pub(crate) fn base_model(self) -> &'static str {
        match self {
            UpModel::Tiny => "flywheel/tiny",
            UpModel::Smollm2 => "smollm2-135m-instruct",
        }
    }
}

/// `flywheel up` settings.
#[derive(Debug, Clone, Args)]
pub(crate) struct UpArgs {
    /// The base model (sets `--base-model` to its name).
    #[arg(long = "model", env = "FLYWHEEL_UP_MODEL", value_enum, default_value_t = UpModel::Tiny)]
    pub(crate) model: UpModel,
    /// The GGUF file `--model smollm2` is imported from (once, into the work directory).
    #[arg(
        long = "gguf",
        env = "FLYWHEEL_SMOLLM_GGUF",
        default_value = ".tools/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    pub(crate) gguf: PathBuf,
    /// Where the read-only web console listens.
    #[arg(long = "console-listen", env = "FLYWHEEL_UP_CONSOLE_LISTEN", default_value = "127.0.0.1:8070")]
    pub(crate) console_listen: SocketAddr,
    /// Do not start the console.
    #[arg(long = "no-console", env = "FLYWHEEL_UP_NO_CONSOLE")]
    pub(crate) no_console: bool,
    /// The embedded broker.
    #[command(flatten)]
    pub(crate) broker: BrokerArgs,
    /// Use the brokers of `--kafka-brokers` (and `--topics-config`) instead
    /// of starting one.
    #[arg(long, env = "FLYWHEEL_UP_EXTERNAL_BROKER")]
    pub(crate) external_broker: bool,
    /// Lake, models, adapters, checkpoints, policies and service logs.
    #[arg(long, env = "FLYWHEEL_UP_WORK_DIR", default_value = ".flywheel/up")]
    pub(crate) work_dir: PathBuf,
    /// Where the collector listens.
    #[arg(long, env = "FLYWHEEL_UP_COLLECTOR_LISTEN", default_value = "127.0.0.1:8080")]
    pub(crate) collector_listen: SocketAddr,
    /// Stop after this many seconds (0: until Ctrl-C).
    #[arg(long, env = "FLYWHEEL_UP_DURATION_S", default_value_t = 0)]
    pub(crate) duration_s: u64,
    /// Stop once this many versions were promoted (0: never).
    #[arg(long, env = "FLYWHEEL_UP_STOP_AFTER_PROMOTIONS", default_value_t = 0)]
    pub(crate) stop_after_promotions: usize,
    /// Serve, measure and judge releases, but start no new training (the
    /// trigger is not started; requests already made are still trained).
    #[arg(long, env = "FLYWHEEL_UP_FREEZE_TRAINING")]
    pub(crate) freeze_training: bool,
    /// Seconds between summary lines.
    #[arg(long, env = "FLYWHEEL_UP_SUMMARY_EVERY_S", default_value_t = 10)]
    pub(crate) summary_every_s: u64,
    /// The simulated product.
    #[command(flatten)]
    pub(crate) product: ProductArgs,
}

/// What the topics say, followed in the background.
#[derive(Debug, Default, Clone)]
pub(crate) struct Watch {
    /// Records read per topic.
    pub(crate) counts: BTreeMap<String, u64>,
    /// Latest registry entry per (tenant, base model).
    pub(crate) registry: BTreeMap<(String, String), RegistryEntry>,
    /// The newest trigger decision.
    pub(crate) last_decision: Option<TriggerDecision>,
    /// Candidates by adapter version.
    pub(crate) candidates: BTreeMap<String, ModelCandidate>,
    /// (shown, accepted) per served version from `reward-metrics` (one window length).
    pub(crate) accept: BTreeMap<String, (i64, i64)>,
}

impl Watch {
    /// Versions promoted so far, oldest first.
    pub(crate) fn promoted(&self) -> Vec<String> {
        self.registry
            .values()
            .flat_map(|e| e.history.iter())
            .filter(|d| d.action == ReleaseAction::Promoted)
            .map(|d| d.adapter_version.clone())
            .collect()
    }
}

fn follow(kafka: &KafkaArgs, topics: &TopicsConfig, window_ms: i64, watch: Arc<Mutex<Watch>>, stop: CancellationToken) {
    let wanted = [
        Topic::Rewards,
        Topic::Shards,
        Topic::TriggerDecisions,
        Topic::TrainRequests,
        Topic::ModelCandidates,
        Topic::ModelRegistry,
        Topic::RewardMetrics,
        Topic::DeadLetters,
    ];
    let consumer: BaseConsumer = match kafka
        .client_config(&ClientRole::Consumer { group_id: "flywheel-up-watch".into() })
        .and_then(|c| c.create().map_err(|e| flywheel_core::Error::kafka("creating the summary consumer", e)))
    {
        Ok(c) => c,
        Err(e) => return tracing::warn!(error = %e, "no live summary"),
    };
    let names: Vec<String> = wanted.iter().map(|t| topics.name(*t)).collect();
    let mut tpl = TopicPartitionList::new();
    for (topic, t) in names.iter().zip(wanted) {
        for p in 0..topics.spec(t).partitions {
            let _ = tpl.add_partition_offset(topic, p, Offset::Beginning);
        }
    }
    if let Err(e) = consumer.assign(&tpl) {
        return tracing::warn!(error = %e, "no live summary");
    }
    while !stop.is_cancelled() {
        let Some(Ok(msg)) = consumer.poll(Duration::from_millis(200)) else { continue };
        let topic = msg.topic().to_string();
        let payload = msg.payload().unwrap_or_default();
        let mut w = watch.lock().unwrap_or_else(|p| p.into_inner());
        *w.counts.entry(topic.clone()).or_default() += 1;
        if topic == topics.name(Topic::ModelRegistry) {
            if let Ok(e) = decode::<RegistryEntry>(payload) {
                let key = (e.tenant.clone(), e.base_model.clone());
                if w.registry.get(&key).is_none_or(|held| held.revision < e.revision) {
                    w.registry.insert(key, e);
                }
            }
        } else if topic == topics.name(Topic::TriggerDecisions) {
            w.last_decision = decode::<TriggerDecision>(payload).ok();
        } else if topic == topics.name(Topic::ModelCandidates) {
            if let Ok(c) = decode::<ModelCandidate>(payload) {
                w.candidates.insert(c.adapter_version.clone(), c);
            }
        } else if topic == topics.name(Topic::RewardMetrics)
            && let Ok(m) = decode::<RewardMetrics>(payload)
            && m.window_end - m.window_start == window_ms
        {
            let v = w.accept.entry(m.adapter_version.clone().unwrap_or_else(|| "base".into())).or_default();
            v.0 += m.shown;
            v.1 += m.accepted;
        }
    }
}

/// Length of the metrics windows the demo's rewarder publishes and its gate reads.
const WINDOW_MS: i64 = 10_000;

fn write_policies(dir: &Path, model: UpModel) -> Result<(PathBuf, PathBuf)> {
    let trigger = match model {
        UpModel::Tiny => flywheel_trigger::policy::Policy {
            version: "up-demo-trigger-v1".into(),
            // 480 training examples after the holdout: one round lifts the
            // expected accept rate from 0.16 to 0.25–0.36 (six data seeds,
            // measured in process), which leaves a second generation room to
            // win a canary. With 1,500 the first adapter reached 0.39 and later
            // candidates failed the offline gate (gain < 0.02) for minutes.
            min_examples: 600,
            stale_min_examples: 600,
            min_distinct_users: 20,
            min_accepted: 60,
            min_rejected: 60,
            min_rated_for_noise: 40,
            cooldown_ms: 20_000,
            max_runs_per_day: 1000,
            holdout_fraction: 0.2,
            objective: demo_objective(),
            ..Default::default()
        },
        // 1,000 answers (800 to train on after the holdout), at the base's
        // accept rate of about 6 % some 50-60 accepted: one round of 45 steps
        // lifts held-out acceptance from about 0.06 to 0.38
        // (`chat_product::chat_objective`); with 480 answers (35 accepted)
        // it moved far less.
        UpModel::Smollm2 => flywheel_trigger::policy::Policy {
            version: "up-demo-chat-trigger-v1".into(),
            min_examples: 1000,
            stale_min_examples: 1000,
            min_distinct_users: 20,
            min_accepted: 40,
            min_rejected: 60,
            min_rated_for_noise: 40,
            // One round at a time: a job takes minutes on 2 cores, and a
            // second request would train on the same cores while the first
            // adapter's canary is being served.
            cooldown_ms: 900_000,
            max_runs_per_day: 1000,
            holdout_fraction: 0.2,
            objective: crate::chat_product::chat_objective(),
            ..Default::default()
        },
    };
    #[derive(serde::Serialize)]
    struct PolicyFile<'a> {
        default: &'a flywheel_trigger::policy::Policy,
    }
    let text = toml::to_string(&PolicyFile { default: &trigger }).map_err(|e| CliError::Usage(e.to_string()))?;
    let trigger_path = dir.join("trigger-policy.toml");
    std::fs::write(&trigger_path, format!("# Written by `flywheel up`: demo-sized thresholds.\n{text}"))
        .map_err(|e| CliError::Usage(format!("{}: {e}", trigger_path.display())))?;
    let gate_path = dir.join("release-policy.toml");
    // The chat adapter answers briefly where the base rambled, so its
    // answers are meant to get shorter: a good adapter's are a fraction of
    // the base's 40 tokens ("A spider has 8 legs"), and the length-collapse
    // guardrail sits lower (the gate still rolls back on the accept rate and
    // mean reward). Its KL budget is wider than the tiny model's: the
    // objective's reject floor lets logged answers fall 0.3 nats per token
    // below the base; an adapter trained without the floor measured 6.3
    // and babbled.
    let (version, shown, kl, canary_ms, min_length) = match model {
        UpModel::Tiny => ("up-demo-release-v1", 150, 0.5, 300_000, 0.5),
        UpModel::Smollm2 => ("up-demo-chat-release-v1", 120, 2.0, 600_000, 0.1),
    };
    let gate = format!(
        "# Written by `flywheel up`: demo-sized canaries.\n[default]\nversion = \"{version}\"\nmin_holdout_examples = 40\ncanary_share = 0.5\nmin_shown_per_arm = {shown}\nmax_kl_to_parent = {kl}\nmetrics_window_ms = {WINDOW_MS}\nmax_canary_ms = {canary_ms}\nmin_rated_per_arm = 20\nmin_completion_length_ratio = {min_length}\n"
    );
    std::fs::write(&gate_path, gate).map_err(|e| CliError::Usage(format!("{}: {e}", gate_path.display())))?;
    Ok((trigger_path, gate_path))
}

/// A few questions answered by the base model and by the live adapter,
/// side by side, so a person can see what changed (the chat product only).
fn side_by_side(models: &Path, product: &ProductArgs, watch: &Watch) -> Result<()> {
    let Some(live) = watch.registry.values().find_map(|e| e.live.clone()) else { return Ok(()) };
    let mut server = crate::simulate::Server::load(models, &product.base_model, product.product)?;
    if server.kind != crate::simulate::ProductKind::Chat {
        return Ok(());
    }
    let adapter = server.adapter(&live.adapter_version, &live.adapter_uri)?;
    let questions = ["How do I boil an egg?", "What is a black hole?", "Suggest a healthy breakfast."];
    let mut requests = Vec::new();
    for (i, q) in questions.iter().enumerate() {
        let prompt = server.prompt(q)?;
        requests.push((prompt.clone(), None, 100 + i as u64));
        requests.push((prompt, Some(adapter.clone()), 100 + i as u64));
    }
    let out = server.complete_batch(&requests, server.completion_tokens(product))?;
    println!("== what changed: the same questions and seeds, base model vs live adapter {}", live.adapter_version);
    for (q, pair) in questions.iter().zip(out.chunks(2)) {
        let show = |c: &crate::simulate::Completion| {
            format!("{}{}", c.shown.replace('\n', " "), if c.finished { "" } else { " […]" })
        };
        println!("   Q: {q}\n      base:    {}\n      adapter: {}", show(&pair[0]), show(&pair[1]));
    }
    Ok(())
}

/// A service binary next to this one (`cargo build --workspace --bins`).
fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| CliError::Usage(e.to_string()))?;
    let bin = exe.parent().map(|d| d.join(name)).filter(|p| p.is_file());
    bin.ok_or_else(|| {
        CliError::Usage(format!("{name} is not built next to {}: run `cargo build --workspace --bins`", exe.display()))
    })
}

fn print_summary(started: Instant, sim: &SimStats, last_events: &mut (u64, Instant), watch: &Watch) {
    let rate = (sim.events - last_events.0) as f64 / last_events.1.elapsed().as_secs_f64().max(1e-3);
    *last_events = (sim.events, Instant::now());
    let count = |t: &str| watch.counts.iter().filter(|(k, _)| k.ends_with(t)).map(|(_, v)| *v).sum::<u64>();
    println!(
        "[{:>4}s] events {} ({rate:.0}/s) · rewards {} · shards {} · train requests {} · candidates {} · promoted {}",
        started.elapsed().as_secs(),
        sim.events,
        count("rewards"),
        count("shards"),
        count("train-requests"),
        watch.candidates.len(),
        watch.promoted().len()
    );
    if let Some(d) = &watch.last_decision {
        let failing: Vec<&str> = d.checks.iter().filter(|g| !g.passed).map(|g| g.message.as_str()).collect();
        let verdict = if d.fired { "fired".to_string() } else { format!("waiting: {}", failing.join("; ")) };
        println!("        trigger: {verdict}");
    }
    for e in watch.registry.values() {
        let live = e.live.as_ref().map_or("base", |a| a.adapter_version.as_str());
        let canary = e
            .canary
            .as_ref()
            .map(|c| format!(", canary {} at {:.0} %", c.adapter.adapter_version, c.traffic_share * 100.0));
        println!("        registry rev {}: live {live}{}", e.revision, canary.unwrap_or_default());
        if let Some(d) = e.history.last() {
            println!("        last release decision: {:?} {} — {}", d.action, d.adapter_version, d.reason);
        }
    }
    let mut versions: Vec<(&String, &(u64, u64))> = sim.by_version.iter().collect();
    versions.sort_by_key(|(v, _)| (*v != "base", watch.candidates.get(*v).map(|c| c.created_at)));
    for (v, (shown, _)) in versions {
        let measured = watch
            .accept
            .get(v)
            .filter(|(s, _)| *s > 0)
            .map(|(s, a)| format!("{:.3} ({s} shown)", *a as f64 / *s as f64));
        println!(
            "        accept rate {v:<20} users saw {:.3} ({shown} shown) · reward-metrics {}",
            sim.accept_rate(v).unwrap_or(f64::NAN),
            measured.unwrap_or_else(|| "pending".into())
        );
    }
}

/// Runs the flywheel until interrupted or done; returns what the topics say.
pub(crate) async fn up(
    kafka: &KafkaArgs,
    topics: &TopicsConfig,
    topics_file: Option<&Path>,
    args: &UpArgs,
    shutdown: CancellationToken,
) -> Result<Watch> {
    let data = std::path::absolute(&args.work_dir).map_err(|e| CliError::Usage(e.to_string()))?;
    for sub in ["logs", "models", "adapters", "lake", "rewarder"] {
        std::fs::create_dir_all(data.join(sub)).map_err(|e| CliError::Usage(format!("{}: {e}", data.display())))?;
    }
    let mut kafka = kafka.clone();
    let mut broker = if args.external_broker {
        println!("== using the brokers at {}", kafka.brokers);
        None
    } else {
        println!(
            "== starting the embedded broker on {} (data in {})",
            args.broker.listen,
            args.broker.data_dir.display()
        );
        let b = LocalBroker::start(
            &args.broker.tansu_bin,
            args.broker.listen,
            &args.broker.data_dir,
            Duration::from_secs(30),
        )?;
        kafka.brokers = b.bootstrap();
        Some(b)
    };
    let created = create_topics(&kafka, &topics.specs(), Duration::from_secs(30)).await?;
    println!("== topics: {} created, {} in the map", created.len(), Topic::ALL.len());
    let mut product = args.product.clone();
    product.base_model = args.model.base_model().to_string();
    let model_dir = data.join("models").join(&product.base_model);
    if !model_dir.join("model.safetensors").exists() {
        match args.model {
            UpModel::Tiny => {
                let model = flywheel_trainer::tiny::tiny_model(7).map_err(|e| CliError::Usage(e.to_string()))?;
                flywheel_trainer::tiny::save(&model, &model_dir).map_err(|e| CliError::Usage(e.to_string()))?;
            }
            UpModel::Smollm2 => {
                if !args.gguf.exists() {
                    return Err(CliError::Usage(format!(
                        "{} is missing: `make setup` fetches it (or pass --gguf)",
                        args.gguf.display()
                    )));
                }
                println!("== importing {} (4-bit weights expanded to bf16)", args.gguf.display());
                flywheel_trainer::import::import_gguf(
                    &args.gguf,
                    &model_dir,
                    flywheel_trainer::import::WeightDtype::Bf16,
                )
                .map_err(|e| CliError::Usage(format!("importing {}: {e}", args.gguf.display())))?;
            }
        }
    }
    println!("== base model {} in {}", product.base_model, model_dir.display());
    let (trigger_policy, release_policy) = write_policies(&data, args.model)?;

    // Flags every service takes (and `--ops-listen`, below).
    let mut common: Vec<String> = vec!["--kafka-brokers".into(), kafka.brokers.clone()];
    common.extend(["--log-filter".into(), "info".into()]);
    if let Some(f) = topics_file {
        common.extend(["--topics-config".into(), f.display().to_string()]);
    }
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    let path = |p: &Path| p.display().to_string();
    // The trainer's ops port is fixed up front (and kept across restarts) so
    // the console can read its job progress from `/metrics`; the others take any.
    let trainer_ops = flywheel_devkit::free_local_addr()
        .map_err(|e| CliError::Usage(format!("finding a free port for the trainer's metrics: {e}")))?;
    let trainer_metrics = format!("http://{trainer_ops}/metrics");
    // How late the simulated users' outcomes may reach the rewarder. The tiny
    // model answers at once, so they arrive in event-time order. SmolLM2's
    // batched generation holds the product's event loop for seconds, so a
    // reaction is posted up to ~10 s after its event time while later `shown`
    // events already moved the watermark: without this slack every outcome
    // was late and every reward `ignored`.
    // The idle advance waits as long, or it would close the windows the
    // lateness keeps open.
    let (lateness_ms, idle_advance_ms) = match args.model {
        UpModel::Tiny => ("0", "2000"),
        UpModel::Smollm2 => ("30000", "30000"),
    };
    let services: Vec<(&str, Vec<String>)> = vec![
        (
            "flywheel-collector",
            [
                s(&["--listen", &args.collector_listen.to_string(), "--token", &format!("{UP_TOKEN}=demo")]),
                s(&["--hmac-secret", "up-demo-secret-not-for-production", "--base-model", &product.base_model]),
            ]
            .concat(),
        ),
        (
            "flywheel-rewarder",
            [
                s(&["--group-id", "flywheel-up-rewarder", "--checkpoint-dir", &path(&data.join("rewarder"))]),
                s(&["--outcome-window-ms", "5000", "--allowed-lateness-ms", lateness_ms]),
                s(&["--idle-advance-after-ms", idle_advance_ms]),
                s(&["--checkpoint-every-ms", "1000", "--metrics-windows-ms", &WINDOW_MS.to_string()]),
            ]
            .concat(),
        ),
        (
            "flywheel-lake-writer",
            s(&[
                "--group-id",
                "flywheel-up-lake-writer",
                "--lake-root",
                &path(&data.join("lake")),
                "--roll-max-age-ms",
                "3000",
                "--roll-idle-ms",
                "1500",
            ]),
        ),
        ("flywheel-trigger", s(&["--policy", &path(&trigger_policy), "--evaluate-every-ms", "2000"])),
        (
            "flywheel-trainer",
            s(&[
                "--group-id",
                "flywheel-up-trainer",
                "--models-root",
                &path(&data.join("models")),
                "--adapters-root",
                &path(&data.join("adapters")),
                "--max-tokens",
                "128",
            ]),
        ),
        ("flywheel-gate", s(&["--policy", &path(&release_policy), "--evaluate-every-ms", "1000"])),
        (
            "flywheel-console",
            [
                s(&["--listen", &args.console_listen.to_string(), "--release-policy", &path(&release_policy)]),
                s(&["--lag-group", "flywheel-up-rewarder=interactions,flywheel-up-lake-writer=rewards"]),
                s(&["--refresh-ms", "3000", "--drain-timeout-secs", "5"]),
                s(&["--trainer-metrics-url", &trainer_metrics]),
            ]
            .concat(),
        ),
    ];
    let mut children = Vec::new();
    for (name, extra) in services {
        if args.freeze_training && name == "flywheel-trigger" {
            println!("== training frozen: the trigger is not started");
            continue;
        }
        if args.no_console && name == "flywheel-console" {
            continue;
        }
        let binary = sibling(name)?;
        let mut argv = common.clone();
        let ops = if name == "flywheel-trainer" { trainer_ops.to_string() } else { "127.0.0.1:0".into() };
        argv.extend(["--ops-listen".into(), ops]);
        argv.extend(extra);
        let log = data.join("logs").join(format!("{name}.log"));
        let child = Restarting::spawn(name, &binary, &argv, &data, &log, RestartPolicy::default())
            .map_err(|e| CliError::Usage(format!("starting {name}: {e}")))?;
        children.push(child);
    }
    println!("== services started; logs in {}", data.join("logs").display());
    if !args.no_console {
        println!("== console: http://{}/", args.console_listen);
    }
    println!(
        "== simulated product: {} users, {} requests/s, label noise {:.0} %, seed {}",
        product.users,
        product.rate,
        product.label_noise * 100.0,
        product.seed
    );

    let watch = Arc::new(Mutex::new(Watch::default()));
    let stop_watch = CancellationToken::new();
    let follower = {
        let (kafka, topics, watch, stop) = (kafka.clone(), topics.clone(), watch.clone(), stop_watch.clone());
        std::thread::spawn(move || follow(&kafka, &topics, WINDOW_MS, watch, stop))
    };
    let sim_args = SimulateArgs {
        collector: args.collector_listen,
        token: UP_TOKEN.into(),
        models_root: data.join("models"),
        product: product.clone(),
    };
    let sim_stop = shutdown.child_token();
    let started = Instant::now();
    let mut last_summary = Instant::now();
    let mut last_events = (0u64, Instant::now());
    let every = Duration::from_secs(args.summary_every_s.max(1));
    let (deadline, promotions) = (args.duration_s, args.stop_after_promotions);
    let mut crashed: Option<String> = None;
    let result = simulate(&sim_args, sim_stop.clone(), |stats| {
        let w = watch.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if last_summary.elapsed() >= every {
            print_summary(started, stats, &mut last_events, &w);
            if let Some(line) = restart_summary(&children) {
                println!("        {line}");
            }
            last_summary = Instant::now();
        }
        // A service that exits is started again with backoff; only one that
        // keeps failing fast stops the flywheel. The embedded broker, should
        // it exit, is started again on its address and data.
        if let Some(b) = broker.as_mut()
            && let Some(status) = b.exit_status()
        {
            println!("== the broker exited ({status}); starting it again");
            let (bin, listen, dir) = (&args.broker.tansu_bin, args.broker.listen, &args.broker.data_dir);
            match tokio::task::block_in_place(|| LocalBroker::start(bin, listen, dir, Duration::from_secs(30))) {
                Ok(again) => *b = again,
                Err(e) => {
                    crashed = Some(format!("the broker exited ({status}) and did not start again: {e}"));
                    sim_stop.cancel();
                }
            }
        }
        for c in children.iter_mut() {
            match c.poll() {
                Some(RestartEvent::Exited { status, restart_in }) => println!(
                    "== {} exited ({status}); starting it again in {restart_in:?} (log: {})",
                    c.name,
                    c.log_path().display()
                ),
                Some(RestartEvent::Restarted { restarts }) => {
                    println!("== {} started again (restart {restarts})", c.name)
                }
                Some(RestartEvent::GaveUp { status, failures }) => {
                    crashed = Some(format!(
                        "{} exited ({status}) after {failures} failed starts in a row; see {}",
                        c.name,
                        c.log_path().display()
                    ));
                    sim_stop.cancel();
                }
                None => {}
            }
        }
        if (deadline > 0 && started.elapsed() >= Duration::from_secs(deadline))
            || (promotions > 0 && w.promoted().len() >= promotions)
        {
            sim_stop.cancel();
        }
    })
    .await;
    println!("== stopping: the product, then each service (SIGTERM, drain), then the broker");
    // Decisions stop first (gate, trainer, trigger), then the data path in
    // pipeline order so every accepted event drains through.
    for c in children
        .iter_mut()
        .rev()
        .filter(|c| ["flywheel-gate", "flywheel-trainer", "flywheel-trigger"].contains(&c.name.as_str()))
    {
        c.stop(Duration::from_secs(20));
    }
    for c in children.iter_mut() {
        c.stop(Duration::from_secs(20));
    }
    stop_watch.cancel();
    let _ = follower.join();
    let stats = result?;
    let w = watch.lock().unwrap_or_else(|p| p.into_inner()).clone();
    print_summary(started, &stats, &mut last_events, &w);
    if let Err(e) = side_by_side(&data.join("models"), &product, &w) {
        println!("== (no side-by-side examples: {e})");
    }
    println!(
        "== the lake stays in {}; query it: duckdb -c \"install delta; load delta; select adapter_version, count(*), avg(case when outcome = 'ACCEPTED' then 1 else 0 end) as accept_rate from delta_scan('{}/rewards') group by all\"",
        data.join("lake").display(),
        data.join("lake").display()
    );
    match crashed {
        Some(why) => Err(CliError::Usage(why)),
        None => Ok(w),
    }
}
