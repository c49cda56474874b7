//! The decoder's shape as a checkpoint's `config.json` states it, and the
//! names of its adaptable projections. Its own module because both the
//! model (loading, forward pass) and the LoRA adapters (their tensor shapes
//! and PEFT names) depend on it, and neither should depend on the other for it.

use serde::{Deserialize, Serialize};

use crate::TrainerError;

/// The fields of `config.json` the forward pass needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `llama`, `qwen2` or `mistral` (same decoder).
    pub model_type: String,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); defaults to the query heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to hidden / heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// RoPE scaling (Llama 3.1 style); not supported yet, so refused when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// Whether the LM head is the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Longest position.
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_positions() -> usize {
    2048
}

impl LlamaConfig {
    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Refuses what the forward pass does not implement.
    pub fn check(&self) -> Result<(), TrainerError> {
        let unsupported = |why: String| Err(TrainerError::Unsupported(why));
        if !["llama", "qwen2", "mistral"].contains(&self.model_type.as_str()) {
            return unsupported(format!("model_type '{}' (supported: llama, qwen2, mistral)", self.model_type));
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return unsupported("rope_scaling (Llama 3.1-style long-context RoPE)".into());
        }
        if self.num_attention_heads == 0
            || self.kv_heads() == 0
            || !self.num_attention_heads.is_multiple_of(self.kv_heads())
        {
            return unsupported(format!(
                "{} attention heads over {} key/value heads",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return unsupported(format!("odd head_dim {}", self.head_dim()));
        }
        Ok(())
    }
}

/// Projections LoRA can adapt, by their HF names.
pub const PROJECTIONS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// The HF tensor name of a projection of layer `layer`.
pub fn projection_name(layer: usize, module: &str) -> String {
    let block = if ["gate_proj", "up_proj", "down_proj"].contains(&module) { "mlp" } else { "self_attn" };
    format!("model.layers.{layer}.{block}.{module}")
}

/// `(in, out)` widths of projection `module` (an entry of [`PROJECTIONS`]):
/// its weight is `[out × in]`, a LoRA pair on it `A [r × in]`, `B [out × r]`.
pub fn projection_dims(config: &LlamaConfig, module: &str) -> (usize, usize) {
    let (h, i) = (config.hidden_size, config.intermediate_size);
    let (q, kv) = (config.num_attention_heads * config.head_dim(), config.kv_heads() * config.head_dim());
    match module {
        "q_proj" => (h, q),
        "k_proj" | "v_proj" => (h, kv),
        "o_proj" => (q, h),
        "gate_proj" | "up_proj" => (h, i),
        _ => (i, h),
    }
}
