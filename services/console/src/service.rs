//! The console service: a follower that reads the topics into the [`View`],
//! an offset probe (end offsets, consumer-group positions), and the HTTP
//! server of the pages.
//!
//! Nothing is written to Kafka: partitions are assigned (the group is never
//! joined, no offset is committed). The follower keeps its own position per
//! partition, looks for new topics and partitions every few seconds, and
//! rides out broker restarts (librdkafka reconnects; the pages keep showing
//! the last view and say the broker is unreachable).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use clap::Parser;
use flywheel_core::kafka::KafkaArgs;
use flywheel_core::runtime::{CommonArgs, Readiness, ServiceHarness, blocking_worker, drain};
use flywheel_core::topics::Topic;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::ConsoleError;
use crate::html::{self, Ctx};
use crate::view::{GroupLag, Record, Source, View};

/// Console configuration; every flag has an environment variable.
#[derive(Debug, Clone, Parser)]
#[command(name = "flywheel-console", version, about = "Read-only web console of the flywheel's topics")]
pub struct Config {
    /// Service, Kafka and topic flags every service has.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Address of the pages. Loopback by default: expose it only behind a
    /// TLS proxy, with a token.
    #[arg(long = "listen", env = "FLYWHEEL_CONSOLE_LISTEN", default_value = "127.0.0.1:8070")]
    pub listen: SocketAddr,
    /// Token every request must carry (`Authorization: Bearer …`, or once as
    /// `?token=…`, which sets a cookie); none: no authentication.
    #[arg(long = "token", env = "FLYWHEEL_CONSOLE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the token (first line), instead of `--token`.
    #[arg(long = "token-file", env = "FLYWHEEL_CONSOLE_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// The gate's release policy TOML (the file given to `flywheel-gate
    /// --policy`): the window length, α and τ the canary charts use.
    #[arg(long = "release-policy", env = "FLYWHEEL_CONSOLE_RELEASE_POLICY")]
    pub release_policy: Option<PathBuf>,
    /// How often an open page asks whether it is stale (ms).
    #[arg(long = "refresh-ms", env = "FLYWHEEL_CONSOLE_REFRESH_MS", default_value_t = 5_000)]
    pub refresh_ms: u64,
    /// How often end offsets, consumer-group positions and the trainer's
    /// metrics are read (ms).
    #[arg(long = "probe-every-ms", env = "FLYWHEEL_CONSOLE_PROBE_EVERY_MS", default_value_t = 5_000)]
    pub probe_every_ms: u64,
    /// The trainer's ops `/metrics` URL (`http://host:port/metrics`), read
    /// for the Training page's running-job panel; repeatable or
    /// comma-separated (one panel per trainer). None: no panel.
    #[arg(
        long = "trainer-metrics-url",
        env = "FLYWHEEL_CONSOLE_TRAINER_METRICS_URL",
        value_delimiter = ',',
        value_parser = crate::trainer::Target::parse
    )]
    pub trainer_metrics_urls: Vec<crate::trainer::Target>,
    /// Consumer groups whose lag is shown, as `group=topic` (the topic's
    /// name in the map, e.g. `interactions`); repeatable or comma-separated.
    #[arg(
        long = "lag-group",
        env = "FLYWHEEL_CONSOLE_LAG_GROUPS",
        value_delimiter = ',',
        value_parser = parse_lag_group,
        default_value = "flywheel-rewarder=interactions,flywheel-lake-writer=rewards"
    )]
    pub lag_groups: Vec<(String, Topic)>,
}

fn parse_lag_group(s: &str) -> Result<(String, Topic), String> {
    let (group, topic) = s.split_once('=').ok_or_else(|| format!("expected group=topic, got '{s}'"))?;
    let t = Topic::ALL.into_iter().find(|t| t.default_name() == topic.trim()).ok_or_else(|| {
        let names: Vec<&str> = Topic::ALL.iter().map(|t| t.default_name()).collect();
        format!("unknown topic '{topic}' (one of {})", names.join(", "))
    })?;
    let group = group.trim();
    if group.is_empty() {
        return Err(format!("empty group in '{s}'"));
    }
    Ok((group.to_string(), t))
}

/// Reads the token from the flag or the file and checks it can travel in a
/// header and a cookie unchanged.
fn load_token(config: &Config) -> Result<Option<String>, ConsoleError> {
    let token = match (&config.token, &config.token_file) {
        (Some(t), _) => Some(t.trim().to_string()),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConsoleError::Config(format!("reading {}: {e}", path.display())))?;
            Some(text.lines().next().unwrap_or_default().trim().to_string())
        }
        (None, None) => None,
    };
    if let Some(t) = &token {
        let ok_chars = t.chars().all(|c| c.is_ascii_alphanumeric() || "-._~+/=".contains(c));
        if t.len() < 16 || t.len() > 256 || !ok_chars {
            return Err(ConsoleError::Config(
                "the console token must be 16 to 256 characters of A-Z a-z 0-9 - . _ ~ + / =".into(),
            ));
        }
    }
    Ok(token)
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicLabels {
    topic: String,
}

#[derive(Debug, Clone, Default)]
struct Metrics {
    records: Family<TopicLabels, Counter>,
    undecodable: Family<TopicLabels, Counter>,
    caught_up: Gauge,
    probe_failures: Counter,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics::default();
        let r = registry.sub_registry_with_prefix("console");
        r.register("records", "Records read per topic", m.records.clone());
        r.register("undecodable_records", "Records that did not decode, per topic", m.undecodable.clone());
        r.register("caught_up", "1 once every topic was read to its end at start", m.caught_up.clone());
        r.register("probe_failures", "Offset probes that failed (broker unreachable)", m.probe_failures.clone());
        m
    }
}

/// How long a metadata or offsets request may take before the follower or
/// the probe gives up on this turn (short, so shutdown is never held long).
const KAFKA_TIMEOUT: Duration = Duration::from_secs(3);

/// Topic → partition → end offset, for the topics that exist (a missing
/// topic has no partitions yet; it is not an error).
fn end_offsets(consumer: &BaseConsumer, topics: &[&str]) -> Result<BTreeMap<String, BTreeMap<i32, i64>>, String> {
    let md = consumer.fetch_metadata(None, KAFKA_TIMEOUT).map_err(|e| format!("metadata: {e}"))?;
    let mut query = TopicPartitionList::new();
    for t in md.topics().iter().filter(|t| topics.contains(&t.name())) {
        for p in t.partitions() {
            query.add_partition_offset(t.name(), p.id(), Offset::End).map_err(|e| e.to_string())?;
        }
    }
    let mut out: BTreeMap<String, BTreeMap<i32, i64>> = BTreeMap::new();
    if query.count() == 0 {
        return Ok(out);
    }
    let answer = consumer.offsets_for_times(query, KAFKA_TIMEOUT).map_err(|e| format!("end offsets: {e}"))?;
    for e in answer.elements() {
        if let Offset::Offset(end) = e.offset() {
            out.entry(e.topic().to_string()).or_default().insert(e.partition(), end);
        }
    }
    Ok(out)
}

fn lock(view: &RwLock<View>) -> std::sync::RwLockWriteGuard<'_, View> {
    view.write().unwrap_or_else(|p| p.into_inner())
}

/// Reads the followed topics from the beginning into `view` until `stop`.
fn follow(
    kafka: &KafkaArgs,
    names: &[(Source, String)],
    view: &RwLock<View>,
    readiness: &Readiness,
    metrics: &Metrics,
    stop: &CancellationToken,
) -> Result<(), ConsoleError> {
    let consumer: BaseConsumer = kafka.manual_consumer("flywheel-console")?;
    let topics: Vec<&str> = names.iter().map(|(_, n)| n.as_str()).collect();
    let source_of: HashMap<&str, Source> = names.iter().map(|(s, n)| (n.as_str(), *s)).collect();
    // Next offset to read per assigned partition (`None`: from the beginning).
    let mut next: BTreeMap<(String, i32), Option<i64>> = BTreeMap::new();
    // What must be read before the view is complete: the ends at start.
    let mut remaining: Option<HashMap<(String, i32), i64>> = None;
    let mut last_look: Option<Instant> = None;
    let mut warned = false;
    while !stop.is_cancelled() {
        let every = if next.is_empty() { Duration::from_secs(1) } else { Duration::from_secs(10) };
        if last_look.is_none_or(|t| t.elapsed() >= every) {
            last_look = Some(Instant::now());
            match end_offsets(&consumer, &topics) {
                Ok(ends) => {
                    warned = false;
                    let found: Vec<(String, i32)> =
                        ends.iter().flat_map(|(t, ps)| ps.keys().map(|p| (t.clone(), *p))).collect();
                    if found.iter().any(|k| !next.contains_key(k)) {
                        found.into_iter().for_each(|k| {
                            next.entry(k).or_insert(None);
                        });
                        let mut tpl = TopicPartitionList::new();
                        for ((t, p), at) in &next {
                            let offset = at.map_or(Offset::Beginning, Offset::Offset);
                            tpl.add_partition_offset(t, *p, offset)
                                .map_err(|e| flywheel_core::Error::kafka("assigning", e))?;
                        }
                        consumer.assign(&tpl).map_err(|e| flywheel_core::Error::kafka("assigning", e))?;
                        tracing::info!(partitions = next.len(), "following");
                    }
                    if remaining.is_none() {
                        let mut wait = HashMap::new();
                        for (t, ps) in &ends {
                            for (p, end) in ps {
                                let (low, _) = consumer.fetch_watermarks(t, *p, KAFKA_TIMEOUT).unwrap_or((0, *end));
                                if *end > low {
                                    wait.insert((t.clone(), *p), *end);
                                }
                            }
                        }
                        remaining = Some(wait);
                    }
                }
                Err(e) if !warned => {
                    tracing::warn!(error = %e, "cannot read the topics' offsets; retrying");
                    warned = true;
                }
                Err(_) => {}
            }
        }
        if let Some(wait) = &remaining
            && wait.is_empty()
            && metrics.caught_up.get() == 0
        {
            lock(view).caught_up = true;
            readiness.set("caught_up", true);
            metrics.caught_up.set(1);
            tracing::info!("history read; following");
        }
        let msg = match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "poll");
                continue;
            }
            None => continue,
        };
        let Some(source) = source_of.get(msg.topic()).copied() else { continue };
        let key = (msg.topic().to_string(), msg.partition());
        next.insert(key.clone(), Some(msg.offset() + 1));
        if let Some(wait) = remaining.as_mut()
            && wait.get(&key).is_some_and(|end| msg.offset() + 1 >= *end)
        {
            wait.remove(&key);
        }
        let labels = TopicLabels { topic: source.topic().default_name().to_string() };
        metrics.records.get_or_create(&labels).inc();
        let published = msg.timestamp().to_millis();
        let record = match msg.payload().map(|b| Record::decode(source, b, published)) {
            Some(Ok(r)) => Some(r),
            _ => {
                metrics.undecodable.get_or_create(&labels).inc();
                tracing::debug!(topic = msg.topic(), offset = msg.offset(), "undecodable record");
                None
            }
        };
        lock(view).apply(source, record);
    }
    Ok(())
}

/// Reads end offsets and group positions every `every` until `stop`.
fn probe(
    kafka: &KafkaArgs,
    topics: &[String],
    groups: &[(String, String)],
    view: &RwLock<View>,
    metrics: &Metrics,
    every: Duration,
    stop: &CancellationToken,
) -> Result<(), ConsoleError> {
    let consumer: BaseConsumer = kafka.manual_consumer("flywheel-console-probe")?;
    // One client per group, only ever asked for its committed offsets (an
    // offset fetch; the group is never joined).
    let mut readers: Vec<(String, String, BaseConsumer)> = Vec::new();
    for (group, topic) in groups {
        readers.push((group.clone(), topic.clone(), kafka.manual_consumer(group)?));
    }
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    while !stop.is_cancelled() {
        let started = Instant::now();
        match end_offsets(&consumer, &names) {
            Ok(ends) => {
                let totals = ends.iter().map(|(t, ps)| (t.clone(), ps.values().sum())).collect();
                let mut lag = Vec::new();
                for (group, topic, reader) in &readers {
                    let Some(parts) = ends.get(topic) else { continue };
                    let mut tpl = TopicPartitionList::new();
                    parts.keys().for_each(|p| {
                        tpl.add_partition(topic, *p);
                    });
                    let committed = reader.committed_offsets(tpl, KAFKA_TIMEOUT).ok();
                    let partitions = parts
                        .iter()
                        .map(|(p, end)| {
                            let c = committed
                                .as_ref()
                                .and_then(|c| c.find_partition(topic, *p))
                                .and_then(|e| if let Offset::Offset(o) = e.offset() { Some(o) } else { None });
                            (*p, (*end, c))
                        })
                        .collect();
                    lag.push(GroupLag { group: group.clone(), topic: topic.clone(), partitions });
                }
                lock(view).probed(flywheel_core::now_millis(), totals, lag);
            }
            Err(e) => {
                metrics.probe_failures.inc();
                let mut v = lock(view);
                if v.probe.error.is_none() {
                    tracing::warn!(error = %e, "offset probe failed");
                }
                let since = v.probe.error.as_ref().map_or_else(flywheel_core::now_millis, |(at, _)| *at);
                v.probe_failed(since, e);
            }
        }
        while !stop.is_cancelled() && started.elapsed() < every {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// What the HTTP handlers share.
#[derive(Debug)]
struct AppState {
    view: Arc<RwLock<View>>,
    policies: flywheel_gate::service::Policies,
    refresh_ms: u64,
    token: Option<String>,
    throughput: [String; 2],
}

impl AppState {
    fn render(&self, f: impl FnOnce(&View, &Ctx<'_>) -> Option<String>) -> Response {
        let view = self.view.read().unwrap_or_else(|p| p.into_inner());
        let ctx = Ctx {
            refresh_ms: self.refresh_ms,
            policies: &self.policies,
            throughput_topics: [self.throughput[0].as_str(), self.throughput[1].as_str()],
        };
        match f(&view, &ctx) {
            Some(page) => Html(page).into_response(),
            None => (StatusCode::NOT_FOUND, Html(html::message("Not found", "Nothing on the topics names this yet.")))
                .into_response(),
        }
    }
}

type Shared = State<Arc<AppState>>;

#[derive(Debug, Deserialize)]
struct PairQuery {
    tenant: String,
    model: String,
}

#[derive(Debug, Deserialize)]
struct AdapterQuery {
    tenant: String,
    model: String,
    adapter: String,
}

fn router(state: Arc<AppState>) -> Router {
    const JS: &str = include_str!("static/live.js");
    const CSS: &str = include_str!("static/console.css");
    const ICON: &str = include_str!("static/favicon.svg");
    let asset = |kind: &'static str, body: &'static str| move || async move { ([(header::CONTENT_TYPE, kind)], body) };
    Router::new()
        .route("/", get(|State(s): Shared| async move { s.render(|v, c| Some(html::index(v, c))) }))
        .route(
            "/models",
            get(|State(s): Shared, Query(q): Query<PairQuery>| async move {
                s.render(|v, c| html::models(v, c, &q.tenant, &q.model))
            }),
        )
        .route(
            "/training",
            get(|State(s): Shared, Query(q): Query<PairQuery>| async move {
                s.render(|v, c| html::training(v, c, &q.tenant, &q.model))
            }),
        )
        .route(
            "/lineage",
            get(|State(s): Shared, Query(q): Query<AdapterQuery>| async move {
                s.render(|v, c| html::lineage(v, c, &q.tenant, &q.model, &q.adapter))
            }),
        )
        .route("/pipeline", get(|State(s): Shared| async move { s.render(|v, c| Some(html::pipeline(v, c))) }))
        .route(
            "/api/version",
            get(|State(s): Shared| async move {
                let v = s.view.read().unwrap_or_else(|p| p.into_inner());
                axum::Json(serde_json::json!({
                    "changes": v.changes,
                    "probes": v.probes,
                    "caught_up": v.caught_up,
                    "trainer": v.trainer_changes,
                    "records": v.read.values().sum::<u64>(),
                }))
            }),
        )
        .route("/static/live.js", get(asset("text/javascript; charset=utf-8", JS)))
        .route("/static/console.css", get(asset("text/css; charset=utf-8", CSS)))
        .route("/favicon.svg", get(asset("image/svg+xml", ICON)))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .fallback(|| async { (StatusCode::NOT_FOUND, Html(html::message("Not found", "No such page."))) })
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn(harden))
        .with_state(state)
}

/// Headers on every answer: no script but our own file, nothing cached,
/// never framed.
async fn harden(req: Request, next: Next) -> Response {
    let mut response = next.run(req).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

const COOKIE: &str = "flywheel_console";

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// With a token configured, a request passes with `Authorization: Bearer
/// <token>` or the console's cookie; `?token=<token>` sets the cookie and
/// redirects to the same page without it (so a printed URL opens in a
/// browser). Everything else is 401.
async fn authenticate(State(s): Shared, req: Request, next: Next) -> Response {
    let Some(token) = &s.token else { return next.run(req).await };
    let headers = req.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| same(t.trim(), token));
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .any(|(k, v)| k == COOKIE && same(v, token));
    if bearer || cookie {
        return next.run(req).await;
    }
    if let Ok(Query(q)) = Query::<Vec<(String, String)>>::try_from_uri(req.uri())
        && q.iter().any(|(k, v)| k == "token" && same(v, token))
    {
        let rest: Vec<(&str, &str)> =
            q.iter().filter(|(k, _)| k != "token").map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let path = req.uri().path();
        let location = if rest.is_empty() {
            path.to_string()
        } else {
            let pairs: Vec<String> =
                rest.iter().map(|(k, v)| format!("{}={}", crate::text::enc(k), crate::text::enc(v))).collect();
            format!("{path}?{}", pairs.join("&"))
        };
        let cookie = format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict");
        let mut r = StatusCode::SEE_OTHER.into_response();
        if let (Ok(l), Ok(c)) = (HeaderValue::from_str(&location), HeaderValue::from_str(&cookie)) {
            r.headers_mut().insert(header::LOCATION, l);
            r.headers_mut().insert(header::SET_COOKIE, c);
        }
        return r;
    }
    let mut r = (
        StatusCode::UNAUTHORIZED,
        Html(html::message(
            "Token required",
            "Send Authorization: Bearer <token>, or open the URL with ?token=<token>.",
        )),
    )
        .into_response();
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"flywheel-console\""));
    r
}

/// Runs the console until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), ConsoleError> {
    let topics = config.common.topics.load()?;
    let policies = flywheel_gate::service::Policies::load_or_default(config.release_policy.as_deref())?;
    let token = load_token(&config)?;
    let mut harness = ServiceHarness::new("console", &config.common.service);
    let metrics = Metrics::register(harness.registry());
    let readiness = harness.readiness();
    readiness.set("caught_up", false);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ConsoleError::Io { context: format!("binding the console on {}", config.listen), source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ConsoleError::Io { context: "reading the console address".into(), source })?;

    let view = Arc::new(RwLock::new(View {
        trainers: config
            .trainer_metrics_urls
            .iter()
            .map(|t| crate::view::TrainerScrape { url: t.url.clone(), last: None })
            .collect(),
        ..View::default()
    }));
    let names: Vec<(Source, String)> = Source::ALL.into_iter().map(|s| (s, topics.name(s.topic()))).collect();
    let all_topics: Vec<String> = Topic::ALL.into_iter().map(|t| topics.name(t)).collect();
    let groups: Vec<(String, String)> = config.lag_groups.iter().map(|(g, t)| (g.clone(), topics.name(*t))).collect();
    let state = Arc::new(AppState {
        view: view.clone(),
        policies,
        refresh_ms: config.refresh_ms.max(500),
        token,
        throughput: [topics.name(Topic::Interactions), topics.name(Topic::Rewards)],
    });

    let drain_timeout = config.common.service.drain_timeout();
    harness
        .run(shutdown, move |stop| async move {
            let mut tasks: JoinSet<Result<(), ConsoleError>> = JoinSet::new();
            {
                let (kafka, view, readiness, metrics) = (config.common.kafka.clone(), view.clone(), readiness, metrics.clone());
                let token = stop.clone();
                tasks.spawn(async move {
                    blocking_worker(&token, move |stop| follow(&kafka, &names, &view, &readiness, &metrics, &stop))
                        .await
                        .map_err(|e| flywheel_core::Error::panicked("the console follower", e))?
                });
            }
            {
                let (kafka, view, metrics) = (config.common.kafka.clone(), view.clone(), metrics.clone());
                let every = Duration::from_millis(config.probe_every_ms.max(200));
                let token = stop.clone();
                tasks.spawn(async move {
                    blocking_worker(&token, move |stop| probe(&kafka, &all_topics, &groups, &view, &metrics, every, &stop))
                        .await
                        .map_err(|e| flywheel_core::Error::panicked("the console probe", e))?
                });
            }
            if !config.trainer_metrics_urls.is_empty() {
                let (targets, view, stop) = (config.trainer_metrics_urls.clone(), view.clone(), stop.clone());
                let every = Duration::from_millis(config.probe_every_ms.max(200));
                tasks.spawn(async move {
                    crate::trainer::poll(targets, view, every, stop).await;
                    Ok(())
                });
            }
            {
                let app = router(state);
                let stop = stop.clone();
                tasks.spawn(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async move { stop.cancelled().await })
                        .await
                        .map_err(|source| ConsoleError::Io { context: "serving the console".into(), source })
                });
            }
            tracing::info!(url = %format!("http://{addr}/"), auth = config.token.is_some() || config.token_file.is_some(), "console listening");

            // Until shutdown, or until a task ends (an error: none ends by
            // itself); then every task stops (the harness bounds the wait).
            let first = tokio::select! {
                _ = stop.cancelled() => None,
                Some(done) = tasks.join_next() => Some(done),
            };
            stop.cancel();
            // Bounded also when a task failed by itself (no SIGTERM, so no
            // harness drain): a stalled HTTP client cannot keep it alive.
            let rest = drain(tasks, drain_timeout).await;
            match first {
                Some(Ok(Err(e))) => Err(e),
                Some(Err(join)) => Err(flywheel_core::Error::panicked("a console task", join).into()),
                _ => rest,
            }
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("flywheel-console").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_bind_loopback_and_watch_the_data_path_groups() {
        let c = config(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8070");
        assert_eq!(
            c.lag_groups,
            [
                ("flywheel-rewarder".to_string(), Topic::Interactions),
                ("flywheel-lake-writer".to_string(), Topic::Rewards)
            ]
        );
        assert!(load_token(&c).unwrap().is_none());
        let c = config(&["--lag-group", "g1=shards", "--lag-group", "g2=dead-letters"]).unwrap();
        assert_eq!(c.lag_groups, [("g1".to_string(), Topic::Shards), ("g2".to_string(), Topic::DeadLetters)]);
        assert!(config(&["--lag-group", "g=nope"]).unwrap_err().to_string().contains("unknown topic 'nope'"));
        assert!(config(&[]).unwrap().trainer_metrics_urls.is_empty());
        let c = config(&["--trainer-metrics-url", "http://a:1/metrics,http://b:2/metrics"]).unwrap();
        let urls: Vec<&str> = c.trainer_metrics_urls.iter().map(|t| t.url.as_str()).collect();
        assert_eq!(urls, ["http://a:1/metrics", "http://b:2/metrics"]);
        assert!(config(&["--trainer-metrics-url", "https://a:1/metrics"]).is_err());
    }

    #[test]
    fn tokens_must_be_long_and_cookie_safe() {
        assert!(load_token(&config(&["--token", "short"]).unwrap()).is_err());
        assert!(load_token(&config(&["--token", "has;semicolon-0123456789"]).unwrap()).is_err());
        let ok = "0123456789abcdef-XYZ";
        assert_eq!(load_token(&config(&["--token", ok]).unwrap()).unwrap().as_deref(), Some(ok));
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }

    /// Calls the router in process (no socket).
    async fn get(app: &Router, uri: &str, headers: &[(&str, &str)]) -> Response {
        use tower::ServiceExt;
        let mut req = axum::http::Request::builder().uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        app.clone().oneshot(req.body(axum::body::Body::empty()).unwrap()).await.unwrap()
    }

    fn app(token: Option<&str>) -> Router {
        let state = Arc::new(AppState {
            view: Arc::new(RwLock::new(View::default())),
            policies: Default::default(),
            refresh_ms: 5000,
            token: token.map(str::to_string),
            throughput: ["interactions".into(), "rewards".into()],
        });
        router(state)
    }

    #[tokio::test]
    async fn pages_answer_with_hardening_headers_and_unknown_pairs_are_404() {
        let app = app(None);
        let r = get(&app, "/", &[]).await;
        assert_eq!(r.status(), StatusCode::OK);
        let csp = r.headers()[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(csp.contains("script-src 'self'") && csp.contains("default-src 'none'"));
        assert_eq!(get(&app, "/models?tenant=a&model=b", &[]).await.status(), StatusCode::NOT_FOUND);
        assert_eq!(get(&app, "/models", &[]).await.status(), StatusCode::BAD_REQUEST);
        assert_eq!(get(&app, "/static/live.js", &[]).await.status(), StatusCode::OK);
        assert_eq!(get(&app, "/nope", &[]).await.status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn a_token_is_required_by_header_cookie_or_once_in_the_url() {
        let token = "0123456789abcdef-token";
        let app = app(Some(token));
        let r = get(&app, "/pipeline", &[]).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.headers().contains_key(header::WWW_AUTHENTICATE));
        assert_eq!(
            get(&app, "/api/version", &[("authorization", "Bearer wrong-token-0123456")]).await.status(),
            StatusCode::UNAUTHORIZED
        );
        let bearer = format!("Bearer {token}");
        assert_eq!(get(&app, "/api/version", &[("authorization", &bearer)]).await.status(), StatusCode::OK);
        let r = get(&app, &format!("/models?tenant=a&token={token}&model=b%2Fc"), &[]).await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert_eq!(r.headers()[header::LOCATION], "/models?tenant=a&model=b%2Fc");
        let cookie = r.headers()[header::SET_COOKIE].to_str().unwrap().to_string();
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
        let sent = cookie.split(';').next().unwrap();
        assert_eq!(get(&app, "/", &[("cookie", &format!("other=1; {sent}"))]).await.status(), StatusCode::OK);
        assert_eq!(get(&app, "/?token=wrong-token-0123456", &[]).await.status(), StatusCode::UNAUTHORIZED);
    }
}
