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

/// The backend a shard uses, chosen by `BEAST_BACKEND`:
/// - `cpu`: the CPU backend;
/// - `cuda`: the CUDA backend on device `BEAST_CUDA_DEVICE` (default 0);
/// - `auto` (the default when built with the `cuda` feature; `cpu` otherwise):
///   CUDA if it starts, else the CPU backend.
///
/// Never fails: when CUDA was asked for (or `auto`) and does not start, or
/// the name is unknown, it logs one line per process
/// (`beast: backend: CUDA unavailable (<reason>), using CPU`) and returns
/// the CPU backend. A CUDA failure is remembered, so the other shards do not
/// retry it.
pub fn select() -> Box<dyn Backend> {
    let default = if cfg!(feature = "cuda") {
        "auto"
    } else {
        "cpu"
    };
    let name = std::env::var("BEAST_BACKEND").unwrap_or_else(|_| default.to_string());
    if name == "cpu" {
        return Box::new(cpu::CpuBackend::new());
    } else if name != "cuda" && name != "auto" {
        log_once(&format!(
            "beast: backend: unknown BEAST_BACKEND={name:?} (cpu, cuda, auto), using CPU"
        ));
        return Box::new(cpu::CpuBackend::new());
    }
    // `auto` and `cuda` both try CUDA here so that `auto` logs its fallback.
    match select_named("cuda") {
        Ok(b) => b,
        Err(reason) => {
            log_once(&format!(
                "beast: backend: CUDA unavailable ({reason}), using CPU"
            ));
            Box::new(cpu::CpuBackend::new())
        }
    }
}

/// The backend named `cpu`, `cuda` or `auto` (see [`select`]); `Err` with the
/// reason when `cuda` does not start or the name is unknown. `auto` never
/// fails (it falls back to the CPU without logging).
pub fn select_named(name: &str) -> Result<Box<dyn Backend>, String> {
    use std::sync::OnceLock;
    /// Why CUDA did not start, the first time it was tried in this process.
    static CUDA_FAILED: OnceLock<String> = OnceLock::new();
    match name {
        "cpu" => Ok(Box::new(cpu::CpuBackend::new())),
        "cuda" | "auto" => {
            let cuda = match CUDA_FAILED.get() {
                Some(reason) => Err(reason.clone()),
                None => {
                    let ordinal = std::env::var("BEAST_CUDA_DEVICE")
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    cuda::CudaBackend::new(ordinal)
                        .map_err(|reason| CUDA_FAILED.get_or_init(|| reason).clone())
                }
            };
            match cuda {
                Ok(b) => Ok(Box::new(b)),
                Err(_) if name == "auto" => Ok(Box::new(cpu::CpuBackend::new())),
                Err(reason) => Err(reason),
            }
        }
        other => Err(format!("unknown backend {other:?} (cpu, cuda, auto)")),
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
