//! CPU training throughput: tokens per second of one optimiser step
//! (forward with trace, backward to the LoRA parameters, AdamW) on the tiny
//! model and on a ~110M-parameter Llama shape. Run with `make bench`.

#![allow(clippy::print_stdout)]

use std::time::Instant;

use flywheel_trainer::lora::LoraAdapter;
use flywheel_trainer::model::LlamaConfig;
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

fn bench(name: &str, config: LlamaConfig, size: usize, len: usize, steps: usize) {
    let params = {
        let (h, i, v, l) = (config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers);
        let (q, kv) = (config.num_attention_heads * config.head_dim(), config.kv_heads() * config.head_dim());
        2 * v * h + l * (h * q + 2 * h * kv + q * h + 3 * h * i)
    };
    let model = random_model(config, false, 1).unwrap();
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let mut lora = LoraAdapter::init(&model.config, 16, 32.0, &targets, 2).unwrap();
    let data = batch(model.config.vocab_size as u32, size, len);
    let objective = Objective::Reinforce { kl_coef: 0.0, ppo_clip: None };
    let mut opt = AdamW::new(0.0);
    let mut rates = Vec::new();
    for step in 0..=steps {
        let started = Instant::now();
        let (_, mut grads) = batch_loss_and_grads(&model, &lora, &data, &objective).unwrap();
        clip_grad_norm(&mut grads, 1.0);
        opt.update(&mut lora, &grads, 1e-4);
        if step > 0 {
            rates.push((size * len) as f64 / started.elapsed().as_secs_f64()); // the first step warms up
        }
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "  {name:<34} {:>5.1} M params, batch {size} x {len} tokens, LoRA r=16 on all 7 projections: {:>9.0} tokens/s (median of {steps})",
        params as f64 / 1e6,
        rates[rates.len() / 2]
    );
}

fn main() {
    let threads = std::env::var("MATMUL_NUM_THREADS").unwrap_or_else(|_| "default".into());
    println!("train_bench: CPU reference path, one process, matrixmultiply threads: {threads}");
    bench("tiny (2 x 64, 4/2 heads)", tiny_config(), 16, 64, 5);
    let medium = LlamaConfig {
        model_type: "llama".into(),
        hidden_size: 768,
        intermediate_size: 2048,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        num_key_value_heads: Some(4),
        head_dim: None,
        vocab_size: 32_000,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_scaling: None,
        tie_word_embeddings: false,
        max_position_embeddings: 2048,
    };
    bench("~110M Llama shape (12 x 768, 12/4 heads)", medium, 2, 128, 3);
}
