//! CPU backend. INTERFACE CONTRACT (backend helper implements).
use super::{Backend, BackendError};
use crate::model::Model;

pub struct CpuBackend {}

impl CpuBackend {
    /// Picks the best kernel the CPU supports (AVX2+FMA+F16C, else portable).
    pub fn new() -> Self {
        CpuBackend {}
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &str {
        "cpu"
    }
    fn run(&mut self, model: &Model, input: &[f32], rows: usize, output: &mut [f32]) -> Result<(), BackendError> {
        let _ = (model, input, rows, output);
        todo!("backend helper")
    }
}
