//! Training objectives, each reduced to a coefficient on
//! `∇ log π(completion | prompt)` per example (see `grad`); only
//! completion tokens carry loss, the prompt is context.
//!
//! - REINFORCE with a batch-mean baseline: `L = −(r − b)·log π`; with logged
//!   behaviour log-probs, a PPO-style clipped ratio corrects for stale data;
//!   an optional KL penalty `kl·(log π − log π_ref)` keeps close to the base.
//! - KTO for unpaired accept/reject, reference = the base without LoRA:
//!   with `r = log π − log π_ref` and `z₀` a detached batch KL estimate,
//!   desirable `λ_D(1 − σ(β(r − z₀)))`, undesirable `λ_U(1 − σ(β(z₀ − r)))`.
//! - Reward-weighted SFT: `L = −w·log π` on accepted completions.

use crate::TrainerError;
use crate::grad::{LoraGrads, TracedCompletion, backward, completion_logprob_of, trace_completion};
use crate::lora::LoraAdapter;
use crate::model::Model;

/// One training example: a tokenised prompt + completion and its feedback.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Prompt then completion tokens.
    pub tokens: Vec<u32>,
    /// How many leading tokens are the prompt.
    pub prompt_len: usize,
    /// The reward.
    pub reward: f64,
    /// Whether the completion was accepted (desirable).
    pub accepted: bool,
    /// Log-probability of the completion under the serving policy, if logged.
    pub behavior_logprob: Option<f64>,
}

/// The objective and its settings.
#[derive(Debug, Clone, PartialEq)]
pub enum Objective {
    /// REINFORCE with a baseline.
    Reinforce {
        /// Weight of the KL penalty to the base model (0: none), estimated
        /// on the logged completions as `log π_ref − log π`: they were
        /// sampled by the serving policy, not by the one being trained, so
        /// the penalty pulls them back towards the base's likelihood.
        kl_coef: f64,
        /// PPO ratio clip ε, used when behaviour log-probs are present.
        ppo_clip: Option<f64>,
        /// Without `ppo_clip`: a completion with a negative advantage stops
        /// being pushed down once its log-probability is this many nats per
        /// completion token below its logged behaviour log-probability.
        /// Trained mostly on rejections, plain REINFORCE otherwise keeps
        /// lowering every logged answer until the model unlearns language.
        reject_floor: Option<f64>,
    },
    /// Kahneman-Tversky optimisation.
    Kto {
        /// β.
        beta: f64,
        /// λ_D.
        desirable_weight: f64,
        /// λ_U.
        undesirable_weight: f64,
    },
    /// Reward-weighted supervised fine-tuning on accepted completions.
    Sft,
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `log π(completion | prompt)` under `lora` (or the base when `None`).
pub(crate) fn completion_logprob(model: &Model, lora: Option<&LoraAdapter>, ex: &Example) -> Result<f64, TrainerError> {
    let logits = model.forward(&ex.tokens, lora)?;
    Ok(completion_logprob_of(&logits, model.config.vocab_size, &ex.tokens, ex.prompt_len))
}

impl Objective {
    /// Whether the objective needs `log π_ref` (the base without LoRA).
    pub(crate) fn needs_reference(&self) -> bool {
        match self {
            Objective::Kto { .. } => true,
            Objective::Reinforce { kl_coef, .. } => *kl_coef > 0.0,
            Objective::Sft => false,
        }
    }

    /// Per example of `batch`: its loss and `d loss / d log π`, from the
    /// policy's and the reference's completion log-probabilities (the
    /// reference is ignored unless `Objective::needs_reference`).
    pub fn terms(&self, batch: &[Example], policy: &[f64], reference: &[f64]) -> Vec<(f64, f64)> {
        let n = batch.len() as f64;
        let mut terms: Vec<(f64, f64)> = Vec::with_capacity(batch.len());
        match self {
            Objective::Reinforce { kl_coef, ppo_clip, reject_floor } => {
                let baseline = batch.iter().map(|e| e.reward).sum::<f64>() / n;
                for ((ex, lp), lr) in batch.iter().zip(policy).zip(reference) {
                    let adv = ex.reward - baseline;
                    let (mut loss, mut dl) = match (ppo_clip, ex.behavior_logprob) {
                        (Some(eps), Some(behavior)) => {
                            let ratio = (lp - behavior).exp();
                            let clipped = ratio.clamp(1.0 - eps, 1.0 + eps);
                            if ratio * adv <= clipped * adv {
                                (-ratio * adv, -ratio * adv)
                            } else {
                                (-clipped * adv, 0.0) // the clipped branch has no gradient
                            }
                        }
                        (None, Some(behavior))
                            if adv < 0.0
                                && reject_floor.is_some_and(|floor| {
                                    lp - behavior < -floor * (ex.tokens.len() - ex.prompt_len) as f64
                                }) =>
                        {
                            (-adv * lp, 0.0) // on the floor: pushed down far enough
                        }
                        _ => (-adv * lp, -adv),
                    };
                    if *kl_coef > 0.0 {
                        loss += kl_coef * (lr - lp);
                        dl -= kl_coef;
                    }
                    terms.push((loss, dl));
                }
            }
            Objective::Kto { beta, desirable_weight, undesirable_weight } => {
                let z0 = (policy.iter().zip(reference).map(|(p, r)| p - r).sum::<f64>() / n).max(0.0);
                for ((ex, lp), lr) in batch.iter().zip(policy).zip(reference) {
                    let r = lp - lr;
                    if ex.accepted {
                        let s = sigmoid(beta * (r - z0));
                        terms.push((desirable_weight * (1.0 - s), -desirable_weight * beta * s * (1.0 - s)));
                    } else {
                        let s = sigmoid(beta * (z0 - r));
                        terms.push((undesirable_weight * (1.0 - s), undesirable_weight * beta * s * (1.0 - s)));
                    }
                }
            }
            Objective::Sft => {
                let weights: Vec<f64> =
                    batch.iter().map(|e| if e.accepted { e.reward.max(0.0) } else { 0.0 }).collect();
                let total = weights.iter().sum::<f64>().max(f64::MIN_POSITIVE);
                for (w, lp) in weights.iter().zip(policy) {
                    // Normalised by the batch weight, then times n to undo the mean below.
                    let w = w / total * n;
                    terms.push((-w * lp, -w));
                }
            }
        }
        terms
    }
}

/// The mean loss of a batch and its gradient with respect to the adapter
/// (the reference path: one sequence at a time, f32).
pub fn batch_loss_and_grads(
    model: &Model,
    lora: &LoraAdapter,
    batch: &[Example],
    objective: &Objective,
) -> Result<(f64, LoraGrads), TrainerError> {
    if batch.is_empty() {
        return Err(TrainerError::Format("empty batch".into()));
    }
    let n = batch.len() as f64;
    // One traced forward pass per example serves both the loss value and
    // the backward pass.
    let traced: Vec<TracedCompletion> =
        batch.iter().map(|ex| trace_completion(model, lora, &ex.tokens, ex.prompt_len)).collect::<Result<_, _>>()?;
    let policy: Vec<f64> = traced.iter().map(|t| t.logp).collect();
    let reference: Vec<f64> = if objective.needs_reference() {
        batch.iter().map(|ex| completion_logprob(model, None, ex)).collect::<Result<_, _>>()?
    } else {
        vec![0.0; batch.len()]
    };
    let terms = objective.terms(batch, &policy, &reference);
    let mut grads = LoraGrads::new();
    let mut loss = 0.0;
    for (traced, (l, dl)) in traced.iter().zip(terms) {
        loss += l / n;
        if dl == 0.0 {
            continue;
        }
        for (key, (ga, gb)) in backward(model, lora, traced, (dl / n) as f32) {
            let (a, b) = grads.entry(key).or_insert_with(|| (vec![0.0; ga.len()], vec![0.0; gb.len()]));
            a.iter_mut().zip(&ga).for_each(|(x, y)| *x += y);
            b.iter_mut().zip(&gb).for_each(|(x, y)| *x += y);
        }
    }
    Ok((loss, grads))
}

/// Holdout implicit-reward accuracy: over every (accepted, rejected) pair,
/// the share where the accepted completion gained more log-probability
/// relative to the base than the rejected one (ties count half).
pub fn implicit_reward_accuracy(model: &Model, lora: &LoraAdapter, holdout: &[Example]) -> Result<f64, TrainerError> {
    let mut acc = Vec::new();
    let mut rej = Vec::new();
    for ex in holdout {
        let r = completion_logprob(model, Some(lora), ex)? - completion_logprob(model, None, ex)?;
        if ex.accepted { acc.push(r) } else { rej.push(r) }
    }
    pairwise_accuracy(&acc, &rej)
        .ok_or_else(|| TrainerError::Format("holdout needs accepted and rejected examples".into()))
}

/// The share of (accepted, rejected) pairs whose implicit rewards are
/// ordered right (ties count half); `None` without both kinds.
pub(crate) fn pairwise_accuracy(accepted: &[f64], rejected: &[f64]) -> Option<f64> {
    if accepted.is_empty() || rejected.is_empty() {
        return None;
    }
    let mut wins = 0.0;
    for a in accepted {
        for r in rejected {
            wins += if a > r {
                1.0
            } else if a == r {
                0.5
            } else {
                0.0
            };
        }
    }
    Some(wins / (accepted.len() * rejected.len()) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{AdamW, clip_grad_norm, learning_rate};
    use crate::tiny::tiny_model;

    /// Accepted completions repeat the prompt's last letter; rejected ones
    /// shift it. A learnable preference the base model does not have.
    fn toy(n: usize, offset: usize, prefix: &[u8]) -> Vec<Example> {
        (0..n)
            .map(|i| {
                let letter = b'a' + ((i + offset) % 20) as u8;
                let accepted = i.is_multiple_of(2);
                let completion = if accepted { [letter, letter, letter] } else { [letter + 3, letter + 1, letter + 4] };
                let mut tokens: Vec<u32> = prefix.iter().map(|b| u32::from(*b)).collect();
                tokens.push(u32::from(letter));
                let prompt_len = tokens.len();
                tokens.extend(completion.iter().map(|b| u32::from(*b)));
                Example {
                    tokens,
                    prompt_len,
                    reward: if accepted { 0.75 } else { -0.25 },
                    accepted,
                    behavior_logprob: None,
                }
            })
            .collect()
    }

    /// Trains on the toy data; returns the holdout implicit-reward accuracy
    /// and mean accepted log-probability, before and after.
    fn train(objective: &Objective, steps: u64) -> ((f64, f64), (f64, f64)) {
        let model = tiny_model(3).unwrap();
        let targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"];
        let mut lora = LoraAdapter::init(&model.config, 4, 8.0, &targets, 1).unwrap();
        let data = toy(64, 0, b"say ");
        // Unseen prompts (another prefix) over the same letters.
        let holdout = toy(20, 2, b"put ");
        let measure = |lora: &LoraAdapter| {
            let accepted: Vec<f64> = holdout
                .iter()
                .filter(|e| e.accepted)
                .map(|e| completion_logprob(&model, Some(lora), e).unwrap())
                .collect();
            let mean = accepted.iter().sum::<f64>() / accepted.len() as f64;
            (implicit_reward_accuracy(&model, lora, &holdout).unwrap(), mean)
        };
        let before = measure(&lora);
        let mut opt = AdamW::new(0.0);
        for step in 0..steps {
            let start = (step as usize * 16) % data.len();
            let batch = &data[start..start + 16];
            let (_, mut grads) = batch_loss_and_grads(&model, &lora, batch, objective).unwrap();
            clip_grad_norm(&mut grads, 1.0);
            opt.update(&mut lora, &grads, learning_rate(step, 3, steps, 2e-2));
        }
        (before, measure(&lora))
    }

    #[test]
    fn preference_objectives_learn_a_toy_preference_on_the_holdout() {
        for objective in [
            Objective::Reinforce { kl_coef: 0.0, ppo_clip: None, reject_floor: None },
            Objective::Kto { beta: 0.1, desirable_weight: 1.0, undesirable_weight: 1.0 },
        ] {
            let ((before, _), (after, _)) = train(&objective, 40);
            eprintln!("{objective:?}: holdout implicit-reward accuracy {before} -> {after}");
            assert_eq!(before, 0.5, "a fresh adapter is the base: every implicit reward is 0");
            assert!(after > 0.8, "{objective:?}: holdout implicit-reward accuracy {after}");
        }
    }

    #[test]
    fn reward_weighted_sft_makes_accepted_completions_likelier_on_the_holdout() {
        let ((_, before), (_, after)) = train(&Objective::Sft, 40);
        eprintln!("Sft: holdout accepted log-probability {before:.2} -> {after:.2}");
        assert!(after > before + 3.0, "accepted completions gained only {:.2} nats", after - before);
    }

    #[test]
    fn the_same_data_and_seed_give_a_bit_identical_adapter() {
        let run = || {
            let model = tiny_model(3).unwrap();
            let mut lora = LoraAdapter::init(&model.config, 2, 4.0, &["q_proj", "down_proj"], 42).unwrap();
            let mut opt = AdamW::new(0.01);
            let data = toy(16, 0, b"say ");
            for step in 0..3 {
                let objective = Objective::Kto { beta: 0.1, desirable_weight: 1.0, undesirable_weight: 1.0 };
                let (_, mut grads) = batch_loss_and_grads(&model, &lora, &data[..8], &objective).unwrap();
                clip_grad_norm(&mut grads, 1.0);
                opt.update(&mut lora, &grads, learning_rate(step, 1, 3, 1e-2));
            }
            lora
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b);
        assert_ne!(a, LoraAdapter::init(&tiny_model(3).unwrap().config, 2, 4.0, &["q_proj", "down_proj"], 42).unwrap());
    }

    #[test]
    fn the_ppo_clip_stops_the_gradient_outside_the_trust_region() {
        let model = tiny_model(3).unwrap();
        let lora = LoraAdapter::init(&model.config, 2, 4.0, &["q_proj"], 1).unwrap();
        let mut batch = toy(2, 0, b"say ");
        let lp: Vec<f64> = batch.iter().map(|e| completion_logprob(&model, Some(&lora), e).unwrap()).collect();
        // Ratio e⁵ with a positive advantage and e⁻⁵ with a negative one: both
        // beyond the clip, where the clipped objective is flat.
        batch[0].behavior_logprob = Some(lp[0] - 5.0);
        batch[1].behavior_logprob = Some(lp[1] + 5.0);
        let objective = Objective::Reinforce { kl_coef: 0.0, ppo_clip: Some(0.2), reject_floor: None };
        let (_, grads) = batch_loss_and_grads(&model, &lora, &batch, &objective).unwrap();
        assert!(grads.is_empty(), "both examples are clipped: no gradient");
        batch[0].behavior_logprob = Some(lp[0]);
        let (_, grads) = batch_loss_and_grads(&model, &lora, &batch, &objective).unwrap();
        assert!(!grads.is_empty(), "ratio 1 is inside the region");
    }

    #[test]
    fn the_reject_floor_stops_pushing_a_rejected_completion_down() {
        let mut batch = toy(2, 0, b"say ");
        // The policy's log-probabilities of the two completions now.
        let lp = [-20.0, -25.0];
        let tokens = |e: &Example| (e.tokens.len() - e.prompt_len) as f64;
        // Example 1 has the lower reward: a negative advantage.
        batch[0].reward = 1.0;
        batch[1].reward = -1.0;
        let objective = Objective::Reinforce { kl_coef: 0.0, ppo_clip: None, reject_floor: Some(0.5) };
        let dl = |batch: &[Example]| objective.terms(batch, &lp, &lp).iter().map(|t| t.1).collect::<Vec<f64>>();
        // 0.6 nats per token below what was served: past the floor.
        batch[1].behavior_logprob = Some(lp[1] + 0.6 * tokens(&batch[1]));
        batch[0].behavior_logprob = Some(lp[0] + 0.6 * tokens(&batch[0]));
        let past = dl(&batch);
        assert_eq!(past[1], 0.0, "the rejected completion is on the floor");
        assert!(past[0] < 0.0, "the accepted one is still pushed up, however far it moved");
        // 0.4 nats per token below: above the floor, still pushed down.
        batch[1].behavior_logprob = Some(lp[1] + 0.4 * tokens(&batch[1]));
        assert!(dl(&batch)[1] > 0.0);
        // No behaviour log-prob: no floor to measure against.
        batch[1].behavior_logprob = None;
        assert!(dl(&batch)[1] > 0.0);
    }

    #[test]
    fn the_kl_penalty_pulls_logged_completions_towards_the_base() {
        let mut batch = toy(2, 0, b"say ");
        batch.iter_mut().for_each(|e| e.reward = 0.5);
        let objective = Objective::Reinforce { kl_coef: 0.1, ppo_clip: None, reject_floor: None };
        // Equal rewards: no advantage, only the penalty. The adapter has made
        // both completions 2 nats less likely than the base does.
        let (policy, reference) = (vec![-12.0, -14.0], vec![-10.0, -12.0]);
        let terms = objective.terms(&batch, &policy, &reference);
        for (loss, dl) in terms {
            assert!((loss - 0.2).abs() < 1e-12, "KL(ref || policy) on the logged completion: 0.1 * 2 nats");
            assert!(dl < 0.0, "descending the loss raises log π back towards the base");
        }
    }
}
