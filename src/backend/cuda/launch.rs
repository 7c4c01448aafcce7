//! A model's device work for one batch: the FP16 conversion of the input,
//! then per layer a cuBLAS GEMM and the epilogue kernel — queued on the
//! backend's stream, directly or captured once into a CUDA graph per batch
//! bucket and replayed. The copies in and out are the caller's (they read
//! and write the batch's own pinned staging, which a graph must not bake in).
//!
//! Layout. Our `W` is `[k, n]` row-major (`x @ W`). cuBLAS is column-major,
//! and a row-major `[r, c]` buffer *is* a column-major `c × r` matrix with
//! leading dimension `c`. So, reading every buffer column-major:
//! - `W` buffer  = `Wᵀ`, an `n × k` matrix, ld `n`;
//! - `X` buffer (`[rows, k]` row-major) = `Xᵀ`, `k × rows`, ld `k`;
//! - `Y` buffer (`[rows, n]` row-major) = `Yᵀ`, `n × rows`, ld `n`;
//!
//! and `Y = X·W` ⇔ `Yᵀ = Wᵀ·Xᵀ`: `gemm(N, N, m = n, n = rows, k = k,
//! A = W (ld n), B = X (ld k), C = Y (ld n))`, no transposes, no copies.

use super::kernels::{transform_code, Kernels};
use super::resident::DeviceLayer;
use crate::model::OutputTransform;
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    sys, CudaGraph, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use std::ffi::c_void;
use std::sync::Arc;

/// The device activation buffers, shared by every batch of the backend:
/// batches run one after another on the one stream, so the next batch's
/// writes are ordered after the previous batch's reads.
pub(super) struct Buffers {
    /// Input rows, f32 `[rows, input_width]`.
    pub in32: CudaSlice<f32>,
    /// GEMM input, FP16 bits `[rows, k or 2k]`.
    pub x16: CudaSlice<u16>,
    /// GEMM output / final output, f32 `[rows, n]`.
    pub y32: CudaSlice<f32>,
}

/// What the launches need of a model besides its device layers.
#[derive(Clone, Copy)]
pub(super) struct Shape {
    pub input_width: usize,
    pub output: OutputTransform,
}

/// Queue the conversion and every layer for `rows` rows (the input is in
/// `in32` already); the output ends in `y32`.
#[allow(clippy::too_many_arguments)]
pub(super) fn enqueue_layers(
    stream: &Arc<CudaStream>,
    blas: &CudaBlas,
    k: &Kernels,
    bufs: &mut Buffers,
    layers: &[DeviceLayer],
    shape: Shape,
    rows: usize,
    split: bool,
) -> Result<(), String> {
    let copies = if split { 2 } else { 1 };
    let total = rows * shape.input_width;
    let cfg = LaunchConfig {
        grid_dim: (total.div_ceil(256).clamp(1, 4096) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows_i, k0_i, split_i) = (rows as i32, shape.input_width as i32, split as i32);
    let mut b = stream.launch_builder(&k.to_f16);
    b.arg(&bufs.in32)
        .arg(&mut bufs.x16)
        .arg(&rows_i)
        .arg(&k0_i)
        .arg(&split_i);
    // SAFETY: `to_f16(const float*, u16*, int, int, int)` matches these
    // arguments; `reserve` sized in32 ≥ rows·k and x16 ≥ rows·k·copies.
    unsafe { b.launch(cfg) }.map_err(|e| format!("launching to_f16: {e}"))?;

    let last = layers.len() - 1;
    let (alpha, beta) = (1.0f32, 0.0f32);
    for (i, l) in layers.iter().enumerate() {
        let kk = l.k * copies;
        {
            let (w_ptr, _w) = l.w.device_ptr(stream);
            let (x_ptr, _x) = bufs.x16.device_ptr(stream);
            let (y_ptr, _y) = bufs.y32.device_ptr_mut(stream);
            // SAFETY: column-major Yᵀ(n×rows, ld n) = Wᵀ(n×kk, ld n) ·
            // Xᵀ(kk×rows, ld kk) — see the module comment. w holds kk·n
            // FP16 values, x16 ≥ rows·kk (written by to_f16 or the previous
            // epilogue on this stream), y32 ≥ rows·n; `plan::check_model`
            // checked every dimension fits in i32. alpha/beta are host f32
            // (the handle's default host pointer mode) and outlive the call
            // (a captured graph bakes in their values, not the pointers).
            unsafe {
                blas::gemm_ex(
                    *blas.handle(),
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    l.n as i32,
                    rows as i32,
                    kk as i32,
                    &alpha as *const f32 as *const c_void,
                    w_ptr as *const c_void,
                    blas_sys::cudaDataType::CUDA_R_16F,
                    l.n as i32,
                    x_ptr as *const c_void,
                    blas_sys::cudaDataType::CUDA_R_16F,
                    kk as i32,
                    &beta as *const f32 as *const c_void,
                    y_ptr as *mut c_void,
                    blas_sys::cudaDataType::CUDA_R_32F,
                    l.n as i32,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| format!("cublasGemmEx (layer {i}, {}x{}): {e}", l.k, l.n))?;
        }

        // One block per row; threads a multiple of 32, at most 256.
        let threads = l.n.next_multiple_of(32).clamp(32, 256) as u32;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let (gamma, beta_ln, eps, has_ln) = match &l.ln {
            Some((g, b, eps)) => (g, b, *eps, 1i32),
            None => (&l.bias, &l.bias, 0.0f32, 0i32),
        };
        let n_i = l.n as i32;
        let final_i = (i == last) as i32;
        let transform = transform_code(shape.output);
        let mut b = stream.launch_builder(&k.epilogue);
        b.arg(&mut bufs.y32)
            .arg(&n_i)
            .arg(&l.bias)
            .arg(gamma)
            .arg(beta_ln)
            .arg(&eps)
            .arg(&has_ln)
            .arg(&l.act)
            .arg(&mut bufs.x16)
            .arg(&split_i)
            .arg(&final_i)
            .arg(&transform);
        // SAFETY: the argument list matches `epilogue` in kernels/mlp.cu;
        // y32 ≥ rows·n, x16 ≥ rows·n·copies (n is the next layer's k),
        // bias/gamma/beta hold n floats; gamma/beta are not read when
        // has_ln == 0. The GEMM that read x16 was queued before on the
        // same stream, so overwriting x16 here is ordered after it.
        unsafe { b.launch(cfg) }.map_err(|e| format!("launching epilogue: {e}"))?;
    }
    Ok(())
}

/// Capture [`enqueue_layers`] at `rows` rows into a graph (nothing runs
/// during the capture). The stream leaves capture mode whatever happens.
#[allow(clippy::too_many_arguments)]
pub(super) fn capture(
    stream: &Arc<CudaStream>,
    blas: &CudaBlas,
    k: &Kernels,
    bufs: &mut Buffers,
    layers: &[DeviceLayer],
    shape: Shape,
    rows: usize,
    split: bool,
) -> Result<CudaGraph, String> {
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| format!("beginning a graph capture: {e}"))?;
    let queued = enqueue_layers(stream, blas, k, bufs, layers, shape, rows, split);
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags_enum(0));
    queued?;
    match graph {
        Ok(Some(g)) => Ok(g),
        Ok(None) => Err("graph capture gave no graph".to_string()),
        Err(e) => Err(format!("ending a graph capture: {e}")),
    }
}
