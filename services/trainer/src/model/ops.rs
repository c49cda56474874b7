//! The decoder's elementwise and attention operations on row-major
//! slices, shared by the reference forward pass, the backward pass and the
//! batched CPU engine so all three compute them the same way.

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
