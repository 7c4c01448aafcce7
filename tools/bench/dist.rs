//! Seeded randomness for the generator: a small PRNG, the arrival
//! processes (uniform, Poisson), a Zipf sampler and the weighted target mix.
//! Everything here is deterministic for a given seed, so two runs with the
//! same flags offer the same requests in the same order.

/// SplitMix64: tiny, fast, good enough for load shapes (not for crypto).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [0, n); n > 0.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

/// How requests are spaced in time on one connection.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arrivals {
    /// Exactly `1/rate` apart.
    Uniform,
    /// Exponential gaps with mean `1/rate` (a Poisson process; the sum of
    /// the connections' processes is again Poisson at the total rate).
    Poisson,
}

impl Arrivals {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "uniform" => Ok(Arrivals::Uniform),
            "poisson" => Ok(Arrivals::Poisson),
            _ => Err(format!(
                "--arrivals: expected uniform or poisson, got '{s}'"
            )),
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            Arrivals::Uniform => "uniform",
            Arrivals::Poisson => "poisson",
        }
    }
    /// Seconds to the next arrival at `rate` per second.
    pub fn gap_s(self, rate: f64, rng: &mut Rng) -> f64 {
        match self {
            Arrivals::Uniform => 1.0 / rate,
            // 1 - u is in (0, 1], so ln never sees 0.
            Arrivals::Poisson => -(1.0 - rng.next_f64()).ln() / rate,
        }
    }
}

/// Zipf(s) over ranks 0..n (rank 0 the most popular): P(k) ∝ 1/(k+1)^s.
/// Inverse-CDF by binary search over a precomputed table: O(n) memory once,
/// O(log n) per draw and no allocation.
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Result<Self, String> {
        if n == 0 {
            return Err("--distinct must be at least 1".into());
        }
        if !(s.is_finite() && s >= 0.0) {
            return Err(format!(
                "--zipf: exponent must be a finite number >= 0, got {s}"
            ));
        }
        let mut cdf = Vec::with_capacity(n);
        let mut acc = 0.0;
        for k in 0..n {
            acc += 1.0 / ((k + 1) as f64).powf(s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Ok(Zipf { cdf })
    }
    pub fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.next_f64();
        self.cdf
            .partition_point(|&c| c <= u)
            .min(self.cdf.len() - 1)
    }
    /// Probability of rank `k` (0-based).
    #[cfg(test)]
    pub fn p(&self, k: usize) -> f64 {
        self.cdf[k] - if k == 0 { 0.0 } else { self.cdf[k - 1] }
    }
}

/// One entry of `--target name[:weight[:width]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetSpec {
    pub name: String,
    pub weight: f64,
    pub width: usize,
}

/// Parse `bench_ens:3,bench_a:1:128`; missing weight is 1, missing width is
/// `default_width`.
pub fn parse_targets(s: &str, default_width: usize) -> Result<Vec<TargetSpec>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let mut it = part.split(':');
        let name = it.next().unwrap_or("").trim();
        if name.is_empty() {
            return Err(format!("--target: empty name in '{part}'"));
        }
        let weight = match it.next().map(str::trim) {
            None | Some("") => 1.0,
            Some(w) => match w.parse::<f64>() {
                Ok(w) if w.is_finite() && w > 0.0 => w,
                _ => {
                    return Err(format!(
                        "--target: weight '{w}' of '{name}' must be a number > 0"
                    ))
                }
            },
        };
        let width = match it.next().map(str::trim) {
            None | Some("") => default_width,
            Some(w) => match w.parse::<usize>() {
                Ok(w) if w > 0 => w,
                _ => {
                    return Err(format!(
                        "--target: width '{w}' of '{name}' must be an integer > 0"
                    ))
                }
            },
        };
        if it.next().is_some() {
            return Err(format!(
                "--target: '{part}' has too many ':' fields (name[:weight[:width]])"
            ));
        }
        if default_width == 0 && width == 0 {
            return Err(format!("--target: no width for '{name}'"));
        }
        out.push(TargetSpec {
            name: name.to_string(),
            weight,
            width,
        });
    }
    if out.is_empty() {
        return Err("--target: no target given".into());
    }
    Ok(out)
}

/// Weighted choice among targets by cumulative weights.
pub struct Mix {
    cum: Vec<f64>,
}

impl Mix {
    pub fn new(targets: &[TargetSpec]) -> Self {
        let total: f64 = targets.iter().map(|t| t.weight).sum();
        let mut acc = 0.0;
        let cum = targets
            .iter()
            .map(|t| {
                acc += t.weight / total;
                acc
            })
            .collect();
        Mix { cum }
    }
    pub fn pick(&self, rng: &mut Rng) -> usize {
        if self.cum.len() == 1 {
            return 0;
        }
        let u = rng.next_f64();
        self.cum
            .partition_point(|&c| c <= u)
            .min(self.cum.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_rank_one_frequency_matches_expectation() {
        let (n, s) = (1000, 1.0);
        let z = Zipf::new(n, s).unwrap();
        let h: f64 = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).sum();
        let expect = 1.0 / h;
        assert!((z.p(0) - expect).abs() < 1e-12);
        let mut rng = Rng::new(42);
        let draws = 200_000;
        let mut counts = vec![0u32; n];
        for _ in 0..draws {
            counts[z.sample(&mut rng)] += 1;
        }
        let f1 = counts[0] as f64 / draws as f64;
        assert!(
            (f1 - expect).abs() < 0.01,
            "rank-1 frequency {f1}, expected {expect}"
        );
        // Rank 1 is about twice rank 2 at s = 1, and frequencies fall with rank.
        let ratio = counts[0] as f64 / counts[1] as f64;
        assert!((ratio - 2.0).abs() < 0.15, "rank1/rank2 = {ratio}");
        assert!(counts[0] > counts[9] && counts[9] > counts[99]);
        // s = 0 is uniform.
        let u = Zipf::new(10, 0.0).unwrap();
        assert!((u.p(0) - 0.1).abs() < 1e-12 && (u.p(9) - 0.1).abs() < 1e-12);
        assert!(Zipf::new(0, 1.0).is_err() && Zipf::new(5, f64::NAN).is_err());
    }

    #[test]
    fn poisson_inter_arrival_mean_and_spread() {
        let mut rng = Rng::new(7);
        let rate = 5000.0;
        let n = 200_000;
        let gaps: Vec<f64> = (0..n)
            .map(|_| Arrivals::Poisson.gap_s(rate, &mut rng))
            .collect();
        let mean = gaps.iter().sum::<f64>() / n as f64;
        assert!(
            (mean * rate - 1.0).abs() < 0.01,
            "mean gap {mean}, expected {}",
            1.0 / rate
        );
        // Exponential: standard deviation equals the mean.
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n as f64;
        assert!((var.sqrt() / mean - 1.0).abs() < 0.02);
        assert!(gaps.iter().all(|&g| g >= 0.0 && g.is_finite()));
        assert_eq!(Arrivals::Uniform.gap_s(rate, &mut rng), 1.0 / rate);
        assert!(Arrivals::parse("gaussian").is_err());
    }

    #[test]
    fn target_mix_parsing() {
        let t = parse_targets("bench_ens:3,bench_a:1,x::12, y:0.5:7", 256).unwrap();
        assert_eq!(t.len(), 4);
        assert_eq!(
            t[0],
            TargetSpec {
                name: "bench_ens".into(),
                weight: 3.0,
                width: 256
            }
        );
        assert_eq!(
            t[1],
            TargetSpec {
                name: "bench_a".into(),
                weight: 1.0,
                width: 256
            }
        );
        assert_eq!(
            t[2],
            TargetSpec {
                name: "x".into(),
                weight: 1.0,
                width: 12
            }
        );
        assert_eq!(
            t[3],
            TargetSpec {
                name: "y".into(),
                weight: 0.5,
                width: 7
            }
        );
        assert_eq!(parse_targets("a", 12).unwrap()[0].width, 12);
        for bad in ["", ":3", "a:0", "a:-1", "a:x", "a:1:0", "a:1:w", "a:1:2:3"] {
            assert!(parse_targets(bad, 12).is_err(), "'{bad}' should fail");
        }
        // The mix follows the weights.
        let mix = Mix::new(&parse_targets("a:3,b:1", 1).unwrap());
        let mut rng = Rng::new(1);
        let n = 100_000;
        let a = (0..n).filter(|_| mix.pick(&mut rng) == 0).count();
        assert!((a as f64 / n as f64 - 0.75).abs() < 0.01);
    }
}
