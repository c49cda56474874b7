//! The rewarder's error type, with a stable code per failure for logs and alerts.

use rdkafka::error::KafkaError;

use crate::reward_fn::RewardFunctionError;

/// The rewarder's errors. Each keeps the underlying error as its source and
/// says in its message what was being done.
#[derive(Debug, thiserror::Error)]
pub enum RewarderError {
    /// From the core library (configuration, Kafka, codec).
    #[error(transparent)]
    Core(#[from] flywheel_core::Error),
    /// A setting is out of range (the message names it).
    #[error("configuration error: {0}")]
    Config(String),
    /// The `--reward-function` file could not be read or is invalid.
    #[error(transparent)]
    RewardFunction(#[from] RewardFunctionError),
    /// The checkpoint storage could not be opened, read or written.
    #[error("checkpoint {path}: {source}")]
    CheckpointStorage {
        /// The checkpoint (file or object URL) or its storage.
        path: String,
        /// The storage's error (boxed: it is large, and rare).
        #[source]
        source: Box<flywheel_lake::LakeError>,
    },
    /// A checkpoint could not be encoded, or what was read is not a
    /// checkpoint (corrupt, or written by a newer release).
    #[error("checkpoint {path}: {source}")]
    CheckpointFormat {
        /// The checkpoint's URL.
        path: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The producer failed to queue or flush outputs; the service stops so a
    /// restart resumes from the last checkpoint.
    #[error("outputs not acknowledged: {context}: {source}")]
    Delivery {
        /// What was being done.
        context: String,
        /// The client error.
        #[source]
        source: KafkaError,
    },
    /// The broker refused an output (the delivery report's message); the
    /// service stops so a restart resumes from the last checkpoint.
    #[error("outputs not acknowledged: {0}")]
    Undelivered(String),
}

impl RewarderError {
    /// Stable machine-readable code for logs and alerts; wrapped core and lake
    /// errors keep their own.
    pub fn reason_code(&self) -> &'static str {
        match self {
            RewarderError::Core(e) => e.reason_code(),
            RewarderError::Config(_) => "config",
            RewarderError::RewardFunction(RewardFunctionError::Read { .. }) => "reward_function_unreadable",
            RewarderError::RewardFunction(RewardFunctionError::Invalid { .. }) => "reward_function_invalid",
            RewarderError::CheckpointStorage { source, .. } => source.reason_code(),
            RewarderError::CheckpointFormat { .. } => "checkpoint_format",
            RewarderError::Delivery { .. } => "kafka_delivery",
            RewarderError::Undelivered(_) => "kafka_undelivered",
        }
    }

    /// A checkpoint storage error at `path`.
    pub(crate) fn checkpoint_storage(
        path: impl Into<String>,
    ) -> impl FnOnce(flywheel_lake::LakeError) -> RewarderError {
        let path = path.into();
        move |source| RewarderError::CheckpointStorage { path, source: Box::new(source) }
    }

    /// A Kafka producer error while `context`.
    pub(crate) fn delivery(context: impl Into<String>) -> impl FnOnce(KafkaError) -> RewarderError {
        let context = context.into();
        move |source| RewarderError::Delivery { context, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_has_a_code_and_keeps_its_context_and_source() {
        use std::error::Error as _;
        let json = serde_json::from_slice::<serde_json::Value>(b"{").unwrap_err();
        let cases = [
            (RewarderError::Core(flywheel_core::Error::Config("x".into())), "config"),
            (RewarderError::Config("outcome window must be > 0".into()), "config"),
            (
                RewarderError::RewardFunction(RewardFunctionError::Invalid {
                    path: "f.toml".into(),
                    detail: "d".into(),
                }),
                "reward_function_invalid",
            ),
            (
                RewarderError::RewardFunction(RewardFunctionError::Read {
                    path: "f.toml".into(),
                    source: std::io::Error::other("gone"),
                }),
                "reward_function_unreadable",
            ),
            (
                RewarderError::CheckpointStorage {
                    path: "s3://b/g/t/0.json".into(),
                    source: Box::new(flywheel_lake::LakeError::Config("bad url".into())),
                },
                "config",
            ),
            (
                RewarderError::CheckpointFormat { path: "file:///c/g/t/0.json".into(), source: json },
                "checkpoint_format",
            ),
            (RewarderError::delivery("flushing")(KafkaError::Canceled), "kafka_delivery"),
            (RewarderError::Undelivered("message timed out".into()), "kafka_undelivered"),
        ];
        for (e, code) in cases {
            assert_eq!(e.reason_code(), code, "{e}");
        }
        let e = RewarderError::CheckpointFormat {
            path: "file:///c/g/t/0.json".into(),
            source: serde_json::from_slice::<serde_json::Value>(b"{").unwrap_err(),
        };
        assert!(e.to_string().starts_with("checkpoint file:///c/g/t/0.json: EOF"), "{e}");
        assert!(e.source().is_some());
        let e = RewarderError::delivery("producing to rewards")(KafkaError::Canceled);
        assert!(e.to_string().starts_with("outputs not acknowledged: producing to rewards: "), "{e}");
        assert!(e.source().is_some());
    }
}
