//! The learned combiner (`combiner = "stacked"`): one weight per member and
//! class, learned from feedback through an additive sufficient statistic
//! so that what shards and nodes learn can be summed (docs/SELECTION.md).
//!
//! Per member m and class c, `S[m][c]` is the sum, over feedback whose
//! label was c and in which m answered, of m's *centred* log-probability
//! for c: `ln(p_m + floor) − mean over the members that answered of
//! ln(p_j + floor)`. The weight is `clamp(exp(eta · S), min, max)`. A
//! member that gives the true class more probability than the others
//! gains weight for it, one that gives less loses it; weights start at 1
//! (S = 0) and stay within [`STACKER_WEIGHT_MIN`, `STACKER_WEIGHT_MAX`].
//!
//! This is the multiplicative-weights update `w ← w · (p + floor)^eta`,
//! rescaled to keep the members' sum, written as a sum: when the same
//! members answer every time the two agree (up to the rescaling
//! constant) until a weight reaches a bound; unlike it, the result does
//! not depend on the order of the feedback, and two sources' statistics
//! add up.
//!
//! Each shard keeps its own statistic (`own`, what its feedback taught)
//! and everyone else's (`remote`, from the sync thread); the weights are
//! those of `own + remote`.

/// Learning rate.
pub const STACKER_ETA: f32 = 0.5;
/// Keeps a confidently wrong member's log-probability finite.
pub const STACKER_PROB_FLOOR: f32 = 0.02;
/// Smallest weight (the starting weight is 1).
pub const STACKER_WEIGHT_MIN: f32 = 0.01;
/// Largest weight: one member may count at most `MAX / MIN` times another.
pub const STACKER_WEIGHT_MAX: f32 = 1.0 / STACKER_WEIGHT_MIN;

#[derive(Debug, Clone)]
pub struct Stacker {
    cols: usize,
    /// `members × cols`: this shard's statistic, and everyone else's.
    own: Vec<f32>,
    remote: Vec<f32>,
    /// The weights of `own + remote`.
    w: Vec<f32>,
}

impl Stacker {
    pub fn new(members: usize, cols: usize) -> Self {
        Stacker {
            cols,
            own: vec![0.0; members * cols],
            remote: vec![0.0; members * cols],
            w: vec![1.0; members * cols],
        }
    }

    /// Member m's weight per class (`cols` long).
    pub fn weights(&self, m: usize) -> &[f32] {
        &self.w[m * self.cols..(m + 1) * self.cols]
    }

    /// This shard's statistic of member m for `class`.
    pub fn own(&self, m: usize, class: usize) -> f32 {
        self.own[m * self.cols + class]
    }

    /// Add to this shard's statistic (restoring saved state).
    pub fn add_own(&mut self, m: usize, class: usize, s: f32) {
        if let Some(x) = self
            .own
            .get_mut(m * self.cols + class)
            .filter(|_| class < self.cols)
        {
            if s.is_finite() {
                *x += s;
                self.refresh(m * self.cols + class);
            }
        }
    }

    /// Set everyone else's statistics (`None`: 0) and recompute the weights.
    pub fn set_remote(&mut self, remote: impl Fn(usize, usize) -> Option<f32>) {
        for i in 0..self.remote.len() {
            self.remote[i] = remote(i / self.cols, i % self.cols)
                .filter(|x| x.is_finite())
                .unwrap_or(0.0);
            self.refresh(i);
        }
    }

    fn refresh(&mut self, i: usize) {
        let s = self.own[i] + self.remote[i];
        self.w[i] = (STACKER_ETA * s)
            .exp()
            .clamp(STACKER_WEIGHT_MIN, STACKER_WEIGHT_MAX);
    }

    /// One feedback: `p_true` yields (member, probability it gave `label`)
    /// for the members that ran.
    pub fn update(&mut self, label: usize, p_true: impl Iterator<Item = (usize, f32)> + Clone) {
        if label >= self.cols {
            return;
        }
        let lp = |p: f32| (p.clamp(0.0, 1.0) + STACKER_PROB_FLOOR).ln();
        let (mut n, mut sum) = (0usize, 0f32);
        for (_, p) in p_true.clone() {
            n += 1;
            sum += lp(p);
        }
        if n == 0 {
            return;
        }
        let mean = sum / n as f32;
        for (m, p) in p_true {
            let i = m * self.cols + label;
            if i < self.own.len() {
                self.own[i] += lp(p) - mean;
                self.refresh(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_member_gains_weight_for_its_class() {
        let mut s = Stacker::new(2, 2);
        for _ in 0..20 {
            // Member 0 right about class 1, member 1 wrong.
            s.update(1, [(0, 0.9), (1, 0.1)].into_iter());
        }
        assert!(s.weights(0)[1] > 1.5 && s.weights(1)[1] < 0.5);
        // Bounded, other class untouched.
        assert_eq!(s.weights(0)[1], STACKER_WEIGHT_MAX);
        assert_eq!(s.weights(1)[1], STACKER_WEIGHT_MIN);
        assert_eq!(s.weights(0)[0], 1.0);
        s.update(7, [(0, 0.9)].into_iter()); // out of range: ignored
                                             // A member alone learns nothing (centred: nobody to beat).
        let mut t = Stacker::new(2, 2);
        t.update(0, [(1, 0.3)].into_iter());
        assert_eq!(t.weights(1)[0], 1.0);
    }

    #[test]
    fn one_step_matches_the_multiplicative_update() {
        // w ← w · (p + floor)^eta, then rescaled to keep the sum 2.
        let (p0, p1) = (0.7f32, 0.2f32);
        let m0 = (p0 + STACKER_PROB_FLOOR).powf(STACKER_ETA);
        let m1 = (p1 + STACKER_PROB_FLOOR).powf(STACKER_ETA);
        let mut s = Stacker::new(2, 1);
        s.update(0, [(0, p0), (1, p1)].into_iter());
        let ratio = s.weights(0)[0] / s.weights(1)[0];
        assert!((ratio - m0 / m1).abs() < 1e-5, "{ratio} vs {}", m0 / m1);
    }

    #[test]
    fn order_free_and_additive() {
        let fb = [(1, 0.9, 0.1), (0, 0.3, 0.6), (1, 0.05, 0.99), (1, 0.5, 0.5)];
        let mut a = Stacker::new(2, 2);
        for &(l, p, q) in &fb {
            a.update(l, [(0, p), (1, q)].into_iter());
        }
        let mut b = Stacker::new(2, 2);
        for &(l, p, q) in fb.iter().rev() {
            b.update(l, [(0, p), (1, q)].into_iter());
        }
        // Half the feedback here, half on "another node" handed over as remote.
        let (mut c, mut d) = (Stacker::new(2, 2), Stacker::new(2, 2));
        for &(l, p, q) in &fb[..2] {
            c.update(l, [(0, p), (1, q)].into_iter());
        }
        for &(l, p, q) in &fb[2..] {
            d.update(l, [(0, p), (1, q)].into_iter());
        }
        c.set_remote(|m, k| Some(d.own(m, k)));
        for m in 0..2 {
            for k in 0..2 {
                assert!((a.weights(m)[k] - b.weights(m)[k]).abs() < 1e-5);
                assert!((a.weights(m)[k] - c.weights(m)[k]).abs() < 1e-5);
            }
        }
    }
}
