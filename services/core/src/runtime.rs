//! The skeleton every service shares: common flags, tracing, signal-driven
//! graceful shutdown and the operations endpoint (`/healthz`, `/readyz`,
//! `/metrics`).
//!
//! A service's `main` parses its config, calls [`init_tracing`], creates a
//! token with [`shutdown_on_signals`] and hands both to its `lib::run`, which
//! serves [`OpsServer`] and drains its tasks with [`drain`] when the token is
//! cancelled.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// Defines a service binary's `main`, the same for every service: parse the
/// config (clap derive, every flag with an environment variable), install
/// tracing, create the SIGTERM/SIGINT shutdown token and run the service's
/// `run(config, shutdown)` until it has drained. The config needs a
/// `common: CommonArgs` field.
#[macro_export]
macro_rules! service_main {
    ($config:ty, $run:path) => {
        #[::tokio::main]
        async fn main() -> ::anyhow::Result<()> {
            let config = <$config as ::clap::Parser>::parse();
            $crate::runtime::init_tracing(&config.common.service.log)?;
            let shutdown = $crate::runtime::shutdown_on_signals();
            $run(config, shutdown).await?;
            Ok(())
        }
    };
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Logging flags; flatten into every binary's config.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format.
    #[arg(long = "log-format", env = "FLYWHEEL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter in tracing's EnvFilter syntax (e.g. `info,flywheel_core=debug`).
    #[arg(long = "log-filter", env = "RUST_LOG", default_value = "info", global = true)]
    pub log_filter: String,
}

/// Flags every service has; flatten into its config.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
    /// Address of the operations endpoint (/healthz, /readyz, /metrics).
    #[arg(long = "ops-listen", env = "FLYWHEEL_OPS_LISTEN", default_value = "127.0.0.1:9464")]
    pub ops_listen: SocketAddr,
    /// Seconds to wait for in-flight work to finish after SIGTERM/SIGINT.
    #[arg(long = "drain-timeout-secs", env = "FLYWHEEL_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,
}

/// Flags every service has: its own operation, the Kafka connection and the
/// topic layout; flatten into each service's config as `common`.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Logging, ops endpoint, drain timeout.
    #[command(flatten)]
    pub service: ServiceArgs,
    /// Kafka connection.
    #[command(flatten)]
    pub kafka: crate::kafka::KafkaArgs,
    /// Topic layout.
    #[command(flatten)]
    pub topics: crate::topics::TopicsArgs,
}

impl ServiceArgs {
    /// The drain timeout as a duration.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }
}

/// Installs the global tracing subscriber (logs to stderr). Safe to call
/// twice: the second call leaves the first subscriber in place.
pub fn init_tracing(args: &LogArgs) -> Result<()> {
    let filter = &args.log_filter;
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| Error::Config(format!("invalid log filter '{filter}': {e}")))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // An already-installed subscriber (tests, embedding) is not an error.
    let _ = match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    Ok(())
}

/// A token cancelled on the first SIGTERM or SIGINT. A second signal is left
/// to the default handler only after the drain timeout, so operators wait at
/// most that long.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let signal = wait_for_signal().await;
        tracing::info!(signal, "shutdown requested; draining");
        trigger.cancel();
    });
    token
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        },
        _ => {
            // Without Unix signal handlers fall back to Ctrl-C alone.
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

/// Waits for every task of a service to finish after shutdown began, at most
/// `timeout`; tasks still running then are aborted and reported. Returns the
/// first task error, if any.
pub async fn drain<E>(mut tasks: JoinSet<std::result::Result<(), E>>, timeout: Duration) -> std::result::Result<(), E>
where
    E: std::fmt::Display + 'static,
{
    let mut first_error = None;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = tasks.join_next() => match next {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => {
                    tracing::error!(error = %e, "task failed");
                    first_error.get_or_insert(e);
                }
                Some(Err(join)) => tracing::error!(error = %join, "task panicked or was cancelled"),
            },
            _ = &mut deadline => {
                tracing::warn!(remaining = tasks.len(), ?timeout, "drain timeout reached; aborting remaining tasks");
                tasks.abort_all();
                break;
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Runs a service's blocking worker loop on the blocking pool. The loop gets
/// a child of `shutdown` to watch; it is cancelled when `shutdown` is, and
/// also when the returned future is dropped (the runtime shutting down, a
/// test that panicked), so a worker can never keep its runtime from exiting.
pub async fn blocking_worker<T, F>(
    shutdown: &CancellationToken,
    work: F,
) -> std::result::Result<T, tokio::task::JoinError>
where
    T: Send + 'static,
    F: FnOnce(CancellationToken) -> T + Send + 'static,
{
    let token = shutdown.child_token();
    let guard = token.clone().drop_guard();
    let result = tokio::task::spawn_blocking(move || work(token)).await;
    guard.disarm();
    result
}

/// Named readiness checks. `/readyz` answers 200 only when every registered
/// check is ready, and lists the ones that are not.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl Readiness {
    /// Sets (or registers) a check.
    pub fn set(&self, check: &str, ready: bool) {
        self.checks.lock().unwrap_or_else(|p| p.into_inner()).insert(check.to_string(), ready);
    }

    /// Checks that are not ready.
    pub fn not_ready(&self) -> Vec<String> {
        let checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        checks.iter().filter(|(_, ready)| !**ready).map(|(name, _)| name.clone()).collect()
    }
}

#[derive(Clone)]
struct OpsState {
    readiness: Readiness,
    registry: Arc<Registry>,
}

/// A running operations endpoint.
#[derive(Debug)]
pub struct OpsServer {
    /// Where it listens (resolved, so port 0 works in tests).
    pub local_addr: SocketAddr,
    /// The server task; finishes after the shutdown token is cancelled.
    pub task: tokio::task::JoinHandle<Result<()>>,
}

impl OpsServer {
    /// Binds `addr` and serves `/healthz` (liveness: 200 while the process
    /// runs), `/readyz` and `/metrics` (Prometheus text format) until
    /// `shutdown` is cancelled. `extra` routes (a service's own API) are merged in.
    pub async fn start(
        addr: SocketAddr,
        readiness: Readiness,
        registry: Registry,
        extra: Option<Router>,
        shutdown: CancellationToken,
    ) -> Result<OpsServer> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io(format!("binding ops endpoint {addr}"), e))?;
        let local_addr = listener.local_addr().map_err(|e| Error::io("reading ops endpoint address", e))?;
        let state = OpsState { readiness, registry: Arc::new(registry) };
        let mut app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(state);
        if let Some(extra) = extra {
            app = app.merge(extra);
        }
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await
                .map_err(|e| Error::io("serving ops endpoint", e))
        });
        tracing::info!(%local_addr, "ops endpoint listening");
        Ok(OpsServer { local_addr, task })
    }
}

async fn readyz(State(state): State<OpsState>) -> Response {
    let not_ready = state.readiness.not_ready();
    if not_ready.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", not_ready.join(", "))).into_response()
    }
}

async fn metrics(State(state): State<OpsState>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}\n")).into_response(),
    }
}
