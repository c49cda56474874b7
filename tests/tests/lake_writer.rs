//! The lake writer against the real broker, killed with SIGKILL at random
//! points over many rounds while rewards keep arriving (with upstream
//! replays, hostile tenants and malformed records). Afterwards DuckDB, scanning
//! the lake directory, must see exactly one row per distinct valid reward;
//! every rejected record must be on the dead-letter topic once; every
//! committed file must be announced on `shards` once, with statistics that
//! match the file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use flywheel_core::codec::encode;
use flywheel_core::kafka::{ClientRole, KafkaArgs};
use flywheel_core::records::{DeadLetter, Outcome, Reward, ShardManifest};
use flywheel_core::topics::{Topic, TopicsConfig};
use flywheel_lake_writer::lake::Lake;
use flywheel_lake_writer::store::{LocalStore, Storage};
use flywheel_tests::{read_all, test_topics, unique_topic, workspace_binary, workspace_root};
use rdkafka::producer::{FutureProducer, FutureRecord};

const PARTITIONS: i32 = 3;
const T0: i64 = 1_795_424_400_000;

struct Setup {
    kafka: KafkaArgs,
    topics: TopicsConfig,
    topics_file: PathBuf,
    lake: PathBuf,
    group: String,
}

async fn setup(label: &str) -> Setup {
    let t =
        test_topics(label, &[Topic::Rewards, Topic::Shards, Topic::DeadLetters], Some((Topic::Rewards, PARTITIONS)))
            .await;
    let group = unique_topic(&format!("{label}-group"));
    Setup { kafka: t.kafka, topics: t.topics, topics_file: t.file, lake: t.dir.join("lake"), group }
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

fn spawn_writer(s: &Setup) -> Child {
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
        "127.0.0.1:0",
        "--group-id",
        &s.group,
        "--lake-root",
        &s.lake.display().to_string(),
        "--roll-max-rows",
        "60",
        "--roll-max-age-ms",
        "700",
        "--roll-idle-ms",
        "300",
        "--log-filter",
        &std::env::var("LAKE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
    ]
    .map(String::from);
    Command::new(workspace_binary("flywheel-lake-writer")).args(args).spawn().unwrap()
}

fn open_lake(root: &Path) -> Lake {
    Lake::open(std::sync::Arc::new(LocalStore::open(root).unwrap())).unwrap()
}

/// Waits until the lake's commit log covers every record of the topic.
fn wait_committed(s: &Setup, ends: &BTreeMap<i32, i64>, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let topic = s.topics.name(Topic::Rewards);
    loop {
        let lake = open_lake(&s.lake);
        let done = ends.iter().all(|(p, end)| lake.committed_offset(&topic, *p).is_some_and(|c| c + 1 >= *end));
        if done {
            return;
        }
        assert!(Instant::now() < deadline, "lake did not catch up with {ends:?} in {secs} s");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn duckdb(root: &Path, sql: &str) -> Vec<Vec<serde_json::Value>> {
    let python = workspace_root().join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run `make setup`", python.display());
    let script = r#"
import duckdb, json, sys
rows = duckdb.connect().execute(sys.argv[2].replace('ROOT', sys.argv[1])).fetchall()
print(json.dumps([[v if isinstance(v, (int, float)) or v is None else str(v) for v in r] for r in rows]))
"#;
    let out = Command::new(python).args(["-c", script, &root.display().to_string(), sql]).output().unwrap();
    assert!(out.status.success(), "duckdb failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_leaves_exactly_one_row_per_reward() {
    let s = setup("lake-crash").await;
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
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        eprintln!("round {round}: killed after {wait} ms");
        // The killed member leaves the group after its session timeout.
        tokio::time::sleep(Duration::from_secs(7)).await;
    }
    // The last writer gets records of its own to commit, so it is past
    // start-up (signal handlers installed) before it is asked to stop.
    let mut child = spawn_writer(&s);
    produce_batch(&s, &mut rng, next, 100, &mut sent).await;
    let ends: BTreeMap<i32, i64> = {
        let all = read_all::<Reward>(&s.kafka, &s.topics.name(Topic::Rewards));
        let mut ends = BTreeMap::new();
        for (p, o, _) in all {
            let e = ends.entry(p).or_insert(0);
            *e = (*e).max(o + 1);
        }
        ends
    };
    wait_committed(&s, &ends, 120);
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    assert!(child.wait().unwrap().success(), "clean exit on SIGTERM");

    // DuckDB scanning the directory: one row per distinct reward, with its values.
    let rows = duckdb(
        &s.lake,
        "select reward_id, tenant, reward, outcome, coalesce(adapter_version, '') from
         read_parquet('ROOT/rewards/**/*.parquet', hive_partitioning = false) order by reward_id",
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
    // The directory holds exactly the committed files: no partial or orphan file.
    let lake = open_lake(&s.lake);
    let committed: BTreeSet<String> = lake.files().iter().map(|f| f.path.clone()).collect();
    let storage = LocalStore::open(&s.lake).unwrap();
    let on_disk: BTreeSet<String> = storage.list("rewards").unwrap().into_iter().collect();
    assert_eq!(on_disk, committed, "directory scan vs commit log");

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
    let per_file = duckdb(
        &s.lake,
        "select regexp_replace(filename, '^.*?/rewards/', 'rewards/'), count(*),
                sum(case when outcome = 'ACCEPTED' then 1 else 0 end), round(sum(reward), 6),
                count(distinct user_id), min(epoch_ms(shown_time)), max(epoch_ms(shown_time))
         from read_parquet('ROOT/rewards/**/*.parquet', filename = true) group by all",
    );
    assert_eq!(per_file.len(), committed.len());
    for row in &per_file {
        let m = announced[row[0].as_str().unwrap()];
        let f = lake.files().into_iter().find(|f| f.path == m.uri).unwrap();
        assert_eq!(m.content_sha256, f.sha256);
        assert_eq!(Some(m.rows), row[1].as_i64());
        assert_eq!(Some(m.stats.accepted), row[2].as_i64());
        assert!((m.stats.reward_sum - row[3].as_f64().unwrap()).abs() < 1e-6);
        assert_eq!(Some(m.stats.user_rows.len() as i64), row[4].as_i64());
        assert_eq!((Some(m.min_event_time), Some(m.max_event_time)), (row[5].as_i64(), row[6].as_i64()));
        assert_eq!(m.versions.iter().map(|v| v.rows).sum::<i64>(), m.rows, "per-version rows add up");
    }
    eprintln!(
        "{} records sent ({} valid distinct, {} rejected), {} files, {} commits",
        sent.records,
        sent.valid.len(),
        sent.rejected,
        committed.len(),
        lake.commits().len()
    );
}
