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
    let text = std::fs::read_to_string(fixtures().join(format!("{model}.expected.csv"))).unwrap();
    text.lines()
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect()
}

fn load() -> Repository {
    let dir = fixtures();
    let mut repo = load_repository(&dir, &BatchLimits::default()).unwrap();
    calibrate_cascades(&mut repo, &dir);
    assert!(repo.errors.is_empty(), "{:?}", repo.errors);
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
        // This server's admin port (for --task auto), not the default one.
        .args(["--admin", &h.admin_addr.unwrap().to_string()])
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

// ---- scikit-learn pipelines with a scaler, class names ----------------------

/// Every held-out row of `file` through `model` on a real server, compared
/// with scikit-learn's predict_proba (FP16 weights: within 3e-3).
fn pipeline_round_trip(h: &ServerHandle, model: &str, file: &str, min_accuracy: f64) {
    let (x, w, y) = holdout(file);
    let want = expected(model);
    let c = Client::connect(h.addr).unwrap();
    let p = ask(&c, model, &x, w, PolicyOverride::Default).unwrap();
    let cols = p.cols as usize;
    assert_eq!(cols, want[0].len(), "{model}");
    let mut answers = Vec::new();
    let mut worst = 0f64;
    for (r, row) in p.outputs.chunks_exact(cols).enumerate() {
        for k in 0..cols {
            worst = worst.max((row[k] as f64 - want[r][k]).abs());
        }
        answers.push(argmax(row));
    }
    assert!(worst < 3e-3, "{model}: max |p - scikit-learn| = {worst}");
    assert!(
        accuracy(&answers, &y) >= min_accuracy,
        "{model}: {}",
        accuracy(&answers, &y)
    );
}

#[test]
fn sklearn_pipelines_with_a_scaler_match_predict_proba() {
    let h = start(load());
    // Raw features (area up to ~2500) through the model's StandardScaler.
    pipeline_round_trip(&h, "bc_std", "breast_cancer_raw_holdout.csv", 0.93);
    // MinMaxScaler(clip=True): min-max then clip to [0, 1].
    pipeline_round_trip(&h, "wine_mm", "wine_holdout.csv", 0.95);
    // Both round trips through beast-eval too.
    for (target, data, min) in [
        ("bc_std", "breast_cancer_raw_holdout.csv", 93.0),
        ("wine_mm", "wine_holdout.csv", 95.0),
    ] {
        let d = fixtures().join(data);
        let table = beast_eval(
            &h,
            &[
                "--target",
                target,
                "--data",
                d.to_str().unwrap(),
                "--policies",
                "all",
                "--no-members",
            ],
        );
        let (acc, _) = eval_row(&table, "all");
        assert!(acc >= min, "{target}: {acc}%\n{table}");
    }
    h.shutdown();
}

#[test]
fn class_names_are_listed_and_printed() {
    let h = start(load());
    let admin = h.admin_addr.unwrap().to_string();
    let (code, body) =
        beast::server::admin::get(&admin, "/v1/models", std::time::Duration::from_secs(5)).unwrap();
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let model = |n: &str| {
        v["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == n)
            .unwrap()
            .clone()
    };
    let bc = model("bc_std");
    assert_eq!(bc["classes"], serde_json::json!(["malignant", "benign"]));
    assert_eq!(bc["binary"], true);
    assert_eq!(bc["output_width"], 2);
    assert_eq!(bc["preprocess"], "standardize");
    assert_eq!(model("wine_mm")["preprocess"], "min_max+clip");
    assert_eq!(model("diab_a")["task"], "regression");
    // `beast predict` names the class (a benign row of the raw holdout).
    let (x, w, y) = holdout("breast_cancer_raw_holdout.csv");
    let r = y.iter().position(|&l| l == 1.0).unwrap();
    let row: Vec<String> = x[r * w..(r + 1) * w]
        .iter()
        .map(|v| v.to_string())
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_beast"))
        .args([
            "predict",
            "--server",
            &h.addr.to_string(),
            "--admin",
            &admin,
        ])
        .args(["--target", "bc_std", "--input", &row.join(",")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("row 0: class 1 (benign)"), "{text}");
    h.shutdown();
}

// ---- regression ---------------------------------------------------------------

const DIAB: [&str; 3] = ["diab_a", "diab_b", "diab_c"];

fn close(got: f32, want: f64) -> bool {
    (got as f64 - want).abs() <= 0.01 * want.abs() + 0.5
}

#[test]
fn regression_ensembles_combine_values() {
    let h = start(load());
    let (x, w, _) = holdout("diabetes_holdout.csv");
    let c = Client::connect(h.addr).unwrap();
    let want: Vec<Vec<Vec<f64>>> = DIAB.iter().map(|m| expected(m)).collect();
    for (i, m) in DIAB.iter().enumerate() {
        let p = ask(&c, m, &x, w, PolicyOverride::Default).unwrap();
        assert_eq!(p.cols, 1);
        for (r, v) in p.outputs.iter().enumerate() {
            assert!(
                close(*v, want[i][r][0]),
                "{m} row {r}: {v} vs scikit-learn {}",
                want[i][r][0]
            );
        }
    }
    let rows = x.len() / w;
    let combined = |target: &str| {
        ask(&c, target, &x, w, PolicyOverride::Default)
            .unwrap()
            .outputs
    };
    let (mean, median, weighted) = (
        combined("diab"),
        combined("diab_median"),
        combined("diab_w"),
    );
    let mut median_differs = 0;
    for r in 0..rows {
        let mut v: Vec<f64> = want.iter().map(|e| e[r][0]).collect();
        let m = v.iter().sum::<f64>() / 3.0;
        let wm = (v[0] + 2.0 * v[1] + v[2]) / 4.0;
        v.sort_by(f64::total_cmp);
        assert!(close(mean[r], m), "row {r}: mean {} vs {m}", mean[r]);
        assert!(
            close(weighted[r], wm),
            "row {r}: weighted {} vs {wm}",
            weighted[r]
        );
        assert!(
            close(median[r], v[1]),
            "row {r}: median {} vs {}",
            median[r],
            v[1]
        );
        median_differs += ((median[r] - mean[r]).abs() > 1.0) as usize;
    }
    assert!(
        median_differs > rows / 4,
        "median is not the mean: {median_differs} rows differ"
    );
    h.shutdown();
}

#[test]
fn regression_ensembles_refuse_class_policies_and_feedback() {
    let h = start(load());
    let (x, w, _) = holdout("diabetes_holdout.csv");
    let c = Client::connect(h.addr).unwrap();
    for p in [PolicyOverride::Cascade, PolicyOverride::Bandit] {
        match ask(&c, "diab", &x[..w], w, p) {
            Err(ClientError::BadRequest(m)) => {
                assert!(m.contains("regression ensemble"), "{m}")
            }
            other => panic!("{p:?} on a regression ensemble: {other:?}"),
        }
    }
    // Deadline: run what fits; an answer.
    let p = ask(&c, "diab", &x[..w], w, PolicyOverride::Deadline).unwrap();
    assert_eq!(p.cols, 1);
    let p = ask(&c, "diab", &x[..w], w, PolicyOverride::All).unwrap();
    assert_ne!(p.ticket, 0);
    match c.feedback(p.ticket, 1) {
        Err(ClientError::BadRequest(m)) => assert!(m.contains("regression"), "{m}"),
        other => panic!("feedback on a regression answer: {other:?}"),
    }
    h.shutdown();
}

#[test]
fn regression_ensembles_with_class_policies_are_refused_at_load() {
    let dir = common::temp_dir("tabular-refuse");
    let bc_toml = std::fs::read_to_string(fixtures().join("bc_small/model.toml")).unwrap();
    // Two 30→1 models of bc_small's weights: a regression and a one-class classifier.
    let reg = bc_toml.replace(
        "output = \"sigmoid\"",
        "output = \"sigmoid\"\ntask = \"regression\"",
    );
    let one = bc_toml.replace("output = \"sigmoid\"", "output = \"softmax\"");
    for (m, from, toml) in [
        ("diab_a", "diab_a", None),
        ("diab_b", "diab_b", None),
        ("bc_small", "bc_small", None),
        ("bc_reg", "bc_small", Some(reg)),
        ("bc_one", "bc_small", Some(one)),
    ] {
        let from = fixtures().join(from);
        let to = dir.join(m);
        std::fs::create_dir_all(to.join("1")).unwrap();
        match toml {
            Some(t) => std::fs::write(to.join("model.toml"), t).unwrap(),
            None => drop(std::fs::copy(from.join("model.toml"), to.join("model.toml")).unwrap()),
        }
        std::fs::copy(
            from.join("1/weights.safetensors"),
            to.join("1/weights.safetensors"),
        )
        .unwrap();
    }
    std::fs::write(
        dir.join("ensembles.toml"),
        "[ensembles.c]\nmembers = [\"diab_a\", \"diab_b\"]\npolicy = \"cascade\"\n\
         [ensembles.b]\nmembers = [\"diab_a\", \"diab_b\"]\npolicy = \"bandit\"\n\
         [ensembles.v]\nmembers = [\"diab_a\", \"diab_b\"]\ncombiner = \"vote\"\n\
         [ensembles.m]\nmembers = [\"bc_reg\", \"bc_one\"]\n\
         [ensembles.cm]\nmembers = [\"bc_small\"]\ncombiner = \"median\"\n\
         [ensembles.ok]\nmembers = [\"diab_a\", \"diab_b\"]\ncombiner = \"median\"\npolicy = \"deadline\"\n",
    )
    .unwrap();
    let repo = load_repository(&dir, &BatchLimits::default()).unwrap();
    let errs = repo.errors.join("\n");
    for want in [
        "ensembles.c.policy: \"cascade\" needs class probabilities",
        "ensembles.b.policy: \"bandit\" needs class probabilities",
        "ensembles.v.combiner: \"vote\" does not fit a regression ensemble",
        "ensembles.m.members[1]: \"bc_one\" is a classification model but \"bc_reg\" is a regression model",
        "ensembles.cm.combiner: \"median\" does not fit a classification ensemble",
    ] {
        assert!(errs.contains(want), "missing {want:?} in\n{errs}");
    }
    assert_eq!(repo.refused_ensembles, 5, "{errs}");
    assert!(repo.ensembles.contains_key("ok"));
    assert_eq!(repo.refused_models, 0, "{errs}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn beast_eval_reports_mae_and_rmse_for_regression() {
    let h = start(load());
    let (_, _, y) = holdout("diabetes_holdout.csv");
    let want = expected("diab_a");
    let sk_mae = want
        .iter()
        .zip(&y)
        .map(|(p, l)| (p[0] - l).abs())
        .sum::<f64>()
        / y.len() as f64;
    let d = fixtures().join("diabetes_holdout.csv");
    // --task auto (the default) reads the task from the admin port.
    let table = beast_eval(&h, &["--target", "diab", "--data", d.to_str().unwrap()]);
    assert!(table.contains("| policy | MAE | RMSE |"), "{table}");
    let line = table
        .lines()
        .find(|l| l.starts_with("| diab_a alone"))
        .unwrap();
    let cells: Vec<&str> = line.split('|').map(str::trim).collect();
    let (mae, rmse): (f64, f64) = (cells[2].parse().unwrap(), cells[3].parse().unwrap());
    assert!(
        (mae - sk_mae).abs() < 0.5,
        "diab_a MAE {mae} vs scikit-learn {sk_mae}\n{table}"
    );
    assert!(rmse >= mae, "{table}");
    assert!(
        !table.contains("| cascade"),
        "cascade is skipped for regression\n{table}"
    );
    assert!(table.contains("| deadline"), "{table}");
    h.shutdown();
}

// ---- the exporters, live (skipped without the Python packages) ----------------

fn python_has(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn make_fixtures_regenerates_the_committed_manifests() {
    if !python_has("sklearn") {
        println!("SKIP: scikit-learn is not installed (python3 -c 'import sklearn' failed)");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = common::temp_dir("tabular-regen");
    let o = Command::new("python3")
        .arg(root.join("tools/make_fixtures.py"))
        .arg("--out")
        .arg(&out)
        // model.toml does not depend on the trained weights: train little.
        .args(["--max-iter", "2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // model.toml holds what scikit-learn computed without BLAS (scaler
    // statistics, shapes, class names): byte for byte the committed text.
    for m in BC.iter().chain(&DIAB).chain(&["bc_std", "wine_mm"]) {
        let a = std::fs::read_to_string(out.join(m).join("model.toml")).unwrap();
        let b = std::fs::read_to_string(fixtures().join(m).join("model.toml")).unwrap();
        assert_eq!(a, b, "{m}/model.toml");
    }
    let repo = load_repository(&out, &BatchLimits::default()).unwrap();
    assert!(repo.errors.is_empty(), "{:?}", repo.errors);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn torch_export_folds_norms_drops_dropout_and_matches_torch() {
    if !python_has("torch") {
        println!("SKIP: torch is not installed (python3 -c 'import torch' failed)");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = common::temp_dir("tabular-torch");
    let o = Command::new("python3")
        .arg(root.join("tests/fixtures/torch_export_check.py"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(said.contains("exact GELU: refused"), "{said}");
    let repo = load_repository(&out, &BatchLimits::default()).unwrap();
    assert!(repo.errors.is_empty(), "{:?}", repo.errors);
    let h = start(repo);
    let c = Client::connect(h.addr).unwrap();
    for m in ["torch_mc", "torch_bin"] {
        let text = std::fs::read_to_string(out.join(format!("{m}.inputs.csv"))).unwrap();
        let x: Vec<f32> = text
            .lines()
            .skip(1)
            .flat_map(|l| l.split(',').map(|v| v.parse::<f32>().unwrap()))
            .collect();
        let want: Vec<f64> = std::fs::read_to_string(out.join(format!("{m}.expected.csv")))
            .unwrap()
            .lines()
            .flat_map(|l| {
                l.split(',')
                    .map(|v| v.parse::<f64>().unwrap())
                    .collect::<Vec<_>>()
            })
            .collect();
        let p = ask(&c, m, &x, 8, PolicyOverride::Default).unwrap();
        assert_eq!(p.outputs.len(), want.len(), "{m}: columns");
        let worst = p
            .outputs
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(worst < 5e-3, "{m}: max |p - torch| = {worst}");
    }
    h.shutdown();
    let _ = std::fs::remove_dir_all(&out);
}
