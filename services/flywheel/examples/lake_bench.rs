//! Lake writer benchmarks, each side by side in one run (`make bench`):
//!
//! 1. Encode + write per core: buffered reward records → decode, route,
//!    replay filter, Parquet (zstd) → commit on local disk with fsync; one
//!    thread, so rows/s is per core. Interleaved runs, medians.
//! 2. Event → visible latency through the real broker: rewards produced at a
//!    steady rate while the release `flywheel-lake-writer` binary runs; an
//!    observer polls the commit log every 50 ms, and a row's latency is from
//!    its produce call to the first poll that sees its commit. Default
//!    settings and a low-latency setting. Peak RSS from `/proc`.
//! 3. Backpressure: a backlog on the topic drained with the default memory
//!    cap and a 64 MiB cap: throughput and peak RSS.
//! 4. The Delta commit's own cost (files already encoded): 120 commits of a
//!    100-reward flush each, on local disk and on a real S3 server
//!    (SeaweedFS from `make setup`), so one automatic checkpoint is included.

#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flywheel_core::codec::encode;
use flywheel_core::kafka::{ClientRole, KafkaArgs, create_topics};
use flywheel_core::records::{Outcome, Reward};
use flywheel_core::topics::{Topic, TopicOverride, TopicsConfig};
use flywheel_devkit::{LocalBroker, S3Server, free_local_addr, lake_runtime, tansu_binary, workspace_root};
use flywheel_lake::parquet::{ParquetSettings, RewardBatcher, RewardSchemas, write_parquet};
use flywheel_lake::shard::{RecentIds, RowBuffer, ShardContext, prepare};
use flywheel_lake::store::{LocalStore, Storage};
use flywheel_lake::table::{Lake, PartitionCommit};
use rdkafka::producer::{FutureProducer, FutureRecord};

const CORE_ROWS: u64 = 200_000;
const CORE_RUNS: usize = 5;
const PARTITIONS: i32 = 4;
const T0: i64 = 1_795_424_400_000;

/// When the observer first saw a commit, and the offsets it covers.
type SeenCommit = (Instant, BTreeMap<String, (i64, i64)>);

fn reward(i: u64) -> Reward {
    let fixture = workspace_root().join("schemas/fixtures/reward.accepted.json");
    let mut r: Reward = serde_json::from_slice(&std::fs::read(fixture).unwrap()).unwrap();
    r.reward_id = format!("{:064x}", i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    r.suggestion_id = format!("sugg-{i}");
    r.tenant = ["acme", "globex", "initech"][(i % 3) as usize].into();
    r.user_id = format!("{:064x}", i % 5003);
    r.adapter_version = i.is_multiple_of(2).then(|| "acme-editor-a1b2c3".to_string());
    r.shown_time = T0 + i as i64 * 10;
    r.outcome = [Outcome::Accepted, Outcome::Rejected, Outcome::Dismissed, Outcome::Ignored][(i % 4) as usize];
    r.reward = (i % 11) as f64 / 4.0 - 1.0;
    r
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// The two halves of `prepare` alone: Avro → Arrow decode, and Parquet
/// encoding of the decoded batch (rows/s each).
fn phases(records: &[Vec<u8>]) -> (f64, f64) {
    let arena: Vec<u8> = records.concat();
    let offsets: Vec<i64> = (0..records.len() as i64).collect();
    let started = Instant::now();
    let mut batcher = RewardBatcher::new(records.len()).unwrap();
    batcher.push_all(&arena, 0, &offsets).unwrap();
    let batch = batcher.take().unwrap().unwrap();
    let decode = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut out = Vec::new();
    write_parquet(&[batch], &ParquetSettings::default(), &mut out).unwrap();
    let n = records.len() as f64;
    (n / decode, n / started.elapsed().as_secs_f64())
}

/// One encode+write run; returns (prepare rows/s, prepare+commit rows/s, parquet bytes).
fn core_run(records: &[Vec<u8>], dir: &Path) -> (f64, f64, u64) {
    let _ = std::fs::remove_dir_all(dir);
    let storage: Arc<dyn Storage> = Arc::new(LocalStore::open(dir).unwrap());
    let settings = ParquetSettings::default();
    let schemas = RewardSchemas::released().unwrap();
    let mut lake = Lake::create_or_open(storage, lake_runtime(), &schemas.file_schema().unwrap()).unwrap();
    let ctx = ShardContext {
        topic: "rewards",
        partition: 0,
        lake_url: "file:///bench",
        settings: &settings,
        schemas: &schemas,
    };
    let mut buf = RowBuffer::default();
    for (i, r) in records.iter().enumerate() {
        buf.push(Some(b"k"), Some(r), i as i64, 0);
    }
    let started = Instant::now();
    let prepared = prepare(&ctx, &buf, &RecentIds::new(1_000_000)).unwrap();
    let prepare_secs = started.elapsed().as_secs_f64();
    let files: Vec<_> = prepared.files.into_iter().map(|f| f.file).collect();
    let bytes = files.iter().map(|f| f.bytes.len() as u64).sum();
    let range = buf.range().unwrap();
    let commit = PartitionCommit {
        topic: "rewards",
        partition: 0,
        previous: None,
        range,
        files,
        rejected: Vec::new(),
        committed_at: 0,
    };
    lake.commit_partition(commit).unwrap();
    let total = started.elapsed().as_secs_f64();
    let n = records.len() as f64;
    (n / prepare_secs, n / total, bytes)
}

/// `n` commits of one flush of `records` each (offsets moving on); the
/// seconds each `commit_partition` took.
fn commit_costs(storage: Arc<dyn Storage>, records: &[Vec<u8>], n: usize) -> Vec<f64> {
    let settings = ParquetSettings::default();
    let schemas = RewardSchemas::released().unwrap();
    let url = storage.url();
    let mut lake = Lake::create_or_open(storage, lake_runtime(), &schemas.file_schema().unwrap()).unwrap();
    let ctx = ShardContext { topic: "rewards", partition: 0, lake_url: &url, settings: &settings, schemas: &schemas };
    let (mut out, mut previous) = (Vec::new(), None);
    for k in 0..n {
        let mut buf = RowBuffer::default();
        for (i, r) in records.iter().enumerate() {
            buf.push(Some(b"k"), Some(r), (k * records.len() + i) as i64, 0);
        }
        let prepared = prepare(&ctx, &buf, &RecentIds::new(1000)).unwrap();
        let files = prepared.files.into_iter().map(|f| f.file).collect();
        let range = buf.range().unwrap();
        let started = Instant::now();
        let commit = PartitionCommit {
            topic: "rewards",
            partition: 0,
            previous,
            range,
            files,
            rejected: Vec::new(),
            committed_at: 0,
        };
        lake.commit_partition(commit).unwrap();
        out.push(started.elapsed().as_secs_f64());
        previous = Some(range.1);
    }
    out
}

fn print_costs(name: &str, costs: &mut [f64]) {
    println!(
        "  {name:<30} p50 {:>6.1} ms  p90 {:>6.1} ms  max {:>6.1} ms",
        percentile(costs, 0.5) * 1e3,
        percentile(costs, 0.9) * 1e3,
        percentile(costs, 1.0) * 1e3
    );
}

fn topics_for(label: &str) -> (TopicsConfig, String) {
    let mut topics = TopicsConfig { prefix: format!("{label}."), ..TopicsConfig::default() };
    topics.topics.insert("rewards".into(), TopicOverride { partitions: Some(PARTITIONS), ..Default::default() });
    let toml = format!("prefix = \"{label}.\"\n[topics.rewards]\npartitions = {PARTITIONS}\n");
    (topics, toml)
}

fn spawn_writer(kafka: &KafkaArgs, dir: &Path, label: &str, toml: &str, extra: &[&str]) -> Child {
    let topics_file = dir.join(format!("{label}.toml"));
    std::fs::write(&topics_file, toml).unwrap();
    let bin = workspace_root().join("target/release/flywheel-lake-writer");
    assert!(bin.exists(), "{} missing: `make bench` builds it", bin.display());
    let mut args: Vec<String> = [
        "--kafka-brokers",
        &kafka.brokers,
        "--kafka-session-timeout-ms",
        "6000",
        "--topics-config",
        &topics_file.display().to_string(),
        "--ops-listen",
        "127.0.0.1:0",
        "--group-id",
        &format!("{label}-writer"),
        "--lake-root",
        &dir.join(label).display().to_string(),
        "--log-filter",
        "warn",
    ]
    .map(String::from)
    .into();
    args.extend(extra.iter().map(|s| s.to_string()));
    Command::new(bin).args(args).spawn().unwrap()
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn open_lake(dir: &Path) -> Option<Lake> {
    if !dir.join("rewards/_delta_log").exists() {
        return None;
    }
    Lake::open(Arc::new(LocalStore::open(dir).ok()?), lake_runtime()).ok()
}

/// Produces `rate` rewards/s for `secs` while a writer runs; returns the
/// latencies (s) of every row and the writer's peak RSS.
async fn latency_run(
    kafka: &KafkaArgs,
    dir: &Path,
    label: &str,
    extra: &[&str],
    rate: u64,
    secs: u64,
) -> (Vec<f64>, f64) {
    let (topics, toml) = topics_for(label);
    let specs: Vec<_> = [Topic::Rewards, Topic::Shards, Topic::DeadLetters].map(|t| topics.spec(t)).into();
    create_topics(kafka, &specs, Duration::from_secs(30)).await.unwrap();
    let mut child = spawn_writer(kafka, dir, label, &toml, extra);
    tokio::time::sleep(Duration::from_secs(5)).await; // group join
    let producer: FutureProducer = kafka.client_config(&ClientRole::Producer).unwrap().create().unwrap();
    let topic = topics.name(Topic::Rewards);
    let sent_at: Arc<std::sync::Mutex<BTreeMap<(i32, i64), Instant>>> = Arc::default();
    let lake_dir = dir.join(label);
    // Observer: first time each commit is seen.
    let seen: Arc<std::sync::Mutex<Vec<SeenCommit>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let observer = {
        let (seen, stop, lake_dir) = (seen.clone(), stop.clone(), lake_dir.clone());
        std::thread::spawn(move || {
            let mut lake: Option<Lake> = None;
            let mut known = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if lake.is_none() {
                    lake = open_lake(&lake_dir);
                }
                if let Some(l) = lake.as_mut()
                    && l.refresh().is_ok()
                {
                    let now = Instant::now();
                    let latest = l.version().map_or(0, |v| v + 1);
                    for v in known..latest {
                        if let Ok(Some(c)) = l.commit(v) {
                            seen.lock().unwrap().push((now, c.offsets.clone()));
                        }
                    }
                    known = latest;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let started = Instant::now();
    let total = rate * secs;
    let mut pending = Vec::new();
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let r = reward(i);
        let bytes = encode(&r).unwrap();
        let at = Instant::now();
        let future = producer.send_result(FutureRecord::to(&topic).key(&r.suggestion_id).payload(&bytes)).unwrap();
        pending.push((at, future));
        if pending.len() >= 1000 {
            for (at, f) in pending.drain(..) {
                let d = f.await.unwrap().map_err(|(e, _)| e).unwrap();
                sent_at.lock().unwrap().insert((d.partition, d.offset), at);
            }
        }
    }
    for (at, f) in pending.drain(..) {
        let d = f.await.unwrap().map_err(|(e, _)| e).unwrap();
        sent_at.lock().unwrap().insert((d.partition, d.offset), at);
    }
    // Wait until everything is visible.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let covered: usize = {
            let seen = seen.lock().unwrap();
            seen.iter().flat_map(|(_, o)| o.values()).map(|(a, b)| (b - a + 1) as usize).sum()
        };
        if covered as u64 >= total || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rss = peak_rss_mib(child.id());
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = observer.join();
    let sent_at = sent_at.lock().unwrap();
    let mut latencies = Vec::new();
    for (at, offsets) in seen.lock().unwrap().iter() {
        for (key, (first, last)) in offsets {
            let p: i32 = key.rsplit('/').next().unwrap().parse().unwrap();
            for o in *first..=*last {
                if let Some(sent) = sent_at.get(&(p, o)) {
                    latencies.push(at.duration_since(*sent).as_secs_f64());
                }
            }
        }
    }
    (latencies, rss)
}

/// Drains a backlog of `n` rewards; returns (rows/s, peak RSS MiB).
async fn backlog_run(kafka: &KafkaArgs, dir: &Path, label: &str, extra: &[&str], records: &[Vec<u8>]) -> (f64, f64) {
    let (topics, toml) = topics_for(label);
    let specs: Vec<_> = [Topic::Rewards, Topic::Shards, Topic::DeadLetters].map(|t| topics.spec(t)).into();
    create_topics(kafka, &specs, Duration::from_secs(30)).await.unwrap();
    let topic = topics.name(Topic::Rewards);
    let producer: FutureProducer = kafka.client_config(&ClientRole::Producer).unwrap().create().unwrap();
    let mut pending = Vec::new();
    for (i, bytes) in records.iter().enumerate() {
        let key = format!("sugg-{i}");
        pending.push(producer.send_result(FutureRecord::to(&topic).key(&key).payload(bytes)).unwrap());
        if pending.len() >= 20_000 {
            for f in pending.drain(..) {
                f.await.unwrap().map_err(|(e, _)| e).unwrap();
            }
        }
    }
    for f in pending {
        f.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
    let mut child = spawn_writer(kafka, dir, label, &toml, extra);
    let lake_dir = dir.join(label);
    let started = Instant::now();
    let mut rss: f64 = 0.0;
    loop {
        rss = rss.max(peak_rss_mib(child.id()));
        let rows: u64 = tokio::task::block_in_place(|| {
            open_lake(&lake_dir).and_then(|l| l.files().ok()).map_or(0, |f| f.iter().map(|f| f.rows).sum())
        });
        if rows as usize >= records.len() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "backlog not drained");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // From the writer's start (group join included) to the last commit.
    let secs = started.elapsed().as_secs_f64();
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    (records.len() as f64 / secs, rss)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = workspace_root().join("target").join("bench-lake");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    // 1. Encode + write per core.
    let records: Vec<Vec<u8>> = (0..CORE_ROWS).map(|i| encode(&reward(i)).unwrap()).collect();
    let avro_bytes: usize = records.iter().map(Vec::len).sum();
    let (mut prep, mut full, mut parquet_bytes) = (Vec::new(), Vec::new(), 0);
    let (mut decode, mut encode_pq) = (Vec::new(), Vec::new());
    for run in 0..CORE_RUNS {
        let (d, e) = tokio::task::block_in_place(|| phases(&records));
        decode.push(d);
        encode_pq.push(e);
        let (p, f, b) = tokio::task::block_in_place(|| core_run(&records, &dir.join(format!("core-{run}"))));
        eprintln!("core run {run}: prepare {p:.0} rows/s, prepare+commit {f:.0} rows/s");
        prep.push(p);
        full.push(f);
        parquet_bytes = b;
    }
    println!("lake_bench: encode + write, {CORE_ROWS} rewards (Avro {avro_bytes} bytes), {CORE_RUNS} runs, one thread");
    println!("  phase: Avro -> Arrow decode only          {:>9.0} rows/s (median)", median(&mut decode));
    println!("  phase: Parquet encode only (zstd 3)       {:>9.0} rows/s (median)", median(&mut encode_pq));
    println!("  decode + route + Parquet (zstd 3)         {:>9.0} rows/s (median)", median(&mut prep));
    println!("  ... + commit on local disk (fsync)        {:>9.0} rows/s (median)", median(&mut full));
    println!(
        "  Parquet {parquet_bytes} bytes for {avro_bytes} Avro bytes ({:.1}x smaller)",
        avro_bytes as f64 / parquet_bytes as f64
    );

    // 4. The commit's own cost, local disk and S3.
    let small: Vec<Vec<u8>> = (0..100).map(|i| encode(&reward(i)).unwrap()).collect();
    println!("lake_bench: Delta commit cost, 120 commits of a 100-reward flush (files encoded beforehand)");
    let local: Arc<dyn Storage> = Arc::new(LocalStore::open(&dir.join("commits")).unwrap());
    let mut costs = tokio::task::block_in_place(|| commit_costs(local, &small, 120));
    print_costs("local disk (fsync)", &mut costs);
    match S3Server::start_in(&dir.join("s3")) {
        Ok(s3) => {
            let storage = flywheel_lake::store::open_storage_with(&s3.url("bench"), &s3.env(), lake_runtime()).unwrap();
            let mut costs = tokio::task::block_in_place(|| commit_costs(storage, &small, 120));
            print_costs("S3 (SeaweedFS on this host)", &mut costs);
        }
        Err(e) => println!("  S3: not measured ({e})"),
    }

    if std::env::var("LAKE_BENCH_PARTS").is_ok_and(|p| p == "core") {
        return;
    }
    // 2 and 3 through the broker.
    let broker = LocalBroker::start_with_storage(
        &tansu_binary(),
        free_local_addr().unwrap(),
        &dir.join("broker"),
        "sqlite://broker.db",
        Duration::from_secs(60),
    )
    .expect("the benchmark needs the broker: run `make setup`");
    let kafka = KafkaArgs::local(broker.bootstrap());
    let settings: [(&str, &[&str], u64); 2] = [
        ("defaults (age 55 s, idle 10 s)", &[], 150),
        ("low latency (age 5 s, idle 1 s)", &["--roll-max-age-ms", "5000", "--roll-idle-ms", "1000"], 60),
    ];
    let rate = 1000;
    println!("lake_bench: event -> visible through tansu (sqlite), {rate} rewards/s on {PARTITIONS} partitions");
    for (i, (name, extra, secs)) in settings.iter().enumerate() {
        let (mut lat, rss) = latency_run(&kafka, &dir, &format!("lat{i}"), extra, rate, *secs).await;
        println!(
            "  {name:<34} p50 {:>5.1} s  p99 {:>5.1} s  max {:>5.1} s  ({} rows over {secs} s; writer peak RSS {rss:.0} MiB)",
            percentile(&mut lat, 0.5),
            percentile(&mut lat, 0.99),
            percentile(&mut lat, 1.0),
            lat.len()
        );
    }
    let backlog: Vec<Vec<u8>> = (0..300_000).map(|i| encode(&reward(i)).unwrap()).collect();
    println!("lake_bench: draining a backlog of {} rewards through tansu (sqlite)", backlog.len());
    let caps: [(&str, &[&str]); 2] = [
        ("default cap (1 GiB, files roll at 512 MiB)", &[]),
        ("64 MiB cap (files roll at 16 MiB)", &["--max-buffered-bytes", "67108864", "--roll-max-bytes", "16777216"]),
    ];
    for (i, (name, extra)) in caps.iter().enumerate() {
        let (rate, rss) = backlog_run(&kafka, &dir, &format!("backlog{i}"), extra, &backlog).await;
        println!("  {name:<44} {rate:>8.0} rows/s end to end, writer peak RSS {rss:>5.0} MiB");
    }
    drop(broker);
}
