//! CUDA backend: cuBLAS FP16 GEMMs with f32 accumulation plus small NVRTC
//! kernels (`kernels/mlp.cu`) for bias, layer norm, activations and the
//! output transform. See docs/CUDA.md.
//!
//! Owns: the device context, one stream, the cuBLAS handle, the compiled
//! kernels, the weights resident on the device, the activation buffers,
//! the pinned staging and completion events of batches in flight, and the
//! captured graphs. `plan.rs` (shape checks, graph buckets, ensemble
//! grouping) is plain Rust, built and tested without the feature.
//! May touch: the GPU and the caller's slices; nothing else.
//!
//! With the `cuda` feature this is the real backend (`device.rs`), loading
//! libcuda / libnvrtc / libcublas at run time, so the binary still starts on a
//! machine without them. Without the feature it is a stub whose `new` always
//! fails, so nothing outside `backend/` needs a `cfg`.

#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
mod gemm_ref;
#[cfg(feature = "cuda")]
mod kernels;
#[cfg(feature = "cuda")]
mod launch;
#[cfg(feature = "cuda")]
mod pinned;
pub mod plan;
#[cfg(feature = "cuda")]
mod resident;
#[cfg(feature = "cuda")]
mod submit;
#[cfg(feature = "cuda")]
pub use device::{CudaBackend, Precision, MODELS_MAX_DEFAULT};

#[cfg(not(feature = "cuda"))]
mod stub;
#[cfg(not(feature = "cuda"))]
pub use stub::{CudaBackend, Precision, MODELS_MAX_DEFAULT};
