//! Fixed-bucket histograms with one writer.
//!
//! Buckets are chosen at compile time and storage is sized once at start,
//! so an observation is a short scan of the bounds plus two single-writer
//! counter bumps: no allocation, no lock, no atomic read-modify-write.
//! Readers (the admin thread) copy the counts and make them cumulative for
//! Prometheus (`_bucket{le=...}`) or estimate percentiles from them.

use super::Counter;

/// Upper bounds of the latency buckets, in microseconds (10 µs … 2.5 s).
pub const DURATION_BOUNDS_US: &[u64] = &[
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000,
];

/// Upper bounds of the batch-size buckets, in rows (1, 2, 4 … 1024).
pub const BATCH_BOUNDS_ROWS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

/// One histogram: a count per bucket (the last one is `+Inf`) and the sum
/// of observed values, all in the unit of `bounds`.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    counts: Box<[Counter]>,
    sum: Counter,
}

impl Histogram {
    pub fn new(bounds: &'static [u64]) -> Histogram {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bounds ascend");
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| Counter::default()).collect(),
            sum: Counter::default(),
        }
    }

    /// Record one value. Single writer: call only from the owning shard.
    #[inline]
    pub fn observe(&self, v: u64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i].inc();
        self.sum.add(v);
    }

    /// A copy of the current counts (per bucket, not cumulative).
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: self.bounds,
            counts: self.counts.iter().map(Counter::get).collect(),
            sum: self.sum.get(),
        }
    }
}

/// Counts copied out of one or more histograms with the same bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub bounds: &'static [u64],
    /// Per-bucket counts; `counts.len() == bounds.len() + 1` (last: above every bound).
    pub counts: Vec<u64>,
    pub sum: u64,
}

impl HistogramSnapshot {
    pub fn empty(bounds: &'static [u64]) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0,
        }
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Add another snapshot's counts (same bounds) into this one.
    pub fn merge(&mut self, o: &HistogramSnapshot) {
        debug_assert_eq!(self.bounds, o.bounds);
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.sum += o.sum;
    }

    /// Running totals, as Prometheus `_bucket` lines want them.
    pub fn cumulative(&self) -> Vec<u64> {
        self.counts
            .iter()
            .scan(0u64, |acc, &c| {
                *acc += c;
                Some(*acc)
            })
            .collect()
    }

    /// See [`quantile`].
    pub fn quantile(&self, q: f64) -> Option<f64> {
        quantile(self.bounds, &self.counts, q)
    }
}

/// Estimate the `q`-quantile (0..=1) of per-bucket `counts` by linear
/// interpolation inside the bucket, as Prometheus' `histogram_quantile`
/// does; values in the `+Inf` bucket report the highest bound. `None`
/// when there are no observations.
pub fn quantile(bounds: &[u64], counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 || bounds.is_empty() {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut seen = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        if c > 0 && (seen + c) as f64 >= rank {
            if i >= bounds.len() {
                return Some(bounds[bounds.len() - 1] as f64);
            }
            let lo = if i == 0 { 0.0 } else { bounds[i - 1] as f64 };
            let hi = bounds[i] as f64;
            let frac = ((rank - seen as f64) / c as f64).clamp(0.0, 1.0);
            return Some(lo + (hi - lo) * frac);
        }
        seen += c;
    }
    Some(bounds[bounds.len() - 1] as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_cumulative() {
        let h = Histogram::new(BATCH_BOUNDS_ROWS);
        for v in [1, 1, 3, 4, 5, 2000] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.count(), 6);
        assert_eq!(s.sum, 2014);
        assert_eq!(s.counts[0], 2); // <= 1
        assert_eq!(s.counts[2], 2); // 3, 4 in (2, 4]
        assert_eq!(s.counts[3], 1); // 5 in (4, 8]
        assert_eq!(*s.counts.last().unwrap(), 1); // +Inf
        let c = s.cumulative();
        assert!(c.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*c.last().unwrap(), 6);
    }

    #[test]
    fn quantiles_interpolate() {
        let bounds = &[10, 20, 30];
        assert_eq!(quantile(bounds, &[0, 0, 0, 0], 0.5), None);
        // 10 values in (10, 20]: the median is in the middle of that bucket.
        assert_eq!(quantile(bounds, &[0, 10, 0, 0], 0.5), Some(15.0));
        assert_eq!(quantile(bounds, &[0, 0, 0, 3], 0.99), Some(30.0));
        let p99 = quantile(bounds, &[99, 0, 1, 0], 0.99).unwrap();
        assert!(p99 <= 10.0, "{p99}");
    }
}
