//! The embedded local broker: tansu (a Kafka-protocol broker) run as a child
//! process with SQLite storage, for `flywheel up`, `flywheel broker`, the
//! integration tests and the benchmarks. Production points Flywheel at a
//! real Kafka cluster.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::DevkitError;
use crate::supervise::Supervised;

use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};

/// The tansu binary: `$FLYWHEEL_TANSU_BIN` (the Makefile exports it), else
/// the one `make setup` installs into the workspace's `.tools/`.
pub fn tansu_binary() -> PathBuf {
    std::env::var_os("FLYWHEEL_TANSU_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join(".tools").join("bin").join("tansu"))
}

/// A running local broker. Dropping it stops the broker; if this process dies
/// without dropping it (a test binary exiting, `kill -9`), a watchdog shell
/// stops the broker within half a second, so no broker outlives its owner.
#[derive(Debug)]
pub struct LocalBroker {
    process: Supervised,
    addr: SocketAddr,
    data_dir: PathBuf,
}

impl LocalBroker {
    /// Starts tansu on `addr` (advertised as itself) with SQLite storage in
    /// `data_dir` (created if missing; existing data is kept), and waits until
    /// it answers metadata requests.
    pub fn start(
        binary: &Path,
        addr: SocketAddr,
        data_dir: &Path,
        ready_timeout: Duration,
    ) -> Result<Self, DevkitError> {
        Self::start_with_storage(binary, addr, data_dir, "sqlite://broker.db", ready_timeout)
    }

    /// Like [`LocalBroker::start`] with another tansu storage URL (e.g.
    /// `memory://tansu/` for benchmarks that must not measure the disk).
    /// Relative SQLite paths are relative to `data_dir`.
    pub fn start_with_storage(
        binary: &Path,
        addr: SocketAddr,
        data_dir: &Path,
        storage: &str,
        ready_timeout: Duration,
    ) -> Result<Self, DevkitError> {
        if !binary.is_file() {
            return Err(DevkitError::BrokerNotInstalled(binary.to_path_buf()));
        }
        std::fs::create_dir_all(data_dir)
            .map_err(|source| DevkitError::BrokerDataDir { dir: data_dir.into(), source })?;
        let url = format!("tcp://{addr}");
        let args: Vec<String> = ["broker", "--listener-url", &url, "--advertised-listener-url", &url]
            .into_iter()
            .chain(["--storage-engine", storage])
            .map(String::from)
            .collect();
        // tansu mis-joins absolute sqlite paths, so run it inside the data
        // directory with a relative database path.
        let log_path = data_dir.join("broker.log");
        let _ = std::fs::remove_file(&log_path);
        let process = Supervised::spawn("flywheel-broker", binary, &args, data_dir, &log_path)
            .map_err(|source| DevkitError::BrokerSpawn { binary: binary.into(), source })?;
        let mut broker = LocalBroker { process, addr, data_dir: data_dir.to_path_buf() };
        broker.wait_ready(ready_timeout)?;
        Ok(broker)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), DevkitError> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if self.process.exit_status().is_some() {
                return Err(self.not_ready(started.elapsed(), true));
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() && metadata_ok(self.addr) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(self.not_ready(started.elapsed(), false))
    }

    fn not_ready(&self, waited: Duration, exited: bool) -> DevkitError {
        DevkitError::BrokerNotReady { addr: self.addr, waited, exited, log: self.log_path() }
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        self.addr.to_string()
    }

    /// The broker's log file.
    pub fn log_path(&self) -> PathBuf {
        self.data_dir.join("broker.log")
    }

    /// Stops the broker (SIGTERM via the watchdog, then waits).
    pub fn stop(&mut self) {
        self.process.stop(Duration::from_secs(10));
    }

    /// Freezes the broker (SIGSTOP): its connections stay open and nothing
    /// is answered, as with a hung broker. [`LocalBroker::resume`] undoes it.
    pub fn pause(&self) {
        self.process.signal_group("STOP");
    }

    /// Lets a paused broker run again (SIGCONT).
    pub fn resume(&self) {
        self.process.signal_group("CONT");
    }

    /// The exit status if the broker has exited (it should not on its own).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.process.exit_status()
    }
}

fn metadata_ok(addr: SocketAddr) -> bool {
    let producer: Result<BaseProducer, _> =
        ClientConfig::new().set("bootstrap.servers", addr.to_string()).set("log_level", "0").create();
    match producer {
        Ok(p) => p.client().fetch_metadata(None, Duration::from_secs(2)).is_ok_and(|m| !m.brokers().is_empty()),
        Err(_) => false,
    }
}

/// A free TCP port on 127.0.0.1 (bound then released; fine for tests).
pub fn free_local_addr() -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.local_addr()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_says_how_to_install_it() {
        let err = LocalBroker::start(
            Path::new("/nonexistent/tansu"),
            "127.0.0.1:1".parse().unwrap(),
            &std::env::temp_dir(),
            Duration::from_secs(1),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("make setup"), "{err}");
    }
}
