//! Backends: run a batch of rows through one model.
//!
//! Owns: the `Backend` trait, the CPU implementation (`cpu`: FP16 weights,
//! f32 accumulation, AVX2/FMA/F16C picked at run time with a portable
//! fallback) and an f64 reference (`reference`) the tests check against.
//! Knows nothing of requests, sockets or ensembles: it sees rows.

pub mod cpu;
pub mod cuda;
pub mod reference;

use crate::model::Model;

/// Why a backend could not run a batch. Small and copyable: it becomes a
/// wire status (INTERNAL) and a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendError {
    /// Input or output slice does not match rows × width.
    Shape,
    /// The device failed (CUDA error, lost context).
    Device,
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendError::Shape => f.write_str("batch shape does not match the model"),
            BackendError::Device => f.write_str("device error"),
        }
    }
}

impl std::error::Error for BackendError {}

/// One backend instance per shard: `&mut self` so it owns its scratch
/// buffers and never allocates on the request path once warmed up.
pub trait Backend {
    /// Short name for logs and metrics ("cpu-avx2", "cpu-portable", "cuda").
    fn name(&self) -> &str;

    /// `input`: `rows × model.input_width` f32, row-major.
    /// `output`: `rows × model.output_width` f32, row-major, overwritten
    /// with the model's output (after its output transform).
    fn run(
        &mut self,
        model: &Model,
        input: &[f32],
        rows: usize,
        output: &mut [f32],
    ) -> Result<(), BackendError>;
}

/// Which backend a shard uses: the config's `backend`, `cuda_device` and
/// `cuda_precision` fields (docs/CONFIG.md, docs/CUDA.md), parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendChoice {
    pub kind: BackendKind,
    pub cuda_device: usize,
    pub cuda_precision: cuda::Precision,
    /// Models whose weights the CUDA backend keeps on the device.
    pub cuda_models_max: usize,
}

/// `backend = "auto" | "cpu" | "cuda"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// CUDA if it starts, else the CPU backend.
    Auto,
    Cpu,
    /// CUDA; the CPU backend (with one log line) if it does not start.
    Cuda,
}

/// The backend a shard uses, as `choice` says:
/// - `Cpu`: the CPU backend;
/// - `Cuda`: the CUDA backend on device `cuda_device`;
/// - `Auto`: CUDA if it starts, else the CPU backend.
///
/// Never fails: when CUDA was asked for (or `auto`) and does not start, it
/// logs one line per process
/// (`beast: backend: CUDA unavailable (<reason>), using CPU`) and returns
/// the CPU backend. A CUDA failure is remembered, so the other shards do not
/// retry it.
pub fn select(choice: &BackendChoice) -> Box<dyn Backend> {
    if choice.kind == BackendKind::Cpu {
        return Box::new(cpu::CpuBackend::new());
    }
    // `auto` and `cuda` both try CUDA here so that `auto` logs its fallback.
    let cuda = BackendChoice {
        kind: BackendKind::Cuda,
        ..*choice
    };
    match select_exact(&cuda) {
        Ok(b) => b,
        Err(reason) => {
            log_once(&format!(
                "beast: backend: CUDA unavailable ({reason}), using CPU"
            ));
            Box::new(cpu::CpuBackend::new())
        }
    }
}

/// As [`select`], but `Err` with the reason when `Cuda` does not start.
/// `Auto` never fails (it falls back to the CPU without logging).
pub fn select_exact(choice: &BackendChoice) -> Result<Box<dyn Backend>, String> {
    use std::sync::OnceLock;
    /// Why CUDA did not start on a device, the first time it was tried in
    /// this process (device ordinal, reason).
    static CUDA_FAILED: OnceLock<(usize, String)> = OnceLock::new();
    if choice.kind == BackendKind::Cpu {
        return Ok(Box::new(cpu::CpuBackend::new()));
    }
    let device = choice.cuda_device;
    let cuda = match CUDA_FAILED.get() {
        Some((d, reason)) if *d == device => Err(reason.clone()),
        _ => cuda::CudaBackend::with_precision(device, choice.cuda_precision)
            .map(|b| b.with_models_max(choice.cuda_models_max))
            .map_err(|reason| {
                CUDA_FAILED
                    .get_or_init(|| (device, reason.clone()))
                    .1
                    .clone()
            }),
    };
    match cuda {
        Ok(b) => Ok(Box::new(b)),
        Err(_) if choice.kind == BackendKind::Auto => Ok(Box::new(cpu::CpuBackend::new())),
        Err(reason) => Err(reason),
    }
}

/// Prints `line` to stderr the first time it is called in this process.
fn log_once(line: &str) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static LOGGED: AtomicBool = AtomicBool::new(false);
    if !LOGGED.swap(true, Ordering::Relaxed) {
        eprintln!("{line}");
    }
}
