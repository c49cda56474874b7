//! The whole flywheel, end to end on the real broker: `flywheel up` runs
//! every service as a process and the simulated product against them. With
//! a fixed seed the product must get measurably better with use: a trained
//! adapter is promoted because the gate's always-valid test finds it better
//! than the base, and it traces back through its candidate, train request
//! and shards to the events users sent. Then, after a restart of the whole
//! system, a deliberately degraded candidate (the promoted adapter trained
//! further on inverted rewards) is rolled back during its canary.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use flywheel_core::codec::encode;
use flywheel_core::kafka::ClientRole;
use flywheel_core::records::{
    Interaction, ModelCandidate, RegistryEntry, ReleaseAction, RewardMetrics, ShardManifest, TrainRequest,
};
use flywheel_core::topics::Topic;
use flywheel_gate::sequential::{Moments, msprt};
use flywheel_tests::{flywheel_up, read_all, test_topics, wait_until};
use flywheel_trainer::backend::{Backend, CpuBackend};
use flywheel_trainer::cpu::gemm::PrecisionChoice;
use flywheel_trainer::job::{examples_of, train_steps};
use flywheel_trainer::lora::LoraAdapter;
use flywheel_trainer::model::Model;
use flywheel_trainer::tokenize::TextTokenizer;
use rdkafka::producer::{FutureProducer, FutureRecord};

fn sha256(bytes: &[u8]) -> String {
    flywheel_core::hex(&<sha2::Sha256 as sha2::Digest>::digest(bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_product_gets_better_with_use_and_a_degraded_candidate_is_rolled_back() {
    let test = test_topics("loop", &Topic::ALL, None).await;
    let (kafka, topics, dir) = (test.kafka.clone(), test.topics.clone(), test.dir.to_path_buf());
    let work = dir.join("work");
    let registry = || -> Vec<RegistryEntry> {
        read_all::<RegistryEntry>(&kafka, &topics.name(Topic::ModelRegistry)).into_iter().map(|r| r.2).collect()
    };
    let latest = || registry().into_iter().max_by_key(|e| e.revision);

    // Run until one version is promoted (bounded by the duration).
    let mut child = flywheel_up(&test, &work, &["--stop-after-promotions", "1", "--duration-s", "420"]);
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "flywheel up failed: {status}");

    let entry = latest().expect("the gate wrote the registry");
    let promoted = entry.history.iter().find(|d| d.action == ReleaseAction::Promoted).expect("a promotion");
    let s = &promoted.statistics;
    assert!(s["mean_reward_p_value"] <= s["alpha"], "{}", promoted.reason);
    assert!(s["mean_reward_difference"] > 0.0, "{}", promoted.reason);
    let (canary, control) = (s["canary_accept_rate"], s["control_accept_rate"]);
    assert!(canary > control, "accept rate {control:.3} (base) -> {canary:.3} (promoted): {}", promoted.reason);
    let live = entry.live.clone().expect("a live adapter");
    assert_eq!(live.adapter_version, promoted.adapter_version);
    // Lineage: adapter -> candidate -> train request -> shards -> events.
    let candidates: Vec<ModelCandidate> =
        read_all(&kafka, &topics.name(Topic::ModelCandidates)).into_iter().map(|r| r.2).collect();
    let candidate = candidates.iter().find(|c| c.adapter_version == live.adapter_version).expect("its candidate");
    let weights = std::fs::read(Path::new(&live.adapter_uri).join("adapter_model.safetensors")).unwrap();
    assert_eq!(sha256(&weights), candidate.adapter_sha256, "the released file is the trained one");
    assert_eq!(live.adapter_sha256, candidate.adapter_sha256);
    let requests: Vec<TrainRequest> =
        read_all(&kafka, &topics.name(Topic::TrainRequests)).into_iter().map(|r| r.2).collect();
    let request = requests.iter().find(|r| r.request_id == candidate.request_id).expect("its train request");
    assert_eq!(request.parent_adapter_version, None, "the first release is trained from the base");
    let manifests: Vec<ShardManifest> =
        read_all(&kafka, &topics.name(Topic::Shards)).into_iter().map(|r| r.2).collect();
    let sent: HashSet<String> = read_all::<Interaction>(&kafka, &topics.name(Topic::Interactions))
        .into_iter()
        .map(|r| r.2.suggestion_id)
        .collect();
    // The pinned rows, also kept as training examples with every reward
    // inverted for the degraded candidate below.
    let model_dir = work.join("models/flywheel/tiny");
    let model = Arc::new(Model::load(&model_dir).unwrap());
    let tokenizer = TextTokenizer::load(&model_dir, model.config.vocab_size).unwrap();
    let mut inverted = Vec::new();
    let mut rows = 0;
    for shard in &request.shards {
        assert!(manifests.iter().any(|m| m.shard_id == shard.shard_id), "shard {} was announced", shard.shard_id);
        let bytes = std::fs::read(work.join("lake").join(&shard.uri)).unwrap();
        assert_eq!(sha256(&bytes), shard.content_sha256, "shard {} is as pinned", shard.shard_id);
        for batch in flywheel_lake::shard::read_file(bytes).unwrap() {
            for (_, mut e) in examples_of(&batch, &tokenizer, 256).unwrap() {
                (e.reward, e.accepted) = (-e.reward, !e.accepted);
                inverted.push(e);
            }
            let ids = batch.column_by_name("suggestion_id").unwrap();
            let ids = arrow_array::cast::AsArray::as_string::<i32>(ids.as_ref());
            for id in ids.iter().flatten() {
                assert!(sent.contains(id), "{id} in the lake was sent by the product");
                rows += 1;
            }
        }
    }
    assert!(rows as i64 >= 600 && rows as i64 == request.shards.iter().map(|s| s.rows).sum::<i64>());

    // A degraded candidate: the live adapter trained further on the same
    // pinned shards with every reward inverted (what a sign error in a
    // reward function would ship), with offline numbers that pass, so only
    // the canary can catch it. The whole system restarts first, with
    // training frozen; a canary started before the stop is let finish, so
    // the degraded candidate's parent is the live adapter when the gate
    // reads it (else it is rejected as stale). Settled: every train request
    // trained, every candidate decided, no canary running (the demo policy
    // ends one within 300 s at the latest).
    let mut child = flywheel_up(&test, &work, &["--duration-s", "900", "--freeze-training"]);
    let settled = || -> Option<flywheel_core::records::AdapterRef> {
        let e = latest()?;
        let requests: Vec<TrainRequest> =
            read_all(&kafka, &topics.name(Topic::TrainRequests)).into_iter().map(|r| r.2).collect();
        let candidates: Vec<ModelCandidate> =
            read_all(&kafka, &topics.name(Topic::ModelCandidates)).into_iter().map(|r| r.2).collect();
        let trained = requests.iter().all(|r| candidates.iter().any(|c| c.request_id == r.request_id));
        let decided = candidates.iter().all(|c| e.history.iter().any(|d| d.adapter_version == c.adapter_version));
        if e.canary.is_none() && trained && decided { e.live } else { None }
    };
    let live = tokio::task::block_in_place(|| wait_until(420, settled));
    // The gate promoted on mean reward. The live adapter's accept rate must
    // be measurably higher than the base's too: the gate's own always-valid
    // test, on every suggestion the rewarder counted for each version. A
    // promotion can come after the minimum of 150 suggestions per arm, too
    // few for this second test to have power, so the restarted system
    // serves the live adapter until it has shown 1,000.
    const MIN_SHOWN_LIVE: i64 = 1_000;
    let accept_counts = || {
        let (mut base, mut adapted) = ((0, 0), (0, 0));
        for (_, _, m) in read_all::<RewardMetrics>(&kafka, &topics.name(Topic::RewardMetrics)) {
            if m.window_end - m.window_start != 10_000 {
                continue; // `flywheel up` has the rewarder publish 10 s windows only
            }
            let arm = match m.adapter_version.as_deref() {
                None => &mut base,
                Some(v) if v == live.adapter_version => &mut adapted,
                Some(_) => continue,
            };
            *arm = (arm.0 + m.accepted, arm.1 + m.shown);
        }
        (base, adapted)
    };
    // 600 s: beside the real-model test in `make test`, 1,000 suggestions
    // once took more than 300 s (the whole test then stood at 747 s, under
    // its 20-minute limit).
    let (base, adapted) = tokio::task::block_in_place(|| {
        wait_until(600, || Some(accept_counts()).filter(|(_, a)| a.1 >= MIN_SHOWN_LIVE))
    });
    let policy = flywheel_gate::policy::ReleasePolicy::default();
    let look =
        msprt(&Moments::bernoulli(adapted.0, adapted.1), &Moments::bernoulli(base.0, base.1), policy.accept_rate_tau);
    assert!(
        look.difference > 0.0 && look.significant(policy.alpha),
        "accept rate base {base:?} vs live {adapted:?} (accepted, shown): difference {:.3}, p = {:.4}",
        look.difference,
        look.p_value
    );
    eprintln!(
        "accept rate base {base:?} vs live {adapted:?}: difference {:.3}, p = {:.2e}",
        look.difference, look.p_value
    );
    let adapter = LoraAdapter::load_peft(Path::new(&live.adapter_uri), &model.config).unwrap();
    let mut backend = CpuBackend::new(&model, PrecisionChoice::F32, adapter, 0.0).unwrap();
    let mut objective = request.objective.clone(); // the demo's REINFORCE settings
    // 40 steps once left it only a little worse than the live adapter
    // (0.200 vs 0.227 accepted), undecided when the test stopped waiting.
    objective.max_steps = 80;
    let bad = tokio::task::block_in_place(|| {
        train_steps(&mut backend, &inverted, &objective, &mut |_| {}).unwrap();
        backend.adapter().unwrap()
    });
    let bad_dir = work.join("adapters/demo/degraded");
    bad.save_peft(&bad_dir, &model.config, "flywheel/tiny").unwrap();
    let mut degraded = candidate.clone();
    degraded.adapter_version = "degraded".into();
    degraded.request_id = "hand-made-degraded".into();
    degraded.parent_adapter_version = Some(live.adapter_version.clone());
    degraded.adapter_uri = bad_dir.display().to_string();
    degraded.adapter_sha256 = sha256(&std::fs::read(bad_dir.join("adapter_model.safetensors")).unwrap());
    degraded.kl_to_parent = 0.1;
    degraded.candidate_metrics.insert("implicit_reward_accuracy".into(), 0.9);
    degraded.parent_metrics.insert("implicit_reward_accuracy".into(), 0.5);
    let producer: FutureProducer = kafka.client_config(&ClientRole::Producer).unwrap().create().unwrap();
    let bytes = encode(&degraded).unwrap();
    producer
        .send(
            FutureRecord::to(&topics.name(Topic::ModelCandidates)).key("demo/flywheel/tiny").payload(&bytes),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let verdict = tokio::task::block_in_place(|| {
        wait_until(280, || {
            latest().and_then(|e| {
                e.history
                    .into_iter()
                    .rev()
                    .find(|d| d.adapter_version == "degraded" && d.action != ReleaseAction::CanaryStarted)
            })
        })
    });
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "flywheel up stops cleanly on SIGTERM: {status}");
    assert_eq!(verdict.action, ReleaseAction::RolledBack, "{}", verdict.reason);
    let after = latest().unwrap();
    assert_eq!(after.live.unwrap().adapter_version, live.adapter_version, "the good adapter stays live");
}
