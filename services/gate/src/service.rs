//! The gate service. Its state is the topics: on start it reads
//! `model-registry`, `model-candidates` and `reward-metrics` from the
//! beginning and decides nothing until it has read all three to the ends
//! seen at start. Decisions are registry entries with increasing revisions,
//! published (and acknowledged) before the next decision is taken, so a
//! restart resumes from the last published entry: a candidate already in an
//! entry's history is never decided twice, a candidate that arrived while
//! the gate was down is decided once. Run one instance per cluster.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use flywheel_core::codec::decode;
use flywheel_core::kafka::{Publisher, TopicFollower};
use flywheel_core::policy::PairPolicies;
use flywheel_core::records::{ModelCandidate, RegistryEntry, ReleaseAction, RewardMetrics};
use flywheel_core::runtime::{CommonArgs, ServiceHarness};
use flywheel_core::topics::Topic;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use tokio_util::sync::CancellationToken;

use crate::GateError;
use crate::policy::ReleasePolicy;
use crate::release::GateState;

/// Release policies per (tenant, base model).
pub type Policies = PairPolicies<ReleasePolicy>;

/// Gate configuration; every flag has an environment variable.
#[derive(Debug, Clone, Parser)]
#[command(name = "flywheel-gate", version, about = "Releases adapters that measurably beat the live one")]
pub struct Config {
    /// Service, Kafka and topic flags every service has.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Release policy TOML: `[default]` and `[overrides."<tenant>/<base model>"]`.
    #[arg(long = "policy", env = "FLYWHEEL_GATE_POLICY")]
    pub policy: Option<PathBuf>,
    /// Re-read running canaries at least this often (for the maximum duration).
    #[arg(long = "evaluate-every-ms", env = "FLYWHEEL_GATE_EVALUATE_EVERY_MS", default_value_t = 5_000)]
    pub evaluate_every_ms: u64,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PairLabels {
    tenant: String,
    base_model: String,
}

#[derive(Debug, Clone, Default)]
struct Metrics {
    decisions: Family<ActionLabels, Counter>,
    candidates: Counter,
    windows: Counter,
    canary_running: Family<PairLabels, Gauge>,
    reward_p_value: Family<PairLabels, Gauge<f64, AtomicU64>>,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics::default();
        let r = registry.sub_registry_with_prefix("gate");
        r.register("decisions", "Release decisions by action", m.decisions.clone());
        r.register("candidates", "Model candidates read", m.candidates.clone());
        r.register("metrics_windows", "Reward-metrics records read", m.windows.clone());
        r.register("canary_running", "1 while a pair has a canary", m.canary_running.clone());
        r.register("canary_reward_p_value", "Always-valid p-value of the last canary look", m.reward_p_value.clone());
        m
    }

    fn entry(&self, e: &RegistryEntry) {
        let labels = PairLabels { tenant: e.tenant.clone(), base_model: e.base_model.clone() };
        self.canary_running.get_or_create(&labels).set(i64::from(e.canary.is_some()));
        if let Some(p) = e.history.last().and_then(|d| d.statistics.get("mean_reward_p_value")) {
            self.reward_p_value.get_or_create(&labels).set(*p);
        }
    }
}

fn action_name(a: ReleaseAction) -> &'static str {
    match a {
        ReleaseAction::Rejected => "rejected",
        ReleaseAction::CanaryStarted => "canary_started",
        ReleaseAction::Promoted => "promoted",
        ReleaseAction::RolledBack => "rolled_back",
        ReleaseAction::Expired => "expired",
    }
}

/// Runs the gate until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), GateError> {
    let topics = config.common.topics.load()?;
    let policies = Policies::load_or_default(config.policy.as_deref())?;
    let mut harness = ServiceHarness::new("gate", &config.common.service);
    let metrics = Metrics::register(harness.registry());
    let readiness = harness.readiness();
    readiness.set("caught_up", false);
    harness
        .run(shutdown, move |stop| async move {
            let names = [Topic::ModelRegistry, Topic::ModelCandidates, Topic::RewardMetrics].map(|t| topics.name(t));
            let publisher = Publisher::new(&config.common.kafka, &topics)?;
            let mut follower = TopicFollower::from_beginning(
                &config.common.kafka,
                "flywheel-gate",
                &names.each_ref().map(String::as_str),
            )?;
            let mut state = GateState::default();
            let every = Duration::from_millis(config.evaluate_every_ms.max(100));
            let mut last_look = Instant::now();
            let mut changed = false;
            tracing::info!(candidates = %names[1], metrics = %names[2], registry = %names[0], "gate started");
            while !stop.is_cancelled() {
                if let Some(record) = follower.next(Duration::from_millis(50)).await {
                    let payload = record.payload.as_deref().unwrap_or_default();
                    let skipped = |what: &str| {
                        tracing::warn!(topic = %record.topic, offset = record.offset, "undecodable {what} skipped")
                    };
                    if record.topic == names[0] {
                        match decode::<RegistryEntry>(payload) {
                            Ok(e) => state.registry(e),
                            Err(_) => skipped("registry entry"),
                        }
                    } else if record.topic == names[1] {
                        match decode::<ModelCandidate>(payload) {
                            Ok(c) => {
                                metrics.candidates.inc();
                                state.candidate(c);
                                changed = true;
                            }
                            Err(_) => skipped("candidate"),
                        }
                    } else {
                        match decode::<RewardMetrics>(payload) {
                            Ok(m) => {
                                metrics.windows.inc();
                                changed |= state.metrics.add(m);
                            }
                            Err(_) => skipped("metrics window"),
                        }
                    }
                }
                if !follower.caught_up() {
                    continue; // decide only on the whole history
                }
                readiness.set("caught_up", true);
                if !changed && last_look.elapsed() < every {
                    continue;
                }
                (changed, last_look) = (false, Instant::now());
                for entry in state.step(|t, m| policies.of(t, m), flywheel_core::now_millis()) {
                    publisher.publish(Topic::ModelRegistry, &entry).await?;
                    let d = entry.history.last().expect("a decision was appended");
                    metrics.decisions.get_or_create(&ActionLabels { action: action_name(d.action).into() }).inc();
                    metrics.entry(&entry);
                    tracing::info!(tenant = %entry.tenant, base_model = %entry.base_model, revision = entry.revision, adapter = %d.adapter_version, action = action_name(d.action), "{}", d.reason);
                }
            }
            Ok(())
        })
        .await
}
