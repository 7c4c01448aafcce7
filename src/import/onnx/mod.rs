//! `beast import-onnx MODEL.onnx --out DIR`: an ONNX MLP → a beast model folder.
//!
//! [`proto`] decodes the protobuf, [`convert`] turns the graph into layers
//! (folding BatchNormalization, scalers and per-feature affines into the
//! neighbouring layer), and [`import_file`] writes `DIR/model.toml` and
//! `DIR/<version>/weights.safetensors`, checked by loading them with the
//! server's own loader before they are moved into place.

mod builder;
pub mod convert;
mod network;
pub mod proto;

use crate::model::demo::TensorBytes;
use crate::model::load::{load_repository, WEIGHTS_FILE};
use crate::model::manifest::{activation_name, output_name};
use crate::model::{Activation, BatchLimits};
use convert::Network;
use std::path::{Path, PathBuf};

/// What `import-onnx` was asked to do (its command-line arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct ImportArgs {
    /// The .onnx file (weights inside it, not external data).
    pub onnx: PathBuf,
    /// The model folder to write (its name is the model's name); with
    /// --name, the repository folder that gets DIR/NAME.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Model name: write DIR/NAME instead of DIR.
    #[arg(long)]
    pub name: Option<String>,
    /// Version folder to write (default: 1, or one past the highest there).
    #[arg(long)]
    pub version: Option<u32>,
    /// The graph output to import when several could be.
    #[arg(long)]
    pub output: Option<String>,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct ImportReport {
    pub model_dir: PathBuf,
    pub version: u32,
    pub network: Network,
    /// max |FP16 model − f32 network| over the check rows.
    pub fp16_max_abs_diff: f64,
}

impl std::fmt::Display for ImportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = &self.network;
        let mut dims = vec![n.input_width.to_string()];
        dims.extend(n.layers.iter().map(|l| l.out_dim.to_string()));
        writeln!(
            f,
            "imported {} v{}: {} {} (input {:?}, output {:?})",
            self.model_dir.display(),
            self.version,
            dims.join("→"),
            output_name(n.output),
            n.input_name,
            n.output_name
        )?;
        for (i, l) in n.layers.iter().enumerate() {
            writeln!(
                f,
                "  layer {i}: {}→{}{} {}",
                l.in_dim,
                l.out_dim,
                if l.layer_norm.is_some() {
                    " layer norm,"
                } else {
                    ""
                },
                activation_name(l.activation)
            )?;
        }
        for note in &n.notes {
            writeln!(f, "  note: {note}")?;
        }
        writeln!(
            f,
            "  FP16 weights vs the f32 graph on {CHECK_ROWS} random rows ({}): max |difference| {:.2e}",
            if self.network.input_affine.is_some() {
                "in [-1, 1] after the folded input scaling"
            } else {
                "in [-1, 1]"
            },
            self.fp16_max_abs_diff
        )
    }
}

const CHECK_ROWS: usize = 64;

/// Read, convert and write; every error names the file (and node).
pub fn import_file(a: &ImportArgs) -> Result<ImportReport, String> {
    let bytes = std::fs::read(&a.onnx).map_err(|e| format!("{}: {e}", a.onnx.display()))?;
    let network = import_bytes(&bytes, a.output.as_deref())
        .map_err(|e| format!("{}: {e}", a.onnx.display()))?;
    write_model(a, network)
}

/// Decode and convert an ONNX file's bytes (no file system).
pub fn import_bytes(bytes: &[u8], output: Option<&str>) -> Result<Network, String> {
    let model = proto::decode_model(bytes)?;
    let net = convert::convert(&model, output)?;
    for (i, l) in net.layers.iter().enumerate() {
        let bad = |v: &[f32]| v.iter().any(|x| !x.is_finite());
        if bad(&l.weight)
            || bad(&l.bias)
            || l.layer_norm.as_ref().is_some_and(|(g, b)| bad(g) || bad(b))
        {
            return Err(format!("layer {i}: NaN or infinite values"));
        }
        if let Some(w) = l.weight.iter().find(|w| w.abs() > 65504.0) {
            return Err(format!(
                "layer {i}: weight {w} is beyond FP16's range (65504) after folding; beast runs FP16 weights"
            ));
        }
    }
    Ok(net)
}

/// The `model.toml` text of `n` (batching limits are left to the server config).
pub fn manifest_text(n: &Network) -> String {
    let mut s = format!(
        "# imported from ONNX by beast import-onnx\ninput_width = {}\noutput = \"{}\"\n",
        n.input_width,
        output_name(n.output)
    );
    if let Some(eps) = n.layer_norm_eps {
        s += &format!("layer_norm_eps = {eps:e}\n");
    }
    s += "layers = [\n";
    for l in &n.layers {
        s += &format!(
            "  {{ units = {}, activation = \"{}\"{} }},\n",
            l.out_dim,
            activation_name(l.activation),
            if l.layer_norm.is_some() {
                ", layer_norm = true"
            } else {
                ""
            }
        );
    }
    s + "]\n"
}

fn write_model(a: &ImportArgs, network: Network) -> Result<ImportReport, String> {
    let model_dir = match &a.name {
        Some(name) => {
            if name.is_empty() || name.starts_with('.') || name.contains(['/', '\\']) {
                return Err(format!(
                    "--name {name:?}: not a folder name a repository loads"
                ));
            }
            a.out.join(name)
        }
        None => a.out.clone(),
    };
    let name = model_dir
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.starts_with('.'))
        .ok_or_else(|| format!("{}: not a model folder name", model_dir.display()))?
        .to_string();
    let parent = match model_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let text = manifest_text(&network);
    let toml_path = model_dir.join("model.toml");
    let existing = match std::fs::read_to_string(&toml_path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("{}: {e}", toml_path.display())),
    };
    if existing.as_ref().is_some_and(|t| *t != text) {
        return Err(format!(
            "{}: exists and describes another network (all versions of a model share its model.toml); \
             import into a new folder",
            toml_path.display()
        ));
    }
    let highest = existing.as_ref().map_or(0, |_| highest_version(&model_dir));
    let version = a.version.unwrap_or(highest + 1);
    if version == 0 {
        return Err("--version: must be >= 1".into());
    }
    let vdir = model_dir.join(version.to_string());
    if vdir.exists() {
        return Err(format!(
            "{}: exists; choose another --version",
            vdir.display()
        ));
    }

    // Stage a one-model repository beside the target (same file system, a
    // dot-folder a server skips), load it with the server's loader, then
    // move the version folder into place with a rename.
    std::fs::create_dir_all(&parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let stage = parent.join(format!(".beast-import-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&stage);
    let result = (|| {
        let sdir = stage.join(&name);
        let svdir = sdir.join(version.to_string());
        std::fs::create_dir_all(&svdir).map_err(|e| format!("{}: {e}", svdir.display()))?;
        std::fs::write(sdir.join("model.toml"), &text)
            .map_err(|e| format!("{}: {e}", sdir.display()))?;
        write_weights(&network, &svdir.join(WEIGHTS_FILE))?;
        let repo = load_repository(&stage, &BatchLimits::default())?;
        if let Some(e) = repo.errors.first() {
            return Err(format!("the written model does not load: {e}"));
        }
        let m = repo
            .model(&name, Some(version))
            .ok_or("the written model did not load")?
            .clone();
        let diff = fp16_check(&network, &m);
        std::fs::create_dir_all(&model_dir).map_err(|e| format!("{}: {e}", model_dir.display()))?;
        if existing.is_none() {
            std::fs::write(&toml_path, &text)
                .map_err(|e| format!("{}: {e}", toml_path.display()))?;
        }
        std::fs::rename(&svdir, &vdir).map_err(|e| format!("{}: {e}", vdir.display()))?;
        Ok(diff)
    })();
    let _ = std::fs::remove_dir_all(&stage);
    Ok(ImportReport {
        model_dir,
        version,
        network,
        fp16_max_abs_diff: result?,
    })
}

fn highest_version(dir: &Path) -> u32 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .max()
        .unwrap_or(0)
}

/// Weights as F32 tensors (the loader rounds them to FP16 once, refusing
/// values beyond its range), in beast's tensor names.
fn write_weights(n: &Network, path: &Path) -> Result<(), String> {
    let mut tensors: Vec<(String, TensorBytes)> = Vec::new();
    for (i, l) in n.layers.iter().enumerate() {
        tensors.push((
            format!("layers.{i}.weight"),
            TensorBytes::f32(vec![l.in_dim, l.out_dim], &l.weight),
        ));
        tensors.push((
            format!("layers.{i}.bias"),
            TensorBytes::f32(vec![l.out_dim], &l.bias),
        ));
        if let Some((g, b)) = &l.layer_norm {
            tensors.push((
                format!("layers.{i}.ln_gamma"),
                TensorBytes::f32(vec![l.out_dim], g),
            ));
            tensors.push((
                format!("layers.{i}.ln_beta"),
                TensorBytes::f32(vec![l.out_dim], b),
            ));
        }
    }
    safetensors::serialize_to_file(tensors, None, path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The network in f32, as ONNX Runtime would compute it (before FP16 rounding).
pub fn forward_f32(n: &Network, input: &[f32], rows: usize) -> Vec<f32> {
    let mut x = input.to_vec();
    for l in &n.layers {
        let mut y = vec![0f32; rows * l.out_dim];
        for r in 0..rows {
            let out = &mut y[r * l.out_dim..(r + 1) * l.out_dim];
            out.copy_from_slice(&l.bias);
            for i in 0..l.in_dim {
                let xi = x[r * l.in_dim + i];
                for (o, w) in out
                    .iter_mut()
                    .zip(&l.weight[i * l.out_dim..(i + 1) * l.out_dim])
                {
                    *o += xi * w;
                }
            }
            if let Some((g, b)) = &l.layer_norm {
                let k = out.len() as f32;
                let mean = out.iter().sum::<f32>() / k;
                let var = out.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / k;
                let inv = 1.0 / (var + n.layer_norm_eps.unwrap_or(1e-5)).sqrt();
                for ((v, g), b) in out.iter_mut().zip(g).zip(b) {
                    *v = (*v - mean) * inv * g + b;
                }
            }
            for v in out.iter_mut() {
                *v = match l.activation {
                    Activation::Identity => *v,
                    Activation::Relu => v.max(0.0),
                    Activation::Tanh => v.tanh(),
                    Activation::Sigmoid => 1.0 / (1.0 + (-*v).exp()),
                    Activation::Gelu => {
                        0.5 * *v * (1.0 + (0.797_884_6 * (*v + 0.044715 * *v * *v * *v)).tanh())
                    }
                };
            }
        }
        x = y;
    }
    let w = n.layers.last().map_or(n.input_width, |l| l.out_dim);
    for row in x.chunks_mut(w) {
        match n.output {
            crate::model::OutputTransform::Identity => {}
            crate::model::OutputTransform::Sigmoid => {
                row.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp()))
            }
            crate::model::OutputTransform::Softmax => {
                let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                row.iter_mut().for_each(|v| *v = (*v - m).exp());
                let s: f32 = row.iter().sum();
                row.iter_mut().for_each(|v| *v /= s);
            }
        }
    }
    x
}

fn fp16_check(n: &Network, m: &crate::model::Model) -> f64 {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Rows in [-1, 1] after the folded scaler, if any (raw inputs may be on
    // any scale: a row of wine's features reaches 1680).
    let input: Vec<f32> = (0..CHECK_ROWS * n.input_width)
        .map(|i| {
            let u = rng.random_range(-1.0f32..1.0);
            match &n.input_affine {
                Some((a, c)) if a[i % n.input_width] != 0.0 => {
                    (u - c[i % n.input_width]) / a[i % n.input_width]
                }
                _ => u,
            }
        })
        .collect();
    let want = forward_f32(n, &input, CHECK_ROWS);
    let got = crate::backend::reference::forward_f64(m, &input, CHECK_ROWS);
    want.iter()
        .zip(&got)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max)
}
