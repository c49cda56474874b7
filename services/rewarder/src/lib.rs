//! The rewarder: turns a partition's interaction events into one reward per
//! shown suggestion, exactly once, from `interactions` to `rewards`,
//! `interactions-late` and `dead-letters`.
//!
//! - [`reward_fn`]: the versioned reward function;
//! - [`join`]: the deterministic per-partition event-time join;
//! - [`window_metrics`]: rolling per-version metrics over the emitted rewards;
//! - [`service`]: the Kafka service with checkpoints and read-back on resume,
//!   around `checkpoint` (format and storage) and `partition` (its Kafka-free
//!   per-partition decisions);
//! - `config`, `error`, `metrics`: its flags, errors and Prometheus metrics.

mod checkpoint;
mod config;
mod error;
pub mod join;
mod metrics;
mod partition;
pub mod reward_fn;
pub mod service;
pub mod window_metrics;

pub use config::Config;
pub use error::RewarderError;
pub use service::run;
