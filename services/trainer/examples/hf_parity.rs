//! Our forward against Hugging Face transformers + PEFT on the same files:
//! completion log-probabilities of a few sequences under the imported base
//! model and under a PEFT adapter written by us (random B, so it changes
//! the outputs). Needs PyTorch (the bench virtualenv). Exits 1 on a
//! mismatch beyond 1e-3 relative.
//!
//! Usage: `hf_parity MODEL_DIR PYTHON`.

#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::Command;

use flywheel_trainer::SplitMix;
use flywheel_trainer::cpu::engine::CpuModel;
use flywheel_trainer::cpu::gemm::Precision;
use flywheel_trainer::lora::LoraAdapter;
use flywheel_trainer::model::{Model, PROJECTIONS};
use flywheel_trainer::objective::Example;
use flywheel_trainer::tokenize::TextTokenizer;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (dir, python) = (PathBuf::from(&args[1]), &args[2]);
    let model = Model::load(&dir).unwrap();
    let tok = TextTokenizer::load(&dir, model.config.vocab_size).unwrap();
    let mut examples = Vec::new();
    for (q, a) in [
        ("What is the capital of France?", "The capital of France is Paris.<|im_end|>"),
        ("How do I boil an egg?", "Put the egg in boiling water for nine minutes, then cool it.<|im_end|>"),
        ("Write a haiku about rain.", "Soft rain on the roof,\nthe garden drinks it slowly —\nevening settles in."),
    ] {
        let mut tokens = tok.encode(&tok.chat_prompt(&[("user", q)]).unwrap()).unwrap();
        let prompt_len = tokens.len();
        tokens.extend(tok.encode(a).unwrap());
        examples.push(Example { tokens, prompt_len, reward: 0.0, accepted: true, behavior_logprob: None });
    }
    let mut lora = LoraAdapter::init(&model.config, 8, 16.0, &PROJECTIONS, 3).unwrap();
    let mut rng = SplitMix(4);
    for (_, b) in lora.weights.values_mut() {
        b.iter_mut().for_each(|v| *v = rng.uniform(0.02));
    }
    let work = std::env::temp_dir().join(format!("flywheel-hf-parity-{}", std::process::id()));
    let adapter_dir = work.join("adapter");
    lora.save_peft(&adapter_dir, &model.config, &dir.display().to_string()).unwrap();
    let seqs: Vec<serde_json::Value> =
        examples.iter().map(|e| serde_json::json!({"tokens": e.tokens, "prompt_len": e.prompt_len})).collect();
    let seq_file = work.join("sequences.json");
    std::fs::write(&seq_file, serde_json::to_vec(&seqs).unwrap()).unwrap();
    let engine = CpuModel::new(&model, Precision::F32).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/hf_logprob_check.py");
    let mut worst = 0.0f64;
    for (label, adapter) in [("base", None), ("adapter", Some(&lora))] {
        let ours = engine.completion_logprobs(&examples, adapter, 4096).unwrap();
        let adapter_arg = if adapter.is_some() { adapter_dir.display().to_string() } else { "-".into() };
        let out = Command::new(python)
            .arg(&script)
            .args([dir.display().to_string(), adapter_arg, seq_file.display().to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "transformers failed: {}", String::from_utf8_lossy(&out.stderr));
        let theirs: Vec<f64> = serde_json::from_slice(&out.stdout).unwrap();
        for (o, t) in ours.iter().zip(&theirs) {
            let rel = (o - t).abs() / t.abs().max(1.0);
            worst = worst.max(rel);
            println!("{label:<8} ours {o:>12.5}  transformers {t:>12.5}  relative difference {rel:.2e}");
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    println!("{{\"check\": \"hf_parity\", \"worst_relative_difference\": {worst:.3e}}}");
    if worst > 1e-3 {
        std::process::exit(1);
    }
}
