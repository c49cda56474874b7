//! A training job end to end on the CPU: rewards committed to a real lake by
//! the lake writer's path, a train request pinning those shards, the tiny
//! checkpoint; the job must learn the preference in the data (holdout
//! implicit-reward accuracy), write a loadable PEFT adapter, be
//! deterministic, and refuse a shard whose content hash differs.

use flywheel_core::codec::encode;
use flywheel_core::records::{HoldoutRule, ObjectiveKind, Outcome, Reward, ShardRef, TrainRequest};
use flywheel_lake::parquet::{ParquetSettings, RewardSchemas};
use flywheel_tests::{commit_records, with_lake, workspace_root};
use flywheel_trainer::backend::Device;
use flywheel_trainer::cpu::gemm::PrecisionChoice;
use flywheel_trainer::job::{JobSettings, run_job};
use flywheel_trainer::lora::LoraAdapter;
use flywheel_trainer::model::Model;

/// Accepted suggestions repeat the prompt's last letter; rejected ones do not.
fn reward(i: usize) -> Reward {
    let fixture = workspace_root().join("schemas/fixtures/reward.accepted.json");
    let mut r: Reward = serde_json::from_slice(&std::fs::read(fixture).unwrap()).unwrap();
    let letter = (b'a' + (i % 20) as u8) as char;
    let accepted = i.is_multiple_of(2);
    r.reward_id = format!("r{i}");
    r.suggestion_id = format!("sugg-{i:04}");
    r.tenant = "acme".into();
    r.prompt = format!("say {letter}");
    r.completion = if accepted {
        format!("{letter}{letter}{letter}")
    } else {
        let shift = |d: u8| ((letter as u8 - b'a' + d) % 26 + b'a') as char;
        format!("{}{}{}", shift(3), shift(1), shift(4))
    };
    r.outcome = if accepted { Outcome::Accepted } else { Outcome::Rejected };
    r.reward = if accepted { 0.75 } else { -0.25 };
    r.behavior_logprob = None;
    r
}

fn request(shards: &[ShardRef], id: &str) -> TrainRequest {
    let shards = shards.to_vec();
    let mut objective = flywheel_trigger::service::default_objective(1);
    objective.kind = ObjectiveKind::Kto;
    objective.lora_rank = 4;
    objective.lora_alpha = 8.0;
    objective.target_modules = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"].map(String::from).into();
    objective.learning_rate = 2e-2;
    objective.warmup_steps = 3;
    objective.max_steps = 40;
    objective.batch_size = 16;
    TrainRequest {
        request_id: id.into(),
        tenant: "acme".into(),
        base_model: "flywheel/tiny".into(),
        parent_adapter_version: None,
        shards,
        window_start: 0,
        window_end: 0,
        objective,
        holdout: HoldoutRule { salt: "acme/flywheel/tiny/holdout-v1".into(), fraction: 0.25 },
        policy_version: "test".into(),
        created_at: 0,
    }
}

/// A temp dir with the tiny model under `models/flywheel/tiny` and a lake of
/// 96 toy rewards under `lake`, and the shards that commit added.
fn fixture() -> (tempfile::TempDir, std::path::PathBuf, Vec<ShardRef>) {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    flywheel_trainer::tiny::save(&flywheel_trainer::tiny::tiny_model(3).unwrap(), &models.join("flywheel/tiny"))
        .unwrap();
    let records: Vec<Vec<u8>> = (0..96).map(|i| encode(&reward(i)).unwrap()).collect();
    let schemas = RewardSchemas::released().unwrap();
    let shards = with_lake(&dir.path().join("lake"), |lake| {
        assert!(commit_records(lake, &ParquetSettings::default(), &records, 0, &schemas).is_empty());
        let commit = lake.commit(lake.version().unwrap()).unwrap().expect("the lake's commit");
        commit
            .added
            .iter()
            .map(|f| ShardRef {
                shard_id: f.path.rsplit('/').next().unwrap().trim_end_matches(".parquet").into(),
                uri: f.path.clone(),
                lake_root: lake.storage().url(),
                content_sha256: f.sha256.clone(),
                rows: f.rows as i64,
                table_version: Some(commit.seq as i64),
            })
            .collect()
    });
    (dir, models, shards)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_learns_the_preference_writes_a_peft_adapter_and_checks_shard_hashes() {
    let (dir, models, shards) = fixture();
    let settings = JobSettings {
        models_root: models.clone(),
        adapters_root: dir.path().join("adapters"),
        max_tokens: 64,
        device: Device::Cpu,
        cpu_precision: PrecisionChoice::F32,
    };
    let runtime = tokio::runtime::Handle::current();

    let req = request(&shards, "req-1");
    let mut seen = Vec::new();
    let (candidate, adapter_dir) =
        tokio::task::block_in_place(|| run_job(&req, &settings, &runtime, &mut |p| seen.push(*p))).unwrap();
    // Progress is reported once per step, with throughput and a falling ETA.
    assert_eq!(seen.iter().map(|p| p.step).collect::<Vec<_>>(), (1..=40).collect::<Vec<_>>());
    assert!(seen.windows(2).all(|w| w[1].tokens > w[0].tokens && w[1].elapsed >= w[0].elapsed));
    assert_eq!(seen.last().unwrap().tokens, candidate.tokens);
    assert!(seen.iter().all(|p| p.tokens_per_second() > 0.0 && p.loss.is_finite()));
    assert_eq!(seen.last().unwrap().eta(), std::time::Duration::ZERO);
    let accuracy = candidate.candidate_metrics["implicit_reward_accuracy"];
    assert_eq!(candidate.parent_metrics["implicit_reward_accuracy"], 0.5, "the parent is the base");
    assert!(accuracy > 0.8, "holdout implicit-reward accuracy {accuracy}");
    assert_eq!(candidate.train_examples + candidate.holdout_examples, 96);
    assert!(candidate.holdout_examples > 10, "{}", candidate.holdout_examples);
    assert_eq!(candidate.parent_metrics["kl_to_base_per_token"], 0.0, "a fresh adapter is the base");
    assert!(candidate.candidate_metrics["kl_to_base_per_token"].abs() > 1e-3, "training moved the policy");
    // The adapter is a PEFT directory that loads and matches the recorded hash.
    let model = Model::load(&models.join("flywheel/tiny")).unwrap();
    let adapter = LoraAdapter::load_peft(&adapter_dir, &model.config).unwrap();
    assert_eq!((adapter.rank, adapter.alpha), (4, 8.0));
    let bytes = std::fs::read(adapter_dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(candidate.adapter_sha256, flywheel_core::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes)));
    assert!(adapter_dir.join("metrics.json").exists());

    // The same request again: the same adapter, bit for bit.
    let (again, _) = tokio::task::block_in_place(|| run_job(&req, &settings, &runtime, &mut |_| {})).unwrap();
    assert_eq!(
        (again.adapter_version, again.adapter_sha256),
        (candidate.adapter_version.clone(), candidate.adapter_sha256)
    );

    // A shard whose bytes differ from the pinned hash: refused, nothing written.
    let mut tampered = request(&shards, "req-2");
    tampered.shards[0].content_sha256 = "0".repeat(64);
    let err = tokio::task::block_in_place(|| run_job(&tampered, &settings, &runtime, &mut |_| {})).unwrap_err();
    assert_eq!(err.reason_code(), "shard_hash_mismatch", "{err}");
    let err = err.to_string();
    assert!(err.contains("the request pins"), "{err}");
    // A shard pinned to a table version whose snapshot does not hold it
    // (version 0 is the table's creation, before any file): refused.
    let mut unpinned = request(&shards, "req-3");
    unpinned.shards[0].table_version = Some(0);
    let err = tokio::task::block_in_place(|| run_job(&unpinned, &settings, &runtime, &mut |_| {})).unwrap_err();
    assert_eq!(err.reason_code(), "shard_not_in_commit", "{err}");
    let err = err.to_string();
    assert!(err.contains("is not in table version 0"), "{err}");
    let written: Vec<_> = std::fs::read_dir(dir.path().join("adapters/acme")).unwrap().collect();
    assert_eq!(written.len(), 1, "only the first request's adapter exists");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_publishes_one_candidate_per_request_and_dead_letters_bad_ones() {
    use clap::Parser;
    use flywheel_core::kafka::ClientRole;
    use flywheel_core::records::{DeadLetter, ModelCandidate};
    use flywheel_core::topics::Topic;
    use flywheel_tests::{read_all, service_args, test_topics, unique_topic};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use std::time::{Duration, Instant};

    let (dir, models, shards) = fixture();
    let wanted = [Topic::TrainRequests, Topic::ModelCandidates, Topic::DeadLetters];
    let test = test_topics("trainer", &wanted, None).await;
    let (kafka, topics) = (&test.kafka, &test.topics);
    let mut good = request(&shards, "req-good");
    good.objective.max_steps = 5;
    let mut tampered = request(&shards, "req-tampered");
    tampered.shards[0].content_sha256 = "0".repeat(64);
    let producer: FutureProducer = kafka.client_config(&ClientRole::Producer).unwrap().create().unwrap();
    for r in [&good, &tampered] {
        let bytes = encode(r).unwrap();
        let to = topics.name(Topic::TrainRequests);
        producer.send(FutureRecord::to(&to).key(&r.request_id).payload(&bytes), Duration::from_secs(30)).await.unwrap();
    }
    let start = |group: &str| {
        let (models, adapters) = (models.display().to_string(), dir.path().join("adapters").display().to_string());
        let extra = ["--kafka-session-timeout-ms", "6000", "--group-id", group, "--models-root", &models];
        let args = service_args("flywheel-trainer", &test, &[&extra[..], &["--adapters-root", &adapters]].concat());
        let config = flywheel_trainer::Config::try_parse_from(args).unwrap();
        let token = tokio_util::sync::CancellationToken::new();
        let t = token.clone();
        (token, tokio::spawn(async move { flywheel_trainer::run(config, t).await.unwrap() }))
    };
    let candidates = || -> Vec<ModelCandidate> {
        read_all::<ModelCandidate>(kafka, &topics.name(Topic::ModelCandidates)).into_iter().map(|r| r.2).collect()
    };
    let dead = || -> Vec<DeadLetter> {
        read_all::<DeadLetter>(kafka, &topics.name(Topic::DeadLetters)).into_iter().map(|r| r.2).collect()
    };
    let group = unique_topic("trainer-group");
    let (stop, task) = start(&group);
    let deadline = Instant::now() + Duration::from_secs(120);
    while (candidates().is_empty() || dead().is_empty()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let got = candidates();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].request_id, "req-good");
    // "cpu" (f32 base), "cpu-bf16" or "cpu-bf16-weights", as `--cpu-precision auto` chose for this CPU.
    assert_eq!(got[0].steps, 5);
    assert!(["cpu", "cpu-bf16", "cpu-bf16-weights"].contains(&got[0].device.as_str()), "{}", got[0].device);
    let letters = dead();
    assert_eq!(letters.len(), 1);
    assert_eq!((letters[0].service.as_str(), letters[0].reason_code.as_str()), ("trainer", "shard_hash_mismatch"));
    assert!(letters[0].reason.contains("the request pins"), "{}", letters[0].reason);
    stop.cancel();
    task.await.unwrap();

    // A fresh group re-reads every request: the trained one is skipped.
    let (stop, task) = start(&unique_topic("trainer-group-2"));
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(candidates().len(), 1, "a request was trained twice");
    stop.cancel();
    task.await.unwrap();
}

/// `flywheel train` in separate processes (the rayon pool's size is read
/// once per process): 1 and 2 threads give the same adapter bytes, in f32,
/// in bf16 and with bf16-stored weights.
#[test]
fn flywheel_train_gives_the_same_adapter_bytes_on_one_and_two_threads() {
    let (dir, models, shards) = fixture();
    let mut req = request(&shards, "req-threads");
    req.objective.max_steps = 6;
    let request_file = dir.path().join("request.json");
    std::fs::write(&request_file, serde_json::to_vec(&req).unwrap()).unwrap();
    let run = |threads: &str, precision: &str| -> (serde_json::Value, Vec<u8>) {
        let adapters = dir.path().join(format!("adapters-{threads}-{precision}"));
        let out = std::process::Command::new(flywheel_tests::workspace_binary("flywheel"))
            .args(["train", "--request-file", &request_file.display().to_string()])
            .args(["--models-root", &models.display().to_string()])
            .args(["--adapters-root", &adapters.display().to_string(), "--max-tokens", "64"])
            .args(["--cpu-precision", precision])
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let candidate: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let uri = candidate["adapter_uri"].as_str().unwrap().to_string();
        assert!(uri.starts_with(&adapters.display().to_string()), "{uri}");
        (candidate, std::fs::read(std::path::Path::new(&uri).join("adapter_model.safetensors")).unwrap())
    };
    for precision in ["f32", "bf16", "bf16-weights"] {
        let (one, one_bytes) = run("1", precision);
        let (two, two_bytes) = run("2", precision);
        assert_eq!(one["steps"], 6);
        assert_eq!(one["request_id"], "req-threads");
        assert!(one_bytes == two_bytes, "{precision}: adapters differ between 1 and 2 threads");
        assert_eq!(one["adapter_sha256"], two["adapter_sha256"]);
        assert_eq!(one["candidate_metrics"], two["candidate_metrics"]);
    }
}

/// SIGTERM to the trainer binary in the middle of a job: it exits cleanly
/// well within its drain timeout (the job stops before its next step),
/// publishes nothing for the request and does not commit it, so the next
/// instance of the group picks the same request up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_job_exits_within_the_drain_timeout_and_the_request_stays_pending() {
    use flywheel_core::kafka::ClientRole;
    use flywheel_core::records::{DeadLetter, ModelCandidate};
    use flywheel_core::topics::Topic;
    use flywheel_tests::{
        Reaped, metric, ops_get, read_all, service_args, terminate_within, test_topics, unique_topic,
    };
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use std::time::{Duration, Instant};

    const DRAIN_TIMEOUT_SECS: u64 = 30;
    let (dir, models, shards) = fixture();
    let wanted = [Topic::TrainRequests, Topic::ModelCandidates, Topic::DeadLetters];
    let test = test_topics("trainer-term", &wanted, None).await;
    let (kafka, topics) = (&test.kafka, &test.topics);
    // Far more steps than the test lets it run: it is always mid-job when signalled.
    let mut long = request(&shards, "req-long");
    long.objective.max_steps = 1_000_000;
    let producer: FutureProducer = kafka.client_config(&ClientRole::Producer).unwrap().create().unwrap();
    let bytes = encode(&long).unwrap();
    let to = topics.name(Topic::TrainRequests);
    producer.send(FutureRecord::to(&to).key("req-long").payload(&bytes), Duration::from_secs(30)).await.unwrap();

    let group = unique_topic("trainer-term-group");
    let spawn = || {
        let ops = flywheel_devkit::free_local_addr().unwrap();
        let (models, adapters) = (models.display().to_string(), dir.path().join("adapters").display().to_string());
        let drain = DRAIN_TIMEOUT_SECS.to_string();
        let extra = [
            ["--group-id", group.as_str()],
            ["--models-root", &models],
            ["--adapters-root", &adapters],
            ["--drain-timeout-secs", &drain],
            ["--kafka-session-timeout-ms", "6000"],
        ]
        .concat();
        let mut args = service_args("flywheel-trainer", &test, &extra);
        let at = args.iter().position(|a| a == "--ops-listen").unwrap() + 1;
        args[at] = ops.to_string();
        let child = std::process::Command::new(flywheel_tests::workspace_binary("flywheel-trainer"))
            .args(&args[1..])
            .spawn()
            .unwrap();
        (Reaped(child), ops)
    };
    // Busy: a job runs and has made progress.
    let busy = |ops: std::net::SocketAddr| async move {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (_, exposed) = ops_get(ops, "/metrics").await;
            let step = metric(&exposed, "trainer_job_step").unwrap_or_default();
            if metric(&exposed, "trainer_busy") == Some(1.0) && step >= 1.0 {
                return;
            }
            assert!(Instant::now() < deadline, "the trainer never got busy: {exposed}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let stop_within_drain = |mut child: Reaped| {
        let status = terminate_within(&mut child, DRAIN_TIMEOUT_SECS);
        assert!(status.success(), "the trainer did not exit cleanly on SIGTERM: {status}");
    };

    let (first, ops) = spawn();
    busy(ops).await;
    tokio::task::block_in_place(|| stop_within_drain(first));
    let candidates = read_all::<ModelCandidate>(kafka, &topics.name(Topic::ModelCandidates));
    let letters = read_all::<DeadLetter>(kafka, &topics.name(Topic::DeadLetters));
    assert!(candidates.is_empty() && letters.is_empty(), "a stopped job publishes nothing: {candidates:?} {letters:?}");
    assert!(!dir.path().join("adapters/acme").exists(), "a stopped job writes no adapter");

    // The request was not committed: the group's next member trains it again.
    let (second, ops) = spawn();
    busy(ops).await;
    tokio::task::block_in_place(|| stop_within_drain(second));
}
