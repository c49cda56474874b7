//! Test harness: one real broker (tansu with SQLite storage) per test binary,
//! started on a free port on first use, with unique topics per test.
//!
//! A missing broker binary fails the test with a message naming `make setup`;
//! nothing is ever skipped silently.

pub mod metrics_oracle;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use flywheel_core::codec::decode;
use flywheel_core::kafka::{ClientRole, KafkaArgs, create_topics};
use flywheel_core::topics::{CleanupPolicy, Topic, TopicSpec};
use flywheel_devkit::{LocalBroker, free_local_addr, tansu_binary};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

pub use flywheel_devkit::{S3Server, lake_runtime, workspace_root};

/// The shared broker of this test binary.
#[derive(Debug)]
pub struct TestBroker {
    /// `bootstrap.servers` value.
    pub bootstrap: String,
    // Never dropped (it lives in a static): the broker's watchdog stops it
    // when the test process exits.
    _broker: LocalBroker,
}

static BROKER: OnceLock<TestBroker> = OnceLock::new();

/// Starts the broker on first call; every later call returns the same one.
/// Panics (failing the test) when tansu is not installed or does not start.
pub fn broker() -> &'static TestBroker {
    BROKER.get_or_init(|| {
        let binary = tansu_binary();
        let addr = free_local_addr().expect("finding a free port");
        let runs = workspace_root().join("target").join("test-broker");
        remove_dirs_of_dead_runs(&runs);
        let data_dir = runs.join(std::process::id().to_string());
        let _ = std::fs::remove_dir_all(&data_dir);
        match LocalBroker::start(&binary, addr, &data_dir, Duration::from_secs(60)) {
            Ok(b) => TestBroker { bootstrap: b.bootstrap(), _broker: b },
            Err(e) => panic!("the integration tests need a real broker and could not start one: {e}"),
        }
    })
}

/// Broker data (`<pid>` or `<pid>-<label>`) of earlier test processes that have exited (their brokers
/// stopped with them) is of no further use.
pub fn remove_dirs_of_dead_runs(runs: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(runs) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name.split('-').next().unwrap_or_default();
        if pid.parse::<u32>().is_ok() && !std::path::Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A service binary built next to the running test executable
/// (`make test` builds every binary before testing).
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let bin = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps").join(name);
    assert!(
        bin.is_file(),
        "{} missing: build it first (`cargo build --workspace --bins`, as `make test` does)",
        bin.display()
    );
    bin
}

/// Kafka settings for tests: the shared broker, 6 s session timeout so group
/// joins are quick.
pub fn kafka_args() -> KafkaArgs {
    KafkaArgs::local(broker().bootstrap.clone())
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A topic name no other test (or earlier run on the same broker) uses.
pub fn unique_topic(label: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("t-{label}-{}-{n}-{nanos}", std::process::id())
}

/// A test's own topic map: a unique prefix, the wanted topics created on the
/// shared broker, and the topics file services are started with.
#[derive(Debug)]
pub struct TestTopics {
    /// Kafka settings of the shared broker.
    pub kafka: KafkaArgs,
    /// The map (prefix and overrides).
    pub topics: flywheel_core::topics::TopicsConfig,
    /// `topics.toml` for `--topics-config`.
    pub file: PathBuf,
    /// A fresh directory of this test (holds the file).
    pub dir: TestDir,
}

/// A test's directory: removed when it is dropped after the test passed,
/// kept (and named on stderr) when the test fails. Hold it as long as
/// services read files in it.
#[derive(Debug)]
pub struct TestDir(PathBuf);

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept the failed test's directory for inspection: {}", self.0.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("could not remove the test directory {}: {e}", self.0.display());
        }
    }
}

/// Creates `wanted` under a unique prefix, with `partitions` overriding one
/// topic's partition count.
pub async fn test_topics(label: &str, wanted: &[Topic], partitions: Option<(Topic, i32)>) -> TestTopics {
    test_topics_on(kafka_args(), label, wanted, partitions).await
}

/// [`test_topics`] on the broker of `kafka` (e.g. a [`DedicatedBroker`]).
pub async fn test_topics_on(
    kafka: KafkaArgs,
    label: &str,
    wanted: &[Topic],
    partitions: Option<(Topic, i32)>,
) -> TestTopics {
    let prefix = format!("{}.", unique_topic(label));
    let mut text = format!("prefix = \"{prefix}\"\n");
    let mut topics = flywheel_core::topics::TopicsConfig { prefix, ..Default::default() };
    if let Some((topic, n)) = partitions {
        let name = topic.default_name();
        text.push_str(&format!("[topics.{name}]\npartitions = {n}\n"));
        let o = flywheel_core::topics::TopicOverride { partitions: Some(n), ..Default::default() };
        topics.topics.insert(name.into(), o);
    }
    let specs: Vec<TopicSpec> = wanted.iter().map(|t| topics.spec(*t)).collect();
    create_topics(&kafka, &specs, Duration::from_secs(30)).await.expect("creating test topics");
    let dir = std::env::temp_dir().join(unique_topic(label));
    std::fs::create_dir_all(&dir).expect("creating the test directory");
    let file = dir.join("topics.toml");
    std::fs::write(&file, text).expect("writing topics.toml");
    TestTopics { kafka, topics, file, dir: TestDir(dir) }
}

/// Creates a fresh topic with `partitions` partitions and returns its name.
pub async fn create_unique_topic(label: &str, partitions: i32) -> String {
    let name = unique_topic(label);
    let spec = TopicSpec {
        topic: Topic::Interactions,
        name: name.clone(),
        partitions,
        replication_factor: 1,
        cleanup_policy: CleanupPolicy::Delete,
        retention_ms: None,
    };
    let created = create_topics(&kafka_args(), &[spec], Duration::from_secs(30)).await.expect("creating test topic");
    assert_eq!(created, vec![name.clone()], "topic {name} should be new");
    name
}

/// Every record of a topic, per partition in offset order (fails the test if
/// the topic cannot be read to its end within 60 s).
pub fn read_all<T: flywheel_core::AvroRecord>(kafka: &KafkaArgs, topic: &str) -> Vec<(i32, i64, T)> {
    read_all_within(kafka, topic, Duration::from_secs(60))
}

/// [`read_all`] with another time limit, for big topics.
pub fn read_all_within<T: flywheel_core::AvroRecord>(
    kafka: &KafkaArgs,
    topic: &str,
    limit: Duration,
) -> Vec<(i32, i64, T)> {
    let mut config = kafka.client_config(&ClientRole::Admin).unwrap();
    config.set("group.id", "flywheel-test-reader");
    let c: BaseConsumer = config.create().unwrap();
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut remaining = HashMap::new();
    for part in md.topics()[0].partitions() {
        let (_, high) = c.fetch_watermarks(topic, part.id(), Duration::from_secs(10)).unwrap();
        if high > 0 {
            tpl.add_partition_offset(topic, part.id(), Offset::Beginning).unwrap();
            remaining.insert(part.id(), high);
        }
    }
    if remaining.is_empty() {
        return Vec::new();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + limit;
    while !remaining.is_empty() {
        assert!(Instant::now() < deadline, "{topic} not read to its end in {limit:?}: partitions {remaining:?} left");
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            if remaining.get(&m.partition()).is_some_and(|high| m.offset() + 1 >= *high) {
                remaining.remove(&m.partition());
            }
            // Undecodable records (the malformed-record cases) are the
            // services' to dead-letter; readers here skip them.
            if let Some(Ok(record)) = m.payload().map(decode::<T>) {
                out.push((m.partition(), m.offset(), record));
            }
        }
    }
    out.sort_by_key(|(p, o, _)| (*p, *o));
    out
}

/// Commits encoded reward records as offsets `first..` of `rewards`
/// partition 0 through the lake writer's own path (`prepare`, then
/// `commit_partition`); returns the rejected records.
pub fn commit_records(
    lake: &mut flywheel_lake::table::Lake,
    settings: &flywheel_lake::parquet::ParquetSettings,
    records: &[Vec<u8>],
    first: i64,
    schemas: &flywheel_lake::parquet::RewardSchemas,
) -> Vec<flywheel_lake::table::Rejected> {
    use flywheel_lake::shard::{RecentIds, RowBuffer, ShardContext, prepare};
    use flywheel_lake::table::PartitionCommit;
    let mut buf = RowBuffer::default();
    for (i, bytes) in records.iter().enumerate() {
        buf.push(Some(b"key"), Some(bytes), first + i as i64, 0);
    }
    let url = lake.storage().url();
    let ctx = ShardContext { topic: "rewards", partition: 0, lake_url: &url, settings, schemas };
    let prepared = prepare(&ctx, &buf, &RecentIds::new(1000)).unwrap();
    let files = prepared.files.into_iter().map(|f| f.file).collect();
    let previous = lake.committed_offset("rewards", 0).unwrap();
    let range = buf.range().unwrap();
    let rejected = prepared.rejected;
    let c = PartitionCommit { topic: "rewards", partition: 0, previous, range, files, rejected, committed_at: 1 };
    lake.commit_partition(c).unwrap().rejected
}

/// Opens (creating if needed) the lake in directory `root` and runs `f` on
/// it on a plain thread, so async tests can call it too.
pub fn with_lake<T: Send>(root: &Path, f: impl FnOnce(&mut flywheel_lake::table::Lake) -> T + Send) -> T {
    with_lake_at(&root.display().to_string(), &[], f)
}

/// [`with_lake`] for any lake root (`s3://...` too), with object-store
/// options (an [`S3Server::env`]).
pub fn with_lake_at<T: Send>(
    root: &str,
    options: &[(String, String)],
    f: impl FnOnce(&mut flywheel_lake::table::Lake) -> T + Send,
) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let storage =
                flywheel_lake::store::open_storage_with(root, options, lake_runtime()).expect("opening the storage");
            let schema =
                flywheel_lake::parquet::RewardSchemas::released().and_then(|s| s.file_schema()).expect("schema");
            let mut lake =
                flywheel_lake::table::Lake::create_or_open(storage, lake_runtime(), &schema).expect("opening the lake");
            f(&mut lake)
        })
        .join()
        .expect("lake call panicked")
    })
}

/// Runs `sql` with `engine` (`duckdb`: DuckDB's `delta_scan`; `deltalake`:
/// the Python `deltalake` package, aggregated by DuckDB over its Arrow
/// data) on the Delta table at `table` (a directory or `s3://` URL; the
/// token `TABLE` in `sql` names it). `env` adds variables (S3 credentials).
pub fn delta_query(engine: &str, table: &str, sql: &str, env: &[(String, String)]) -> Vec<Vec<serde_json::Value>> {
    let root = workspace_root();
    let python = root.join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run `make setup`", python.display());
    let script = root.join("tests/readers/lake_read.py");
    let out = std::process::Command::new(python)
        .arg(&script)
        .args([engine, table, sql])
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .expect("running the reader");
    assert!(out.status.success(), "{engine} failed on {table}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("reader output is JSON")
}

pub use flywheel_cli::http::{HttpResponse, http};

/// Example records under a fixtures folder for one kind (`<kind>.*.json`), sorted by name.
pub fn fixtures_of(dir: &Path, kind: flywheel_core::RecordKind) -> std::io::Result<Vec<PathBuf>> {
    let prefix = format!("{}.", kind.file_stem());
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".json"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// A fixture interaction in the form a product posts it to the collector:
/// the product's own user id, no tenant or received time (the collector sets
/// them), and the given event time and id.
pub fn product_form(fixture: &serde_json::Value, user_id: &str, event_time: i64, event_id: &str) -> serde_json::Value {
    let mut event = fixture.clone();
    if let Some(obj) = event.as_object_mut() {
        obj.remove("received_time");
        obj.remove("tenant");
        obj.insert("user_id".into(), user_id.into());
        obj.insert("event_time".into(), event_time.into());
        obj.insert("event_id".into(), event_id.into());
    }
    event
}

/// Polls `f` every 500 ms until it returns `Some`; panics after `secs`.
pub fn wait_until<T>(secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "condition not met in {secs} s");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Command line of a service under test: its name, the shared broker, the
/// test's topic map, an ephemeral ops port, quiet logs, then `extra`.
pub fn service_args(name: &str, topics: &TestTopics, extra: &[&str]) -> Vec<String> {
    let file = topics.file.display().to_string();
    [name, "--kafka-brokers", &topics.kafka.brokers, "--topics-config", &file, "--ops-listen", "127.0.0.1:0"]
        .into_iter()
        .chain(["--log-filter", "warn"])
        .chain(extra.iter().copied())
        .map(String::from)
        .collect()
}

/// `flywheel up` as a process on the shared broker and the test's topics
/// (`--external-broker`), working in `work`, with the closed-loop tests'
/// product settings (30 requests/s, seed 11) and then `extra`.
pub fn flywheel_up(topics: &TestTopics, work: &Path, extra: &[&str]) -> std::process::Child {
    let collector = free_local_addr().expect("a free port").to_string();
    let console = free_local_addr().expect("a free port").to_string();
    std::process::Command::new(workspace_binary("flywheel"))
        .args(["--kafka-brokers", &topics.kafka.brokers, "--topics-config", &topics.file.display().to_string()])
        .args(["up", "--external-broker"])
        .args(["--work-dir", &work.display().to_string(), "--collector-listen", &collector])
        .args(["--console-listen", &console])
        .args(["--rate", "30", "--seed", "11", "--summary-every-s", "30"])
        .args(extra)
        .spawn()
        .expect("starting flywheel up")
}

/// Runs `sql` with DuckDB from `.venv` (an independent reader of the lake),
/// with `ROOT` in the query replaced by `root`; rows as JSON values
/// (numbers stay numbers, everything else becomes a string).
pub fn duckdb(root: &Path, sql: &str) -> Vec<Vec<serde_json::Value>> {
    let python = workspace_root().join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run `make setup`", python.display());
    let script = r#"
import duckdb, json, sys
rows = duckdb.connect().execute(sys.argv[2].replace('ROOT', sys.argv[1])).fetchall()
print(json.dumps([[v if isinstance(v, (int, float)) or v is None else str(v) for v in r] for r in rows]))
"#;
    let out =
        std::process::Command::new(python).args(["-c", script, &root.display().to_string(), sql]).output().unwrap();
    assert!(out.status.success(), "duckdb failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// SIGTERM to `child`, then its exit status; panics if it still runs after
/// `secs` (a service's drain timeout: it must be gone by then).
pub fn terminate_within(child: &mut std::process::Child, secs: u64) -> std::process::ExitStatus {
    signal(child.id(), "TERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().expect("reaping") {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "pid {} still runs {secs} s after SIGTERM", child.id());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `signal` (`STOP`, `TERM`, `KILL`, ...) to process `pid`.
pub fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status();
    assert!(status.is_ok(), "kill -{signal} {pid}: {status:?}");
}

/// The value of an unlabelled sample `name` in a Prometheus text exposition.
pub fn metric(exposed: &str, name: &str) -> Option<f64> {
    exposed.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Polls `addr`'s `/metrics` until `done` holds for the exposition and
/// returns it; panics naming `what` after `secs`.
pub async fn metrics_when(addr: std::net::SocketAddr, secs: u64, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (_, exposed) = ops_get(addr, "/metrics").await;
        if done(&exposed) {
            return exposed;
        }
        assert!(Instant::now() < deadline, "{what}: not seen in {secs} s:\n{exposed}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET path` on a service's ops endpoint: (status, body); status 0 when it does not answer.
pub async fn ops_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    match tokio::time::timeout(Duration::from_secs(5), flywheel_cli::http::request(addr, "GET", path, &[], Vec::new()))
        .await
    {
        Ok(Ok(r)) => (r.status, String::from_utf8_lossy(&r.body).into_owned()),
        _ => (0, String::new()),
    }
}

/// A child process that is killed (SIGKILL) and reaped when dropped, so a
/// test that fails half-way leaves no service running behind it.
#[derive(Debug)]
pub struct Reaped(pub std::process::Child);

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A broker of one test's own, which the test may stop and start again (the
/// shared [`broker`] must stay up for every test of its binary). Its data
/// survives a restart; it stops when dropped (or when the test process dies).
#[derive(Debug)]
pub struct DedicatedBroker {
    /// Listener, the same across restarts.
    pub addr: std::net::SocketAddr,
    /// SQLite data and the broker's log.
    pub dir: PathBuf,
    binary: PathBuf,
    running: Option<LocalBroker>,
}

impl DedicatedBroker {
    /// Starts a broker on a free port with data under `target/test-broker/<pid>-<label>`.
    pub fn start(label: &str) -> DedicatedBroker {
        let binary = tansu_binary();
        let runs = workspace_root().join("target").join("test-broker");
        remove_dirs_of_dead_runs(&runs);
        let dir = runs.join(format!("{}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let addr = free_local_addr().expect("a free port");
        let mut b = DedicatedBroker { addr, dir, binary, running: None };
        b.restart_now();
        b
    }

    /// Kafka settings pointing at it (6 s session timeout, as [`kafka_args`]).
    pub fn kafka(&self) -> KafkaArgs {
        KafkaArgs::local(self.addr.to_string())
    }

    /// Stops it (SIGTERM, then SIGKILL after 10 s).
    pub fn stop(&mut self) {
        if let Some(mut b) = self.running.take() {
            b.stop();
        }
    }

    /// Freezes it (see [`LocalBroker::pause`]).
    pub fn pause(&self) {
        self.running.as_ref().expect("the dedicated broker runs").pause();
    }

    /// Lets it run again after [`DedicatedBroker::pause`].
    pub fn resume(&self) {
        self.running.as_ref().expect("the dedicated broker runs").resume();
    }

    /// Starts it again on the same address and data (panics if it does not come up in 60 s).
    pub fn restart_now(&mut self) {
        self.stop();
        let started = LocalBroker::start(&self.binary, self.addr, &self.dir, Duration::from_secs(60));
        self.running = Some(started.unwrap_or_else(|e| panic!("the dedicated broker did not start: {e}")));
    }
}

impl Drop for DedicatedBroker {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("the broker's data and log are kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
