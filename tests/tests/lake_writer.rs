//! The lake writer against the real broker, killed with SIGKILL at random
//! points over many rounds and restarted at once, while rewards keep
//! arriving (with upstream replays, hostile tenants and malformed records).
//! Afterwards DuckDB's `delta_scan` and Python `deltalake` must both see
//! exactly one row per distinct valid reward, and so must they between every
//! two commits of a compaction, in the newest snapshot and the one before;
//! every rejected record must be on the
//! dead-letter topic once; every committed file must be announced on
//! `shards` once, with statistics that match the file. And a second writer
//! in the group says it holds nothing, stays out of the way while the owner
//! works, and takes over when the owner is killed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use flywheel_core::codec::encode;
use flywheel_core::kafka::{ClientRole, KafkaArgs};
use flywheel_core::records::{DeadLetter, Outcome, Reward, ShardManifest};
use flywheel_core::topics::{Topic, TopicsConfig};
use flywheel_lake::compact::{CompactOptions, compact};
use flywheel_lake::store::{Storage, open_storage_with};
use flywheel_tests::{
    Reaped, S3Server, TestDir, TestTopics, delta_query, duckdb, lake_runtime, metric, metrics_when, ops_get, read_all,
    test_topics, unique_topic, with_lake_at, workspace_binary, workspace_root,
};
use rdkafka::producer::{FutureProducer, FutureRecord};

const PARTITIONS: i32 = 3;
const T0: i64 = 1_795_424_400_000;

struct Setup {
    kafka: KafkaArgs,
    topics: TopicsConfig,
    topics_file: PathBuf,
    /// The lake root: a directory, or `s3://` on `s3`.
    lake: String,
    /// Object-store settings of the writers and readers (S3 credentials).
    env: Vec<(String, String)>,
    group: String,
    s3: Option<S3Server>,
    /// Holds the topics file and a local lake.
    _dir: TestDir,
}

impl Setup {
    /// `t`'s topics and a fresh group, with the lake in `t`'s directory.
    fn local(t: TestTopics, label: &str) -> Setup {
        let lake = t.dir.join("lake").display().to_string();
        let group = unique_topic(&format!("{label}-group"));
        Setup {
            kafka: t.kafka,
            topics: t.topics,
            topics_file: t.file,
            lake,
            env: Vec::new(),
            group,
            s3: None,
            _dir: t.dir,
        }
    }

    /// One past the last offset of each partition of the rewards topic.
    fn rewards_ends(&self) -> BTreeMap<i32, i64> {
        let mut ends = BTreeMap::new();
        for (p, o, _) in read_all::<Reward>(&self.kafka, &self.topics.name(Topic::Rewards)) {
            let e = ends.entry(p).or_insert(0);
            *e = (*e).max(o + 1);
        }
        ends
    }

    /// The Delta table's location, for the Python readers.
    fn table(&self) -> String {
        format!("{}/rewards", self.lake.trim_end_matches('/'))
    }

    fn with_lake<T: Send>(&self, f: impl FnOnce(&mut flywheel_lake::table::Lake) -> T + Send) -> T {
        with_lake_at(&self.lake, &self.env, f)
    }

    /// The lake's storage; call it from blocking code (`block_in_place`).
    fn storage(&self) -> std::sync::Arc<dyn Storage> {
        tokio::task::block_in_place(|| open_storage_with(&self.lake, &self.env, lake_runtime()).unwrap())
    }
}

/// Topics and a group for one test, and a lake in a local directory or,
/// with `s3`, in a bucket of a real S3 server.
async fn setup(label: &str, s3: bool) -> Setup {
    let t =
        test_topics(label, &[Topic::Rewards, Topic::Shards, Topic::DeadLetters], Some((Topic::Rewards, PARTITIONS)))
            .await;
    let mut s = Setup::local(t, label);
    if s3 {
        let server = tokio::task::spawn_blocking(S3Server::start).await.unwrap();
        (s.lake, s.env) = (server.url(&unique_topic(label)), server.env());
        s.s3 = Some(server);
    }
    s
}

/// A small deterministic generator (xorshift), seeded per run and printed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn reward(i: u64) -> Reward {
    let fixture = workspace_root().join("schemas/fixtures/reward.accepted.json");
    let mut r: Reward = serde_json::from_slice(&std::fs::read(fixture).unwrap()).unwrap();
    r.reward_id = format!("rw-{i:08}");
    r.suggestion_id = format!("sugg-{i}");
    r.tenant = if i.is_multiple_of(4) { "globex".into() } else { "acme".into() };
    r.user_id = format!("user-{}", i % 13);
    r.adapter_version = i.is_multiple_of(3).then(|| "v7".to_string());
    r.shown_time = T0 + (i as i64 % 3) * 3_600_000 + i as i64;
    r.outcome = [Outcome::Accepted, Outcome::Rejected, Outcome::Dismissed, Outcome::Ignored][(i % 4) as usize];
    r.reward = (i % 11) as f64 / 4.0 - 1.0;
    r
}

/// What the test sent, and what the lake must end up holding.
#[derive(Default)]
struct Sent {
    valid: BTreeMap<String, Reward>,
    /// Records to be rejected: (partition, key) of each.
    rejected: usize,
    records: usize,
}

async fn produce_batch(s: &Setup, rng: &mut Rng, from: u64, n: u64, sent: &mut Sent) {
    let producer: FutureProducer = s.kafka.client_config(&ClientRole::Producer).unwrap().create().unwrap();
    let topic = s.topics.name(Topic::Rewards);
    for i in from..from + n {
        let r = reward(i);
        let mut records = vec![(r.suggestion_id.clone(), encode(&r).unwrap())];
        sent.valid.insert(r.reward_id.clone(), r.clone());
        if rng.below(20) == 0 {
            // An upstream replay of the same reward, later in the partition.
            records.push((r.suggestion_id.clone(), encode(&r).unwrap()));
        }
        if rng.below(50) == 0 {
            let mut bad = reward(1_000_000 + i);
            bad.tenant = ["../../escape", "Acme Corp", "a/b", ""][rng.below(4) as usize].into();
            records.push((bad.suggestion_id.clone(), encode(&bad).unwrap()));
            sent.rejected += 1;
        }
        if rng.below(80) == 0 {
            records.push((format!("junk-{i}"), b"\x00not a reward".to_vec()));
            sent.rejected += 1;
        }
        for (key, value) in records {
            sent.records += 1;
            producer
                .send(FutureRecord::to(&topic).key(&key).payload(&value), Duration::from_secs(30))
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    }
}

/// The writers' drain timeout: a writer asked to stop must be gone by then.
const DRAIN_TIMEOUT_SECS: u64 = 30;

/// How long a live writer may take to own and commit partitions a killed one
/// held. Its `GroupWatch` rejoins after the stall (6 s session + 2 × 2.7 s +
/// 5 s = 16.4 s), then backs off to 2× and 4× the stall while partitions stay
/// stalled, so its fourth rejoin comes about 180 s after the last progress
/// (16.4 + 32.8 + 65.6 + 65.6). The broker sometimes leaves partitions with a
/// killed member through a rejoin or two (see `GroupWatch`): a deadline of
/// 120 s, two rejoins, was once missed on a loaded machine.
const CATCH_UP_SECS: u64 = 240;

fn spawn_writer(s: &Setup) -> Reaped {
    spawn_writer_on(s, "127.0.0.1:0")
}

/// A writer with its ops endpoint on `ops`, committing small files often.
fn spawn_writer_on(s: &Setup, ops: &str) -> Reaped {
    spawn_writer_rolling(s, ops, ["60", "700", "300"])
}

/// A writer whose files roll at `[max rows, max age ms, idle ms]`.
fn spawn_writer_rolling(s: &Setup, ops: &str, roll: [&str; 3]) -> Reaped {
    let args = [
        "--kafka-brokers",
        &s.kafka.brokers,
        "--kafka-session-timeout-ms",
        "6000",
        "-X",
        "max.poll.interval.ms=20000",
        "--topics-config",
        &s.topics_file.display().to_string(),
        "--ops-listen",
        ops,
        "--group-id",
        &s.group,
        "--lake-root",
        &s.lake,
        "--roll-max-rows",
        roll[0],
        "--roll-max-age-ms",
        roll[1],
        "--roll-idle-ms",
        roll[2],
        "--drain-timeout-secs",
        &DRAIN_TIMEOUT_SECS.to_string(),
        "--log-filter",
        &std::env::var("LAKE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
    ]
    .map(String::from);
    let mut command = Command::new(workspace_binary("flywheel-lake-writer"));
    command.args(args).envs(s.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    Reaped(command.spawn().unwrap())
}

/// Runs `sql` on both Delta readers of the lake's table; they must agree.
fn delta_both(s: &Setup, sql: &str) -> Vec<Vec<serde_json::Value>> {
    let duck = delta_query("duckdb", &s.table(), sql, &s.env);
    let other = delta_query("deltalake", &s.table(), sql, &s.env);
    assert_eq!(duck, other, "DuckDB and Python deltalake disagree on {sql}");
    duck
}

/// Waits until the table's offsets cover every record of the topic.
fn wait_committed(s: &Setup, ends: &BTreeMap<i32, i64>, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let topic = s.topics.name(Topic::Rewards);
    loop {
        let done = s.with_lake(|lake| {
            ends.iter().all(|(p, end)| lake.committed_offset(&topic, *p).unwrap().is_some_and(|c| c + 1 >= *end))
        });
        if done {
            return;
        }
        assert!(Instant::now() < deadline, "lake did not catch up with {ends:?} in {secs} s");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_leaves_exactly_one_row_per_reward() {
    kill_9_rounds(setup("lake-crash", false).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_on_a_real_s3_server_leaves_exactly_one_row_per_reward() {
    let s = setup("lake-crash-s3", true).await;
    eprintln!("S3 server {} (pid {})", s.s3.as_ref().unwrap().endpoint, s.s3.as_ref().unwrap().pid);
    kill_9_rounds(s).await;
}

/// Rounds of writers killed with SIGKILL while rewards arrive (two rounds
/// stop them with SIGTERM instead, which must end them cleanly within the
/// drain timeout, buffers committed), then the checks of the module's header.
async fn kill_9_rounds(s: Setup) {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("seed {seed}");
    let mut rng = Rng(seed);
    let mut sent = Sent::default();
    let rounds = 6;
    let mut next = 0;
    for round in 0..rounds {
        let mut child = spawn_writer(&s);
        produce_batch(&s, &mut rng, next, 300, &mut sent).await;
        next += 300;
        // Joining the group takes a few seconds; kill somewhere in the
        // writing that follows.
        let wait = 3_000 + rng.below(5_000);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        if round % 3 == 2 {
            let signalled = Instant::now();
            let status =
                tokio::task::block_in_place(|| flywheel_tests::terminate_within(&mut child, DRAIN_TIMEOUT_SECS));
            assert!(status.success(), "round {round}: exit on SIGTERM while busy: {status}");
            eprintln!("round {round}: stopped by SIGTERM after {wait} ms, in {:?}", signalled.elapsed());
            continue;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        eprintln!("round {round}: killed after {wait} ms");
        // The next writer starts at once, while the killed member's session
        // is still open.
    }
    // The last writer gets records of its own to commit, so it is past
    // start-up (signal handlers installed) before it is asked to stop.
    let mut child = spawn_writer(&s);
    produce_batch(&s, &mut rng, next, 100, &mut sent).await;
    wait_committed(&s, &s.rewards_ends(), CATCH_UP_SECS);
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    assert!(child.wait().unwrap().success(), "clean exit on SIGTERM");

    // Both Delta readers: one row per distinct reward, with its values.
    let rows = delta_both(
        &s,
        "select reward_id, tenant, reward, outcome, coalesce(adapter_version, '') from TABLE order by reward_id",
    );
    let got_ids: Vec<&str> = rows.iter().map(|r| r[0].as_str().unwrap()).collect();
    let distinct: BTreeSet<&str> = got_ids.iter().copied().collect();
    assert_eq!(distinct.len(), got_ids.len(), "a reward appears twice in the lake");
    assert_eq!(got_ids.len(), sent.valid.len(), "rows in the lake vs distinct valid rewards sent");
    for (row, (id, r)) in rows.iter().zip(&sent.valid) {
        assert_eq!(row[0].as_str(), Some(id.as_str()));
        assert_eq!(row[1].as_str(), Some(r.tenant.as_str()));
        assert_eq!(row[2].as_f64(), Some(r.reward));
        assert_eq!(row[3].as_str().map(str::to_lowercase), Some(format!("{:?}", r.outcome).to_lowercase()));
        assert_eq!(row[4].as_str(), Some(r.adapter_version.as_deref().unwrap_or_default()));
    }
    // The directory holds the table's files and, at most, files a killed
    // writer created but never committed; vacuum deletes exactly those.
    let committed: BTreeSet<String> = s.with_lake(|lake| lake.files().unwrap().into_iter().map(|f| f.path).collect());
    let storage = s.storage();
    let data_files = || -> BTreeSet<String> {
        let listed = tokio::task::block_in_place(|| storage.list("rewards").unwrap()).into_iter();
        listed.filter(|p| !p.starts_with("rewards/_delta_log/")).collect()
    };
    let orphans: BTreeSet<String> = data_files().difference(&committed).cloned().collect();
    assert!(data_files().is_superset(&committed), "a committed file is missing");
    let vacuumed = s.with_lake(|lake| lake.vacuum(Duration::ZERO).unwrap());
    assert_eq!(vacuumed.deleted, orphans.len(), "vacuum deletes the uncommitted leftovers {orphans:?}");
    assert_eq!(data_files(), committed, "after vacuum the directory holds exactly the table's files");

    // Each rejected record is dead-lettered once, by the lake writer.
    let dead: Vec<DeadLetter> = read_all::<DeadLetter>(&s.kafka, &s.topics.name(Topic::DeadLetters))
        .into_iter()
        .map(|(_, _, d)| d)
        .filter(|d| d.service == "lake-writer")
        .collect();
    let positions: BTreeSet<(i32, i64)> = dead.iter().map(|d| (d.source.partition, d.source.offset)).collect();
    assert_eq!(positions.len(), dead.len(), "a dead letter was published twice");
    assert_eq!(dead.len(), sent.rejected, "dead letters vs rejected records sent");
    assert!(dead.iter().all(|d| ["invalid_tenant", "bad_magic"].contains(&d.reason_code.as_str())), "{dead:?}");

    // Each committed file is announced once, and its manifest matches the file.
    let manifests: Vec<ShardManifest> =
        read_all::<ShardManifest>(&s.kafka, &s.topics.name(Topic::Shards)).into_iter().map(|(_, _, m)| m).collect();
    let announced: BTreeMap<&str, &ShardManifest> = manifests.iter().map(|m| (m.uri.as_str(), m)).collect();
    assert_eq!(announced.len(), manifests.len(), "a shard was announced twice");
    let announced_paths: BTreeSet<String> = announced.keys().map(|k| k.to_string()).collect();
    assert_eq!(announced_paths, committed, "manifests vs committed files");
    // Per file, read by DuckDB's plain Parquet reader (from a local copy of
    // the files when the lake is on S3).
    let copy = tempfile::tempdir().unwrap();
    for path in &committed {
        let target = copy.path().join(path);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(target, tokio::task::block_in_place(|| storage.get(path).unwrap().unwrap())).unwrap();
    }
    let per_file = duckdb(
        copy.path(),
        "select regexp_replace(filename, '^.*?/rewards/', 'rewards/'), count(*),
                sum(case when outcome = 'ACCEPTED' then 1 else 0 end), round(sum(reward), 6),
                count(distinct user_id), min(epoch_ms(shown_time)), max(epoch_ms(shown_time))
         from read_parquet('ROOT/rewards/**/*.parquet', filename = true) group by all",
    );
    assert_eq!(per_file.len(), committed.len());
    for row in &per_file {
        let m = announced[row[0].as_str().unwrap()];
        assert_eq!(m.lake_root, storage.url(), "the manifest names the lake");
        let recorded = s.with_lake(|lake| lake.commit(m.commit_seq as u64).unwrap().unwrap());
        let added = recorded.added.iter().find(|f| f.path == m.uri).expect("the manifest's commit adds its file");
        let bytes = tokio::task::block_in_place(|| storage.get(&m.uri).unwrap().unwrap());
        let digest: String =
            <sha2::Sha256 as sha2::Digest>::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!((&m.content_sha256, &added.sha256), (&digest, &digest), "hashes of {}", m.uri);
        assert_eq!(Some(m.rows), row[1].as_i64());
        assert_eq!(Some(m.stats.accepted), row[2].as_i64());
        assert!((m.stats.reward_sum - row[3].as_f64().unwrap()).abs() < 1e-6);
        assert_eq!(Some(m.stats.user_rows.len() as i64), row[4].as_i64());
        assert_eq!((Some(m.min_event_time), Some(m.max_event_time)), (row[5].as_i64(), row[6].as_i64()));
        assert_eq!(m.versions.iter().map(|v| v.rows).sum::<i64>(), m.rows, "per-version rows add up");
    }
    let version = s.with_lake(|lake| lake.version().unwrap());
    eprintln!(
        "{} records sent ({} valid distinct, {} rejected), {} files, table version {version}, {} orphans vacuumed",
        sent.records,
        sent.valid.len(),
        sent.rejected,
        committed.len(),
        orphans.len()
    );

    let expected = vec![vec![serde_json::json!(sent.valid.len()), serde_json::json!(sent.valid.len())]];
    let sql = "select count(*), count(distinct reward_id) from TABLE";
    let table = s.table();
    // Compaction one merged file (one commit) at a time; between every two
    // commits both readers read the latest snapshot and the one before the
    // last commit (time travel), and each sees every reward exactly once.
    let (mut steps, mut merged_in) = (0, 0);
    loop {
        let before = s.with_lake(|lake| lake.version().unwrap());
        let report = s.with_lake(|lake| {
            let opts = CompactOptions {
                target_bytes: 1 << 30,
                closed_before_ms: i64::MAX,
                settings: Default::default(),
                writer: "test".into(),
                vacuum_retention: None,
                max_merges: Some(1),
            };
            compact(lake, &opts).unwrap()
        });
        if report.files_out == 0 {
            break;
        }
        assert_eq!(report.files_out, 1, "{report:?}");
        steps += 1;
        merged_in += report.files_in;
        let older = [("LAKE_READ_VERSION".to_string(), before.to_string())];
        for engine in ["duckdb", "deltalake"] {
            assert_eq!(delta_query(engine, &table, sql, &s.env), expected, "{engine} after merge {steps}");
            let env: Vec<(String, String)> = s.env.iter().cloned().chain(older.clone()).collect();
            assert_eq!(delta_query(engine, &table, sql, &env), expected, "{engine} at version {before}");
        }
    }
    assert!(steps >= 2 && merged_in > steps, "{steps} merges of {merged_in} files");
    assert_eq!(delta_both(&s, sql), expected, "after compaction");
    eprintln!("compaction: {steps} merges of {merged_in} files, both readers exact between every two");
}

/// SIGTERM commits what is buffered before the writer exits: with roll
/// limits it never reaches, the writer holds every record uncommitted when
/// signalled, and the lake holds them all once it has exited, with no
/// other writer started (no replay involved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_commits_every_buffered_record_before_the_writer_exits() {
    let s = setup("lake-drain", false).await;
    let ops = flywheel_devkit::free_local_addr().unwrap();
    let mut child = spawn_writer_rolling(&s, &ops.to_string(), ["1000000", "3600000", "3600000"]);
    let mut sent = Sent::default();
    produce_batch(&s, &mut Rng(7), 0, 200, &mut sent).await;
    let all_buffered = |exposed: &str| metric(exposed, "lake_writer_buffered_records") == Some(sent.records as f64);
    metrics_when(ops, 60, &format!("all {} records buffered", sent.records), all_buffered).await;
    let topic = s.topics.name(Topic::Rewards);
    let committed = |p| s.with_lake(|lake| lake.committed_offset(&topic, p).unwrap());
    assert!((0..PARTITIONS).all(|p| committed(p).is_none()), "the writer committed before it was signalled");
    let status = tokio::task::block_in_place(|| flywheel_tests::terminate_within(&mut child, DRAIN_TIMEOUT_SECS));
    assert!(status.success(), "exit on SIGTERM: {status}");
    let rows = delta_both(&s, "select reward_id from TABLE order by reward_id");
    let ids: Vec<&str> = rows.iter().map(|r| r[0].as_str().unwrap()).collect();
    assert_eq!(ids, sent.valid.keys().map(String::as_str).collect::<Vec<_>>(), "the lake after the drain");
    let dead = read_all::<DeadLetter>(&s.kafka, &s.topics.name(Topic::DeadLetters));
    assert_eq!(dead.len(), sent.rejected, "each rejected record is dead-lettered once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_holding_nothing_says_so_stays_out_of_the_way_and_takes_over_from_a_killed_owner() {
    let t =
        test_topics("lake-idle", &[Topic::Rewards, Topic::Shards, Topic::DeadLetters], Some((Topic::Rewards, 1))).await;
    let s = Setup::local(t, "lake-idle");
    let addr = || flywheel_devkit::free_local_addr().unwrap();
    let (a_ops, b_ops) = (addr(), addr());
    let a = spawn_writer_on(&s, &a_ops.to_string());
    let deadline = Instant::now() + Duration::from_secs(60);
    while ops_get(a_ops, "/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "writer a never held the partition: {:?}", ops_get(a_ops, "/readyz").await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let b = spawn_writer_on(&s, &b_ops.to_string());
    // One of the two holds the only partition and the other says it holds
    // nothing, steadily (8 s without change: the join's rebalance is over).
    let roles = || async {
        let (ra, rb) = (ops_get(a_ops, "/readyz").await, ops_get(b_ops, "/readyz").await);
        let idle = |r: &(u16, String)| r.0 == 503 && r.1.contains("no partitions assigned");
        match (ra.0, rb.0) {
            (200, _) if idle(&rb) => Some(true),
            (_, 200) if idle(&ra) => Some(false),
            _ => None,
        }
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut steady: Option<(bool, Instant)> = None;
    let a_owns = loop {
        let now = roles().await;
        match (now, steady) {
            (Some(r), Some((was, since))) if r == was => {
                if since.elapsed() >= Duration::from_secs(8) {
                    break r;
                }
            }
            (Some(r), _) => steady = Some((r, Instant::now())),
            (None, _) => steady = None,
        }
        assert!(Instant::now() < deadline, "no steady owner and idle member in 90 s");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let (mut owner, idle_ops, mut idle) = if a_owns { (a, b_ops, b) } else { (b, a_ops, a) };
    eprintln!("owner {}, idle member on {idle_ops}", if a_owns { "a" } else { "b" });

    // Rewards keep coming for longer than the idle member waits before it
    // concludes a partition has no working owner (6 s session + 2 × 2.7 s +
    // 5 s): the owner commits as it goes, so the idle member never rejoins.
    let mut rng = Rng(7);
    let mut sent = Sent::default();
    let started = Instant::now();
    let mut next = 0;
    while started.elapsed() < Duration::from_secs(22) {
        produce_batch(&s, &mut rng, next, 40, &mut sent).await;
        next += 40;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(roles().await, Some(a_owns), "the partition moved while its owner was working");
    }
    let (status, body) = ops_get(idle_ops, "/readyz").await;
    assert!(status == 503 && body.contains("no partitions assigned"), "idle member: {status} {body}");
    let exposed = ops_get(idle_ops, "/metrics").await.1;
    assert_eq!(metric(&exposed, "lake_writer_group_rejoins_total"), Some(0.0), "{exposed}");
    assert_eq!(metric(&exposed, "lake_writer_assigned_partitions"), Some(0.0), "{exposed}");

    // The owner dies: the idle member takes the partition over and commits the rest.
    owner.kill().unwrap(); // SIGKILL
    owner.wait().unwrap();
    produce_batch(&s, &mut rng, next, 60, &mut sent).await;
    let end = read_all::<Reward>(&s.kafka, &s.topics.name(Topic::Rewards)).last().map(|(_, o, _)| o + 1).unwrap();
    wait_committed(&s, &BTreeMap::from([(0, end)]), CATCH_UP_SECS);
    assert_eq!(ops_get(idle_ops, "/readyz").await.0, 200, "the new owner is ready");
    let _ = Command::new("kill").args(["-TERM", &idle.id().to_string()]).status();
    assert!(idle.wait().unwrap().success(), "clean exit on SIGTERM");
    let rows = delta_both(&s, "select count(*), count(distinct reward_id) from TABLE");
    assert_eq!(rows[0][0].as_u64(), Some(sent.valid.len() as u64), "rows in the lake vs distinct valid rewards sent");
    assert_eq!(rows[0][1].as_u64(), Some(sent.valid.len() as u64), "a reward appears twice in the lake");
}

/// A hung broker does not hold a stopping writer past its drain timeout:
/// with everything committed, the broker frozen (SIGSTOP) and the writer
/// signalled, leaving the consumer group cannot complete, and the writer
/// gives up on it and exits cleanly instead of waiting on the coordinator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_stopped_while_the_broker_hangs_exits_within_its_drain_timeout() {
    let broker = flywheel_tests::DedicatedBroker::start("lake-hung");
    let t = flywheel_tests::test_topics_on(
        broker.kafka(),
        "lake-hung",
        &[Topic::Rewards, Topic::Shards, Topic::DeadLetters],
        Some((Topic::Rewards, PARTITIONS)),
    )
    .await;
    let s = Setup::local(t, "lake-hung");
    let ops = flywheel_devkit::free_local_addr().unwrap();
    let mut child = spawn_writer_on(&s, &ops.to_string());
    let mut sent = Sent::default();
    produce_batch(&s, &mut Rng(11), 0, 100, &mut sent).await;
    wait_committed(&s, &s.rewards_ends(), CATCH_UP_SECS);
    let nothing_buffered = |exposed: &str| metric(exposed, "lake_writer_buffered_records") == Some(0.0);
    metrics_when(ops, 60, "an empty buffer after the commits", nothing_buffered).await;
    broker.pause();
    let signalled = Instant::now();
    let status = tokio::task::block_in_place(|| flywheel_tests::terminate_within(&mut child, DRAIN_TIMEOUT_SECS));
    let took = signalled.elapsed();
    broker.resume();
    assert!(status.success(), "exit on SIGTERM with the broker frozen: {status} after {took:?}");
    eprintln!("stopped in {took:?} with the broker frozen");
    let rows = delta_both(&s, "select count(*), count(distinct reward_id) from TABLE");
    let n = serde_json::json!(sent.valid.len());
    assert_eq!(rows, vec![vec![n.clone(), n]], "the lake after the stop");
}
