//! The trigger: accumulates shard manifests per (tenant, base model) and
//! fires a train request when there is enough *good* signal, explaining every
//! evaluation that does not fire.
//!
//! - [`policy`]: the signal checks, pure and deterministic;
//! - [`service`]: the Kafka service (`shards` → `train-requests`, `trigger-decisions`).

pub mod policy;
pub mod service;

pub use service::{Config, run};

/// The trigger's errors.
#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    /// From the core library.
    #[error(transparent)]
    Core(#[from] flywheel_core::Error),
    /// Bad configuration.
    #[error("configuration error: {0}")]
    Config(String),
}
