//! The real CUDA backend (feature `cuda`): the backend's state, start-up,
//! and the `Backend` methods. The pieces: `kernels.rs` (NVRTC compile and
//! kernel codes), `resident.rs` (weights on the device), `launch.rs` (a
//! batch's launches, direct or as a captured graph), `pinned.rs` (the
//! page-locked staging), `plan.rs` (shape checks, graph buckets, ensemble
//! groups: plain Rust).
//!
//! A batch (`submit`): its rows are copied into the ticket's pinned input
//! slot, uploaded (async), converted to FP16, run through the layers
//! (replaying the model's graph for the batch's bucket when rows ≤ 32),
//! downloaded (async) into the ticket's pinned output slot, and an event is
//! recorded after it. `submit` returns without waiting; `poll` queries the
//! event and, once it has fired, copies the output out. Nothing is
//! allocated per batch: staging slots are sized at registration (to
//! `max_batch` rows) and the device buffers to the largest batch seen.
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

use super::kernels::{panic_message, Kernels};
use super::launch::Buffers;
use super::pinned::Pinned;
use super::plan::{check_model, degenerate, max_dim, GRAPH_BUCKETS};
use super::resident::{upload, DeviceLayer};
use crate::backend::cpu::CpuBackend;
use crate::backend::registry::Registry;
use crate::backend::{BackendError, ModelId, IN_FLIGHT_PER_MODEL};
use crate::model::{Model, OutputTransform};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaEvent, CudaGraph, CudaStream, DevicePtr};
use std::sync::Arc;

/// Models kept resident per backend by default (the config's
/// `cuda_models_max`); past it the least recently used model's weights are
/// freed, and uploaded again when it is next used.
pub const MODELS_MAX_DEFAULT: usize = 32;

/// cuBLAS workspace set on the handle, so a graph capture never allocates.
const BLAS_WORKSPACE_BYTES: usize = 8 << 20;

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

    pub(super) fn copies(self) -> usize {
        match self {
            Precision::Split => 2,
            Precision::Half => 1,
        }
    }
}

/// One batch slot of a model: where its rows and answer wait, and the
/// event recorded after its work.
pub(super) struct Staging {
    pub(super) input: Pinned,
    pub(super) output: Pinned,
    pub(super) done: CudaEvent,
    /// Computed on the host (CPU twin, empty batch): ready at once.
    pub(super) host_ready: bool,
}

/// What the launches need of a registered model.
#[derive(Clone, Copy)]
pub(super) struct Meta {
    pub(super) input_width: usize,
    pub(super) output_width: usize,
    pub(super) output: OutputTransform,
    pub(super) max_k: usize,
    pub(super) max_n: usize,
    pub(super) max_dim: usize,
    pub(super) degenerate: bool,
    pub(super) max_batch: usize,
}

impl Meta {
    pub(super) fn of(m: &Model) -> Meta {
        Meta {
            input_width: m.input_width,
            output_width: m.output_width,
            output: m.output,
            max_k: m.layers.iter().map(|l| l.in_dim).max().unwrap_or(0),
            max_n: m.layers.iter().map(|l| l.out_dim).max().unwrap_or(0),
            max_dim: max_dim(m),
            degenerate: degenerate(m),
            max_batch: m.batch.max_batch.max(1),
        }
    }
}

pub(super) struct CudaModel {
    /// For the CPU twin and for uploading again after an eviction; `None`
    /// only for the temporary registration of `run`.
    pub(super) model: Option<Arc<Model>>,
    pub(super) meta: Meta,
    /// Empty while evicted (or for a model the CPU twin runs).
    pub(super) layers: Vec<DeviceLayer>,
    pub(super) staging: [Staging; IN_FLIGHT_PER_MODEL],
    /// A captured graph per bucket of `plan::GRAPH_BUCKETS`.
    pub(super) graphs: [Option<CudaGraph>; GRAPH_BUCKETS.len()],
    pub(super) last_used: u64,
}

pub struct CudaBackend {
    pub(super) models: Registry<CudaModel>,
    pub(super) bufs: Buffers,
    pub(super) blas: CudaBlas,
    pub(super) kernels: Kernels,
    pub(super) stream: Arc<CudaStream>,
    pub(super) ctx: Arc<CudaContext>,
    /// Kept alive for the cuBLAS handle (`cublasSetWorkspace`).
    pub(super) _workspace: cudarc::driver::CudaSlice<u8>,
    /// Degenerate models (no layers) are handed to the CPU twin.
    pub(super) cpu: CpuBackend,
    pub(super) precision: Precision,
    /// Models whose weights stay resident (`with_models_max`).
    pub(super) models_max: usize,
    /// Replay captured graphs for small batches (`with_graphs`).
    pub(super) graphs: bool,
    pub(super) name: String,
    pub(super) device: String,
    pub(super) tick: u64,
    pub(super) last_error: Option<String>,
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
        // on `stream` alone, and the host reads a batch's output only after
        // its completion event fired, so the cross-stream event tracking
        // cudarc would otherwise record on every use (an event per buffer
        // per launch) is not needed. Only slices created after this call
        // are affected: all of ours.
        unsafe { ctx.disable_event_tracking() };
        let kernels = Kernels::load(&ctx, major, minor)?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| format!("cuBLAS: {e}"))?;
        let alloc_err = |e| format!("device allocation: {e}");
        let workspace = stream
            .alloc_zeros::<u8>(BLAS_WORKSPACE_BYTES)
            .map_err(alloc_err)?;
        {
            let (ws, _sync) = workspace.device_ptr(&stream);
            // SAFETY: the workspace lives as long as the handle (both are
            // fields of the backend) and is used only on its stream.
            unsafe {
                cudarc::cublas::sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    ws as *mut std::ffi::c_void,
                    BLAS_WORKSPACE_BYTES,
                )
            }
            .result()
            .map_err(|e| format!("cublasSetWorkspace: {e}"))?;
        }
        let bufs = Buffers {
            in32: stream.alloc_zeros::<f32>(1).map_err(alloc_err)?,
            x16: stream.alloc_zeros::<u16>(1).map_err(alloc_err)?,
            y32: stream.alloc_zeros::<f32>(1).map_err(alloc_err)?,
        };
        stream
            .synchronize()
            .map_err(|e| format!("synchronize: {e}"))?;
        Ok(CudaBackend {
            models: Registry::default(),
            bufs,
            blas,
            kernels,
            stream,
            ctx,
            _workspace: workspace,
            cpu: CpuBackend::new(),
            precision,
            models_max: MODELS_MAX_DEFAULT,
            graphs: true,
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

    /// Replay captured CUDA graphs for batches of ≤ 32 rows (default on;
    /// off: every batch launches its kernels one by one).
    pub fn with_graphs(mut self, on: bool) -> CudaBackend {
        self.graphs = on;
        self
    }

    pub(super) fn fail(&mut self, what: &str, e: impl std::fmt::Display) -> BackendError {
        self.last_error = Some(format!("{what}: {e}"));
        BackendError::Device
    }

    fn new_staging(&self, meta: &Meta) -> Result<Staging, String> {
        let rows = meta.max_batch;
        let pin = |len| Pinned::new(&self.ctx, len).map_err(|e| format!("pinned memory: {e}"));
        Ok(Staging {
            input: pin(rows * meta.input_width)?,
            output: pin(rows * meta.output_width)?,
            done: self
                .ctx
                .new_event(None)
                .map_err(|e| format!("event: {e}"))?,
            host_ready: false,
        })
    }

    /// Make `id`'s weights resident (uploading them from `model`, or from
    /// the registered copy after an eviction), evicting the least recently
    /// used other model's past `models_max`.
    pub(super) fn make_resident(
        &mut self,
        id: ModelId,
        model: Option<&Model>,
    ) -> Result<(), BackendError> {
        let kept = match self.models.get(id) {
            Some(m) if m.layers.is_empty() && !m.meta.degenerate => m.model.clone(),
            Some(_) => return Ok(()),
            None => return Err(BackendError::Unknown),
        };
        let Some(model) = model.or(kept.as_deref()) else {
            return Err(BackendError::Unknown);
        };
        let resident = self
            .models
            .iter_mut()
            .filter(|(_, m)| !m.layers.is_empty())
            .count();
        if resident >= self.models_max {
            let lru = self
                .models
                .iter_mut()
                .filter(|(other, m)| *other != id && !m.layers.is_empty())
                .min_by_key(|(_, m)| m.last_used)
                .map(|(other, _)| other);
            if let Some(m) = lru.and_then(|other| self.models.get_mut(other)) {
                // Freed in stream order: batches in flight still see them.
                m.layers.clear();
                m.graphs = Default::default();
            }
        }
        match upload(&self.stream, model, self.precision.copies()) {
            Ok(layers) => {
                if let Some(m) = self.models.get_mut(id) {
                    m.layers = layers;
                }
                Ok(())
            }
            Err(e) => Err(self.fail("uploading", e)),
        }
    }

    /// Grows the device buffers to hold `rows` rows of `model`; a no-op
    /// once a batch this large has been seen. Growing drops every captured
    /// graph (they name the old buffers).
    pub(super) fn reserve(&mut self, meta: &Meta, rows: usize) -> Result<(), BackendError> {
        let copies = self.precision.copies();
        let need_in = rows * meta.input_width;
        let need_x = rows * meta.max_k * copies;
        let need_y = rows * meta.max_n;
        if self.bufs.in32.len() >= need_in
            && self.bufs.x16.len() >= need_x
            && self.bufs.y32.len() >= need_y
        {
            return Ok(());
        }
        for (_, m) in self.models.iter_mut() {
            m.graphs = Default::default();
        }
        let s = &self.stream;
        let grown = (|| {
            if self.bufs.in32.len() < need_in {
                self.bufs.in32 = s.alloc_zeros::<f32>(need_in.next_power_of_two())?;
            }
            if self.bufs.x16.len() < need_x {
                self.bufs.x16 = s.alloc_zeros::<u16>(need_x.next_power_of_two())?;
            }
            if self.bufs.y32.len() < need_y {
                self.bufs.y32 = s.alloc_zeros::<f32>(need_y.next_power_of_two())?;
            }
            Ok(())
        })();
        grown.map_err(|e: cudarc::driver::DriverError| self.fail("allocating device buffers", e))
    }

    /// Register `model` (`keep`: the copy kept for eviction and the CPU
    /// twin; `None` for `run`'s temporary registration).
    pub(super) fn register_model(
        &mut self,
        model: &Model,
        keep: Option<Arc<Model>>,
    ) -> Result<ModelId, BackendError> {
        check_model(model, 1)?;
        let meta = Meta::of(model);
        let mut staging = Vec::with_capacity(IN_FLIGHT_PER_MODEL);
        for _ in 0..IN_FLIGHT_PER_MODEL {
            match self.new_staging(&meta) {
                Ok(s) => staging.push(s),
                Err(e) => return Err(self.fail("registering", e)),
            }
        }
        let Ok(staging) = <[Staging; IN_FLIGHT_PER_MODEL]>::try_from(staging) else {
            unreachable!("IN_FLIGHT_PER_MODEL stagings were made")
        };
        self.tick += 1;
        let id = self.models.insert(CudaModel {
            model: keep,
            meta,
            layers: Vec::new(),
            staging,
            graphs: Default::default(),
            last_used: self.tick,
        });
        if let Err(e) = self.make_resident(id, Some(model)) {
            self.models.remove(id);
            return Err(e);
        }
        Ok(id)
    }
}
