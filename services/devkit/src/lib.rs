//! Flywheel on one machine: the embedded broker (tansu), child processes
//! that never outlive their owner, a real S3 server (SeaweedFS) and a
//! runtime for the lake's blocking calls. `flywheel up`, `flywheel broker`,
//! the integration tests and the benchmarks all start these; one copy here
//! keeps them starting the same way.

mod broker;
mod s3;
mod supervise;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use broker::{LocalBroker, free_local_addr, tansu_binary};
pub use s3::S3Server;
pub use supervise::{RestartEvent, RestartPolicy, Restarting, restart_summary};

/// What can go wrong starting a local server.
#[derive(Debug, thiserror::Error)]
pub enum DevkitError {
    /// The tansu binary is not where we looked.
    #[error("broker binary not found at {0}: run `make setup` to install tansu 0.6.0 into .tools/")]
    BrokerNotInstalled(PathBuf),
    /// Spawning the broker failed.
    #[error("starting {binary}: {source}")]
    BrokerSpawn {
        /// Binary.
        binary: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The broker's data directory could not be prepared.
    #[error("preparing broker data directory {dir}: {source}")]
    BrokerDataDir {
        /// Directory.
        dir: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The broker did not answer metadata requests in time.
    #[error("broker on {addr} not ready after {waited:?} (exited: {exited}); see its log at {log}")]
    BrokerNotReady {
        /// Listener.
        addr: SocketAddr,
        /// Time waited.
        waited: Duration,
        /// Whether the process had exited.
        exited: bool,
        /// Log file.
        log: PathBuf,
    },
    /// The Python environment that holds the S3 server is missing.
    #[error("{0} is missing: run `make setup`")]
    S3NotInstalled(PathBuf),
    /// The S3 server's launcher failed, or answered something unexpected.
    #[error("the S3 server did not start: {0}")]
    S3NotStarted(String),
}

/// The workspace root: where `make setup` puts `.tools/` and `.venv/`, and
/// where tests find `schemas/` and `tests/readers/`.
pub fn workspace_root() -> PathBuf {
    let devkit = Path::new(env!("CARGO_MANIFEST_DIR"));
    devkit.ancestors().nth(2).unwrap_or(devkit).to_path_buf()
}

/// A runtime for the lake's calls made from code that is itself async (a
/// test, a benchmark): the lake blocks on a runtime, which a thread already
/// running async code cannot do.
pub fn lake_runtime() -> tokio::runtime::Handle {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("lake runtime")
        })
        .handle()
        .clone()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_workspace_root_holds_what_the_kit_launches() {
        let root = super::workspace_root();
        assert!(root.join("Cargo.toml").is_file(), "{}", root.display());
        assert!(root.join("tests/readers/s3_server.py").is_file(), "{}", root.display());
    }
}
