//! The bandit policy: per ensemble and domain, Thompson sampling over a
//! few candidate member sets ("arms": each member alone, and all of them).
//! Each arm has a Beta posterior on "its answer is right", updated from
//! feedback; a request runs the arm with the best sampled accuracy minus
//! `bandit_cost_weight` × its share of the ensemble's compute.
//!
//! Feedback updates every arm whose members all ran for that request (the
//! `all` arm's answers reveal every member's), so exploring `all` teaches
//! every arm at once.

use super::MemberSet;
use rand::Rng;

/// Prior pseudo-counts of a fresh arm (uniform Beta(1, 1)).
pub const BANDIT_PRIOR: f32 = 1.0;

#[derive(Debug, Clone)]
pub struct Bandit {
    pub arms: Vec<MemberSet>,
    /// Share of the ensemble's FLOPs per arm.
    cost: Vec<f32>,
    /// `[slot × arms]` Beta parameters (successes + prior, failures + prior).
    alpha: Vec<f32>,
    beta: Vec<f32>,
}

impl Bandit {
    /// Arms: each member alone (cheapest first), then all members.
    pub fn new(by_cost: &[u8], flops_row: &[u64], domains: usize) -> Self {
        let mut arms: Vec<MemberSet> = by_cost
            .iter()
            .map(|&m| MemberSet::one(m as usize))
            .collect();
        if by_cost.len() > 1 {
            arms.push(MemberSet::all(by_cost.len()));
        }
        let total: u64 = flops_row.iter().sum::<u64>().max(1);
        let cost = arms
            .iter()
            .map(|a| a.iter().map(|m| flops_row[m]).sum::<u64>() as f32 / total as f32)
            .collect();
        let n = arms.len() * domains.max(1);
        Bandit {
            arms,
            cost,
            alpha: vec![BANDIT_PRIOR; n],
            beta: vec![BANDIT_PRIOR; n],
        }
    }

    /// Thompson draw: the arm to run for a request of domain `slot`.
    pub fn pick(&self, slot: usize, cost_weight: f32, rng: &mut impl Rng) -> usize {
        let base = slot * self.arms.len();
        let mut best = (f32::NEG_INFINITY, 0);
        for a in 0..self.arms.len() {
            let theta = sample_beta(rng, self.alpha[base + a], self.beta[base + a]);
            let score = theta - cost_weight * self.cost[a];
            if score > best.0 {
                best = (score, a);
            }
        }
        best.1
    }

    pub fn observe(&mut self, slot: usize, arm: usize, correct: bool) {
        let i = slot * self.arms.len() + arm;
        if correct {
            self.alpha[i] += 1.0;
        } else {
            self.beta[i] += 1.0;
        }
    }

    /// (successes + prior, failures + prior) of an arm in a domain.
    pub fn posterior(&self, slot: usize, arm: usize) -> (f32, f32) {
        let i = slot * self.arms.len() + arm;
        (self.alpha[i], self.beta[i])
    }

    pub fn set_posterior(&mut self, slot: usize, arm: usize, a: f32, b: f32) {
        let i = slot * self.arms.len() + arm;
        if i < self.alpha.len() && a.is_finite() && b.is_finite() && a > 0.0 && b > 0.0 {
            self.alpha[i] = a;
            self.beta[i] = b;
        }
    }
}

/// A Beta(a, b) sample from two Gamma samples.
pub fn sample_beta(rng: &mut impl Rng, a: f32, b: f32) -> f32 {
    let x = sample_gamma(rng, a as f64);
    let y = sample_gamma(rng, b as f64);
    if x + y > 0.0 {
        (x / (x + y)) as f32
    } else {
        0.5
    }
}

/// Marsaglia–Tsang; shape < 1 by the boost x·U^(1/k).
fn sample_gamma(rng: &mut impl Rng, k: f64) -> f64 {
    if k < 1.0 {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        return sample_gamma(rng, k + 1.0) * u.powf(1.0 / k);
    }
    let d = k - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

fn normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn beta_samples_have_the_right_mean() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let n = 4000;
        let m: f32 = (0..n).map(|_| sample_beta(&mut rng, 8.0, 2.0)).sum::<f32>() / n as f32;
        assert!((m - 0.8).abs() < 0.02, "mean {m}");
        let m: f32 = (0..n).map(|_| sample_beta(&mut rng, 0.5, 0.5)).sum::<f32>() / n as f32;
        assert!((m - 0.5).abs() < 0.03, "mean {m}");
    }

    #[test]
    fn converges_to_the_accurate_arm() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let mut b = Bandit::new(&[0, 1], &[1, 9], 1);
        assert_eq!(b.arms.len(), 3);
        // Arm 0 (member 0) is right 60%, arm 1 (member 1) 95%, all 96%.
        let acc = [0.6, 0.95, 0.96];
        let mut picks = [0; 3];
        for i in 0..2000 {
            let a = b.pick(0, 0.05, &mut rng);
            if i >= 1500 {
                picks[a] += 1;
            }
            let correct = rng.random::<f64>() < acc[a];
            b.observe(0, a, correct);
        }
        // Member 1 alone: nearly as accurate as all, at 90% of its cost.
        assert!(picks[1] + picks[2] > 450, "{picks:?}");
        assert!(picks[0] < 50, "{picks:?}");
    }
}
