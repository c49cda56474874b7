//! A Llama-family model packed for batched CPU training and evaluation.
//!
//! A batch of sequences is one matrix of rows (`N` = every token of every
//! sequence, a shared prefix counted once): each projection is one GEMM over
//! all of them, attention and RoPE positions stay per sequence, and the LM
//! head (and the last layer from its attention output on) runs only on the
//! rows whose next token is scored (the completion). Tokens that every sequence of the batch starts
//! with (a chat product's system prompt) are rows computed once, read as
//! context by every sequence's attention. The math is the reference's
//! ([`crate::model`], `grad`), checked against it in the tests.

use rayon::prelude::*;

use super::gemm::{MatA, PackedB, Precision, Product, Triangle, gemm, gemm_batch, gemm_plus, gemm_triangular};
use super::pool;
use super::simd;
use crate::TrainerError;
use crate::arch::{LlamaConfig, projection_name};
use crate::grad::LoraGrads;
use crate::lora::LoraAdapter;
use crate::model::Model;
use crate::model::ops::rope_tables;
use crate::objective::{Example, Objective};

/// A frozen weight `W [out × in]` packed for both products training needs:
/// `y = x · Wᵀ` (forward) and `dx = dy · W` (backward); for serving, the
/// forward one only.
#[derive(Debug, Clone)]
pub struct PackedWeight {
    out: usize,
    inp: usize,
    fwd: PackedB,
    bwd: Option<PackedB>,
}

impl PackedWeight {
    /// Packs `w [out × in]` (row-major); `backward`: also for `dy · W`.
    pub fn new(w: &[f32], out: usize, inp: usize, precision: Precision, backward: bool) -> PackedWeight {
        PackedWeight {
            out,
            inp,
            fwd: PackedB::from_transposed(w, out, inp, inp, precision),
            bwd: backward.then(|| PackedB::from_rows(w, out, inp, inp, precision)),
        }
    }

    /// `y [rows × out] = x [rows × in] · Wᵀ`, plus the LoRA term `t · L`
    /// when given.
    pub fn forward(&self, x: &[f32], rows: usize, y: &mut [f32], lora: Option<(&[f32], &PackedB)>) {
        Self::product(MatA::rows(x, self.inp), rows, &self.fwd, y, self.out, lora);
    }

    /// `dx [rows × in] = dy [rows × out] · W`, plus the LoRA term `g · L`
    /// when given. Only on weights packed for training
    /// ([`CpuModel::backward`] checks).
    pub fn backward(&self, dy: &[f32], rows: usize, dx: &mut [f32], lora: Option<(&[f32], &PackedB)>) {
        let bwd = self.bwd.as_ref().expect("a weight packed for training");
        Self::product(MatA::rows(dy, self.out), rows, bwd, dx, self.inp, lora);
    }

    fn product(a: MatA<'_>, rows: usize, b: &PackedB, c: &mut [f32], ldc: usize, lora: Option<(&[f32], &PackedB)>) {
        match lora {
            Some((t, l)) => gemm_plus(a, rows, b, c, ldc, false, (MatA::rows(t, l.k()), l)),
            None => gemm(a, rows, b, c, ldc, false),
        }
    }

    /// Row `r` of `W` (an embedding lookup when `W` is a tied LM head).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        match &self.bwd {
            Some(b) => b.row(r, out),
            None => self.fwd.column(r, out),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.fwd.bytes() + self.bwd.as_ref().map_or(0, PackedB::bytes)
    }
}

/// One decoder layer, packed: q/k/v as one product, gate/up as one.
#[derive(Debug, Clone)]
pub(super) struct Layer {
    pub(super) qkv: PackedWeight,
    pub(super) qkv_bias: Option<Vec<f32>>,
    pub(super) o: PackedWeight,
    pub(super) gate_up: PackedWeight,
    pub(super) down: PackedWeight,
    pub(super) norm1: Vec<f32>,
    pub(super) norm2: Vec<f32>,
}

/// Where a projection's output lives: which fused product and its columns.
#[derive(Debug, Clone, Copy)]
pub(super) struct Slot {
    /// First column in the product's output.
    pub(super) col: usize,
    /// Input width.
    pub(super) inp: usize,
    /// Output width.
    pub(super) out: usize,
}

/// The widths of one model.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dims {
    pub(super) h: usize,
    pub(super) i: usize,
    pub(super) q: usize,
    pub(super) kv: usize,
    pub(super) hd: usize,
    pub(super) nh: usize,
    pub(super) nkv: usize,
    pub(super) vocab: usize,
}

impl Dims {
    fn of(c: &LlamaConfig) -> Dims {
        let hd = c.head_dim();
        Dims {
            h: c.hidden_size,
            i: c.intermediate_size,
            q: c.num_attention_heads * hd,
            kv: c.kv_heads() * hd,
            hd,
            nh: c.num_attention_heads,
            nkv: c.kv_heads(),
            vocab: c.vocab_size,
        }
    }

    /// Width of the fused q/k/v output.
    pub(super) fn qkv(&self) -> usize {
        self.q + 2 * self.kv
    }

    pub(super) fn slot(&self, module: &str) -> Slot {
        let (h, i, q, kv) = (self.h, self.i, self.q, self.kv);
        match module {
            "q_proj" => Slot { col: 0, inp: h, out: q },
            "k_proj" => Slot { col: q, inp: h, out: kv },
            "v_proj" => Slot { col: q + kv, inp: h, out: kv },
            "o_proj" => Slot { col: 0, inp: q, out: h },
            "gate_proj" => Slot { col: 0, inp: h, out: i },
            "up_proj" => Slot { col: i, inp: h, out: i },
            _ => Slot { col: 0, inp: i, out: h },
        }
    }
}

/// A model packed for the batched engine.
#[derive(Debug, Clone)]
pub struct CpuModel {
    /// The model's config.
    pub config: LlamaConfig,
    precision: Precision,
    /// Whether the backward products are packed too.
    trainable: bool,
    pub(super) dims: Dims,
    pub(super) layers: Vec<Layer>,
    pub(super) norm: Vec<f32>,
    pub(super) head: PackedWeight,
    /// The input embedding when the head is not tied to it.
    embed: Option<PackedB>,
}

/// Sequences packed as rows. The tokens every sequence starts with (a chat
/// product's system prompt) are rows `0..offsets[0]`, computed once for
/// all: sequence `s`'s own rows are `offsets[s]..offsets[s + 1]`, at
/// positions `offsets[0]..`, and its attention reads the shared rows' keys and values
/// before its own. A row depends only on the tokens up to it, so this is
/// the same math as a copy of the prefix per sequence; in the backward
/// pass the shared rows receive the sum of every sequence's gradient.
#[derive(Debug, Clone)]
pub struct PackedBatch {
    tokens: Vec<u32>,
    offsets: Vec<usize>,
    /// Per row: its position in its sequence.
    positions: Vec<usize>,
    /// Rows whose next token is scored: (row, next token, sequence).
    scored: Vec<(usize, u32, usize)>,
}

/// Rows that attend among themselves, causally, after `context` rows
/// (those of the shared prefix) that every one of them reads.
#[derive(Debug, Clone, Copy)]
struct Segment {
    start: usize,
    len: usize,
    context: usize,
}

impl PackedBatch {
    /// Packs examples; the completion tokens of each are scored. The tokens
    /// all of them start with, up to (not including) the earliest scored
    /// row of any, are packed once.
    pub fn of(examples: &[Example]) -> Result<PackedBatch, TrainerError> {
        for ex in examples {
            let t = ex.tokens.len();
            if ex.prompt_len == 0 || ex.prompt_len >= t {
                return Err(TrainerError::Format(format!(
                    "a sequence of {t} tokens needs a prompt of 1..{t} tokens, got {}",
                    ex.prompt_len
                )));
            }
        }
        let shared = match examples {
            [first, _, ..] => {
                let limit = examples.iter().map(|e| e.prompt_len - 1).min().unwrap_or(0);
                (0..limit).take_while(|&p| examples.iter().all(|e| e.tokens[p] == first.tokens[p])).count()
            }
            _ => 0,
        };
        let prefix = examples.first().map_or(&[][..], |e| &e.tokens[..shared]);
        let mut b = PackedBatch {
            tokens: prefix.to_vec(),
            offsets: vec![shared],
            positions: (0..shared).collect(),
            scored: Vec::new(),
        };
        for (s, ex) in examples.iter().enumerate() {
            let t = ex.tokens.len();
            // Position `p` (>= shared) of this sequence is row `first + p`.
            let first = b.tokens.len() - shared;
            b.scored.extend((ex.prompt_len - 1..t - 1).map(|p| (first + p, ex.tokens[p + 1], s)));
            b.tokens.extend_from_slice(&ex.tokens[shared..]);
            b.positions.extend(shared..t);
            b.offsets.push(b.tokens.len());
        }
        Ok(b)
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.tokens.len()
    }

    /// Sequences.
    pub fn sequences(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Rows of the prefix every sequence shares (0 when none is shared).
    pub fn shared_rows(&self) -> usize {
        self.offsets[0]
    }

    /// One past the largest position.
    fn positions_end(&self) -> usize {
        self.positions.iter().max().map_or(0, |p| p + 1)
    }

    /// The rows that attend together: the shared prefix (when there is
    /// one), then every sequence's own rows.
    fn segments(&self) -> Vec<Segment> {
        let shared = self.shared_rows();
        self.segment_bounds()
            .windows(2)
            .map(|w| Segment { start: w[0], len: w[1] - w[0], context: if w[0] > 0 { shared } else { 0 } })
            .collect()
    }

    /// Where each segment starts, and where the last one ends.
    fn segment_bounds(&self) -> Vec<usize> {
        let prefix = (self.shared_rows() > 0).then_some(0);
        prefix.into_iter().chain(self.offsets.iter().copied()).collect()
    }

    /// The rows of `m` (`width` wide, one per token), on the pool, each
    /// with its segment and its index there.
    fn par_rows<'a>(
        &'a self,
        m: &'a mut [f32],
        width: usize,
    ) -> impl IndexedParallelIterator<Item = (usize, usize, &'a mut [f32])> + 'a {
        let bounds = self.segment_bounds();
        m.par_chunks_mut(width).enumerate().map(move |(r, row)| {
            let g = bounds.partition_point(|&o| o <= r) - 1;
            (g, r - bounds[g], row)
        })
    }
}

/// What the backward pass needs of one layer's forward pass (inputs of the
/// norms, the fused products' outputs; norm outputs and the SwiGLU product
/// are recomputed, which is cheaper than keeping them). In the last layer,
/// what follows attention (`attn`, `x_mid`, `gate_up`, the last three
/// `lora_t`) holds the scored rows only.
#[derive(Debug, Default)]
struct LayerTrace {
    x_in: Vec<f32>,
    /// q and k after RoPE, v.
    qkv: Vec<f32>,
    /// Attention probabilities per (segment, head), `[len × (context + len)]`.
    probs: Vec<Vec<f32>>,
    attn: Vec<f32>,
    x_mid: Vec<f32>,
    gate_up: Vec<f32>,
    /// `silu(gate) · up`, the down projection's input.
    act: Vec<f32>,
    /// `sigmoid(gate)`.
    sig: Vec<f32>,
    /// `x · Aᵀ` of each group's adapted projections, side by side
    /// (`[rows × Σ r]`, in [`GROUPS`] order).
    lora_t: [Vec<f32>; 4],
}

impl Drop for LayerTrace {
    fn drop(&mut self) {
        let lora_t = self.lora_t.iter_mut().map(std::mem::take);
        let probs = std::mem::take(&mut self.probs);
        let kept = [
            &mut self.x_in,
            &mut self.qkv,
            &mut self.attn,
            &mut self.x_mid,
            &mut self.gate_up,
            &mut self.act,
            &mut self.sig,
        ];
        for v in kept.into_iter().map(std::mem::take).chain(lora_t).chain(probs) {
            pool::give(v);
        }
    }
}

/// The projections of a layer that read the same input, in the order their
/// adapters are stacked: one product computes `x · Aᵀ` for all of them,
/// one `dA`, one `dx`, and the input is packed once for all.
pub(super) const GROUPS: [&[&str]; 4] =
    [&["q_proj", "k_proj", "v_proj"], &["o_proj"], &["gate_proj", "up_proj"], &["down_proj"]];

/// An adapted projection: where its output lives and its adapter.
#[derive(Debug, Clone, Copy)]
pub(super) struct Adapted<'a> {
    pub(super) name: &'static str,
    pub(super) slot: Slot,
    /// `A [r × in]`.
    pub(super) a: &'a [f32],
    /// `B [out × r]`.
    pub(super) b: &'a [f32],
    pub(super) scale: f32,
}

impl Adapted<'_> {
    fn rank(&self) -> usize {
        self.a.len() / self.slot.inp
    }

    /// `scale · B`.
    fn scaled_b(&self) -> Vec<f32> {
        self.b.iter().map(|v| v * self.scale).collect()
    }
}

/// The `A`s of a group's adapted projections, one under the other.
fn stacked_a(group: &[Adapted<'_>]) -> Vec<f32> {
    let mut stacked = Vec::with_capacity(group.iter().map(|m| m.a.len()).sum());
    for m in group {
        stacked.extend_from_slice(m.a);
    }
    stacked
}

/// The projections among `modules` of layer `l` that `lora` adapts.
pub(super) fn adapted_of<'a>(
    lora: Option<&'a LoraAdapter>,
    d: &Dims,
    l: usize,
    modules: &[&'static str],
) -> Vec<Adapted<'a>> {
    let Some(lora) = lora else { return Vec::new() };
    modules
        .iter()
        .filter_map(|m| lora.get(l, m).map(|(a, b, scale)| Adapted { name: m, slot: d.slot(m), a, b, scale }))
        .collect()
}

/// A group's adapter operands, packed once per pass (they change only when
/// the optimizer steps) and for every group of the model at once, on the
/// pool: one at a time, on the thread that runs the products, they took
/// ~9 ms of a ~110M step.
#[derive(Debug)]
pub(super) struct GroupPacks {
    /// `Aᵀ` of the group's projections side by side: `t = x · Aᵀ`.
    down: PackedB,
    /// `L`: each projection's `scale · Bᵀ` at its rows of `t` and its
    /// columns of the product, zero elsewhere; the product adds `t · L`.
    up: PackedB,
    /// What the backward pass needs, when packed for it.
    backward: Option<BackwardPacks>,
}

/// A group's adapter operands for the backward pass.
#[derive(Debug)]
struct BackwardPacks {
    /// Each projection's `scale · B`: `g = dy · B` at its columns of `dy`.
    b: Vec<PackedB>,
    /// The group's `A`s one under the other: `dx += g · A`.
    a: PackedB,
}

impl GroupPacks {
    /// The packs of `group`, whose product is `width` wide, with the terms
    /// the base products add (`up`, and `a` for the backward pass) in
    /// `terms`; `None` when nothing in the group is adapted.
    pub(super) fn of(group: &[Adapted<'_>], width: usize, backward: bool, terms: Precision) -> Option<GroupPacks> {
        let inp = group.first()?.slot.inp;
        let ranks: usize = group.iter().map(Adapted::rank).sum();
        let stacked = stacked_a(group);
        let down = PackedB::from_transposed(&stacked, ranks, inp, inp, Precision::F32);
        let mut l = vec![0.0f32; ranks * width];
        let mut row = 0;
        for m in group {
            for j in 0..m.rank() {
                let dst = &mut l[(row + j) * width + m.slot.col..(row + j) * width + m.slot.col + m.slot.out];
                dst.iter_mut().zip(m.b.iter().skip(j).step_by(m.rank())).for_each(|(d, b)| *d = m.scale * b);
            }
            row += m.rank();
        }
        let up = PackedB::from_rows(&l, ranks, width, width, terms);
        let backward = backward.then(|| BackwardPacks {
            b: group
                .iter()
                .map(|m| PackedB::from_rows(&m.scaled_b(), m.slot.out, m.rank(), m.rank(), Precision::F32))
                .collect(),
            a: PackedB::from_rows(&stacked, ranks, inp, inp, terms),
        });
        Some(GroupPacks { down, up, backward })
    }

    /// The width of the group's input.
    pub(super) fn input_width(&self) -> usize {
        self.down.k()
    }

    /// Every layer's packs (layer-major, [`GROUPS`] order) for `model`.
    pub(super) fn of_model(lora: Option<&LoraAdapter>, model: &CpuModel, backward: bool) -> Vec<Option<GroupPacks>> {
        let (d, layers, terms) = (&model.dims, model.layers.len(), model.lora_term_precision());
        if lora.is_none() {
            return Vec::new();
        }
        let widths = [d.qkv(), d.h, 2 * d.i, d.h];
        (0..layers * GROUPS.len())
            .into_par_iter()
            .map(|i| {
                let (l, g) = (i / GROUPS.len(), i % GROUPS.len());
                GroupPacks::of(&adapted_of(lora, d, l, GROUPS[g]), widths[g], backward, terms)
            })
            .collect()
    }
}

/// A forward pass over a batch.
#[derive(Debug)]
pub struct BatchForward {
    /// `log π(completion | prompt)` per sequence.
    pub logps: Vec<f64>,
    layers: Vec<LayerTrace>,
    x_final: Vec<f32>,
    /// Logits of the scored rows `[scored × vocab]`, kept for the backward pass.
    logits: Vec<f32>,
    /// `log Σ exp` of each scored row.
    lse: Vec<f64>,
    /// The adapter's operands for the backward pass (layer-major,
    /// [`GROUPS`] order; empty unless traced with an adapter).
    packs: Vec<Option<BackwardPacks>>,
}

impl Drop for BatchForward {
    fn drop(&mut self) {
        pool::give(std::mem::take(&mut self.x_final));
        pool::give(std::mem::take(&mut self.logits));
    }
}

/// The scored rows of `m` (`width` wide), in the order of `scored`.
fn scored_rows(m: &[f32], width: usize, scored: &[(usize, u32, usize)]) -> Vec<f32> {
    let mut out = pool::take(scored.len() * width);
    out.par_chunks_mut(width).zip(scored.par_iter()).for_each(|(dst, (r, _, _))| {
        dst.copy_from_slice(&m[r * width..(r + 1) * width]);
    });
    out
}

/// The inverse of [`scored_rows`]: `n` rows, zero but at the scored ones
/// (`scored` is in row order).
fn all_rows(m: &[f32], width: usize, scored: &[(usize, u32, usize)], n: usize) -> Vec<f32> {
    let mut out = pool::take(n * width);
    out.par_chunks_mut(width).enumerate().for_each(|(r, dst)| match scored.binary_search_by_key(&r, |s| s.0) {
        Ok(i) => dst.copy_from_slice(&m[i * width..(i + 1) * width]),
        Err(_) => dst.fill(0.0),
    });
    out
}

/// `x += delta`, on the pool. When `keep` (the trace keeps a layer's
/// residual inputs), the sum goes into a new buffer that replaces `x`, and
/// the old `x` is returned: moved, where copying it took two passes over
/// the residual stream per layer.
fn add_residual(x: &mut Vec<f32>, delta: &[f32], width: usize, keep: bool) -> Option<Vec<f32>> {
    if !keep {
        x.par_chunks_mut(width).zip(delta.par_chunks(width)).for_each(|(x, d)| {
            x.iter_mut().zip(d).for_each(|(a, v)| *a += v);
        });
        return None;
    }
    let mut sum = pool::take(x.len());
    sum.par_chunks_mut(width).zip(x.par_chunks(width).zip(delta.par_chunks(width))).for_each(|(s, (x, d))| {
        s.iter_mut().zip(x.iter().zip(d)).for_each(|(s, (a, v))| *s = a + v);
    });
    Some(std::mem::replace(x, sum))
}

pub(super) fn rms_norm_rows(x: &[f32], width: usize, weight: &[f32], eps: f64) -> Vec<f32> {
    let mut out = pool::take(x.len());
    out.par_chunks_mut(width).zip(x.par_chunks(width)).for_each(|(o, row)| {
        simd::rms_norm(row, weight, eps as f32, o);
    });
    out
}

/// Adds the RMSNorm backward of `dy` into `dx`.
fn rms_norm_backward_into(x: &[f32], width: usize, weight: &[f32], eps: f64, dy: &[f32], dx: &mut [f32]) {
    dx.par_chunks_mut(width).zip(x.par_chunks(width).zip(dy.par_chunks(width))).for_each(|(d, (row, drow))| {
        simd::rms_norm_backward(row, weight, eps as f32, drow, d);
    });
}

/// Rotates the q and k heads of every row of a fused q/k/v matrix by its
/// position's angles (`direction` −1: the inverse, RoPE's backward).
pub(super) fn rope_rows(qkv: &mut [f32], d: &Dims, positions: &[usize], cos: &[f32], sin: &[f32], direction: f32) {
    let (width, hd, half) = (d.qkv(), d.hd, d.hd / 2);
    qkv.par_chunks_mut(width).zip(positions.par_iter()).for_each(|(row, &p)| {
        let (c, s) = (&cos[p * hd..(p + 1) * hd], &sin[p * hd..(p + 1) * hd]);
        for head in 0..d.nh + d.nkv {
            let x = &mut row[head * hd..(head + 1) * hd];
            for i in 0..half {
                let (a, b) = (x[i], x[i + half]);
                let (cv, sv) = (c[i], direction * s[i]);
                x[i] = a * cv - b * sv;
                x[i + half] = b * cv + a * sv;
            }
        }
    });
}

/// [`swiglu`] and `sigmoid(gate)` (both `[n × i]`), for the backward pass.
fn swiglu_keeping_sigmoid(gate_up: &[f32], n: usize, i: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut act, mut sig) = (pool::take(n * i), pool::take(n * i));
    let rows = act.par_chunks_mut(i).zip(sig.par_chunks_mut(i));
    rows.zip(gate_up.par_chunks(2 * i)).for_each(|((a, s), g)| {
        let (gate, up) = g.split_at(i);
        simd::silu_mul_keeping_sigmoid(gate, up, a, s);
    });
    (act, sig)
}

/// `silu(gate) · up` of every row of a fused gate/up matrix `[n × 2i]`.
pub(super) fn swiglu(gate_up: &[f32], n: usize, i: usize) -> Vec<f32> {
    let mut act = pool::take(n * i);
    act.par_chunks_mut(i).zip(gate_up.par_chunks(2 * i)).for_each(|(a, g)| {
        let (gate, up) = g.split_at(i);
        simd::silu_mul(gate, up, a);
    });
    act
}

impl CpuModel {
    /// Packs `model` in `precision` for training and evaluation.
    pub fn new(model: &Model, precision: Precision) -> Result<CpuModel, TrainerError> {
        Self::packed(model, precision, true)
    }

    /// Packs `model` for forward passes only (serving): half the memory.
    pub fn for_serving(model: &Model, precision: Precision) -> Result<CpuModel, TrainerError> {
        Self::packed(model, precision, false)
    }

    fn packed(model: &Model, precision: Precision, trainable: bool) -> Result<CpuModel, TrainerError> {
        super::alloc::keep_freed_memory();
        let c = &model.config;
        let d = Dims::of(c);
        let w = |name: &str| -> Result<&[f32], TrainerError> {
            model
                .tensor(name)
                .map(|t| t.data.as_slice())
                .ok_or_else(|| TrainerError::Format(format!("missing tensor {name}")))
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let weight = |m: &str| w(&format!("{}.weight", projection_name(l, m)));
            let mut qkv = Vec::with_capacity(d.qkv() * d.h);
            for m in ["q_proj", "k_proj", "v_proj"] {
                qkv.extend_from_slice(weight(m)?);
            }
            let bias = |m: &str| model.tensor(&format!("{}.bias", projection_name(l, m)));
            let qkv_bias = match (bias("q_proj"), bias("k_proj"), bias("v_proj")) {
                (None, None, None) => None,
                (q, k, v) => {
                    let mut b = Vec::with_capacity(d.qkv());
                    for (t, n) in [(q, d.q), (k, d.kv), (v, d.kv)] {
                        match t {
                            Some(t) => b.extend_from_slice(&t.data),
                            None => b.extend(std::iter::repeat_n(0.0, n)),
                        }
                    }
                    Some(b)
                }
            };
            let mut gate_up = Vec::with_capacity(2 * d.i * d.h);
            gate_up.extend_from_slice(weight("gate_proj")?);
            gate_up.extend_from_slice(weight("up_proj")?);
            layers.push(Layer {
                qkv: PackedWeight::new(&qkv, d.qkv(), d.h, precision, trainable),
                qkv_bias,
                o: PackedWeight::new(weight("o_proj")?, d.h, d.q, precision, trainable),
                gate_up: PackedWeight::new(&gate_up, 2 * d.i, d.h, precision, trainable),
                down: PackedWeight::new(weight("down_proj")?, d.h, d.i, precision, trainable),
                norm1: w(&format!("model.layers.{l}.input_layernorm.weight"))?.to_vec(),
                norm2: w(&format!("model.layers.{l}.post_attention_layernorm.weight"))?.to_vec(),
            });
        }
        let head = PackedWeight::new(model.head(), d.vocab, d.h, precision, trainable);
        let embed = (!c.tie_word_embeddings)
            .then(|| PackedB::from_rows(model.weight_of("model.embed_tokens.weight"), d.vocab, d.h, d.h, precision));
        Ok(CpuModel {
            config: c.clone(),
            precision,
            trainable,
            dims: d,
            layers,
            norm: w("model.norm.weight")?.to_vec(),
            head,
            embed,
        })
    }

    /// The precision the base is stored in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The precision of the LoRA terms the base products add (`t · scale·Bᵀ`
    /// forward, `g · A` backward): bf16 pairs on a bf16 base, whose products
    /// already round their inputs to bf16, f32 otherwise. The adapters' own
    /// products (`x · Aᵀ`, `g`, `dA`, `dB`) stay f32 at every precision.
    pub(super) fn lora_term_precision(&self) -> Precision {
        match self.precision {
            Precision::Bf16 => Precision::Bf16,
            _ => Precision::F32,
        }
    }

    /// Bytes of packed weights.
    pub fn bytes(&self) -> usize {
        let layers: usize =
            self.layers.iter().map(|l| l.qkv.bytes() + l.o.bytes() + l.gate_up.bytes() + l.down.bytes()).sum();
        layers + self.head.bytes() + self.embed.as_ref().map_or(0, PackedB::bytes)
    }

    pub(super) fn embed_rows(&self, tokens: &[u32]) -> Result<Vec<f32>, TrainerError> {
        let h = self.dims.h;
        if let Some(bad) = tokens.iter().find(|t| **t as usize >= self.dims.vocab) {
            return Err(TrainerError::Format(format!("token {bad} outside the vocabulary of {}", self.dims.vocab)));
        }
        let mut x = pool::take(tokens.len() * h);
        x.par_chunks_mut(h).zip(tokens.par_iter()).for_each(|(row, &t)| match &self.embed {
            Some(e) => e.row(t as usize, row),
            None => self.head.row(t as usize, row),
        });
        Ok(x)
    }

    /// The LoRA terms of a group's product at input `x [rows × in]`:
    /// `t = x · Aᵀ`, every adapted projection's side by side, and `L`
    /// ([`GroupPacks::up`]), so that the product adds `t · L`. `None` when
    /// nothing in the group is adapted (no packs).
    pub(super) fn lora_forward<'p>(
        x: &[f32],
        rows: usize,
        packs: Option<&'p GroupPacks>,
    ) -> Option<(Vec<f32>, &'p PackedB)> {
        let p = packs?;
        let ranks = p.down.n();
        let mut t = pool::take(rows * ranks);
        gemm(MatA::rows(x, p.down.k()), rows, &p.down, &mut t, ranks, false);
        Some((t, &p.up))
    }

    /// Runs the batch forward; keeps what the backward pass needs when
    /// `traced`.
    pub fn forward(
        &self,
        batch: &PackedBatch,
        lora: Option<&LoraAdapter>,
        traced: bool,
    ) -> Result<BatchForward, TrainerError> {
        let c = &self.config;
        let d = self.dims;
        let n = batch.rows();
        let max_t = batch.positions_end();
        if max_t > c.max_position_embeddings {
            return Err(TrainerError::Format(format!("{max_t} tokens exceed {} positions", c.max_position_embeddings)));
        }
        let (cos, sin) = rope_tables(max_t, d.hd, c.rope_theta);
        let mut x = self.embed_rows(&batch.tokens)?;
        let mut traces = Vec::new();
        let last = self.layers.len().wrapping_sub(1);
        // Each group's packs are dropped once its product ran, but for the
        // backward pass's part.
        let mut packs = GroupPacks::of_model(lora, self, traced);
        let keep_backward = traced && !packs.is_empty();
        let mut backward_packs = Vec::with_capacity(packs.len());
        let mut pack = |l: usize, g: usize| packs.get_mut(l * GROUPS.len() + g).and_then(Option::take);
        let mut used = |p: Option<GroupPacks>| {
            if keep_backward {
                backward_packs.push(p.and_then(|p| p.backward));
            }
        };
        for (l, layer) in self.layers.iter().enumerate() {
            let mut tr = LayerTrace::default();
            let normed1 = rms_norm_rows(&x, d.h, &layer.norm1, c.rms_norm_eps);
            let width = d.qkv();
            let mut qkv = pool::take(n * width);
            let p0 = pack(l, 0);
            let lora_qkv = Self::lora_forward(&normed1, n, p0.as_ref());
            layer.qkv.forward(&normed1, n, &mut qkv, lora_qkv.as_ref().map(|(t, l)| (t.as_slice(), *l)));
            if let Some(bias) = &layer.qkv_bias {
                qkv.par_chunks_mut(width).for_each(|row| row.iter_mut().zip(bias).for_each(|(v, b)| *v += b));
            }
            tr.lora_t[0] = lora_qkv.map(|(t, _)| t).unwrap_or_default();
            used(p0);
            pool::give(normed1);
            rope_rows(&mut qkv, &d, &batch.positions, &cos, &sin, 1.0);
            let (mut attn, probs) = self.attention(batch, &qkv);
            // The last layer's outputs are read only at the scored rows (by
            // the head): from its attention output on, it runs on those rows
            // alone, and its input is kept whole for the backward pass.
            let (n, x_whole) = if l == last {
                let scored = scored_rows(&attn, d.q, &batch.scored);
                pool::give(std::mem::replace(&mut attn, scored));
                let scored = scored_rows(&x, d.h, &batch.scored);
                (batch.scored.len(), Some(std::mem::replace(&mut x, scored)))
            } else {
                (n, None)
            };
            let mut o = pool::take(n * d.h);
            let p1 = pack(l, 1);
            let lora_o = Self::lora_forward(&attn, n, p1.as_ref());
            layer.o.forward(&attn, n, &mut o, lora_o.as_ref().map(|(t, l)| (t.as_slice(), *l)));
            tr.lora_t[1] = lora_o.map(|(t, _)| t).unwrap_or_default();
            used(p1);
            let x_in = add_residual(&mut x, &o, d.h, traced);
            let normed2 = rms_norm_rows(&x, d.h, &layer.norm2, c.rms_norm_eps);
            let mut gu = pool::take(n * 2 * d.i);
            let p2 = pack(l, 2);
            let lora_gu = Self::lora_forward(&normed2, n, p2.as_ref());
            layer.gate_up.forward(&normed2, n, &mut gu, lora_gu.as_ref().map(|(t, l)| (t.as_slice(), *l)));
            tr.lora_t[2] = lora_gu.map(|(t, _)| t).unwrap_or_default();
            used(p2);
            pool::give(normed2);
            // The backward pass reads the activation and the sigmoid of
            // `gate` as they are here: computing them again took ~1 % of a
            // step (+2 · rows × intermediate floats a layer kept).
            let (act, sig) =
                if traced { swiglu_keeping_sigmoid(&gu, n, d.i) } else { (swiglu(&gu, n, d.i), Vec::new()) };
            // `o`'s buffer is reused for the down projection.
            let p3 = pack(l, 3);
            let lora_down = Self::lora_forward(&act, n, p3.as_ref());
            layer.down.forward(&act, n, &mut o, lora_down.as_ref().map(|(t, l)| (t.as_slice(), *l)));
            tr.lora_t[3] = lora_down.map(|(t, _)| t).unwrap_or_default();
            used(p3);
            let x_mid = add_residual(&mut x, &o, d.h, traced);
            pool::give(o);
            if traced {
                (tr.act, tr.sig) = (act, sig);
            } else {
                pool::give(act);
            }
            tr.qkv = qkv;
            tr.probs = probs;
            tr.attn = attn;
            tr.gate_up = gu;
            if let (Some(x_in), Some(x_mid)) = (x_in, x_mid) {
                tr.x_in = match x_whole {
                    Some(whole) => {
                        pool::give(x_in);
                        whole
                    }
                    None => x_in,
                };
                tr.x_mid = x_mid;
                traces.push(tr);
            } else if let Some(whole) = x_whole {
                pool::give(whole);
            }
        }
        if self.layers.is_empty() {
            let scored = scored_rows(&x, d.h, &batch.scored);
            pool::give(std::mem::replace(&mut x, scored));
        }
        // The head on the scored rows only (`x` holds only those now).
        let rows = batch.scored.len();
        let hs = rms_norm_rows(&x, d.h, &self.norm, c.rms_norm_eps);
        let mut logits = pool::take(rows * d.vocab);
        self.head.forward(&hs, rows, &mut logits, None);
        pool::give(hs);
        let lse: Vec<f64> = logits.par_chunks(d.vocab).map(simd::log_sum_exp).collect();
        let mut logps = vec![0.0f64; batch.sequences()];
        for ((row, l), (_, target, s)) in logits.chunks(d.vocab).zip(&lse).zip(&batch.scored) {
            logps[*s] += f64::from(row[*target as usize]) - l;
        }
        if !traced {
            pool::give(x);
            pool::give(logits);
            return Ok(BatchForward {
                logps,
                layers: traces,
                x_final: Vec::new(),
                logits: Vec::new(),
                lse: Vec::new(),
                packs: Vec::new(),
            });
        }
        Ok(BatchForward { logps, layers: traces, x_final: x, logits, lse, packs: backward_packs })
    }

    /// Causal attention within each segment (after the shared prefix, for a
    /// sequence's own rows); returns `[rows × q]` and the probabilities per
    /// (segment, head), `[len × (context + len)]`.
    fn attention(&self, batch: &PackedBatch, qkv: &[f32]) -> (Vec<f32>, Vec<Vec<f32>>) {
        let d = self.dims;
        let (width, hd, group) = (d.qkv(), d.hd, d.nh / d.nkv);
        let scale = 1.0 / (hd as f32).sqrt();
        let segments = batch.segments();
        // Per (segment, key/value head): its keys and values are packed
        // once for the query heads of its group.
        let tasks: Vec<(Segment, usize)> = segments.iter().flat_map(|&g| (0..d.nkv).map(move |h| (g, h))).collect();
        let per_task: Vec<Vec<(Vec<f32>, Vec<f32>)>> = tasks
            .par_iter()
            .map(|&(Segment { start: t0, len: t, context: c }, kvh)| {
                let cols = c + t;
                let k = |row: usize| &qkv[row * width + d.q + kvh * hd..];
                let v = |row: usize| &qkv[row * width + d.q + d.kv + kvh * hd..];
                let keys = PackedB::from_transposed(k(t0), t, hd, width, Precision::F32);
                let values = PackedB::from_rows(v(t0), t, hd, width, Precision::F32);
                let context = (c > 0).then(|| {
                    let keys = PackedB::from_transposed(k(0), c, hd, width, Precision::F32);
                    (keys, PackedB::from_rows(v(0), c, hd, width, Precision::F32))
                });
                (kvh * group..(kvh + 1) * group)
                    .map(|h| {
                        // Causal: a block of queries needs only the keys up
                        // to its last one (and, below, those values); every
                        // query reads all of the context.
                        let mut p = pool::take(t * cols);
                        let q = MatA::rows(&qkv[t0 * width + h * hd..], width);
                        if let Some((keys, _)) = &context {
                            gemm(q, t, keys, &mut p, cols, false);
                        }
                        gemm_triangular(q, t, &keys, &mut p[c..], cols, false, Triangle::Output);
                        for i in 0..t {
                            let row = &mut p[i * cols..(i + 1) * cols];
                            simd::softmax_scaled(&mut row[..=c + i], scale);
                            row[c + i + 1..].fill(0.0);
                        }
                        let mut o = vec![0.0f32; t * hd];
                        if let Some((_, values)) = &context {
                            gemm(MatA::rows(&p, cols), t, values, &mut o, hd, false);
                        }
                        gemm_triangular(MatA::rows(&p[c..], cols), t, &values, &mut o, hd, c > 0, Triangle::LowerA);
                        (p, o)
                    })
                    .collect()
            })
            .collect();
        // Per (segment, head), in that order.
        let results: Vec<(Vec<f32>, Vec<f32>)> = per_task.into_iter().flatten().collect();
        let mut attn = pool::take(batch.rows() * d.q);
        batch.par_rows(&mut attn, d.q).for_each(|(g, i, row)| {
            for (h, dst) in row.chunks_exact_mut(hd).enumerate() {
                dst.copy_from_slice(&results[g * d.nh + h].1[i * hd..(i + 1) * hd]);
            }
        });
        (attn, results.into_iter().map(|(p, _)| p).collect())
    }

    /// Attention backward: `dqkv` (q and k before un-rotating) from `dattn`.
    fn attention_backward(&self, batch: &PackedBatch, tr: &LayerTrace, dattn: &[f32]) -> Vec<f32> {
        let d = self.dims;
        let (width, hd, group) = (d.qkv(), d.hd, d.nh / d.nkv);
        let scale = 1.0 / (hd as f32).sqrt();
        let segments = batch.segments();
        let tasks: Vec<(usize, Segment, usize)> =
            segments.iter().enumerate().flat_map(|(g, &s)| (0..d.nkv).map(move |h| (g, s, h))).collect();
        let mut results: Vec<GroupGrads> = tasks
            .par_iter()
            .map(|&(g, Segment { start: t0, len: t, context: c }, kvh)| {
                let cols = c + t;
                let k = |row: usize| &tr.qkv[row * width + d.q + kvh * hd..];
                let v = |row: usize| &tr.qkv[row * width + d.q + d.kv + kvh * hd..];
                let k_rows = PackedB::from_rows(k(t0), t, hd, width, Precision::F32);
                let v_t = PackedB::from_transposed(v(t0), t, hd, width, Precision::F32);
                let context = (c > 0).then(|| {
                    let k_rows = PackedB::from_rows(k(0), c, hd, width, Precision::F32);
                    (k_rows, PackedB::from_transposed(v(0), c, hd, width, Precision::F32))
                });
                let mut grads = GroupGrads {
                    dq: Vec::with_capacity(group),
                    dk: vec![0.0; t * hd],
                    dv: vec![0.0; t * hd],
                    dk_context: vec![0.0; c * hd],
                    dv_context: vec![0.0; c * hd],
                };
                // Causal: query i reaches keys ..=i; key j is reached by
                // queries j.. only; the context's keys by every query.
                for (j, h) in (kvh * group..(kvh + 1) * group).enumerate() {
                    let p = &tr.probs[g * d.nh + h];
                    let dout = MatA::rows(&dattn[t0 * d.q + h * hd..], d.q);
                    let q = &tr.qkv[t0 * width + h * hd..];
                    let mut ds = pool::take(t * cols);
                    if let Some((_, v_t)) = &context {
                        gemm(dout, t, v_t, &mut ds, cols, false);
                    }
                    gemm_triangular(dout, t, &v_t, &mut ds[c..], cols, false, Triangle::Output);
                    for i in 0..t {
                        let (prow, drow) = (&p[i * cols..(i + 1) * cols], &mut ds[i * cols..(i + 1) * cols]);
                        simd::softmax_backward_scaled(&prow[..=c + i], &mut drow[..=c + i], scale);
                        drow[c + i + 1..].fill(0.0);
                    }
                    let mut dq = vec![0.0f32; t * hd];
                    let (q_rows, dout_rows) = (
                        PackedB::from_rows(q, t, hd, width, Precision::F32),
                        PackedB::from_rows(dout.data, t, hd, d.q, Precision::F32),
                    );
                    if let Some((k_rows, _)) = &context {
                        gemm(MatA::rows(&ds, cols), t, k_rows, &mut dq, hd, false);
                        gemm(MatA::transposed(&ds, cols), c, &q_rows, &mut grads.dk_context, hd, j > 0);
                        gemm(MatA::transposed(p, cols), c, &dout_rows, &mut grads.dv_context, hd, j > 0);
                    }
                    let (ds_own, p_own) = (&ds[c..], &p[c..]);
                    gemm_triangular(MatA::rows(ds_own, cols), t, &k_rows, &mut dq, hd, c > 0, Triangle::LowerA);
                    let (ds_t, p_t) = (MatA::transposed(ds_own, cols), MatA::transposed(p_own, cols));
                    gemm_triangular(ds_t, t, &q_rows, &mut grads.dk, hd, j > 0, Triangle::UpperA);
                    gemm_triangular(p_t, t, &dout_rows, &mut grads.dv, hd, j > 0, Triangle::UpperA);
                    pool::give(ds);
                    grads.dq.push(dq);
                }
                grads
            })
            .collect();
        // The shared prefix's keys and values: its own gradient plus every
        // sequence's, added in sequence order (the same sums on any number
        // of threads).
        if batch.shared_rows() > 0 {
            let (prefix, sequences) = results.split_at_mut(d.nkv);
            for seq in sequences.chunks(d.nkv) {
                for (own, read) in prefix.iter_mut().zip(seq) {
                    own.dk.iter_mut().zip(&read.dk_context).for_each(|(a, b)| *a += b);
                    own.dv.iter_mut().zip(&read.dv_context).for_each(|(a, b)| *a += b);
                }
            }
        }
        let mut dqkv = pool::take(batch.rows() * width);
        batch.par_rows(&mut dqkv, width).for_each(|(g, i, row)| {
            let at = i * hd..(i + 1) * hd;
            for (kvh, grads) in results[g * d.nkv..(g + 1) * d.nkv].iter().enumerate() {
                for (j, dq) in grads.dq.iter().enumerate() {
                    let h = kvh * group + j;
                    row[h * hd..(h + 1) * hd].copy_from_slice(&dq[at.clone()]);
                }
                row[d.q + kvh * hd..d.q + (kvh + 1) * hd].copy_from_slice(&grads.dk[at.clone()]);
                row[d.q + d.kv + kvh * hd..d.q + d.kv + (kvh + 1) * hd].copy_from_slice(&grads.dv[at.clone()]);
            }
        });
        dqkv
    }

    /// The LoRA terms of a group's input gradient from the product's
    /// output gradient `dy` (`ldy` wide): `g`, every adapted projection's
    /// `dy · scale · B` side by side, and `L`, their `A`s stacked, so that
    /// the backward product adds `g · L`.
    fn lora_input_grad<'p>(
        dy: &[f32],
        rows: usize,
        group: &[Adapted<'_>],
        packs: &'p BackwardPacks,
        ldy: usize,
    ) -> (Vec<f32>, &'p PackedB) {
        let BackwardPacks { b: bs, a } = packs;
        let ranks = a.k();
        let mut g = vec![0.0f32; rows * ranks];
        let mut col = 0;
        for (m, b) in group.iter().zip(bs) {
            gemm(MatA::rows(&dy[m.slot.col..], ldy), rows, b, &mut g[col..], ranks, false);
            col += m.rank();
        }
        (g, a)
    }

    /// The backward of one group's product `w` at input `x`: `dx` (when
    /// wanted) of the base and the LoRA terms in one product, and each
    /// adapted projection's gradients.
    #[allow(clippy::too_many_arguments)]
    fn group_backward(
        w: &PackedWeight,
        x: &[f32],
        rows: usize,
        group: &[Adapted<'_>],
        packs: Option<&BackwardPacks>,
        t: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
    ) -> Vec<ProjectionGrads> {
        let lora = packs.map(|p| Self::lora_input_grad(dy, rows, group, p, w.out));
        if let Some(dx) = dx {
            w.backward(dy, rows, dx, lora.as_ref().map(|(g, l)| (g.as_slice(), *l)));
        }
        match lora {
            Some((g, _)) => Self::lora_grads(x, rows, group, (t, &g), dy, w.out),
            None => Vec::new(),
        }
    }

    /// Each adapted projection's gradients (`dA`, `dB`) at input `x`, from
    /// the forward's `t` and the backward's `g` (side by side, group order)
    /// and the product's output gradient `dy`.
    fn lora_grads(
        x: &[f32],
        rows: usize,
        group: &[Adapted<'_>],
        (t, g): (&[f32], &[f32]),
        dy: &[f32],
        ldy: usize,
    ) -> Vec<ProjectionGrads> {
        let Some(first) = group.first() else { return Vec::new() };
        let inp = first.slot.inp;
        let ranks: usize = group.iter().map(Adapted::rank).sum();
        // dAᵀ = xᵀ · g: `x` read in place and only the narrow `g` packed
        // (`dA = gᵀ · x` would pack all of `x` for a product of `Σ r` rows);
        // dB = dyᵀ · t per projection. Their `B`s (`g`, then each
        // projection's columns of `t`) are packed side by side, and the
        // products run as one batch.
        let mut operands = vec![(g, ranks)];
        let mut col = 0;
        for m in group {
            operands.push((&t[col..], m.rank()));
            col += m.rank();
        }
        let packs: Vec<PackedB> =
            operands.par_iter().map(|&(v, n)| PackedB::from_rows(v, rows, n, ranks, Precision::F32)).collect();
        let mut dat = vec![0.0f32; inp * ranks];
        let mut dbs: Vec<Vec<f32>> = group.iter().map(|m| vec![0.0f32; m.slot.out * m.rank()]).collect();
        let mut products = vec![Product { a: MatA::transposed(x, inp), m: inp, b: &packs[0], c: &mut dat, ldc: ranks }];
        for ((m, db), b) in group.iter().zip(dbs.iter_mut()).zip(&packs[1..]) {
            let a = MatA::transposed(&dy[m.slot.col..], ldy);
            products.push(Product { a, m: m.slot.out, b, c: db, ldc: m.rank() });
        }
        gemm_batch(products);
        let mut col = 0;
        group
            .iter()
            .zip(dbs)
            .map(|(m, mut db)| {
                let r = m.rank();
                db.iter_mut().for_each(|v| *v *= m.scale);
                // 16 rows of `dat` (3 KiB at most) at a time, each column of
                // them into a run of `da`'s row: `dat` is read once, from L1,
                // and `da`'s rows (8 KiB apart for the down projection) are
                // written in runs.
                let mut da = vec![0.0f32; r * inp];
                for (b, block) in dat.chunks(16 * ranks).enumerate() {
                    for (j, dst) in da.chunks_exact_mut(inp).enumerate() {
                        let run = dst[b * 16..].iter_mut();
                        run.zip(block.chunks_exact(ranks)).for_each(|(d, row)| *d = row[col + j]);
                    }
                }
                col += r;
                (m.name, (da, db))
            })
            .collect()
    }

    /// The gradient of `Σ_s coefs[s] · log π(completion_s | prompt_s)` with
    /// respect to the adapter, from a traced forward pass.
    pub fn backward(
        &self,
        batch: &PackedBatch,
        lora: &LoraAdapter,
        fwd: &BatchForward,
        coefs: &[f32],
    ) -> Result<LoraGrads, TrainerError> {
        let c = &self.config;
        let d = self.dims;
        let n = batch.rows();
        if !self.trainable {
            return Err(TrainerError::Unsupported("this model was packed for serving only".into()));
        }
        let packed = fwd.packs.len() == self.layers.len() * GROUPS.len();
        if fwd.layers.len() != self.layers.len() || !packed || coefs.len() != batch.sequences() {
            return Err(TrainerError::Format(
                "backward needs a traced forward pass of the same batch with the adapter".into(),
            ));
        }
        let (cos, sin) = rope_tables(batch.positions_end(), d.hd, c.rope_theta);
        // d(coef · log softmax[target]) / d logits = coef · (onehot − softmax).
        let mut dlogits = pool::take(fwd.logits.len());
        let rows_in = fwd.logits.par_chunks(d.vocab).zip(fwd.lse.par_iter()).zip(batch.scored.par_iter());
        dlogits.par_chunks_mut(d.vocab).zip(rows_in).for_each(|(dst, ((row, lse), (_, target, s)))| {
            let coef = coefs[*s];
            simd::neg_scaled_softmax(row, *lse as f32, coef, dst);
            dst[*target as usize] += coef;
        });
        let rows = batch.scored.len();
        let mut dhs = vec![0.0f32; rows * d.h];
        self.head.backward(&dlogits, rows, &mut dhs, None);
        pool::give(dlogits);
        // At the scored rows only, as the last layer ran from its attention
        // output on (see `forward`).
        let mut dx = vec![0.0f32; rows * d.h];
        rms_norm_backward_into(&fwd.x_final, d.h, &self.norm, c.rms_norm_eps, &dhs, &mut dx);
        let mut grads = LoraGrads::new();
        let mut record = |l: usize, gs: Vec<ProjectionGrads>| {
            for (m, g) in gs {
                grads.insert((l, m.to_string()), g);
            }
        };
        // Every layer's gradients of the same shapes, each overwritten in
        // full before it is read: taken once per pass.
        let mut dact = pool::take(n * d.i);
        let mut dgu = pool::take(n * 2 * d.i);
        let mut dn2 = pool::take(n * d.h);
        let mut dattn = pool::take(n * d.q);
        let mut dn1 = pool::take(n * d.h);
        let last = self.layers.len().wrapping_sub(1);
        for (l, layer) in self.layers.iter().enumerate().rev() {
            let tr = &fwd.layers[l];
            let group = |g: usize| adapted_of(Some(lora), &d, l, GROUPS[g]);
            let pack = |g: usize| fwd.packs.get(l * GROUPS.len() + g).and_then(Option::as_ref);
            // Rows from the attention output on: the scored ones in the last layer.
            let m = if l == last { rows } else { n };
            let (dact, dgu, dn2) = (&mut dact[..m * d.i], &mut dgu[..m * 2 * d.i], &mut dn2[..m * d.h]);
            // MLP: x_out = x_mid + down(silu(gate) · up), its activation and
            // the sigmoid of `gate` kept by the forward pass.
            let (act, sig) = (&tr.act, &tr.sig);
            record(l, Self::group_backward(&layer.down, act, m, &group(3), pack(3), &tr.lora_t[3], &dx, Some(dact)));
            let swiglu_in = tr.gate_up.par_chunks(2 * d.i).zip(sig.par_chunks(d.i));
            dgu.par_chunks_mut(2 * d.i).zip(swiglu_in.zip(dact.par_chunks(d.i))).for_each(|(dst, ((gu, s), da))| {
                let (gate, up) = gu.split_at(d.i);
                let (dg, du) = dst.split_at_mut(d.i);
                simd::silu_mul_backward(gate, up, s, da, dg, du);
            });
            let normed2 = rms_norm_rows(&tr.x_mid, d.h, &layer.norm2, c.rms_norm_eps);
            record(
                l,
                Self::group_backward(&layer.gate_up, &normed2, m, &group(2), pack(2), &tr.lora_t[2], dgu, Some(dn2)),
            );
            pool::give(normed2);
            rms_norm_backward_into(&tr.x_mid, d.h, &layer.norm2, c.rms_norm_eps, dn2, &mut dx);
            // Attention: x_mid = x_in + o(attention(rope(q), rope(k), v)).
            let dattn_m = &mut dattn[..m * d.q];
            record(
                l,
                Self::group_backward(&layer.o, &tr.attn, m, &group(1), pack(1), &tr.lora_t[1], &dx, Some(dattn_m)),
            );
            if m < n {
                // Back to every row: the others' gradients are zero here.
                let whole = all_rows(&dattn[..m * d.q], d.q, &batch.scored, n);
                pool::give(std::mem::replace(&mut dattn, whole));
                dx = all_rows(&dx, d.h, &batch.scored, n);
            }
            let mut dqkv = self.attention_backward(batch, tr, &dattn);
            rope_rows(&mut dqkv, &d, &batch.positions, &cos, &sin, -1.0);
            let normed1 = rms_norm_rows(&tr.x_in, d.h, &layer.norm1, c.rms_norm_eps);
            // The first layer's input gradient feeds nothing (embeddings are frozen).
            let needs_dx = l > 0;
            let target = if needs_dx { Some(dn1.as_mut_slice()) } else { None };
            record(l, Self::group_backward(&layer.qkv, &normed1, n, &group(0), pack(0), &tr.lora_t[0], &dqkv, target));
            if needs_dx {
                rms_norm_backward_into(&tr.x_in, d.h, &layer.norm1, c.rms_norm_eps, &dn1, &mut dx);
            }
            pool::give(normed1);
            pool::give(dqkv);
        }
        for v in [dact, dgu, dn2, dattn, dn1] {
            pool::give(v);
        }
        Ok(grads)
    }

    /// `log π(completion | prompt)` of each example under `lora` (or the
    /// base), in batches of at most `rows_per_pass` tokens.
    pub fn completion_logprobs(
        &self,
        examples: &[Example],
        lora: Option<&LoraAdapter>,
        rows_per_pass: usize,
    ) -> Result<Vec<f64>, TrainerError> {
        on_pool(|| self.completion_logprobs_here(examples, lora, rows_per_pass))
    }

    fn completion_logprobs_here(
        &self,
        examples: &[Example],
        lora: Option<&LoraAdapter>,
        rows_per_pass: usize,
    ) -> Result<Vec<f64>, TrainerError> {
        let mut out = Vec::with_capacity(examples.len());
        let mut start = 0;
        while start < examples.len() {
            let mut end = start;
            let mut rows = 0;
            while end < examples.len() && (end == start || rows + examples[end].tokens.len() <= rows_per_pass) {
                rows += examples[end].tokens.len();
                end += 1;
            }
            let batch = PackedBatch::of(&examples[start..end])?;
            out.extend(std::mem::take(&mut self.forward(&batch, lora, false)?.logps));
            start = end;
        }
        Ok(out)
    }

    /// The mean loss of a batch under `objective` and its gradient with
    /// respect to `lora` (the engine's counterpart of
    /// [`crate::objective::batch_loss_and_grads`]).
    pub fn loss_and_grads(
        &self,
        lora: &LoraAdapter,
        examples: &[Example],
        objective: &Objective,
    ) -> Result<(f64, LoraGrads), TrainerError> {
        on_pool(|| self.loss_and_grads_here(lora, examples, objective))
    }

    fn loss_and_grads_here(
        &self,
        lora: &LoraAdapter,
        examples: &[Example],
        objective: &Objective,
    ) -> Result<(f64, LoraGrads), TrainerError> {
        if examples.is_empty() {
            return Err(TrainerError::Format("empty batch".into()));
        }
        let batch = PackedBatch::of(examples)?;
        let fwd = self.forward(&batch, Some(lora), true)?;
        let reference = if objective.needs_reference() {
            std::mem::take(&mut self.forward(&batch, None, false)?.logps)
        } else {
            vec![0.0; examples.len()]
        };
        let terms = objective.terms(examples, &fwd.logps, &reference);
        let n = examples.len() as f64;
        let loss = terms.iter().map(|(l, _)| l / n).sum();
        let coefs: Vec<f32> = terms.iter().map(|(_, dl)| (dl / n) as f32).collect();
        if coefs.iter().all(|c| *c == 0.0) {
            return Ok((loss, LoraGrads::new()));
        }
        let grads = self.backward(&batch, lora, &fwd, &coefs)?;
        Ok((loss, grads))
    }
}

/// Runs `work` on a thread of the current rayon pool (at once when already
/// on one). The passes start a parallel product or element-wise loop every
/// few hundred microseconds; from a thread outside the pool each is handed
/// over and waited for by sleeping, on a pool thread it is a join the other
/// threads steal from: +3 % tokens/s at the ~110M shape on 2 cores.
pub(super) fn on_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| work())
}

/// An adapted projection's name and its gradients (`dA`, `dB`).
type ProjectionGrads = (&'static str, (Vec<f32>, Vec<f32>));

/// Attention gradients of one (segment, key/value head).
struct GroupGrads {
    /// Of each query head of the group.
    dq: Vec<Vec<f32>>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    /// Of the shared prefix's keys and values, from this segment's queries.
    dk_context: Vec<f32>,
    dv_context: Vec<f32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SplitMix;
    use crate::arch::PROJECTIONS;
    use crate::grad::completion_logprob_grad;
    use crate::objective::batch_loss_and_grads;
    use crate::tiny::{random_model, tiny_config, tiny_model};

    fn examples(vocab: u32) -> Vec<Example> {
        let mut rng = SplitMix(4);
        [(9usize, 4usize), (14, 9), (6, 1), (11, 5)]
            .iter()
            .enumerate()
            .map(|(i, &(len, prompt))| Example {
                tokens: (0..len).map(|_| rng.below(u64::from(vocab)) as u32).collect(),
                prompt_len: prompt,
                reward: [0.75, -0.25, 0.5, -1.0][i],
                accepted: i % 2 == 0,
                behavior_logprob: None,
            })
            .collect()
    }

    /// Four examples whose first `common` tokens are the same, with prompts
    /// of 6 to 9 tokens (so at most 5 rows can be shared).
    fn sharing_a_prefix(vocab: u32, common: usize) -> Vec<Example> {
        let mut rng = SplitMix(7);
        let start: Vec<u32> = (0..common).map(|_| rng.below(u64::from(vocab)) as u32).collect();
        [(12usize, 6usize), (14, 9), (9, 7), (11, 8)]
            .iter()
            .enumerate()
            .map(|(i, &(len, prompt))| Example {
                tokens: start
                    .iter()
                    .copied()
                    .chain((common..len).map(|_| rng.below(u64::from(vocab)) as u32))
                    .collect(),
                prompt_len: prompt,
                reward: [0.75, -0.25, 0.5, -1.0][i],
                accepted: i % 2 == 0,
                behavior_logprob: None,
            })
            .collect()
    }

    /// The test batches and the rows each shares: none, a common start of
    /// 4 tokens, and one longer than the shortest prompt allows.
    fn batches(vocab: u32) -> [(Vec<Example>, usize); 3] {
        [(examples(vocab), 0), (sharing_a_prefix(vocab, 4), 4), (sharing_a_prefix(vocab, 8), 5)]
    }

    #[test]
    fn a_common_prefix_is_packed_once() {
        for (batch, shared) in batches(256) {
            let packed = PackedBatch::of(&batch).unwrap();
            assert_eq!(packed.shared_rows(), shared);
            let tokens: usize = batch.iter().map(|e| e.tokens.len()).sum();
            assert_eq!(packed.rows(), tokens - (batch.len() - 1) * shared);
            let scored: usize = batch.iter().map(|e| e.tokens.len() - e.prompt_len).sum();
            assert_eq!(packed.scored.len(), scored);
            for &(row, next, s) in &packed.scored {
                let position = packed.positions[row];
                assert_eq!(batch[s].tokens[position + 1], next);
                assert_eq!(batch[s].tokens[position], packed.tokens[row]);
            }
        }
        // One sequence shares with nobody.
        assert_eq!(PackedBatch::of(&sharing_a_prefix(256, 4)[..1]).unwrap().shared_rows(), 0);
    }

    fn adapter(model: &Model) -> LoraAdapter {
        let mut lora = LoraAdapter::init(&model.config, 3, 6.0, &PROJECTIONS, 9).unwrap();
        let mut rng = SplitMix(2);
        for (_, b) in lora.weights.values_mut() {
            b.iter_mut().for_each(|v| *v = rng.uniform(0.1));
        }
        lora
    }

    fn close(a: f64, b: f64, rel: f64, abs: f64) -> bool {
        (a - b).abs() <= abs + rel * b.abs()
    }

    /// `model` with every matrix the engine packs rounded to bf16 (norms and
    /// biases stay f32, as the engine keeps them).
    fn bf16_rounded(model: &Model) -> Model {
        let mut tensors = model.tensors().clone();
        for (name, t) in &mut tensors {
            if name.ends_with(".weight") && t.shape.len() == 2 {
                t.data.iter_mut().for_each(|v| *v = crate::cpu::gemm::round_bf16(*v));
            }
        }
        Model::from_tensors(model.config.clone(), tensors).unwrap()
    }

    /// The one-sequence reference's log-probability of each example and
    /// its gradients of `Σ coef · log π`, summed over the batch.
    fn reference_grads(model: &Model, lora: &LoraAdapter, batch: &[Example], coefs: &[f32]) -> (Vec<f64>, LoraGrads) {
        let mut logps = Vec::with_capacity(batch.len());
        let mut sum = LoraGrads::new();
        for (ex, coef) in batch.iter().zip(coefs) {
            let (lp, g) = completion_logprob_grad(model, lora, &ex.tokens, ex.prompt_len, *coef).unwrap();
            logps.push(lp);
            for (k, (a, b)) in g {
                let e = sum.entry(k).or_insert_with(|| (vec![0.0; a.len()], vec![0.0; b.len()]));
                e.0.iter_mut().zip(&a).for_each(|(x, y)| *x += y);
                e.1.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
            }
        }
        (logps, sum)
    }

    #[test]
    fn f32_engine_matches_the_reference_in_logprobs_and_every_gradient() {
        // The tiny model has q/k/v biases and an untied head; a tied GQA
        // shape checks the other branches. bf16-stored weights are exact
        // bf16 values multiplied in f32: the same sums as the f32 reference
        // on a model whose matrices were rounded to bf16 first.
        let mut tied = tiny_config();
        tied.tie_word_embeddings = true;
        tied.num_key_value_heads = Some(1);
        let models = [tiny_model(5).unwrap(), random_model(tied, false, 6).unwrap()];
        for (given, precision) in models.iter().flat_map(|m| [(m, Precision::F32), (m, Precision::Bf16Weights)]) {
            let engine = CpuModel::new(given, precision).unwrap();
            let model = if precision == Precision::F32 { given.clone() } else { bf16_rounded(given) };
            let lora = adapter(&model);
            for (batch, shared) in batches(model.config.vocab_size as u32) {
                let packed = PackedBatch::of(&batch).unwrap();
                assert_eq!(packed.shared_rows(), shared);
                let fwd = engine.forward(&packed, Some(&lora), true).unwrap();
                let coefs = [0.5f32, -1.0, 0.25, 2.0];
                let grads = engine.backward(&packed, &lora, &fwd, &coefs).unwrap();
                let (logps, want) = reference_grads(&model, &lora, &batch, &coefs);
                for (got, lp) in fwd.logps.iter().zip(logps) {
                    assert!(close(*got, lp, 1e-5, 1e-5), "{precision:?} {shared}: logp {got} vs {lp}");
                }
                assert_eq!(grads.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
                for (k, (wa, wb)) in &want {
                    let (ga, gb) = &grads[k];
                    let scale = wa.iter().chain(wb).fold(0.0f32, |m, v| m.max(v.abs())) as f64;
                    for (g, w) in ga.iter().chain(gb).zip(wa.iter().chain(wb)) {
                        let tol = 1e-5 * scale.max(1e-3);
                        assert!(
                            close(f64::from(*g), f64::from(*w), 1e-3, tol),
                            "{precision:?} {shared} {k:?}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn objectives_agree_with_the_reference_path() {
        let model = tiny_model(3).unwrap();
        let lora = adapter(&model);
        let engine = CpuModel::new(&model, Precision::F32).unwrap();
        let batch = examples(256);
        for objective in [
            Objective::Reinforce { kl_coef: 0.1, ppo_clip: None, reject_floor: None },
            Objective::Kto { beta: 0.1, desirable_weight: 1.0, undesirable_weight: 1.0 },
            Objective::Sft,
        ] {
            let (l1, g1) = batch_loss_and_grads(&model, &lora, &batch, &objective).unwrap();
            let (l2, g2) = engine.loss_and_grads(&lora, &batch, &objective).unwrap();
            assert!(close(l1, l2, 1e-5, 1e-6), "{objective:?}: loss {l1} vs {l2}");
            for (k, (a, b)) in &g1 {
                let (c, d) = &g2[k];
                for (x, y) in a.iter().chain(b).zip(c.iter().chain(d)) {
                    assert!(close(f64::from(*x), f64::from(*y), 2e-3, 1e-6), "{objective:?} {k:?}: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn bf16_engine_stays_within_bf16_tolerance_of_the_reference() {
        let model = tiny_model(5).unwrap();
        let lora = adapter(&model);
        let engine = CpuModel::new(&model, Precision::Bf16).unwrap();
        let batch = examples(256);
        let want: Vec<f64> =
            batch.iter().map(|e| crate::objective::completion_logprob(&model, Some(&lora), e).unwrap()).collect();
        let got = engine.completion_logprobs(&batch, Some(&lora), 1 << 20).unwrap();
        for (g, w) in got.iter().zip(&want) {
            // bf16 keeps 8 bits of mantissa: per-token log-probs move by
            // about 1 %.
            assert!(close(*g, *w, 0.03, 0.05), "{g} vs {w}");
        }
    }

    #[test]
    fn bf16_engine_gradients_stay_within_bf16_tolerance_of_the_reference() {
        // bf16 products round their inputs (and, on this base, the LoRA
        // terms the products add) to 8 bits of mantissa: each projection's
        // gradient, as a whole, stays within a few per cent of the f32
        // reference's on the same bf16-rounded weights.
        let model = bf16_rounded(&tiny_model(5).unwrap());
        let lora = adapter(&model);
        let engine = CpuModel::new(&model, Precision::Bf16).unwrap();
        for (batch, shared) in batches(256) {
            let packed = PackedBatch::of(&batch).unwrap();
            let fwd = engine.forward(&packed, Some(&lora), true).unwrap();
            let coefs = [0.5f32, -1.0, 0.25, 2.0];
            let grads = engine.backward(&packed, &lora, &fwd, &coefs).unwrap();
            let (_, want) = reference_grads(&model, &lora, &batch, &coefs);
            assert_eq!(grads.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>());
            for (k, (wa, wb)) in &want {
                let (ga, gb) = &grads[k];
                for (got, w) in [(ga, wa), (gb, wb)] {
                    let norm = w.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
                    let err = got.iter().zip(w).map(|(g, w)| f64::from(g - w).powi(2)).sum::<f64>().sqrt();
                    assert!(
                        norm > 0.0 && err <= 0.05 * norm,
                        "{shared} shared, {k:?}: error {err} against a gradient of norm {norm}"
                    );
                }
            }
        }
    }

    #[test]
    fn adapters_are_bit_identical_across_thread_counts() {
        let model = tiny_model(5).unwrap();
        let lora = adapter(&model);
        let objective = Objective::Reinforce { kl_coef: 0.0, ppo_clip: None, reject_floor: None };
        for ((batch, _), precision) in batches(256)
            .into_iter()
            .flat_map(|b| [Precision::F32, Precision::Bf16, Precision::Bf16Weights].map(|p| (b.clone(), p)))
        {
            let engine = CpuModel::new(&model, precision).unwrap();
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| engine.loss_and_grads(&lora, &batch, &objective).unwrap())
            };
            let (l1, g1) = run(1);
            let (l2, g2) = run(2);
            assert_eq!(l1.to_bits(), l2.to_bits());
            assert_eq!(g1, g2, "{precision:?}");
        }
    }
}
