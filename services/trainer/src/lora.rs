//! LoRA adapters: `W x + (alpha / r) · B A x` on chosen projections, stored
//! in the PEFT format (`adapter_config.json` + `adapter_model.safetensors`)
//! that HF PEFT and vLLM load.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::arch::{LlamaConfig, PROJECTIONS, projection_dims, projection_name};
use crate::{SplitMix, TrainerError, write_safetensors};

/// `adapter_config.json`, with the fields PEFT and vLLM check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct PeftConfig {
    /// Always `LORA`.
    pub peft_type: String,
    /// Always `CAUSAL_LM`.
    pub task_type: String,
    /// Rank.
    pub r: usize,
    /// Alpha; scale = alpha / r.
    pub lora_alpha: f64,
    /// Adapted projections.
    pub target_modules: Vec<String>,
    /// Dropout (0: none at inference).
    pub lora_dropout: f64,
    /// Always `none`.
    pub bias: String,
    /// Rank-stabilised scaling (off).
    pub use_rslora: bool,
    /// DoRA (off; vLLM rejects it).
    pub use_dora: bool,
    /// Always null.
    pub modules_to_save: Option<Vec<String>>,
    /// Always false (weights are `[out, in]`).
    pub fan_in_fan_out: bool,
    /// The base model.
    pub base_model_name_or_path: String,
    /// Whether it is for inference only.
    pub inference_mode: bool,
}

/// A LoRA adapter over a model: per (layer, projection), `A [r × in]` and
/// `B [out × r]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapter {
    /// Rank.
    pub rank: usize,
    /// Alpha.
    pub alpha: f64,
    /// Adapted projections (HF names such as `q_proj`).
    pub targets: Vec<String>,
    /// `(layer, projection)` → (A, B).
    pub weights: BTreeMap<(usize, String), (Vec<f32>, Vec<f32>)>,
}

fn peft_name(layer: usize, module: &str, which: &str) -> String {
    format!("base_model.model.{}.{which}.weight", projection_name(layer, module))
}

impl LoraAdapter {
    /// PEFT's initialisation: A Kaiming-uniform (bound 1/√in), B zero, so the
    /// adapted model starts equal to the base.
    pub fn init(
        config: &LlamaConfig,
        rank: usize,
        alpha: f64,
        targets: &[&str],
        seed: u64,
    ) -> Result<Self, TrainerError> {
        if rank == 0 {
            return Err(TrainerError::Format("LoRA rank must be at least 1".into()));
        }
        if let Some(bad) = targets.iter().find(|t| !PROJECTIONS.contains(t)) {
            return Err(TrainerError::Unsupported(format!(
                "LoRA target {bad} (supported: {})",
                PROJECTIONS.join(", ")
            )));
        }
        let mut rng = SplitMix(seed);
        let mut weights = BTreeMap::new();
        for layer in 0..config.num_hidden_layers {
            for module in targets {
                let (inp, out) = projection_dims(config, module);
                let bound = 1.0 / (inp as f32).sqrt();
                let a = (0..rank * inp).map(|_| rng.uniform(bound)).collect();
                weights.insert((layer, module.to_string()), (a, vec![0.0; out * rank]));
            }
        }
        Ok(LoraAdapter { rank, alpha, targets: targets.iter().map(|t| t.to_string()).collect(), weights })
    }

    /// Scale applied to `B A x`.
    pub fn scale(&self) -> f32 {
        (self.alpha / self.rank as f64) as f32
    }

    /// A, B and the scale of one projection, when adapted.
    pub fn get(&self, layer: usize, module: &str) -> Option<(&[f32], &[f32], f32)> {
        self.weights.get(&(layer, module.to_string())).map(|(a, b)| (a.as_slice(), b.as_slice(), self.scale()))
    }

    /// Writes the PEFT directory.
    pub fn save_peft(&self, dir: &Path, config: &LlamaConfig, base_model: &str) -> Result<(), TrainerError> {
        std::fs::create_dir_all(dir).map_err(|e| TrainerError::io(dir, e))?;
        let peft = PeftConfig {
            peft_type: "LORA".into(),
            task_type: "CAUSAL_LM".into(),
            r: self.rank,
            lora_alpha: self.alpha,
            target_modules: self.targets.clone(),
            lora_dropout: 0.0,
            bias: "none".into(),
            use_rslora: false,
            use_dora: false,
            modules_to_save: None,
            fan_in_fan_out: false,
            base_model_name_or_path: base_model.into(),
            inference_mode: true,
        };
        let json = serde_json::to_vec_pretty(&peft).map_err(|e| TrainerError::Format(e.to_string()))?;
        let path = dir.join("adapter_config.json");
        std::fs::write(&path, json).map_err(|e| TrainerError::io(&path, e))?;
        let mut tensors: Vec<(String, &[f32], Vec<usize>)> = Vec::new();
        for ((layer, module), (a, b)) in &self.weights {
            let (inp, out) = projection_dims(config, module);
            tensors.push((peft_name(*layer, module, "lora_A"), a, vec![self.rank, inp]));
            tensors.push((peft_name(*layer, module, "lora_B"), b, vec![out, self.rank]));
        }
        write_safetensors(&dir.join("adapter_model.safetensors"), &tensors)
    }

    /// Reads a PEFT directory written for a model of `config`.
    pub fn load_peft(dir: &Path, config: &LlamaConfig) -> Result<Self, TrainerError> {
        let path = dir.join("adapter_config.json");
        let text = std::fs::read(&path).map_err(|e| TrainerError::io(&path, e))?;
        let peft: PeftConfig = serde_json::from_slice(&text).map_err(|e| TrainerError::malformed(&path, e))?;
        if peft.peft_type != "LORA" || peft.use_dora || peft.bias != "none" {
            return Err(TrainerError::Unsupported(format!("adapter {} is not a plain LoRA", dir.display())));
        }
        let path = dir.join("adapter_model.safetensors");
        let bytes = std::fs::read(&path).map_err(|e| TrainerError::io(&path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| TrainerError::malformed(&path, e))?;
        let read = |name: &str, shape: Vec<usize>| -> Result<Vec<f32>, TrainerError> {
            let t = st.tensor(name).map_err(|_| TrainerError::Format(format!("adapter lacks {name}")))?;
            if t.shape() != shape.as_slice() || t.dtype() != safetensors::Dtype::F32 {
                return Err(TrainerError::Format(format!(
                    "adapter tensor {name}: {:?} {:?}, expected F32 {shape:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
            Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        };
        let mut weights = BTreeMap::new();
        for layer in 0..config.num_hidden_layers {
            for module in &peft.target_modules {
                let (inp, out) = projection_dims(config, module);
                let a = read(&peft_name(layer, module, "lora_A"), vec![peft.r, inp])?;
                let b = read(&peft_name(layer, module, "lora_B"), vec![out, peft.r])?;
                weights.insert((layer, module.clone()), (a, b));
            }
        }
        Ok(LoraAdapter { rank: peft.r, alpha: peft.lora_alpha, targets: peft.target_modules, weights })
    }
}
