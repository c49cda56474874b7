//! The console: a read-only web view of the flywheel, served from what is on
//! the topics. It reads `model-registry`, `reward-metrics`,
//! `trigger-decisions`, `train-requests`, `model-candidates`, `shards` and
//! `dead-letters` from the beginning, follows them, and never writes.
//!
//! - [`view`]: the in-memory view and every number the pages show (pure);
//! - [`svg`]: charts drawn on the server;
//! - [`html`]: the pages (every record string escaped);
//! - [`text`]: escaping, UTC times, number formats;
//! - [`trainer`]: the trainer's `/metrics`, scraped for a running job's progress;
//! - [`service`]: the Kafka follower, the offset probe and the HTTP server.

pub(crate) mod html;
pub(crate) mod service;
pub(crate) mod svg;
pub(crate) mod text;
pub(crate) mod trainer;
pub(crate) mod view;

pub use service::{Config, run};

/// The console's errors.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// From the core library (configuration, Kafka, codec).
    #[error(transparent)]
    Core(#[from] flywheel_core::Error),
    /// Bad configuration.
    #[error("configuration error: {0}")]
    Config(String),
    /// Serving HTTP failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Reading the trainer's `/metrics` failed (shown on the Training page).
    #[error("{0}")]
    Scrape(String),
}
