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

/// Older XGBoost writers: `default_left` as booleans, `base_score` as a
/// plain string, no `split_type` / `categories*`: same predictions.
#[test]
fn xgboost_older_json_spellings_are_read_alike() {
    let mut v: serde_json::Value = serde_json::from_str(&fixture_text("xgb_binary.json")).unwrap();
    let bs = v
        .pointer("/learner/learner_model_param/base_score")
        .unwrap()
        .as_str()
        .unwrap()
        .trim_matches(|c| c == '[' || c == ']')
        .to_string();
    *v.pointer_mut("/learner/learner_model_param/base_score")
        .unwrap() = bs.into();
    for t in v
        .pointer_mut("/learner/gradient_booster/model/trees")
        .unwrap()
        .as_array_mut()
        .unwrap()
    {
        let t = t.as_object_mut().unwrap();
        let dl: Vec<serde_json::Value> = t["default_left"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| (x.as_i64() == Some(1)).into())
            .collect();
        t.insert("default_left".into(), dl.into());
        for k in [
            "split_type",
            "categories",
            "categories_nodes",
            "categories_segments",
            "categories_sizes",
        ] {
            t.remove(k);
        }
    }
    let old = TreeFormat::XgboostJson
        .parse(&serde_json::to_vec(&v).unwrap())
        .unwrap();
    assert_eq!(old, parse("xgb_binary.json"));
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

// ---- refusals: each unsupported feature, named with the file ----

/// A repository with one tree model `m` whose version 1 file is `bytes`;
/// the loader's errors.
fn load_one(
    dir_name: &str,
    format: TreeFormat,
    width: usize,
    bytes: &[u8],
) -> (PathBuf, Vec<String>, bool) {
    let dir = common::temp_dir(dir_name);
    let m = dir.join("m");
    std::fs::create_dir_all(m.join("1")).unwrap();
    std::fs::write(
        m.join("model.toml"),
        format!(
            "kind = \"trees\"\nformat = \"{}\"\ninput_width = {width}\n",
            format.name()
        ),
    )
    .unwrap();
    std::fs::write(m.join("1").join(format.file_name()), bytes).unwrap();
    let repo = beast::model::load::load_repository(&dir, &Default::default()).unwrap();
    let file = m.join("1").join(format.file_name()).display().to_string();
    (
        PathBuf::from(file),
        repo.errors.clone(),
        repo.models.contains_key("m"),
    )
}

fn assert_refused(case: &str, format: TreeFormat, width: usize, bytes: &[u8], words: &[&str]) {
    let (file, errors, loaded) = load_one(case, format, width, bytes);
    assert!(!loaded, "{case}: the model loaded");
    assert_eq!(errors.len(), 1, "{case}: {errors:?}");
    let e = &errors[0];
    assert!(
        e.starts_with(&file.display().to_string()),
        "{case}: the error does not start with the file: {e}"
    );
    for w in words {
        assert!(e.contains(w), "{case}: the error does not say {w:?}: {e}");
    }
}

fn fixture_text(file: &str) -> String {
    std::fs::read_to_string(fixtures().join(file)).unwrap()
}

#[test]
fn lightgbm_unsupported_features_are_refused_by_name() {
    let lgb = TreeFormat::LightgbmText;
    let base = fixture_text("lgb_binary.txt");
    // The unedited file loads (the edits below are what is refused).
    let (_, errors, loaded) = load_one("lgb-ok", lgb, 30, base.as_bytes());
    assert!(loaded && errors.is_empty(), "{errors:?}");
    let first_dt = base
        .lines()
        .find(|l| l.starts_with("decision_type="))
        .unwrap();
    let cat_dt = first_dt.replacen("decision_type=10", "decision_type=11", 1);
    assert_ne!(first_dt, cat_dt);
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "lgb-categorical",
            base.replacen(first_dt, &cat_dt, 1),
            vec![
                "Tree=0",
                "decision_type[0]",
                "categorical splits are not supported",
            ],
        ),
        (
            "lgb-num-cat",
            base.replacen("num_cat=0", "num_cat=1", 1),
            vec!["Tree=0", "num_cat", "categorical"],
        ),
        (
            "lgb-linear",
            base.replacen("is_linear=0", "is_linear=1", 1),
            vec!["Tree=0", "linear trees are not supported"],
        ),
        (
            "lgb-dart",
            base.replace("[boosting: gbdt]", "[boosting: dart]"),
            vec!["boosting", "dart", "not supported"],
        ),
        (
            "lgb-rank",
            base.replace("objective=binary sigmoid:1", "objective=lambdarank"),
            vec!["objective", "lambdarank", "ranking"],
        ),
        (
            "lgb-ova",
            base.replace(
                "objective=binary sigmoid:1",
                "objective=multiclassova num_class:1",
            ),
            vec!["multiclassova", "not supported"],
        ),
        (
            "lgb-poisson",
            base.replace("objective=binary sigmoid:1", "objective=poisson"),
            vec!["\"poisson\" is not supported"],
        ),
        (
            "lgb-rf",
            base.replacen("feature_names=", "average_output\nfeature_names=", 1),
            vec!["average_output", "random-forest"],
        ),
        (
            "lgb-sigmoid",
            base.replace("sigmoid:1", "sigmoid:2"),
            vec!["sigmoid:2"],
        ),
        (
            "lgb-cut",
            base[..base.len() / 2].to_string(),
            vec!["end of trees"],
        ),
    ];
    for (case, text, words) in cases {
        assert_refused(case, lgb, 30, text.as_bytes(), &words);
    }
}

#[test]
fn xgboost_unsupported_features_are_refused_by_name() {
    let xgb = TreeFormat::XgboostJson;
    let base: serde_json::Value = serde_json::from_str(&fixture_text("xgb_binary.json")).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = base.clone();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    };
    let (_, errors, loaded) = load_one("xgb-ok", xgb, 30, &edit(&|_| {}));
    assert!(loaded && errors.is_empty(), "{errors:?}");
    let tree0 = "/learner/gradient_booster/model/trees/0";
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        (
            "xgb-split-type",
            edit(&|v| {
                v.pointer_mut(&format!("{tree0}/split_type/0"))
                    .map(|x| *x = 1.into())
                    .unwrap()
            }),
            vec![
                "trees[0]",
                "split_type[0]",
                "categorical splits are not supported",
            ],
        ),
        (
            "xgb-cat-nodes",
            edit(&|v| {
                *v.pointer_mut(&format!("{tree0}/categories_nodes")).unwrap() =
                    serde_json::json!([0])
            }),
            vec!["trees[0]", "categories_nodes", "categorical"],
        ),
        (
            "xgb-dart",
            edit(&|v| *v.pointer_mut("/learner/gradient_booster/name").unwrap() = "dart".into()),
            vec!["gradient_booster.name", "dart", "not supported"],
        ),
        (
            "xgb-gblinear",
            edit(&|v| {
                *v.pointer_mut("/learner/gradient_booster/name").unwrap() = "gblinear".into()
            }),
            vec!["gblinear", "not supported"],
        ),
        (
            "xgb-rank",
            edit(&|v| *v.pointer_mut("/learner/objective/name").unwrap() = "rank:pairwise".into()),
            vec!["objective", "rank:pairwise", "ranking"],
        ),
        (
            "xgb-poisson",
            edit(&|v| *v.pointer_mut("/learner/objective/name").unwrap() = "count:poisson".into()),
            vec!["count:poisson", "not supported"],
        ),
        (
            "xgb-vector-leaf",
            edit(&|v| {
                *v.pointer_mut(&format!("{tree0}/tree_param/size_leaf_vector"))
                    .unwrap() = "2".into()
            }),
            vec!["size_leaf_vector", "vector leaves"],
        ),
        (
            "xgb-feature",
            edit(&|v| *v.pointer_mut(&format!("{tree0}/split_indices/0")).unwrap() = 99.into()),
            vec!["split_indices[0]", "feature 99"],
        ),
    ];
    for (case, bytes, words) in cases {
        assert_refused(case, xgb, 30, &bytes, &words);
    }
    assert_refused(
        "xgb-ubj",
        xgb,
        30,
        b"{L\x00\x00",
        &["not an XGBoost JSON model"],
    );
}

#[test]
fn model_toml_must_agree_with_the_model_file() {
    let bytes = std::fs::read(fixtures().join("xgb_binary.json")).unwrap();
    let (_, errors, loaded) = load_one("xgb-width", TreeFormat::XgboostJson, 29, &bytes);
    assert!(!loaded);
    assert!(
        errors[0].contains("input_width: model.toml says 29 but the model file has 30 features"),
        "{errors:?}"
    );
    // task and classes: through the import of a repository folder.
    let dir = common::temp_dir("trees-task");
    let m = dir.join("m");
    std::fs::create_dir_all(m.join("1")).unwrap();
    std::fs::write(m.join("1/model.json"), &bytes).unwrap();
    for (toml, want) in [
        ("task = \"regression\"", "task: model.toml says \"regression\" but the model file's objective \"binary:logistic\" is classification"),
        ("classes = [\"a\", \"b\", \"c\"]", "classes: 3 names but the model has 2 classes"),
        ("format = \"onnx\"", "format: \"onnx\" unknown"),
        ("kind = \"forest\"", "kind: \"forest\" is not a model kind"),
    ] {
        let base = "kind = \"trees\"\nformat = \"xgboost-json\"\ninput_width = 30\n";
        let text = if toml.starts_with("format") || toml.starts_with("kind") {
            let key = toml.split(' ').next().unwrap();
            base.lines().map(|l| if l.starts_with(key) { toml.to_string() } else { l.to_string() }).collect::<Vec<_>>().join("\n")
        } else {
            format!("{base}{toml}\n")
        };
        std::fs::write(m.join("model.toml"), text).unwrap();
        let repo = beast::model::load::load_repository(&dir, &Default::default()).unwrap();
        assert!(!repo.models.contains_key("m"), "{toml}: loaded");
        assert!(repo.errors.len() == 1 && repo.errors[0].contains(want), "{toml}: {:?}", repo.errors);
        assert!(repo.errors[0].contains(&m.display().to_string()), "{:?}", repo.errors);
    }
}

// ---- import-trees ----

#[test]
fn import_trees_writes_a_folder_the_server_loads() {
    let dir = common::temp_dir("trees-import");
    let beast = env!("CARGO_BIN_EXE_beast");
    let run = |args: &[&str]| {
        let o = std::process::Command::new(beast)
            .args(args)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let xgb = fixtures().join("xgb_multi.json");
    let lgb = fixtures().join("lgb_reg.txt");
    let out1 = dir.join("wine/1");
    let (ok, err) = run(&[
        "import-trees",
        xgb.to_str().unwrap(),
        "--out",
        out1.to_str().unwrap(),
        "--classes",
        "c0,c1,c2",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("multi:softprob") && err.contains("3 outputs"),
        "{err}"
    );
    let (ok, err) = run(&[
        "import-trees",
        lgb.to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
        "--name",
        "diabetes",
        "--version",
        "3",
    ]);
    assert!(ok, "{err}");
    // Never overwrites a version; a wrong class count is refused.
    let (ok, err) = run(&[
        "import-trees",
        xgb.to_str().unwrap(),
        "--out",
        out1.to_str().unwrap(),
        "--classes",
        "c0,c1,c2",
    ]);
    assert!(!ok && err.contains("exists"), "{err}");
    let (ok, err) = run(&[
        "import-trees",
        xgb.to_str().unwrap(),
        "--out",
        dir.join("x/1").to_str().unwrap(),
        "--classes",
        "a,b",
    ]);
    assert!(
        !ok && err.contains("2 names but the model has 3 classes"),
        "{err}"
    );
    // An unsupported model is refused naming the file.
    let mut dart: serde_json::Value =
        serde_json::from_str(&fixture_text("xgb_binary.json")).unwrap();
    *dart.pointer_mut("/learner/gradient_booster/name").unwrap() = "dart".into();
    let dart_file = dir.join("dart.json");
    std::fs::write(&dart_file, serde_json::to_vec(&dart).unwrap()).unwrap();
    let (ok, err) = run(&[
        "import-trees",
        dart_file.to_str().unwrap(),
        "--out",
        dir.join("d/1").to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("dart.json") && err.contains("\"dart\" is not supported"),
        "{err}"
    );
    assert!(!dir.join("d/1").exists());

    let toml = std::fs::read_to_string(dir.join("wine/model.toml")).unwrap();
    assert!(
        toml.contains("kind = \"trees\"")
            && toml.contains("format = \"xgboost-json\"")
            && toml.contains("task = \"classification\"")
            && toml.contains("classes = [\"c0\", \"c1\", \"c2\"]"),
        "{toml}"
    );
    let toml = std::fs::read_to_string(dir.join("diabetes/model.toml")).unwrap();
    assert!(
        toml.contains("format = \"lightgbm-text\"") && toml.contains("task = \"regression\""),
        "{toml}"
    );
    let repo = beast::model::load::load_repository(&dir, &Default::default()).unwrap();
    assert!(repo.errors.is_empty(), "{:?}", repo.errors);
    let wine = repo.model("wine", None).unwrap();
    assert_eq!((wine.input_width, wine.output_width), (13, 3));
    assert!(wine.forest.is_some() && wine.layers.is_empty());
    assert!(
        wine.node_visits_per_row() > 40.0,
        "{}",
        wine.node_visits_per_row()
    );
    assert!(wine.flops_per_row() > 0);
    let diabetes = repo.model("diabetes", Some(3)).unwrap();
    assert_eq!((diabetes.input_width, diabetes.output_width), (10, 1));
    // The digest covers model.toml and the model file.
    let d1 = wine.digest;
    std::fs::write(
        dir.join("wine/1/model.json"),
        fixture_text("xgb_multi.json").replacen("\"num_trees\"", " \"num_trees\"", 1),
    )
    .unwrap();
    let again = beast::model::load::load_repository(&dir, &Default::default()).unwrap();
    assert_ne!(
        again.model("wine", None).unwrap().digest,
        d1,
        "the digest must change with the model file"
    );
}

// ---- a tree + MLP ensemble served end to end ----

/// Held-out rows of the cancer repository: (features, labels, width).
fn cancer_holdout() -> (Vec<f32>, Vec<u32>, usize) {
    let text = std::fs::read_to_string(fixtures().join("cancer/cancer_holdout.csv")).unwrap();
    let mut lines = text.lines();
    let width = lines.next().unwrap().split(',').count() - 1;
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for l in lines.filter(|l| !l.is_empty()) {
        let v: Vec<&str> = l.split(',').collect();
        x.extend(v[..width].iter().map(|c| c.parse::<f32>().unwrap()));
        y.push(v[width].parse().unwrap());
    }
    (x, y, width)
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// tests/fixtures/trees/cancer: an XGBoost model first, an MLP second,
/// policy cascade. Served on a real socket, row by row, the cascade is as
/// accurate as running both and computes a fraction of the FLOPs; a
/// multi-row request to the tree model alone goes through the batcher and
/// equals the CPU evaluator.
#[test]
fn tree_first_cascade_saves_compute_at_no_accuracy_loss() {
    use beast::client::Client;
    use beast::wire::{CacheControl, Input, PolicyOverride, RequestSpec};
    let dir = fixtures().join("cancer");
    let mut repo = beast::model::load::load_repository(&dir, &Default::default()).unwrap();
    // As `beast serve` does: the threshold from the calibration rows.
    beast::ensemble::calibrate::calibrate_cascades(&mut repo, &dir);
    assert!(repo.errors.is_empty(), "{:?}", repo.errors);
    let threshold = repo.ensembles["cancer"].selection.cascade_threshold;
    let gbt = repo.model("cancer_gbt", None).unwrap().clone();
    let mlp = repo.model("cancer_mlp", None).unwrap().clone();
    assert!(gbt.forest.is_some() && mlp.forest.is_none());
    assert!(
        gbt.flops_per_row() * 4 < mlp.flops_per_row(),
        "the tree model should be the cheap member: {} vs {}",
        gbt.flops_per_row(),
        mlp.flops_per_row()
    );
    let server = common::start_with(common::test_config(), repo);
    let client = Client::connect(server.addr).unwrap();
    let (x, y, w) = cancer_holdout();
    let n = y.len();
    let ask = |target: &str, rows: usize, data: &[f32], policy| {
        client
            .predict(&RequestSpec {
                target,
                version: None,
                rows: rows as u32,
                cols: w as u32,
                input: Input::F32(data),
                deadline_us: None,
                domain: None,
                cache: CacheControl::Bypass,
                policy,
            })
            .unwrap()
    };
    let mut correct = [0usize; 2];
    let mut flops = [0u64; 2];
    let mut tree_only = 0;
    for r in 0..n {
        let row = &x[r * w..(r + 1) * w];
        for (k, policy) in [PolicyOverride::All, PolicyOverride::Cascade]
            .into_iter()
            .enumerate()
        {
            let p = ask("cancer", 1, row, policy);
            assert_eq!((p.rows, p.cols), (1, 2));
            correct[k] += (argmax(&p.outputs) == y[r]) as usize;
            flops[k] += p.runs.iter().map(|r| r.2).sum::<u64>();
            if k == 1 && p.runs.len() == 1 {
                assert_eq!(
                    p.runs[0].0, "cancer_gbt",
                    "the cascade starts with the tree model"
                );
                tree_only += 1;
            }
        }
    }
    let acc = |c: usize| c as f64 / n as f64;
    eprintln!(
        "cancer holdout {n} rows: all acc {:.4} flops {}, cascade (threshold {threshold}) acc {:.4} flops {} ({tree_only} rows answered by the trees alone)",
        acc(correct[0]), flops[0], acc(correct[1]), flops[1]
    );
    assert!(
        correct[1] >= correct[0],
        "the cascade lost accuracy: {} vs {}",
        correct[1],
        correct[0]
    );
    assert!(acc(correct[1]) > 0.95, "accuracy {}", acc(correct[1]));
    assert!(
        flops[1] * 2 < flops[0],
        "the cascade should compute less than half: {} vs {}",
        flops[1],
        flops[0]
    );

    // The tree model alone, all rows in one request (through the batcher).
    let p = ask("cancer_gbt", n, &x, PolicyOverride::Default);
    let want = common::direct(&gbt, &x, n);
    common::assert_close(&p.outputs, &want, 0.0);
    let acc_tree = (0..n)
        .filter(|&r| argmax(&p.outputs[r * 2..r * 2 + 2]) == y[r])
        .count();
    assert!(acc(acc_tree) > 0.9);
    drop(client);
    server.shutdown();
}

/// The CUDA backend does not put trees on the GPU: it runs them with the
/// CPU evaluator, same answers, and keeps serving MLPs. Needs a GPU:
/// `cargo test --release --features cuda --test trees -- --ignored`.
#[cfg(feature = "cuda")]
#[test]
#[ignore]
fn cuda_backend_runs_tree_models_on_the_cpu() {
    let mut cuda = beast::backend::cuda::CudaBackend::new(0)
        .expect("a CUDA device (this test is run on a GPU machine)");
    for file in ["xgb_multi.json", "lgb_binary.txt"] {
        let forest = parse(file);
        let model = Model::from_forest(file, 1, forest, Default::default(), 0);
        let rows = 64;
        let x: Vec<f32> = common::rows(5, rows, model.input_width);
        let want = common::direct(&model, &x, rows);
        let mut got = vec![0.0; rows * model.output_width];
        cuda.run(&model, &x, rows, &mut got).unwrap();
        assert_eq!(got, want, "{file}");
    }
    let mlp = common::model("a");
    let x = common::rows(6, 8, mlp.input_width);
    let mut out = vec![0.0; 8 * mlp.output_width];
    cuda.run(&mlp, &x, 8, &mut out).unwrap();
}

/// Over the wire, NaN is a missing value for a tree model and for an
/// ensemble of tree models (answers equal the libraries'), and still a bad
/// request wherever an MLP would see it; infinities stay refused.
#[test]
fn nan_inputs_reach_tree_models_over_the_wire() {
    use beast::client::{Client, ClientError};
    use beast::model::trees::import::{import, ImportArgs};
    use beast::wire::{CacheControl, Input, PolicyOverride, RequestSpec};
    let dir = common::temp_dir("trees-nan");
    for (file, name) in [
        ("xgb_binary.json", "xgb"),
        ("lgb_binary.txt", "lgb"),
        ("lgb_reg.txt", "reg"),
    ] {
        let args = ImportArgs {
            model: fixtures().join(file),
            out: dir.clone(),
            name: Some(name.into()),
            ..Default::default()
        };
        import(&args, &Default::default()).unwrap();
    }
    let mlp = dir.join("cancer_mlp/1");
    std::fs::create_dir_all(&mlp).unwrap();
    let src = fixtures().join("cancer/cancer_mlp");
    std::fs::copy(src.join("model.toml"), dir.join("cancer_mlp/model.toml")).unwrap();
    std::fs::copy(
        src.join("1/weights.safetensors"),
        mlp.join("weights.safetensors"),
    )
    .unwrap();
    std::fs::write(
        dir.join("ensembles.toml"),
        "[ensembles.gbts]\nmembers = [\"xgb\", \"lgb\"]\n[ensembles.mixed]\nmembers = [\"xgb\", \"cancer_mlp\"]\n",
    )
    .unwrap();
    let repo = beast::model::load::load_repository(&dir, &Default::default()).unwrap();
    assert!(repo.errors.is_empty(), "{:?}", repo.errors);
    let server = common::start_with(common::test_config(), repo);
    let client = Client::connect(server.addr).unwrap();
    let ask = |target: &str, rows: usize, cols: usize, data: &[f32]| {
        client.predict(&RequestSpec {
            target,
            version: None,
            rows: rows as u32,
            cols: cols as u32,
            input: Input::F32(data),
            deadline_us: None,
            domain: None,
            cache: CacheControl::Use,
            policy: PolicyOverride::Default,
        })
    };
    let (x, n) = read_rows(&fixtures().join("rows_cancer.csv"));
    assert!(x.iter().any(|v| v.is_nan()));
    for (target, expect) in [("xgb", "xgb_binary"), ("lgb", "lgb_binary")] {
        let p = ask(target, n, 30, &x).unwrap_or_else(|e| panic!("{target}: {e:?}"));
        let (_, eo) = read_expect(&fixtures().join(format!("{expect}.expect.csv")));
        for (r, (got, want)) in p.outputs.chunks(2).zip(&eo).enumerate() {
            for (g, w) in got.iter().zip(want) {
                assert!(close(*g, *w), "{target} row {r}: {g} vs {w}");
            }
        }
    }
    let (xd, nd) = read_rows(&fixtures().join("rows_diabetes.csv"));
    let p = ask("reg", nd, 10, &xd).unwrap();
    let (_, eo) = read_expect(&fixtures().join("lgb_reg.expect.csv"));
    assert_eq!(p.cols, 1);
    assert_eq!(p.outputs.len(), nd);
    for (r, (got, want)) in p.outputs.iter().zip(&eo).enumerate() {
        assert!(close(*got, want[0]), "reg row {r}: {got} vs {}", want[0]);
    }
    let gbts = ask("gbts", n, 30, &x).unwrap();
    assert_eq!(gbts.runs.len(), 2);
    let nan_row = (0..n)
        .find(|&r| x[r * 30..(r + 1) * 30].iter().any(|v| v.is_nan()))
        .unwrap();
    let row = &x[nan_row * 30..(nan_row + 1) * 30];
    match ask("mixed", 1, 30, row) {
        Err(ClientError::BadRequest(m)) => assert!(m.contains("not finite"), "{m}"),
        other => panic!("a NaN row for an ensemble with an MLP member: {other:?}"),
    }
    let finite: Vec<f32> = row
        .iter()
        .map(|v| if v.is_nan() { 0.0 } else { *v })
        .collect();
    ask("mixed", 1, 30, &finite).unwrap();
    let mut inf = finite.clone();
    inf[3] = f32::INFINITY;
    match ask("xgb", 1, 30, &inf) {
        Err(ClientError::BadRequest(m)) => assert!(m.contains("row 0, column 3"), "{m}"),
        other => panic!("an infinite input: {other:?}"),
    }
    drop(client);
    server.shutdown();
}
