//! Flywheel core: the one small library every service shares.
//!
//! - [`records`]: the record types on every topic (mirroring `schemas/*.avsc`);
//! - [`codec`]: Avro single-object encoding with writer→reader schema resolution;
//! - [`topics`]: the topic map and per-deployment overrides;
//! - [`kafka`]: librdkafka configuration (pass-through, secrets masked) and topic creation;
//! - [`runtime`]: flags, tracing, graceful shutdown and the ops endpoint.
//!
//! It deliberately has no Arrow, Parquet or CUDA dependencies.

pub mod codec;
pub mod error;
pub mod kafka;
pub mod records;
pub mod runtime;
pub mod topics;

pub use codec::{AvroRecord, Codec, RecordKind};
pub use error::{Error, Result};

/// Wall-clock time in milliseconds since the Unix epoch.
pub fn now_millis() -> records::EpochMillis {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}
