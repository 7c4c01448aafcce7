//! Replays the fuzz corpus on stable: every input kept under
//! `fuzz/corpus/<target>/` and every crash input under
//! `fuzz/artifacts/<target>/` goes through the same function the cargo-fuzz
//! target runs (fuzz/src/lib.rs), so a fixed crash cannot come back
//! unnoticed. See fuzz/README.md for how the corpus is grown and minimised.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod harness;

use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

fn replay(target: &str) {
    let (_, run) = harness::TARGETS
        .iter()
        .find(|(n, _)| *n == target)
        .expect("a target of the harness");
    let corpus = files(&fuzz_dir().join("corpus").join(target));
    let artifacts = files(&fuzz_dir().join("artifacts").join(target));
    // The corpus is committed: an empty one means it went missing.
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target} is empty or missing"
    );
    for seed in harness::seeds(target) {
        run(&seed);
    }
    for p in corpus.iter().chain(&artifacts) {
        let data = std::fs::read(p).unwrap();
        let r = std::panic::catch_unwind(|| run(&data));
        assert!(r.is_ok(), "{target}: {} panics", p.display());
    }
    eprintln!(
        "{target}: replayed {} corpus and {} crash inputs",
        corpus.len(),
        artifacts.len()
    );
}

#[test]
fn frame_corpus() {
    replay("frame");
}

#[test]
fn request_corpus() {
    replay("request");
}

#[test]
fn admin_head_corpus() {
    replay("admin_head");
}

#[test]
fn model_corpus() {
    replay("model");
}

#[test]
fn l2_open_corpus() {
    replay("l2_open");
}

#[test]
fn onnx_corpus() {
    replay("onnx");
}

/// Every harness target has a test above and a corpus folder.
#[test]
fn every_target_is_replayed() {
    let src = include_str!("fuzz_corpus.rs");
    for (t, _) in harness::TARGETS {
        assert!(
            src.contains(&format!("replay(\"{t}\")")),
            "{t} is not replayed"
        );
        assert!(
            fuzz_dir()
                .join("fuzz_targets")
                .join(format!("{t}.rs"))
                .is_file(),
            "fuzz/fuzz_targets/{t}.rs missing"
        );
    }
}

/// Writes each target's seed inputs into its corpus folder (run once when
/// a target is added; then `scripts/fuzz.sh` grows and minimises it).
#[test]
#[ignore = "writes fuzz/corpus: run by hand when seeds change"]
fn write_seeds() {
    for (t, _) in harness::TARGETS {
        let d = fuzz_dir().join("corpus").join(t);
        std::fs::create_dir_all(&d).unwrap();
        for (i, s) in harness::seeds(t).iter().enumerate() {
            std::fs::write(d.join(format!("seed-{i}")), s).unwrap();
        }
    }
}
