//! AVX2 + FMA + F16C dense kernel (x86_64).
//!
//! - 1..=`GEMV_ROWS_MAX` rows: memory-bound GEMV. Each W row is read once,
//!   converted with `vcvtph2ps` straight from memory and FMA'd into a block
//!   of accumulators (rows × column chunk) that stays in registers for the
//!   whole k loop.
//! - more rows: GEMM. For each `KC`-deep block and each 16-column strip,
//!   every row block (≤ 6 rows, sizes balanced) runs a 6×16 register
//!   microkernel (12 ymm accumulators, 2 W loads and 6 broadcasts of x per
//!   12 FMAs) over the strip. Up to `DIRECT_W_ROWS_MAX` rows the
//!   microkernel converts the FP16 W itself (`vcvtph2ps` from memory);
//!   beyond, the strip's block of W is converted once into a `KC × 16` f32
//!   panel (16 KiB, L1-resident) that every row block reuses, amortising the
//!   conversion over the batch.
//!
//! Bias is loaded into the accumulators at the first k block; relu is
//! applied in the store of the last.
//!
//! # Safety (whole module)
//! Every function here needs AVX2, FMA and F16C at run time (the caller
//! checked them) and the lengths `run` checked: `x.len() >= rows*k`,
//! `w.len() == k*n`, `bias.len() == n`, `y.len() >= rows*n`,
//! `panel.len() >= PANEL_LEN`.

use half::f16;
use std::arch::x86_64::*;

/// Rows of the GEMM microkernel.
const MR: usize = 6;
/// Columns of the GEMM microkernel (two ymm).
const NR: usize = 16;
/// Depth of a packed panel: `KC × NR × 4` bytes = 16 KiB, half of Zen 3's L1d.
const KC: usize = 256;
/// f32 elements of scratch the GEMM needs: one W panel (`KC × NR`).
pub(super) const PANEL_LEN: usize = KC * NR;
/// Up to this many rows the GEMV path (no packing) is faster.
const GEMV_ROWS_MAX: usize = 4;

/// `y[rows×n] = x[rows×k] @ W[k×n] + bias`, then `max(0, ·)` when `relu`.
///
/// # Safety
/// See the module doc: AVX2+FMA+F16C present, lengths checked.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dense(
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
    debug_assert!(x.len() >= rows * k && w.len() == k * n && bias.len() == n);
    debug_assert!(y.len() >= rows * n && panel.len() >= PANEL_LEN);
    if n == 0 || rows == 0 {
        return;
    }
    if k == 0 {
        for yr in y[..rows * n].chunks_exact_mut(n) {
            for (v, &b) in yr.iter_mut().zip(bias) {
                *v = if relu { b.max(0.0) } else { b };
            }
        }
        return;
    }
    let (xp, wp, bp, yp) = (
        x.as_ptr(),
        w.as_ptr() as *const u16,
        bias.as_ptr(),
        y.as_mut_ptr(),
    );
    // SAFETY: module contract (features present, lengths checked above).
    unsafe {
        if rows <= GEMV_ROWS_MAX {
            gemv_rows(xp, rows, k, wp, n, bp, yp, relu);
        } else {
            gemm(xp, rows, k, wp, n, bp, yp, relu, panel.as_mut_ptr());
        }
    }
}

// ---------------------------------------------------------------- GEMV

/// All columns of `rows` (1..=4) rows.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_rows(
    x: *const f32,
    rows: usize,
    k: usize,
    w: *const u16,
    n: usize,
    bias: *const f32,
    y: *mut f32,
    relu: bool,
) {
    // Chunk widths keep accumulators + the converted W vectors + one
    // broadcast well within the 16 ymm registers (3×4 and 4×3 spilled).
    // SAFETY: module contract; each call stays within columns < n.
    unsafe {
        match rows {
            1 => gemv_cols::<1, 8>(x, k, w, n, bias, y, relu),
            2 => gemv_cols::<2, 4>(x, k, w, n, bias, y, relu),
            3 => gemv_cols::<3, 3>(x, k, w, n, bias, y, relu),
            _ => gemv_cols::<4, 2>(x, k, w, n, bias, y, relu),
        }
    }
}

/// Walks the columns in chunks of `8*NV`, then of 8, then the scalar tail.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_cols<const M: usize, const NV: usize>(
    x: *const f32,
    k: usize,
    w: *const u16,
    n: usize,
    bias: *const f32,
    y: *mut f32,
    relu: bool,
) {
    let mut j = 0;
    // SAFETY: every chunk [j, j + width) lies within [0, n).
    unsafe {
        while j + 8 * NV <= n {
            gemv_chunk::<M, NV>(x, k, w, n, j, bias, y, relu);
            j += 8 * NV;
        }
        while j + 8 <= n {
            gemv_chunk::<M, 1>(x, k, w, n, j, bias, y, relu);
            j += 8;
        }
        while j < n {
            for r in 0..M {
                let mut acc = *bias.add(j);
                for p in 0..k {
                    acc += *x.add(r * k + p) * f16::from_bits(*w.add(p * n + j)).to_f32();
                }
                *y.add(r * n + j) = if relu { acc.max(0.0) } else { acc };
            }
            j += 1;
        }
    }
}

/// Columns `j .. j + 8*NV` of `M` rows: accumulators stay in registers for
/// the whole k loop; W is converted straight from memory.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_chunk<const M: usize, const NV: usize>(
    x: *const f32,
    k: usize,
    w: *const u16,
    n: usize,
    j: usize,
    bias: *const f32,
    y: *mut f32,
    relu: bool,
) {
    // SAFETY: j + 8*NV <= n, p < k, r < M <= rows (module contract).
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); NV]; M];
        for row in acc.iter_mut() {
            for (v, a) in row.iter_mut().enumerate() {
                *a = _mm256_loadu_ps(bias.add(j + 8 * v));
            }
        }
        for p in 0..k {
            let wrow = w.add(p * n + j);
            let mut wv = [_mm256_setzero_ps(); NV];
            for (v, wv) in wv.iter_mut().enumerate() {
                *wv = _mm256_cvtph_ps(_mm_loadu_si128(wrow.add(8 * v) as *const __m128i));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let xv = _mm256_broadcast_ss(&*x.add(r * k + p));
                for (a, &wv) in row.iter_mut().zip(&wv) {
                    *a = _mm256_fmadd_ps(xv, wv, *a);
                }
            }
        }
        let zero = _mm256_setzero_ps();
        for (r, row) in acc.iter().enumerate() {
            for (v, &a) in row.iter().enumerate() {
                let a = if relu { _mm256_max_ps(a, zero) } else { a };
                _mm256_storeu_ps(y.add(r * n + j + 8 * v), a);
            }
        }
    }
}

// ---------------------------------------------------------------- GEMM

/// Up to this many rows the GEMM converts W inside the microkernel instead
/// of packing it into an f32 panel: `vcvtph2ps` from memory runs beside the
/// FMAs, so converting a strip once per row block costs less than the
/// panel's stores and reloads until there are many row blocks. Measured on
/// bench_ens: direct wins clearly at 8 and 32 rows, the two tie at 128.
const DIRECT_W_ROWS_MAX: usize = 6 * MR;

/// Rows of the `i`-th of `blocks` row blocks, sizes as even as possible
/// (8 rows → 4 + 4, not 6 + 2: a 2-row block wastes most of the FMA slots).
#[inline]
fn block_rows(rows: usize, blocks: usize, i: usize) -> usize {
    rows / blocks + usize::from(i < rows % blocks)
}

/// Where a microkernel reads its operands.
#[derive(Clone, Copy)]
struct Operands {
    /// x element (r, p) of the row block is at `a + r*lda + p`.
    a: *const f32,
    lda: usize,
    /// W: an f32 panel `[kc][NR]` (`half == false`), or FP16 rows of W with
    /// stride `ldb` converted on the fly (`half == true`).
    b: *const u8,
    ldb: usize,
    half: bool,
}

/// Loop nest: for each `KC`-deep block (the batch's slice of x then stays
/// in L2 across all column strips), for each 16-column strip, convert the
/// FP16 block of W into an L1 panel (or, for small batches, let the
/// microkernel convert it) and run every row block over it. x is read in
/// place: packing it into a contiguous stream measured ~2% slower, its
/// copy costing more than the six row streams do.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm(
    x: *const f32,
    rows: usize,
    k: usize,
    w: *const u16,
    n: usize,
    bias: *const f32,
    y: *mut f32,
    relu: bool,
    panel: *mut f32,
) {
    let blocks = rows.div_ceil(MR);
    let direct_w = rows <= DIRECT_W_ROWS_MAX;
    let wpanel = panel;
    // SAFETY: module contract; the panel holds KC*NR f32; jb < n, kb < k,
    // row blocks partition 0..rows.
    unsafe {
        let mut kb = 0;
        while kb < k {
            let kc = KC.min(k - kb);
            let first = kb == 0;
            let last = kb + kc == k;
            let mut jb = 0;
            while jb < n {
                let nc = NR.min(n - jb);
                let (b, ldb, half) = if direct_w && nc == NR {
                    (w.add(kb * n + jb) as *const u8, n, true)
                } else {
                    pack(w, n, kb, kc, jb, nc, wpanel);
                    (wpanel as *const u8, NR, false)
                };
                let mut ib = 0;
                for bi in 0..blocks {
                    let mr = block_rows(rows, blocks, bi);
                    let ops = Operands {
                        a: x.add(ib * k + kb),
                        lda: k,
                        b,
                        ldb,
                        half,
                    };
                    tile(
                        mr,
                        kc,
                        ops,
                        y.add(ib * n + jb),
                        n,
                        nc,
                        first.then(|| bias.add(jb)),
                        relu && last,
                    );
                    ib += mr;
                }
                jb += NR;
            }
            kb += kc;
        }
    }
}

/// Converts `W[kb..kb+kc, jb..jb+nc]` into `panel[kc × NR]`, zero-padding
/// columns past `nc` so the microkernel never needs a column mask.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pack(
    w: *const u16,
    n: usize,
    kb: usize,
    kc: usize,
    jb: usize,
    nc: usize,
    panel: *mut f32,
) {
    // SAFETY: rows kb..kb+kc < k and columns jb..jb+nc <= n of W; panel
    // holds KC*NR >= kc*NR.
    unsafe {
        if nc == NR {
            for p in 0..kc {
                let src = w.add((kb + p) * n + jb);
                let lo = _mm256_cvtph_ps(_mm_loadu_si128(src as *const __m128i));
                let hi = _mm256_cvtph_ps(_mm_loadu_si128(src.add(8) as *const __m128i));
                _mm256_storeu_ps(panel.add(p * NR), lo);
                _mm256_storeu_ps(panel.add(p * NR + 8), hi);
            }
        } else {
            for p in 0..kc {
                let src = w.add((kb + p) * n + jb);
                let mut tmp = [0u16; NR];
                std::ptr::copy_nonoverlapping(src, tmp.as_mut_ptr(), nc);
                let lo = _mm256_cvtph_ps(_mm_loadu_si128(tmp.as_ptr() as *const __m128i));
                let hi = _mm256_cvtph_ps(_mm_loadu_si128(tmp.as_ptr().add(8) as *const __m128i));
                _mm256_storeu_ps(panel.add(p * NR), lo);
                _mm256_storeu_ps(panel.add(p * NR + 8), hi);
            }
        }
    }
}

/// One `mr × nc` tile of y. Full-width tiles run in place; a narrow last
/// strip goes through a padded copy so the microkernel is always 16 wide
/// (its W operand is then always a padded panel, never direct FP16).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile(
    mr: usize,
    kc: usize,
    ops: Operands,
    c: *mut f32,
    ldc: usize,
    nc: usize,
    bias: Option<*const f32>,
    relu: bool,
) {
    // SAFETY: c addresses mr rows × nc columns of y; `ops` addresses mr
    // rows × kc of x and kc rows × NR of W (see `gemm`).
    unsafe {
        if nc == NR {
            micro_dispatch(mr, kc, ops, c, ldc, bias.unwrap_or(std::ptr::null()), relu);
            return;
        }
        let mut ct = [0f32; MR * NR];
        let mut bt = [0f32; NR];
        match bias {
            Some(bp) => std::ptr::copy_nonoverlapping(bp, bt.as_mut_ptr(), nc),
            None => {
                for r in 0..mr {
                    std::ptr::copy_nonoverlapping(c.add(r * ldc), ct.as_mut_ptr().add(r * NR), nc);
                }
            }
        }
        let bt_ptr = if bias.is_some() {
            bt.as_ptr()
        } else {
            std::ptr::null()
        };
        micro_dispatch(mr, kc, ops, ct.as_mut_ptr(), NR, bt_ptr, relu);
        for r in 0..mr {
            std::ptr::copy_nonoverlapping(ct.as_ptr().add(r * NR), c.add(r * ldc), nc);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn micro_dispatch(
    mr: usize,
    kc: usize,
    ops: Operands,
    c: *mut f32,
    ldc: usize,
    bias: *const f32,
    relu: bool,
) {
    // SAFETY: forwarded contract of `tile`.
    unsafe {
        match (mr, ops.half) {
            (6, false) => micro::<6, false>(kc, ops, c, ldc, bias, relu),
            (5, false) => micro::<5, false>(kc, ops, c, ldc, bias, relu),
            (4, false) => micro::<4, false>(kc, ops, c, ldc, bias, relu),
            (3, false) => micro::<3, false>(kc, ops, c, ldc, bias, relu),
            (2, false) => micro::<2, false>(kc, ops, c, ldc, bias, relu),
            (_, false) => micro::<1, false>(kc, ops, c, ldc, bias, relu),
            (6, true) => micro::<6, true>(kc, ops, c, ldc, bias, relu),
            (5, true) => micro::<5, true>(kc, ops, c, ldc, bias, relu),
            (4, true) => micro::<4, true>(kc, ops, c, ldc, bias, relu),
            (3, true) => micro::<3, true>(kc, ops, c, ldc, bias, relu),
            (2, true) => micro::<2, true>(kc, ops, c, ldc, bias, relu),
            (_, true) => micro::<1, true>(kc, ops, c, ldc, bias, relu),
        }
    }
}

/// `M × 16` register-blocked microkernel: `c = (bias or c) + a @ b`.
/// `bias` null means accumulate onto `c` (a later k block). `HALF`: b is
/// FP16 rows of W (stride `ldb`), converted here with `vcvtph2ps`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn micro<const M: usize, const HALF: bool>(
    kc: usize,
    ops: Operands,
    c: *mut f32,
    ldc: usize,
    bias: *const f32,
    relu: bool,
) {
    // SAFETY: a: M rows × kc of x at the strides of `ops`; b: kc rows × 16
    // (f32 panel or FP16 rows of W); c: M rows (stride ldc) × 16; bias (if
    // not null): 16.
    unsafe {
        let mut c0 = [_mm256_setzero_ps(); M];
        let mut c1 = [_mm256_setzero_ps(); M];
        if bias.is_null() {
            for r in 0..M {
                c0[r] = _mm256_loadu_ps(c.add(r * ldc));
                c1[r] = _mm256_loadu_ps(c.add(r * ldc + 8));
            }
        } else {
            let (b0, b1) = (_mm256_loadu_ps(bias), _mm256_loadu_ps(bias.add(8)));
            c0 = [b0; M];
            c1 = [b1; M];
        }
        let mut ar = [std::ptr::null::<f32>(); M];
        for (r, ar) in ar.iter_mut().enumerate() {
            *ar = ops.a.add(r * ops.lda);
        }
        // One k step: two W vectors, M broadcasts, 2·M FMAs.
        let step = |p: usize, c0: &mut [__m256; M], c1: &mut [__m256; M]| {
            let (w0, w1) = if HALF {
                let bp = (ops.b as *const u16).add(p * ops.ldb);
                (
                    _mm256_cvtph_ps(_mm_loadu_si128(bp as *const __m128i)),
                    _mm256_cvtph_ps(_mm_loadu_si128(bp.add(8) as *const __m128i)),
                )
            } else {
                let bp = (ops.b as *const f32).add(p * NR);
                (_mm256_loadu_ps(bp), _mm256_loadu_ps(bp.add(8)))
            };
            for r in 0..M {
                let av = _mm256_broadcast_ss(&*ar[r].add(p));
                c0[r] = _mm256_fmadd_ps(av, w0, c0[r]);
                c1[r] = _mm256_fmadd_ps(av, w1, c1[r]);
            }
        };
        // (Unrolling this loop by 4 measured no faster with the f32 panel,
        // and made LLVM spill accumulators in the FP16 variant.)
        for p in 0..kc {
            step(p, &mut c0, &mut c1);
        }
        if relu {
            let zero = _mm256_setzero_ps();
            for r in 0..M {
                c0[r] = _mm256_max_ps(c0[r], zero);
                c1[r] = _mm256_max_ps(c1[r], zero);
            }
        }
        for r in 0..M {
            _mm256_storeu_ps(c.add(r * ldc), c0[r]);
            _mm256_storeu_ps(c.add(r * ldc + 8), c1[r]);
        }
    }
}

// ---------------------------------------------------------- activations

/// GELU (tanh form), tanh or sigmoid over `v` in place, 8 lanes at a time
/// through `exp_ps`; the same formulas as the scalar path (`cpu.rs`).
/// Identity and relu are fused into the GEMM store and never come here.
///
/// # Safety
/// AVX2 + FMA present.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn activate(v: &mut [f32], act: crate::model::Activation) {
    use crate::model::Activation;
    let one = _mm256_set1_ps(1.0);
    let two = _mm256_set1_ps(2.0);
    // tanh(t) = 1 − 2/(e^{2t} + 1): exact limits ±1, no overflow (exp_ps clamps).
    let tanh = |t: __m256| -> __m256 {
        // SAFETY: AVX2 + FMA present (this function's contract).
        let e = unsafe { exp_ps(_mm256_mul_ps(two, t)) };
        _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(e, one)))
    };
    let f = |x: __m256| -> __m256 {
        match act {
            Activation::Gelu => {
                let c = _mm256_set1_ps(super::GELU_SQRT_2_OVER_PI as f32);
                let a = _mm256_set1_ps(super::GELU_CUBIC as f32);
                let x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
                let t = tanh(_mm256_mul_ps(c, _mm256_fmadd_ps(a, x3, x)));
                _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5), x), _mm256_add_ps(one, t))
            }
            Activation::Tanh => tanh(x),
            Activation::Sigmoid => {
                // SAFETY: AVX2 + FMA present (this function's contract).
                let e = unsafe { exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), x)) };
                _mm256_div_ps(one, _mm256_add_ps(one, e))
            }
            Activation::Identity => x,
            Activation::Relu => _mm256_max_ps(x, _mm256_setzero_ps()),
        }
    };
    let mut chunks = v.chunks_exact_mut(8);
    for c in &mut chunks {
        // SAFETY: `c` is exactly 8 f32.
        unsafe { _mm256_storeu_ps(c.as_mut_ptr(), f(_mm256_loadu_ps(c.as_ptr()))) };
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let mut buf = [0f32; 8];
        buf[..tail.len()].copy_from_slice(tail);
        // SAFETY: `buf` is 8 f32.
        unsafe { _mm256_storeu_ps(buf.as_mut_ptr(), f(_mm256_loadu_ps(buf.as_ptr()))) };
        tail.copy_from_slice(&buf[..tail.len()]);
    }
}

/// e^x, 8 lanes (Cephes `expf`: range reduction by ln 2, degree-5
/// polynomial; relative error ~2e-7 — far inside the tests' tolerance).
/// Inputs are clamped to ±88.376 so the result stays finite (e^88 ≈ 1.6e38).
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_ps(x: __m256) -> __m256 {
    let x = _mm256_min_ps(
        _mm256_set1_ps(88.376_26),
        _mm256_max_ps(_mm256_set1_ps(-88.376_26), x),
    );
    // n = round(x / ln 2); r = x − n·ln 2 (ln 2 split in two for precision).
    let fx = _mm256_floor_ps(_mm256_fmadd_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
        _mm256_set1_ps(0.5),
    ));
    let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    }
    let y = _mm256_add_ps(
        _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r),
        _mm256_set1_ps(1.0),
    );
    // 2^n from the exponent bits; n is in [-127, 128] after the clamp.
    let n = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
    let pow2n = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(n));
    _mm256_mul_ps(y, pow2n)
}
