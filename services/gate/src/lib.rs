//! The release gate: consumes `model-candidates` and `reward-metrics`,
//! writes the compacted `model-registry` (live adapter, canary and share,
//! decision history per tenant and base model).
//!
//! - [`policy`]: the release policy (offline thresholds, canary settings, guardrails);
//! - [`sequential`]: always-valid two-sample tests (mSPRT);
//! - [`release`]: the state machine from candidates and metrics to decisions;
//! - [`service`]: the Kafka service.

pub use service::{Config, run};

pub mod policy;
pub(crate) mod release;
pub mod sequential;
pub mod service;

/// The gate's errors.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// From the core library (configuration, Kafka, codec).
    #[error(transparent)]
    Core(#[from] flywheel_core::Error),
}
