//! Backends: run a batch of rows through one model.
//!
//! Owns: the `Backend` trait, the CPU implementation (`cpu`: FP16 weights,
//! f32 accumulation, AVX2/FMA/F16C picked at run time with a portable
//! fallback), the CUDA one (`cuda`), a test-only CPU backend whose
//! completions arrive later (`delayed`), the in-flight ring the batcher
//! keeps (`pipeline`), the model table every backend keys by [`ModelId`]
//! (`registry`) and an f64 reference (`reference`) the tests check against.
//! Knows nothing of requests, sockets or ensembles: it sees rows.
//!
//! The server's path is asynchronous: models are registered once
//! ([`Backend::register`] gives a stable [`ModelId`]), a batch is
//! [`Backend::submit`]ted (the input is copied before it returns, so the
//! caller reuses its buffer at once) and its [`Ticket`] is
//! [`Backend::poll`]ed until the output is ready. The CPU computes in
//! `submit` (ready at the first poll); CUDA queues the copies and launches
//! and records an event that `poll` queries, so the shard's core keeps
//! reading sockets and answering while the GPU works. [`Backend::run`] is
//! the blocking, unregistered form for tools, tests and calibration.

pub mod cpu;
pub mod cuda;
pub mod delayed;
pub mod pipeline;
pub mod reference;
pub mod registry;

use crate::model::Model;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

pub use registry::{ModelId, Ticket};

/// Batches one registered model may have in flight at once (submitted,
/// not yet polled to completion): each has its own staging buffers, sized
/// at registration and reused. The batcher keeps at most this many.
pub const IN_FLIGHT_PER_MODEL: usize = 2;

/// Why a backend could not run a batch. Small and copyable: it becomes a
/// wire status (INTERNAL) and a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendError {
    /// Input or output slice does not match rows × width.
    Shape,
    /// The device failed (CUDA error, lost context).
    Device,
    /// The model id is not (or no longer) registered, or the ticket is not
    /// one of this backend's batches in flight.
    Unknown,
    /// The model already has [`IN_FLIGHT_PER_MODEL`] batches in flight.
    Busy,
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendError::Shape => f.write_str("batch shape does not match the model"),
            BackendError::Device => f.write_str("device error"),
            BackendError::Unknown => f.write_str("model or batch not registered"),
            BackendError::Busy => f.write_str("too many batches in flight"),
        }
    }
}

impl std::error::Error for BackendError {}

/// One backend instance per shard: `&mut self` so it owns its scratch
/// buffers and never allocates on the request path once warmed up.
pub trait Backend {
    /// Short name for logs and metrics ("cpu-avx2", "cpu-portable", "cuda").
    fn name(&self) -> &str;

    /// Make `model` known to the backend (CUDA uploads its weights here)
    /// and size its staging buffers for `model.batch.max_batch` rows.
    /// The id stays valid until [`Backend::unregister`]; ids are never
    /// addresses, and a freed id is not reused for another model while a
    /// stale copy of it could still be presented (generation counter).
    fn register(&mut self, model: &Arc<Model>) -> Result<ModelId, BackendError>;

    /// Forget a model (its device memory and staging buffers are freed,
    /// batches still in flight are abandoned). Unknown ids are ignored.
    fn unregister(&mut self, id: ModelId);

    /// Start a batch: `input` is `rows × input_width` f32, row-major, and is
    /// copied before this returns. Errors here are the batch's verdict.
    /// Allocates nothing once a batch this large has been seen.
    fn submit(&mut self, id: ModelId, input: &[f32], rows: usize) -> Result<Ticket, BackendError>;

    /// `Pending` while the batch computes; once ready, writes its
    /// `rows × output_width` f32 (after the output transform) into `output`
    /// and returns `Ready` — the ticket is spent then, whatever the verdict.
    fn poll(&mut self, ticket: Ticket, output: &mut [f32]) -> Poll<Result<(), BackendError>>;

    /// When a pending batch is expected to be ready, if the backend knows
    /// (the batcher sleeps until then instead of polling). `None`: poll
    /// again after letting other tasks run.
    fn ready_hint(&self, _ticket: Ticket) -> Option<Instant> {
        None
    }

    /// Blocking and unregistered: run `model` on `input` now.
    /// `input`: `rows × model.input_width` f32, row-major.
    /// `output`: `rows × model.output_width` f32, row-major, overwritten
    /// with the model's output (after its output transform). For tools,
    /// tests and calibration; the server uses register / submit / poll.
    fn run(
        &mut self,
        model: &Model,
        input: &[f32],
        rows: usize,
        output: &mut [f32],
    ) -> Result<(), BackendError>;
}

/// Submit a batch of a registered model and wait for it on this thread
/// (spinning with `yield_now`): warm-up and tests.
pub fn run_registered(
    backend: &mut dyn Backend,
    id: ModelId,
    input: &[f32],
    rows: usize,
    output: &mut [f32],
) -> Result<(), BackendError> {
    let t = backend.submit(id, input, rows)?;
    loop {
        if let Poll::Ready(r) = backend.poll(t, output) {
            return r;
        }
        std::thread::yield_now();
    }
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
    /// Test only (config `backend_test_delay_us`, docs/CUDA.md): when > 0
    /// the CPU backend is wrapped in [`delayed::Delayed`], whose batches
    /// complete this many µs after the previous one, like a device that
    /// computes while the shard's core goes on.
    pub test_delay_us: u64,
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
    if choice.test_delay_us > 0 {
        return Box::new(delayed::Delayed::new(
            cpu::CpuBackend::new(),
            std::time::Duration::from_micros(choice.test_delay_us),
        ));
    }
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
