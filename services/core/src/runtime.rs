//! The skeleton every service shares: common flags, tracing, signal-driven
//! graceful shutdown and the operations endpoint (`/healthz`, `/readyz`,
//! `/metrics`).
//!
//! A service's `main` ([`service_main!`](crate::service_main)) parses its
//! config, calls [`init_tracing`], creates a token with
//! [`shutdown_on_signals`] and hands both to its `lib::run`, which runs its
//! worker on a [`ServiceHarness`]: the ops endpoint, and a drain bounded by
//! `--drain-timeout-secs` when the token is cancelled.

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
        fn main() -> ::anyhow::Result<()> {
            let config = <$config as ::clap::Parser>::parse();
            $crate::runtime::init_tracing(&config.common.service.log)?;
            let runtime = ::tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let result = runtime.block_on(async move {
                let shutdown = $crate::runtime::shutdown_on_signals();
                $run(config, shutdown).await
            });
            // A worker thread still busy after the drain timeout must not keep
            // the process alive: what it did not finish is redone on restart.
            runtime.shutdown_timeout($crate::runtime::RUNTIME_SHUTDOWN_GRACE);
            result?;
            Ok(())
        }
    };
}

/// How long a service binary waits, after its `run` returned, for blocking
/// threads that are still busy before it exits anyway.
pub const RUNTIME_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

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
/// `timeout`; tasks still running then are aborted and the result is
/// [`Error::DrainTimeout`]. Otherwise returns the first task error, if any (a
/// panicked task is [`Error::Panicked`]).
pub async fn drain<E>(mut tasks: JoinSet<std::result::Result<(), E>>, timeout: Duration) -> std::result::Result<(), E>
where
    E: std::fmt::Display + From<Error> + 'static,
{
    let mut first_error = None;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = tasks.join_next() => match next {
                None => break,
                Some(ended) => keep_first_error(ended, &mut first_error),
            },
            _ = &mut deadline => {
                let remaining = tasks.len();
                tracing::warn!(remaining, ?timeout, "drain timeout reached; aborting remaining tasks");
                tasks.abort_all();
                first_error.get_or_insert(E::from(Error::DrainTimeout { remaining, timeout }));
                break;
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn keep_first_error<E>(
    ended: std::result::Result<std::result::Result<(), E>, tokio::task::JoinError>,
    first: &mut Option<E>,
) where
    E: std::fmt::Display + From<Error>,
{
    let error = match ended {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e,
        Err(join) => E::from(Error::panicked("a service task", join)),
    };
    tracing::error!(error = %error, "task failed");
    first.get_or_insert(error);
}

/// Runs a blocking loop on the blocking pool. The loop gets a child of
/// `shutdown` to watch; it is cancelled when `shutdown` is, and also when the
/// returned future is dropped (the runtime shutting down, a drain timeout, a
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

/// Readiness check that fails from the moment a service starts draining, so
/// load balancers and `kubectl rollout` stop counting on it at once.
pub const DRAINING: &str = "draining";

/// The lifecycle every service shares: its metrics registry and readiness
/// checks, the operations endpoint, and one worker that does the service's
/// own work. [`ServiceHarness::run`] (an async worker) and
/// [`ServiceHarness::run_blocking`] (a loop on its own thread: Kafka consume
/// loops, whose client is blocking) behave the same way:
///
/// - the ops endpoint answers from before the worker starts until after it
///   ended, so `/readyz` reports `draining` during the drain;
/// - on shutdown the worker's token is cancelled and it gets
///   `--drain-timeout-secs` to finish; then it is abandoned and `run` returns
///   [`Error::DrainTimeout`] (the binary exits non-zero; nothing is lost,
///   since every service commits its input position only after its outputs);
/// - a worker that ends by itself (an error, a panic) ends the service.
pub struct ServiceHarness {
    name: &'static str,
    args: ServiceArgs,
    registry: Registry,
    readiness: Readiness,
    routes: Option<Router>,
    ops_listener: Option<tokio::net::TcpListener>,
}

impl std::fmt::Debug for ServiceHarness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceHarness").field("name", &self.name).field("args", &self.args).finish_non_exhaustive()
    }
}

impl ServiceHarness {
    /// A harness for the service `name` (used in logs) with its common flags.
    pub fn new(name: &'static str, args: &ServiceArgs) -> ServiceHarness {
        let readiness = Readiness::default();
        readiness.set(DRAINING, true);
        ServiceHarness {
            name,
            args: args.clone(),
            registry: Registry::default(),
            readiness,
            routes: None,
            ops_listener: None,
        }
    }

    /// The registry `/metrics` serves; register the service's metrics here.
    pub fn registry(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The readiness checks `/readyz` reports.
    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// Adds routes (a service's own HTTP API) to the ops endpoint.
    pub fn with_routes(mut self, routes: Router) -> ServiceHarness {
        self.routes = Some(routes);
        self
    }

    /// Binds the ops endpoint now (it is served once [`ServiceHarness::run`]
    /// starts) and returns its address: for embedders that must know it
    /// before the service runs (`--ops-listen` port 0 in tests).
    pub async fn bind_ops(&mut self) -> Result<SocketAddr> {
        let listener = OpsServer::bind(self.args.ops_listen).await?;
        let addr = listener.local_addr().map_err(|e| Error::io("reading ops endpoint address", e))?;
        self.ops_listener = Some(listener);
        Ok(addr)
    }

    /// Serves the ops endpoint and runs `worker` (given a token cancelled at
    /// shutdown) until it ends, or until shutdown plus the drain timeout.
    pub async fn run<E, W, Fut>(self, shutdown: CancellationToken, worker: W) -> std::result::Result<(), E>
    where
        E: std::fmt::Display + From<Error> + Send + 'static,
        W: FnOnce(CancellationToken) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<(), E>> + Send + 'static,
    {
        let ServiceHarness { name, args, registry, readiness, routes, ops_listener } = self;
        let ops_shutdown = CancellationToken::new();
        let listener = match ops_listener {
            Some(listener) => listener,
            None => OpsServer::bind(args.ops_listen).await?,
        };
        let ops = OpsServer::serve(listener, readiness.clone(), registry, routes, ops_shutdown.clone())?;
        let mut tasks = JoinSet::new();
        tasks.spawn(worker(shutdown.child_token()));
        let result = tokio::select! {
            ended = tasks.join_next() => match ended {
                Some(Ok(result)) => result,
                Some(Err(join)) => Err(E::from(Error::panicked(format!("the {name} worker"), join))),
                None => Ok(()),
            },
            _ = shutdown.cancelled() => {
                readiness.set(DRAINING, false);
                tracing::info!(service = name, timeout = ?args.drain_timeout(), "draining");
                drain(tasks, args.drain_timeout()).await
            }
        };
        match &result {
            Ok(()) => tracing::info!(service = name, "stopped"),
            Err(e) => tracing::error!(service = name, error = %e, "stopped with an error"),
        }
        ops_shutdown.cancel();
        // A scraper holding a connection open must not keep the process alive.
        let _ = tokio::time::timeout(Duration::from_secs(2), ops.task).await;
        result
    }

    /// [`ServiceHarness::run`] with a blocking loop on its own thread. The
    /// loop must watch its token between units of work.
    pub async fn run_blocking<E, W>(self, shutdown: CancellationToken, worker: W) -> std::result::Result<(), E>
    where
        E: std::fmt::Display + From<Error> + Send + 'static,
        W: FnOnce(CancellationToken) -> std::result::Result<(), E> + Send + 'static,
    {
        let name = self.name;
        self.run(shutdown, move |token| async move {
            match blocking_worker(&token, worker).await {
                Ok(result) => result,
                Err(join) => Err(E::from(Error::panicked(format!("the {name} worker thread"), join))),
            }
        })
        .await
    }
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
    /// Binds the ops endpoint's listener (serve it with [`OpsServer::serve`]).
    pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
        tokio::net::TcpListener::bind(addr).await.map_err(|e| Error::io(format!("binding ops endpoint {addr}"), e))
    }

    /// Serves `/healthz` (liveness: 200 while the process runs), `/readyz`
    /// and `/metrics` (Prometheus text format) on `listener` until `shutdown`
    /// is cancelled. `extra` routes (a service's own API) are merged in.
    pub fn serve(
        listener: tokio::net::TcpListener,
        readiness: Readiness,
        registry: Registry,
        extra: Option<Router>,
        shutdown: CancellationToken,
    ) -> Result<OpsServer> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn args(drain_timeout_secs: u64) -> ServiceArgs {
        ServiceArgs {
            log: LogArgs { log_format: LogFormat::Text, log_filter: "info".into() },
            ops_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            drain_timeout_secs,
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    /// Every wait below is bounded, so a broken harness fails instead of hanging.
    async fn within<T>(secs: u64, f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(secs), f).await.expect("the harness did not finish in time")
    }

    #[tokio::test]
    async fn a_worker_that_ends_at_cancellation_drains_cleanly_and_readiness_says_draining_meanwhile() {
        let shutdown = CancellationToken::new();
        let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let mut harness = ServiceHarness::new("test", &args(10));
        let addr = harness.bind_ops().await.unwrap();
        let running = tokio::spawn(harness.run(shutdown.clone(), move |stop| async move {
            stop.cancelled().await;
            // Still working after cancellation: the drain in progress.
            let _ = stopping_tx.send(());
            let _ = release_rx.await;
            Ok::<(), Error>(())
        }));
        let ready = within(10, get(addr, "/readyz")).await;
        assert!(ready.starts_with("HTTP/1.0 200") || ready.starts_with("HTTP/1.1 200"), "{ready}");
        shutdown.cancel();
        within(10, stopping_rx).await.unwrap();
        let draining = get(addr, "/readyz").await;
        assert!(draining.contains(" 503 ") && draining.contains("not ready: draining"), "{draining}");
        assert!(get(addr, "/healthz").await.contains(" 200 "), "liveness holds during the drain");
        release_tx.send(()).unwrap();
        within(10, running).await.unwrap().unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "the ops endpoint closes after the worker");
    }

    #[tokio::test]
    async fn a_worker_that_ignores_cancellation_is_abandoned_at_the_drain_timeout() {
        let shutdown = CancellationToken::new();
        let harness = ServiceHarness::new("test", &args(1));
        let running = tokio::spawn(harness.run(shutdown.clone(), |_stop| async {
            std::future::pending::<()>().await;
            Ok::<(), Error>(())
        }));
        shutdown.cancel();
        let started = std::time::Instant::now();
        let err = within(10, running).await.unwrap().unwrap_err();
        assert!(matches!(err, Error::DrainTimeout { remaining: 1, .. }), "{err}");
        assert_eq!(err.reason_code(), "drain_timeout");
        assert!(started.elapsed() >= Duration::from_secs(1), "not before the timeout");
    }

    #[tokio::test]
    async fn a_blocking_worker_that_panics_ends_the_service_with_its_message() {
        let shutdown = CancellationToken::new();
        let harness = ServiceHarness::new("test", &args(5));
        let err = within(10, harness.run_blocking(shutdown, |_stop| -> Result<()> { panic!("shard 7 is odd") }))
            .await
            .unwrap_err();
        assert_eq!(err.reason_code(), "panicked");
        let text = err.to_string();
        assert!(text.contains("the test worker thread") && text.contains("shard 7 is odd"), "{text}");
    }

    #[tokio::test]
    async fn a_blocking_worker_sees_its_token_cancelled_at_shutdown() {
        let shutdown = CancellationToken::new();
        let harness = ServiceHarness::new("test", &args(10));
        let running = tokio::spawn(harness.run_blocking(shutdown.clone(), |stop| -> Result<()> {
            while !stop.is_cancelled() {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
        shutdown.cancel();
        within(10, running).await.unwrap().unwrap();
    }
}
