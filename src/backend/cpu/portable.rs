//! Portable dense kernel: plain Rust, correct on every target.
//!
//! A block of W rows is converted FP16→f32 into the panel once and then used
//! for every row of the batch, so the (possibly software) conversion is
//! amortised; the inner loop is an axpy the compiler vectorises with
//! whatever the baseline target offers.

use half::f16;
use half::slice::HalfFloatSliceExt;

/// Bytes of f32 panel the block of W rows aims to fit in (half of a typical L1d).
const PANEL_BYTES: usize = 16 * 1024;

/// W rows converted per block for a layer `out_dim` wide.
fn block_rows(in_dim: usize, out_dim: usize) -> usize {
    (PANEL_BYTES / 4 / out_dim.max(1)).clamp(1, in_dim.max(1))
}

/// Panel length (f32 elements) a layer needs.
pub(super) fn panel_len(in_dim: usize, out_dim: usize) -> usize {
    block_rows(in_dim, out_dim) * out_dim
}

/// `y[rows×n] = x[rows×k] @ W[k×n] + bias`, then `max(0, ·)` when `relu`.
/// Lengths were checked by the caller; `panel` holds at least `panel_len(k, n)`.
#[allow(clippy::too_many_arguments)]
pub(super) fn dense(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f16],
    n: usize,
    bias: &[f32],
    y: &mut [f32],
    relu: bool,
    panel: &mut [f32],
) {
    if n == 0 {
        return;
    }
    for yr in y[..rows * n].chunks_exact_mut(n) {
        yr.copy_from_slice(bias);
    }
    let kc_max = block_rows(k, n);
    let mut kb = 0;
    while kb < k {
        let kc = kc_max.min(k - kb);
        let p = &mut panel[..kc * n];
        w[kb * n..(kb + kc) * n].convert_to_f32_slice(p);
        for (r, yr) in y[..rows * n].chunks_exact_mut(n).enumerate() {
            let xr = &x[r * k + kb..r * k + kb + kc];
            for (&xv, wr) in xr.iter().zip(p.chunks_exact(n)) {
                for (yv, &wv) in yr.iter_mut().zip(wr) {
                    *yv += xv * wv;
                }
            }
        }
        kb += kc;
    }
    if relu {
        y[..rows * n].iter_mut().for_each(|v| *v = v.max(0.0));
    }
}
