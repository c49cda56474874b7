//! Batched generation on the CPU: tokens per second of `CpuModel::generate`
//! for a batch of chat prompts (KV cache, one product per step over every
//! active request), and a few completions to read. The PyTorch side is
//! `bench/hf_generate_bench.py`; `bench/run_cpu_bench.sh` runs both.
//!
//! Usage: `generate_bench MODEL_DIR [BATCH] [MAX_NEW_TOKENS] [f32|bf16|auto]`;
//! `GENERATE_BENCH_ADAPTER=1` serves every request through an adapter.
//! Prints one JSON line last.

#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::time::Instant;

use flywheel_trainer::cpu::engine::CpuModel;
use flywheel_trainer::cpu::gemm::PrecisionChoice;
use flywheel_trainer::cpu::generate::{GenerateRequest, Sampling};
use flywheel_trainer::lora::LoraAdapter;
use flywheel_trainer::model::{Model, PROJECTIONS};
use flywheel_trainer::tokenize::TextTokenizer;

/// Questions of the kind an assistant product gets (the same list as the
/// Python side).
const QUESTIONS: [&str; 8] = [
    "What is the capital of France?",
    "Give me a tip for writing clean code.",
    "How do I boil an egg?",
    "Why is the sky blue?",
    "Suggest a name for a pet turtle.",
    "What does HTTP stand for?",
    "How can I sleep better?",
    "Explain what a prime number is.",
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(args.get(1).expect("usage: generate_bench MODEL_DIR [BATCH] [MAX_NEW_TOKENS] [PRECISION]"));
    let batch: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(16);
    let max_new: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(48);
    let choice = match args.get(4).map(String::as_str) {
        Some("f32") => PrecisionChoice::F32,
        Some("bf16") => PrecisionChoice::Bf16,
        Some("bf16-weights") => PrecisionChoice::Bf16Weights,
        _ => PrecisionChoice::Auto,
    };
    let model = Model::load(&dir).unwrap();
    let tokenizer = TextTokenizer::load(&dir, model.config.vocab_size).unwrap();
    let packed = CpuModel::new(&model, choice.resolve()).unwrap();
    // `GENERATE_BENCH_ADAPTER=1`: every request through one rank-16 adapter
    // on all seven projections (as the simulated product serves a
    // candidate); its `B` small and non-zero, so that it changes the output.
    let adapter = std::env::var("GENERATE_BENCH_ADAPTER").is_ok_and(|v| v == "1").then(|| {
        let mut lora = LoraAdapter::init(&model.config, 16, 32.0, &PROJECTIONS, 3).unwrap();
        for (_, b) in lora.weights.values_mut() {
            b.iter_mut().enumerate().for_each(|(i, v)| *v = ((i * 7) % 13) as f32 * 1e-3);
        }
        lora
    });
    drop(model);
    let stop: Vec<u32> = tokenizer.token_id("<|im_end|>").into_iter().collect();
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|i| {
            // Distinct prompts (the question and the request's number):
            // identical requests would share one prompt pass, which the
            // transformers side does not do.
            let question = format!("{} (#{i})", QUESTIONS[i % QUESTIONS.len()]);
            let text = tokenizer.chat_prompt(&[("user", &question)]).unwrap();
            tokenizer.encode(&text).unwrap()
        })
        .collect();
    let requests: Vec<GenerateRequest<'_>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| GenerateRequest {
            prompt: p,
            adapter: adapter.as_ref(),
            max_new_tokens: max_new,
            sampling: Sampling { temperature: 0.7, top_p: 0.9, seed: i as u64 },
            stop: &stop,
            allowed: None,
        })
        .collect();
    let started = Instant::now();
    let out = packed.generate(&requests).unwrap();
    let secs = started.elapsed().as_secs_f64();
    let generated: usize = out.iter().map(|g| g.tokens.len()).sum();
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    for (i, g) in out.iter().take(4).enumerate() {
        println!("--- {}\n{}", QUESTIONS[i % QUESTIONS.len()], tokenizer.decode(&g.tokens).unwrap());
    }
    println!(
        "{{\"impl\": \"flywheel\", \"precision\": \"{:?}\", \"batch\": {batch}, \"max_new_tokens\": {max_new}, \
         \"prompt_tokens\": {prompt_tokens}, \"generated_tokens\": {generated}, \"seconds\": {secs:.2}, \
         \"generated_per_s\": {:.1}, \"threads\": {}}}",
        packed.precision(),
        generated as f64 / secs,
        rayon::current_num_threads()
    );
}
