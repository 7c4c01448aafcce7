//! The learned combiner (`combiner = "stacked"`): one weight per member and
//! class, starting uniform, moved by feedback with multiplicative weights:
//! a member that gave the true class probability p gets its weight for
//! that class multiplied by (p + floor)^eta, then the weights of the
//! members that ran are rescaled to keep their sum. Members that are good
//! at a class end up trusted for it; no member's weight reaches zero.

/// Learning rate of the multiplicative update.
pub const STACKER_ETA: f32 = 0.5;
/// Keeps a confidently wrong member from being zeroed by one answer.
pub const STACKER_PROB_FLOOR: f32 = 0.02;
/// Smallest weight, relative to the mean weight of 1.
pub const STACKER_WEIGHT_MIN: f32 = 0.01;

#[derive(Debug, Clone)]
pub struct Stacker {
    cols: usize,
    /// `members × cols`.
    w: Vec<f32>,
}

impl Stacker {
    pub fn new(members: usize, cols: usize) -> Self {
        Stacker {
            cols,
            w: vec![1.0; members * cols],
        }
    }

    /// Member m's weight per class (`cols` long).
    pub fn weights(&self, m: usize) -> &[f32] {
        &self.w[m * self.cols..(m + 1) * self.cols]
    }

    pub fn set_weights(&mut self, m: usize, w: &[f32]) {
        if w.len() == self.cols && w.iter().all(|x| x.is_finite() && *x > 0.0) {
            self.w[m * self.cols..(m + 1) * self.cols].copy_from_slice(w);
        }
    }

    /// One feedback: `p_true` yields (member, probability it gave `label`)
    /// for the members that ran.
    pub fn update(&mut self, label: usize, p_true: impl Iterator<Item = (usize, f32)> + Clone) {
        if label >= self.cols {
            return;
        }
        let c = self.cols;
        let before: f32 = p_true.clone().map(|(m, _)| self.w[m * c + label]).sum();
        let mut after = 0.0;
        for (m, p) in p_true.clone() {
            let w = &mut self.w[m * c + label];
            *w *= (p.clamp(0.0, 1.0) + STACKER_PROB_FLOOR).powf(STACKER_ETA);
            after += *w;
        }
        if after > 0.0 {
            let k = before / after;
            for (m, _) in p_true {
                let w = &mut self.w[m * c + label];
                *w = (*w * k).max(STACKER_WEIGHT_MIN);
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
        // Sum kept (but for what the floor adds), other class untouched.
        let sum = s.weights(0)[1] + s.weights(1)[1];
        assert!(
            (2.0..2.0 + 20.0 * STACKER_WEIGHT_MIN).contains(&sum),
            "{sum}"
        );
        assert_eq!(s.weights(0)[0], 1.0);
        s.update(7, [(0, 0.9)].into_iter()); // out of range: ignored
    }
}
