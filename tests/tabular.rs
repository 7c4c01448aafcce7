//! Models people actually have, against a real server: binary classifiers
//! (one sigmoid unit, served as two classes), regression ensembles,
//! scikit-learn pipelines with a scaler, class names. The models are the
//! committed fixtures of `tests/fixtures/tabular` (built by
//! `python3 tools/make_fixtures.py --out tests/fixtures/tabular`, library
//! versions in its `VERSIONS`), each beside what scikit-learn answered on
//! the held-out rows, so these tests need no Python.

mod common;

use beast::client::{Client, ClientError, Prediction};
use beast::ensemble::calibrate::calibrate_cascades;
use beast::model::load::{load_repository, Repository};
use beast::model::BatchLimits;
use beast::server::ServerHandle;
use beast::wire::{CacheControl, Input, PolicyOverride, RequestSpec};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tabular")
}

/// Features and labels of a held-out CSV (header row, `label` last).
fn holdout(file: &str) -> (Vec<f32>, usize, Vec<f64>) {
    let text = std::fs::read_to_string(fixtures().join(file)).unwrap();
    let mut lines = text.lines();
    let width = lines.next().unwrap().split(',').count() - 1;
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for l in lines {
        let f: Vec<f64> = l.split(',').map(|v| v.parse().unwrap()).collect();
        x.extend(f[..width].iter().map(|&v| v as f32));
        y.push(f[width]);
    }
    (x, width, y)
}

/// scikit-learn's answers for one model, one row per held-out row.
fn expected(model: &str) -> Vec<Vec<f64>> {
    let text = std::fs::read_to_string(fixtures().join(format!("expected/{model}.csv"))).unwrap();
    text.lines()
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect()
}

fn load() -> Repository {
    let dir = fixtures();
    let mut repo = load_repository(&dir, &BatchLimits::default()).unwrap();
    calibrate_cascades(&mut repo, &dir);
    repo
}

fn start(repo: Repository) -> ServerHandle {
    common::start_with(common::test_config(), repo)
}

fn ask(
    c: &Client,
    target: &str,
    x: &[f32],
    width: usize,
    policy: PolicyOverride,
) -> Result<Prediction, ClientError> {
    c.predict(&RequestSpec {
        target,
        version: None,
        rows: (x.len() / width) as u32,
        cols: width as u32,
        input: Input::F32(x),
        deadline_us: None,
        domain: None,
        cache: CacheControl::Bypass,
        policy,
    })
}

/// Every held-out row, one request per row.
fn ask_rows(
    c: &Client,
    target: &str,
    x: &[f32],
    width: usize,
    p: PolicyOverride,
) -> Vec<Prediction> {
    x.chunks_exact(width)
        .map(|r| ask(c, target, r, width, p).unwrap())
        .collect()
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b })
}

fn accuracy(answers: &[usize], labels: &[f64]) -> f64 {
    let right = answers
        .iter()
        .zip(labels)
        .filter(|(a, l)| **a as f64 == **l)
        .count();
    right as f64 / labels.len() as f64
}

const BC: [&str; 3] = ["bc_small", "bc_medium", "bc_large"];

#[test]
fn binary_model_is_served_as_two_classes_matching_sklearn() {
    let h = start(load());
    let (x, w, y) = holdout("breast_cancer_holdout.csv");
    let c = Client::connect(h.addr).unwrap();
    for m in BC {
        let want = expected(m);
        // All rows in one request (beyond max_batch: it runs alone).
        let p = ask(&c, m, &x, w, PolicyOverride::Default).unwrap();
        assert_eq!(p.cols, 2, "{m}: one sigmoid unit is served as [1-p, p]");
        let mut answers = Vec::new();
        for (r, row) in p.outputs.chunks_exact(2).enumerate() {
            for k in 0..2 {
                let d = (row[k] as f64 - want[r][k]).abs();
                assert!(
                    d < 3e-3,
                    "{m} row {r} class {k}: {} vs scikit-learn {}",
                    row[k],
                    want[r][k]
                );
            }
            assert!((row[0] + row[1] - 1.0).abs() < 1e-5);
            answers.push(argmax(row));
        }
        let sk: Vec<usize> = want.iter().map(|r| (r[1] > r[0]) as usize).collect();
        let agree = answers.iter().zip(&sk).filter(|(a, b)| a == b).count();
        assert!(
            agree + 1 >= answers.len(),
            "{m}: argmax agrees with scikit-learn on {agree} of {}",
            answers.len()
        );
        assert!(
            accuracy(&answers, &y) > 0.9,
            "{m}: accuracy {}",
            accuracy(&answers, &y)
        );
    }
    h.shutdown();
}

#[test]
fn binary_ensembles_combine_vote_and_cascade_on_two_classes() {
    let repo = load();
    // Calibration found a real threshold: a confident negative counts as
    // confident (before, p(class 1) was read as the confidence and the
    // search settled on 0.000).
    let t = repo.ensembles["bc_cascade"].selection.cascade_threshold;
    assert!(t > 0.5 && t < 1.0, "calibrated threshold {t}");
    let h = start(repo);
    let (x, w, y) = holdout("breast_cancer_holdout.csv");
    let c = Client::connect(h.addr).unwrap();
    let want: Vec<Vec<Vec<f64>>> = BC.iter().map(|m| expected(m)).collect();

    let mean = ask_rows(&c, "bc", &x, w, PolicyOverride::All);
    let mut answers = Vec::new();
    for (r, p) in mean.iter().enumerate() {
        assert_eq!(p.cols, 2);
        let m1 = want.iter().map(|e| e[r][1]).sum::<f64>() / 3.0;
        assert!(
            (p.outputs[1] as f64 - m1).abs() < 3e-3,
            "row {r}: {} vs {m1}",
            p.outputs[1]
        );
        answers.push(argmax(&p.outputs));
    }
    let acc_all = accuracy(&answers, &y);
    assert!(acc_all > 0.93, "mean accuracy {acc_all}");

    // Vote: the majority of the members' argmax, which now differ by row.
    let vote = ask_rows(&c, "bc_vote", &x, w, PolicyOverride::All);
    let mut both = [0usize; 2];
    for (r, p) in vote.iter().enumerate() {
        let votes1 = want.iter().filter(|e| e[r][1] > e[r][0]).count();
        let got = argmax(&p.outputs);
        both[got] += 1;
        if votes1 != 0 && votes1 != 3 {
            // Rows the members disagree on: decided by 2 of 3.
            assert_eq!(
                got,
                (votes1 >= 2) as usize,
                "row {r}: {votes1} votes for class 1"
            );
        } else {
            assert_eq!(got, (votes1 == 3) as usize, "row {r}");
        }
    }
    assert!(both[0] > 20 && both[1] > 20, "vote answers {both:?}");

    // Cascade: confident rows of either class stop early, and the answers
    // agree with `all` on (nearly) every row.
    let casc = ask_rows(&c, "bc_cascade", &x, w, PolicyOverride::Default);
    let flops = |ps: &[Prediction]| ps.iter().flat_map(|p| &p.runs).map(|r| r.2).sum::<u64>();
    let casc_answers: Vec<usize> = casc.iter().map(|p| argmax(&p.outputs)).collect();
    let agree = casc_answers
        .iter()
        .zip(&answers)
        .filter(|(a, b)| a == b)
        .count();
    assert!(
        agree as f64 >= 0.98 * answers.len() as f64,
        "cascade agrees on {agree}"
    );
    let stopped_on_0 = casc
        .iter()
        .filter(|p| p.runs.len() == 1 && argmax(&p.outputs) == 0)
        .count();
    assert!(
        stopped_on_0 > 10,
        "confident class-0 rows stop after one member: {stopped_on_0}"
    );
    assert!(
        flops(&casc) * 2 < flops(&mean),
        "cascade {} vs all {}",
        flops(&casc),
        flops(&mean)
    );
    h.shutdown();
}

#[test]
fn binary_feedback_accepts_label_one() {
    let h = start(load());
    let (x, w, _) = holdout("breast_cancer_holdout.csv");
    let c = Client::connect(h.addr).unwrap();
    for label in [1, 0] {
        let p = ask(&c, "bc", &x[..w], w, PolicyOverride::Bandit).unwrap();
        assert_ne!(p.ticket, 0);
        c.feedback(p.ticket, label).unwrap();
    }
    let p = ask(&c, "bc", &x[..w], w, PolicyOverride::Bandit).unwrap();
    match c.feedback(p.ticket, 2) {
        Err(ClientError::BadRequest(msg)) => assert!(msg.contains("2 classes"), "{msg}"),
        other => panic!("label 2 of a binary ensemble: {other:?}"),
    }
    h.shutdown();
}

/// (accuracy %, compute saved %) of beast-eval's row `name`.
fn eval_row(table: &str, name: &str) -> (f64, f64) {
    let line = table
        .lines()
        .find(|l| l.starts_with(&format!("| {name}")))
        .unwrap_or_else(|| panic!("no row {name} in\n{table}"));
    let cells: Vec<&str> = line.split('|').map(str::trim).collect();
    let pct = |s: &str| s.trim_end_matches('%').parse::<f64>().unwrap();
    (pct(cells[2]), pct(cells[5]))
}

fn beast_eval(h: &ServerHandle, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_beast-eval"))
        .args(["--server", &h.addr.to_string()])
        .args(args)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{table}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    table
}

#[test]
fn beast_eval_on_a_binary_ensemble_reports_real_accuracy() {
    let h = start(load());
    let data = fixtures().join("breast_cancer_holdout.csv");
    let table = beast_eval(
        &h,
        &[
            "--target",
            "bc",
            "--data",
            data.to_str().unwrap(),
            "--bandit-passes",
            "1",
        ],
    );
    let (all, _) = eval_row(&table, "all");
    assert!(all > 93.0, "all {all}%\n{table}");
    for m in BC {
        let (a, _) = eval_row(&table, &format!("{m} alone"));
        assert!(a > 90.0, "{m} {a}%\n{table}");
    }
    let (casc, saved) = eval_row(&table, "cascade");
    assert!(
        casc > 92.0 && saved > 30.0,
        "cascade {casc}% saved {saved}%\n{table}"
    );
    h.shutdown();
}
