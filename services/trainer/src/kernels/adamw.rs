//! CPU twins of `adamw.cu`: the optimiser over flat fp32 buffers.

/// `sum_squares` then the host's ordered f64 sum: Σ g².
pub fn sum_squares(g: &[f32]) -> f64 {
    g.iter().map(|v| f64::from(*v) * f64::from(*v)).sum()
}

/// Settings of one `adamw_step` launch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// 1 − β₁ᵗ.
    pub bias1: f32,
    /// 1 − β₂ᵗ.
    pub bias2: f32,
    /// Clip factor applied to the gradient (1 without clipping).
    pub grad_scale: f32,
}

/// `adamw_step`, in fp32 as the kernel computes it.
pub fn adamw_step(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: AdamWStep) {
    for i in 0..p.len() {
        let gi = g[i] * s.grad_scale;
        let mi = s.beta1 * m[i] + (1.0 - s.beta1) * gi;
        let vi = s.beta2 * v[i] + (1.0 - s.beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        let update = (mi / s.bias1) / ((vi / s.bias2).sqrt() + s.eps) + s.weight_decay * p[i];
        p[i] -= s.lr * update;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grad::LoraGrads;
    use crate::lora::LoraAdapter;
    use crate::optim::{AdamW, clip_grad_norm};

    /// The flat fp32 twin follows the reference optimiser (f64 inside) for
    /// several steps with clipping and decay, within fp32 rounding.
    #[test]
    fn the_flat_twin_follows_the_reference_optimizer() {
        let mut rng = crate::SplitMix(9);
        let key = (0usize, "q_proj".to_string());
        let (a0, b0): (Vec<f32>, Vec<f32>) =
            ((0..40).map(|_| rng.uniform(0.5)).collect(), (0..24).map(|_| rng.uniform(0.5)).collect());
        let mut lora = LoraAdapter {
            rank: 4,
            alpha: 8.0,
            targets: vec!["q_proj".into()],
            weights: [(key.clone(), (a0, b0))].into(),
        };
        let mut flat: Vec<f32> = lora.weights[&key].0.iter().chain(&lora.weights[&key].1).copied().collect();
        let (mut m, mut v) = (vec![0.0; flat.len()], vec![0.0; flat.len()]);
        let mut reference = AdamW::new(0.01);
        for step in 1..=5 {
            let mut grads = LoraGrads::new();
            let g: Vec<f32> = (0..flat.len()).map(|_| rng.uniform(2.0)).collect();
            grads.insert(key.clone(), (g[..40].to_vec(), g[40..].to_vec()));
            let norm = sum_squares(&g).sqrt();
            assert!((clip_grad_norm(&mut grads, 1.0) - norm).abs() < 1e-9);
            reference.update(&mut lora, &grads, 1e-2);
            let step_settings = AdamWStep {
                lr: 1e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
                bias1: 1.0 - 0.9f32.powi(step),
                bias2: 1.0 - 0.999f32.powi(step),
                grad_scale: if norm > 1.0 { (1.0 / norm) as f32 } else { 1.0 },
            };
            adamw_step(&mut flat, &g, &mut m, &mut v, step_settings);
        }
        let want: Vec<f32> = lora.weights[&key].0.iter().chain(&lora.weights[&key].1).copied().collect();
        for (got, want) in flat.iter().zip(&want) {
            assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{got} vs {want}");
        }
    }
}
