//! `--search LO:HI`: the highest offered rate that still meets the SLO,
//! by bisection over short runs. The measurement is a closure so the logic
//! can be tested without a server.

/// Outcome of one trial run at an offered rate.
#[derive(Clone, Copy, Debug)]
pub struct Trial {
    pub rate: f64,
    pub ok: bool,
}

/// Bisect between `lo` and `hi` (req/s). Measures `lo` first (if it fails,
/// nothing meets the SLO: `None`), then `hi` (if it passes, `hi` is the
/// answer), then halves the bracket until `hi/lo - 1 <= rel_tol` or `steps`
/// more trials ran. `meets(rate)` runs one trial. Returns the best rate that
/// passed and every trial in order.
pub fn bisect(
    lo: f64,
    hi: f64,
    steps: usize,
    rel_tol: f64,
    mut meets: impl FnMut(f64) -> bool,
) -> (Option<f64>, Vec<Trial>) {
    let mut trials = Vec::new();
    let mut run = |r: f64, trials: &mut Vec<Trial>| {
        let ok = meets(r);
        trials.push(Trial { rate: r, ok });
        ok
    };
    if !run(lo, &mut trials) {
        return (None, trials);
    }
    if run(hi, &mut trials) {
        return (Some(hi), trials);
    }
    let (mut good, mut bad) = (lo, hi);
    for _ in 0..steps {
        if bad / good - 1.0 <= rel_tol {
            break;
        }
        let mid = (good + bad) / 2.0;
        if run(mid, &mut trials) {
            good = mid;
        } else {
            bad = mid;
        }
    }
    (Some(good), trials)
}

/// Parse `LO:HI` (both > 0, LO < HI).
pub fn parse_range(s: &str) -> Result<(f64, f64), String> {
    let bad = || format!("--search: expected LO:HI in req/s with 0 < LO < HI, got '{s}'");
    let (a, b) = s.split_once(':').ok_or_else(bad)?;
    let (lo, hi) = (
        a.trim().parse::<f64>().map_err(|_| bad())?,
        b.trim().parse::<f64>().map_err(|_| bad())?,
    );
    if !(lo > 0.0 && hi > lo && hi.is_finite()) {
        return Err(bad());
    }
    Ok((lo, hi))
}

/// Parse `R1,R2,...` (each > 0).
pub fn parse_rates(s: &str) -> Result<Vec<f64>, String> {
    let v: Result<Vec<f64>, _> = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.parse::<f64>() {
            Ok(r) if r > 0.0 && r.is_finite() => Ok(r),
            _ => Err(format!("--sweep: '{p}' is not a rate > 0")),
        })
        .collect();
    let v = v?;
    if v.is_empty() {
        return Err("--sweep: no rates given".into());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bisection_finds_the_knee_of_a_fake_server() {
        // A fake server that meets the SLO up to 37_000 req/s.
        let knee = 37_000.0;
        let (best, trials) = bisect(1_000.0, 100_000.0, 20, 0.01, |r| r <= knee);
        let best = best.unwrap();
        assert!(best <= knee && best >= knee * 0.99, "best {best}");
        assert_eq!(trials[0].rate, 1_000.0);
        assert_eq!(trials[1].rate, 100_000.0);
        assert!(trials.iter().all(|t| t.ok == (t.rate <= knee)));
        // Bracket always shrinks: never more than 2 + steps trials.
        let (_, t) = bisect(1.0, 1e9, 5, 0.0, |r| r < 12345.0);
        assert_eq!(t.len(), 7);
    }

    #[test]
    fn bisection_edges() {
        let (best, t) = bisect(10.0, 20.0, 10, 0.01, |_| false);
        assert_eq!((best, t.len()), (None, 1));
        let (best, t) = bisect(10.0, 20.0, 10, 0.01, |_| true);
        assert_eq!((best, t.len()), (Some(20.0), 2));
        assert!(
            parse_range("5:1").is_err() && parse_range("x").is_err() && parse_range("0:5").is_err()
        );
        assert_eq!(parse_range("1000:2e5").unwrap(), (1000.0, 200_000.0));
        assert_eq!(parse_rates("1000, 2000,").unwrap(), vec![1000.0, 2000.0]);
        assert!(parse_rates("1000,-1").is_err() && parse_rates("").is_err());
    }
}
