//! The core library's error type.

use crate::kind::RecordKind;

/// Result alias for the core library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in shared code. Codec variants are precise so
/// services can route bad records to the dead-letter topic with a
/// machine-readable reason ([`Error::reason_code`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Fewer bytes than the 10-byte single-object header.
    #[error("record too short for an Avro single-object header: {len} bytes, need at least 10")]
    Truncated {
        /// Bytes received.
        len: usize,
    },
    /// The record does not start with `C3 01`.
    #[error("not an Avro single-object record: magic {found:02x?}, expected [c3, 01]")]
    BadMagic {
        /// The first two bytes.
        found: [u8; 2],
    },
    /// The writer schema's fingerprint is not one this binary knows.
    #[error("unknown writer schema fingerprint {fingerprint:#018x}: written by a newer or foreign producer")]
    UnknownFingerprint {
        /// Little-endian fingerprint.
        fingerprint: u64,
    },
    /// A record of another kind arrived (e.g. a reward on the interactions topic).
    #[error("expected a {expected} record, found a {found} record")]
    WrongKind {
        /// What the reader wanted.
        expected: RecordKind,
        /// What the writer wrote.
        found: RecordKind,
    },
    /// The datum does not decode under its writer schema.
    #[error("malformed {kind} record: {detail}")]
    Malformed {
        /// Kind being decoded.
        kind: RecordKind,
        /// Decoder message.
        detail: String,
    },
    /// A value does not fit its schema.
    #[error("cannot encode {kind} record: {detail}")]
    Encode {
        /// Kind being encoded.
        kind: RecordKind,
        /// Encoder message.
        detail: String,
    },
    /// A schema file is invalid.
    #[error("invalid schema: {0}")]
    Schema(String),
    /// Bad configuration (names the setting and what is wrong).
    #[error("configuration error: {0}")]
    Config(String),
    /// A Kafka client call failed.
    #[error("kafka {context}: {source}")]
    Kafka {
        /// What was being done.
        context: String,
        /// The client error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// Records that had to be read back from Kafka could not be.
    #[error("kafka read-back: {0}")]
    ReadBack(String),
    /// An I/O error with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A service's task panicked (a bug: the message says where).
    #[error("{task} panicked: {detail}")]
    Panicked {
        /// Which task.
        task: String,
        /// The panic message.
        detail: String,
    },
    /// Work still running when the drain timeout after SIGTERM/SIGINT ran
    /// out was abandoned (it is redone after a restart: nothing is lost).
    #[error("{remaining} task(s) still running after the drain timeout of {timeout:?}; abandoned")]
    DrainTimeout {
        /// Tasks abandoned.
        remaining: usize,
        /// The drain timeout.
        timeout: std::time::Duration,
    },
}

impl Error {
    /// Stable machine-readable code, used as the dead-letter `reason_code`
    /// and as a metrics label.
    pub fn reason_code(&self) -> &'static str {
        match self {
            Error::Truncated { .. } => "truncated",
            Error::BadMagic { .. } => "bad_magic",
            Error::UnknownFingerprint { .. } => "unknown_schema",
            Error::WrongKind { .. } => "wrong_record_kind",
            Error::Malformed { .. } => "malformed_avro",
            Error::Encode { .. } => "encode_failed",
            Error::Schema(_) => "invalid_schema",
            Error::Config(_) => "config",
            Error::Kafka { .. } | Error::ReadBack(_) => "kafka",
            Error::Io { .. } => "io",
            Error::Panicked { .. } => "panicked",
            Error::DrainTimeout { .. } => "drain_timeout",
        }
    }

    /// Wraps a Kafka error with context.
    pub fn kafka(context: impl Into<String>, source: rdkafka::error::KafkaError) -> Self {
        Error::Kafka { context: context.into(), source }
    }

    /// A panicked task's error, with the panic message when there is one.
    pub fn panicked(task: impl Into<String>, join: tokio::task::JoinError) -> Self {
        let detail = match join.try_into_panic() {
            Ok(payload) => match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
                (Some(s), _) => (*s).to_string(),
                (None, Some(s)) => s.clone(),
                (None, None) => "a non-text panic payload".to_string(),
            },
            Err(join) => join.to_string(),
        };
        Error::Panicked { task: task.into(), detail }
    }

    /// Wraps an I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
}
