//! Sampling completions from a model and adapter on the CPU: the serving
//! side of the simulated product, and a way to look at what an adapter does.

use crate::lora::LoraAdapter;
use crate::model::Model;
use crate::{SplitMix, TrainerError};

/// A sampled completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// Completion tokens.
    pub tokens: Vec<u32>,
    /// `log π(completion | prompt)` under the unconstrained policy at
    /// temperature 1: the behaviour log-probability the trainer compares
    /// against.
    pub logprob: f64,
}

/// Samples `length` tokens after `prompt` at `temperature`, drawing only
/// tokens with `allowed[id]` (a product's decoding constraint, e.g.
/// printable text).
pub fn sample(
    model: &Model,
    lora: Option<&LoraAdapter>,
    prompt: &[u32],
    length: usize,
    temperature: f64,
    allowed: &[bool],
    rng: &mut SplitMix,
) -> Result<Sampled, TrainerError> {
    let vocab = model.config.vocab_size;
    if allowed.len() != vocab || !allowed.iter().any(|a| *a) {
        return Err(TrainerError::Format(format!(
            "the allowed-token mask must cover {vocab} tokens, one or more allowed"
        )));
    }
    if prompt.is_empty() || temperature <= 0.0 {
        return Err(TrainerError::Format("sampling needs a prompt and a positive temperature".into()));
    }
    let mut tokens = prompt.to_vec();
    let mut logprob = 0.0;
    for _ in 0..length {
        let logits = model.forward(&tokens, lora)?;
        let last = &logits[(tokens.len() - 1) * vocab..tokens.len() * vocab];
        let max = last.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
        let log_z = max + last.iter().map(|&x| (f64::from(x) - max).exp()).sum::<f64>().ln();
        // Constrained, tempered weights for the draw.
        let weights: Vec<f64> = last
            .iter()
            .zip(allowed)
            .map(|(&x, &ok)| if ok { ((f64::from(x) - max) / temperature).exp() } else { 0.0 })
            .collect();
        let mut target = rng.unit() * weights.iter().sum::<f64>();
        let mut pick = weights.iter().rposition(|w| *w > 0.0).expect("one token allowed");
        for (id, w) in weights.iter().enumerate() {
            if target < *w {
                pick = id;
                break;
            }
            target -= w;
        }
        logprob += f64::from(last[pick]) - log_z;
        tokens.push(pick as u32);
    }
    Ok(Sampled { tokens: tokens.split_off(prompt.len()), logprob })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objective::{Example, completion_logprob};

    #[test]
    fn samples_respect_the_mask_are_seeded_and_report_the_policy_logprob() {
        let model = crate::tiny::tiny_model(2).unwrap();
        let allowed: Vec<bool> = (0..=255u8).map(|b| b.is_ascii_lowercase()).collect();
        let prompt: Vec<u32> = b"fn main".iter().map(|&b| u32::from(b)).collect();
        let draw = |seed| sample(&model, None, &prompt, 6, 1.0, &allowed, &mut SplitMix(seed)).unwrap();
        let a = draw(9);
        assert_eq!(a, draw(9), "same seed, same completion");
        assert_ne!(a.tokens, draw(10).tokens);
        assert!(a.tokens.iter().all(|&t| allowed[t as usize]), "{:?}", a.tokens);
        let mut all = prompt.clone();
        all.extend(&a.tokens);
        let ex = Example { tokens: all, prompt_len: prompt.len(), reward: 0.0, accepted: true, behavior_logprob: None };
        let expected = completion_logprob(&model, None, &ex).unwrap();
        assert!((a.logprob - expected).abs() < 1e-6, "{} vs {expected}", a.logprob);
    }

    #[test]
    fn sampling_follows_the_model_distribution() {
        // Two allowed tokens: their empirical frequencies follow the model's
        // renormalised probabilities.
        let model = crate::tiny::tiny_model(4).unwrap();
        let mut allowed = vec![false; 256];
        allowed[b'x' as usize] = true;
        allowed[b'y' as usize] = true;
        let prompt = [u32::from(b'q')];
        let logits = model.forward(&prompt, None).unwrap();
        let (lx, ly) = (f64::from(logits[b'x' as usize]), f64::from(logits[b'y' as usize]));
        let px = 1.0 / (1.0 + (ly - lx).exp());
        let mut rng = SplitMix(1);
        let n = 4000;
        let xs = (0..n)
            .filter(|_| sample(&model, None, &prompt, 1, 1.0, &allowed, &mut rng).unwrap().tokens[0] == u32::from(b'x'))
            .count();
        let freq = xs as f64 / n as f64;
        let se = (px * (1.0 - px) / n as f64).sqrt();
        assert!((freq - px).abs() < 4.0 * se, "frequency {freq} vs probability {px}");
    }
}
