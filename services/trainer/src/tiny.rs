//! A deterministic tiny Llama checkpoint (random weights from a seed) in the
//! HF layout, for tests and the demo: no model hub is reachable.

use std::collections::HashMap;
use std::path::Path;

use crate::arch::LlamaConfig;
use crate::model::{Model, Tensor};
use crate::{SplitMix, TrainerError, write_safetensors};

/// The tiny model's shape: 2 layers, width 64, 4 query and 2 key/value heads
/// (grouped-query attention), q/k/v biases, untied head, 256-token vocabulary
/// (one per byte).
pub fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        model_type: "qwen2".into(),
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        // Written out: transformers 5.x fails on `"head_dim": null`.
        head_dim: Some(16),
        vocab_size: 256,
        rms_norm_eps: 1e-6,
        rope_theta: 10_000.0,
        rope_scaling: None,
        tie_word_embeddings: false,
        max_position_embeddings: 512,
    }
}

/// The tiny model with weights drawn from `seed`.
pub fn tiny_model(seed: u64) -> Result<Model, TrainerError> {
    random_model(tiny_config(), true, seed)
}

/// A model of any shape with weights drawn from `seed` (uniform, scaled by
/// 1/√fan-in; norms near 1), optionally with q/k/v biases.
pub fn random_model(config: LlamaConfig, biases: bool, seed: u64) -> Result<Model, TrainerError> {
    let mut rng = SplitMix(seed);
    let mut tensors = HashMap::new();
    for (name, shape) in Model::expected_shapes(&config) {
        let n: usize = shape.iter().product();
        let data = if name.ends_with("norm.weight") {
            (0..n).map(|_| 1.0 + rng.uniform(0.1)).collect()
        } else {
            let fan_in = *shape.last().unwrap_or(&1) as f32;
            (0..n).map(|_| rng.uniform(1.0 / fan_in.sqrt())).collect()
        };
        tensors.insert(name, Tensor { shape, data });
    }
    if biases {
        let (q, kv) = (config.num_attention_heads * config.head_dim(), config.kv_heads() * config.head_dim());
        for l in 0..config.num_hidden_layers {
            for (module, width) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                let data = (0..width).map(|_| rng.uniform(0.05)).collect();
                tensors
                    .insert(format!("model.layers.{l}.self_attn.{module}.bias"), Tensor { shape: vec![width], data });
            }
        }
    }
    Model::from_tensors(config, tensors)
}

/// Writes `config.json`, `model.safetensors` and (for a 256-token
/// vocabulary) the byte-level `tokenizer.json` of `model` into `dir`.
pub fn save(model: &Model, dir: &Path) -> Result<(), TrainerError> {
    std::fs::create_dir_all(dir).map_err(|e| TrainerError::io(dir, e))?;
    if model.config.vocab_size == 256 {
        crate::tokenize::write_byte_tokenizer(dir)?;
    }
    let json = serde_json::to_vec_pretty(&model.config).map_err(|e| TrainerError::Format(e.to_string()))?;
    std::fs::write(dir.join("config.json"), json).map_err(|e| TrainerError::io(&dir.join("config.json"), e))?;
    let mut names: Vec<&String> = model.tensors().keys().collect();
    names.sort();
    let tensors: Vec<(String, &[f32], Vec<usize>)> = names
        .into_iter()
        .map(|n| {
            let t = &model.tensors()[n];
            (n.clone(), t.data.as_slice(), t.shape.clone())
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &tensors)
}
