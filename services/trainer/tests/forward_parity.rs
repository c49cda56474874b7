//! The Rust forward pass against an independent numpy implementation that
//! reads the same checkpoint and PEFT adapter files (so the math and the file
//! formats are both checked): logits must agree within 1e-4 relative.

use std::path::PathBuf;
use std::process::Command;

use flywheel_trainer::SplitMix;
use flywheel_trainer::lora::LoraAdapter;
use flywheel_trainer::model::Model;
use flywheel_trainer::tiny::{save, tiny_model};

fn python() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(p.exists(), "{} is missing: run `make setup` (installs numpy)", p.display());
    p
}

fn reference(model: &std::path::Path, adapter: Option<&std::path::Path>, tokens: &[u32]) -> Vec<f64> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference_forward.py");
    let tokens: Vec<String> = tokens.iter().map(u32::to_string).collect();
    let adapter = adapter.map_or("-".to_string(), |a| a.display().to_string());
    let out = Command::new(python())
        .args([script.display().to_string(), model.display().to_string(), adapter, tokens.join(",")])
        .output()
        .unwrap();
    assert!(out.status.success(), "numpy reference failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn assert_close(ours: &[f32], reference: &[f64]) {
    assert_eq!(ours.len(), reference.len());
    let mut worst = 0.0f64;
    for (a, b) in ours.iter().zip(reference) {
        let err = (f64::from(*a) - b).abs() / (b.abs().max(1e-2));
        worst = worst.max(err);
    }
    assert!(worst < 1e-4, "largest relative difference {worst:e}");
}

#[test]
fn logits_match_an_independent_numpy_forward_with_and_without_lora() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(7).unwrap();
    save(&model, dir.path()).unwrap();
    let loaded = Model::load(dir.path()).unwrap();
    let tokens: Vec<u32> = b"def add(a, b):\n    return a + b".iter().map(|b| u32::from(*b)).collect();

    let base = loaded.forward(&tokens, None).unwrap();
    assert_close(&base, &reference(dir.path(), None, &tokens));

    // An adapter with non-zero B on every projection, through the PEFT files.
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let mut lora = LoraAdapter::init(&loaded.config, 4, 8.0, &targets, 11).unwrap();
    let mut rng = SplitMix(3);
    for (_, b) in lora.weights.values_mut() {
        b.iter_mut().for_each(|v| *v = rng.uniform(0.2));
    }
    let adapter_dir = dir.path().join("adapter");
    lora.save_peft(&adapter_dir, &loaded.config, "flywheel/tiny").unwrap();
    let reloaded = LoraAdapter::load_peft(&adapter_dir, &loaded.config).unwrap();
    assert_eq!(reloaded, lora);
    let adapted = loaded.forward(&tokens, Some(&reloaded)).unwrap();
    assert_close(&adapted, &reference(dir.path(), Some(&adapter_dir), &tokens));
    let moved = adapted.iter().zip(&base).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(moved > 1e-3, "the adapter changes the logits ({moved})");

    // A freshly initialised adapter (B = 0) leaves the model unchanged.
    let fresh = LoraAdapter::init(&loaded.config, 4, 8.0, &targets, 11).unwrap();
    assert_eq!(loaded.forward(&tokens, Some(&fresh)).unwrap(), base);
}

#[test]
fn broken_checkpoints_fail_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    save(&tiny_model(1).unwrap(), dir.path()).unwrap();
    let config_path = dir.path().join("config.json");
    let good = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(&config_path, good.replace("\"hidden_size\": 64", "\"hidden_size\": 96")).unwrap();
    let err = Model::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("model.embed_tokens.weight") && err.contains("expected [256, 96]"), "{err}");
    std::fs::write(&config_path, good.replace("\"qwen2\"", "\"gpt_neox\"")).unwrap();
    let err = Model::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("unsupported: model_type 'gpt_neox'"), "{err}");
    std::fs::write(&config_path, &good).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), b"not safetensors").unwrap();
    let err = Model::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    let model = tiny_model(1).unwrap();
    assert!(model.forward(&[300], None).unwrap_err().to_string().contains("outside the vocabulary"));
}
