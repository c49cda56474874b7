//! The trainer service: consumes `train-requests`, runs each as a job
//! ([`crate::job`]) and publishes its `model-candidates` record; a request
//! that cannot be trained (missing or tampered shard, unsupported model) is
//! dead-lettered with the reason and publishes nothing.
//!
//! Exactly once per request: on start the trainer reads every candidate
//! already published and skips their requests; a job is deterministic, so a
//! request retried after a crash produces the same adapter version and
//! bytes. The group offset is committed after the candidate is acknowledged.

use std::collections::HashSet;
use std::time::Duration;

use clap::Parser;
use flywheel_core::codec::decode;
use flywheel_core::kafka::{ClientRole, GroupWatch, Publisher, read_topic, stall_after};
use flywheel_core::records::{DeadLetter, ModelCandidate, SourcePosition, TrainRequest};
use flywheel_core::runtime::{CommonArgs, Readiness, ServiceHarness};
use flywheel_core::topics::{Topic, TopicsConfig};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use std::sync::atomic::AtomicU64;
use tokio_util::sync::CancellationToken;

use crate::TrainerError;
use crate::job::{JobSettings, Progress, run_job_until};

/// Trainer configuration; every flag has an environment variable.
#[derive(Debug, Clone, Parser)]
#[command(name = "flywheel-trainer", version, about = "Trains LoRA adapters from train requests")]
pub struct Config {
    /// Service, Kafka and topic flags every service has.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Consumer group.
    #[arg(long = "group-id", env = "FLYWHEEL_TRAINER_GROUP_ID", default_value = "flywheel-trainer")]
    pub group_id: String,
    /// Models, adapters, limits and device of every job.
    #[command(flatten)]
    pub job: JobSettings,
}

/// The trainer's metrics (`trainer_*` on the ops server's `/metrics`; the
/// console scrapes the `busy` and `job_*` gauges for its progress panel).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    candidates: Counter,
    failed: Counter,
    skipped: Counter,
    busy: Gauge,
    step: Gauge,
    steps: Gauge,
    loss: Gauge<f64, AtomicU64>,
    tokens_per_second: Gauge<f64, AtomicU64>,
    eta_seconds: Gauge<f64, AtomicU64>,
}

impl Metrics {
    /// Registers every trainer metric under the `trainer` prefix and returns
    /// the sub-registry (the group watch adds its own there).
    pub fn register(registry: &mut Registry) -> (Metrics, &mut Registry) {
        let metrics = Metrics::default();
        let r = registry.sub_registry_with_prefix("trainer");
        r.register("candidates", "Model candidates published", metrics.candidates.clone());
        r.register("failed_requests", "Train requests dead-lettered", metrics.failed.clone());
        r.register("skipped_requests", "Train requests already trained", metrics.skipped.clone());
        r.register("busy", "1 while a job runs", metrics.busy.clone());
        r.register("job_step", "Steps done in the running (or last) job", metrics.step.clone());
        r.register("job_steps", "Steps in the running (or last) job", metrics.steps.clone());
        r.register("job_loss", "Loss of the last training step", metrics.loss.clone());
        r.register(
            "job_tokens_per_second",
            "Training throughput of the running job: tokens of its examples per second (a prefix the batch shares counted per example, though computed once)",
            metrics.tokens_per_second.clone(),
        );
        r.register("job_eta_seconds", "Estimated time left in the running job", metrics.eta_seconds.clone());
        (metrics, r)
    }

    /// Sets `trainer_busy` (1 while a job runs).
    pub fn set_busy(&self, busy: bool) {
        self.busy.set(i64::from(busy));
    }

    /// Sets the `job_*` gauges from a training step's report.
    pub fn progress(&self, p: &Progress) {
        self.step.set(p.step as i64);
        self.steps.set(p.steps as i64);
        self.loss.set(p.loss);
        self.tokens_per_second.set(p.tokens_per_second());
        self.eta_seconds.set(p.eta().as_secs_f64());
    }
}

/// Runs the trainer until `shutdown`. A job in progress stops before its
/// next training step; its request is not committed and is trained again
/// after a restart (jobs are deterministic).
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), TrainerError> {
    let topics = config.common.topics.load()?;
    let mut harness = ServiceHarness::new("trainer", &config.common.service);
    let readiness = harness.readiness();
    readiness.set("recovered", false);
    let requests = topics.name(Topic::TrainRequests);
    let (metrics, r) = Metrics::register(harness.registry());
    // The owner commits its group offset after each request; a job's length
    // is unbounded, so a waiting member allows a minute per request before it
    // rejoins (and backs off after that: GroupWatch).
    let stall = stall_after(config.common.kafka.session_timeout_ms, Duration::from_secs(60));
    let watch = GroupWatch::new(&requests, stall, readiness.clone(), r);
    harness.run(shutdown, move |stop| consume(config, topics, metrics, readiness, watch, stop)).await
}

async fn consume(
    config: Config,
    topics: TopicsConfig,
    metrics: Metrics,
    readiness: Readiness,
    watch: GroupWatch,
    stop: CancellationToken,
) -> Result<(), TrainerError> {
    let requests = topics.name(Topic::TrainRequests);
    // Requests already trained: their candidates are on the topic.
    let (kafka, candidates_topic) = (config.common.kafka.clone(), topics.name(Topic::ModelCandidates));
    let reading = tokio::task::spawn_blocking(move || {
        read_topic::<ModelCandidate>(&kafka, "flywheel-trainer-candidates", &candidates_topic, Duration::from_secs(60))
    });
    let candidates = tokio::select! {
        read = reading => read.map_err(|e| flywheel_core::Error::panicked("reading candidates", e))??,
        _ = stop.cancelled() => return Ok(()), // stopped while starting: nothing was consumed
    };
    let mut done: HashSet<String> = candidates.into_iter().map(|c| c.request_id).collect();
    readiness.set("recovered", true);
    tracing::info!(trained = done.len(), "recovered trained requests from the candidates topic");

    let publisher = Publisher::new(&config.common.kafka, &topics)?;
    let consumer: StreamConsumer = config
        .common
        .kafka
        .client_config(&ClientRole::Consumer { group_id: config.group_id.clone() })?
        // A job may take long: stay in the group meanwhile.
        .set("max.poll.interval.ms", "86400000")
        .create()
        .map_err(|e| flywheel_core::Error::kafka("creating consumer", e))?;
    consumer.subscribe(&[&requests]).map_err(|e| flywheel_core::Error::kafka("subscribing", e))?;
    let consumer = std::sync::Arc::new(consumer);
    let mut watch = Some(watch);
    let settings = config.job.clone();
    tracing::info!(input = %requests, "trainer started");
    let mut group_check = tokio::time::interval(Duration::from_secs(1));
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            _ = group_check.tick() => {
                // Between jobs: keep readiness current and rejoin if the
                // partition has no working owner (the watch may query the broker).
                if let Some(mut w) = watch.take() {
                    let c = consumer.clone();
                    watch = tokio::task::spawn_blocking(move || {
                        w.tick(c.as_ref());
                        w
                    })
                    .await
                    .ok();
                }
                continue;
            }
            m = consumer.recv() => m,
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "consume error");
                continue;
            }
        };
        let position =
            SourcePosition { topic: msg.topic().to_string(), partition: msg.partition(), offset: msg.offset() };
        let payload = msg.payload().map(<[u8]>::to_vec);
        let failure: Option<(&str, String)> = match payload.as_deref().map(decode::<TrainRequest>) {
            Some(Ok(req)) if done.contains(&req.request_id) => {
                metrics.skipped.inc();
                tracing::info!(request = %req.request_id, "already trained; skipped");
                None
            }
            Some(Ok(req)) => {
                metrics.set_busy(true);
                let (settings, runtime) = (settings.clone(), tokio::runtime::Handle::current());
                let id = req.request_id.clone();
                let (job_metrics, job_stop) = (metrics.clone(), stop.clone());
                let result = tokio::task::spawn_blocking(move || {
                    run_job_until(&req, &settings, &runtime, &|| job_stop.is_cancelled(), &mut |p| {
                        job_metrics.progress(p)
                    })
                })
                .await
                .map_err(|e| TrainerError::from(flywheel_core::Error::panicked(format!("the job of {id}"), e)))
                .and_then(|r| r);
                metrics.set_busy(false);
                match result {
                    Ok((candidate, _)) => {
                        publisher.publish(Topic::ModelCandidates, &candidate).await?;
                        metrics.candidates.inc();
                        tracing::info!(request = %id, adapter = %candidate.adapter_version, "candidate published");
                        done.insert(id);
                        None
                    }
                    Err(e @ TrainerError::Cancelled { .. }) => {
                        // Not committed: the next owner trains it again.
                        tracing::info!(request = %id, "{e}; the request stays pending");
                        break;
                    }
                    Err(e) => Some((e.reason_code(), e.to_string())),
                }
            }
            Some(Err(e)) => Some((e.reason_code(), e.to_string())),
            None => Some(("empty_value", "record has no value".to_string())),
        };
        if let Some((code, reason)) = failure {
            metrics.failed.inc();
            tracing::warn!(%reason, code, offset = position.offset, "train request dead-lettered");
            let letter = DeadLetter {
                service: "trainer".into(),
                reason_code: code.into(),
                reason,
                source: position,
                original_key: msg.key().map(<[u8]>::to_vec),
                original_value: payload,
                failed_at: flywheel_core::now_millis(),
            };
            publisher.publish(Topic::DeadLetters, &letter).await?;
        }
        if let Err(e) = consumer.commit_message(&msg, CommitMode::Async) {
            tracing::warn!(error = %e, "committing the group offset failed");
        }
    }
    Ok(())
}
