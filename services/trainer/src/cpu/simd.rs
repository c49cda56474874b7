//! Element-wise passes of the engine (SwiGLU, softmax rows), written once in
//! plain Rust and compiled three times: for any x86-64 and, behind a
//! run-time CPU check, with AVX-512 enabled (16 lanes wide) or with AVX2
//! (8 lanes wide). The three builds do the same IEEE operations in the same
//! order (Rust never fuses a multiply and an add by itself), so results do
//! not depend on which runs.
//!
//! `exp` is computed here instead of through libm so that loops over it
//! vectorise: libm's `expf` is a call per element, and the engine takes
//! about a hundred million exponentials per training step (SiLU forward and
//! backward in every layer, the softmax over the vocabulary).

#![allow(unsafe_code)]

use super::gemm::Isa;

/// `eˣ` to about 2 ulp over `[−87.3, 88]` (0 below, about 1.65·10³⁸
/// above, so `e^−∞` pads a vector exactly): Cody–Waite reduction by ln 2 and a
/// degree-6 polynomial on the remainder. Integer work is done on float bits
/// (no float→int cast, which would not vectorise).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5·2²³: adding it leaves a small integer in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    const LOW: f32 = -87.336_54;
    let given = x;
    let x = x.clamp(LOW, 88.0);
    let n = (x * LOG2E).round_ties_even();
    let r = x - n * LN2_HI - n * LN2_LO;
    // Taylor coefficients of eʳ for |r| ≤ ln2/2.
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let n_bits = (n + SHIFTER).to_bits().wrapping_sub(SHIFTER.to_bits());
    let value = p * f32::from_bits(n_bits.wrapping_add(127) << 23);
    if given < LOW { 0.0 } else { value }
}

/// `1 / (1 + e⁻ˣ)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Runs `body` compiled with AVX-512 or AVX2 when this CPU has it, else as is.
macro_rules! dispatch {
    ($(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            fn wide($($arg: $ty),*) $(-> $ret)? {
                generic($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) $(-> $ret)? {
                generic($($arg),*)
            }
            match Isa::detect() {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU has AVX-512F (detected at run time).
                Isa::Avx512 | Isa::Avx512Bf16 => unsafe { wide($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the CPU has AVX2 and FMA (detected at run time).
                Isa::Avx2 => unsafe { avx2($($arg),*) },
                _ => generic($($arg),*),
            }
        }
    };
}

dispatch! {
    /// `out = silu(gate) · up`, element-wise.
    pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
            *o = g * sigmoid(*g) * u;
        }
    }
}

dispatch! {
    /// [`silu_mul`], also writing `sig = sigmoid(gate)` for
    /// [`silu_mul_backward`] (which then need not compute it again).
    pub fn silu_mul_keeping_sigmoid(gate: &[f32], up: &[f32], out: &mut [f32], sig: &mut [f32]) {
        for (((o, s), g), u) in out.iter_mut().zip(sig.iter_mut()).zip(gate).zip(up) {
            let v = sigmoid(*g);
            *s = v;
            *o = g * v * u;
        }
    }
}

dispatch! {
    /// SwiGLU backward: from `dact` for `act = silu(gate) · up`, the
    /// gradients of `gate` and `up`, given `sig = sigmoid(gate)` (see
    /// [`silu_mul_keeping_sigmoid`]).
    pub fn silu_mul_backward(gate: &[f32], up: &[f32], sig: &[f32], dact: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
        let inputs = gate.iter().zip(up).zip(sig).zip(dact);
        for ((dg, du), (((g, u), sig), d)) in dgate.iter_mut().zip(dup.iter_mut()).zip(inputs) {
            let sig = *sig;
            *dg = d * u * sig * (1.0 + g * (1.0 - sig));
            *du = d * g * sig;
        }
    }
}

dispatch! {
    /// `log Σ eᵛ` of a row (max-shifted; the sum in 16 f32 lanes, then f64).
    pub fn log_sum_exp(row: &[f32]) -> f64 {
        let mut lanes = [f32::NEG_INFINITY; 16];
        let chunks = row.chunks_exact(16);
        let rest = chunks.remainder();
        for c in chunks {
            for (m, v) in lanes.iter_mut().zip(c) {
                *m = m.max(*v);
            }
        }
        let max = rest.iter().fold(lanes.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b)), |a, b| a.max(*b));
        let mut sums = [0.0f32; 16];
        let chunks = row.chunks_exact(16);
        for c in chunks {
            for (s, v) in sums.iter_mut().zip(c) {
                *s += exp(v - max);
            }
        }
        let mut total: f64 = sums.iter().map(|s| f64::from(*s)).sum();
        total += rest.iter().map(|v| f64::from(exp(v - max))).sum::<f64>();
        f64::from(max) + total.ln()
    }
}

dispatch! {
    /// `out = −coef · softmax(row)` given the row's `log Σ eᵛ`.
    pub fn neg_scaled_softmax(row: &[f32], lse: f32, coef: f32, out: &mut [f32]) {
        for (o, v) in out.iter_mut().zip(row) {
            *o = -coef * exp(v - lse);
        }
    }
}

/// `Σ aᵢ·bᵢ` in 16 lanes, then the lanes in order (a fixed order, so the
/// same sum with or without AVX-512).
#[inline(always)]
fn dot16(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for ((s, x), y) in lanes.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// 16 lanes combined by halves (8 pairs, 4, 2, 1): four dependent steps
/// instead of fifteen.
#[inline(always)]
fn halves(mut lanes: [f32; 16], op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut width = 8;
    while width > 0 {
        for i in 0..width {
            lanes[i] = op(lanes[i], lanes[i + width]);
        }
        width /= 2;
    }
    lanes[0]
}

/// `Σ aᵢ·bᵢ·cᵢ`, summed as [`dot16`] sums.
#[inline(always)]
fn dot3_16(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let (ca, cb, cc) = (a.chunks_exact(16), b.chunks_exact(16), c.chunks_exact(16));
    let rest = ca.remainder().iter().zip(cb.remainder()).zip(cc.remainder());
    let tail: f32 = rest.map(|((x, y), z)| x * y * z).sum();
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for (((s, x), y), z) in lanes.iter_mut().zip(x).zip(y).zip(z) {
            *s += x * y * z;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

dispatch! {
    /// RMSNorm of one row: `out = weight · row / √(mean(row²) + eps)`. The
    /// mean is summed in 16 lanes: a sum in order is a chain of dependent
    /// adds (576 per SmolLM2 row), which had made the norms about 4 % of a
    /// training step.
    pub fn rms_norm(row: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        let inv = 1.0 / (dot16(row, row) / row.len() as f32 + eps).sqrt();
        for ((o, v), w) in out.iter_mut().zip(row).zip(weight) {
            *o = w * (v * inv);
        }
    }
}

dispatch! {
    /// RMSNorm backward of one row: adds to `dx` the gradient with respect
    /// to `row` of the normalised row whose gradient is `dy`.
    pub fn rms_norm_backward(row: &[f32], weight: &[f32], eps: f32, dy: &[f32], dx: &mut [f32]) {
        let width = row.len() as f32;
        let inv = 1.0 / (dot16(row, row) / width + eps).sqrt();
        let k = inv * inv * inv * dot3_16(dy, weight, row) / width;
        for ((o, (dv, w)), v) in dx.iter_mut().zip(dy.iter().zip(weight)).zip(row) {
            *o += inv * dv * w - k * v;
        }
    }
}

dispatch! {
    /// `row ← softmax(scale · row)` in place (attention probabilities of
    /// one query over the keys it may see).
    pub fn softmax_scaled(row: &mut [f32], scale: f32) {
        // The last partial chunk runs as a whole one padded with −∞ (whose
        // exponential is 0): attention rows are 1 to `t` long, and their
        // tails, one exponential at a time, had been most of the work.
        let full = row.len() / 16 * 16;
        let mut last = [f32::NEG_INFINITY; 16];
        last[..row.len() - full].copy_from_slice(&row[full..]);
        let mut lanes = [f32::NEG_INFINITY; 16];
        for c in row[..full].chunks_exact(16).chain([&last[..]]) {
            let c: &[f32; 16] = c.try_into().expect("16 lanes");
            for (m, v) in lanes.iter_mut().zip(c) {
                // A plain comparison (one `vmaxps`; `f32::max`'s NaN rule
                // costs a compare and a blend more): a NaN score is skipped
                // here and still turns its row's sum, so the row, into NaN.
                let v = v * scale;
                *m = if v > *m { v } else { *m };
            }
        }
        let max = halves(lanes, f32::max);
        let mut sums = [0.0f32; 16];
        for c in row[..full].chunks_exact_mut(16).chain([&mut last[..]]) {
            let c: &mut [f32; 16] = c.try_into().expect("16 lanes");
            for (s, v) in sums.iter_mut().zip(c.iter_mut()) {
                *v = exp(*v * scale - max);
                *s += *v;
            }
        }
        let tail = row.len() - full;
        row[full..].copy_from_slice(&last[..tail]);
        let inv = 1.0 / halves(sums, |a, b| a + b);
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

dispatch! {
    /// Softmax backward of one attention row: `ds ← scale · p · (ds − Σ p·ds)`
    /// for probabilities `p` and their gradient `ds`.
    pub fn softmax_backward_scaled(p: &[f32], ds: &mut [f32], scale: f32) {
        let weighted = dot16(p, ds);
        for (d, pv) in ds.iter_mut().zip(p) {
            *d = pv * (*d - weighted) * scale;
        }
    }
}

dispatch! {
    /// One AdamW step of a tensor ([`crate::optim::AdamW::update`]), element
    /// by element in f64; `h` is `[β₁, β₂, 1 − β₁ᵗ, 1 − β₂ᵗ, ε, weight
    /// decay, learning rate]`.
    pub fn adamw(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: [f64; 7]) {
        assert!(g.len() == w.len() && m.len() == w.len() && v.len() == w.len(), "a moment per weight");
        let [b1, b2, c1, c2, eps, decay, lr] = h;
        for (((w, g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let gi = f64::from(*g);
            let mi = b1 * f64::from(*m) + (1.0 - b1) * gi;
            let vi = b2 * f64::from(*v) + (1.0 - b2) * gi * gi;
            *m = mi as f32;
            *v = vi as f32;
            let update = (mi / c1) / ((vi / c2).sqrt() + eps) + decay * f64::from(*w);
            *w = (f64::from(*w) - lr * update) as f32;
        }
    }
}

/// Cached keys and values of `count` positions: those of position `j` start
/// at `j · stride + offset` in `keys` / `values`.
#[derive(Debug, Clone, Copy)]
pub struct Cached<'a> {
    /// Keys (after RoPE).
    pub keys: &'a [f32],
    /// Values.
    pub values: &'a [f32],
    /// Floats between positions.
    pub stride: usize,
    /// Where this head's slice starts within a position.
    pub offset: usize,
    /// Positions to attend over.
    pub count: usize,
}

dispatch! {
    /// One query head attending over cached positions:
    /// `out = Σ_j softmax(q·k_j · scale)_j · v_j` (`scores`: scratch).
    pub fn attend(q: &[f32], cached: Cached<'_>, scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
        let Cached { keys, values, stride, offset, count: t } = cached;
        let hd = q.len();
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for j in 0..t {
            let k = &keys[j * stride + offset..j * stride + offset + hd];
            let mut lanes = [0.0f32; 16];
            for (qc, kc) in q.chunks_exact(16).zip(k.chunks_exact(16)) {
                for ((l, a), b) in lanes.iter_mut().zip(qc).zip(kc) {
                    *l += a * b;
                }
            }
            let tail: f32 = q.chunks_exact(16).remainder().iter().zip(k.chunks_exact(16).remainder()).map(|(a, b)| a * b).sum();
            let s = (lanes.iter().sum::<f32>() + tail) * scale;
            max = max.max(s);
            scores.push(s);
        }
        let mut sum = 0.0f32;
        for s in scores.iter_mut() {
            *s = exp(*s - max);
            sum += *s;
        }
        out.fill(0.0);
        for (j, p) in scores.iter().enumerate() {
            let w = p / sum;
            let v = &values[j * stride + offset..j * stride + offset + hd];
            for (o, x) in out.iter_mut().zip(v) {
                *o += w * x;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp_of_libm_over_the_range() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(f64::from((got - want).abs() / want));
            x += 0.0137;
        }
        assert!(worst < 4e-7, "largest relative error {worst:e}");
        // Below the range: exactly 0 (the padding of a partial vector).
        assert_eq!((exp(-200.0), exp(f32::NEG_INFINITY)), (0.0, 0.0));
        assert!((exp(-87.336_54) / f32::MIN_POSITIVE - 1.0).abs() < 1e-5);
        assert!(exp(88.0) > 1.6e38 && exp(88.0).is_finite());
        assert!(exp(0.0) == 1.0 && exp(-1000.0) < 1e-37 && exp(1000.0).is_finite());
    }

    #[test]
    fn rms_norm_and_its_backward_match_their_formulas() {
        // Widths with and without a partial last vector.
        for n in [1usize, 5, 16, 17, 40, 576] {
            let f = |i: usize, m: usize, k: usize| ((i * m) % k) as f32 / k as f32 - 0.4;
            let (row, weight, dy): (Vec<f32>, Vec<f32>, Vec<f32>) = (
                (0..n).map(|i| f(i, 37, 11)).collect(),
                (0..n).map(|i| 1.0 + f(i, 5, 7)).collect(),
                (0..n).map(|i| f(i, 13, 17)).collect(),
            );
            let eps = 1e-5f64;
            let v = |i: usize| f64::from(row[i]);
            let inv = 1.0 / ((0..n).map(|i| v(i) * v(i)).sum::<f64>() / n as f64 + eps).sqrt();
            let dot: f64 = (0..n).map(|i| f64::from(dy[i]) * f64::from(weight[i]) * v(i)).sum();
            let mut out = vec![0.0f32; n];
            rms_norm(&row, &weight, eps as f32, &mut out);
            let mut dx = vec![0.5f32; n];
            rms_norm_backward(&row, &weight, eps as f32, &dy, &mut dx);
            for i in 0..n {
                let want = f64::from(weight[i]) * v(i) * inv;
                assert!((f64::from(out[i]) - want).abs() <= 1e-5 * want.abs().max(1.0), "n {n}: {} vs {want}", out[i]);
                let want = 0.5 + inv * f64::from(dy[i]) * f64::from(weight[i]) - inv.powi(3) * dot * v(i) / n as f64;
                assert!((f64::from(dx[i]) - want).abs() <= 1e-4 * want.abs().max(1.0), "n {n}: {} vs {want}", dx[i]);
            }
        }
    }

    #[test]
    fn attention_softmax_and_its_backward_match_their_formulas() {
        for n in [1usize, 5, 16, 17, 40] {
            let row: Vec<f32> = (0..n).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
            let scale = 0.125f32;
            let max = row.iter().fold(f64::NEG_INFINITY, |m, v| m.max(f64::from(*v * scale)));
            let total: f64 = row.iter().map(|v| (f64::from(*v * scale) - max).exp()).sum();
            let want: Vec<f64> = row.iter().map(|v| (f64::from(*v * scale) - max).exp() / total).collect();
            let mut got = row.clone();
            softmax_scaled(&mut got, scale);
            for (g, w) in got.iter().zip(&want) {
                assert!((f64::from(*g) - w).abs() <= 1e-6, "n {n}: {g} vs {w}");
            }
            let ds: Vec<f32> = (0..n).map(|i| ((i * 13) % 7) as f32 * 0.25 - 0.5).collect();
            let weighted: f64 = got.iter().zip(&ds).map(|(p, d)| f64::from(*p) * f64::from(*d)).sum();
            let mut back = ds.clone();
            softmax_backward_scaled(&got, &mut back, scale);
            for ((b, p), d) in back.iter().zip(&got).zip(&ds) {
                let w = f64::from(*p) * (f64::from(*d) - weighted) * f64::from(scale);
                assert!((f64::from(*b) - w).abs() <= 1e-6, "n {n}: {b} vs {w}");
            }
        }
    }

    #[test]
    fn silu_and_log_sum_exp_match_their_formulas() {
        let gate: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) / 37.0).collect();
        let up: Vec<f32> = (0..1000).map(|i| ((i * 7) % 13) as f32 / 5.0 - 1.0).collect();
        let mut out = vec![0.0; 1000];
        silu_mul(&gate, &up, &mut out);
        for ((o, g), u) in out.iter().zip(&gate).zip(&up) {
            let want = g / (1.0 + (-g).exp()) * u;
            assert!((o - want).abs() <= 1e-6 * want.abs().max(1.0), "{o} vs {want}");
        }
        // The same values when the sigmoid is kept, and the backward pass
        // from it against the derivatives in f64.
        let (mut kept, mut sig) = (vec![0.0; 1000], vec![0.0; 1000]);
        silu_mul_keeping_sigmoid(&gate, &up, &mut kept, &mut sig);
        assert_eq!(kept, out);
        let dact: Vec<f32> = (0..1000).map(|i| ((i * 11) % 17) as f32 / 8.0 - 1.0).collect();
        let (mut dgate, mut dup) = (vec![0.0; 1000], vec![0.0; 1000]);
        silu_mul_backward(&gate, &up, &sig, &dact, &mut dgate, &mut dup);
        for i in 0..1000 {
            let (g, u, d) = (f64::from(gate[i]), f64::from(up[i]), f64::from(dact[i]));
            let sig = 1.0 / (1.0 + (-g).exp());
            let (want_g, want_u) = (d * u * sig * (1.0 + g * (1.0 - sig)), d * g * sig);
            assert!(
                (f64::from(dgate[i]) - want_g).abs() <= 1e-5 * want_g.abs().max(1.0),
                "{i}: {} vs {want_g}",
                dgate[i]
            );
            assert!((f64::from(dup[i]) - want_u).abs() <= 1e-5 * want_u.abs().max(1.0), "{i}: {} vs {want_u}", dup[i]);
        }
        let lse = log_sum_exp(&gate);
        let want = gate.iter().map(|v| f64::from(*v).exp()).sum::<f64>().ln();
        assert!((lse - want).abs() < 1e-5, "{lse} vs {want}");
    }
}
