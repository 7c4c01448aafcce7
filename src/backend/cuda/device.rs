//! The real CUDA backend (feature `cuda`).
//!
//! Per layer, on one stream:
//! 1. cuBLAS `GemmEx`: `Y = X · W` with FP16 `X` and `W`, f32 `Y`,
//!    `CUBLAS_COMPUTE_32F` (tensor cores, f32 accumulation).
//! 2. `epilogue` (kernels/mlp.cu): bias, layer norm, activation; writes the
//!    next layer's FP16 input, or for the last layer the f32 output after the
//!    output transform.
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
//!
//! Precision. `GemmEx` needs A and B of the same type, and the weights are
//! FP16. Rounding activations to FP16 costs ~2⁻¹² relative per element
//! (`Precision::Half`). `Precision::Split` (the default) writes each
//! activation as `hi = f16(x)`, `lo = f16(x − hi)` side by side (`[rows, 2k]`)
//! and keeps the weights twice, stacked along k (`[W; W]`, `[2k, n]`
//! row-major, which is simply the buffer written twice), so one GEMM with
//! K = 2k computes `W·hi + W·lo = W·x` to ~2⁻²² — f32-level accuracy, within
//! the CPU backend's tolerance — for twice the (tiny) GEMM work and weight
//! memory. Inputs must stay within FP16 range (|x| < 65504) in both modes.

use super::super::cpu::CpuBackend;
use crate::backend::{Backend, BackendError};
use crate::model::{Activation, Model, OutputTransform};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

/// The kernels, compiled at start-up by NVRTC.
const MLP_SRC: &str = include_str!("../../../kernels/mlp.cu");

/// Models kept resident per backend by default (the config's
/// `cuda_models_max`); the least recently used is dropped (its device
/// memory freed) when another one arrives.
pub const MODELS_MAX_DEFAULT: usize = 32;

/// How activations are fed to the FP16 GEMM (see the module comment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// hi/lo FP16 pair, K doubled: f32-level accuracy (default).
    Split,
    /// Activations rounded to FP16: half the GEMM work, ~1e-3 relative error.
    Half,
}

impl Precision {
    /// `"split"` or `"half"` (the config's `cuda_precision`).
    pub fn from_name(name: &str) -> Option<Precision> {
        match name {
            "split" => Some(Precision::Split),
            "half" => Some(Precision::Half),
            _ => None,
        }
    }

    fn split(self) -> bool {
        self == Precision::Split
    }
}

/// Identity of a model as the cache sees it: its address, name and version,
/// plus a cheap fingerprint of a few weights of each layer, so a different
/// model later allocated at the same address under the same name and version
/// (tests do this) is not mistaken for the old one.
#[derive(Clone, PartialEq, Eq)]
struct ModelKey {
    addr: usize,
    name: String,
    version: u32,
    fingerprint: u64,
}

impl ModelKey {
    fn of(model: &Model) -> ModelKey {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for l in &model.layers {
            let w = l.weight();
            h.update(&(l.in_dim as u64).to_le_bytes());
            h.update(&(l.out_dim as u64).to_le_bytes());
            h.update(&(w.as_ptr() as usize as u64).to_le_bytes());
            let head = &w[..w.len().min(32)];
            let tail = &w[w.len().saturating_sub(32)..];
            h.update(bytemuck::cast_slice(head));
            h.update(bytemuck::cast_slice(tail));
            h.update(bytemuck::cast_slice(&l.bias[..l.bias.len().min(16)]));
        }
        ModelKey {
            addr: model as *const Model as usize,
            name: model.name.clone(),
            version: model.version,
            fingerprint: h.digest(),
        }
    }
}

struct DeviceLayer {
    k: usize,
    n: usize,
    /// FP16 bits, `[k, n]` row-major, written twice (`[2k, n]`) for `Split`.
    w: CudaSlice<u16>,
    bias: CudaSlice<f32>,
    /// gamma, beta, eps when the layer has a layer norm.
    ln: Option<(CudaSlice<f32>, CudaSlice<f32>, f32)>,
    act: i32,
}

struct DeviceModel {
    key: ModelKey,
    layers: Vec<DeviceLayer>,
    last_used: u64,
}

pub struct CudaBackend {
    models: Vec<DeviceModel>,
    /// Input rows, f32 `[rows, input_width]`.
    in32: CudaSlice<f32>,
    /// GEMM input, FP16 bits `[rows, k or 2k]`.
    x16: CudaSlice<u16>,
    /// GEMM output / final output, f32 `[rows, n]`.
    y32: CudaSlice<f32>,
    blas: CudaBlas,
    k_to_f16: CudaFunction,
    k_epilogue: CudaFunction,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    /// Degenerate models (no layers) are handed to the CPU twin.
    cpu: CpuBackend,
    precision: Precision,
    /// Models kept resident (`with_models_max`).
    models_max: usize,
    name: String,
    device: String,
    tick: u64,
    last_error: Option<String>,
}

/// PTX per target architecture, compiled once per process and shared by the
/// backends of all shards.
fn ptx_for(arch: &str) -> Result<String, String> {
    static CACHE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(p) = cache.lock().ok().and_then(|c| c.get(arch).cloned()) {
        return Ok(p);
    }
    let opts = CompileOptions {
        options: vec![format!("--gpu-architecture={arch}")],
        name: Some("mlp.cu".to_string()),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(MLP_SRC, opts)
        .map_err(|e| format!("NVRTC failed to compile kernels/mlp.cu for {arch}: {e}"))?
        .to_src();
    if let Ok(mut c) = cache.lock() {
        c.insert(arch.to_string(), ptx.clone());
    }
    Ok(ptx)
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

fn act_code(a: Activation) -> i32 {
    match a {
        Activation::Identity => 0,
        Activation::Relu => 1,
        Activation::Gelu => 2,
        Activation::Tanh => 3,
        Activation::Sigmoid => 4,
    }
}

fn transform_code(t: OutputTransform) -> i32 {
    match t {
        OutputTransform::Identity => 0,
        OutputTransform::Softmax => 1,
        OutputTransform::Sigmoid => 2,
    }
}

impl CudaBackend {
    /// Loads the driver, NVRTC and cuBLAS at run time, compiles the kernels
    /// for device `device_ordinal` and creates this backend's stream.
    /// Precision `Split` (the default; see [`CudaBackend::with_precision`]).
    pub fn new(device_ordinal: usize) -> Result<CudaBackend, String> {
        Self::with_precision(device_ordinal, Precision::Split)
    }

    /// As [`CudaBackend::new`], with the precision given.
    ///
    /// Never panics: cudarc's dynamic loader panics when a library or one of
    /// its symbols is missing, so each library is first probed
    /// (`is_culib_present`, a plain `dlopen` of the candidate names) and the
    /// whole initialisation also runs under `catch_unwind`, which turns a
    /// panic for a missing symbol (e.g. a driver older than the bindings)
    /// into `Err`. The panic message is then also printed once by the default
    /// panic hook; we do not swap the process-wide hook for that.
    pub fn with_precision(
        device_ordinal: usize,
        precision: Precision,
    ) -> Result<CudaBackend, String> {
        std::panic::catch_unwind(|| Self::init(device_ordinal, precision))
            .unwrap_or_else(|p| Err(format!("CUDA library panicked: {}", panic_message(&*p))))
    }

    fn init(ordinal: usize, precision: Precision) -> Result<CudaBackend, String> {
        // SAFETY: the probes only try `dlopen` on candidate library names;
        // they call nothing inside the libraries.
        let (has_cuda, has_nvrtc, has_cublas) = unsafe {
            (
                cudarc::driver::sys::is_culib_present(),
                cudarc::nvrtc::sys::is_culib_present(),
                cudarc::cublas::sys::is_culib_present(),
            )
        };
        if !has_cuda {
            return Err("libcuda.so.1 not found (no NVIDIA driver)".to_string());
        }
        if !has_nvrtc {
            return Err("libnvrtc.so not found (set LD_LIBRARY_PATH to the CUDA libraries)".into());
        }
        if !has_cublas {
            return Err(
                "libcublas.so not found (set LD_LIBRARY_PATH to the CUDA libraries)".into(),
            );
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| format!("CUDA device {ordinal}: {e}"))?;
        let device = ctx.name().unwrap_or_else(|_| "unknown GPU".to_string());
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| format!("compute capability: {e}"))?;
        let stream = ctx.new_stream().map_err(|e| format!("stream: {e}"))?;
        // SAFETY: every buffer of this backend is allocated, used and freed
        // on `stream` alone, and `run` synchronises the stream before it
        // returns, so the cross-stream event tracking cudarc would otherwise
        // record on every use (an event per buffer per launch) is not needed.
        // Only slices created after this call are affected: all of ours.
        unsafe { ctx.disable_event_tracking() };
        let ptx = ptx_for(&format!("compute_{major}{minor}"))?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(|e| format!("loading the kernels: {e}"))?;
        let k_to_f16 = module
            .load_function("to_f16")
            .map_err(|e| format!("kernel to_f16: {e}"))?;
        let k_epilogue = module
            .load_function("epilogue")
            .map_err(|e| format!("kernel epilogue: {e}"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| format!("cuBLAS: {e}"))?;
        let alloc_err = |e| format!("device allocation: {e}");
        let in32 = stream.alloc_zeros::<f32>(1).map_err(alloc_err)?;
        let x16 = stream.alloc_zeros::<u16>(1).map_err(alloc_err)?;
        let y32 = stream.alloc_zeros::<f32>(1).map_err(alloc_err)?;
        stream
            .synchronize()
            .map_err(|e| format!("synchronize: {e}"))?;
        Ok(CudaBackend {
            models: Vec::new(),
            in32,
            x16,
            y32,
            blas,
            k_to_f16,
            k_epilogue,
            stream,
            ctx,
            cpu: CpuBackend::new(),
            precision,
            models_max: MODELS_MAX_DEFAULT,
            name: match precision {
                Precision::Split => "cuda".to_string(),
                Precision::Half => "cuda-half".to_string(),
            },
            device: format!("{device} (sm_{major}{minor})"),
            tick: 0,
            last_error: None,
        })
    }

    /// The GPU's name and compute capability.
    pub fn device_name(&self) -> &str {
        &self.device
    }

    /// The CUDA/cuBLAS error behind the last `BackendError::Device`.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Keep at most `n` (>= 1) models' weights on the device (default
    /// [`MODELS_MAX_DEFAULT`]); the least recently used goes first.
    pub fn with_models_max(mut self, n: usize) -> CudaBackend {
        self.models_max = n.max(1);
        self
    }

    fn fail(&mut self, what: &str, e: impl std::fmt::Display) -> BackendError {
        self.last_error = Some(format!("{what}: {e}"));
        BackendError::Device
    }

    /// Index of `model` in the cache, uploading its weights on first sight.
    fn resident(&mut self, model: &Model) -> Result<usize, BackendError> {
        self.tick += 1;
        let key = ModelKey::of(model);
        if let Some(i) = self.models.iter().position(|m| m.key == key) {
            self.models[i].last_used = self.tick;
            return Ok(i);
        }
        if self.models.len() >= self.models_max {
            if let Some(lru) = (0..self.models.len()).min_by_key(|&i| self.models[i].last_used) {
                self.models.swap_remove(lru);
            }
        }
        let copies = if self.precision.split() { 2 } else { 1 };
        let mut layers = Vec::with_capacity(model.layers.len());
        for l in &model.layers {
            let bits: &[u16] = bytemuck::cast_slice(l.weight());
            let mut w = Vec::with_capacity(bits.len() * copies);
            for _ in 0..copies {
                w.extend_from_slice(bits);
            }
            let up = |s: &Arc<CudaStream>, v: &[f32]| s.clone_htod(v);
            let w = self.stream.clone_htod(&w);
            let bias = up(&self.stream, &l.bias);
            let (w, bias) = match (w, bias) {
                (Ok(w), Ok(b)) => (w, b),
                (Err(e), _) | (_, Err(e)) => return Err(self.fail("uploading weights", e)),
            };
            let ln = match &l.layer_norm {
                None => None,
                Some(ln) => match (up(&self.stream, &ln.gamma), up(&self.stream, &ln.beta)) {
                    (Ok(g), Ok(b)) => Some((g, b, ln.eps)),
                    (Err(e), _) | (_, Err(e)) => return Err(self.fail("uploading layer norm", e)),
                },
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
        self.models.push(DeviceModel {
            key,
            layers,
            last_used: self.tick,
        });
        Ok(self.models.len() - 1)
    }

    /// Grows the activation buffers to hold `rows` rows of `model`; a no-op
    /// once a batch this large has been seen.
    fn reserve(&mut self, model: &Model, rows: usize) -> Result<(), BackendError> {
        let copies = if self.precision.split() { 2 } else { 1 };
        let max_k = model.layers.iter().map(|l| l.in_dim).max().unwrap_or(0);
        let max_n = model.layers.iter().map(|l| l.out_dim).max().unwrap_or(0);
        let need_in = rows * model.input_width;
        let need_x = rows * max_k * copies;
        let need_y = rows * max_n;
        if self.in32.len() < need_in {
            match self.stream.alloc_zeros::<f32>(need_in.next_power_of_two()) {
                Ok(b) => self.in32 = b,
                Err(e) => return Err(self.fail("allocating input buffer", e)),
            }
        }
        if self.x16.len() < need_x {
            match self.stream.alloc_zeros::<u16>(need_x.next_power_of_two()) {
                Ok(b) => self.x16 = b,
                Err(e) => return Err(self.fail("allocating activation buffer", e)),
            }
        }
        if self.y32.len() < need_y {
            match self.stream.alloc_zeros::<f32>(need_y.next_power_of_two()) {
                Ok(b) => self.y32 = b,
                Err(e) => return Err(self.fail("allocating output buffer", e)),
            }
        }
        Ok(())
    }

    /// The device part of `run`; errors carry a description for `last_error`.
    fn forward(
        &mut self,
        idx: usize,
        model: &Model,
        input: &[f32],
        rows: usize,
        output: &mut [f32],
    ) -> Result<(), String> {
        let split = self.precision.split();
        let copies = if split { 2 } else { 1 };
        let stream = &self.stream;
        self.ctx
            .bind_to_thread()
            .map_err(|e| format!("binding the context: {e}"))?;

        // Input rows: host f32 -> device f32 -> FP16 (hi/lo).
        {
            let mut dst = self.in32.slice_mut(..input.len());
            stream
                .memcpy_htod(input, &mut dst)
                .map_err(|e| format!("copying the input: {e}"))?;
        }
        let total = rows * model.input_width;
        let cfg = LaunchConfig {
            grid_dim: (total.div_ceil(256).clamp(1, 4096) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows_i, k0_i, split_i) = (rows as i32, model.input_width as i32, split as i32);
        let mut b = stream.launch_builder(&self.k_to_f16);
        b.arg(&self.in32)
            .arg(&mut self.x16)
            .arg(&rows_i)
            .arg(&k0_i)
            .arg(&split_i);
        // SAFETY: `to_f16(const float*, u16*, int, int, int)` matches these
        // arguments; `reserve` sized in32 ≥ rows·k and x16 ≥ rows·k·copies.
        unsafe { b.launch(cfg) }.map_err(|e| format!("launching to_f16: {e}"))?;

        let dm = &self.models[idx];
        let last = dm.layers.len() - 1;
        let (alpha, beta) = (1.0f32, 0.0f32);
        for (i, l) in dm.layers.iter().enumerate() {
            let kk = l.k * copies;
            {
                let (w_ptr, _w) = l.w.device_ptr(stream);
                let (x_ptr, _x) = self.x16.device_ptr(stream);
                let (y_ptr, _y) = self.y32.device_ptr_mut(stream);
                // SAFETY: column-major Yᵀ(n×rows, ld n) = Wᵀ(n×kk, ld n) ·
                // Xᵀ(kk×rows, ld kk) — see the module comment. w holds kk·n
                // FP16 values, x16 ≥ rows·kk (written by to_f16 or the previous
                // epilogue on this stream), y32 ≥ rows·n; `run` checked every
                // dimension fits in i32. alpha/beta are host f32 (the handle's
                // default host pointer mode) and outlive the call.
                unsafe {
                    blas::gemm_ex(
                        *self.blas.handle(),
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
            let transform = transform_code(model.output);
            let mut b = stream.launch_builder(&self.k_epilogue);
            b.arg(&mut self.y32)
                .arg(&n_i)
                .arg(&l.bias)
                .arg(gamma)
                .arg(beta_ln)
                .arg(&eps)
                .arg(&has_ln)
                .arg(&l.act)
                .arg(&mut self.x16)
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

        let n_out = model.output_width;
        let src = self.y32.slice(..rows * n_out);
        stream
            .memcpy_dtoh(&src, output)
            .map_err(|e| format!("copying the output: {e}"))?;
        stream
            .synchronize()
            .map_err(|e| format!("synchronize: {e}"))?;
        Ok(())
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &str {
        &self.name
    }

    fn run(
        &mut self,
        model: &Model,
        input: &[f32],
        rows: usize,
        output: &mut [f32],
    ) -> Result<(), BackendError> {
        if model.forest.is_some() {
            // Tree models are not put on the GPU: the CPU evaluator runs them.
            return self.cpu.run(model, input, rows, output);
        }
        check_shapes(model, input, rows, output)?;
        if rows == 0 {
            return Ok(());
        }
        if model.layers.is_empty() || model.layers.iter().any(|l| l.in_dim == 0 || l.out_dim == 0) {
            // No layers, or a zero-width one (cuBLAS rejects ld = 0): the
            // CPU twin does these trivially.
            return self.cpu.run(model, input, rows, output);
        }
        let idx = self.resident(model)?;
        self.reserve(model, rows)?;
        match self.forward(idx, model, input, rows, output) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.last_error = Some(e);
                Err(BackendError::Device)
            }
        }
    }
}

/// Every length `forward` relies on, and every GEMM dimension within i32
/// (the CPU backend's checks plus the cuBLAS/grid limits).
fn check_shapes(
    model: &Model,
    input: &[f32],
    rows: usize,
    output: &[f32],
) -> Result<(), BackendError> {
    let in_len = rows.checked_mul(model.input_width);
    let out_len = rows.checked_mul(model.output_width);
    if in_len != Some(input.len()) || out_len != Some(output.len()) {
        return Err(BackendError::Shape);
    }
    let fits = |v: Option<usize>| v.is_some_and(|v| v <= i32::MAX as usize);
    let mut width = model.input_width;
    for l in &model.layers {
        let ln_ok = l
            .layer_norm
            .as_ref()
            .is_none_or(|ln| ln.gamma.len() == l.out_dim && ln.beta.len() == l.out_dim);
        if l.in_dim != width
            || l.in_dim.checked_mul(l.out_dim) != Some(l.weight().len())
            || l.bias.len() != l.out_dim
            || !ln_ok
            || !fits(l.in_dim.checked_mul(2))
            || !fits(l.out_dim.checked_mul(2))
            || !fits(
                rows.checked_mul(l.in_dim.max(l.out_dim))
                    .and_then(|v| v.checked_mul(2)),
            )
        {
            return Err(BackendError::Shape);
        }
        width = l.out_dim;
    }
    if width != model.output_width || !fits(Some(rows)) {
        return Err(BackendError::Shape);
    }
    Ok(())
}
