//! Always-valid two-sample tests: the mixture sequential probability ratio
//! test (mSPRT) with a normal mixing distribution, as in Johari, Pekelis and
//! Walsh, "Always valid inference" (2017).
//!
//! Why this test: the gate looks at a canary after every metrics window and
//! acts on the first significant look. A fixed-horizon test read that way
//! inflates its false-positive rate several-fold; the mSPRT's likelihood
//! ratio is a martingale under the null, so by Ville's inequality the chance
//! it ever crosses 1/α is at most α however often it is checked.

use serde::Serialize;

/// Sufficient statistics of one arm: count, Σx, Σx².
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Moments {
    /// Observations.
    pub n: f64,
    /// Σ x.
    pub sum: f64,
    /// Σ x².
    pub sum_sq: f64,
}

impl Moments {
    /// Mean, or 0 without observations.
    pub fn mean(&self) -> f64 {
        if self.n > 0.0 { self.sum / self.n } else { 0.0 }
    }

    /// Sample variance (n − 1 denominator), or 0 below two observations.
    pub fn variance(&self) -> f64 {
        if self.n > 1.0 { ((self.sum_sq - self.sum * self.sum / self.n) / (self.n - 1.0)).max(0.0) } else { 0.0 }
    }

    /// Moments of a 0/1 outcome with `successes` of `trials`.
    pub fn bernoulli(successes: i64, trials: i64) -> Moments {
        Moments { n: trials as f64, sum: successes as f64, sum_sq: successes as f64 }
    }
}

/// One look at a two-arm comparison (treatment − control).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Look {
    /// Treatment mean − control mean.
    pub difference: f64,
    /// Variance of that difference (plug-in).
    pub variance: f64,
    /// The mixture likelihood ratio Λ against "no difference".
    pub likelihood_ratio: f64,
    /// Always-valid p-value of this look, min(1, 1/Λ).
    pub p_value: f64,
}

impl Look {
    /// Whether this look rejects "no difference" at level `alpha`.
    pub fn significant(&self, alpha: f64) -> bool {
        self.p_value <= alpha
    }
}

/// The mSPRT statistic for treatment − control with mixing standard
/// deviation `tau` (the scale of effects worth detecting):
/// Λ = √(V / (V + τ²)) · exp(θ̂² τ² / (2 V (V + τ²))), V = s²ₜ/nₜ + s²꜀/n꜀.
pub fn msprt(treatment: &Moments, control: &Moments, tau: f64) -> Look {
    let difference = treatment.mean() - control.mean();
    let variance = treatment.variance() / treatment.n.max(1.0) + control.variance() / control.n.max(1.0);
    if variance <= 0.0 || treatment.n < 2.0 || control.n < 2.0 {
        // No spread observed: nothing can be concluded yet.
        return Look { difference, variance, likelihood_ratio: 1.0, p_value: 1.0 };
    }
    let tau2 = tau * tau;
    let log_lr = 0.5 * (variance / (variance + tau2)).ln()
        + difference * difference * tau2 / (2.0 * variance * (variance + tau2));
    let likelihood_ratio = log_lr.exp();
    Look { difference, variance, likelihood_ratio, p_value: (-log_lr).exp().min(1.0) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_core::rng::SplitMix;

    /// Runs `trials` A/B streams with accept rates `p_control`, `p_treatment`,
    /// looking every 20 observations per arm up to `max_n`; returns the share
    /// that ever rejected and the mean stopping n of those that did.
    fn monitor(p_control: f64, p_treatment: f64, trials: usize, max_n: usize, seed: u64) -> (f64, f64) {
        let mut rng = SplitMix(seed);
        let (mut rejected, mut stop_sum) = (0usize, 0usize);
        for _ in 0..trials {
            let (mut c, mut t) = (0i64, 0i64);
            for n in 1..=max_n {
                c += i64::from(rng.unit() < p_control);
                t += i64::from(rng.unit() < p_treatment);
                if n.is_multiple_of(20)
                    && msprt(&Moments::bernoulli(t, n as i64), &Moments::bernoulli(c, n as i64), 0.1).significant(0.05)
                {
                    rejected += 1;
                    stop_sum += n;
                    break;
                }
            }
        }
        (rejected as f64 / trials as f64, stop_sum as f64 / rejected.max(1) as f64)
    }

    #[test]
    fn continuous_monitoring_keeps_the_false_positive_rate_below_alpha() {
        // 300 null streams, each looked at 150 times: a fixed-horizon z-test
        // read this way rejects far more than 5 % of them.
        let (rate, _) = monitor(0.3, 0.3, 300, 3000, 11);
        assert!(rate <= 0.05, "false-positive rate {rate} above α = 0.05");
        let (naive, mut rng) = (
            |t: i64, c: i64, n: i64| {
                let (pt, pc) = (t as f64 / n as f64, c as f64 / n as f64);
                let se = ((pt * (1.0 - pt) + pc * (1.0 - pc)) / n as f64).sqrt();
                se > 0.0 && ((pt - pc) / se).abs() > 1.96
            },
            SplitMix(11),
        );
        let mut naive_rejections = 0;
        for _ in 0..300 {
            let (mut c, mut t) = (0, 0);
            for n in 1..=3000i64 {
                c += i64::from(rng.unit() < 0.3);
                t += i64::from(rng.unit() < 0.3);
                if n % 20 == 0 && naive(t, c, n) {
                    naive_rejections += 1;
                    break;
                }
            }
        }
        assert!(naive_rejections as f64 / 300.0 > 2.0 * 0.05, "peeking at a z-test should inflate errors");
    }

    #[test]
    fn a_real_difference_is_detected_and_its_sign_is_right() {
        let (power, mean_n) = monitor(0.2, 0.3, 100, 3000, 5);
        assert!(power >= 0.95, "power {power}");
        assert!(mean_n < 1500.0, "mean stopping n {mean_n}");
        let look = msprt(&Moments::bernoulli(300, 1000), &Moments::bernoulli(200, 1000), 0.1);
        assert!(look.significant(0.05) && look.difference > 0.0, "{look:?}");
        let look = msprt(&Moments::bernoulli(200, 1000), &Moments::bernoulli(300, 1000), 0.1);
        assert!(look.significant(0.05) && look.difference < 0.0, "{look:?}");
    }

    #[test]
    fn statistic_matches_the_closed_form_for_equal_arms() {
        // Equal n and variance: Λ = √(2σ²/(2σ²+nτ²)) · exp(n²τ²θ²/(4σ²(2σ²+nτ²))).
        let (n, tau) = (400.0f64, 0.1f64);
        let t = Moments::bernoulli(140, 400);
        let c = Moments::bernoulli(100, 400);
        let s2 = (t.variance() + c.variance()) / 2.0;
        let theta = 0.1;
        let expected = (2.0 * s2 / (2.0 * s2 + n * tau * tau)).sqrt()
            * (n * n * tau * tau * theta * theta / (4.0 * s2 * (2.0 * s2 + n * tau * tau))).exp();
        let look = msprt(&t, &c, tau);
        assert!((look.likelihood_ratio / expected - 1.0).abs() < 1e-3, "{} vs {expected}", look.likelihood_ratio);
        // No spread: no conclusion.
        assert_eq!(msprt(&Moments::bernoulli(0, 50), &Moments::bernoulli(0, 50), 0.1).p_value, 1.0);
    }
}
