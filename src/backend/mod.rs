//! Backends: run a batch of rows through one model.
//!
//! Owns: the `Backend` trait, the CPU implementation (`cpu`: FP16 weights,
//! f32 accumulation, AVX2/FMA/F16C picked at run time with a portable
//! fallback) and an f64 reference (`reference`) the tests check against.
//! Knows nothing of requests, sockets or ensembles: it sees rows.

pub mod cpu;
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

/// The backend a shard uses: today the CPU backend (CUDA comes behind the
/// `cuda` feature and falls back to this when no device is found).
pub fn select() -> Box<dyn Backend> {
    Box::new(cpu::CpuBackend::new())
}
