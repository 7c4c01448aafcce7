//! Stand-in for the CUDA backend when built without the `cuda` feature: same
//! names, `new` always fails, and no value of it can exist.

use crate::backend::{Backend, BackendError, ModelId, Ticket};
use crate::model::Model;
use std::sync::Arc;
use std::task::Poll;

/// How activations are fed to the FP16 GEMM (see the real backend).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Split,
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
}

/// As in the real backend.
pub const MODELS_MAX_DEFAULT: usize = 32;

/// Uninhabited: the stub can never be constructed.
pub struct CudaBackend {
    never: std::convert::Infallible,
}

impl CudaBackend {
    pub fn new(device_ordinal: usize) -> Result<CudaBackend, String> {
        Self::with_precision(device_ordinal, Precision::Split)
    }

    pub fn with_precision(_device_ordinal: usize, _p: Precision) -> Result<CudaBackend, String> {
        Err("built without the cuda feature".to_string())
    }

    pub fn with_models_max(self, _n: usize) -> CudaBackend {
        match self.never {}
    }

    pub fn with_graphs(self, _on: bool) -> CudaBackend {
        match self.never {}
    }

    pub fn gemm_only_rows_per_s(
        &mut self,
        _models: &[&Model],
        _rows: usize,
        _secs: f64,
    ) -> Result<f64, String> {
        match self.never {}
    }

    pub fn device_name(&self) -> &str {
        match self.never {}
    }

    pub fn last_error(&self) -> Option<&str> {
        match self.never {}
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &str {
        match self.never {}
    }

    fn register(&mut self, _model: &Arc<Model>) -> Result<ModelId, BackendError> {
        match self.never {}
    }

    fn unregister(&mut self, _id: ModelId) {
        match self.never {}
    }

    fn submit(
        &mut self,
        _id: ModelId,
        _input: &[f32],
        _rows: usize,
    ) -> Result<Ticket, BackendError> {
        match self.never {}
    }

    fn poll(&mut self, _t: Ticket, _output: &mut [f32]) -> Poll<Result<(), BackendError>> {
        match self.never {}
    }

    fn run(
        &mut self,
        _model: &Model,
        _input: &[f32],
        _rows: usize,
        _output: &mut [f32],
    ) -> Result<(), BackendError> {
        match self.never {}
    }
}
