//! The cascade policy: run members cheapest first, combine what ran, stop
//! as soon as every row of the request is confident.
//!
//! Owns: the confidence test and the calibration search that turns a
//! target agreement with `all` into a threshold (run at start-up by
//! [`super::calibrate`]). The stepping itself lives
//! on the request path (`server::shard`), which keeps the request's rows
//! so later members can be enqueued after earlier ones answered.

use super::{argmax, Accumulator, Weight};
use crate::model::{CascadeMetric, Combiner};

/// The confidence of one combined row.
pub fn row_confidence(row: &[f32], metric: CascadeMetric) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &x in row {
        if x > a {
            b = a;
            a = x;
        } else if x > b {
            b = x;
        }
    }
    match metric {
        CascadeMetric::MaxProb => a,
        CascadeMetric::Margin if row.len() < 2 => a,
        CascadeMetric::Margin => a - b,
    }
}

/// Every row of `combined` (`cols` wide) reaches `threshold`.
pub fn confident(combined: &[f32], cols: usize, metric: CascadeMetric, threshold: f32) -> bool {
    combined
        .chunks_exact(cols.max(1))
        .all(|r| row_confidence(r, metric) >= threshold)
}

/// The answer (argmax of each row) a cascade at `threshold` gives, and
/// the members it runs, from every member's precomputed output on a
/// calibration set. `outputs[m]` is member m's `rows × cols` output.
#[allow(clippy::too_many_arguments)]
fn simulate(
    outputs: &[Vec<f32>],
    by_cost: &[u8],
    combiner: Combiner,
    weights: &[f32],
    cols: usize,
    metric: CascadeMetric,
    threshold: f32,
    mut visit: impl FnMut(usize, usize, usize),
) {
    let rows = outputs[0].len() / cols;
    let mut acc = Accumulator::default();
    for r in 0..rows {
        acc.reset_for(1, cols, combiner);
        let mut ran = 0;
        for &m in by_cost {
            let m = m as usize;
            acc.add(
                &outputs[m][r * cols..(r + 1) * cols],
                Weight::Scalar(weights[m]),
            );
            ran += 1;
            if confident(acc.combine(combiner), cols, metric, threshold) {
                break;
            }
        }
        visit(r, argmax(acc.combine(combiner)), ran);
    }
}

/// The smallest threshold (to 0.005) whose cascade answers agree with
/// `all` on at least `target` of the calibration rows. Returns
/// (threshold, agreement, mean members run).
pub fn calibrate(
    outputs: &[Vec<f32>],
    by_cost: &[u8],
    combiner: Combiner,
    weights: &[f32],
    cols: usize,
    metric: CascadeMetric,
    target: f32,
) -> (f32, f32, f32) {
    let rows = outputs[0].len() / cols;
    let mut all = vec![0usize; rows];
    simulate(
        outputs,
        by_cost,
        combiner,
        weights,
        cols,
        metric,
        f32::INFINITY,
        |r, a, _| all[r] = a,
    );
    // Agreement grows with the threshold (more members run), so the
    // first that reaches the target is the cheapest that does.
    let mut last = (1.0, 1.0, by_cost.len() as f32);
    for step in 0..=200 {
        let t = step as f32 * 0.005;
        let (mut agree, mut ran_sum) = (0usize, 0usize);
        simulate(
            outputs,
            by_cost,
            combiner,
            weights,
            cols,
            metric,
            t,
            |r, a, ran| {
                agree += (a == all[r]) as usize;
                ran_sum += ran;
            },
        );
        let agreement = agree as f32 / rows.max(1) as f32;
        last = (t, agreement, ran_sum as f32 / rows.max(1) as f32);
        if agreement >= target {
            return last;
        }
    }
    last
}

/// Feature rows of a calibration CSV: a header row naming the columns,
/// then numbers; a column named `label` is left out. Returns (rows, width).
pub fn read_calibration_csv(text: &str) -> Result<(Vec<f32>, usize), String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = lines.next().ok_or("empty file")?;
    let names: Vec<&str> = header.split(',').map(str::trim).collect();
    let label = names.iter().position(|n| *n == "label");
    let width = names.len() - label.is_some() as usize;
    let mut data = Vec::new();
    for (i, line) in lines.enumerate() {
        let mut n = 0;
        for (j, f) in line.split(',').enumerate() {
            if Some(j) == label {
                continue;
            }
            let x: f32 = f
                .trim()
                .parse()
                .map_err(|_| format!("line {}: column {j}: not a number: {f:?}", i + 2))?;
            data.push(x);
            n += 1;
        }
        if n != width {
            return Err(format!(
                "line {}: {n} features, the header names {width}",
                i + 2
            ));
        }
    }
    if data.is_empty() {
        return Err("no rows".into());
    }
    Ok((data, width))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confidence_metrics() {
        assert_eq!(
            row_confidence(&[0.1, 0.7, 0.2], CascadeMetric::MaxProb),
            0.7
        );
        assert!((row_confidence(&[0.1, 0.7, 0.2], CascadeMetric::Margin) - 0.5).abs() < 1e-6);
        assert!(confident(
            &[0.95, 0.05, 0.9, 0.1],
            2,
            CascadeMetric::MaxProb,
            0.9
        ));
        assert!(!confident(
            &[0.95, 0.05, 0.6, 0.4],
            2,
            CascadeMetric::MaxProb,
            0.9
        ));
    }

    #[test]
    fn calibration_finds_the_cheapest_threshold() {
        // Member 0 (cheap) is right and confident on rows 0-1, unsure
        // and wrong on row 2 and 3; member 1 is sure everywhere.
        let cheap = vec![0.9, 0.1, 0.8, 0.2, 0.4, 0.6, 0.45, 0.55];
        let big = vec![1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
        let outs = vec![cheap, big];
        let (t, agree, ran) = calibrate(
            &outs,
            &[0, 1],
            Combiner::Mean,
            &[1.0, 1.0],
            2,
            CascadeMetric::MaxProb,
            1.0,
        );
        assert_eq!(agree, 1.0);
        assert!(t > 0.6 && t <= 0.8, "threshold {t}");
        assert_eq!(ran, 1.5);
    }

    #[test]
    fn csv_drops_the_label() {
        let (x, w) = read_calibration_csv("a,b,label\n1,2,0\n3,4,1\n").unwrap();
        assert_eq!((x, w), (vec![1.0, 2.0, 3.0, 4.0], 2));
        assert!(read_calibration_csv("a,b\n1,x\n").is_err());
        assert!(read_calibration_csv("a,b\n1\n").is_err());
    }
}
