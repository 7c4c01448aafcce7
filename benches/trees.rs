//! Tree-model evaluation, one thread, batch 1 / 32 / 128: beast's lockstep
//! evaluator (what the CPU backend runs) and the obvious early-exit walk
//! (`run_simple`), per model.
//!
//! `cargo bench --bench trees`: the committed fixtures
//! (tests/fixtures/trees). `BEAST_TREES_BENCH_DIR=DIR` instead runs every
//! `DIR/*.json` / `DIR/*.txt` model on the rows of `DIR/rows.csv`
//! (perf/trees.sh writes them; it also times xgboost, lightgbm and the
//! compiled-tree anchors on the same files). Prints one line per
//! (model, evaluator, batch): ns per row, median of 7 runs of ≥ 50 ms.

use beast::backend::cpu::trees::{run, run_simple, TreeScratch};
use beast::model::trees::{Forest, TreeFormat};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const BATCHES: [usize; 3] = [1, 32, 128];

fn rows_of(path: &Path, width: usize) -> Vec<f32> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    for l in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('f'))
    {
        let v: Vec<f32> = l.split(',').map(|c| c.parse().unwrap()).collect();
        out.extend_from_slice(&v[..width]);
    }
    out
}

type Eval = fn(
    &Forest,
    &[f32],
    usize,
    &mut [f32],
    &mut TreeScratch,
) -> Result<(), beast::backend::BackendError>;

/// Median ns per row of `eval` over batches of `rows` taken in turn from `x`.
fn time(forest: &Forest, x: &[f32], rows: usize, eval: Eval, quick: bool) -> f64 {
    let nf = forest.num_features;
    let n_rows = x.len() / nf;
    let mut out = vec![0.0f32; rows * forest.output_width()];
    let mut scratch = TreeScratch::default();
    let starts: Vec<usize> = (0..n_rows.saturating_sub(rows) + 1)
        .step_by(rows.max(1))
        .collect();
    let min = if quick {
        Duration::from_millis(2)
    } else {
        Duration::from_millis(50)
    };
    let mut samples = Vec::new();
    for _ in 0..if quick { 1 } else { 7 } {
        let (mut done, t0) = (0usize, Instant::now());
        while t0.elapsed() < min {
            for &s in &starts {
                let xin = &x[s * nf..(s + rows) * nf];
                eval(forest, black_box(xin), rows, &mut out, &mut scratch).unwrap();
                black_box(&out);
                done += rows;
            }
        }
        samples.push(t0.elapsed().as_nanos() as f64 / done as f64);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

/// ns per row of a model through the CPU backend (what the server runs).
fn time_model(m: &beast::model::Model, x: &[f32], rows: usize, quick: bool) -> f64 {
    use beast::backend::Backend;
    let mut cpu = beast::backend::cpu::CpuBackend::new();
    let nf = m.input_width;
    let n_rows = x.len() / nf;
    let mut out = vec![0.0f32; rows * m.output_width];
    let starts: Vec<usize> = (0..n_rows.saturating_sub(rows) + 1)
        .step_by(rows.max(1))
        .collect();
    let min = if quick {
        Duration::from_millis(2)
    } else {
        Duration::from_millis(50)
    };
    let mut samples = Vec::new();
    for _ in 0..if quick { 1 } else { 7 } {
        let (mut done, t0) = (0usize, Instant::now());
        while t0.elapsed() < min {
            for &s in &starts {
                cpu.run(m, black_box(&x[s * nf..(s + rows) * nf]), rows, &mut out)
                    .unwrap();
                black_box(&out);
                done += rows;
            }
        }
        samples.push(t0.elapsed().as_nanos() as f64 / done as f64);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

/// The cost model's exchange rate: how many FLOPs of the MLP kernel take as
/// long as one node visit of the tree evaluator, on the cancer pair.
fn node_visit_rate(quick: bool) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trees/cancer");
    let repo = beast::model::load::load_repository(&dir, &Default::default()).unwrap();
    let gbt = repo.model("cancer_gbt", None).unwrap();
    let mlp = repo.model("cancer_mlp", None).unwrap();
    let x = rows_of(&dir.join("cancer_holdout.csv"), 30);
    let visits = gbt.node_visits_per_row() + gbt.forest.as_ref().unwrap().num_trees() as f64;
    println!("\ncancer_gbt ({visits:.0} node visits incl. leaves/row) vs cancer_mlp ({} FLOP/row), CPU backend:", mlp.flops_per_row());
    println!(
        "{:>6} {:>12} {:>12} {:>14}",
        "batch", "gbt ns/row", "mlp ns/row", "FLOP/visit"
    );
    for rows in BATCHES {
        let g = time_model(gbt, &x, rows, quick);
        let m = time_model(mlp, &x, rows, quick);
        let rate = (g / visits) / (m / mlp.flops_per_row() as f64);
        println!("{rows:>6} {g:>12.1} {m:>12.1} {rate:>14.1}");
    }
}

fn main() {
    // `cargo test` runs benches once in test mode: keep it quick.
    let quick = std::env::args().any(|a| a == "--test") || std::env::args().all(|a| a != "--bench");
    let (dir, models): (PathBuf, Vec<(String, String)>) =
        match std::env::var_os("BEAST_TREES_BENCH_DIR") {
            Some(d) => {
                let d = PathBuf::from(d);
                let mut m: Vec<(String, String)> = std::fs::read_dir(&d)
                    .unwrap()
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .filter(|f| f.ends_with(".json") || f.ends_with(".txt"))
                    .map(|f| (f, "rows.csv".to_string()))
                    .collect();
                m.sort();
                (d, m)
            }
            None => (
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trees"),
                [
                    ("xgb_binary.json", "rows_cancer.csv"),
                    ("lgb_binary.txt", "rows_cancer.csv"),
                    ("xgb_multi.json", "rows_wine.csv"),
                ]
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            ),
        };
    println!(
        "{:<28} {:>7} {:>6} {:>10} {:>10}",
        "model", "trees", "batch", "lockstep", "simple"
    );
    for (file, rows_file) in models {
        let fmt = if file.ends_with(".json") {
            TreeFormat::XgboostJson
        } else {
            TreeFormat::LightgbmText
        };
        let forest = fmt.parse(&std::fs::read(dir.join(&file)).unwrap()).unwrap();
        let x = rows_of(&dir.join(&rows_file), forest.num_features);
        for rows in BATCHES {
            if x.len() / forest.num_features < rows {
                continue;
            }
            let a = time(&forest, &x, rows, run, quick);
            let b = time(&forest, &x, rows, run_simple, quick);
            println!(
                "{file:<28} {:>7} {rows:>6} {a:>10.1} {b:>10.1}   ns/row",
                forest.num_trees()
            );
        }
    }
    node_visit_rate(quick);
}
