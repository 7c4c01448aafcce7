//! Tree models (XGBoost JSON, LightGBM text): exactness against the
//! libraries' own predictions (committed fixtures from
//! tools/gen_tree_fixtures.py, versions in tests/fixtures/trees/VERSIONS.txt),
//! missing values, refusals, `beast import-trees`, and a tree + MLP cascade
//! served end to end.

mod common;

use beast::backend::cpu::trees::{margins, TreeScratch};
use beast::backend::Backend;
use beast::model::trees::{Forest, TreeFormat};
use beast::model::Model;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trees")
}

/// Rows of a headerless CSV ('nan' for missing), flattened, and the count.
fn read_rows(path: &Path) -> (Vec<f32>, usize) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    let mut n = 0;
    for line in text.lines().filter(|l| !l.is_empty()) {
        out.extend(line.split(',').map(|c| c.parse::<f32>().unwrap()));
        n += 1;
    }
    (out, n)
}

/// (margin columns, output columns) of an `.expect.csv`.
fn read_expect(path: &Path) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let head: Vec<&str> = lines.next().unwrap().split(',').collect();
    let nm = head.iter().filter(|h| h.starts_with("margin_")).count();
    let (mut m, mut o) = (Vec::new(), Vec::new());
    for l in lines.filter(|l| !l.is_empty()) {
        let v: Vec<f64> = l.split(',').map(|c| c.parse().unwrap()).collect();
        m.push(v[..nm].to_vec());
        o.push(v[nm..].to_vec());
    }
    (m, o)
}

fn parse(file: &str) -> Forest {
    let fmt = if file.ends_with(".json") {
        TreeFormat::XgboostJson
    } else {
        TreeFormat::LightgbmText
    };
    fmt.parse(&std::fs::read(fixtures().join(file)).unwrap())
        .unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// |a - b| <= 1e-5 · max(1, |b|): 1e-5 absolute for probabilities and
/// margins of order 1, relative for regression values in the hundreds
/// (where one f32 ulp is already ~1e-5).
fn close(a: f32, b: f64) -> bool {
    ((a as f64) - b).abs() <= 1e-5 * b.abs().max(1.0)
}

/// The model's margins and outputs on the held-out rows equal the
/// library's, at batch 1, 7 and the whole set (the lockstep blocks and the
/// leftover rows).
fn check_exact(file: &str, rows_file: &str) {
    let forest = parse(file);
    let (x, n) = read_rows(&fixtures().join(rows_file));
    let stem = file.rsplit_once('.').unwrap().0;
    let (em, eo) = read_expect(&fixtures().join(format!("{stem}.expect.csv")));
    assert_eq!(em.len(), n, "{file}: rows");
    let nan_rows = (0..n)
        .filter(|&r| {
            x[r * forest.num_features..(r + 1) * forest.num_features]
                .iter()
                .any(|v| v.is_nan())
        })
        .count();
    assert!(
        nan_rows > n / 2,
        "{rows_file}: the fixture should have many rows with NaN ({nan_rows}/{n})"
    );
    let g = forest.num_groups;
    let model = Model::from_forest(stem, 1, forest.clone(), Default::default(), 0);
    let ow = model.output_width;
    let mut scratch = TreeScratch::default();
    let mut cpu = beast::backend::cpu::CpuBackend::new();
    for batch in [1, 7, n] {
        let mut r = 0;
        while r < n {
            let b = batch.min(n - r);
            let xin = &x[r * forest.num_features..(r + b) * forest.num_features];
            let mut m = vec![0.0f32; b * g];
            margins(&forest, xin, b, &mut m, &mut scratch).unwrap();
            let mut o = vec![0.0f32; b * ow];
            cpu.run(&model, xin, b, &mut o).unwrap();
            for i in 0..b {
                for k in 0..g {
                    let (got, want) = (m[i * g + k], em[r + i][k]);
                    assert!(
                        close(got, want),
                        "{file} row {} margin {k}: beast {got} vs library {want} (batch {batch})",
                        r + i
                    );
                }
                for k in 0..ow {
                    let (got, want) = (o[i * ow + k], eo[r + i][k]);
                    assert!(
                        close(got, want),
                        "{file} row {} output {k}: beast {got} vs library {want} (batch {batch})",
                        r + i
                    );
                }
            }
            r += b;
        }
    }
}

#[test]
fn xgboost_binary_matches_the_library() {
    check_exact("xgb_binary.json", "rows_cancer.csv");
}

#[test]
fn xgboost_multiclass_matches_the_library() {
    check_exact("xgb_multi.json", "rows_wine.csv");
}

#[test]
fn xgboost_regression_matches_the_library() {
    check_exact("xgb_reg.json", "rows_diabetes.csv");
}

#[test]
fn lightgbm_binary_matches_the_library() {
    check_exact("lgb_binary.txt", "rows_cancer.csv");
}

#[test]
fn lightgbm_multiclass_matches_the_library() {
    check_exact("lgb_multi.txt", "rows_wine.csv");
}

#[test]
fn lightgbm_regression_matches_the_library() {
    check_exact("lgb_reg.txt", "rows_diabetes.csv");
}

#[test]
fn lightgbm_zero_as_missing_matches_the_library() {
    check_exact("lgb_zero.txt", "rows_cancer.csv");
}
