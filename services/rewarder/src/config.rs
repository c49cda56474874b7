//! The rewarder's flags and their checks.

use std::path::PathBuf;

use clap::Parser;
use flywheel_core::runtime::CommonArgs;

use crate::error::RewarderError;

/// Rewarder configuration; every flag has an environment variable.
#[derive(Debug, Clone, Parser)]
#[command(name = "flywheel-rewarder", version, about = "Turns interaction events into rewards")]
pub struct Config {
    /// Service, Kafka and topic flags every service has.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Consumer group; instances in one group share the partitions.
    #[arg(long = "group-id", env = "FLYWHEEL_REWARDER_GROUP_ID", default_value = "flywheel-rewarder")]
    pub group_id: String,
    /// Reward function TOML; the built-in Cursor-style defaults when absent.
    #[arg(long = "reward-function", env = "FLYWHEEL_REWARD_FUNCTION")]
    pub reward_function: Option<PathBuf>,
    /// Event-time window after a suggestion is shown in which signals count.
    #[arg(long = "outcome-window-ms", env = "FLYWHEEL_REWARDER_OUTCOME_WINDOW_MS", default_value_t = 600_000)]
    pub outcome_window_ms: i64,
    /// Extra event-time wait for out-of-order events.
    #[arg(long = "allowed-lateness-ms", env = "FLYWHEEL_REWARDER_ALLOWED_LATENESS_MS", default_value_t = 60_000)]
    pub allowed_lateness_ms: i64,
    /// Most open suggestions per partition before the oldest are closed early.
    #[arg(long = "max-open-suggestions", env = "FLYWHEEL_REWARDER_MAX_OPEN_SUGGESTIONS", default_value_t = 1_000_000)]
    pub max_open_suggestions: usize,
    /// Directory for checkpoints, when no --checkpoint-store is given. Every
    /// instance that may take over a partition must see it (one host, or a
    /// shared volume).
    #[arg(long = "checkpoint-dir", env = "FLYWHEEL_REWARDER_CHECKPOINT_DIR", default_value = ".flywheel/rewarder")]
    pub checkpoint_dir: PathBuf,
    /// Keep checkpoints in this store instead of --checkpoint-dir, so an
    /// instance on any host can take over any partition. Opened like the lake
    /// writer's --lake-root: `s3://bucket/prefix`, `gs://…`, `az://…`
    /// (credentials and endpoint from the object_store environment
    /// variables), `file:///dir`, or `memory://name` (in this
    /// process only: instances of one process that name it share it).
    #[arg(long = "checkpoint-store", env = "FLYWHEEL_REWARDER_CHECKPOINT_STORE")]
    pub checkpoint_store: Option<String>,
    /// Checkpoint after this many records of a partition. Each checkpoint
    /// waits for every output to be acknowledged, so this trades throughput
    /// (BENCHMARKS.md) against how much a restart replays.
    #[arg(
        long = "checkpoint-every-records",
        env = "FLYWHEEL_REWARDER_CHECKPOINT_EVERY_RECORDS",
        default_value_t = 50_000
    )]
    pub checkpoint_every_records: u64,
    /// Checkpoint at least this often (milliseconds) while records flow.
    #[arg(long = "checkpoint-every-ms", env = "FLYWHEEL_REWARDER_CHECKPOINT_EVERY_MS", default_value_t = 5_000)]
    pub checkpoint_every_ms: u64,
    /// Off by default. When set, a partition that received no record for this
    /// many milliseconds has its watermark advanced to wall-clock time minus
    /// this delay, so quiet partitions still close windows. The trade-off:
    /// outputs then depend on when records arrived, so a replay after a crash
    /// may close windows at other points (rewards are still never duplicated:
    /// read-back skips by id).
    #[arg(long = "idle-advance-after-ms", env = "FLYWHEEL_REWARDER_IDLE_ADVANCE_AFTER_MS")]
    pub idle_advance_after_ms: Option<u64>,
    /// Lengths (milliseconds) of the tumbling event-time windows of the
    /// rolling metrics, comma-separated; published to `reward-metrics` and
    /// exposed on /metrics.
    #[arg(
        long = "metrics-windows-ms",
        env = "FLYWHEEL_REWARDER_METRICS_WINDOWS_MS",
        value_delimiter = ',',
        default_value = "60000,3600000"
    )]
    pub metrics_windows_ms: Vec<i64>,
}

impl Config {
    /// Rejects settings the join cannot run with, before anything connects.
    pub(crate) fn validate(&self) -> Result<(), RewarderError> {
        if self.outcome_window_ms <= 0 || self.allowed_lateness_ms < 0 || self.max_open_suggestions == 0 {
            return Err(RewarderError::Config(
                "outcome window must be > 0, lateness >= 0 and max open suggestions >= 1".into(),
            ));
        }
        if let Some(bad) = self.metrics_windows_ms.iter().find(|w| **w < 1000) {
            return Err(RewarderError::Config(format!("metrics window {bad} ms is shorter than one second")));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) fn parse(args: &[&str]) -> Config {
    Config::try_parse_from(std::iter::once("flywheel-rewarder").chain(args.iter().copied())).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_pass_and_out_of_range_windows_and_limits_fail() {
        parse(&[]).validate().unwrap();
        for bad in [
            &["--outcome-window-ms", "0"][..],
            &["--allowed-lateness-ms=-1"],
            &["--max-open-suggestions", "0"],
            &["--metrics-windows-ms", "60000,999"],
        ] {
            let e = parse(bad).validate().unwrap_err();
            assert_eq!(e.reason_code(), "config", "{bad:?}: {e}");
        }
        let e = parse(&["--metrics-windows-ms", "500"]).validate().unwrap_err();
        assert_eq!(e.to_string(), "configuration error: metrics window 500 ms is shorter than one second");
    }
}
