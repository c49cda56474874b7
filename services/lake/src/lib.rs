//! The reward lake: a Delta Lake table of Parquet files that every
//! analyst's engine reads (DuckDB `delta_scan`, Spark, Trino, polars,
//! Python `deltalake`), written exactly once from Kafka. Kafka-free: the lake
//! writer service drives it, the trainer and the CLI read it.
//!
//! - [`table`]: the Delta table: Hive layout, partition-value validation,
//!   commits that carry each source partition's offset as a `txn` action,
//!   compaction commits, vacuum, checkpoints, pinned-version reads;
//! - [`store`]: a local directory or an object store underneath;
//! - [`shard`]: buffered records → files, rejected records and manifests;
//! - [`parquet`]: reward records → Arrow → Parquet, columns derived from the
//!   reward Avro schema;
//! - [`compact`]: merging small files of closed hours.

pub mod compact;
pub mod parquet;
pub mod shard;
pub mod store;
pub mod table;

/// Opens the lake at `root` (a directory or URL, see [`store::open_storage`])
/// for tools and readers; fails if it has no table yet. Blocks on `runtime`:
/// call it from a blocking thread.
pub fn open_lake(root: &str, runtime: tokio::runtime::Handle) -> Result<table::Lake, LakeError> {
    table::Lake::open(store::open_storage(root, runtime.clone())?, runtime)
}

/// The lake's errors.
#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    /// From the core library.
    #[error(transparent)]
    Core(#[from] flywheel_core::Error),
    /// Bad configuration or use.
    #[error("configuration error: {0}")]
    Config(String),
    /// Arrow or Avro-to-Arrow decoding failed.
    #[error("{context}: {source}")]
    Arrow {
        /// What was being done.
        context: String,
        /// The library's error.
        #[source]
        source: arrow_schema::ArrowError,
    },
    /// A value from data cannot name a partition directory.
    #[error("invalid {name} '{value}': partition values must be 1-64 characters of [a-z0-9_-]")]
    InvalidPartitionValue {
        /// Which partition column.
        name: String,
        /// The value (truncated).
        value: String,
    },
    /// A filesystem or object-store operation failed.
    #[error("{context}: {detail}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS's or store's message.
        detail: String,
    },
    /// The Delta log could not be read or written.
    #[error("delta table {context}: {source}")]
    Delta {
        /// What was being done.
        context: String,
        /// The library's error.
        #[source]
        source: Box<deltalake_core::DeltaTableError>,
    },
    /// The table's log or a committed file is not what the lake wrote.
    #[error("integrity: {0}")]
    Integrity(String),
    /// An object that must be created fresh already exists.
    #[error("{0} already exists")]
    Exists(String),
    /// Another writer committed the same source partition first (a zombie
    /// after a rebalance), or removed a file this commit removes: this
    /// writer's buffered rows (or merge) are stale.
    #[error("commit conflict: {0}")]
    Conflict(String),
    /// Parquet encoding or decoding failed.
    #[error("{context}: {source}")]
    Parquet {
        /// What was being done.
        context: String,
        /// The library's error.
        #[source]
        source: ::parquet::errors::ParquetError,
    },
}

impl LakeError {
    pub(crate) fn arrow(context: &'static str) -> impl Fn(arrow_schema::ArrowError) -> LakeError {
        move |source| LakeError::Arrow { context: context.into(), source }
    }

    pub(crate) fn parquet(context: &'static str) -> impl Fn(::parquet::errors::ParquetError) -> LakeError {
        move |source| LakeError::Parquet { context: context.into(), source }
    }

    pub(crate) fn avro(context: &'static str) -> impl Fn(arrow_avro::errors::AvroError) -> LakeError {
        move |e| LakeError::Arrow { context: context.into(), source: arrow_schema::ArrowError::from(e) }
    }

    pub(crate) fn delta(context: impl Into<String>) -> impl FnOnce(deltalake_core::DeltaTableError) -> LakeError {
        let context = context.into();
        move |source| LakeError::Delta { context, source: Box::new(source) }
    }

    /// A stable, machine-readable code for dead letters, metrics and logs.
    pub fn reason_code(&self) -> &'static str {
        match self {
            LakeError::Core(_) => "core",
            LakeError::Config(_) => "config",
            LakeError::Arrow { .. } => "arrow_decode",
            LakeError::InvalidPartitionValue { .. } => "invalid_partition_value",
            LakeError::Io { .. } => "storage_io",
            LakeError::Delta { .. } => "delta_log",
            LakeError::Integrity(_) => "integrity",
            LakeError::Exists(_) => "exists",
            LakeError::Conflict(_) => "commit_conflict",
            LakeError::Parquet { .. } => "parquet",
        }
    }
}
