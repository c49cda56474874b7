//! One turn of the flywheel on the real chat model, in process: serve the
//! base model to the simulated users, train an adapter on their feedback,
//! and compare expected accept rates on held-out prompts. For tuning the
//! chat product's training settings.
//! `chat_learn MODEL_DIR [SERVED] [STEPS] [LR] [RANK] [BATCH] [OBJECTIVE] [KL]`
//! (OBJECTIVE: reinforce | kto | sft; env REJECT_REWARD, POS_SHARE, EVAL_EVERY,
//! EVAL_N, PRODUCT_SEED, PPO_CLIP, REJECT_FLOOR; LAKE=dir trains on a lake's base-served rows instead, LAKE_FIRST=n
//! on the first n of them). Served examples are cached in
//! `$TMPDIR/chat_learn_examples.json` between runs.

#![allow(clippy::print_stdout)]

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use flywheel_cli::chat_product::PROMPTS;
use flywheel_cli::simulate::{ProductKind, Server, react};
use flywheel_trainer::SplitMix;
use flywheel_trainer::backend::{Backend, CpuBackend};
use flywheel_trainer::cpu::gemm::PrecisionChoice;
use flywheel_trainer::lora::LoraAdapter;
use flywheel_trainer::model::Model;
use flywheel_trainer::objective::Example;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let dir = Path::new(&a[1]);
    let arg = |i: usize, d: f64| a.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (served, steps, lr, rank, batch) =
        (arg(2, 800.0) as usize, arg(3, 60.0) as i32, arg(4, 1e-3), arg(5, 8.0) as i32, arg(6, 16.0) as i32);
    let root = dir.parent().unwrap();
    let name = dir.file_name().unwrap().to_str().unwrap();
    let server = Server::load(root, name, ProductKind::Chat).unwrap();
    let product = {
        use clap::Parser;
        #[derive(Parser)]
        struct W {
            #[command(flatten)]
            p: flywheel_cli::simulate::ProductArgs,
        }
        let seed = std::env::var("PRODUCT_SEED").unwrap_or_else(|_| "7".into());
        W::parse_from(["x", "--seed", seed.as_str()]).p
    };
    let users = server.population(&product);
    let tokens = server.completion_tokens(&product);
    // Even prompts train, odd prompts are held out.
    let train_q: Vec<&str> = PROMPTS.iter().step_by(2).copied().collect();
    let test_q: Vec<&str> = PROMPTS.iter().skip(1).step_by(2).copied().collect();
    let mut rng = SplitMix(11);
    let cache = std::env::temp_dir().join(format!("chat_learn_examples_{served}_{}.json", product.seed));
    let t = Instant::now();
    let lake = std::env::var("LAKE").ok();
    let mut examples: Vec<Example> = if let Some(lake) = &lake {
        lake_examples(Path::new(lake), &server.tokenizer)
    } else if let Ok(bytes) = std::fs::read(&cache) {
        let rows: Vec<(Vec<u32>, usize, f64, bool, f64)> = serde_json::from_slice(&bytes).unwrap();
        rows.into_iter()
            .map(|(tokens, prompt_len, reward, accepted, lp)| Example {
                tokens,
                prompt_len,
                reward,
                accepted,
                behavior_logprob: Some(lp),
            })
            .collect()
    } else {
        let asked: Vec<&str> = (0..served).map(|i| train_q[i % train_q.len()]).collect();
        let requests: Vec<(String, Option<Arc<LoraAdapter>>, u64)> =
            asked.iter().map(|q| (server.prompt(q).unwrap(), None, rng.next_u64())).collect();
        let done = server.complete_batch(&requests, tokens).unwrap();
        println!("served {served} in {:.1} s", t.elapsed().as_secs_f64());
        let mut examples = Vec::new();
        for (i, ((prompt, _, _), c)) in requests.iter().zip(&done).enumerate() {
            let user = &users[rng.below(users.len() as u64) as usize];
            let o = react(server.accept_probability(user, asked[i], c, &product), &c.shown, &product, &mut rng);
            examples.push(server.example(prompt, c, o.accepted).unwrap());
        }
        let rows: Vec<(&Vec<u32>, usize, f64, bool, f64)> = examples
            .iter()
            .map(|e| (&e.tokens, e.prompt_len, e.reward, e.accepted, e.behavior_logprob.unwrap_or(0.0)))
            .collect();
        std::fs::write(&cache, serde_json::to_vec(&rows).unwrap()).unwrap();
        examples
    };
    if let Some(first) = std::env::var("LAKE_FIRST").ok().and_then(|v| v.parse::<usize>().ok()) {
        examples.truncate(first);
    }
    // REJECT_REWARD: the reward of a rejected answer (default -0.25), to probe
    // how hard pushing rejected answers down may go before the adapter babbles.
    if let Some(r) = std::env::var("REJECT_REWARD").ok().and_then(|v| v.parse::<f64>().ok()) {
        examples.iter_mut().filter(|e| !e.accepted).for_each(|e| e.reward = r);
    }
    println!("accepted {}/{}", examples.iter().filter(|e| e.accepted).count(), examples.len());
    let model = Model::load(dir).unwrap();
    let mut objective = flywheel_trigger::service::default_objective(1);
    objective.lora_rank = rank;
    objective.lora_alpha = 2.0 * rank as f64;
    objective.target_modules =
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].map(String::from).into();
    objective.learning_rate = lr;
    objective.max_steps = steps;
    objective.batch_size = batch;
    objective.warmup_steps = 5;
    objective.kl_coef = arg(8, 0.0);
    objective.ppo_clip = std::env::var("PPO_CLIP").ok().and_then(|v| v.parse().ok());
    objective.reject_floor = std::env::var("REJECT_FLOOR").ok().and_then(|v| v.parse().ok());
    objective.kind = match a.get(7).map(String::as_str) {
        Some("kto") => flywheel_core::records::ObjectiveKind::Kto,
        Some("sft") => flywheel_core::records::ObjectiveKind::Sft,
        _ => flywheel_core::records::ObjectiveKind::Reinforce,
    };
    let targets: Vec<&str> = objective.target_modules.iter().map(String::as_str).collect();
    let lora = LoraAdapter::init(&model.config, rank as usize, objective.lora_alpha, &targets, 1).unwrap();
    let mut backend = CpuBackend::new(&model, PrecisionChoice::Auto, lora, 0.0).unwrap();
    drop(model);
    let every: i32 = std::env::var("EVAL_EVERY").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let eval_n: usize = std::env::var("EVAL_N").ok().and_then(|v| v.parse().ok()).unwrap_or(96);
    let evaluate = |label: &str, adapter: Option<Arc<LoraAdapter>>| {
        let reqs: Vec<(String, Option<Arc<LoraAdapter>>, u64)> = (0..eval_n)
            .map(|i| (server.prompt(test_q[i % test_q.len()]).unwrap(), adapter.clone(), 9000 + i as u64))
            .collect();
        let out = server.complete_batch(&reqs, tokens).unwrap();
        let p: f64 = out
            .iter()
            .enumerate()
            .map(|(i, c)| server.accept_probability(&users[i % users.len()], test_q[i % test_q.len()], c, &product))
            .sum::<f64>()
            / out.len() as f64;
        let brief =
            out.iter().filter(|c| flywheel_cli::chat_product::Property::Brief.holds(&c.shown, c.finished)).count();
        println!(
            "{label}: expected accept {p:.3}, brief {brief}/{eval_n}; e.g. {:?} | {:?} | {:?}",
            out[0].shown, out[1].shown, out[2].shown
        );
    };
    evaluate("base", None);
    let probe = &examples[..examples.len().min(96)];
    let probe_base = backend.completion_logprobs(probe, None).unwrap();
    let probe_tokens: usize = probe.iter().map(|e| e.tokens.len() - e.prompt_len).sum();
    let t = Instant::now();
    let mut done = 0;
    while done < steps {
        let mut chunk = objective.clone();
        chunk.max_steps = every.min(steps - done);
        // One schedule over all steps would need the step offset; a constant
        // rate after warm-up is what these probes compare.
        chunk.warmup_steps = if done == 0 { chunk.warmup_steps } else { 0 };
        let offset = (done * batch) as usize % examples.len();
        let rotated: Vec<Example> = examples[offset..].iter().chain(&examples[..offset]).cloned().collect();
        let share: f64 = std::env::var("POS_SHARE").ok().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        flywheel_trainer::job::train_steps_with(&mut backend, &rotated, &chunk, share, &mut |p| {
            if p.step == chunk.max_steps as u64 {
                println!("step {} loss {:.3} {:.0} tok/s", done as u64 + p.step, p.loss, p.tokens_per_second());
            }
        })
        .unwrap();
        done += chunk.max_steps;
        // KL(base ‖ adapter) per token on logged answers, as the trainer
        // reports it for its holdout (here: 96 of the training answers).
        let lora = backend.adapter().unwrap();
        let with = backend.completion_logprobs(probe, Some(&lora)).unwrap();
        let kl = probe_base.iter().zip(&with).map(|(b, a)| b - a).sum::<f64>() / probe_tokens as f64;
        println!("KL(base || adapter) on logged answers: {kl:.3} nats/token");
        evaluate(&format!("after {done} steps ({:.0} s)", t.elapsed().as_secs_f64()), Some(Arc::new(lora)));
    }
}

/// The base-served examples of every file committed to the lake at `root`
/// (its Delta log: no uncommitted file, no compaction input twice), in
/// suggestion-id order (served order for the simulator), as the trainer
/// service reads them.
fn lake_examples(root: &Path, tokenizer: &flywheel_trainer::tokenize::TextTokenizer) -> Vec<Example> {
    use arrow_array::{Array, cast::AsArray};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let lake = flywheel_lake::open_lake(&root.display().to_string(), runtime.handle().clone()).unwrap();
    let mut rows = Vec::new();
    for file in lake.files().unwrap() {
        let bytes = lake.storage().get(&file.path).unwrap().expect("a committed file is missing");
        for batch in flywheel_lake::shard::read_file(bytes).unwrap() {
            let ids = batch.column_by_name("suggestion_id").unwrap().as_string::<i32>().clone();
            let version = batch.column_by_name("adapter_version").unwrap().clone();
            let by_base: std::collections::HashSet<String> =
                (0..batch.num_rows()).filter(|&i| version.is_null(i)).map(|i| ids.value(i).to_string()).collect();
            let examples = flywheel_trainer::job::examples_of(&batch, tokenizer, 512).unwrap();
            rows.extend(examples.into_iter().filter(|(id, _)| by_base.contains(id)));
        }
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows.into_iter().map(|(_, e)| e).collect()
}
