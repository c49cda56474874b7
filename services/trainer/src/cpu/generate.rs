//! Serving on the CPU: many users' requests decoded together with a
//! key/value cache, each with its own adapter (base + LoRA applied per row,
//! no merged copy of the model per version) and its own seeded sampler.
//!
//! Every step runs the frozen base as one product over all active rows, then
//! each adapter's low-rank update on its own rows. A row's numbers do not
//! depend on which other requests share its batch (each output of a product
//! is summed over `k` in the same order whatever the rows), so a request's
//! completion depends only on its prompt, adapter and seed.

use std::collections::{BTreeMap, HashMap};

use rayon::prelude::*;

use super::engine::{CpuModel, GROUPS, GroupPacks, PackedWeight, rms_norm_rows, rope_rows, swiglu};
use super::gemm::{MatA, gemm};
use super::simd;
use crate::lora::LoraAdapter;
use crate::model::ops::rope_tables;
use crate::{SplitMix, TrainerError};

/// How tokens are drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Softmax temperature; 0 takes the most likely token.
    pub temperature: f64,
    /// Nucleus: draw from the smallest set of tokens whose probabilities sum
    /// to at least this (1: every token).
    pub top_p: f64,
    /// Seed of this request's draws.
    pub seed: u64,
}

/// One completion to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest<'a> {
    /// Prompt tokens (non-empty).
    pub prompt: &'a [u32],
    /// The adapter to serve (None: the base).
    pub adapter: Option<&'a LoraAdapter>,
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Sampling settings.
    pub sampling: Sampling,
    /// Tokens that end the completion (included in it), e.g. end-of-turn.
    pub stop: &'a [u32],
    /// Tokens that may be drawn (None: all).
    pub allowed: Option<&'a [bool]>,
}

/// A generated completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// Completion tokens (a stop token, when one was drawn, is the last).
    pub tokens: Vec<u32>,
    /// `log π(completion | prompt)` under the served policy at temperature 1
    /// without mask or nucleus: the behaviour log-probability the trainer
    /// compares against.
    pub logprob: f64,
    /// Whether a stop token ended it (else it ran out of tokens).
    pub stopped: bool,
}

/// Keys (after RoPE) and values of every position of one sequence, per layer.
#[derive(Debug, Default)]
struct Cache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl Cache {
    /// An empty cache with room for `positions` rows of `width` values per
    /// layer.
    fn with_room(layers: usize, positions: usize, width: usize) -> Cache {
        let room = || (0..layers).map(|_| Vec::with_capacity(positions * width)).collect();
        Cache { k: room(), v: room() }
    }
}

/// One row to run: its sequence, token and position.
#[derive(Debug, Clone, Copy)]
struct Row {
    seq: usize,
    token: u32,
    pos: usize,
}

impl CpuModel {
    /// Generates a completion for every request, decoding them together.
    pub fn generate(&self, requests: &[GenerateRequest<'_>]) -> Result<Vec<Generated>, TrainerError> {
        super::engine::on_pool(|| self.generate_here(requests))
    }

    fn generate_here(&self, requests: &[GenerateRequest<'_>]) -> Result<Vec<Generated>, TrainerError> {
        let vocab = self.config.vocab_size;
        for r in requests {
            if r.prompt.is_empty() {
                return Err(TrainerError::Format("generation needs a non-empty prompt".into()));
            }
            if let Some(allowed) = r.allowed
                && (allowed.len() != vocab || !allowed.iter().any(|a| *a))
            {
                return Err(TrainerError::Format(format!(
                    "the allowed-token mask must cover {vocab} tokens, one or more allowed"
                )));
            }
            if !(r.sampling.temperature >= 0.0 && r.sampling.top_p > 0.0 && r.sampling.top_p <= 1.0) {
                return Err(TrainerError::Format("temperature must be ≥ 0 and top_p in (0, 1]".into()));
            }
        }
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let longest = requests.iter().map(|r| r.prompt.len() + r.max_new_tokens).max().unwrap_or(0);
        if longest > self.config.max_position_embeddings {
            return Err(TrainerError::Format(format!(
                "{longest} tokens exceed {} positions",
                self.config.max_position_embeddings
            )));
        }
        let (cos, sin) = rope_tables(longest.max(1), self.dims.hd, self.config.rope_theta);
        // Adapters by identity: rows sharing one run its update together.
        let mut adapters: Vec<&LoraAdapter> = Vec::new();
        let adapter_of: Vec<Option<usize>> = requests
            .iter()
            .map(|r| {
                r.adapter.map(|a| match adapters.iter().position(|b| std::ptr::eq(*b, a)) {
                    Some(i) => i,
                    None => {
                        adapters.push(a);
                        adapters.len() - 1
                    }
                })
            })
            .collect();
        // Each adapter's operands, packed once for every step of the
        // generation (they were packed again at every step, per module).
        let packs: Vec<Vec<Option<GroupPacks>>> =
            adapters.iter().map(|a| GroupPacks::of_model(Some(*a), self, false)).collect();
        // Requests with the same prompt and adapter (users asking the same
        // question of the same model) share one pass over the prompt: the
        // first of them runs it and the others start from copies of its cache
        // and logits. A row's numbers do not depend on its batch, so each
        // copy holds the bits its own pass would have given.
        let mut first_asker: HashMap<(&[u32], Option<usize>), usize> = HashMap::new();
        let source: Vec<usize> = requests
            .iter()
            .zip(&adapter_of)
            .enumerate()
            .map(|(s, (r, a))| *first_asker.entry((r.prompt, *a)).or_insert(s))
            .collect();
        // Room for every position up front: a cache grown row by row was
        // copied to a new allocation again and again.
        let mut caches: Vec<Cache> = requests
            .iter()
            .map(|r| Cache::with_room(self.layers.len(), r.prompt.len() + r.max_new_tokens, self.dims.kv))
            .collect();
        let mut rngs: Vec<SplitMix> = requests.iter().map(|r| SplitMix(r.sampling.seed)).collect();
        let mut out: Vec<Generated> =
            requests.iter().map(|_| Generated { tokens: Vec::new(), logprob: 0.0, stopped: false }).collect();
        // Draws each listed sequence's next token from its logits; returns
        // the rows of the sequences that go on (a finished one's cache is
        // dropped).
        let mut advance = |picked: Vec<(usize, &[f32])>, caches: &mut [Cache]| -> Vec<Row> {
            let mut next = Vec::new();
            for (seq, row_logits) in picked {
                let r = &requests[seq];
                let (token, logprob) = draw(row_logits, r.sampling, r.allowed, &mut rngs[seq]);
                let g = &mut out[seq];
                g.tokens.push(token);
                g.logprob += logprob;
                g.stopped = r.stop.contains(&token);
                if !g.stopped && g.tokens.len() < r.max_new_tokens {
                    next.push(Row { seq, token, pos: r.prompt.len() + g.tokens.len() - 1 });
                } else {
                    caches[seq] = Cache::default();
                }
            }
            next
        };
        // The prompts, once per first asker; then every asker draws from its
        // first asker's logits, with a copy of its cache.
        let prompts: Vec<Row> = requests
            .iter()
            .enumerate()
            .filter(|(s, _)| source[*s] == *s)
            .flat_map(|(s, r)| r.prompt.iter().enumerate().map(move |(p, &t)| Row { seq: s, token: t, pos: p }))
            .collect();
        let logits = self.step(&prompts, &adapter_of, &packs, &mut caches, &cos, &sin)?;
        let at: HashMap<usize, &[f32]> = logits.iter().map(|(s, l)| (*s, l.as_slice())).collect();
        for (s, &from) in source.iter().enumerate().filter(|(s, from)| *s != **from) {
            // The first asker comes first: `from < s`.
            let (before, rest) = caches.split_at_mut(s);
            let (src, to) = (&before[from], &mut rest[0]);
            for (to, src) in to.k.iter_mut().zip(&src.k).chain(to.v.iter_mut().zip(&src.v)) {
                to.extend_from_slice(src);
            }
        }
        let mut rows = advance(source.iter().enumerate().map(|(s, from)| (s, at[from])).collect(), &mut caches);
        while !rows.is_empty() {
            let logits = self.step(&rows, &adapter_of, &packs, &mut caches, &cos, &sin)?;
            rows = advance(logits.iter().map(|(s, l)| (*s, l.as_slice())).collect(), &mut caches);
        }
        Ok(out)
    }

    /// Runs `rows` through the model (appending their keys and values to
    /// the caches) and returns the logits of each sequence's last row.
    fn step(
        &self,
        rows: &[Row],
        adapter_of: &[Option<usize>],
        packs: &[Vec<Option<GroupPacks>>],
        caches: &mut [Cache],
        cos: &[f32],
        sin: &[f32],
    ) -> Result<Vec<(usize, Vec<f32>)>, TrainerError> {
        let c = &self.config;
        let d = self.dims;
        let n = rows.len();
        let tokens: Vec<u32> = rows.iter().map(|r| r.token).collect();
        let positions: Vec<usize> = rows.iter().map(|r| r.pos).collect();
        // Rows per adapter, in row order.
        let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, r) in rows.iter().enumerate() {
            if let Some(a) = adapter_of[r.seq] {
                groups.entry(a).or_default().push(i);
            }
        }
        // One adapter for every row: the common case, a model served through
        // its current adapter.
        let shared = match groups.iter().next() {
            Some((a, members)) if groups.len() == 1 && members.len() == n => Some(*a),
            _ => None,
        };
        // `y = x · Wᵀ` for group `g` of layer `l` ([`GROUPS`]), with the
        // adapters' terms. A shared adapter's are added inside the product's
        // tiles, as in training. Otherwise each adapter's rows get theirs as
        // a product of their own, added after: the same bits (a tile adds its
        // sums to `C` as it stores them), so a completion does not depend on
        // the batch it is served in.
        let product = |w: &PackedWeight, x: &[f32], l: usize, g: usize, y: &mut [f32]| {
            let pack = |a: usize| packs[a][l * GROUPS.len() + g].as_ref();
            if let Some(a) = shared {
                let term = CpuModel::lora_forward(x, n, pack(a));
                w.forward(x, n, y, term.as_ref().map(|(t, l)| (t.as_slice(), *l)));
                return;
            }
            w.forward(x, n, y, None);
            let ldy = y.len() / n;
            for (a, members) in &groups {
                let Some(p) = pack(*a) else { continue };
                let inp = p.input_width();
                let mut xs = Vec::with_capacity(members.len() * inp);
                for &i in members {
                    xs.extend_from_slice(&x[i * inp..(i + 1) * inp]);
                }
                let Some((t, l)) = CpuModel::lora_forward(&xs, members.len(), Some(p)) else { continue };
                let mut ys = vec![0.0f32; members.len() * ldy];
                gemm(MatA::rows(&t, l.k()), members.len(), l, &mut ys, ldy, false);
                for (j, &i) in members.iter().enumerate() {
                    let (dst, src) = (&mut y[i * ldy..(i + 1) * ldy], &ys[j * ldy..(j + 1) * ldy]);
                    dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
                }
            }
        };
        let mut x = self.embed_rows(&tokens)?;
        let width = d.qkv();
        for (l, layer) in self.layers.iter().enumerate() {
            let normed1 = rms_norm_rows(&x, d.h, &layer.norm1, c.rms_norm_eps);
            let mut qkv = vec![0.0f32; n * width];
            product(&layer.qkv, &normed1, l, 0, &mut qkv);
            if let Some(bias) = &layer.qkv_bias {
                qkv.par_chunks_mut(width).for_each(|row| row.iter_mut().zip(bias).for_each(|(v, b)| *v += b));
            }
            rope_rows(&mut qkv, &d, &positions, cos, sin, 1.0);
            for (i, r) in rows.iter().enumerate() {
                let row = &qkv[i * width..(i + 1) * width];
                let cache = &mut caches[r.seq];
                // Checked in tests (this crate is built without debug
                // assertions in the dev profile, for the kernels' speed).
                if cfg!(any(test, debug_assertions)) {
                    assert_eq!(cache.k[l].len(), r.pos * d.kv, "rows of a sequence arrive in order");
                }
                cache.k[l].extend_from_slice(&row[d.q..d.q + d.kv]);
                cache.v[l].extend_from_slice(&row[d.q + d.kv..]);
            }
            let attn = self.cached_attention(rows, &qkv, caches, l);
            let mut o = vec![0.0f32; n * d.h];
            product(&layer.o, &attn, l, 1, &mut o);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let normed2 = rms_norm_rows(&x, d.h, &layer.norm2, c.rms_norm_eps);
            let mut gu = vec![0.0f32; n * 2 * d.i];
            product(&layer.gate_up, &normed2, l, 2, &mut gu);
            let act = swiglu(&gu, n, d.i);
            product(&layer.down, &act, l, 3, &mut o);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        }
        // Logits of each sequence's last row in this step.
        let mut last: BTreeMap<usize, usize> = BTreeMap::new();
        for (i, r) in rows.iter().enumerate() {
            last.insert(r.seq, i);
        }
        let picked: Vec<(usize, usize)> = last.into_iter().collect();
        let mut hs = Vec::with_capacity(picked.len() * d.h);
        for (_, i) in &picked {
            hs.extend_from_slice(&x[i * d.h..(i + 1) * d.h]);
        }
        let hs = rms_norm_rows(&hs, d.h, &self.norm, c.rms_norm_eps);
        let mut logits = vec![0.0f32; picked.len() * d.vocab];
        self.head.forward(&hs, picked.len(), &mut logits, None);
        Ok(picked.iter().zip(logits.chunks(d.vocab)).map(|((s, _), l)| (*s, l.to_vec())).collect())
    }

    /// Each row's query heads over its sequence's cached keys and values
    /// up to its own position (causal).
    fn cached_attention(&self, rows: &[Row], qkv: &[f32], caches: &[Cache], l: usize) -> Vec<f32> {
        let d = self.dims;
        let (width, hd, group) = (d.qkv(), d.hd, d.nh / d.nkv);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut attn = vec![0.0f32; rows.len() * d.q];
        attn.par_chunks_mut(d.q).zip(rows.par_iter().enumerate()).for_each(|(out, (i, r))| {
            let (keys, values) = (&caches[r.seq].k[l], &caches[r.seq].v[l]);
            let mut scores = Vec::with_capacity(r.pos + 1);
            for h in 0..d.nh {
                let q = &qkv[i * width + h * hd..i * width + (h + 1) * hd];
                let offset = (h / group) * hd;
                let cached = simd::Cached { keys, values, stride: d.kv, offset, count: r.pos + 1 };
                simd::attend(q, cached, scale, &mut scores, &mut out[h * hd..(h + 1) * hd]);
            }
        });
        attn
    }
}

/// Draws the next token from one row of logits; returns it and its
/// temperature-1 log-probability under the whole vocabulary.
fn draw(logits: &[f32], s: Sampling, allowed: Option<&[bool]>, rng: &mut SplitMix) -> (u32, f64) {
    let lse = simd::log_sum_exp(logits);
    let ok = |i: usize| allowed.is_none_or(|a| a[i]);
    let pick = if s.temperature == 0.0 {
        let mut best = None::<(usize, f32)>;
        for (i, v) in logits.iter().enumerate() {
            if ok(i) && best.is_none_or(|(_, b)| *v > b) {
                best = Some((i, *v));
            }
        }
        best.map_or(0, |(i, _)| i)
    } else {
        let inv_t = 1.0 / s.temperature;
        let max = logits.iter().enumerate().filter(|(i, _)| ok(*i)).fold(f32::NEG_INFINITY, |m, (_, v)| m.max(*v));
        // Tokens under e⁻¹⁶ of the best token's weight cannot matter: all
        // 49k of a vocabulary together would weigh under 1 % of it.
        let floor = f64::from(max) - 16.0 * s.temperature;
        let mut weights: Vec<(usize, f64)> = logits
            .iter()
            .enumerate()
            .filter(|(i, v)| ok(*i) && f64::from(**v) >= floor)
            .map(|(i, v)| (i, ((f64::from(*v) - f64::from(max)) * inv_t).exp()))
            .collect();
        if s.top_p < 1.0 {
            // Largest first, ties by token id, so the nucleus is well defined.
            weights.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let total: f64 = weights.iter().map(|w| w.1).sum();
            let mut kept = 0.0;
            let mut keep = weights.len();
            for (j, w) in weights.iter().enumerate() {
                kept += w.1;
                if kept >= s.top_p * total {
                    keep = j + 1;
                    break;
                }
            }
            weights.truncate(keep);
        }
        let total: f64 = weights.iter().map(|w| w.1).sum();
        let mut target = rng.unit() * total;
        let mut pick = weights.last().map_or(0, |w| w.0);
        for (i, w) in &weights {
            if target < *w {
                pick = *i;
                break;
            }
            target -= w;
        }
        pick
    };
    (pick as u32, f64::from(logits[pick]) - lse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::PROJECTIONS;
    use crate::cpu::gemm::Precision;
    use crate::tiny::tiny_model;

    fn trained_adapter(model: &crate::model::Model, seed: u64) -> LoraAdapter {
        let mut lora = LoraAdapter::init(&model.config, 4, 8.0, &PROJECTIONS, seed).unwrap();
        let mut rng = SplitMix(seed + 100);
        for (_, b) in lora.weights.values_mut() {
            b.iter_mut().for_each(|v| *v = rng.uniform(0.2));
        }
        lora
    }

    #[test]
    fn cached_greedy_decoding_equals_full_forward_decoding() {
        // Greedy decoding with the cache must pick, at every step, the argmax
        // of the full (uncached) reference forward over the tokens so far.
        let model = tiny_model(8).unwrap();
        let packed = CpuModel::new(&model, Precision::F32).unwrap();
        let lora = trained_adapter(&model, 1);
        let prompts: Vec<Vec<u32>> =
            vec![b"hello there".iter().map(|&b| u32::from(b)).collect(), vec![7, 9], vec![200]];
        let greedy = Sampling { temperature: 0.0, top_p: 1.0, seed: 0 };
        let reqs: Vec<GenerateRequest<'_>> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| GenerateRequest {
                prompt: p,
                adapter: (i != 1).then_some(&lora),
                max_new_tokens: 8,
                sampling: greedy,
                stop: &[],
                allowed: None,
            })
            .collect();
        let got = packed.generate(&reqs).unwrap();
        let serving = CpuModel::for_serving(&model, Precision::F32).unwrap();
        assert_eq!(serving.generate(&reqs).unwrap(), got, "packed for serving only, same completions");
        for (r, g) in reqs.iter().zip(&got) {
            let mut seq = r.prompt.to_vec();
            let mut logprob = 0.0;
            for &t in &g.tokens {
                let logits = model.forward(&seq, r.adapter).unwrap();
                let last = &logits[(seq.len() - 1) * 256..seq.len() * 256];
                let best = (0..256).max_by(|a, b| last[*a].total_cmp(&last[*b])).unwrap();
                assert_eq!(t as usize, best, "step {} of {:?}", seq.len(), r.prompt);
                let max = last.iter().fold(f64::NEG_INFINITY, |m, v| m.max(f64::from(*v)));
                let lse = max + last.iter().map(|v| (f64::from(*v) - max).exp()).sum::<f64>().ln();
                logprob += f64::from(last[best]) - lse;
                seq.push(t);
            }
            assert_eq!(g.tokens.len(), 8);
            assert!((g.logprob - logprob).abs() < 1e-4, "{} vs {logprob}", g.logprob);
        }
    }

    #[test]
    fn a_completion_depends_on_its_seed_not_on_its_batch() {
        // Alone, one adapter serves every row (its terms inside the base
        // products); in a crowd, its rows' terms are a product of their own.
        for precision in [Precision::F32, Precision::Bf16] {
            completion_alone_equals_completion_in_a_crowd(precision);
        }
    }

    fn completion_alone_equals_completion_in_a_crowd(precision: Precision) {
        let model = tiny_model(8).unwrap();
        let packed = CpuModel::new(&model, precision).unwrap();
        let lora = trained_adapter(&model, 2);
        let prompt: Vec<u32> = b"fn main".iter().map(|&b| u32::from(b)).collect();
        let other: Vec<u32> = b"let x = 1;".iter().map(|&b| u32::from(b)).collect();
        let allowed: Vec<bool> = (0..=255u8).map(|b| b.is_ascii_lowercase() || b == b' ').collect();
        let space = [u32::from(b' ')];
        let req = |p: &'static str, seed: u64| -> GenerateRequest<'_> {
            GenerateRequest {
                prompt: if p == "main" { &prompt } else { &other },
                adapter: if p == "main" { Some(&lora) } else { None },
                max_new_tokens: 12,
                sampling: Sampling { temperature: 0.8, top_p: 0.9, seed },
                stop: &space,
                allowed: Some(&allowed),
            }
        };
        let alone = packed.generate(&[req("main", 5)]).unwrap();
        // Requests sharing a prompt and adapter share its pass: the later
        // ones start from copies of the first one's cache and logits.
        let crowd = packed.generate(&[req("other", 1), req("main", 5), req("other", 2), req("main", 7)]).unwrap();
        assert_eq!(alone[0], crowd[1], "{precision:?}");
        assert_eq!(packed.generate(&[req("main", 7)]).unwrap()[0], crowd[3], "{precision:?}");
        assert_eq!(packed.generate(&[req("other", 2)]).unwrap()[0], crowd[2], "{precision:?}");
        assert!(alone[0].tokens.iter().all(|&t| allowed[t as usize]));
        assert!(alone[0].stopped == (alone[0].tokens.last() == Some(&u32::from(b' '))));
        assert_ne!(packed.generate(&[req("main", 6)]).unwrap()[0].tokens, alone[0].tokens);
    }

    #[test]
    fn the_nucleus_keeps_only_the_likeliest_tokens() {
        // Logits with one dominant token: top_p 0.5 always picks it.
        let mut logits = vec![0.0f32; 50];
        logits[17] = 5.0;
        let mut rng = SplitMix(3);
        let s = Sampling { temperature: 1.0, top_p: 0.5, seed: 0 };
        assert!((0..200).all(|_| draw(&logits, s, None, &mut rng).0 == 17));
        let wide = Sampling { top_p: 1.0, ..s };
        assert!((0..400).any(|_| draw(&logits, wide, None, &mut rng).0 != 17));
    }
}
