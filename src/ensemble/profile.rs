//! Latency profile of one model on one shard: compute time by batch size,
//! measured at warm-up (batch sizes 1, 8 and the model's largest) and kept
//! current with an EWMA over real batches. The deadline policy predicts a
//! member's completion from it.

/// Weight of a new observation in the moving average.
pub const PROFILE_EWMA_ALPHA: f32 = 0.1;

#[derive(Debug, Clone, Copy)]
pub struct LatencyProfile {
    /// Batch sizes of the three points (1, min(8, max), max).
    pub sizes: [u32; 3],
    /// Compute microseconds at each size.
    pub us: [f32; 3],
}

impl LatencyProfile {
    pub fn new(max_batch: usize) -> Self {
        let max = max_batch.max(1) as u32;
        LatencyProfile {
            sizes: [1, 8.min(max), max],
            us: [0.0; 3],
        }
    }

    /// The point a batch of `rows` is counted at.
    fn point(&self, rows: u32) -> usize {
        if rows <= self.sizes[0] {
            0
        } else if rows <= self.sizes[1] {
            1
        } else {
            2
        }
    }

    /// Set a point from a measurement (warm-up).
    pub fn set(&mut self, i: usize, us: f32) {
        self.us[i] = us.max(0.0);
    }

    /// Fold a real batch in (scaled to the point's batch size).
    pub fn observe(&mut self, rows: u32, us: f32) {
        let i = self.point(rows);
        let scaled = us * self.sizes[i] as f32 / rows.max(1) as f32;
        let scaled = if i == 0 { us } else { scaled };
        self.us[i] += PROFILE_EWMA_ALPHA * (scaled - self.us[i]);
    }

    /// Predicted compute microseconds of a batch of `rows` (linear between
    /// points, whole batches beyond the largest).
    pub fn predict_us(&self, rows: u32) -> f32 {
        let [s0, s1, s2] = self.sizes.map(|s| s as f32);
        let [u0, u1, u2] = self.us;
        let r = rows.max(1) as f32;
        if r <= s1 {
            u0 + (u1 - u0) * (r - s0) / (s1 - s0).max(1.0)
        } else if r <= s2 {
            u1 + (u2 - u1) * (r - s1) / (s2 - s1).max(1.0)
        } else {
            u2 * (r / s2).ceil()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolates_and_learns() {
        let mut p = LatencyProfile::new(64);
        p.set(0, 10.0);
        p.set(1, 20.0);
        p.set(2, 100.0);
        assert_eq!(p.predict_us(1), 10.0);
        assert_eq!(p.predict_us(8), 20.0);
        assert!((p.predict_us(36) - 60.0).abs() < 1e-3);
        assert_eq!(p.predict_us(128), 200.0);
        for _ in 0..200 {
            p.observe(1, 30.0);
        }
        assert!((p.predict_us(1) - 30.0).abs() < 0.1);
    }
}
