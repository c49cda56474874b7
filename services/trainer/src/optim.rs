//! AdamW over the LoRA parameters (fp32 master weights), global-norm
//! gradient clipping, and a linear warm-up then cosine learning-rate
//! schedule. Deterministic: no randomness, fixed iteration order.

use std::collections::HashMap;

use rayon::prelude::*;

use crate::grad::LoraGrads;
use crate::lora::LoraAdapter;

/// The learning rate at `step` (0-based): linear warm-up over `warmup`
/// steps to `peak`, then cosine decay to 10 % of it at `total`.
pub fn learning_rate(step: u64, warmup: u64, total: u64, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let floor = 0.1 * peak;
    floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Scales `grads` so their global L2 norm is at most `max_norm`; returns the
/// norm before clipping.
pub fn clip_grad_norm(grads: &mut LoraGrads, max_norm: f64) -> f64 {
    // Per tensor on the pool, added in key order: the same on any number of
    // threads. One running sum was a chain of dependent adds (2.5 ms of a
    // ~110M step).
    let sums: Vec<f64> = grads.par_iter().map(|(_, (a, b))| sum_of_squares(a) + sum_of_squares(b)).collect();
    let norm = sums.iter().sum::<f64>().sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = (max_norm / norm) as f32;
        grads.par_iter_mut().for_each(|(_, (a, b))| a.iter_mut().chain(b.iter_mut()).for_each(|g| *g *= scale));
    }
    norm
}

/// `Σ x²` in f64, in eight interleaved partial sums.
fn sum_of_squares(x: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|v| f64::from(*v) * f64::from(*v)).sum();
    for chunk in chunks {
        for (l, v) in lanes.iter_mut().zip(chunk) {
            *l += f64::from(*v) * f64::from(*v);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// AdamW state.
#[derive(Debug, Clone)]
pub struct AdamW {
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    step: u64,
    moments: LoraGrads,
    squares: LoraGrads,
}

impl AdamW {
    /// AdamW with PyTorch's default betas and epsilon.
    pub fn new(weight_decay: f64) -> AdamW {
        AdamW {
            weight_decay,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 0,
            moments: LoraGrads::new(),
            squares: LoraGrads::new(),
        }
    }

    /// One update of `lora` with `grads` at learning rate `lr`. Tensors are
    /// updated in parallel: every element's update depends on that element
    /// alone, so the result is the same on any number of threads.
    pub fn update(&mut self, lora: &mut LoraAdapter, grads: &LoraGrads, lr: f64) {
        self.step += 1;
        let (b1, b2, eps, decay) = (self.beta1, self.beta2, self.eps, self.weight_decay);
        let c1 = 1.0 - b1.powi(self.step as i32);
        let c2 = 1.0 - b2.powi(self.step as i32);
        for (key, (ga, gb)) in grads {
            if lora.weights.contains_key(key) {
                let zeros = || (vec![0.0; ga.len()], vec![0.0; gb.len()]);
                self.moments.entry(key.clone()).or_insert_with(zeros);
                self.squares.entry(key.clone()).or_insert_with(zeros);
            }
        }
        let mut moments: HashMap<_, _> = self.moments.iter_mut().collect();
        let mut squares: HashMap<_, _> = self.squares.iter_mut().collect();
        let mut tensors = Vec::with_capacity(grads.len() * 2);
        for (key, (wa, wb)) in &mut lora.weights {
            let (Some((ga, gb)), Some((ma, mb)), Some((va, vb))) =
                (grads.get(key), moments.remove(key), squares.remove(key))
            else {
                continue;
            };
            tensors.push((wa, ga, ma, va));
            tensors.push((wb, gb, mb, vb));
        }
        let h = [b1, b2, c1, c2, eps, decay, lr];
        tensors.into_par_iter().for_each(|(w, g, m, v)| crate::cpu::simd::adamw(w, g, m, v, h));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_by_cosine() {
        assert!((learning_rate(0, 10, 100, 1.0) - 0.1).abs() < 1e-12);
        assert!((learning_rate(9, 10, 100, 1.0) - 1.0).abs() < 1e-12);
        assert!((learning_rate(10, 10, 100, 1.0) - 1.0).abs() < 1e-12);
        assert!((learning_rate(55, 10, 100, 1.0) - 0.55).abs() < 1e-12, "halfway: midpoint of peak and floor");
        assert!((learning_rate(100, 10, 100, 1.0) - 0.1).abs() < 1e-12);
        assert!((learning_rate(500, 10, 100, 1.0) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn the_global_norm_is_the_norm_of_every_gradient_element() {
        // Lengths around the eight partial sums, and a tail.
        let mut grads = LoraGrads::new();
        let mut all = Vec::new();
        for (i, len) in [1usize, 7, 8, 9, 100, 1_003].into_iter().enumerate() {
            let a: Vec<f32> = (0..len).map(|j| ((i * 31 + j * 17) % 23) as f32 / 7.0 - 1.5).collect();
            let b: Vec<f32> = (0..len + 3).map(|j| ((i * 13 + j * 5) % 19) as f32 / -3.0 + 2.0).collect();
            all.extend(a.iter().chain(&b).map(|v| f64::from(*v)));
            grads.insert((i, "q_proj".into()), (a, b));
        }
        let expected = all.iter().map(|v| v * v).sum::<f64>().sqrt();
        let before = grads.clone();
        let norm = clip_grad_norm(&mut grads, expected * 2.0);
        assert!((norm - expected).abs() <= 1e-12 * expected, "{norm} vs {expected}");
        assert_eq!(grads, before, "a norm under the limit leaves the gradients as they are");
        clip_grad_norm(&mut grads, expected / 4.0);
        let clipped = clip_grad_norm(&mut grads, 0.0);
        assert!((clipped - expected / 4.0).abs() <= 1e-6 * expected, "{clipped} after clipping to {}", expected / 4.0);
    }

    #[test]
    fn clipping_bounds_the_global_norm_and_adamw_moves_against_the_gradient() {
        let mut grads = LoraGrads::new();
        grads.insert((0, "q_proj".into()), (vec![3.0], vec![4.0]));
        assert_eq!(clip_grad_norm(&mut grads, 1.0), 5.0);
        assert_eq!(grads[&(0, "q_proj".to_string())], (vec![0.6], vec![0.8]));
        let mut lora = crate::lora::LoraAdapter {
            rank: 1,
            alpha: 1.0,
            targets: vec!["q_proj".into()],
            weights: [((0, "q_proj".to_string()), (vec![1.0], vec![-1.0]))].into(),
        };
        let mut opt = AdamW::new(0.0);
        opt.update(&mut lora, &grads, 0.01);
        // The first Adam step has magnitude lr in each coordinate.
        let (a, b) = &lora.weights[&(0, "q_proj".to_string())];
        assert!((a[0] - 0.99).abs() < 1e-6 && (b[0] + 1.01).abs() < 1e-6, "{a:?} {b:?}");
        let mut decayed = lora.clone();
        AdamW::new(0.5).update(&mut decayed, &LoraGrads::new(), 0.1);
        assert_eq!(decayed, lora, "no gradient, no update (decay applies with the step)");
    }
}
