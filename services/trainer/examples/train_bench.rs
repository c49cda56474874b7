//! CPU training throughput: tokens per second of one optimiser step (forward,
//! backward to the LoRA parameters, clipping, AdamW) with LoRA r=16 alpha=32
//! on all seven projections and a REINFORCE loss on the completion half of
//! each sequence; the same shapes, batch and loss as PyTorch + PEFT in
//! `bench/peft_cpu_bench.py`. Run both side by side with
//! `bench/run_cpu_bench.sh` (`make bench`).
//!
//! Usage: `train_bench SHAPE ENGINE STEPS`, SHAPE = tiny | medium | smollm2,
//! ENGINE = reference (one sequence at a time, f32) | f32 | bf16 |
//! bf16-weights (stored in bf16, f32 arithmetic) (the batched engine).
//! Prints one JSON line; peak memory is the process's maximum RSS, so run
//! one configuration per process.

#![allow(clippy::print_stdout)]

use std::time::Instant;

use flywheel_trainer::cpu::engine::CpuModel;
use flywheel_trainer::cpu::gemm::{Isa, Precision};
use flywheel_trainer::lora::LoraAdapter;
use flywheel_trainer::model::{LlamaConfig, PROJECTIONS};
use flywheel_trainer::objective::{Example, Objective, batch_loss_and_grads};
use flywheel_trainer::optim::{AdamW, clip_grad_norm};
use flywheel_trainer::tiny::{random_model, tiny_config};

fn batch(vocab: u32, size: usize, len: usize) -> Vec<Example> {
    (0..size)
        .map(|i| Example {
            tokens: (0..len).map(|t| ((i * 131 + t * 17) as u32) % vocab).collect(),
            prompt_len: len / 2,
            reward: if i % 2 == 0 { 0.75 } else { -0.25 },
            accepted: i % 2 == 0,
            behavior_logprob: None,
        })
        .collect()
}

fn llama(hidden: usize, ffn: usize, layers: usize, heads: usize, kv: usize, vocab: usize, tied: bool) -> LlamaConfig {
    LlamaConfig {
        model_type: "llama".into(),
        hidden_size: hidden,
        intermediate_size: ffn,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv),
        head_dim: Some(hidden / heads),
        vocab_size: vocab,
        rms_norm_eps: 1e-5,
        rope_theta: 100_000.0,
        rope_scaling: None,
        tie_word_embeddings: tied,
        max_position_embeddings: 2048,
    }
}

/// Useful multiply-adds ×2 per token of a LoRA step on a frozen base: the
/// forward and input-gradient products of every projection, and the LM
/// head's on the completion positions (the same count as the Python bench).
fn matmul_flops_per_token(c: &LlamaConfig, completion_share: f64) -> f64 {
    let (h, i, l, v) = (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size);
    let (q, kv) = (c.num_attention_heads * c.head_dim(), c.kv_heads() * c.head_dim());
    let per_layer = h * q * 2 + h * kv * 2 + 3 * h * i;
    4.0 * (l * per_layer) as f64 + 4.0 * (h * v) as f64 * completion_share
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let shape = args.get(1).map_or("smollm2", String::as_str);
    let engine = args.get(2).map_or("bf16", String::as_str);
    let steps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
    assert!(steps >= 1, "STEPS must be at least 1: a warm-up step runs first and is not counted");
    let (config, size, len) = match shape {
        "tiny" => (tiny_config(), 16, 64),
        "medium" => (llama(768, 2048, 12, 12, 4, 32_000, false), 2, 128),
        "smollm2" => (llama(576, 1536, 30, 9, 3, 49_152, true), 4, 128),
        other => panic!("unknown shape {other} (tiny, medium, smollm2)"),
    };
    let model = random_model(config.clone(), false, 1).unwrap();
    let mut lora = LoraAdapter::init(&model.config, 16, 32.0, &PROJECTIONS, 2).unwrap();
    let data = batch(model.config.vocab_size as u32, size, len);
    let objective = Objective::Reinforce { kl_coef: 0.0, ppo_clip: None, reject_floor: None };
    let packed = match engine {
        "reference" => None,
        "f32" => Some(CpuModel::new(&model, Precision::F32).unwrap()),
        "bf16" => Some(CpuModel::new(&model, Precision::Bf16).unwrap()),
        "bf16-weights" => Some(CpuModel::new(&model, Precision::Bf16Weights).unwrap()),
        other => panic!("unknown engine {other} (reference, f32, bf16, bf16-weights)"),
    };
    let model = if packed.is_some() { None } else { Some(model) };
    let mut opt = AdamW::new(0.0);
    let mut rates = Vec::new();
    for step in 0..=steps {
        let started = Instant::now();
        let (_, mut grads) = match (&packed, &model) {
            (Some(p), _) => p.loss_and_grads(&lora, &data, &objective).unwrap(),
            (None, Some(m)) => batch_loss_and_grads(m, &lora, &data, &objective).unwrap(),
            (None, None) => unreachable!("one of the two is built"),
        };
        clip_grad_norm(&mut grads, 1.0);
        opt.update(&mut lora, &grads, 1e-4);
        if step > 0 {
            rates.push((size * len) as f64 / started.elapsed().as_secs_f64()); // the first step warms up
        }
    }
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    let gflops = matmul_flops_per_token(&config, 0.5) * median / 1e9;
    println!(
        "{{\"impl\": \"flywheel\", \"variant\": \"{engine}\", \"shape\": \"{shape}\", \"batch\": {size}, \"seq\": {len}, \
         \"threads\": {}, \"isa\": \"{:?}\", \"tokens_per_s\": {median:.1}, \"gflops\": {gflops:.1}, \
         \"peak_rss_mib\": {:.1}, \"steps\": {steps}}}",
        rayon::current_num_threads(),
        Isa::detect(),
        peak_rss_mib()
    );
}
