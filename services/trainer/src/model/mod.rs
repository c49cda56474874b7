//! A Llama-family decoder as Hugging Face stores it (`config.json` +
//! `model.safetensors`, or shards with an index), and its forward pass on the
//! CPU in f32, with optional LoRA adapters on any projection.
//!
//! Conventions follow HF `LlamaForCausalLM`: weights are `[out, in]`, RoPE
//! rotates halves (`rotate_half`), RMSNorm is computed in f32, grouped-query
//! attention shares each key/value head among `heads / kv_heads` query heads,
//! the MLP is SwiGLU, the LM head may be tied to the embeddings, and q/k/v
//! may carry biases (Qwen2).
//!
//! - `checkpoint`: reading the safetensors files into a [`Model`];
//! - `forward`: the forward pass and the activations it keeps;
//! - `ops`: RMSNorm, RoPE, attention and SiLU on plain slices.

use std::collections::HashMap;

use crate::TrainerError;
use crate::arch::projection_dims;
pub use crate::arch::{LlamaConfig, PROJECTIONS, projection_name};
pub(crate) use forward::Trace;

mod checkpoint;
mod forward;
pub(crate) mod ops;

/// A dense f32 tensor, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Values.
    pub data: Vec<f32>,
}

/// A loaded model: its config and every tensor, in f32.
#[derive(Debug, Clone)]
pub struct Model {
    /// The config.
    pub config: LlamaConfig,
    tensors: HashMap<String, Tensor>,
}

impl Model {
    /// Builds a model from tensors already in memory (tests, the tiny model).
    pub fn from_tensors(config: LlamaConfig, tensors: HashMap<String, Tensor>) -> Result<Model, TrainerError> {
        config.check()?;
        let model = Model { config, tensors };
        model.check_tensors()?;
        Ok(model)
    }

    /// The expected shape of every required tensor.
    pub(crate) fn expected_shapes(config: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
        let (h, v) = (config.hidden_size, config.vocab_size);
        let mut out =
            vec![("model.embed_tokens.weight".to_string(), vec![v, h]), ("model.norm.weight".into(), vec![h])];
        if !config.tie_word_embeddings {
            out.push(("lm_head.weight".into(), vec![v, h]));
        }
        for l in 0..config.num_hidden_layers {
            for module in PROJECTIONS {
                let (inp, o) = projection_dims(config, module);
                out.push((format!("{}.weight", projection_name(l, module)), vec![o, inp]));
            }
            out.push((format!("model.layers.{l}.input_layernorm.weight"), vec![h]));
            out.push((format!("model.layers.{l}.post_attention_layernorm.weight"), vec![h]));
        }
        out
    }

    fn check_tensors(&self) -> Result<(), TrainerError> {
        for (name, shape) in Self::expected_shapes(&self.config) {
            match self.tensors.get(&name) {
                None => return Err(TrainerError::Format(format!("missing tensor {name}"))),
                Some(t) if t.shape != shape => {
                    return Err(TrainerError::Format(format!(
                        "tensor {name} has shape {:?}, expected {shape:?}",
                        t.shape
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// A tensor by HF name.
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// Every tensor, by name.
    pub fn tensors(&self) -> &HashMap<String, Tensor> {
        &self.tensors
    }

    fn weight(&self, name: &str) -> &[f32] {
        &self.tensors[name].data
    }

    /// The LM head matrix `[vocab × hidden]`.
    pub fn head(&self) -> &[f32] {
        if self.config.tie_word_embeddings {
            self.weight("model.embed_tokens.weight")
        } else {
            self.weight("lm_head.weight")
        }
    }

    /// A weight by name (panics if absent: names come from the checked set).
    pub(crate) fn weight_of(&self, name: &str) -> &[f32] {
        self.weight(name)
    }
}
