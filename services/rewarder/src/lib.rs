//! The rewarder: turns a partition's interaction events into one reward per
//! shown suggestion, exactly once, from `interactions` to `rewards`,
//! `interactions-late` and `dead-letters`.
//!
//! - [`reward_fn`]: the versioned reward function;
//! - [`join`]: the deterministic per-partition event-time join;
//! - [`window_metrics`]: rolling per-version metrics over the emitted rewards;
//! - [`service`]: the Kafka service with checkpoints and read-back on resume.

pub mod join;
pub mod reward_fn;
pub mod service;
pub mod window_metrics;

pub use service::{Config, RewarderError, run};
