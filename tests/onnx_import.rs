//! `beast import-onnx` against ONNX Runtime: each committed graph in
//! tests/fixtures/onnx/ (built with the `onnx` package, exported by
//! skl2onnx and by PyTorch; regenerate with `python3 tools/onnx_fixtures.py`,
//! which records the library versions in each NAME.json) is imported with the
//! CLI, served by a real server and asked for the fixture's rows over the
//! socket; the answers must match onnxruntime's within FP16 tolerance.
//! The refuse_*.onnx graphs must be refused with a message naming the cause.

mod common;

use beast::client::Client;
use beast::model::load::load_repository;
use beast::model::BatchLimits;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx")
}

fn import(onnx: &Path, out: &Path, name: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_beast"))
        .arg("import-onnx")
        .arg(onnx)
        .arg("--out")
        .arg(out)
        .arg("--name")
        .arg(name)
        .output()
        .unwrap()
}

struct Fixture {
    name: String,
    rows: Vec<Vec<f32>>,
    outputs: Vec<Vec<f64>>,
}

fn read_fixture(json: &Path) -> Fixture {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
    // Rows may be [N, F] or [N, d1, d2, ...] (a graph that flattens): flatten each row.
    fn flat(v: &serde_json::Value, out: &mut Vec<f64>) {
        match v {
            serde_json::Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
            x => out.push(x.as_f64().unwrap()),
        }
    }
    let rows_of = |key: &str| -> Vec<Vec<f64>> {
        v[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let mut o = Vec::new();
                flat(r, &mut o);
                o
            })
            .collect()
    };
    Fixture {
        name: json.file_stem().unwrap().to_str().unwrap().to_string(),
        rows: rows_of("rows")
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as f32).collect())
            .collect(),
        outputs: rows_of("outputs"),
    }
}

#[test]
fn imported_graphs_answer_like_onnxruntime() {
    let dir = temp_dir("onnx-import");
    let mut all: Vec<Fixture> = std::fs::read_dir(fixtures())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "json") && p.file_stem().unwrap() != "refusals"
        })
        .map(|p| read_fixture(&p))
        .collect();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    // The five families the fixture script writes (PyTorch's only where torch installed).
    for want in [
        "handmade_mlp",
        "handmade_gelu_flatten",
        "sklearn_wine_scaled",
        "sklearn_breast_cancer_binary",
        "sklearn_regressor",
    ] {
        assert!(all.iter().any(|f| f.name == want), "fixture {want} missing");
    }
    for f in &all {
        let out = import(&fixtures().join(format!("{}.onnx", f.name)), &dir, &f.name);
        assert!(
            out.status.success(),
            "{}: import failed: {}",
            f.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(&format!("imported {}", dir.join(&f.name).display())),
            "{stdout}"
        );
    }
    let repo = load_repository(&dir, &BatchLimits::default()).unwrap();
    assert!(repo.errors.is_empty(), "{:?}", repo.errors);
    let server = start_with(test_config(), repo);
    let client = Client::connect(server.addr).unwrap();
    for f in &all {
        let width = f.rows[0].len();
        let x: Vec<f32> = f.rows.concat();
        let p = client
            .predict(&spec(&f.name, f.rows.len(), width, &x))
            .unwrap_or_else(|e| panic!("{}: {e}", f.name));
        let cols = f.outputs[0].len();
        assert_eq!(p.cols as usize, cols, "{}: output width", f.name);
        let mut worst = 0f64;
        for (r, want) in f.outputs.iter().enumerate() {
            for (c, &w) in want.iter().enumerate() {
                let got = p.outputs[r * cols + c] as f64;
                // FP16 weights: about 3 decimal digits, relative to the value's scale.
                let tol = 4e-3 * w.abs().max(1.0);
                let d = (got - w).abs();
                worst = worst.max(d / w.abs().max(1.0));
                assert!(
                    d <= tol,
                    "{} row {r} col {c}: beast {got} vs onnxruntime {w} (tol {tol:.1e})",
                    f.name
                );
            }
        }
        eprintln!(
            "{}: {} rows, max relative difference to onnxruntime {worst:.2e}",
            f.name,
            f.rows.len()
        );
    }
    server.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unsupported_graphs_are_refused_naming_the_cause() {
    let dir = temp_dir("onnx-refuse");
    let refusals: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&std::fs::read(fixtures().join("refusals.json")).unwrap()).unwrap();
    assert!(refusals.len() >= 5);
    for (name, want) in &refusals {
        let onnx = fixtures().join(format!("refuse_{name}.onnx"));
        let out = import(&onnx, &dir, name);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{name}: imported, expected a refusal"
        );
        let want = want.as_str().unwrap();
        assert!(
            stderr.contains(want) && stderr.contains(&onnx.display().to_string()),
            "{name}: stderr {stderr:?} does not name the file and say {want:?}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        // Nothing is left behind: no model folder, no staging folder.
        assert!(
            !dir.join(name).exists(),
            "{name}: a refused import wrote a folder"
        );
    }
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "staging left behind"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_import_adds_a_version_and_a_different_network_is_refused() {
    let dir = temp_dir("onnx-versions");
    let mlp = fixtures().join("handmade_mlp.onnx");
    assert!(import(&mlp, &dir, "m").status.success());
    assert!(import(&mlp, &dir, "m").status.success());
    assert!(dir.join("m/1/weights.safetensors").is_file());
    assert!(dir.join("m/2/weights.safetensors").is_file());
    let other = import(&fixtures().join("sklearn_regressor.onnx"), &dir, "m");
    assert!(!other.status.success());
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(stderr.contains("describes another network"), "{stderr}");
    assert!(!dir.join("m/3").exists());
    // Not a file ONNX reads: a clear decode error, not a panic.
    let junk = dir.join("junk.onnx");
    std::fs::write(&junk, b"\x0a\xff\xff\xff\xff\x0f not protobuf").unwrap();
    let out = import(&junk, &dir, "j");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("junk.onnx: model"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
