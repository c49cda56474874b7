//! A Llama-family decoder as Hugging Face stores it (`config.json` +
//! `model.safetensors`, or shards with an index), and its forward pass on the
//! CPU in f32, with optional LoRA adapters on any projection.
//!
//! Conventions follow HF `LlamaForCausalLM`: weights are `[out, in]`, RoPE
//! rotates halves (`rotate_half`), RMSNorm is computed in f32, grouped-query
//! attention shares each key/value head among `heads / kv_heads` query heads,
//! the MLP is SwiGLU, the LM head may be tied to the embeddings, and q/k/v
//! may carry biases (Qwen2).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::TrainerError;
use crate::linalg::matmul_t;
use crate::lora::LoraAdapter;

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

/// A dense f32 tensor, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Values.
    pub data: Vec<f32>,
}

/// Projections LoRA can adapt, by their HF names.
pub const PROJECTIONS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// The HF tensor name of a projection of layer `layer`.
pub fn projection_name(layer: usize, module: &str) -> String {
    let block = if ["gate_proj", "up_proj", "down_proj"].contains(&module) { "mlp" } else { "self_attn" };
    format!("model.layers.{layer}.{block}.{module}")
}

/// A loaded model: its config and every tensor, in f32.
#[derive(Debug, Clone)]
pub struct Model {
    /// The config.
    pub config: LlamaConfig,
    tensors: HashMap<String, Tensor>,
}

fn to_f32(view: &safetensors::tensor::TensorView<'_>, name: &str) -> Result<Vec<f32>, TrainerError> {
    use safetensors::Dtype;
    let b = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::BF16 => {
            b.chunks_exact(2).map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)).collect()
        }
        Dtype::F16 => b.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
        other => return Err(TrainerError::Unsupported(format!("tensor {name} has dtype {other:?}"))),
    })
}

/// IEEE half → single precision.
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = (h >> 10) & 0x1f;
    let frac = u32::from(h & 0x3ff);
    let bits = match exp {
        0 if frac == 0 => sign,
        0 => {
            // Subnormal: normalise.
            let mut e = 127 - 15 + 1;
            let mut f = frac;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((f & 0x3ff) << 13)
        }
        0x1f => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | ((u32::from(exp) + 127 - 15) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

impl Model {
    /// Loads `dir/config.json` and `dir/model.safetensors` (or the shards
    /// named by `model.safetensors.index.json`; memory-mapped), checking every tensor the
    /// config implies is present with its shape.
    pub fn load(dir: &Path) -> Result<Model, TrainerError> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| TrainerError::io(p, e));
        let config: LlamaConfig = serde_json::from_slice(&read(&dir.join("config.json"))?)
            .map_err(|e| TrainerError::Format(format!("{}: {e}", dir.join("config.json").display())))?;
        config.check()?;
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<std::path::PathBuf> = if index.exists() {
            #[derive(Deserialize)]
            struct Index {
                weight_map: BTreeMap<String, String>,
            }
            let idx: Index = serde_json::from_slice(&read(&index)?)
                .map_err(|e| TrainerError::Format(format!("{}: {e}", index.display())))?;
            let mut names: Vec<&String> = idx.weight_map.values().collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut tensors = HashMap::new();
        for file in files {
            let handle = std::fs::File::open(&file).map_err(|e| TrainerError::io(&file, e))?;
            // Mapped, not read: only the f32 copies occupy memory, one shard
            // of raw bytes is never resident twice.
            // SAFETY: checkpoints are immutable inputs; a file truncated
            // while mapped is outside what the trainer supports.
            #[allow(unsafe_code)]
            let bytes = unsafe { memmap2::Mmap::map(&handle) }.map_err(|e| TrainerError::io(&file, e))?;
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .map_err(|e| TrainerError::Format(format!("{}: {e}", file.display())))?;
            for (name, view) in st.tensors() {
                let data = to_f32(&view, &name)?;
                tensors.insert(name, Tensor { shape: view.shape().to_vec(), data });
            }
        }
        let model = Model { config, tensors };
        model.check_tensors()?;
        Ok(model)
    }

    /// Builds a model from tensors already in memory (tests, the tiny model).
    pub fn from_tensors(config: LlamaConfig, tensors: HashMap<String, Tensor>) -> Result<Model, TrainerError> {
        config.check()?;
        let model = Model { config, tensors };
        model.check_tensors()?;
        Ok(model)
    }

    /// The expected shape of every required tensor.
    pub fn expected_shapes(config: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
        let (q, kv) = (config.num_attention_heads * config.head_dim(), config.kv_heads() * config.head_dim());
        let mut out =
            vec![("model.embed_tokens.weight".to_string(), vec![v, h]), ("model.norm.weight".into(), vec![h])];
        if !config.tie_word_embeddings {
            out.push(("lm_head.weight".into(), vec![v, h]));
        }
        for l in 0..config.num_hidden_layers {
            for (module, shape) in [
                ("q_proj", vec![q, h]),
                ("k_proj", vec![kv, h]),
                ("v_proj", vec![kv, h]),
                ("o_proj", vec![h, q]),
                ("gate_proj", vec![i, h]),
                ("up_proj", vec![i, h]),
                ("down_proj", vec![h, i]),
            ] {
                out.push((format!("{}.weight", projection_name(l, module)), shape));
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

    /// `x [rows × in] · W[out × in]ᵀ (+ bias) (+ LoRA)` for projection
    /// `module` of `layer`.
    fn project(&self, x: &[f32], rows: usize, layer: usize, module: &str, lora: Option<&LoraAdapter>) -> Vec<f32> {
        let base = projection_name(layer, module);
        let w = &self.tensors[&format!("{base}.weight")];
        let (out_dim, in_dim) = (w.shape[0], w.shape[1]);
        let mut y = matmul_t(x, rows, in_dim, &w.data, out_dim);
        if let Some(b) = self.tensors.get(&format!("{base}.bias")) {
            for r in 0..rows {
                for (o, bv) in y[r * out_dim..(r + 1) * out_dim].iter_mut().zip(&b.data) {
                    *o += bv;
                }
            }
        }
        if let Some((a, b, scale)) = lora.and_then(|l| l.get(layer, module)) {
            let rank = a.len() / in_dim;
            let xa = matmul_t(x, rows, in_dim, a, rank);
            let delta = matmul_t(&xa, rows, rank, b, out_dim);
            for (o, d) in y.iter_mut().zip(delta) {
                *o += scale * d;
            }
        }
        y
    }

    /// Logits `[tokens × vocab]` of a token sequence (positions 0..).
    pub fn forward(&self, tokens: &[u32], lora: Option<&LoraAdapter>) -> Result<Vec<f32>, TrainerError> {
        self.forward_traced(tokens, lora, None)
    }

    /// The forward pass, keeping in `trace` what the backward pass needs.
    pub fn forward_traced(
        &self,
        tokens: &[u32],
        lora: Option<&LoraAdapter>,
        mut trace: Option<&mut Trace>,
    ) -> Result<Vec<f32>, TrainerError> {
        let c = &self.config;
        let (t, h, hd) = (tokens.len(), c.hidden_size, c.head_dim());
        let (nh, nkv) = (c.num_attention_heads, c.kv_heads());
        if t > c.max_position_embeddings {
            return Err(TrainerError::Format(format!("{t} tokens exceed {} positions", c.max_position_embeddings)));
        }
        let embed = self.weight("model.embed_tokens.weight");
        let mut x = Vec::with_capacity(t * h);
        for &tok in tokens {
            let tok = tok as usize;
            if tok >= c.vocab_size {
                return Err(TrainerError::Format(format!("token {tok} outside the vocabulary of {}", c.vocab_size)));
            }
            x.extend_from_slice(&embed[tok * h..(tok + 1) * h]);
        }
        let (cos, sin) = rope_tables(t, hd, c.rope_theta);
        for l in 0..c.num_hidden_layers {
            let x_in = x.clone();
            let normed1 =
                rms_norm(&x, h, self.weight(&format!("model.layers.{l}.input_layernorm.weight")), c.rms_norm_eps);
            let mut q = self.project(&normed1, t, l, "q_proj", lora);
            let mut k = self.project(&normed1, t, l, "k_proj", lora);
            let v = self.project(&normed1, t, l, "v_proj", lora);
            apply_rope(&mut q, t, nh, hd, &cos, &sin);
            apply_rope(&mut k, t, nkv, hd, &cos, &sin);
            let (attn, probs) = causal_attention(&q, &k, &v, t, nh, nkv, hd);
            let o = self.project(&attn, t, l, "o_proj", lora);
            for (xv, ov) in x.iter_mut().zip(o) {
                *xv += ov;
            }
            let x_mid = x.clone();
            let normed2 = rms_norm(
                &x,
                h,
                self.weight(&format!("model.layers.{l}.post_attention_layernorm.weight")),
                c.rms_norm_eps,
            );
            let gate = self.project(&normed2, t, l, "gate_proj", lora);
            let up = self.project(&normed2, t, l, "up_proj", lora);
            let act: Vec<f32> = gate.iter().zip(&up).map(|(g, u)| silu(*g) * u).collect();
            let down = self.project(&act, t, l, "down_proj", lora);
            for (xv, dv) in x.iter_mut().zip(down) {
                *xv += dv;
            }
            if let Some(tr) = trace.as_deref_mut() {
                tr.layers.push(LayerTrace { x_in, normed1, q, k, v, probs, attn, x_mid, normed2, gate, up, act });
            }
        }
        let normed = rms_norm(&x, h, self.weight("model.norm.weight"), c.rms_norm_eps);
        let head = if c.tie_word_embeddings { embed } else { self.weight("lm_head.weight") };
        let logits = matmul_t(&normed, t, h, head, c.vocab_size);
        if let Some(tr) = trace {
            tr.x_final = x;
            tr.normed_final = normed;
            tr.cos = cos;
            tr.sin = sin;
        }
        Ok(logits)
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
    pub fn weight_of(&self, name: &str) -> &[f32] {
        self.weight(name)
    }
}

/// What one decoder layer's forward pass leaves for the backward pass.
#[derive(Debug, Clone, Default)]
pub struct LayerTrace {
    /// Residual stream entering the layer.
    pub x_in: Vec<f32>,
    /// Input RMSNorm output.
    pub normed1: Vec<f32>,
    /// Queries after RoPE.
    pub q: Vec<f32>,
    /// Keys after RoPE.
    pub k: Vec<f32>,
    /// Values.
    pub v: Vec<f32>,
    /// Attention probabilities `[heads × t × t]`.
    pub probs: Vec<f32>,
    /// Attention output before `o_proj`.
    pub attn: Vec<f32>,
    /// Residual stream after attention.
    pub x_mid: Vec<f32>,
    /// Post-attention RMSNorm output.
    pub normed2: Vec<f32>,
    /// Gate projection.
    pub gate: Vec<f32>,
    /// Up projection.
    pub up: Vec<f32>,
    /// SwiGLU output.
    pub act: Vec<f32>,
}

/// Activations of a whole forward pass.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    /// Per layer.
    pub layers: Vec<LayerTrace>,
    /// Residual stream before the final norm.
    pub x_final: Vec<f32>,
    /// Final norm output.
    pub normed_final: Vec<f32>,
    /// RoPE tables.
    pub cos: Vec<f32>,
    /// RoPE tables.
    pub sin: Vec<f32>,
}

/// RMSNorm of each `width`-wide row, computed in f32 as HF does.
pub fn rms_norm(x: &[f32], width: usize, weight: &[f32], eps: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(width) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
        let inv = 1.0 / (mean_sq + eps as f32).sqrt();
        out.extend(row.iter().zip(weight).map(|(v, w)| w * (v * inv)));
    }
    out
}

/// cos and sin of every (position, frequency) pair, duplicated over both
/// halves of a head as HF's `rotate_half` expects.
pub fn rope_tables(positions: usize, head_dim: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let mut cos = vec![0.0; positions * head_dim];
    let mut sin = vec![0.0; positions * head_dim];
    for p in 0..positions {
        for i in 0..half {
            let inv_freq = 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32);
            let angle = p as f32 * inv_freq;
            for j in [i, i + half] {
                cos[p * head_dim + j] = angle.cos();
                sin[p * head_dim + j] = angle.sin();
            }
        }
    }
    (cos, sin)
}

/// Rotates each head of `x [t × heads·hd]`: `x·cos + rotate_half(x)·sin`.
pub fn apply_rope(x: &mut [f32], t: usize, heads: usize, hd: usize, cos: &[f32], sin: &[f32]) {
    rotate_halves(x, t, heads, hd, cos, sin, 1.0);
}

/// The inverse rotation (angles negated): RoPE's backward pass, since a
/// rotation's transpose is its inverse.
pub fn unapply_rope(x: &mut [f32], t: usize, heads: usize, hd: usize, cos: &[f32], sin: &[f32]) {
    rotate_halves(x, t, heads, hd, cos, sin, -1.0);
}

/// Rotates each (i, i + hd/2) pair of every head by the position's angle
/// times `direction`.
fn rotate_halves(x: &mut [f32], t: usize, heads: usize, hd: usize, cos: &[f32], sin: &[f32], direction: f32) {
    let half = hd / 2;
    for p in 0..t {
        for h in 0..heads {
            let base = p * heads * hd + h * hd;
            for i in 0..half {
                let (a, b) = (x[base + i], x[base + i + half]);
                let (c, s) = (cos[p * hd + i], direction * sin[p * hd + i]);
                x[base + i] = a * c - b * s;
                x[base + i + half] = b * c + a * s;
            }
        }
    }
}

/// Causal grouped-query attention; returns `[t × heads·hd]` and the
/// probabilities `[heads × t × t]` (zero above the diagonal).
pub fn causal_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
) -> (Vec<f32>, Vec<f32>) {
    let group = nh / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0.0f32; t * nh * hd];
    let mut probs = vec![0.0f32; nh * t * t];
    for h in 0..nh {
        let kvh = h / group;
        for i in 0..t {
            let qi = &q[i * nh * hd + h * hd..i * nh * hd + (h + 1) * hd];
            let scores = &mut probs[(h * t + i) * t..(h * t + i) * t + i + 1];
            let mut max = f32::NEG_INFINITY;
            for (j, s) in scores.iter_mut().enumerate() {
                let kj = &k[j * nkv * hd + kvh * hd..j * nkv * hd + (kvh + 1) * hd];
                *s = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
                max = max.max(*s);
            }
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            for s in scores.iter_mut() {
                *s /= sum;
            }
            let o = &mut out[i * nh * hd + h * hd..i * nh * hd + (h + 1) * hd];
            for (j, p) in scores.iter().enumerate() {
                let vj = &v[j * nkv * hd + kvh * hd..j * nkv * hd + (kvh + 1) * hd];
                for (ov, vv) in o.iter_mut().zip(vj) {
                    *ov += p * vv;
                }
            }
        }
    }
    (out, probs)
}

/// SiLU.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}
