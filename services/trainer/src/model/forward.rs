//! The forward pass in f32, optionally through LoRA adapters, and the
//! activations it keeps for the backward pass.

use super::Model;
use super::ops::{apply_rope, causal_attention, rms_norm, rope_tables, silu};
use crate::TrainerError;
use crate::arch::projection_name;
use crate::linalg::matmul_t;
use crate::lora::LoraAdapter;

impl Model {
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
    pub(crate) fn forward_traced(
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
}

/// What one decoder layer's forward pass leaves for the backward pass.
#[derive(Debug, Clone, Default)]
pub(crate) struct LayerTrace {
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
pub(crate) struct Trace {
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
