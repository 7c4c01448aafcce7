//! The cuBLAS-only reference the device check compares the backend with:
//! the models' GEMMs alone, FP16 × FP16 → f32 (`CUBLAS_COMPUTE_32F`), at
//! the backend's shapes in `half` precision (K not doubled), with no input
//! conversion, epilogue, copies or events — an upper bound for the
//! backend's rows/s on the same models.

use super::device::CudaBackend;
use crate::model::Model;
use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use std::ffi::c_void;
use std::time::{Duration, Instant};

impl CudaBackend {
    /// Rows/s of `models` (a row goes through every model) when only their
    /// GEMMs run, `rows` rows a batch, looped for about `secs` seconds on
    /// this backend's stream and handle (synchronised every 16 rounds).
    pub fn gemm_only_rows_per_s(
        &mut self,
        models: &[&Model],
        rows: usize,
        secs: f64,
    ) -> Result<f64, String> {
        fn e(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> String {
            move |err| format!("{what}: {err}")
        }
        let stream = self.stream.clone();
        let mut layers: Vec<(usize, usize, CudaSlice<u16>)> = Vec::new();
        let (mut max_k, mut max_n) = (1, 1);
        for m in models {
            for l in &m.layers {
                let w = stream
                    .alloc_zeros::<u16>((l.in_dim * l.out_dim).max(1))
                    .map_err(e("weights"))?;
                layers.push((l.in_dim, l.out_dim, w));
                max_k = max_k.max(l.in_dim);
                max_n = max_n.max(l.out_dim);
            }
        }
        let x = stream
            .alloc_zeros::<u16>(rows * max_k)
            .map_err(e("input"))?;
        let mut y = stream
            .alloc_zeros::<f32>(rows * max_n)
            .map_err(e("output"))?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let round = |y: &mut CudaSlice<f32>| -> Result<(), String> {
            for (k, n, w) in &layers {
                let (w_ptr, _a) = w.device_ptr(&stream);
                let (x_ptr, _b) = x.device_ptr(&stream);
                let (y_ptr, _c) = y.device_ptr_mut(&stream);
                // SAFETY: w holds k·n FP16, x ≥ rows·k, y ≥ rows·n; the
                // layout is the backend's (launch.rs); scalars are host f32.
                unsafe {
                    blas::gemm_ex(
                        *self.blas.handle(),
                        blas_sys::cublasOperation_t::CUBLAS_OP_N,
                        blas_sys::cublasOperation_t::CUBLAS_OP_N,
                        *n as i32,
                        rows as i32,
                        *k as i32,
                        &alpha as *const f32 as *const c_void,
                        w_ptr as *const c_void,
                        blas_sys::cudaDataType::CUDA_R_16F,
                        *n as i32,
                        x_ptr as *const c_void,
                        blas_sys::cudaDataType::CUDA_R_16F,
                        *k as i32,
                        &beta as *const f32 as *const c_void,
                        y_ptr as *mut c_void,
                        blas_sys::cudaDataType::CUDA_R_32F,
                        *n as i32,
                        blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                }
                .map_err(|err| format!("cublasGemmEx {k}x{n}: {err}"))?;
            }
            Ok(())
        };
        for _ in 0..8 {
            round(&mut y)?;
        }
        stream.synchronize().map_err(e("synchronize"))?;
        let start = Instant::now();
        let mut rounds = 0u64;
        while rounds == 0 || start.elapsed() < Duration::from_secs_f64(secs) {
            for _ in 0..16 {
                round(&mut y)?;
            }
            stream.synchronize().map_err(e("synchronize"))?;
            rounds += 16;
        }
        Ok((rounds * rows as u64) as f64 / start.elapsed().as_secs_f64())
    }
}
