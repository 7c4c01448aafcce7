//! Tests of repository loading: the demo round trip, F32 conversion,
//! versions, and the committed `models/` digits ensemble; the refusals are
//! in `load_refusal_tests.rs`.

use super::*;
use crate::model::demo::{bench_models, write_demo_repository, write_model};
use crate::model::{Activation, Combiner, LayerNorm, OutputTransform, WeightsBuf};
use half::f16;
use safetensors::tensor::Dtype;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh, empty folder under the system temp dir, removed on drop.
struct TempRepo(PathBuf);

impl TempRepo {
    fn new(tag: &str) -> TempRepo {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "beast-model-test-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempRepo(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn write(&self, rel: &str, text: &str) {
        let p = self.0.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }
    fn load(&self) -> Repository {
        load_repository(&self.0, &BatchLimits::default()).unwrap()
    }
}

impl Drop for TempRepo {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A tensor with any dtype and raw bytes, to write files the loader must refuse.
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for Raw {
    fn dtype(&self) -> Dtype {
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

fn f32_raw(shape: &[usize], v: impl Iterator<Item = f32>) -> Raw {
    Raw {
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        bytes: v.flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn f16_raw(shape: &[usize], v: impl Iterator<Item = f32>) -> Raw {
    Raw {
        dtype: Dtype::F16,
        shape: shape.to_vec(),
        bytes: v.flat_map(|x| f16::from_f32(x).to_le_bytes()).collect(),
    }
}

fn write_st(repo: &TempRepo, rel: &str, tensors: Vec<(&str, Raw)>) {
    let p = repo.path().join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    safetensors::serialize_to_file(tensors, None, &p).unwrap();
}

const TINY_TOML: &str = r#"input_width = 4
output = "softmax"
layers = [
  { units = 3, activation = "relu" },
  { units = 2, activation = "identity" },
]
"#;

/// The tensors of TINY_TOML's model, F16, with a hook to change them.
fn tiny_tensors() -> Vec<(&'static str, Raw)> {
    vec![
        (
            "layers.0.weight",
            f16_raw(&[4, 3], (0..12).map(|i| i as f32 * 0.1)),
        ),
        ("layers.0.bias", f16_raw(&[3], [0.1, 0.2, 0.3].into_iter())),
        (
            "layers.1.weight",
            f16_raw(&[3, 2], (0..6).map(|i| i as f32 * -0.2)),
        ),
        ("layers.1.bias", f16_raw(&[2], [0.0, 1.0].into_iter())),
    ]
}

/// A repository with a good model `ok` (v1) and an ensemble over it, plus
/// whatever the test adds.
fn base_repo(tag: &str) -> TempRepo {
    let r = TempRepo::new(tag);
    r.write("ok/model.toml", TINY_TOML);
    write_st(&r, "ok/1/weights.safetensors", tiny_tensors());
    r
}

/// Loads `r`, asserts that `ok` still loaded and that exactly one error names
/// `file` and contains every `needle`; returns the error.
fn refused(r: &TempRepo, file: &str, needles: &[&str]) -> String {
    let repo = r.load();
    assert!(
        repo.model("ok", None).is_some(),
        "good model must still load: {:?}",
        repo.errors
    );
    assert_eq!(repo.errors.len(), 1, "{:?}", repo.errors);
    let e = repo.errors[0].clone();
    let want = r.path().join(file).display().to_string();
    assert!(e.starts_with(&want), "error should name {want}: {e}");
    for n in needles {
        assert!(e.contains(n), "error should contain {n:?}: {e}");
    }
    e
}

#[test]
fn demo_repository_round_trips_bit_exactly_without_copies() {
    let r = TempRepo::new("demo");
    write_demo_repository(r.path()).unwrap();
    let repo = r.load();
    assert!(repo.errors.is_empty(), "{:?}", repo.errors);
    let want = bench_models();
    assert_eq!(repo.models.len(), want.len());
    for w in &want {
        let got = repo.model(&w.name, None).unwrap();
        assert_eq!(got.version, 1);
        assert_eq!(
            (got.input_width, got.output_width),
            (w.input_width, w.output_width)
        );
        assert_eq!(got.output, OutputTransform::Softmax);
        assert_eq!(got.batch, w.batch);
        assert_eq!(got.layers.len(), w.layers.len());
        for (g, e) in got.layers.iter().zip(&w.layers) {
            assert!(g.weight.is_window(), "F16 weights must be used in place");
            assert_eq!(
                (g.in_dim, g.out_dim, g.activation),
                (e.in_dim, e.out_dim, e.activation)
            );
            let gb: Vec<u16> = g.weight().iter().map(|x| x.to_bits()).collect();
            let eb: Vec<u16> = e.weight().iter().map(|x| x.to_bits()).collect();
            assert!(gb == eb, "weights differ in {}", w.name);
            // biases travel as FP16: equal to the FP16 rounding of the originals
            let eb: Vec<f32> = e.bias.iter().map(|&b| f16::from_f32(b).to_f32()).collect();
            assert_eq!(g.bias, eb);
        }
    }
    let ens = &repo.ensembles["bench_ens"];
    assert_eq!(ens.members, ["bench_a", "bench_b", "bench_c"]);
    assert_eq!(ens.combiner, Combiner::Mean);

    // Deterministic bytes: a second write is identical.
    let r2 = TempRepo::new("demo2");
    write_demo_repository(r2.path()).unwrap();
    for rel in [
        "ensembles.toml",
        "bench_a/model.toml",
        "bench_c/1/weights.safetensors",
    ] {
        assert!(
            fs::read(r.path().join(rel)).unwrap() == fs::read(r2.path().join(rel)).unwrap(),
            "{rel}"
        );
    }
}

#[test]
fn layer_norm_round_trips() {
    let r = TempRepo::new("ln");
    let mut m = Model::random(
        "ln",
        &[8, 6, 3],
        Activation::Gelu,
        OutputTransform::Sigmoid,
        7,
    );
    m.layers[0].layer_norm = Some(LayerNorm {
        gamma: vec![1.0, 0.5, 2.0, 1.0, 1.0, 0.25],
        beta: vec![0.0, 0.5, -1.0, 0.0, 0.125, 0.0],
        eps: 1e-3,
    });
    write_model(r.path(), &m).unwrap();
    let repo = r.load();
    assert!(repo.errors.is_empty(), "{:?}", repo.errors);
    let got = repo.model("ln", Some(1)).unwrap();
    let ln = got.layers[0].layer_norm.as_ref().unwrap();
    assert_eq!(ln.gamma, m.layers[0].layer_norm.as_ref().unwrap().gamma);
    assert_eq!(ln.eps, 1e-3);
    assert!(got.layers[1].layer_norm.is_none());
    assert_eq!(got.output, OutputTransform::Sigmoid);
}

#[test]
fn f32_weights_are_converted_to_owned_f16() {
    let r = base_repo("f32");
    r.write("f/model.toml", TINY_TOML);
    let w0: Vec<f32> = (0..12).map(|i| i as f32 * 0.123_456_7).collect();
    write_st(
        &r,
        "f/1/weights.safetensors",
        vec![
            ("layers.0.weight", f32_raw(&[4, 3], w0.iter().copied())),
            ("layers.0.bias", f32_raw(&[3], [0.1, 0.2, 0.3].into_iter())),
            (
                "layers.1.weight",
                f32_raw(&[3, 2], (0..6).map(|i| i as f32)),
            ),
            ("layers.1.bias", f16_raw(&[2], [0.0, 1.0].into_iter())),
        ],
    );
    let repo = r.load();
    assert!(repo.errors.is_empty(), "{:?}", repo.errors);
    let m = repo.model("f", None).unwrap();
    assert!(!m.layers[0].weight.is_window());
    let want: Vec<f16> = w0.iter().map(|&x| f16::from_f32(x)).collect();
    assert_eq!(m.layers[0].weight(), &want[..]);
    assert_eq!(m.layers[0].bias, vec![0.1, 0.2, 0.3]); // F32 biases stay exact
    assert!(repo.model("ok", None).unwrap().layers[0].weight.is_window());
}

#[test]
fn unaligned_f16_tensor_is_copied() {
    // A hand-written file whose header length is odd puts the F16 data at an
    // odd offset: the loader must copy it rather than cast a misaligned slice.
    let r = TempRepo::new("unaligned");
    r.write(
        "u/model.toml",
        "input_width = 2\noutput = \"identity\"\nlayers = [{ units = 1, activation = \"identity\" }]\n",
    );
    let header = r#"{"layers.0.bias":{"dtype":"F16","shape":[1],"data_offsets":[0,2]},"layers.0.weight":{"dtype":"F16","shape":[2,1],"data_offsets":[2,6]}}"#;
    let header = if header.len().is_multiple_of(2) {
        format!("{header} ")
    } else {
        header.to_string()
    };
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    for x in [0.5f32, 1.5, -2.0] {
        bytes.extend(f16::from_f32(x).to_le_bytes());
    }
    fs::create_dir_all(r.path().join("u/1")).unwrap();
    fs::write(r.path().join("u/1/weights.safetensors"), bytes).unwrap();
    let repo = r.load();
    assert!(repo.errors.is_empty(), "{:?}", repo.errors);
    let m = repo.model("u", None).unwrap();
    assert!(!m.layers[0].weight.is_window());
    assert_eq!(
        m.layers[0].weight(),
        &[f16::from_f32(1.5), f16::from_f32(-2.0)]
    );
    assert_eq!(m.layers[0].bias, vec![0.5]);
}

#[test]
fn digest_covers_the_weights_and_model_toml_bytes() {
    let r = base_repo("digest");
    let first = r.load().model("ok", None).unwrap().digest;
    let weights = fs::read(r.path().join("ok/1/weights.safetensors")).unwrap();
    assert_eq!(first, model_digest(TINY_TOML.as_bytes(), &weights));
    assert_eq!(r.load().model("ok", None).unwrap().digest, first, "stable");
    // One weight changed, same version folder.
    let mut t = tiny_tensors();
    t[2].1 = f16_raw(&[3, 2], (0..6).map(|i| i as f32 * -0.3));
    write_st(&r, "ok/1/weights.safetensors", t);
    let second = r.load().model("ok", None).unwrap().digest;
    assert_ne!(second, first, "new weights, new digest");
    // Only model.toml changed (a batching limit): a different model file.
    r.write(
        "ok/model.toml",
        &format!("{TINY_TOML}[batching]\nmax_batch = 8\n"),
    );
    let m = r.load().model("ok", None).unwrap().clone();
    assert_eq!(m.batch.max_batch, 8);
    assert_ne!(m.digest, second, "new model.toml, new digest");
    assert_eq!(m.short_digest().len(), 12);
    assert_eq!(m.short_digest(), format!("{:032x}", m.digest)[..12]);
    // In-memory models: the digest follows the parameters.
    let a = Model::random("x", &[4, 3], Activation::Relu, OutputTransform::Softmax, 1);
    let b = Model::random("x", &[4, 3], Activation::Relu, OutputTransform::Softmax, 2);
    assert_eq!(a.digest, a.params_digest());
    assert_ne!(a.digest, b.digest);
}

#[test]
fn a_file_that_changes_length_while_read_is_refused() {
    let bytes = [7u8; 100];
    let b = WeightsBuf::read(&mut &bytes[..], 100).unwrap();
    assert_eq!(b.as_bytes(), &bytes[..]);
    assert_eq!(b.as_bytes().as_ptr() as usize % 64, 0, "64-byte aligned");
    let e = WeightsBuf::read(&mut &bytes[..], 101).err().unwrap();
    assert!(e.to_string().contains("shorter than its 101 bytes"), "{e}");
    let e = WeightsBuf::read(&mut &bytes[..], 99).err().unwrap();
    assert!(e.to_string().contains("longer than its 99 bytes"), "{e}");
}

#[test]
fn versions_are_sorted_and_latest_is_default() {
    let r = base_repo("versions");
    for v in ["10", "2", "1"] {
        write_st(&r, &format!("ok/{v}/weights.safetensors"), tiny_tensors());
    }
    fs::create_dir_all(r.path().join("ok/latest")).unwrap();
    fs::create_dir_all(r.path().join("ok/0")).unwrap();
    let repo = r.load();
    assert!(repo.errors.is_empty(), "{:?}", repo.errors);
    let vs: Vec<u32> = repo.models["ok"].iter().map(|m| m.version).collect();
    assert_eq!(vs, [1, 2, 10]);
    assert_eq!(repo.model("ok", None).unwrap().version, 10);
    assert_eq!(repo.model("ok", Some(2)).unwrap().version, 2);
    assert!(repo.model("ok", Some(3)).is_none());
    assert_eq!(repo.warnings.len(), 2, "{:?}", repo.warnings);
    assert!(repo
        .warnings
        .iter()
        .any(|w| w.contains("ok/latest") && w.contains("ignored")));
}

#[path = "load_refusal_tests.rs"]
mod refusals;

// ---- the committed models/ folder ----

/// Held-out accuracy of the `digits` ensemble as printed by
/// `tools/export_sklearn.py` and recorded in docs/MODELS.md.
const DIGITS_ENSEMBLE_ACCURACY_PCT: f64 = 98.33;

/// A plain f32 forward pass (FP16 weights widened), independent of the backends.
fn forward(m: &Model, x: &[f32]) -> Vec<f32> {
    let mut h = x.to_vec();
    for l in &m.layers {
        let w = l.weight();
        let mut y = l.bias.clone();
        for (i, &xi) in h.iter().enumerate() {
            for (j, yj) in y.iter_mut().enumerate() {
                *yj += xi * w[i * l.out_dim + j].to_f32();
            }
        }
        if let Some(n) = &l.layer_norm {
            let mean = y.iter().sum::<f32>() / y.len() as f32;
            let var = y.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / y.len() as f32;
            for (j, v) in y.iter_mut().enumerate() {
                *v = (*v - mean) / (var + n.eps).sqrt() * n.gamma[j] + n.beta[j];
            }
        }
        for v in y.iter_mut() {
            *v = match l.activation {
                Activation::Identity => *v,
                Activation::Relu => v.max(0.0),
                Activation::Tanh => v.tanh(),
                Activation::Sigmoid => 1.0 / (1.0 + (-*v).exp()),
                Activation::Gelu => {
                    0.5 * *v * (1.0 + (0.797_884_6 * (*v + 0.044_715 * *v * *v * *v)).tanh())
                }
            };
        }
        h = y;
    }
    match m.output {
        OutputTransform::Identity => h,
        OutputTransform::Sigmoid => h.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect(),
        OutputTransform::Softmax => {
            let mx = h.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = h.iter().map(|v| (v - mx).exp()).collect();
            let s: f32 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        }
    }
}

#[test]
fn committed_digits_ensemble_matches_recorded_accuracy() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let repo = load_repository(&dir, &BatchLimits::default()).unwrap();
    assert!(repo.errors.is_empty(), "{:?}", repo.errors);
    let ens = &repo.ensembles["digits"];
    assert_eq!(ens.members.len(), 3);
    assert_eq!(ens.combiner, Combiner::Mean);
    let members: Vec<&Arc<Model>> = ens
        .members
        .iter()
        .map(|n| repo.model(n, None).unwrap())
        .collect();
    for m in &members {
        assert_eq!((m.input_width, m.output_width), (64, 10), "{}", m.name);
        assert!(m.layers.iter().all(|l| l.weight.is_window()));
    }
    let csv = fs::read_to_string(dir.join("digits_holdout.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!((header.len(), header[64]), (65, "label"));
    let (mut rows, mut correct) = (0usize, 0usize);
    for line in lines {
        let v: Vec<f32> = line.split(',').map(|s| s.parse().unwrap()).collect();
        // the wire carries FP16 rows
        let x: Vec<f32> = v[..64].iter().map(|&a| f16::from_f32(a).to_f32()).collect();
        let mut p = [0f32; 10];
        for m in &members {
            for (a, b) in p.iter_mut().zip(forward(m, &x)) {
                *a += b / members.len() as f32;
            }
        }
        let pred = (0..10).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
        correct += (pred == v[64] as usize) as usize;
        rows += 1;
    }
    let acc = correct as f64 / rows as f64 * 100.0;
    assert!(
        (acc - DIGITS_ENSEMBLE_ACCURACY_PCT).abs() <= 0.2,
        "ensemble accuracy {acc:.2}% over {rows} rows, recorded {DIGITS_ENSEMBLE_ACCURACY_PCT}%"
    );
}

#[test]
fn the_model_module_imports_neither_backend_nor_ensemble() {
    // docs/ARCHITECTURE.md, "Module dependencies": model/ is a leaf; steps
    // that run models (cascade calibration) belong to start-up.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/model");
    let mut checked = 0;
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = fs::read_to_string(&path).unwrap();
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                assert!(
                    !code.contains(concat!("crate", "::backend"))
                        && !code.contains(concat!("crate", "::ensemble")),
                    "{}:{}: {line}",
                    path.display(),
                    n + 1
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} files under {}", dir.display());
}
