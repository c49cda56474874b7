//! How often the base chat model's answers have each property the
//! simulated users judge, and the accept rate they imply (calibrates the
//! chat product). `chat_probe MODEL_DIR [SAMPLES_PER_PROMPT] [MAX_NEW_TOKENS]`.

#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use flywheel_cli::chat_product::{PROMPTS, Property, accept_probability, chat_population};
use flywheel_trainer::cpu::engine::CpuModel;
use flywheel_trainer::cpu::gemm::PrecisionChoice;
use flywheel_trainer::cpu::generate::{GenerateRequest, Sampling};
use flywheel_trainer::model::Model;
use flywheel_trainer::tokenize::TextTokenizer;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(&args[1]);
    let per: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2);
    let max_new: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(48);
    let model = Model::load(&dir).unwrap();
    let tok = TextTokenizer::load(&dir, model.config.vocab_size).unwrap();
    let packed = CpuModel::new(&model, PrecisionChoice::Auto.resolve()).unwrap();
    drop(model);
    let end = tok.token_id("<|im_end|>").unwrap();
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .flat_map(|q| std::iter::repeat_n(*q, per))
        .map(|q| tok.encode(&tok.chat_prompt(&[("user", q)]).unwrap()).unwrap())
        .collect();
    let stop = [end];
    let reqs: Vec<GenerateRequest<'_>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| GenerateRequest {
            prompt: p,
            adapter: None,
            max_new_tokens: max_new,
            sampling: Sampling { temperature: 0.8, top_p: 0.95, seed: i as u64 },
            stop: &stop,
            allowed: None,
        })
        .collect();
    let t = std::time::Instant::now();
    let out = packed.generate(&reqs).unwrap();
    println!("{} answers in {:.1} s", out.len(), t.elapsed().as_secs_f64());
    let users = chat_population(200, 7);
    let mut holds = [0usize; 4];
    let mut p_sum = 0.0;
    for (i, g) in out.iter().enumerate() {
        let finished = g.stopped;
        let body: Vec<u32> = g.tokens.iter().copied().filter(|t| *t != end).collect();
        let text = tok.decode(&body).unwrap();
        for (j, p) in Property::ALL.iter().enumerate() {
            holds[j] += usize::from(p.holds(&text, finished));
        }
        p_sum += users.iter().map(|u| accept_probability(&u.tastes, PROMPTS[i / per], &text, finished)).sum::<f64>()
            / users.len() as f64;
        if i % (per * 6) == 0 {
            println!("--- {} [{}]\n{}", PROMPTS[i / per], if finished { "ended" } else { "cut" }, text);
        }
    }
    for (j, p) in Property::ALL.iter().enumerate() {
        println!("{:<11} {:.3}", p.name(), holds[j] as f64 / out.len() as f64);
    }
    println!("expected accept rate {:.3}", p_sum / out.len() as f64);
}
