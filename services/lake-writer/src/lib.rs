//! The lake writer: rewards from Kafka into a Hive-partitioned Parquet lake
//! that analysts query directly, committed atomically and exactly once.
//!
//! - [`service`]: the Kafka service (`rewards` → lake, `shards`, `dead-letters`);
//! - [`lake`]: Hive layout, partition-value validation and the atomic commit log;
//! - [`store`]: local directory or object store underneath;
//! - [`shard`]: buffered records → files, rejected records and manifests;
//! - [`parquet_shard`]: reward records → Arrow → Parquet, columns derived from
//!   the reward Avro schema.

pub mod compact;
pub mod lake;
pub mod parquet_shard;
pub mod service;
pub mod shard;
pub mod store;

pub use service::{Config, run};

/// The lake writer's errors.
#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    /// From the core library.
    #[error(transparent)]
    Core(#[from] flywheel_core::Error),
    /// Bad configuration or use.
    #[error("configuration error: {0}")]
    Config(String),
    /// Arrow or Avro-to-Arrow decoding failed.
    #[error("{context}: {detail}")]
    Arrow {
        /// What was being done.
        context: String,
        /// The library's message.
        detail: String,
    },
    /// A value from data cannot name a partition directory.
    #[error("invalid {name} '{value}': partition values must be 1-64 characters of [a-z0-9_-]")]
    InvalidPartitionValue {
        /// Which partition column.
        name: String,
        /// The value (truncated).
        value: String,
    },
    /// A filesystem operation failed.
    #[error("{context}: {detail}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        detail: String,
    },
    /// The commit log is unreadable or inconsistent.
    #[error("commit log {path}: {detail}")]
    Log {
        /// Entry.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// An object that must be created fresh already exists.
    #[error("{0} already exists")]
    Exists(String),
    /// Another writer committed the same source partition first (a zombie
    /// after a rebalance): this writer's buffered rows are stale.
    #[error("commit conflict: {0}")]
    Conflict(String),
    /// Producing manifests or dead letters failed.
    #[error("kafka: {0}")]
    Kafka(String),
    /// Parquet encoding failed.
    #[error("{context}: {detail}")]
    Parquet {
        /// What was being done.
        context: String,
        /// The library's message.
        detail: String,
    },
}

impl LakeError {
    fn arrow(context: &'static str) -> impl Fn(arrow_schema::ArrowError) -> LakeError {
        move |e| LakeError::Arrow { context: context.into(), detail: e.to_string() }
    }

    fn parquet(context: &'static str) -> impl Fn(parquet::errors::ParquetError) -> LakeError {
        move |e| LakeError::Parquet { context: context.into(), detail: e.to_string() }
    }
}
