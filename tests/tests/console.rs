//! The console against the real broker, as a person uses it: a prepared
//! state is produced on the topics (registry revisions, metrics windows,
//! trigger decisions, train requests, shards, candidates, dead letters with
//! hostile strings), the `flywheel-console` binary is started, and
//!
//! - every page is fetched over HTTP and its numbers are compared with a
//!   recomputation from the records read back from the topics; new records
//!   appear without a restart; the token is enforced;
//! - the console keeps serving while its broker stops and picks up what is
//!   written after the broker is back;
//! - the Training page shows a running job's step, loss, tokens/s and ETA
//!   from the trainer's real ops server (`/metrics`), and says so when it is gone;
//! - every page is loaded in headless Chromium: the DOM shows the registry's
//!   live version, charts have points, the injected `<script>` is inert
//!   text, the browser logs nothing; screenshots land in
//!   `target/console-screenshots/`.
//!
//! Every wait has a hard limit. A missing chromium fails with a message
//! naming `make setup`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flywheel_core::codec::encode;
use flywheel_core::kafka::{ClientRole, KafkaArgs, create_topics};
use flywheel_core::records::{
    AdapterRef, Canary, CheckResult, DeadLetter, Interaction, InteractionPayload, ModelCandidate, RegistryEntry,
    ReleaseAction, ReleaseDecision, RewardMetrics, ShardManifest, ShardRef, SourcePosition, TrainRequest,
    TriggerDecision,
};
use flywheel_core::topics::{Topic, TopicsConfig};
use flywheel_devkit::{LocalBroker, free_local_addr, tansu_binary};
use flywheel_gate::sequential::{Moments, msprt};
use flywheel_tests::{TestTopics, read_all, service_args, test_topics, workspace_binary, workspace_root};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

/// A minute-aligned instant; every time in the prepared state is relative to
/// it, and nothing the console shows depends on today's date.
const T0: i64 = 1_795_000_020_000;
const MIN: i64 = 60_000;
/// How long after its window ends each metrics record is published (its Kafka timestamp).
const PUBLISH_DELAY: i64 = 5_000;
const TOKEN: &str = "console-test-token-0123456789";
/// Runs when a page fails to escape; the browser test checks it never does.
const XSS: &str = "<script>document.title='pwned'</script>";
const XSS_IMG: &str = "<img src=x onerror=\"document.title='pwned'\">";

fn fixture<T: flywheel_core::AvroRecord>(name: &str) -> T {
    serde_json::from_slice(&std::fs::read(workspace_root().join("schemas/fixtures").join(name)).unwrap()).unwrap()
}

// ---------------------------------------------------------------- the state

fn adapter(v: &str) -> AdapterRef {
    AdapterRef {
        adapter_version: v.into(),
        adapter_uri: format!("file:///adapters/{v}"),
        adapter_sha256: "ab".repeat(32),
    }
}

fn decision(at: i64, action: ReleaseAction, v: &str, reason: &str, stats: &[(&str, f64)]) -> ReleaseDecision {
    ReleaseDecision {
        at,
        action,
        adapter_version: v.into(),
        reason: reason.into(),
        statistics: stats.iter().map(|(k, x)| (k.to_string(), *x)).collect(),
    }
}

/// Revisions 1–3 (a1 canary, a1 promoted with a hostile reason, a2 canary)
/// and, for the follow-up, revision 4 (a2 promoted).
fn registry() -> Vec<RegistryEntry> {
    let h = [
        decision(
            T0 + MIN,
            ReleaseAction::CanaryStarted,
            "a1",
            "offline gate passed [request req-a1, policy console-test]",
            &[("accuracy_gain", 0.3), ("kl_to_parent", 0.01)],
        ),
        decision(
            T0 + 15 * MIN,
            ReleaseAction::Promoted,
            "a1",
            &format!("significantly better {XSS}"),
            &[("accept_rate_p_value", 0.0123), ("mean_reward_p_value", 0.0045), ("alpha", 0.05)],
        ),
        decision(
            T0 + 16 * MIN + 40_000,
            ReleaseAction::CanaryStarted,
            "a2",
            "offline gate passed [request req-a2]",
            &[],
        ),
        decision(
            T0 + 33 * MIN,
            ReleaseAction::Promoted,
            "a2",
            "significantly better",
            &[("accept_rate_p_value", 0.03), ("mean_reward_p_value", 0.02), ("alpha", 0.05)],
        ),
    ];
    let entry = |revision: usize, live: Option<&str>, canary: Option<&str>| RegistryEntry {
        tenant: "acme".into(),
        base_model: "tiny".into(),
        revision: revision as i64,
        live: live.map(adapter),
        canary: canary.map(|v| Canary {
            adapter: adapter(v),
            traffic_share: 0.25,
            started_at: h.iter().find(|d| d.adapter_version == v).unwrap().at,
        }),
        history: h[..revision].to_vec(),
        updated_at: h[revision - 1].at,
    };
    vec![
        entry(1, None, Some("a1")),
        entry(2, Some("a1"), None),
        entry(3, Some("a1"), Some("a2")),
        entry(4, Some("a2"), None),
    ]
}

fn window(adapter: Option<&str>, start: i64, len: i64, shown: i64, accepted: i64, partition: i32) -> RewardMetrics {
    let mut m: RewardMetrics = fixture("reward_metrics.window.json");
    m.tenant = "acme".into();
    m.model_id = "tiny".into();
    m.adapter_version = adapter.map(str::to_string);
    m.window_start = start;
    m.window_end = start + len;
    m.shown = shown;
    m.accepted = accepted;
    m.rejected = shown - accepted;
    (m.dismissed, m.ignored) = (0, 0);
    m.reward_sum = 0.75 * accepted as f64 - 0.25 * (shown - accepted) as f64;
    m.reward_sum_sq = 0.5625 * accepted as f64 + 0.0625 * (shown - accepted) as f64;
    m.source_partition = partition;
    m.emitted_at_offset = start / 1000 + len / 1000;
    m
}

/// The base and a1 over fourteen minutes from a1's canary start (the last
/// window is published after a1's promotion: the gate never saw it), a2
/// against a1 over six minutes from a2's, an hour window (another length,
/// charted apart), and one record twice (a replay).
fn windows() -> Vec<RewardMetrics> {
    let mut out = Vec::new();
    for i in 0..14 {
        let start = T0 + MIN + i * MIN;
        for p in 0..2 {
            out.push(window(None, start, MIN, 30, 6 + (i + i64::from(p)) % 3, p));
            out.push(window(Some("a1"), start, MIN, 10, 4 + (i + i64::from(p)) % 3, p));
        }
    }
    for i in 0..6 {
        let start = T0 + 17 * MIN + i * MIN;
        out.push(window(Some("a2"), start, MIN, 10, 5 + i % 2, 0));
        out.push(window(Some("a1"), start, MIN, 30, 12, 0));
    }
    out.push(window(None, T0, 60 * MIN, 999, 111, 0));
    out.push(out[3].clone());
    out
}

fn check(name: &str, passed: bool, observed: f64, threshold: f64, message: &str) -> CheckResult {
    CheckResult { check: name.into(), passed, observed, threshold, comparison: ">=".into(), message: message.into() }
}

fn decisions() -> Vec<TriggerDecision> {
    let mut fired: TriggerDecision = fixture("trigger_decision.not_fired.json");
    (fired.tenant, fired.base_model, fired.decision_id) = ("acme".into(), "tiny".into(), "d1".into());
    (fired.evaluated_at, fired.fired, fired.train_request_id) = (T0 + 8 * MIN, true, Some("req-a2".into()));
    fired.checks = vec![check("min_examples", true, 1500.0, 1000.0, "examples 1500 >= 1000")];
    let mut latest = fired.clone();
    (latest.decision_id, latest.evaluated_at, latest.fired, latest.train_request_id) =
        ("d2".into(), T0 + 25 * MIN, false, None);
    latest.checks = vec![
        check("min_examples", true, 2000.0, 1000.0, "examples 2000 >= 1000"),
        check("reward_variance", false, 0.001, 0.01, "reward variance 0.001 < floor 0.01"),
        check("distinct_users", false, 7.0, 20.0, &format!("users 7 < 20 {XSS_IMG}")),
    ];
    vec![fired, latest]
}

fn shard(id: &str, tenant: &str, committed_at: i64, rows: i64, partition: i32, first: i64) -> ShardManifest {
    let mut s: ShardManifest = fixture("shard_manifest.committed.json");
    (s.shard_id, s.tenant, s.committed_at, s.rows) = (id.into(), tenant.into(), committed_at, rows);
    s.uri = format!("rewards/tenant={tenant}/{id}.parquet");
    (s.source.topic, s.source.partition, s.source.first_offset, s.source.last_offset) =
        ("rewards".into(), partition, first, first + rows - 1);
    s
}

fn shards() -> Vec<ShardManifest> {
    vec![
        shard("s1", "acme", T0 + 2 * MIN, 600, 0, 0),
        shard("s2", "acme", T0 + 3 * MIN, 400, 1, 0),
        shard("s3", "acme", T0 + 70 * MIN, 500, 0, 600),
        shard("s4", "globex", T0 + 3 * MIN, 250, 2, 0),
    ]
}

fn request(id: &str, parent: Option<&str>, shard_ids: &[&str]) -> TrainRequest {
    let mut r: TrainRequest = fixture("train_request.reinforce.json");
    (r.request_id, r.tenant, r.base_model) = (id.into(), "acme".into(), "tiny".into());
    r.parent_adapter_version = parent.map(str::to_string);
    let all = shards();
    r.shards = shard_ids
        .iter()
        .map(|s| {
            let m = all.iter().find(|m| m.shard_id == *s).unwrap();
            ShardRef {
                shard_id: m.shard_id.clone(),
                uri: m.uri.clone(),
                lake_root: m.lake_root.clone(),
                content_sha256: m.content_sha256.clone(),
                rows: m.rows,
                table_version: Some(m.commit_seq),
            }
        })
        .collect();
    r.created_at = T0 + if parent.is_some() { 8 * MIN } else { 4 * MIN };
    r
}

fn candidate(v: &str, request: &str, parent: Option<&str>, accuracy: f64) -> ModelCandidate {
    let mut c: ModelCandidate = fixture("model_candidate.trained.json");
    (c.adapter_version, c.request_id, c.tenant, c.base_model) =
        (v.into(), request.into(), "acme".into(), "tiny".into());
    c.parent_adapter_version = parent.map(str::to_string);
    c.candidate_metrics =
        [("implicit_reward_accuracy".to_string(), accuracy), ("holdout_loss".to_string(), 1.7)].into();
    c.parent_metrics = [("implicit_reward_accuracy".to_string(), 0.5), ("holdout_loss".to_string(), 1.9)].into();
    c.created_at = T0 + if parent.is_some() { 16 * MIN } else { MIN };
    c
}

fn dead_letters() -> Vec<DeadLetter> {
    let malformed: DeadLetter = fixture("dead_letter.malformed.json");
    let mut shown: Interaction = fixture("interaction.shown.json");
    if let InteractionPayload::Shown(s) = &mut shown.payload {
        s.completion = format!("fn main() {{}} {XSS}");
    }
    let orphan = DeadLetter {
        service: "rewarder".into(),
        reason_code: "orphan_event".into(),
        reason: "no shown event for this suggestion".into(),
        source: SourcePosition { topic: "interactions".into(), partition: 0, offset: 17 },
        original_key: Some(b"sugg-000042".to_vec()),
        original_value: Some(encode(&shown).unwrap()),
        failed_at: T0 + 5 * MIN,
    };
    let hostile = DeadLetter {
        service: "lake-writer".into(),
        reason_code: "invalid_reward".into(),
        reason: format!("bad reward {XSS}"),
        original_value: Some(XSS_IMG.as_bytes().to_vec()),
        failed_at: T0 + 6 * MIN,
        ..malformed.clone()
    };
    vec![malformed.clone(), malformed.clone(), malformed, orphan, hostile]
}

/// Produces the prepared state; returns how many records the console follows.
async fn produce_state(kafka: &KafkaArgs, topics: &TopicsConfig) -> u64 {
    let p: FutureProducer = kafka.client_config(&ClientRole::Producer).unwrap().create().unwrap();
    let mut n = 0;
    for e in &registry()[..3] {
        send(&p, topics, Topic::ModelRegistry, "acme/tiny", e).await;
        n += 1;
    }
    for m in windows() {
        // Published 5 s after the window ends, as a rewarder would.
        send_at(&p, topics, Topic::RewardMetrics, "acme/tiny", &m, Some(m.window_end + PUBLISH_DELAY)).await;
        n += 1;
    }
    for d in decisions() {
        send(&p, topics, Topic::TriggerDecisions, "acme/tiny", &d).await;
        n += 1;
    }
    for r in [request("req-a1", None, &["s1", "s2"]), request("req-a2", Some("a1"), &["s3"])] {
        send(&p, topics, Topic::TrainRequests, &r.request_id.clone(), &r).await;
        n += 1;
    }
    for s in shards() {
        send(&p, topics, Topic::Shards, &s.tenant.clone(), &s).await;
        n += 1;
    }
    for c in [candidate("a1", "req-a1", None, 0.8), candidate("a2", "req-a2", Some("a1"), 0.85)] {
        send(&p, topics, Topic::ModelCandidates, "acme/tiny", &c).await;
        n += 1;
    }
    for d in dead_letters() {
        send(&p, topics, Topic::DeadLetters, "k", &d).await;
        n += 1;
    }
    n
}

async fn send<T: flywheel_core::AvroRecord>(p: &FutureProducer, topics: &TopicsConfig, topic: Topic, key: &str, r: &T) {
    send_at(p, topics, topic, key, r, None).await
}

/// Produces with the record timestamp `at` (else the producer's clock).
async fn send_at<T: flywheel_core::AvroRecord>(
    p: &FutureProducer,
    topics: &TopicsConfig,
    topic: Topic,
    key: &str,
    r: &T,
    at: Option<i64>,
) {
    let bytes = encode(r).unwrap();
    let name = topics.name(topic);
    let mut record = FutureRecord::to(&name).key(key).payload(&bytes);
    if let Some(at) = at {
        record = record.timestamp(at);
    }
    p.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e).expect("producing a prepared record");
}

// -------------------------------------------------------------- the console

/// A running `flywheel-console`; killed when dropped.
struct Console {
    child: Child,
    addr: SocketAddr,
}

impl Console {
    fn start(args: Vec<String>, extra: &[&str]) -> Console {
        let addr = free_local_addr().expect("a free port");
        let child = Command::new(workspace_binary("flywheel-console"))
            .args(&args[1..])
            .args(["--listen", &addr.to_string(), "--probe-every-ms", "500", "--refresh-ms", "2000"])
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("starting flywheel-console");
        Console { child, addr }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn get_as(&self, path: &str, token: Option<&str>) -> Option<flywheel_tests::HttpResponse> {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = bearer.iter().map(|b| ("authorization", b.as_str())).collect();
        flywheel_cli::http::request(self.addr, "GET", path, &headers, Vec::new()).await.ok()
    }

    /// A page's HTML (200 required).
    async fn page(&self, path: &str, token: Option<&str>) -> String {
        let r = self.get_as(path, token).await.unwrap_or_else(|| panic!("GET {path}: no answer"));
        let body = String::from_utf8(r.body).unwrap();
        assert_eq!(r.status, 200, "GET {path}: {body}");
        body
    }

    /// Polls `path` until `check` holds (at most `secs`); returns the page.
    async fn wait_for(&self, path: &str, token: Option<&str>, secs: u64, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(r) = self.get_as(path, token).await {
                last = String::from_utf8_lossy(&r.body).into_owned();
                if r.status == 200 && check(&last) {
                    return last;
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("{path} did not show what was expected within {secs} s; last answer:\n{last}");
    }

    /// Waits until the console read its history and `records` records.
    async fn wait_caught_up(&self, token: Option<&str>, records: u64) {
        self.wait_for("/api/version", token, 60, |body| {
            let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            v["caught_up"] == true && v["records"].as_u64() == Some(records)
        })
        .await;
    }

    /// SIGTERM, then the exit status (at most `secs`).
    fn terminate(&mut self, secs: u64) -> std::process::ExitStatus {
        flywheel_tests::terminate_within(&mut self.child, secs)
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn prepared(label: &str) -> (TestTopics, u64) {
    let test = test_topics(label, &Topic::ALL, None).await;
    let n = produce_state(&test.kafka, &test.topics).await;
    (test, n)
}

// ------------------------------------------------------- expected numbers

/// Sums of a version's distinct windows of one length, as the topic holds them.
#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    shown: i64,
    accepted: i64,
    reward_sum: f64,
    reward_sum_sq: f64,
}

impl Sums {
    fn add(&mut self, m: &RewardMetrics) {
        self.shown += m.shown;
        self.accepted += m.accepted;
        self.reward_sum += m.reward_sum;
        self.reward_sum_sq += m.reward_sum_sq;
    }
}

fn distinct_windows(metrics: &[RewardMetrics], len: i64) -> Vec<RewardMetrics> {
    let mut seen = BTreeSet::new();
    metrics
        .iter()
        .filter(|m| m.window_end - m.window_start == len)
        .filter(|m| {
            seen.insert(format!(
                "{:?}|{}|{}|{}|{:?}|{:?}",
                m.adapter_version, m.window_start, m.source_partition, m.emitted_at_offset, m.experiment_arm, m.surface
            ))
        })
        .cloned()
        .collect()
}

fn p_text(p: f64) -> String {
    if p != 0.0 && p < 1e-4 { format!("{p:.2e}") } else { format!("{p:.4}") }
}

/// The text between `start` and the next `<` after it.
fn text_after<'a>(html: &'a str, start: &str) -> &'a str {
    let at = html.find(start).unwrap_or_else(|| panic!("{start} not on the page:\n{html}")) + start.len();
    &html[at..at + html[at..].find('<').unwrap()]
}

fn row<'a>(html: &'a str, start: &str) -> &'a str {
    let at = html.find(start).unwrap_or_else(|| panic!("{start} not on the page:\n{html}"));
    &html[at..at + html[at..].find("</tr>").unwrap()]
}

/// Our one script tag (live.js) and nothing a record brought in.
fn assert_inert(html: &str, page: &str) {
    assert_eq!(html.matches("<script").count(), 1, "{page}: a record's script tag got through:\n{html}");
    assert!(!html.contains("<img"), "{page}: a record's img tag got through");
    assert!(!html.contains("document.title='pwned'"), "{page}: unescaped payload");
}

// ------------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_shows_the_numbers_on_the_topics_and_follows_new_records() {
    let (test, records) = prepared("console").await;
    // A group with a committed position on interactions: 10 records on
    // partition 0, committed at 4.
    let interactions = test.topics.name(Topic::Interactions);
    let producer: FutureProducer = test.kafka.client_config(&ClientRole::Producer).unwrap().create().unwrap();
    for i in 0..10 {
        producer
            .send(
                FutureRecord::to(&interactions).partition(0).key("k").payload(&format!("raw {i}")),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let group = format!("console-lag-{}", std::process::id());
    let committer: BaseConsumer = test.kafka.manual_consumer(&group).unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&interactions, 0, Offset::Offset(4)).unwrap();
    committer.commit(&tpl, CommitMode::Sync).expect("committing a group offset");

    let args = service_args("flywheel-console", &test, &[]);
    let lag_group = format!("{group}=interactions");
    let console = Console::start(args, &["--token", TOKEN, "--lag-group", &lag_group]);
    console.wait_caught_up(Some(TOKEN), records).await;
    let t = Some(TOKEN);

    // Authentication: nothing without the token.
    let r = console.get_as("/", None).await.unwrap();
    assert_eq!(r.status, 401);
    assert!(!String::from_utf8_lossy(&r.body).contains("acme"));

    // What the topics hold, read back independently.
    let kafka = &test.kafka;
    let name = |t: Topic| test.topics.name(t);
    let entries: Vec<RegistryEntry> = read_all(kafka, &name(Topic::ModelRegistry)).into_iter().map(|r| r.2).collect();
    let newest = entries.iter().max_by_key(|e| e.revision).unwrap();
    let metrics: Vec<RewardMetrics> = read_all(kafka, &name(Topic::RewardMetrics)).into_iter().map(|r| r.2).collect();
    let minute = distinct_windows(&metrics, MIN);
    assert_eq!(minute.len(), metrics.len() - 2, "the replay and the hour window are not minute windows");

    // Overview.
    let html = console.page("/", t).await;
    let pair = row(&html, r#"<tr data-tenant="acme" data-model="tiny">"#);
    assert!(pair.contains(&format!(r#"<td class="revision">{}</td>"#, newest.revision)), "{pair}");
    assert!(pair.contains(r#"<td class="live">a1</td>"#) && pair.contains("a2 (25 %)"), "{pair}");

    // Models: serving state, per-version numbers, canaries, history.
    let models = console.page("/models?tenant=acme&model=tiny", t).await;
    assert_inert(&models, "models");
    let live = newest.live.as_ref().unwrap().adapter_version.as_str();
    assert_eq!(text_after(&models, &format!(r#"<span id="live-version" data-version="{live}">"#)), live);
    let canary = newest.canary.as_ref().unwrap().adapter.adapter_version.as_str();
    assert_eq!(text_after(&models, r#"<span id="canary-version" data-version="a2">"#), canary);
    assert_eq!(text_after(&models, r#"<span id="registry-revision">"#), newest.revision.to_string());
    let mut per_version: BTreeMap<Option<String>, (Sums, BTreeSet<i64>)> = BTreeMap::new();
    for m in &minute {
        let slot = per_version.entry(m.adapter_version.clone()).or_default();
        slot.0.add(m);
        slot.1.insert(m.window_start);
    }
    assert_eq!(per_version.len(), 3);
    for (v, (s, starts)) in &per_version {
        let r = row(&models, &format!(r#"<tr data-version="{}">"#, v.as_deref().unwrap_or("")));
        assert!(r.contains(&format!(r#"<td class="windows">{}</td>"#, starts.len())), "{r}");
        assert!(
            r.contains(&format!(r#"<td class="shown">{}</td><td class="accepted">{}</td>"#, s.shown, s.accepted)),
            "{r}"
        );
        let rate = format!("{:.4}", s.accepted as f64 / s.shown as f64);
        assert!(r.contains(&format!(r#"<td class="accept-rate">{rate}</td>"#)), "{v:?}: {rate} in {r}");
        let mean = format!("{:.4}", s.reward_sum / s.shown as f64);
        assert!(r.contains(&format!(r#"<td class="mean-reward">{mean}</td>"#)), "{v:?}: {mean} in {r}");
    }
    // One point per (version, minute window) in each chart.
    let points: usize = per_version.values().map(|(_, starts)| starts.len()).sum();
    for chart in ["accept-rate-chart", "mean-reward-chart"] {
        let at = models.find(&format!(r#"<div id="{chart}">"#)).unwrap();
        assert!(models[at..].contains(&format!(r#"data-points="{points}""#)), "{chart}: {points} points");
    }
    // The promoted a1's canary, recomputed: minute windows from its start to
    // its promotion, a1 against the base.
    let h = &newest.history;
    let (started, promoted) = (h[0].at, h[1].at);
    let arm = |v: Option<&str>| {
        let mut s = Sums::default();
        minute
            .iter()
            .filter(|m| m.adapter_version.as_deref() == v && m.window_start >= started)
            .filter(|m| m.window_end + PUBLISH_DELAY <= promoted)
            .for_each(|m| s.add(m));
        s
    };
    let (tr, co) = (arm(Some("a1")), arm(None));
    let accept_p =
        msprt(&Moments::bernoulli(tr.accepted, tr.shown), &Moments::bernoulli(co.accepted, co.shown), 0.05).p_value;
    let reward_p = msprt(
        &Moments { n: tr.shown as f64, sum: tr.reward_sum, sum_sq: tr.reward_sum_sq },
        &Moments { n: co.shown as f64, sum: co.reward_sum, sum_sq: co.reward_sum_sq },
        0.1,
    )
    .p_value;
    let at = models.find(r#"<article class="canary" data-adapter="a1" data-state="promoted">"#).expect("a1's canary");
    let a1 = &models[at..at + models[at..].find("</article>").unwrap()];
    assert_eq!(text_after(a1, r#"<span class="canary-shown">"#), tr.shown.to_string());
    assert_eq!(text_after(a1, r#"<span class="control-shown">"#), co.shown.to_string());
    assert_eq!(text_after(a1, r#"<span class="accept-p">"#), p_text(accept_p));
    assert_eq!(text_after(a1, r#"<span class="reward-p">"#), p_text(reward_p));
    assert!(a1.contains(r#"accept-rate p = <span class="accept-p">0.0123</span>, mean-reward p = <span class="reward-p">0.0045</span>"#), "{a1}");
    assert!(a1.contains(r#"class="threshold""#) && a1.contains("α = 0.05"));
    assert!(models.contains(r#"data-adapter="a2" data-state="running""#));
    for (i, d) in h.iter().enumerate() {
        let r = row(&models, &format!(r#"<tr data-revision="{}""#, i + 1));
        assert!(r.contains(&format!(
            r#"<td class="action">{}</td>"#,
            match d.action {
                ReleaseAction::CanaryStarted => "canary started",
                ReleaseAction::Promoted => "promoted",
                _ => unreachable!(),
            }
        )));
        for (k, v) in &d.statistics {
            assert!(r.contains(&format!(r#"<span class="stat" data-key="{k}" data-value="{v}""#)), "{k} in {r}");
        }
    }
    assert!(models.contains("significantly better &lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;"));

    // Training: every check of the latest decision, requests, candidates.
    let training = console.page("/training?tenant=acme&model=tiny", t).await;
    assert_inert(&training, "training");
    let ds: Vec<TriggerDecision> = read_all(kafka, &name(Topic::TriggerDecisions)).into_iter().map(|r| r.2).collect();
    let latest = ds.iter().max_by_key(|d| d.evaluated_at).unwrap();
    assert!(training.contains(r#"<span id="trigger-fired" data-fired="false">not training because: reward_variance, distinct_users</span>"#), "{training}");
    for g in &latest.checks {
        let r = row(&training, &format!(r#"<tr data-check="{}""#, g.check));
        assert!(r.contains(&format!(r#"<td class="observed">{}</td>"#, g.observed)), "{r}");
        assert!(r.contains(&format!(r#"<td class="threshold">{}</td>"#, g.threshold)), "{r}");
        assert!(r.contains(if g.passed { "✓ passed" } else { "✗ failed" }));
    }
    assert!(training.contains("users 7 &lt; 20 &lt;img src=x onerror=&quot;document.title=&#39;pwned&#39;&quot;&gt;"));
    let requests: Vec<TrainRequest> = read_all(kafka, &name(Topic::TrainRequests)).into_iter().map(|r| r.2).collect();
    for r in &requests {
        let tr = row(&training, &format!(r#"<tr data-request="{}">"#, r.request_id));
        let rows: i64 = r.shards.iter().map(|s| s.rows).sum();
        assert!(
            tr.contains(&format!(r#"<td class="shards">{}</td><td class="rows">{rows}</td>"#, r.shards.len())),
            "{tr}"
        );
    }
    let cands: Vec<ModelCandidate> = read_all(kafka, &name(Topic::ModelCandidates)).into_iter().map(|r| r.2).collect();
    for c in &cands {
        let cr = row(&training, &format!(r#"<tr data-adapter="{}">"#, c.adapter_version));
        for (k, v) in &c.candidate_metrics {
            let parent = c.parent_metrics[k];
            assert!(cr.contains(&format!(r#"<span class="metric" data-key="{k}">{k}: <span class="candidate-value">{v:.4}</span> vs <span class="parent-value">{parent:.4}</span></span>"#)), "{k} in {cr}");
        }
        assert!(cr.contains(&format!(r#"<td class="examples">{} / {}</td>"#, c.train_examples, c.holdout_examples)));
    }
    assert!(row(&training, r#"<tr data-adapter="a1">"#).contains(r#"<td class="release">promoted</td>"#));
    assert!(row(&training, r#"<tr data-adapter="a2">"#).contains(r#"<td class="release">canary started</td>"#));
    assert!(training.contains("trainer progress: not configured (--trainer-metrics-url)"), "{training}");

    // Lineage, one click from the history: request → shards → offsets.
    assert!(models.contains(r#"href="/lineage?tenant=acme&amp;model=tiny&amp;adapter=a1""#));
    let lineage = console.page("/lineage?tenant=acme&model=tiny&adapter=a1", t).await;
    assert_inert(&lineage, "lineage");
    assert_eq!(text_after(&lineage, r#"<dd id="request-id">"#), "req-a1");
    let manifests: Vec<ShardManifest> = read_all(kafka, &name(Topic::Shards)).into_iter().map(|r| r.2).collect();
    let req_a1 = requests.iter().find(|r| r.request_id == "req-a1").unwrap();
    for s in &req_a1.shards {
        let m = manifests.iter().find(|m| m.shard_id == s.shard_id).unwrap();
        let r = row(&lineage, &format!(r#"<tr data-shard="{}">"#, s.shard_id));
        assert!(r.contains(&format!(r#"<td class="source">{} / {}</td>"#, m.source.topic, m.source.partition)), "{r}");
        assert!(
            r.contains(&format!(
                r#"<td class="first-offset">{}</td><td class="last-offset">{}</td>"#,
                m.source.first_offset, m.source.last_offset
            )),
            "{r}"
        );
    }
    assert_eq!(
        text_after(&lineage, r#"<td id="lineage-rows">"#),
        req_a1.shards.iter().map(|s| s.rows).sum::<i64>().to_string()
    );

    // Pipeline: rows per hour and tenant, dead letters, offsets and lag.
    let pipeline = console
        .wait_for("/pipeline", t, 30, |p| p.contains(&format!(r#"<tr data-group="{group}" data-partition="0">"#)))
        .await;
    assert_inert(&pipeline, "pipeline");
    let mut per_hour: BTreeMap<(i64, String), i64> = BTreeMap::new();
    for m in &manifests {
        *per_hour.entry((m.committed_at.div_euclid(3_600_000) * 3_600_000, m.tenant.clone())).or_default() += m.rows;
    }
    assert_eq!(per_hour.len(), 3, "{per_hour:?}");
    for ((hour, tenant), rows) in &per_hour {
        let r = row(&pipeline, &format!(r#"<tr data-hour="{hour}" data-tenant="{tenant}">"#));
        assert!(r.contains(&format!(r#"<td class="rows">{rows}</td>"#)), "{r}");
    }
    let at = pipeline.find(r#"<section id="rows-per-hour">"#).unwrap();
    assert!(pipeline[at..].contains(&format!(r#"data-points="{}""#, 2 * 2)), "2 hours × 2 tenants");
    assert_eq!(text_after(&pipeline, r#"<p id="shard-total">"#), manifests.len().to_string());
    assert_eq!(
        text_after(&pipeline, r#"<span id="rows-total">"#),
        manifests.iter().map(|m| m.rows).sum::<i64>().to_string()
    );
    let letters: Vec<DeadLetter> = read_all(kafka, &name(Topic::DeadLetters)).into_iter().map(|r| r.2).collect();
    let mut per_reason: BTreeMap<(String, String), usize> = BTreeMap::new();
    letters.iter().for_each(|d| *per_reason.entry((d.service.clone(), d.reason_code.clone())).or_default() += 1);
    for ((service, code), n) in &per_reason {
        let r = row(&pipeline, &format!(r#"<tr data-service="{service}" data-reason="{code}">"#));
        assert!(r.contains(&format!(r#"<td class="count">{n}</td>"#)), "{r}");
    }
    assert_eq!(text_after(&pipeline, r#"<p id="dead-letter-total">"#), letters.len().to_string());
    // The completion of the dead-lettered interaction, and the reason, as text.
    assert!(
        pipeline.contains("fn main() {} &lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;"),
        "{pipeline}"
    );
    assert!(pipeline.contains("bad reward &lt;script&gt;"));
    let lag = row(&pipeline, &format!(r#"<tr data-group="{group}" data-partition="0">"#));
    assert!(lag.contains(r#"<td class="end">10</td><td class="committed">4</td><td class="lag">6</td>"#), "{lag}");
    assert!(pipeline.contains(&format!("10 in <code>{interactions}</code>")));

    // Following: a promotion and a dead letter written now appear without a restart.
    let p: FutureProducer = test.kafka.client_config(&ClientRole::Producer).unwrap().create().unwrap();
    send(&p, &test.topics, Topic::ModelRegistry, "acme/tiny", &registry()[3]).await;
    send(&p, &test.topics, Topic::DeadLetters, "k", &dead_letters()[0]).await;
    let models = console
        .wait_for("/models?tenant=acme&model=tiny", t, 30, |p| {
            p.contains(r#"<span id="live-version" data-version="a2">"#)
        })
        .await;
    assert!(models.contains(r#"<span id="canary-version" data-version="">none</span>"#));
    assert!(models.contains(r#"data-adapter="a2" data-state="promoted""#));
    console
        .wait_for("/pipeline", t, 30, |p| {
            p.contains(&format!(r#"<p id="dead-letter-total">{}</p>"#, letters.len() + 1))
        })
        .await;
    // The token in the URL sets a cookie and leads to the page without it.
    let r = console.get_as(&format!("/pipeline?token={TOKEN}"), None).await.unwrap();
    assert_eq!((r.status, r.headers["location"].to_str().unwrap()), (303, "/pipeline"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_keeps_serving_through_a_broker_restart() {
    // A broker of its own, so stopping it disturbs no other test.
    let addr = free_local_addr().unwrap();
    let dir = workspace_root().join("target").join("test-broker").join(format!("{}-console", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let binary = tansu_binary();
    let mut broker = LocalBroker::start(&binary, addr, &dir, Duration::from_secs(60)).expect("dedicated broker");
    let kafka = KafkaArgs::local(broker.bootstrap());
    let topics = TopicsConfig::default();
    create_topics(&kafka, &topics.specs(), Duration::from_secs(30)).await.unwrap();
    let entries = registry();
    {
        let p: FutureProducer = kafka.client_config(&ClientRole::Producer).unwrap().create().unwrap();
        send(&p, &topics, Topic::ModelRegistry, "acme/tiny", &entries[1]).await;
    }
    let args: Vec<String> =
        ["flywheel-console", "--kafka-brokers", &kafka.brokers, "--ops-listen", "127.0.0.1:0", "--log-filter", "error"]
            .map(String::from)
            .to_vec();
    let mut console = Console::start(args, &["--drain-timeout-secs", "10"]);
    let models = "/models?tenant=acme&model=tiny";
    console.wait_for(models, None, 60, |p| p.contains(r#"<span id="live-version" data-version="a1">"#)).await;

    broker.stop();
    // The last view stays, and the pages say the broker is gone.
    let page = console.wait_for("/pipeline", None, 30, |p| p.contains(r#"id="broker-error""#)).await;
    assert!(page.contains("broker unreachable since"), "{page}");
    let page = console.page(models, None).await;
    assert!(page.contains(r#"<span id="live-version" data-version="a1">"#) && page.contains(r#"id="broker-error""#));

    broker = LocalBroker::start(&binary, addr, &dir, Duration::from_secs(60)).expect("broker restart");
    {
        // A fresh producer: an idempotent session across a tansu restart wedges it (ARCHITECTURE.md).
        let p: FutureProducer = kafka.client_config(&ClientRole::Producer).unwrap().create().unwrap();
        send(&p, &topics, Topic::ModelRegistry, "acme/tiny", &entries[3]).await;
    }
    let page = console
        .wait_for(models, None, 90, |p| {
            p.contains(r#"<span id="live-version" data-version="a2">"#) && !p.contains("broker-error")
        })
        .await;
    assert!(page.contains(r#"<span id="registry-revision">4</span>"#));
    let status = console.terminate(20);
    assert!(status.success(), "exit after SIGTERM: {status}");
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

// ------------------------------------------------------ trainer progress

/// The trainer's real ops server (`/metrics` of the trainer's own registry,
/// set through the trainer's own metrics type), without Kafka or a model:
/// the console sees exactly what a running trainer serves.
struct TrainerOps {
    metrics: flywheel_trainer::service::Metrics,
    addr: SocketAddr,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<flywheel_core::Result<()>>,
}

impl TrainerOps {
    async fn start() -> TrainerOps {
        let mut registry = Default::default();
        let (metrics, _) = flywheel_trainer::service::Metrics::register(&mut registry);
        let stop = tokio_util::sync::CancellationToken::new();
        let listener = flywheel_core::runtime::OpsServer::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let ops = flywheel_core::runtime::OpsServer::serve(
            listener,
            flywheel_core::runtime::Readiness::default(),
            registry,
            None,
            stop.clone(),
        )
        .expect("the trainer's ops server");
        TrainerOps { metrics, addr: ops.local_addr, stop, task: ops.task }
    }

    fn url(&self) -> String {
        format!("http://{}/metrics", self.addr)
    }

    /// A job mid-way: `step` of 40 steps, 2000 tokens and 1.25 s per step.
    fn at_step(&self, step: u64) {
        self.metrics.set_busy(true);
        self.metrics.progress(&flywheel_trainer::job::Progress {
            step,
            steps: 40,
            loss: 0.8125,
            tokens: 2000 * step as i64,
            elapsed: Duration::from_millis(1250 * step),
        });
    }

    /// Closes the port (what the console sees of a trainer that is down).
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task).await.expect("ops server stops").unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_training_page_shows_the_running_jobs_progress_from_the_trainers_metrics() {
    let (test, records) = prepared("console-trainer").await;
    let trainer = TrainerOps::start().await;
    trainer.at_step(12);
    // What the console reads is what the trainer serves.
    let scrape = flywheel_cli::http::http(trainer.addr, "GET", "/metrics", &[], Vec::new()).await;
    let text = String::from_utf8(scrape.body).unwrap();
    assert!(text.contains("# TYPE trainer_job_step gauge\ntrainer_job_step 12\n"), "{text}");
    let console =
        Console::start(service_args("flywheel-console", &test, &[]), &["--trainer-metrics-url", &trainer.url()]);
    console.wait_caught_up(None, records).await;
    let path = "/training?tenant=acme&model=tiny";
    let page = console.wait_for(path, None, 30, |p| p.contains(r#"<span class="job-step">12</span>"#)).await;
    assert_inert(&page, "training");
    assert!(page.contains(r#"data-live="records trainer""#), "{page}");
    assert!(page.contains(r#"<span class="trainer-state" data-busy="true">busy: a job is running</span>"#), "{page}");
    assert!(page.contains(r#"<progress class="job-progress" max="40" value="12">30 %</progress>"#), "{page}");
    assert!(page.contains(r#"<span class="job-steps">40</span>"#));
    assert!(page.contains(r#"<span class="job-loss">0.8125</span>"#));
    // 2000 tokens per 1.25 s; 28 steps left at 1.25 s.
    assert!(page.contains(r#"<span class="job-tokens-per-second">1600.0</span> tokens/s"#), "{page}");
    assert!(page.contains(r#"<span class="job-eta">35 s</span>"#), "{page}");
    assert!(!page.contains("not configured"));

    // The job moves on: the page follows, and tells an open page to reload.
    let before: serde_json::Value = serde_json::from_str(&console.page("/api/version", None).await).unwrap();
    trainer.at_step(13);
    console.wait_for(path, None, 30, |p| p.contains(r#"<span class="job-step">13</span>"#)).await;
    let after: serde_json::Value = serde_json::from_str(&console.page("/api/version", None).await).unwrap();
    assert!(after["trainer"].as_u64() > before["trainer"].as_u64(), "{before} -> {after}");

    // The trainer goes away: the console says so and keeps serving.
    trainer.stop().await;
    let page = console.wait_for(path, None, 30, |p| p.contains("trainer metrics unreachable: ")).await;
    assert!(page.contains("connecting to 127.0.0.1"), "{page}");
    assert!(!page.contains(r#"class="job-step""#));
    assert!(page.contains(r#"<span id="trigger-fired""#), "the rest of the page is unchanged");
    assert_eq!(console.get_as("/pipeline", None).await.map(|r| r.status), Some(200));
}

// ---------------------------------------------------------------- browser

const CHROMIUM: &str = "/usr/bin/chromium";

/// Runs headless Chromium with a fresh profile; returns (stdout, stderr).
/// Killed (and the test failed) after 90 s.
fn chromium(args: &[String]) -> (String, String) {
    assert!(
        Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} is missing: the console's browser test needs Debian's chromium; run `make setup` (or `make browser`)"
    );
    let profile = tempfile::tempdir().unwrap();
    let out = tempfile::NamedTempFile::new().unwrap();
    let err = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(CHROMIUM)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--enable-logging=stderr", "--v=0"])
        .args(args)
        .stdout(out.reopen().unwrap())
        .stderr(err.reopen().unwrap())
        .spawn()
        .expect("starting chromium");
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium {args:?} did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (stdout, stderr) = (
        std::fs::read_to_string(out.path()).unwrap_or_default(),
        std::fs::read_to_string(err.path()).unwrap_or_default(),
    );
    assert!(status.success(), "chromium {args:?}: {status}\n{stderr}");
    (stdout, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_works_in_a_real_browser() {
    assert!(
        Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} is missing: the console's browser test needs Debian's chromium; run `make setup` (or `make browser`)"
    );
    let (test, records) = prepared("console-browser").await;
    let trainer = TrainerOps::start().await;
    trainer.at_step(12);
    let console = Console::start(
        service_args("flywheel-console", &test, &[]),
        &["--token", TOKEN, "--trainer-metrics-url", &trainer.url()],
    );
    console.wait_caught_up(Some(TOKEN), records).await;
    console.wait_for("/training?tenant=acme&model=tiny", Some(TOKEN), 30, |p| p.contains(r#"class="job-step""#)).await;
    let entries: Vec<RegistryEntry> =
        read_all(&test.kafka, &test.topics.name(Topic::ModelRegistry)).into_iter().map(|r| r.2).collect();
    let live = entries.iter().max_by_key(|e| e.revision).unwrap().live.as_ref().unwrap().adapter_version.clone();

    let shots = workspace_root().join("target").join("console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let pages = [
        ("overview", "/"),
        ("models", "/models?tenant=acme&model=tiny"),
        ("training", "/training?tenant=acme&model=tiny"),
        ("lineage", "/lineage?tenant=acme&model=tiny&adapter=a1"),
        ("pipeline", "/pipeline"),
    ];
    for (name, path) in pages {
        // The way a person opens the printed URL: the token once in the
        // query string (a cookie from then on).
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = console.url(&format!("{path}{sep}token={TOKEN}"));
        let (dom, log) = chromium(&["--dump-dom".into(), url.clone()]);
        std::fs::write(shots.join(format!("{name}.html")), &dom).unwrap();
        let console_lines: Vec<&str> = log.lines().filter(|l| l.contains(":CONSOLE")).collect();
        assert!(console_lines.is_empty(), "{name}: the browser console logged:\n{}", console_lines.join("\n"));
        assert!(dom.contains("<title>") && !dom.contains("pwned</title>"), "{name}: an injected script ran:\n{dom}");
        assert!(dom.contains(r#"<a class="brand" href="/">Flywheel console</a>"#), "{name}: not the page:\n{dom}");
        assert_eq!(dom.matches("<script").count(), 1, "{name}: a record's script became an element:\n{dom}");
        assert!(!dom.contains("<img"), "{name}: a record's img became an element");
        match name {
            "models" => {
                let shown = text_after(&dom, &format!(r#"<span id="live-version" data-version="{live}">"#));
                assert_eq!(shown, live, "the live version shown is the registry's");
                let charts: Vec<usize> = dom
                    .split(r#"<svg class="chart" data-points=""#)
                    .skip(1)
                    .map(|s| s[..s.find('"').unwrap()].parse().unwrap())
                    .collect();
                assert!(charts.len() >= 4 && charts.iter().all(|n| *n > 0), "charts with data points: {charts:?}");
                assert!(dom.matches(r#"<circle class="pt""#).count() >= charts.iter().sum::<usize>());
                assert!(
                    dom.contains("significantly better &lt;script&gt;document.title='pwned'&lt;/script&gt;"),
                    "{dom}"
                );
            }
            "training" => {
                assert!(dom.contains("&lt;img src=x onerror=\"document.title='pwned'\"&gt;"), "{dom}");
                assert!(dom.contains(r#"<progress class="job-progress" max="40" value="12">"#), "{dom}");
                assert!(dom.contains(r#"<span class="job-step">12</span> / <span class="job-steps">40</span>"#));
            }
            "pipeline" => {
                assert!(dom.contains("fn main() {} &lt;script&gt;document.title='pwned'&lt;/script&gt;"), "{dom}");
                assert!(!dom.contains(r#"data-points="0""#), "the rows chart has points");
            }
            _ => {}
        }
        let png = shots.join(format!("{name}.png"));
        let _ = std::fs::remove_file(&png);
        chromium(&[format!("--screenshot={}", png.display()), "--window-size=1280,900".into(), url]);
        let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
        assert!(size > 10_000, "{name}: screenshot {} has {size} bytes", png.display());
    }
}
