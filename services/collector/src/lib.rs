//! The collector: the product-facing HTTP service that captures interaction
//! events into the `interactions` topic without loss.
//!
//! - `POST /v1/events`: a JSON array of events; each is validated, its user id
//!   pseudonymised (and text optionally redacted), Avro-encoded and produced
//!   keyed by `suggestion_id`. The answer comes only after the broker
//!   acknowledged every accepted event; a broker failure answers 503 and claims
//!   nothing, a full in-flight queue 429. An event the broker could never take
//!   (larger than a Kafka record may be) is rejected on its own, before
//!   producing, as `event_too_large`.
//! - `GET /v1/route`: which model and adapter a user should be served.
//! - Ops endpoint (separate port): `/healthz`, `/readyz` (broker, registry), `/metrics`.
//!
//! Slow clients cannot hold the API: connections are capped, request headers
//! and bodies each have a deadline (see [`serve`]).

pub mod privacy;
pub(crate) mod route;
pub(crate) mod serve;
pub mod validate;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;
use flywheel_core::codec::encode;
use flywheel_core::kafka::{ClientRole, parse_properties};
use flywheel_core::runtime::{CommonArgs, ServiceHarness, drain};
use flywheel_core::topics::Topic;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::privacy::{Pseudonymizer, Redactor};
use crate::route::{RegistryView, RouteDecision, decide, follow_registry};
use crate::serve::{ConnectionLimits, ConnectionMetrics};
use crate::validate::{Limits, REJECTION_CODES, Rejection, validate};

/// The collector's errors (start-up and background tasks; request errors are HTTP answers).
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    /// From the core library (Kafka, config, I/O).
    #[error(transparent)]
    Core(#[from] flywheel_core::Error),
    /// Invalid configuration.
    #[error("configuration error: {0}")]
    Config(String),
}

/// Collector configuration; every flag has an environment variable.
#[derive(Debug, Clone, Parser)]
#[command(name = "flywheel-collector", version, about = "Captures product interaction events into Kafka")]
pub struct Config {
    /// Service, Kafka and topic flags every service has.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Address of the public API.
    #[arg(long = "listen", env = "FLYWHEEL_COLLECTOR_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// API tokens as token=tenant pairs (comma-separated in the env var).
    #[arg(long = "token", env = "FLYWHEEL_COLLECTOR_TOKENS", value_delimiter = ',', hide_env_values = true)]
    pub tokens: Vec<String>,
    /// File of token=tenant lines (# comments allowed).
    #[arg(long = "tokens-file", env = "FLYWHEEL_COLLECTOR_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// Secret keying the user-id HMAC (≥ 16 bytes); keep it stable across restarts.
    #[arg(long = "hmac-secret", env = "FLYWHEEL_COLLECTOR_HMAC_SECRET", hide_env_values = true)]
    pub hmac_secret: Option<String>,
    /// File holding the HMAC secret (trailing newline ignored).
    #[arg(long = "hmac-secret-file", env = "FLYWHEEL_COLLECTOR_HMAC_SECRET_FILE")]
    pub hmac_secret_file: Option<PathBuf>,
    /// Base model served while the registry has no entry for a tenant.
    #[arg(long = "base-model", env = "FLYWHEEL_BASE_MODEL", default_value = "flywheel/tiny-llama")]
    pub base_model: String,
    /// Replace e-mail addresses and phone numbers in text fields before producing.
    #[arg(long = "redact-pii", env = "FLYWHEEL_COLLECTOR_REDACT_PII")]
    pub redact_pii: bool,
    /// Largest request body in bytes (413 above).
    #[arg(long = "max-body-bytes", env = "FLYWHEEL_COLLECTOR_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Most events in one batch (413 above).
    #[arg(long = "max-batch-events", env = "FLYWHEEL_COLLECTOR_MAX_BATCH_EVENTS", default_value_t = 1000)]
    pub max_batch_events: usize,
    /// Longest text field, in characters.
    #[arg(long = "max-text-chars", env = "FLYWHEEL_COLLECTOR_MAX_TEXT_CHARS", default_value_t = 32_768)]
    pub max_text_chars: usize,
    /// Events awaiting broker acknowledgement across all requests; beyond it requests get 429.
    #[arg(long = "max-in-flight-events", env = "FLYWHEEL_COLLECTOR_MAX_IN_FLIGHT_EVENTS", default_value_t = 50_000)]
    pub max_in_flight_events: usize,
    /// How long a request waits for broker acknowledgement before answering 503.
    #[arg(long = "produce-timeout-ms", env = "FLYWHEEL_COLLECTOR_PRODUCE_TIMEOUT_MS", default_value_t = 10_000)]
    pub produce_timeout_ms: u64,
    /// Most API connections open at once; further connections wait in the listen backlog.
    #[arg(long = "max-connections", env = "FLYWHEEL_COLLECTOR_MAX_CONNECTIONS", default_value_t = 512)]
    pub max_connections: usize,
    /// Time a client has to send a request's headers (also how long an idle
    /// kept-alive connection stays open); the connection is closed after it.
    #[arg(
        long = "header-read-timeout-ms",
        env = "FLYWHEEL_COLLECTOR_HEADER_READ_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub header_read_timeout_ms: u64,
    /// Time a client has to send a whole request body once its headers
    /// arrived; answered 408 and closed after it.
    #[arg(long = "body-read-timeout-ms", env = "FLYWHEEL_COLLECTOR_BODY_READ_TIMEOUT_MS", default_value_t = 30_000)]
    pub body_read_timeout_ms: u64,
}

/// Bytes a Kafka record adds around its key and value in librdkafka's
/// size check (`message.max.bytes` bounds key + value + this).
pub const RECORD_OVERHEAD_BYTES: usize = 36;

/// librdkafka's default `message.max.bytes`.
pub const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// The largest Avro-encoded event (key included) the producer accepts:
/// `message.max.bytes` of the producer configuration less the record overhead.
pub fn max_event_bytes(producer: &rdkafka::ClientConfig) -> Result<usize, CollectorError> {
    let configured = match producer.get("message.max.bytes") {
        None => DEFAULT_MESSAGE_MAX_BYTES,
        Some(v) => v
            .trim()
            .parse::<usize>()
            .map_err(|_| CollectorError::Config(format!("message.max.bytes '{v}' is not a byte count")))?,
    };
    configured.checked_sub(RECORD_OVERHEAD_BYTES).filter(|n| *n >= 4096).ok_or_else(|| {
        CollectorError::Config(format!("message.max.bytes {configured} is too small for interaction events"))
    })
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    outcome: String,
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

/// Which part of a request a client was too slow to send.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PhaseLabels {
    pub(crate) phase: String,
}

/// The collector's Prometheus metrics.
#[derive(Debug, Clone)]
struct Metrics {
    requests: Family<RequestLabels, Counter>,
    events: Family<EventLabels, Counter>,
    produce_latency: Histogram,
    in_flight: Gauge,
    redactions: Family<KindLabels, Counter>,
    producer_replacements: Counter,
    connections: ConnectionMetrics,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            requests: Family::default(),
            events: Family::default(),
            produce_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            in_flight: Gauge::default(),
            redactions: Family::default(),
            producer_replacements: Counter::default(),
            connections: ConnectionMetrics::default(),
        };
        let r = registry.sub_registry_with_prefix("collector");
        r.register("requests", "HTTP requests by route and status", m.requests.clone());
        r.register("events", "Events by outcome (accepted/rejected) and rejection reason", m.events.clone());
        r.register(
            "produce_latency_seconds",
            "Time from a batch's first produce to the broker acknowledging all its events",
            m.produce_latency.clone(),
        );
        r.register("in_flight_events", "Events awaiting broker acknowledgement (queue depth)", m.in_flight.clone());
        r.register("redactions", "Redacted PII occurrences by kind", m.redactions.clone());
        r.register(
            "producer_replacements",
            "Kafka producers replaced after a batch the broker did not acknowledge",
            m.producer_replacements.clone(),
        );
        r.register("open_connections", "Open API connections", m.connections.open.clone());
        r.register(
            "client_timeouts",
            "Connections closed because the client did not send its headers (idle kept-alive connections too) or body in time",
            m.connections.timeouts.clone(),
        );
        for phase in ["headers", "body"] {
            let _ = m.connections.timeouts.get_or_create(&PhaseLabels { phase: phase.into() });
        }
        // Pre-register label values so dashboards see zeros, not gaps.
        for code in REJECTION_CODES {
            let _ = m.events.get_or_create(&EventLabels { outcome: "rejected".into(), reason: (*code).into() });
        }
        let _ = m.events.get_or_create(&EventLabels { outcome: "accepted".into(), reason: String::new() });
        m
    }

    fn request(&self, route: &str, status: StatusCode) {
        self.requests.get_or_create(&RequestLabels { route: route.into(), status: status.as_u16().to_string() }).inc();
    }
}

/// Token → tenant, looked up by SHA-256 of the token so the tokens
/// themselves are not kept in memory.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    by_hash: HashMap<[u8; 32], String>,
}

impl Tokens {
    /// Builds the table from `token=tenant` pairs; tenants must be `[a-z0-9_-]{1,64}`.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Result<Tokens, CollectorError> {
        let mut by_hash = HashMap::new();
        for (token, tenant) in pairs {
            if token.len() < 16 {
                return Err(CollectorError::Config(format!(
                    "the token for tenant '{tenant}' is shorter than 16 characters"
                )));
            }
            let valid = !tenant.is_empty()
                && tenant.len() <= 64
                && tenant.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
            if !valid {
                return Err(CollectorError::Config(format!("tenant '{tenant}' must match [a-z0-9_-]{{1,64}}")));
            }
            by_hash.insert(Sha256::digest(token.as_bytes()).into(), tenant);
        }
        Ok(Tokens { by_hash })
    }

    fn tenant_of(&self, headers: &HeaderMap) -> Option<&str> {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?.trim();
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.by_hash.get(&hash).map(String::as_str)
    }

    /// Number of configured tokens.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether no token is configured.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

/// The producer in use, replaced after a failed batch: an idempotent
/// producer whose messages timed out carries sequence state the broker may no
/// longer have (a restarted broker that lost producer state, a fenced epoch);
/// a fresh producer id after an outage never wedges ingestion. Replacements
/// are rate-limited so a long outage does not churn clients.
#[derive(Clone)]
struct ProducerSlot {
    current: Arc<std::sync::RwLock<FutureProducer>>,
    config: Arc<rdkafka::ClientConfig>,
    last_reset: Arc<std::sync::Mutex<Instant>>,
}

impl ProducerSlot {
    fn new(config: rdkafka::ClientConfig) -> Result<ProducerSlot, CollectorError> {
        let producer = config.create().map_err(|e| flywheel_core::Error::kafka("creating producer", e))?;
        Ok(ProducerSlot {
            current: Arc::new(std::sync::RwLock::new(producer)),
            config: Arc::new(config),
            last_reset: Arc::new(std::sync::Mutex::new(Instant::now())),
        })
    }

    fn get(&self) -> FutureProducer {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the producer after a batch failed for want of the broker;
    /// never for a record the broker refused on its own merits.
    fn reset_after_failure(&self, replacements: &Counter) {
        let mut last = self.last_reset.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() < Duration::from_secs(2) {
            return;
        }
        match self.config.create::<FutureProducer>() {
            Ok(fresh) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                *last = Instant::now();
                replacements.inc();
                tracing::info!("replaced the Kafka producer after a failed batch");
            }
            Err(e) => tracing::error!(error = %e, "could not create a replacement producer"),
        }
    }
}

/// Everything a request handler needs.
#[derive(Clone)]
struct AppState {
    tokens: Arc<Tokens>,
    pseudonymizer: Pseudonymizer,
    redactor: Option<Arc<Redactor>>,
    limits: Arc<Limits>,
    producer: ProducerSlot,
    topic: Arc<str>,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
    max_body_bytes: usize,
    max_batch_events: usize,
    max_event_bytes: usize,
    body_read_timeout: Duration,
    produce_timeout: Duration,
    registry: RegistryView,
    base_model: Arc<str>,
    metrics: Metrics,
}

fn error_body(status: StatusCode, code: &str, reason: impl Into<String>) -> Response {
    (status, axum::Json(json!({"error": code, "reason": reason.into()}))).into_response()
}

fn unauthorized() -> Response {
    let mut r = error_body(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or unknown bearer token: send `Authorization: Bearer <token>`",
    );
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

fn retry_after(mut r: Response, secs: u32) -> Response {
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    r
}

/// One event's outcome in the response.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct EventResult {
    /// Position in the batch.
    pub index: usize,
    /// The event's id, when it had a readable one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// `accepted` or `rejected`.
    pub status: String,
    /// Rejection code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Rejection reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The response to `POST /v1/events`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct BatchResponse {
    /// Events now durable in Kafka.
    pub accepted: usize,
    /// Events rejected.
    pub rejected: usize,
    /// Per-event outcomes, in batch order.
    pub results: Vec<EventResult>,
}

async fn post_events(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let response = handle_events(&state, &headers, body).await;
    state.metrics.request("/v1/events", response.status());
    response
}

/// Why a request body could not be read.
#[derive(Debug, PartialEq)]
enum BodyError {
    /// More than the limit.
    TooLarge,
    /// Not complete within the body deadline.
    Timeout,
    /// The connection broke it: truncated (fewer bytes than declared), bad
    /// chunked encoding, a reset.
    Broken(String),
}

/// Reads a whole body of at most `limit` bytes within `deadline`.
async fn read_body(body: Body, limit: usize, deadline: Duration) -> Result<Bytes, BodyError> {
    use http_body_util::BodyExt;
    let read = async move {
        let mut body = body;
        let mut buf = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| BodyError::Broken(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > limit {
                    return Err(BodyError::TooLarge);
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(Bytes::from(buf))
    };
    tokio::time::timeout(deadline, read).await.unwrap_or(Err(BodyError::Timeout))
}

async fn handle_events(state: &AppState, headers: &HeaderMap, body: Body) -> Response {
    let Some(tenant) = state.tokens.tenant_of(headers).map(str::to_string) else { return unauthorized() };
    let too_large = || {
        error_body(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body exceeds {} bytes; send smaller batches", state.max_body_bytes),
        )
    };
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > state.max_body_bytes) {
        return too_large();
    }
    let bytes = match read_body(body, state.max_body_bytes, state.body_read_timeout).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return too_large(),
        Err(BodyError::Timeout) => {
            state.metrics.connections.timeouts.get_or_create(&PhaseLabels { phase: "body".into() }).inc();
            let mut r = error_body(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!("the request body did not arrive within {:?}; nothing was accepted", state.body_read_timeout),
            );
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
        Err(BodyError::Broken(e)) => {
            return error_body(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!("the request body could not be read (truncated or badly chunked): {e}; nothing was accepted"),
            );
        }
    };
    let text = match std::str::from_utf8(&bytes) {
        Ok(t) => t,
        Err(e) => {
            return error_body(
                StatusCode::BAD_REQUEST,
                "invalid_utf8",
                format!("the body is not valid UTF-8: invalid byte at offset {}", e.valid_up_to()),
            );
        }
    };
    // Split the batch without building a value tree; each event is then
    // parsed straight into its type, so one bad event rejects only itself.
    let items = match serde_json::from_str::<Vec<&serde_json::value::RawValue>>(text) {
        Ok(items) => items,
        Err(e) if e.classify() == serde_json::error::Category::Data => {
            return error_body(StatusCode::BAD_REQUEST, "not_a_batch", "the body must be a JSON array of events");
        }
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({
                    "error": "invalid_json",
                    "reason": format!("invalid JSON: {e}"),
                    "line": e.line(),
                    "column": e.column(),
                })),
            )
                .into_response();
        }
    };
    if items.len() > state.max_batch_events {
        return error_body(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!("{} events in one batch; the limit is {}", items.len(), state.max_batch_events),
        );
    }

    let now = flywheel_core::now_millis();
    let mut results = Vec::with_capacity(items.len());
    // (index in `results`, key, encoded event)
    let mut to_send: Vec<(usize, String, Vec<u8>)> = Vec::new();
    let mut seen_ids = HashSet::new();
    #[derive(Deserialize)]
    struct IdOnly {
        #[serde(default)]
        event_id: Option<serde_json::Value>,
    }
    for (index, item) in items.into_iter().enumerate() {
        let outcome = validate(item.get(), &tenant, now, &state.limits).and_then(|mut event| {
            if !seen_ids.insert(event.event_id.clone()) {
                return Err(Rejection {
                    code: "duplicate_in_batch",
                    reason: format!("event_id {} appears earlier in this batch", event.event_id),
                });
            }
            event.user_id = state.pseudonymizer.pseudonymize(&tenant, &event.user_id);
            if let Some(redactor) = &state.redactor {
                let counts = redactor.redact(&mut event);
                state.metrics.redactions.get_or_create(&KindLabels { kind: "email".into() }).inc_by(counts.emails);
                state.metrics.redactions.get_or_create(&KindLabels { kind: "phone".into() }).inc_by(counts.phones);
            }
            let bytes = encode(&event).map_err(|e| Rejection { code: "invalid_value", reason: e.to_string() })?;
            check_record_size(event.suggestion_id.len(), bytes.len(), state.max_event_bytes)?;
            Ok((event.event_id, event.suggestion_id, bytes))
        });
        match outcome {
            Ok((event_id, key, bytes)) => {
                to_send.push((index, key, bytes));
                results.push(EventResult {
                    index,
                    event_id: Some(event_id),
                    status: "accepted".into(),
                    code: None,
                    reason: None,
                });
            }
            Err(r) => {
                // The id, when readable, helps the client match the rejection.
                let event_id = serde_json::from_str::<IdOnly>(item.get())
                    .ok()
                    .and_then(|i| i.event_id)
                    .and_then(|v| v.as_str().map(str::to_string));
                results.push(EventResult { index, event_id, status: String::new(), code: None, reason: None });
                reject(state, &mut results[index], r);
            }
        }
    }

    let mut accepted = 0;
    if !to_send.is_empty() {
        let refused = match produce_all(state, &to_send).await {
            Ok(refused) => refused,
            Err(response) => return response,
        };
        for ((index, _, _), refusal) in to_send.iter().zip(refused) {
            match refusal {
                Some(r) => reject(state, &mut results[*index], r),
                None => accepted += 1,
            }
        }
        state
            .metrics
            .events
            .get_or_create(&EventLabels { outcome: "accepted".into(), reason: String::new() })
            .inc_by(accepted as u64);
    }
    let rejected = results.len() - accepted;
    let status = if accepted == 0 && rejected > 0 { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::OK };
    (status, axum::Json(BatchResponse { accepted, rejected, results })).into_response()
}

/// Marks one event of the answer rejected and counts it.
fn reject(state: &AppState, result: &mut EventResult, r: Rejection) {
    state.metrics.events.get_or_create(&EventLabels { outcome: "rejected".into(), reason: r.code.into() }).inc();
    result.status = "rejected".into();
    result.code = Some(r.code.into());
    result.reason = Some(r.reason);
}

/// Refuses an event whose record (key + Avro value) the producer could never
/// send: librdkafka rejects a record above `message.max.bytes`, and retrying
/// cannot help, so it is a per-event 4xx rather than a broker failure.
fn check_record_size(key_bytes: usize, value_bytes: usize, max_event_bytes: usize) -> Result<(), Rejection> {
    let size = key_bytes + value_bytes;
    if size > max_event_bytes {
        return Err(Rejection {
            code: "event_too_large",
            reason: format!(
                "the event encodes to {size} bytes (suggestion_id included); a Kafka record holds at most \
                 {max_event_bytes}: shorten the prompt, completion or attributes"
            ),
        });
    }
    Ok(())
}

/// A produce error that concerns the record itself (the broker will never
/// take it), as opposed to the broker being unavailable.
fn record_refusal(e: &KafkaError, value_bytes: usize) -> Option<Rejection> {
    match e {
        KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::MessageBatchTooLarge,
        ) => Some(Rejection {
            code: "event_too_large",
            reason: format!(
                "the Kafka cluster refused the {value_bytes}-byte record as too large ({e}); shorten the event, \
                 or raise the broker's message.max.bytes / the topic's max.message.bytes"
            ),
        }),
        _ => None,
    }
}

/// Produces every encoded event and waits for all acknowledgements. Returns,
/// per event, `None` when the broker acknowledged it or the rejection of a
/// record the cluster refused on its own merits; a broker failure answers
/// 503 for the whole batch (or 429 when the in-flight budget is exhausted).
async fn produce_all(
    state: &AppState,
    events: &[(usize, String, Vec<u8>)],
) -> Result<Vec<Option<Rejection>>, Response> {
    let n = events.len();
    if n > state.max_in_flight {
        return Err(error_body(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!("{n} valid events exceed the collector's in-flight capacity of {}", state.max_in_flight),
        ));
    }
    let permits = match state.in_flight.clone().try_acquire_many_owned(n as u32) {
        Ok(p) => p,
        Err(_) => {
            return Err(retry_after(
                error_body(
                    StatusCode::TOO_MANY_REQUESTS,
                    "overloaded",
                    "too many events awaiting broker acknowledgement; retry shortly",
                ),
                1,
            ));
        }
    };
    state.metrics.in_flight.inc_by(n as i64);
    let started = Instant::now();
    let mut refused: Vec<Option<Rejection>> = (0..n).map(|_| None).collect();
    let mut deliveries = Vec::with_capacity(n);
    let mut failure: Option<String> = None;
    let producer = state.producer.get();
    for (i, (_, key, bytes)) in events.iter().enumerate() {
        match producer.send_result(FutureRecord::to(&state.topic).key(key).payload(bytes)) {
            Ok(d) => deliveries.push((i, d)),
            Err((e, _)) => match record_refusal(&e, bytes.len()) {
                Some(r) => refused[i] = Some(r),
                None => {
                    failure = Some(format!("enqueueing for the broker failed: {e}"));
                    break;
                }
            },
        }
    }
    if failure.is_none() {
        let waited = tokio::time::timeout(state.produce_timeout, async {
            for (i, d) in deliveries {
                match d.await {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => match record_refusal(&e, events[i].2.len()) {
                        Some(r) => refused[i] = Some(r),
                        None => return Err(format!("the broker did not acknowledge: {e}")),
                    },
                    Err(_) => return Err("the producer shut down before acknowledging".to_string()),
                }
            }
            Ok(())
        })
        .await;
        failure = match waited {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(format!("no broker acknowledgement within {:?}", state.produce_timeout)),
        };
    }
    state.metrics.in_flight.dec_by(n as i64);
    drop(permits);
    match failure {
        None => {
            state.metrics.produce_latency.observe(started.elapsed().as_secs_f64());
            for r in refused.iter().flatten() {
                tracing::warn!(reason = %r.reason, "the Kafka cluster refused an event");
            }
            Ok(refused)
        }
        Some(reason) => {
            tracing::warn!(events = n, %reason, "batch not acknowledged; answering 503");
            state.producer.reset_after_failure(&state.metrics.producer_replacements);
            Err(retry_after(
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    axum::Json(json!({
                        "error": "broker_unavailable",
                        "reason": format!("{reason}; no event of this batch is claimed, retry it with the same event ids"),
                        "accepted": 0,
                    })),
                )
                    .into_response(),
                5,
            ))
        }
    }
}

/// Query of `GET /v1/route`.
#[derive(Debug, Deserialize)]
struct RouteQuery {
    user_id: String,
    #[serde(default)]
    surface: Option<String>,
    #[serde(default)]
    base_model: Option<String>,
}

#[derive(Debug, Serialize)]
struct RouteResponse {
    #[serde(flatten)]
    decision: RouteDecision,
    surface: Option<String>,
}

async fn get_route(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<RouteQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let response = (|| {
        let Some(tenant) = state.tokens.tenant_of(&headers) else { return unauthorized() };
        let q = match query {
            Ok(Query(q)) => q,
            Err(e) => {
                return error_body(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    format!("{e}; expected /v1/route?user_id=…&surface=…"),
                );
            }
        };
        // Characters, not bytes: the same rule as `user_id` in events.
        if q.user_id.trim().is_empty() || q.user_id.chars().count() > state.limits.max_id_chars {
            return error_body(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!("user_id must be 1 to {} characters", state.limits.max_id_chars),
            );
        }
        let pseudonym = state.pseudonymizer.pseudonymize(tenant, &q.user_id);
        let base_model = q.base_model.as_deref().unwrap_or(&state.base_model);
        let decision = decide(state.registry.get(tenant, base_model).as_ref(), base_model, &pseudonym);
        (StatusCode::OK, axum::Json(RouteResponse { decision, surface: q.surface })).into_response()
    })();
    state.metrics.request("/v1/route", response.status());
    response
}

fn load_tokens(config: &Config) -> Result<Tokens, CollectorError> {
    let mut pairs = Vec::new();
    for t in &config.tokens {
        let (token, tenant) =
            t.split_once('=').ok_or_else(|| CollectorError::Config("--token expects token=tenant".into()))?;
        pairs.push((token.trim().to_string(), tenant.trim().to_string()));
    }
    if let Some(path) = &config.tokens_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| flywheel_core::Error::io(format!("reading tokens file {}", path.display()), e))?;
        pairs.extend(parse_properties(&text).map_err(|e| CollectorError::Config(format!("{}: {e}", path.display())))?);
    }
    let tokens = Tokens::from_pairs(pairs)?;
    if tokens.is_empty() {
        return Err(CollectorError::Config(
            "no API tokens configured: set FLYWHEEL_COLLECTOR_TOKENS=token=tenant or --tokens-file".into(),
        ));
    }
    Ok(tokens)
}

fn load_secret(config: &Config) -> Result<Pseudonymizer, CollectorError> {
    let secret = match (&config.hmac_secret, &config.hmac_secret_file) {
        (Some(s), _) => s.clone().into_bytes(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| flywheel_core::Error::io(format!("reading HMAC secret {}", path.display()), e))?
            .trim_end_matches(['\n', '\r'])
            .as_bytes()
            .to_vec(),
        (None, None) => {
            return Err(CollectorError::Config(
                "no HMAC secret: set FLYWHEEL_COLLECTOR_HMAC_SECRET or --hmac-secret-file (≥ 16 bytes, stable across restarts)"
                    .into(),
            ));
        }
    };
    Pseudonymizer::new(&secret).map_err(CollectorError::Config)
}

/// A started collector.
pub struct Running {
    /// Where the public API listens.
    pub api_addr: SocketAddr,
    /// Where the ops endpoint listens.
    pub ops_addr: SocketAddr,
    service: tokio::task::JoinHandle<Result<(), CollectorError>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running").field("api_addr", &self.api_addr).field("ops_addr", &self.ops_addr).finish()
    }
}

impl Running {
    /// Waits until the collector stopped: after shutdown, its requests
    /// drained and its producer flushed (within the drain timeout), or after a
    /// task failed.
    pub async fn wait(self) -> Result<(), CollectorError> {
        self.service.await.map_err(|join| flywheel_core::Error::panicked("the collector", join))?
    }
}

/// Binds the API and ops listeners and starts serving; returns at once.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Running, CollectorError> {
    let tokens = load_tokens(&config)?;
    let pseudonymizer = load_secret(&config)?;
    let topics = config.common.topics.load()?;
    let mut producer_config = config.common.kafka.client_config(&ClientRole::Producer)?;
    producer_config
        .set("message.timeout.ms", config.produce_timeout_ms.to_string())
        .set("queue.buffering.max.messages", config.max_in_flight_events.max(1000).to_string());
    let max_event_bytes = max_event_bytes(&producer_config)?;
    let producer = ProducerSlot::new(producer_config)?;
    if !(1..=100_000).contains(&config.max_connections) {
        return Err(CollectorError::Config(format!(
            "--max-connections {} must be between 1 and 100000",
            config.max_connections
        )));
    }
    if config.header_read_timeout_ms == 0 || config.body_read_timeout_ms == 0 {
        return Err(CollectorError::Config("header and body read timeouts must be at least 1 ms".into()));
    }

    let mut harness = ServiceHarness::new("collector", &config.common.service);
    let metrics = Metrics::register(harness.registry());
    let readiness = harness.readiness();
    readiness.set("broker", false);
    let view = RegistryView::default();
    let state = AppState {
        tokens: Arc::new(tokens),
        pseudonymizer,
        redactor: config.redact_pii.then(|| Arc::new(Redactor::default())),
        limits: Arc::new(Limits { max_text_chars: config.max_text_chars, ..Limits::default() }),
        producer: producer.clone(),
        topic: topics.name(Topic::Interactions).into(),
        in_flight: Arc::new(Semaphore::new(config.max_in_flight_events)),
        max_in_flight: config.max_in_flight_events,
        max_body_bytes: config.max_body_bytes,
        max_batch_events: config.max_batch_events,
        max_event_bytes,
        body_read_timeout: Duration::from_millis(config.body_read_timeout_ms),
        produce_timeout: Duration::from_millis(config.produce_timeout_ms),
        registry: view.clone(),
        base_model: config.base_model.clone().into(),
        metrics: metrics.clone(),
    };

    let ops_addr = harness.bind_ops().await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| flywheel_core::Error::io(format!("binding API listener {}", config.listen), e))?;
    let api_addr = listener.local_addr().map_err(|e| flywheel_core::Error::io("reading API address", e))?;
    let app = Router::new()
        .route("/v1/events", post(post_events))
        .route("/v1/route", get(get_route))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state);
    let limits = ConnectionLimits {
        max_connections: config.max_connections,
        header_read_timeout: Duration::from_millis(config.header_read_timeout_ms),
    };
    let topic = topics.name(Topic::Interactions);
    tracing::info!(%api_addr, %ops_addr, %topic, max_event_bytes, "collector started");
    let registry_topic = topics.name(Topic::ModelRegistry);
    let (kafka, drain_timeout) = (config.common.kafka.clone(), config.common.service.drain_timeout());
    let service = tokio::spawn(harness.run(shutdown, move |stop| async move {
        let mut tasks: JoinSet<Result<(), CollectorError>> = JoinSet::new();
        let (connections, api_stop) = (metrics.connections.clone(), stop.clone());
        tasks.spawn(async move {
            serve::serve(listener, app, limits, connections, api_stop).await;
            Ok(())
        });
        // Readiness of the broker: metadata answers within a few seconds.
        let (probe, probe_ready, probe_stop) = (producer.clone(), readiness.clone(), stop.clone());
        tasks.spawn(async move {
            while !probe_stop.is_cancelled() {
                let p = probe.get();
                let ok = tokio::task::spawn_blocking(move || {
                    p.client().fetch_metadata(None, Duration::from_secs(3)).is_ok()
                })
                .await
                .unwrap_or(false);
                probe_ready.set("broker", ok);
                tokio::select! {
                    _ = probe_stop.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(if ok { 5 } else { 1 })) => {}
                }
            }
            Ok(())
        });
        let follow_stop = stop.clone();
        tasks.spawn(async move {
            tokio::task::spawn_blocking(move || follow_registry(&kafka, &registry_topic, view, readiness, follow_stop))
                .await
                .map_err(|e| flywheel_core::Error::panicked("the collector's registry follower", e))?
        });
        // Serve until shutdown or until a task ends on its own (a failure);
        // then requests drain, and only then is the producer flushed, so every
        // accepted event is on the broker before the process exits.
        let early = tokio::select! {
            _ = stop.cancelled() => None,
            Some(done) = tasks.join_next() => Some(done),
        };
        stop.cancel();
        // Bounded also when a task failed by itself (no SIGTERM, so no
        // harness drain): a stalled HTTP client cannot keep it alive.
        let rest = drain(tasks, drain_timeout).await;
        let p = producer.get();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || p.flush(Duration::from_secs(10))).await {
            tracing::warn!(error = %e, "producer flush at shutdown failed");
        }
        match early {
            Some(Ok(Err(e))) => Err(e),
            Some(Err(join)) => Err(flywheel_core::Error::panicked("a collector task", join).into()),
            _ => rest,
        }
    }));
    Ok(Running { api_addr, ops_addr, service })
}

/// Runs the collector until `shutdown` is cancelled, then drains.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), CollectorError> {
    start(config, shutdown).await?.wait().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A body that yields `chunk` once, then either stalls forever or fails.
    struct TestBody {
        chunk: Option<Bytes>,
        fail: bool,
    }

    impl hyper::body::Body for TestBody {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
            if let Some(chunk) = self.chunk.take() {
                return Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk))));
            }
            if self.fail {
                return Poll::Ready(Some(Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "cut short"))));
            }
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn bodies_are_read_within_their_limit_and_deadline() {
        let deadline = Duration::from_secs(5);
        assert_eq!(read_body(Body::from(vec![7u8; 11]), 11, deadline).await.unwrap().len(), 11);
        assert_eq!(read_body(Body::from(vec![7u8; 11]), 10, deadline).await, Err(BodyError::TooLarge));
        // A truncated or badly encoded body is the client's error (400), not "too large".
        let broken = Body::new(TestBody { chunk: Some(Bytes::from_static(b"[{")), fail: true });
        match read_body(broken, 100, deadline).await {
            Err(BodyError::Broken(e)) => assert!(e.contains("cut short"), "{e}"),
            other => panic!("expected a broken body, got {other:?}"),
        }
        // A stalled body ends at the deadline, not before, and never hangs.
        let started = Instant::now();
        let stalled = Body::new(TestBody { chunk: Some(Bytes::from_static(b"[")), fail: false });
        let limit = Duration::from_millis(200);
        let outcome = tokio::time::timeout(Duration::from_secs(10), read_body(stalled, 100, limit)).await;
        assert_eq!(outcome.expect("the deadline ends the read"), Err(BodyError::Timeout));
        assert!(started.elapsed() >= limit);
    }

    #[test]
    fn record_size_is_checked_against_the_producer_limit() {
        let mut config = rdkafka::ClientConfig::new();
        assert_eq!(max_event_bytes(&config).unwrap(), 1_000_000 - RECORD_OVERHEAD_BYTES);
        config.set("message.max.bytes", "200000");
        let max = max_event_bytes(&config).unwrap();
        assert_eq!(max, 199_964);
        assert!(check_record_size(10, max - 10, max).is_ok());
        let r = check_record_size(10, max - 9, max).unwrap_err();
        assert_eq!(r.code, "event_too_large");
        assert!(r.reason.contains("199965 bytes") && r.reason.contains("199964"), "{}", r.reason);
        assert!(REJECTION_CODES.contains(&r.code));
        config.set("message.max.bytes", "lots");
        assert!(max_event_bytes(&config).is_err());
        config.set("message.max.bytes", "100");
        assert!(max_event_bytes(&config).is_err());
    }

    #[test]
    fn only_size_refusals_are_per_record_errors() {
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::InvalidMessageSize,
            RDKafkaErrorCode::MessageBatchTooLarge,
        ] {
            let r = record_refusal(&KafkaError::MessageProduction(code), 1234).expect("per record");
            assert_eq!(r.code, "event_too_large");
            assert!(r.reason.contains("1234-byte"), "{}", r.reason);
        }
        // Outages and back-pressure concern the broker, not the record: 503 and a fresh producer.
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::NotEnoughReplicas,
            RDKafkaErrorCode::AllBrokersDown,
        ] {
            assert!(record_refusal(&KafkaError::MessageProduction(code), 1).is_none(), "{code:?}");
        }
        assert!(record_refusal(&KafkaError::Canceled, 1).is_none());
    }
}
