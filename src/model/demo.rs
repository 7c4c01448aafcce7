//! The standard benchmark models, built deterministically from a seed.

use super::manifest::{LayerSpec, ModelManifest, LAYER_NORM_EPS_DEFAULT};
use super::Model;
use half::f16;
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
/// The bytes are deterministic: same models, same files, every run.
pub fn write_demo_repository(out: &Path) -> std::io::Result<()> {
    let models = bench_models();
    for m in &models {
        write_model(out, m)?;
    }
    let names: Vec<String> = models.iter().map(|m| format!("\"{}\"", m.name)).collect();
    std::fs::write(
        out.join("ensembles.toml"),
        format!(
            "[ensembles.bench_ens]\nmembers = [{}]\ncombiner = \"mean\"\n",
            names.join(", ")
        ),
    )
}

/// Write one model as `<out>/<name>/model.toml` and
/// `<out>/<name>/<version>/weights.safetensors` (FP16 weights and biases;
/// layer-norm parameters when present).
pub fn write_model(out: &Path, m: &Model) -> std::io::Result<()> {
    let dir = out.join(&m.name);
    let vdir = dir.join(m.version.to_string());
    std::fs::create_dir_all(&vdir)?;
    let man = ModelManifest {
        versions: Default::default(),
        input_width: m.input_width,
        output: m.output,
        layer_norm_eps: m
            .layers
            .iter()
            .find_map(|l| l.layer_norm.as_ref().map(|n| n.eps))
            .unwrap_or(LAYER_NORM_EPS_DEFAULT),
        layers: m
            .layers
            .iter()
            .map(|l| LayerSpec {
                units: l.out_dim,
                activation: l.activation,
                layer_norm: l.layer_norm.is_some(),
            })
            .collect(),
        batch: m.batch,
        task: m.task,
        io: super::ModelIo {
            binary: false,
            ..m.io.clone()
        },
    };
    std::fs::write(dir.join("model.toml"), man.to_toml())?;
    let mut tensors: Vec<(String, TensorBytes)> = Vec::new();
    for (i, l) in m.layers.iter().enumerate() {
        tensors.push((
            format!("layers.{i}.weight"),
            TensorBytes::f16(vec![l.in_dim, l.out_dim], l.weight().iter().copied()),
        ));
        let f32s = |name: &str, v: &[f32]| {
            (
                format!("layers.{i}.{name}"),
                TensorBytes::f16(vec![v.len()], v.iter().map(|&x| f16::from_f32(x))),
            )
        };
        tensors.push(f32s("bias", &l.bias));
        if let Some(n) = &l.layer_norm {
            tensors.push(f32s("ln_gamma", &n.gamma));
            tensors.push(f32s("ln_beta", &n.beta));
        }
    }
    safetensors::serialize_to_file(tensors, None, &vdir.join(super::load::WEIGHTS_FILE))
        .map_err(std::io::Error::other)
}

/// An owned tensor in little-endian bytes, for the safetensors writer
/// (demo models here, `beast import-onnx`'s F32 weights).
pub(crate) struct TensorBytes {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl TensorBytes {
    pub(crate) fn f16(shape: Vec<usize>, values: impl Iterator<Item = f16>) -> TensorBytes {
        let bytes = values.flat_map(|x| x.to_le_bytes()).collect();
        TensorBytes {
            dtype: safetensors::Dtype::F16,
            shape,
            bytes,
        }
    }

    pub(crate) fn f32(shape: Vec<usize>, values: &[f32]) -> TensorBytes {
        let bytes = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        TensorBytes {
            dtype: safetensors::Dtype::F32,
            shape,
            bytes,
        }
    }
}

impl safetensors::View for TensorBytes {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}
