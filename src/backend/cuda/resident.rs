//! A registered model's weights on the device.

use super::kernels::act_code;
use crate::model::Model;
use cudarc::driver::{CudaSlice, CudaStream};
use std::sync::Arc;

pub(super) struct DeviceLayer {
    pub k: usize,
    pub n: usize,
    /// FP16 bits, `[k, n]` row-major, written twice (`[2k, n]`) for `Split`.
    pub w: CudaSlice<u16>,
    pub bias: CudaSlice<f32>,
    /// gamma, beta, eps when the layer has a layer norm.
    pub ln: Option<(CudaSlice<f32>, CudaSlice<f32>, f32)>,
    pub act: i32,
}

/// Upload every layer of `model`, the weights `copies` times along k.
/// Runs at registration (or when an evicted model is used again), never
/// per batch.
pub(super) fn upload(
    stream: &Arc<CudaStream>,
    model: &Model,
    copies: usize,
) -> Result<Vec<DeviceLayer>, String> {
    let mut layers = Vec::with_capacity(model.layers.len());
    for l in &model.layers {
        let bits: &[u16] = bytemuck::cast_slice(l.weight());
        let mut w = Vec::with_capacity(bits.len() * copies);
        for _ in 0..copies {
            w.extend_from_slice(bits);
        }
        let w = stream
            .clone_htod(&w)
            .map_err(|e| format!("uploading weights: {e}"))?;
        let bias = stream
            .clone_htod(&l.bias)
            .map_err(|e| format!("uploading biases: {e}"))?;
        let ln = match &l.layer_norm {
            None => None,
            Some(ln) => {
                let up = |v: &[f32]| {
                    stream
                        .clone_htod(v)
                        .map_err(|e| format!("uploading layer norm: {e}"))
                };
                Some((up(&ln.gamma)?, up(&ln.beta)?, ln.eps))
            }
        };
        layers.push(DeviceLayer {
            k: l.in_dim,
            n: l.out_dim,
            w,
            bias,
            ln,
            act: act_code(l.activation),
        });
    }
    Ok(layers)
}
