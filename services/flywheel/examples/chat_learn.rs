//! One turn of the flywheel on the real chat model, in process: serve the
//! base model to the simulated users, train an adapter on their feedback,
//! and compare expected accept rates on held-out prompts. For tuning the
//! chat product's training settings.
//! `chat_learn MODEL_DIR [SERVED] [STEPS] [LR] [RANK] [BATCH]`.

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
        W::parse_from(["x"]).p
    };
    let users = server.population(&product);
    let tokens = server.completion_tokens(&product);
    // Even prompts train, odd prompts are held out.
    let train_q: Vec<&str> = PROMPTS.iter().step_by(2).copied().collect();
    let test_q: Vec<&str> = PROMPTS.iter().skip(1).step_by(2).copied().collect();
    let mut rng = SplitMix(11);
    let t = Instant::now();
    let asked: Vec<&str> = (0..served).map(|i| train_q[i % train_q.len()]).collect();
    let requests: Vec<(String, Option<Arc<LoraAdapter>>, u64)> =
        asked.iter().map(|q| (server.prompt(q).unwrap(), None, rng.next_u64())).collect();
    let done = server.complete_batch(&requests, tokens).unwrap();
    println!("served {served} in {:.1} s", t.elapsed().as_secs_f64());
    let mut examples = Vec::new();
    let mut accepted = 0;
    for (i, ((prompt, _, _), c)) in requests.iter().zip(&done).enumerate() {
        let user = &users[rng.below(users.len() as u64) as usize];
        let o = react(server.accept_probability(user, asked[i], c, &product), &c.shown, &product, &mut rng);
        accepted += usize::from(o.accepted);
        let mut toks = server.tokenizer.encode(prompt).unwrap();
        let prompt_len = toks.len();
        toks.extend(server.tokenizer.encode(&c.recorded).unwrap());
        examples.push(Example {
            tokens: toks,
            prompt_len,
            reward: if o.accepted { 0.75 } else { -0.25 },
            accepted: o.accepted,
            behavior_logprob: Some(c.logprob),
        });
    }
    println!("accepted {accepted}/{served}");
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
    objective.kl_coef = 0.0;
    let targets: Vec<&str> = objective.target_modules.iter().map(String::as_str).collect();
    let lora = LoraAdapter::init(&model.config, rank as usize, objective.lora_alpha, &targets, 1).unwrap();
    let mut backend = CpuBackend::new(&model, PrecisionChoice::Auto, lora, 0.0).unwrap();
    drop(model);
    let t = Instant::now();
    flywheel_trainer::job::train_steps(&mut backend, &examples, &objective, &mut |p| {
        if p.step % 10 == 0 {
            println!("step {} loss {:.3} {:.0} tok/s", p.step, p.loss, p.tokens_per_second());
        }
    })
    .unwrap();
    println!("trained in {:.1} s", t.elapsed().as_secs_f64());
    let trained = Arc::new(backend.adapter().unwrap());
    for (label, adapter) in [("base", None), ("adapter", Some(trained.clone()))] {
        let reqs: Vec<(String, Option<Arc<LoraAdapter>>, u64)> = (0..240)
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
        println!("{label}: expected accept {p:.3}, brief {brief}/240; e.g. {:?} | {:?}", out[0].shown, out[1].shown);
    }
}
