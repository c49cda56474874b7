//! The trigger service: reads `shards` (and the live adapters of
//! `model-registry`) from the beginning, accumulates manifests per (tenant,
//! base model) since the last train request, evaluates the policy's checks
//! and publishes a `train-requests` record when they all hold, and a
//! `trigger-decisions` record whenever the outcome of an evaluation changes.
//!
//! Restart safety: the state is the topics. On start the trigger reads every
//! train request ever made; their shards are used, their times are the
//! cooldown and budget history. A request id is a hash of its shard set and
//! policy version, and a request is recorded as made only after the broker
//! acknowledged it, so a restart neither fires twice for the same shards nor
//! forgets a shard.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use flywheel_core::codec::decode;
use flywheel_core::kafka::{Publisher, TopicFollower, read_topic};
use flywheel_core::policy::PairPolicies;
use flywheel_core::records::{
    HoldoutRule, ObjectiveKind, RegistryEntry, ShardManifest, ShardRef, TrainRequest, TrainingObjective,
    TriggerDecision,
};
use flywheel_core::runtime::{CommonArgs, ServiceHarness};
use flywheel_core::topics::Topic;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::TriggerError;
use crate::policy::{Accumulated, Policy, RequestHistory, evaluate, request_id, stable_id};

/// Trigger configuration; every flag has an environment variable.
#[derive(Debug, Clone, Parser)]
#[command(name = "flywheel-trigger", version, about = "Fires training when there is enough good signal")]
pub struct Config {
    /// Service, Kafka and topic flags every service has.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Policy TOML: a `[default]` table and `[overrides."<tenant>/<base model>"]`
    /// tables (each a full policy; unset fields take the built-in defaults).
    #[arg(long = "policy", env = "FLYWHEEL_TRIGGER_POLICY")]
    pub policy: Option<PathBuf>,
    /// Re-evaluate every (tenant, base model) at least this often, so
    /// cooldowns and staleness are noticed without new shards.
    #[arg(long = "evaluate-every-ms", env = "FLYWHEEL_TRIGGER_EVALUATE_EVERY_MS", default_value_t = 60_000)]
    pub evaluate_every_ms: u64,
}

/// Trigger policies per (tenant, base model).
pub type Policies = PairPolicies<Policy>;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PairLabels {
    tenant: String,
    base_model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    check: String,
}

#[derive(Debug, Clone, Default)]
struct Metrics {
    requests: Counter,
    decisions: Counter,
    check_failures: Family<CheckLabels, Counter>,
    pending_examples: Family<PairLabels, Gauge>,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics::default();
        let r = registry.sub_registry_with_prefix("trigger");
        r.register("train_requests", "Train requests published", m.requests.clone());
        r.register("decisions", "Trigger decisions published", m.decisions.clone());
        r.register("check_failures", "Failed signal checks in published decisions", m.check_failures.clone());
        r.register("pending_examples", "Examples accumulated since the last request", m.pending_examples.clone());
        m
    }
}

/// The trigger's state, rebuilt from the topics on start.
#[derive(Debug, Default)]
pub struct TriggerState {
    /// (tenant, base model, shard id) already in a train request.
    pub used: HashSet<(String, String, String)>,
    /// Accumulated manifests per (tenant, base model).
    pub pending: BTreeMap<(String, String), (Accumulated, Vec<ShardManifest>)>,
    /// Request times per (tenant, base model).
    pub history: HashMap<(String, String), RequestHistory>,
    /// Live adapter per (tenant, base model), from the registry.
    pub live: HashMap<(String, String), String>,
    /// Pairs with a canary running, from the registry: training waits for
    /// the release to resolve, so the next adapter starts from the winner.
    pub canary: HashSet<(String, String)>,
    /// The last published decision's id per pair: a decision is published
    /// when it differs.
    pub last_decision: HashMap<(String, String), String>,
}

impl TriggerState {
    /// Records a request read from `train-requests`.
    pub fn request_made(&mut self, r: &TrainRequest) {
        let key = (r.tenant.clone(), r.base_model.clone());
        for s in &r.shards {
            self.used.insert((key.0.clone(), key.1.clone(), s.shard_id.clone()));
        }
        self.history.entry(key.clone()).or_default().created_at.push(r.created_at);
        if let Some((acc, manifests)) = self.pending.get_mut(&key) {
            manifests.retain(|m| !self.used.contains(&(key.0.clone(), key.1.clone(), m.shard_id.clone())));
            let mut fresh = Accumulated::default();
            for m in manifests.iter() {
                fresh.add(m, &key.1);
            }
            *acc = fresh;
        }
    }

    /// Adds a manifest to every base model it has rows of (unless used).
    pub fn manifest(&mut self, m: ShardManifest) {
        let models: std::collections::BTreeSet<String> = m.versions.iter().map(|v| v.model_id.clone()).collect();
        for model in models {
            if self.used.contains(&(m.tenant.clone(), model.clone(), m.shard_id.clone())) {
                continue;
            }
            let (acc, manifests) = self.pending.entry((m.tenant.clone(), model.clone())).or_default();
            if manifests.iter().any(|x| x.shard_id == m.shard_id) {
                continue; // the same manifest twice
            }
            acc.add(&m, &model);
            manifests.push(m.clone());
        }
    }
}

/// Default training settings of a request (the trainer's issue refines them).
pub fn default_objective(seed: i64) -> TrainingObjective {
    TrainingObjective {
        kind: ObjectiveKind::Reinforce,
        lora_rank: 8,
        lora_alpha: 16.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        learning_rate: 1e-4,
        weight_decay: 0.0,
        warmup_steps: 10,
        max_steps: 200,
        batch_size: 16,
        max_grad_norm: 1.0,
        kl_coef: 0.05,
        ppo_clip: None,
        reject_floor: None,
        kto_beta: 0.1,
        kto_desirable_weight: 1.0,
        kto_undesirable_weight: 1.0,
        seed,
    }
}

/// One evaluation of a pair: the decision, and the request when it fires.
pub fn decide(
    state: &TriggerState,
    policies: &Policies,
    tenant: &str,
    base_model: &str,
    now: i64,
) -> Option<(TriggerDecision, Option<TrainRequest>)> {
    let key = (tenant.to_string(), base_model.to_string());
    let (acc, manifests) = state.pending.get(&key)?;
    if manifests.is_empty() {
        return None;
    }
    let policy = policies.of(tenant, base_model);
    let history = state.history.get(&key).cloned().unwrap_or_default();
    let mut checks = evaluate(policy, acc, &history, now);
    let canaries = f64::from(u8::from(state.canary.contains(&key)));
    checks.push(crate::policy::check("canary_running", canaries, "<", 1.0, "limit"));
    let fired = checks.iter().all(|g| g.passed);
    let mut shard_ids = acc.shard_ids.clone();
    shard_ids.sort();
    let request = fired.then(|| {
        let id = request_id(tenant, base_model, policy, &shard_ids);
        let seed = i64::from_str_radix(&id[..15], 16).unwrap_or_default();
        TrainRequest {
            request_id: id,
            tenant: tenant.into(),
            base_model: base_model.into(),
            parent_adapter_version: state.live.get(&key).cloned(),
            shards: manifests
                .iter()
                .map(|m| ShardRef {
                    shard_id: m.shard_id.clone(),
                    uri: m.uri.clone(),
                    lake_root: m.lake_root.clone(),
                    content_sha256: m.content_sha256.clone(),
                    rows: m.rows,
                    table_version: (m.commit_seq >= 0).then_some(m.commit_seq),
                })
                .collect(),
            window_start: manifests.iter().map(|m| m.min_event_time).min().unwrap_or_default(),
            window_end: manifests.iter().map(|m| m.max_event_time).max().unwrap_or_default(),
            objective: {
                let mut o = default_objective(seed);
                policy.objective.apply(&mut o);
                o
            },
            holdout: HoldoutRule {
                salt: format!("{tenant}/{base_model}/holdout-v1"),
                fraction: policy.holdout_fraction,
            },
            policy_version: policy.version.clone(),
            created_at: now,
        }
    });
    let failing: Vec<&str> = checks.iter().filter(|g| !g.passed).map(|g| g.check.as_str()).collect();
    let mut parts = vec![tenant, base_model, policy.version.as_str()];
    parts.extend(shard_ids.iter().map(String::as_str));
    parts.push("|");
    parts.extend(failing);
    let decision = TriggerDecision {
        decision_id: stable_id(&parts),
        tenant: tenant.into(),
        base_model: base_model.into(),
        evaluated_at: now,
        fired,
        train_request_id: request.as_ref().map(|r| r.request_id.clone()),
        policy_version: policy.version.clone(),
        shard_ids,
        checks,
    };
    Some((decision, request))
}

/// Runs the trigger until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), TriggerError> {
    let topics = config.common.topics.load()?;
    let policies = Policies::load_or_default(config.policy.as_deref())?;
    let mut harness = ServiceHarness::new("trigger", &config.common.service);
    let metrics = Metrics::register(harness.registry());
    let readiness = harness.readiness();
    readiness.set("caught_up", false);
    harness
        .run(shutdown, move |stop| async move {
            let names = (topics.name(Topic::Shards), topics.name(Topic::ModelRegistry));
            // Every request ever made: used shards and the request history.
            let mut state = TriggerState::default();
            let (kafka, requests_topic) = (config.common.kafka.clone(), topics.name(Topic::TrainRequests));
            let reading = tokio::task::spawn_blocking(move || {
                read_topic(&kafka, "flywheel-trigger-requests", &requests_topic, Duration::from_secs(60))
            });
            let made: Vec<TrainRequest> = tokio::select! {
                read = reading => read.map_err(|e| flywheel_core::Error::panicked("reading train requests", e))??,
                _ = stop.cancelled() => return Ok(()), // stopped while starting: nothing was decided
            };
            for r in &made {
                state.request_made(r);
            }
            tracing::info!(requests = made.len(), used_shards = state.used.len(), "recovered from train-requests");

            let publisher = Publisher::new(&config.common.kafka, &topics)?;
            let mut follower =
                TopicFollower::from_beginning(&config.common.kafka, "flywheel-trigger", &[&names.0, &names.1])?;
            let mut dirty: HashSet<(String, String)> = HashSet::new();
            let every = Duration::from_millis(config.evaluate_every_ms.max(100));
            let mut last_sweep = Instant::now();
            tracing::info!(shards = %names.0, "trigger started");
            while !stop.is_cancelled() {
                if let Some(record) = follower.next(Duration::from_millis(50)).await {
                    let payload = record.payload.as_deref();
                    if record.topic == names.0 {
                        match payload.map(decode::<ShardManifest>) {
                            Some(Ok(m)) => {
                                for v in &m.versions {
                                    dirty.insert((m.tenant.clone(), v.model_id.clone()));
                                }
                                state.manifest(m);
                            }
                            _ => tracing::warn!(offset = record.offset, "undecodable shard manifest skipped"),
                        }
                    } else if let Some(Ok(e)) = payload.map(decode::<RegistryEntry>) {
                        let key = (e.tenant.clone(), e.base_model.clone());
                        if e.canary.is_some() {
                            state.canary.insert(key.clone());
                        } else {
                            state.canary.remove(&key);
                        }
                        dirty.insert(key.clone());
                        match e.live {
                            Some(live) => state.live.insert(key, live.adapter_version),
                            None => state.live.remove(&key),
                        };
                    }
                }
                if !follower.caught_up() {
                    continue; // decide only on the whole history
                }
                readiness.set("caught_up", true);
                if last_sweep.elapsed() >= every {
                    dirty.extend(state.pending.keys().cloned());
                    last_sweep = Instant::now();
                }
                for key in std::mem::take(&mut dirty) {
                    let now = flywheel_core::now_millis();
                    let Some((decision, request)) = decide(&state, &policies, &key.0, &key.1, now) else { continue };
                    let labels = PairLabels { tenant: key.0.clone(), base_model: key.1.clone() };
                    let pending = state.pending.get(&key).map_or(0, |(a, _)| a.examples);
                    metrics.pending_examples.get_or_create(&labels).set(pending as i64);
                    if let Some(request) = &request {
                        publisher.publish(Topic::TrainRequests, request).await?;
                        state.request_made(request);
                        metrics.requests.inc();
                        tracing::info!(tenant = %key.0, base_model = %key.1, request = %request.request_id, shards = request.shards.len(), "train request published");
                    }
                    if state.last_decision.get(&key) == Some(&decision.decision_id) {
                        continue;
                    }
                    for g in decision.checks.iter().filter(|g| !g.passed) {
                        metrics.check_failures.get_or_create(&CheckLabels { check: g.check.clone() }).inc();
                        tracing::info!(tenant = %key.0, base_model = %key.1, check = %g.check, "{}", g.message);
                    }
                    publisher.publish(Topic::TriggerDecisions, &decision).await?;
                    metrics.decisions.inc();
                    state.last_decision.insert(key, decision.decision_id);
                }
            }
            Ok(())
        })
        .await
}
