//! CPU backend: FP16 weights read in place from the model, f32 accumulation.
//!
//! Owns: the choice of kernel (picked once at construction by run-time CPU
//! feature detection), the scratch buffers (activations ping-pong between
//! layers and the packed f32 weight panel), shape checks, and the parts of a
//! layer every kernel shares (layer norm, activations, output transform).
//! May touch: nothing but the model it is given and the caller's slices.
//!
//! Kernels (one dense layer `y = x @ W + b`, relu/identity fused in the store):
//! - [`CpuKernel::Avx2`] (`cpu/avx2.rs`, x86_64 with AVX2+FMA+F16C): GEMV that
//!   streams FP16 rows of W through `vcvtph2ps` for 1–4 rows; for more rows a
//!   6×16 register-blocked GEMM, which for large batches
//!   converts each `KC × 16` block of W to f32 once into an L1-resident panel
//!   reused by every row block (details in `cpu/avx2.rs`).
//! - [`CpuKernel::Portable`] (`cpu/portable.rs`): plain Rust, correct on
//!   every target; also converts a block of W rows once per batch.
//!
//! AVX-512 is deliberately not used: the customers' machines (AMD Zen 3) do
//! not have it, so AVX2 is the path that is measured and tuned.
//!
//! GELU is the tanh approximation (PyTorch's `gelu(approximate="tanh")`):
//! `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`; `reference.rs` uses the same
//! formula in f64.

#[cfg(target_arch = "x86_64")]
mod avx2;
mod portable;
#[cfg(test)]
mod tests;

use super::registry::Registry;
use super::{Backend, BackendError, ModelId, Ticket, IN_FLIGHT_PER_MODEL};
use crate::model::{Activation, Dense, LayerNorm, Model, OutputTransform};
use std::sync::Arc;
use std::task::Poll;

/// Which dense-layer kernel a [`CpuBackend`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuKernel {
    /// AVX2 + FMA + F16C (x86_64 only, detected at run time).
    Avx2,
    /// Plain Rust, any target.
    Portable,
}

impl CpuKernel {
    /// The best kernel this CPU supports.
    pub fn detect() -> CpuKernel {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                return CpuKernel::Avx2;
            }
        }
        CpuKernel::Portable
    }

    fn name(self) -> &'static str {
        match self {
            CpuKernel::Avx2 => "cpu-avx2",
            CpuKernel::Portable => "cpu-portable",
        }
    }
}

pub struct CpuBackend {
    kern: Kernel,
    /// Registered models, each with its staging outputs (one per batch in
    /// flight): `submit` computes into one, `poll` copies it out.
    models: Registry<CpuModel>,
}

struct CpuModel {
    model: Arc<Model>,
    out: [Vec<f32>; IN_FLIGHT_PER_MODEL],
}

/// The kernel and its scratch buffers.
struct Kernel {
    kernel: CpuKernel,
    /// Activations ping-pong between layers: layer i writes `act[i % 2]`
    /// (the last layer writes the caller's output directly).
    act: [Vec<f32>; 2],
    /// Packed f32 copy of a block of W, rebuilt per layer and reused across
    /// the batch's rows. Sized by the kernel (`PANEL_LEN`, `portable::panel_len`).
    panel: Vec<f32>,
}

impl CpuBackend {
    /// Picks the best kernel the CPU supports (AVX2+FMA+F16C, else portable).
    pub fn new() -> Self {
        Self::with_kernel(CpuKernel::detect())
    }

    /// The portable kernel, whatever the CPU (tests compare it with the SIMD one).
    pub fn portable() -> Self {
        Self::with_kernel(CpuKernel::Portable)
    }

    /// The AVX2 kernel, or `None` where the CPU lacks AVX2, FMA or F16C.
    pub fn avx2() -> Option<Self> {
        (CpuKernel::detect() == CpuKernel::Avx2).then(|| Self::with_kernel(CpuKernel::Avx2))
    }

    fn with_kernel(kernel: CpuKernel) -> Self {
        CpuBackend {
            kern: Kernel {
                kernel,
                act: [Vec::new(), Vec::new()],
                panel: Vec::new(),
            },
            models: Registry::default(),
        }
    }

    pub fn kernel(&self) -> CpuKernel {
        self.kern.kernel
    }
}

impl Kernel {
    /// Grows the scratch buffers for `model` at `rows` rows; a no-op once a
    /// model this large has been seen, so the steady state allocates nothing.
    fn reserve(&mut self, model: &Model, rows: usize) {
        let hidden = model
            .layers
            .iter()
            .rev()
            .skip(1)
            .map(|l| l.out_dim)
            .max()
            .unwrap_or(0);
        let act_len = rows * hidden;
        for a in &mut self.act {
            if a.len() < act_len {
                a.resize(act_len, 0.0);
            }
        }
        let panel_len = model
            .layers
            .iter()
            .map(|l| match self.kernel {
                #[cfg(target_arch = "x86_64")]
                CpuKernel::Avx2 => avx2::PANEL_LEN,
                #[cfg(not(target_arch = "x86_64"))]
                CpuKernel::Avx2 => 0,
                CpuKernel::Portable => portable::panel_len(l.in_dim, l.out_dim),
            })
            .max()
            .unwrap_or(0);
        if self.panel.len() < panel_len {
            self.panel.resize(panel_len, 0.0);
        }
    }

    /// `y = x @ W + b` for one layer, relu fused when `relu`.
    fn dense(&mut self, x: &[f32], rows: usize, layer: &Dense, y: &mut [f32], relu: bool) {
        let w = layer.weight();
        match self.kernel {
            #[cfg(target_arch = "x86_64")]
            CpuKernel::Avx2 => {
                // SAFETY: `CpuKernel::Avx2` is only constructed after
                // `detect()` saw avx2, fma and f16c; `run` checked every
                // length (x: rows×in, W: in×out, bias: out, y: rows×out) and
                // `reserve` sized the panel to `avx2::PANEL_LEN`.
                unsafe {
                    avx2::dense(
                        x,
                        rows,
                        layer.in_dim,
                        w,
                        layer.out_dim,
                        &layer.bias,
                        y,
                        relu,
                        &mut self.panel,
                    )
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            CpuKernel::Avx2 => unreachable!("Avx2 kernel is never selected off x86_64"),
            CpuKernel::Portable => portable::dense(
                x,
                rows,
                layer.in_dim,
                w,
                layer.out_dim,
                &layer.bias,
                y,
                relu,
                &mut self.panel,
            ),
        }
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &str {
        self.kern.kernel.name()
    }

    fn register(&mut self, model: &Arc<Model>) -> Result<ModelId, BackendError> {
        let len = model.batch.max_batch * model.output_width;
        Ok(self.models.insert(CpuModel {
            model: model.clone(),
            out: std::array::from_fn(|_| vec![0.0; len]),
        }))
    }

    fn unregister(&mut self, id: ModelId) {
        self.models.remove(id);
    }

    /// Computes the batch now, into the ticket's staging output.
    fn submit(&mut self, id: ModelId, input: &[f32], rows: usize) -> Result<Ticket, BackendError> {
        let t = self.models.acquire(id, rows)?;
        let m = self.models.get_mut(id).ok_or(BackendError::Unknown)?;
        let out = &mut m.out[t.slot()];
        let need = rows.saturating_mul(m.model.output_width);
        if out.len() < need {
            // A batch larger than any before (one job over max_batch).
            out.resize(need, 0.0);
        }
        match self.kern.forward(&m.model, input, rows, &mut out[..need]) {
            Ok(()) => Ok(t),
            Err(e) => {
                self.models.release(t);
                Err(e)
            }
        }
    }

    fn poll(&mut self, t: Ticket, output: &mut [f32]) -> Poll<Result<(), BackendError>> {
        let r = (|| {
            let rows = self.models.rows(t)?;
            let m = self.models.get(t.model).ok_or(BackendError::Unknown)?;
            let need = rows * m.model.output_width;
            if output.len() != need {
                return Err(BackendError::Shape);
            }
            output.copy_from_slice(&m.out[t.slot()][..need]);
            Ok(())
        })();
        self.models.release(t);
        Poll::Ready(r)
    }

    fn run(
        &mut self,
        model: &Model,
        input: &[f32],
        rows: usize,
        output: &mut [f32],
    ) -> Result<(), BackendError> {
        self.kern.forward(model, input, rows, output)
    }
}

impl Kernel {
    fn forward(
        &mut self,
        model: &Model,
        input: &[f32],
        rows: usize,
        output: &mut [f32],
    ) -> Result<(), BackendError> {
        check_shapes(model, input, rows, output)?;
        if rows == 0 {
            return Ok(());
        }
        let n_out = model.output_width;
        if model.layers.is_empty() {
            // check_shapes guaranteed input_width == output_width.
            output.copy_from_slice(input);
            output_transform(output, n_out, model.output);
            return Ok(());
        }
        self.reserve(model, rows);
        let last = model.layers.len() - 1;
        // Moved out for the loop so `self.dense` can borrow the panel mutably.
        let [mut a0, mut a1] = std::mem::take(&mut self.act);
        for (i, layer) in model.layers.iter().enumerate() {
            let (k, n) = (layer.in_dim, layer.out_dim);
            let (prev, next) = if i % 2 == 1 {
                (&a0[..], &mut a1[..])
            } else {
                (&a1[..], &mut a0[..])
            };
            let x: &[f32] = if i == 0 { input } else { &prev[..rows * k] };
            let y: &mut [f32] = if i == last {
                &mut *output
            } else {
                &mut next[..rows * n]
            };
            let fused = layer.layer_norm.is_none()
                && matches!(layer.activation, Activation::Relu | Activation::Identity);
            let relu = fused && layer.activation == Activation::Relu;
            self.dense(x, rows, layer, y, relu);
            if !fused {
                row_epilogue(
                    self.kernel,
                    y,
                    n,
                    layer.layer_norm.as_ref(),
                    layer.activation,
                );
            }
        }
        self.act = [a0, a1];
        output_transform(output, n_out, model.output);
        Ok(())
    }
}

/// Every length the kernels rely on, checked once per batch (O(layers)).
fn check_shapes(
    model: &Model,
    input: &[f32],
    rows: usize,
    output: &[f32],
) -> Result<(), BackendError> {
    let in_len = rows.checked_mul(model.input_width);
    let out_len = rows.checked_mul(model.output_width);
    if in_len != Some(input.len()) || out_len != Some(output.len()) {
        return Err(BackendError::Shape);
    }
    let mut width = model.input_width;
    for l in &model.layers {
        let ln_ok = l
            .layer_norm
            .as_ref()
            .is_none_or(|ln| ln.gamma.len() == l.out_dim && ln.beta.len() == l.out_dim);
        if l.in_dim != width
            || l.in_dim.checked_mul(l.out_dim) != Some(l.weight().len())
            || l.bias.len() != l.out_dim
            || !ln_ok
            || rows.checked_mul(l.in_dim.max(l.out_dim)).is_none()
        {
            return Err(BackendError::Shape);
        }
        width = l.out_dim;
    }
    if width != model.output_width {
        return Err(BackendError::Shape);
    }
    Ok(())
}

/// Layer norm and the activations the kernels do not fuse, one row at a time.
fn row_epilogue(
    kernel: CpuKernel,
    y: &mut [f32],
    n: usize,
    ln: Option<&LayerNorm>,
    act: Activation,
) {
    if n == 0 {
        return;
    }
    for row in y.chunks_exact_mut(n) {
        if let Some(ln) = ln {
            layer_norm(row, ln);
        }
        #[cfg(target_arch = "x86_64")]
        if kernel == CpuKernel::Avx2 {
            // SAFETY: `CpuKernel::Avx2` exists only where avx2+fma+f16c were detected.
            unsafe { avx2::activate(row, act) };
            continue;
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = kernel;
        match act {
            Activation::Identity => {}
            Activation::Relu => row.iter_mut().for_each(|v| *v = v.max(0.0)),
            Activation::Gelu => row.iter_mut().for_each(|v| *v = gelu_tanh(*v)),
            Activation::Tanh => row.iter_mut().for_each(|v| *v = v.tanh()),
            Activation::Sigmoid => row.iter_mut().for_each(|v| *v = sigmoid(*v)),
        }
    }
}

/// Two-pass mean and biased variance (more accurate than E[x²]−E[x]², and
/// the row is in L1 anyway).
fn layer_norm(row: &mut [f32], ln: &LayerNorm) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    let inv = 1.0 / (var + ln.eps).sqrt();
    for ((v, g), b) in row.iter_mut().zip(&ln.gamma).zip(&ln.beta) {
        *v = (*v - mean) * inv * g + b;
    }
}

/// √(2/π), the constant of the tanh form of GELU.
pub(crate) const GELU_SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
/// Cubic coefficient of the tanh form of GELU.
pub(crate) const GELU_CUBIC: f64 = 0.044_715;

#[inline]
fn gelu_tanh(x: f32) -> f32 {
    let (c, a) = (GELU_SQRT_2_OVER_PI as f32, GELU_CUBIC as f32);
    0.5 * x * (1.0 + (c * (x + a * x * x * x)).tanh())
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn output_transform(out: &mut [f32], n: usize, t: OutputTransform) {
    if n == 0 {
        return;
    }
    match t {
        OutputTransform::Identity => {}
        OutputTransform::Sigmoid => out.iter_mut().for_each(|v| *v = sigmoid(*v)),
        OutputTransform::Softmax => {
            for row in out.chunks_exact_mut(n) {
                // Subtracting the max keeps exp() from overflowing.
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for v in row.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|v| *v *= inv);
            }
        }
    }
}
