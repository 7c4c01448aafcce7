//! CUDA backend: cuBLAS FP16 GEMMs with f32 accumulation plus small NVRTC
//! kernels (`kernels/mlp.cu`) for bias, layer norm, activations and the
//! output transform. See docs/CUDA.md.
//!
//! Owns: the device context, one stream, the cuBLAS handle, the compiled
//! kernels, the weights resident on the device and the activation buffers.
//! May touch: the GPU and the caller's slices; nothing else.
//!
//! With the `cuda` feature this is the real backend (`device.rs`), loading
//! libcuda / libnvrtc / libcublas at run time, so the binary still starts on a
//! machine without them. Without the feature it is a stub whose `new` always
//! fails, so nothing outside `backend/` needs a `cfg`.

#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
pub use device::{CudaBackend, Precision, MODELS_MAX_DEFAULT};

#[cfg(not(feature = "cuda"))]
mod stub;
#[cfg(not(feature = "cuda"))]
pub use stub::{CudaBackend, Precision, MODELS_MAX_DEFAULT};
