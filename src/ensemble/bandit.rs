//! The bandit policy: per ensemble and domain, Thompson sampling over a
//! few candidate member sets ("arms": each member alone, and all of them).
//! Each arm has a Beta posterior on "its answer is right", updated from
//! feedback; a request runs the arm with the best sampled accuracy minus
//! `bandit_cost_weight` × its share of the ensemble's compute.
//!
//! Feedback updates every arm whose members all ran for that request (the
//! `all` arm's answers reveal every member's), so exploring `all` teaches
//! every arm at once.
//!
//! Each arm keeps its success/failure counts as this shard learned them
//! (`own`) and as every other shard and node did (`remote`, handed over by
//! the sync thread, docs/SELECTION.md); its posterior is the prior plus
//! both, so posteriors from several sources merge by summing counts.

use super::MemberSet;
use rand::Rng;

/// Prior pseudo-counts of a fresh arm (uniform Beta(1, 1)).
pub const BANDIT_PRIOR: f32 = 1.0;

#[derive(Debug, Clone)]
pub struct Bandit {
    pub arms: Vec<MemberSet>,
    /// Share of the ensemble's FLOPs per arm.
    cost: Vec<f32>,
    /// `[slot × arms]` Beta parameters: prior + own + remote successes,
    /// prior + own + remote failures.
    alpha: Vec<f32>,
    beta: Vec<f32>,
    /// `[slot × arms]` (successes, failures) this shard saw, and everyone else's.
    own: Vec<[f32; 2]>,
    remote: Vec<[f32; 2]>,
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
            own: vec![[0.0; 2]; n],
            remote: vec![[0.0; 2]; n],
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
        if let Some(o) = self.own.get_mut(i) {
            o[!correct as usize] += 1.0;
            self.refresh(i);
        }
    }

    fn refresh(&mut self, i: usize) {
        let (o, r) = (self.own[i], self.remote[i]);
        self.alpha[i] = BANDIT_PRIOR + o[0] + r[0];
        self.beta[i] = BANDIT_PRIOR + o[1] + r[1];
    }

    /// (successes + prior, failures + prior) of an arm in a domain, every
    /// source counted.
    pub fn posterior(&self, slot: usize, arm: usize) -> (f32, f32) {
        let i = slot * self.arms.len() + arm;
        (self.alpha[i], self.beta[i])
    }

    /// (successes, failures) this shard saw.
    pub fn own(&self, slot: usize, arm: usize) -> [f32; 2] {
        self.own[slot * self.arms.len() + arm]
    }

    /// Add counts to this shard's own (restoring saved state).
    pub fn add_own(&mut self, slot: usize, arm: usize, c: [f32; 2]) {
        let i = slot * self.arms.len() + arm;
        if i < self.own.len() && c.iter().all(|x| x.is_finite() && *x >= 0.0) {
            self.own[i][0] += c[0];
            self.own[i][1] += c[1];
            self.refresh(i);
        }
    }

    /// Set everyone else's counts per (slot, arm) (`None`: 0).
    pub fn set_remote(&mut self, remote: impl Fn(usize, usize) -> Option<[f32; 2]>) {
        let arms = self.arms.len();
        for i in 0..self.remote.len() {
            self.remote[i] = remote(i / arms, i % arms)
                .filter(|c| c.iter().all(|x| x.is_finite() && *x >= 0.0))
                .unwrap_or([0.0; 2]);
            self.refresh(i);
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
