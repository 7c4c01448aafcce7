//! One MLP version from its `weights.safetensors` and its manifest: the
//! file read once into owned memory ([`WeightsBuf`]), the header parsed by
//! the `safetensors` crate, every tensor's name, dtype, shape and values
//! checked (finite), FP16 used in place, F32 converted once, and the
//! model's digest taken from the same bytes (see `load.rs` for the folder
//! walk that calls this).

use super::manifest::ModelManifest;
use super::{Dense, F16Storage, LayerNorm, Model, WeightsBuf};
use half::f16;
use safetensors::tensor::{Dtype, TensorInfo};
use safetensors::SafeTensors;
use std::fs;
use std::path::Path;
use std::sync::Arc;

/// The tensor dtypes a weights file may use.
pub const ACCEPTED_DTYPES: &str = "F16, F32";

/// Build one model version from its weights file and manifest (whose bytes
/// are `manifest_bytes`). Errors name the tensor; the caller prefixes the file.
pub(super) fn load_weights(
    path: &Path,
    name: &str,
    version: u32,
    man: &ModelManifest,
    manifest_bytes: &[u8],
) -> Result<Model, String> {
    let mut file = fs::File::open(path).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    if len < 8 {
        return Err(format!("{len} bytes: too short for a safetensors file"));
    }
    let len = usize::try_from(len).map_err(|_| format!("{len} bytes: too large"))?;
    let buf = Arc::new(WeightsBuf::read(&mut file, len).map_err(|e| e.to_string())?);
    drop(file);
    let digest = model_digest(manifest_bytes, buf.as_bytes());
    let (header_len, meta) = SafeTensors::read_metadata(buf.as_bytes())
        .map_err(|e| format!("not a valid safetensors file: {e}"))?;
    let data_start = 8 + header_len;
    let tensors = meta.tensors();

    let mut expected: Vec<String> = Vec::new();
    let mut layers = Vec::with_capacity(man.layers.len());
    for (i, ((in_dim, out_dim), spec)) in man.layer_dims().into_iter().zip(&man.layers).enumerate()
    {
        let get = |suffix: &str, shape: &[usize]| -> Result<&TensorInfo, String> {
            let tname = format!("layers.{i}.{suffix}");
            let info = tensors.get(&tname).copied().ok_or_else(|| {
                format!("tensor {tname}: missing (model.toml says shape {shape:?})")
            })?;
            if info.shape != shape {
                return Err(format!(
                    "tensor {tname}: shape {:?} but model.toml says {shape:?}",
                    info.shape
                ));
            }
            if !matches!(info.dtype, Dtype::F16 | Dtype::F32) {
                return Err(format!(
                    "tensor {tname}: dtype {:?} not accepted (accepted: {ACCEPTED_DTYPES})",
                    info.dtype
                ));
            }
            Ok(info)
        };
        let wname = format!("layers.{i}.weight");
        let winfo = get("weight", &[in_dim, out_dim])?;
        let weight = f16_storage(&buf, data_start, winfo, &wname)?;
        let bias = f32_vec(
            buf.as_bytes(),
            data_start,
            get("bias", &[out_dim])?,
            &format!("layers.{i}.bias"),
        )?;
        expected.push(wname);
        expected.push(format!("layers.{i}.bias"));
        let layer_norm = if spec.layer_norm {
            let gamma = f32_vec(
                buf.as_bytes(),
                data_start,
                get("ln_gamma", &[out_dim])?,
                &format!("layers.{i}.ln_gamma"),
            )?;
            let beta = f32_vec(
                buf.as_bytes(),
                data_start,
                get("ln_beta", &[out_dim])?,
                &format!("layers.{i}.ln_beta"),
            )?;
            expected.push(format!("layers.{i}.ln_gamma"));
            expected.push(format!("layers.{i}.ln_beta"));
            Some(LayerNorm {
                gamma,
                beta,
                eps: man.layer_norm_eps,
            })
        } else {
            None
        };
        layers.push(Dense {
            in_dim,
            out_dim,
            weight,
            bias,
            layer_norm,
            activation: spec.activation,
        });
    }
    // Extra tensors are refused: a file with layer-norm parameters for a
    // layer that model.toml declares without layer norm (or a layer too many)
    // would otherwise load and compute something other than what was trained.
    let mut extra: Vec<&String> = tensors.keys().filter(|k| !expected.contains(k)).collect();
    if !extra.is_empty() {
        extra.sort();
        return Err(format!(
            "tensor {}: not expected by model.toml (expected only {})",
            extra[0],
            expected_summary(man)
        ));
    }
    // A classifier declared with one sigmoid unit is served as two classes
    // [1 − p, p] (docs/MODELS.md): its last layer becomes [0, z] under a
    // softmax, so every consumer of classes (argmax, vote, cascade
    // confidence, calibration, feedback labels) sees two.
    let mut output = man.output;
    if man.io.binary {
        if let Some(last) = layers.last_mut() {
            super::io::expand_binary(last);
            output = super::OutputTransform::Softmax;
        }
    }
    Ok(Model {
        name: name.to_string(),
        version,
        input_width: man.input_width,
        output_width: man.served_width(),
        layers,
        output,
        batch: man.batch,
        task: man.task,
        io: man.io.clone(),
        digest,
        forest: None,
    })
}

/// A loaded model's identity: xxh3-128 of its `model.toml` bytes (length
/// first, so the boundary is part of the hash) and its weights file bytes.
pub fn model_digest(manifest: &[u8], weights: &[u8]) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    h.update(&(manifest.len() as u64).to_le_bytes());
    h.update(manifest);
    h.update(weights);
    h.digest128()
}

fn expected_summary(man: &ModelManifest) -> String {
    let n = man.layers.len();
    let ln = man.layers.iter().any(|l| l.layer_norm);
    format!(
        "layers.{{0..{}}}.weight/bias{}",
        n - 1,
        if ln {
            " and ln_gamma/ln_beta where layer_norm = true"
        } else {
            ""
        }
    )
}

fn tensor_bytes<'a>(bytes: &'a [u8], data_start: usize, info: &TensorInfo) -> &'a [u8] {
    // read_metadata has checked that the offsets lie within the file.
    &bytes[data_start + info.data_offsets.0..data_start + info.data_offsets.1]
}

/// F16 → a window into the file's buffer (zero copy) when 2-byte aligned,
/// else a copy; F32 → converted to owned FP16. Refuses NaN/inf and values
/// beyond FP16.
fn f16_storage(
    buf: &Arc<WeightsBuf>,
    data_start: usize,
    info: &TensorInfo,
    tname: &str,
) -> Result<F16Storage, String> {
    let bytes = tensor_bytes(buf.as_bytes(), data_start, info);
    match info.dtype {
        Dtype::F16 => {
            let offset = data_start + info.data_offsets.0;
            let aligned = (buf.as_bytes().as_ptr() as usize + offset)
                .is_multiple_of(std::mem::align_of::<f16>());
            let storage = if aligned && cfg!(target_endian = "little") {
                F16Storage::Window {
                    buf: Arc::clone(buf),
                    offset,
                    len: bytes.len() / 2,
                }
            } else {
                F16Storage::Owned(
                    bytes
                        .chunks_exact(2)
                        .map(|c| f16::from_le_bytes([c[0], c[1]]))
                        .collect(),
                )
            };
            if let Some(j) = storage.as_slice().iter().position(|x| !x.is_finite()) {
                return Err(format!(
                    "tensor {tname}: element {j} is {} (weights must be finite)",
                    storage.as_slice()[j]
                ));
            }
            Ok(storage)
        }
        _ => {
            let mut out = Vec::with_capacity(bytes.len() / 4);
            for (j, c) in bytes.chunks_exact(4).enumerate() {
                let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                let h = f16::from_f32(x);
                if !x.is_finite() {
                    return Err(format!(
                        "tensor {tname}: element {j} is {x} (weights must be finite)"
                    ));
                }
                if !h.is_finite() {
                    return Err(format!(
                        "tensor {tname}: element {j} = {x} overflows FP16 (|w| > 65504)"
                    ));
                }
                out.push(h);
            }
            Ok(F16Storage::Owned(out))
        }
    }
}

/// A small per-feature vector (bias, layer-norm parameters), F16 or F32 → f32.
fn f32_vec(
    file: &[u8],
    data_start: usize,
    info: &TensorInfo,
    tname: &str,
) -> Result<Vec<f32>, String> {
    let bytes = tensor_bytes(file, data_start, info);
    let v: Vec<f32> = match info.dtype {
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    };
    if let Some(j) = v.iter().position(|x| !x.is_finite()) {
        return Err(format!(
            "tensor {tname}: element {j} is {} (values must be finite)",
            v[j]
        ));
    }
    Ok(v)
}
