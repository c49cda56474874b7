//! The lake writer: the Kafka service over the reward lake
//! ([`flywheel_lake`]). It consumes `rewards` in a consumer group, commits
//! each partition's rows to the Delta table exactly once (the partition's
//! offset travels in the same commit), then announces the new files on
//! `shards` and the rejected records on `dead-letters`.
//!
//! - `partition` (private): the per-partition decisions, free of Kafka and
//!   storage (offsets on arrival, due buffers, take-over publication), unit-tested;
//! - [`service`]: config, metrics and the consume loop that does the I/O.

mod partition;
pub(crate) mod service;

pub use service::{Config, run};

use flywheel_lake::LakeError;

/// The lake writer's errors.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// From the core library (configuration, Kafka clients, codec).
    #[error(transparent)]
    Core(#[from] flywheel_core::Error),
    /// From the lake.
    #[error(transparent)]
    Lake(#[from] LakeError),
    /// Bad configuration.
    #[error("configuration error: {0}")]
    Config(String),
    /// A Kafka client call failed (flushing the producer).
    #[error("kafka: {context}: {source}")]
    Kafka {
        /// What was being done.
        context: &'static str,
        /// The client error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The broker refused or timed out outputs (manifests, dead letters):
    /// the writer stops so that a restart publishes them again.
    #[error("outputs not acknowledged: {0}")]
    Undelivered(String),
    /// The publication marker could not be written as JSON.
    #[error("{context}: {source}")]
    Json {
        /// What was being written.
        context: &'static str,
        /// The serializer's error.
        #[source]
        source: serde_json::Error,
    },
}

impl WriterError {
    /// A stable, machine-readable code for logs and metrics.
    pub fn reason_code(&self) -> &'static str {
        match self {
            WriterError::Core(e) => e.reason_code(),
            WriterError::Lake(e) => e.reason_code(),
            WriterError::Config(_) => "config",
            WriterError::Kafka { .. } => "kafka",
            WriterError::Undelivered(_) => "kafka_undelivered",
            WriterError::Json { .. } => "state_json",
        }
    }
}
