//! The standard benchmark models, built deterministically from a seed.
//! INTERFACE CONTRACT (model helper implements).

use super::Model;
use std::path::Path;

/// `bench_a` 256→512→512→16, `bench_b` 256→1024→16,
/// `bench_c` 256→256→256→256→16, relu + softmax; fixed seeds.
pub fn bench_models() -> Vec<Model> {
    use super::{Activation::Relu, OutputTransform::Softmax};
    vec![
        Model::random(
            "bench_a",
            &[256, 512, 512, 16],
            Relu,
            Softmax,
            BENCH_SEEDS[0],
        ),
        Model::random("bench_b", &[256, 1024, 16], Relu, Softmax, BENCH_SEEDS[1]),
        Model::random(
            "bench_c",
            &[256, 256, 256, 256, 16],
            Relu,
            Softmax,
            BENCH_SEEDS[2],
        ),
    ]
}

/// Seeds of bench_a, bench_b, bench_c: changing them changes every recorded benchmark input.
pub const BENCH_SEEDS: [u64; 3] = [0xA, 0xB, 0xC];

/// Write the bench models as a repository (`model.toml` + `1/weights.safetensors`
/// each, and `ensembles.toml` with `bench_ens` = the three, mean).
pub fn write_demo_repository(out: &Path) -> std::io::Result<()> {
    let _ = out;
    todo!("model helper")
}
