//! CPU backend against the f64 reference, both kernels, seeded.
//!
//! Tolerance: `|cpu - ref| <= 2e-3 + 1e-3 * |ref|`. Weights are FP16 values,
//! exact in f32 and f64, so the only difference is f32 rounding in the
//! accumulations (and in exp/tanh). A k-term f32 dot product is off by at
//! most about k·2⁻²⁴·Σ|xᵢwᵢ| (≈ 6e-5·Σ|xᵢwᵢ| at k = 1024, typically √k times
//! less); with O(1) activations and Σ|xᵢwᵢ| up to ~10 that stays below 1e-3
//! per layer, and layer norm's 1/σ and a few stacked layers can grow it a
//! little. A real bug (a wrong index, a missed remainder, a lost k block)
//! is off by O(0.1) or more, far outside this band.

use super::{CpuBackend, CpuKernel};
use crate::backend::reference::forward_f64;
use crate::backend::{Backend, BackendError};
use crate::model::{Activation, Model, OutputTransform};
use rand::{Rng, SeedableRng};

const ABS_TOL: f64 = 2e-3;
const REL_TOL: f64 = 1e-3;

const ROWS: &[usize] = &[1, 2, 3, 4, 5, 7, 8, 10, 11, 31, 32, 33, 128, 129];

const ACTIVATIONS: [Activation; 5] = Activation::ALL;

const TRANSFORMS: [OutputTransform; 3] = OutputTransform::ALL;

/// Odd sizes (remainders everywhere), k beyond one 256-deep panel, a
/// 16-multiple shape like the bench models, and a degenerate 1→1.
const SHAPES: &[&[usize]] = &[
    &[37, 19, 5],
    &[1, 1],
    &[17, 33, 9, 3],
    &[300, 40, 70, 2],
    &[600, 24, 1],
    &[64, 48, 16],
    &[256, 512, 16],
];

fn model(dims: &[usize], act: Activation, ln: bool, out: OutputTransform, seed: u64) -> Model {
    Model::random_with_layer_norm("t", dims, act, ln, out, seed)
}

fn input(rows: usize, width: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..rows * width)
        .map(|_| rng.random_range(-2.0f32..2.0))
        .collect()
}

fn run(b: &mut CpuBackend, m: &Model, x: &[f32], rows: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; rows * m.output_width];
    b.run(m, x, rows, &mut out).expect("shapes are right");
    out
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= ABS_TOL + REL_TOL * w.abs(),
            "{what}: element {i}: got {g}, want {w} (err {err:e})"
        );
    }
}

fn backends() -> Vec<CpuBackend> {
    let mut v = vec![CpuBackend::portable()];
    match CpuBackend::avx2() {
        Some(b) => v.push(b),
        None => eprintln!("AVX2+FMA+F16C not available: SIMD kernel not tested here"),
    }
    v
}

#[test]
fn new_picks_the_best_kernel() {
    let b = CpuBackend::new();
    assert_eq!(b.kernel(), CpuKernel::detect());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
    {
        assert_eq!(b.kernel(), CpuKernel::Avx2);
        assert_eq!(b.name(), "cpu-avx2");
    }
    assert_eq!(CpuBackend::portable().name(), "cpu-portable");
}

#[test]
fn matches_reference_all_shapes_activations_norms_transforms() {
    let mut bs = backends();
    let mut seed = 1u64;
    for dims in SHAPES {
        for act in ACTIVATIONS {
            for ln in [false, true] {
                for out in TRANSFORMS {
                    seed += 1;
                    let m = model(dims, act, ln, out, seed);
                    for &rows in ROWS {
                        let x = input(rows, m.input_width, seed * 1000 + rows as u64);
                        let want = forward_f64(&m, &x, rows);
                        for b in &mut bs {
                            let got = run(b, &m, &x, rows);
                            let what = format!(
                                "{} dims {dims:?} act {act:?} ln {ln} out {out:?} rows {rows}",
                                b.name()
                            );
                            assert_close(&got, &want, &what);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn simd_and_portable_agree_on_bench_models() {
    let Some(mut simd) = CpuBackend::avx2() else {
        eprintln!("AVX2+FMA+F16C not available: nothing to compare");
        return;
    };
    let mut portable = CpuBackend::portable();
    for (i, m) in crate::model::demo::bench_models().iter().enumerate() {
        for &rows in &[1, 3, 8, 33, 128] {
            let x = input(rows, m.input_width, 77 + i as u64 * 1000 + rows as u64);
            let a = run(&mut simd, m, &x, rows);
            let b = run(&mut portable, m, &x, rows);
            let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
            assert_close(
                &a,
                &b64,
                &format!("{} rows {rows}: avx2 vs portable", m.name),
            );
            assert_close(
                &a,
                &forward_f64(m, &x, rows),
                &format!("{} rows {rows}", m.name),
            );
        }
    }
}

#[test]
fn softmax_is_stable_on_huge_logits() {
    let m = model(
        &[8, 4],
        Activation::Identity,
        false,
        OutputTransform::Softmax,
        3,
    );
    let x: Vec<f32> = input(5, 8, 4).iter().map(|v| v * 1e4).collect();
    for mut b in backends() {
        let out = run(&mut b, &m, &x, 5);
        for row in out.chunks_exact(4) {
            assert!(
                row.iter().all(|v| v.is_finite() && *v >= 0.0),
                "{}: {row:?}",
                b.name()
            );
            assert!(
                (row.iter().sum::<f32>() - 1.0).abs() < 1e-5,
                "{}: {row:?}",
                b.name()
            );
        }
    }
}

#[test]
fn shape_errors_are_returned_not_panics() {
    let m = model(
        &[37, 19, 5],
        Activation::Relu,
        false,
        OutputTransform::Softmax,
        9,
    );
    for mut b in backends() {
        let x = input(3, 37, 1);
        let mut out = vec![0.0; 3 * 5];
        assert_eq!(
            b.run(&m, &x[..36 * 3], 3, &mut out),
            Err(BackendError::Shape)
        );
        assert_eq!(b.run(&m, &x, 2, &mut out), Err(BackendError::Shape));
        assert_eq!(b.run(&m, &x, 3, &mut out[..14]), Err(BackendError::Shape));
        assert_eq!(b.run(&m, &x, 4, &mut out), Err(BackendError::Shape));
        assert_eq!(
            b.run(&m, &x, usize::MAX, &mut out),
            Err(BackendError::Shape)
        );
        let mut big = vec![0.0; 4 * 5];
        assert_eq!(b.run(&m, &x, 3, &mut big), Err(BackendError::Shape));
        // Zero rows with empty slices is a valid, empty batch.
        assert_eq!(b.run(&m, &[], 0, &mut []), Ok(()));
        assert_eq!(b.run(&m, &x, 3, &mut out), Ok(()));

        // A model whose layers do not chain, or whose arrays are short.
        let mut bad = model(
            &[37, 19, 5],
            Activation::Relu,
            false,
            OutputTransform::Identity,
            9,
        );
        bad.layers[1].in_dim = 18;
        assert_eq!(b.run(&bad, &x, 3, &mut out), Err(BackendError::Shape));
        let mut bad = model(
            &[37, 19, 5],
            Activation::Relu,
            false,
            OutputTransform::Identity,
            9,
        );
        bad.layers[0].bias.pop();
        assert_eq!(b.run(&bad, &x, 3, &mut out), Err(BackendError::Shape));
        let mut bad = model(
            &[37, 19, 5],
            Activation::Relu,
            false,
            OutputTransform::Identity,
            9,
        );
        bad.output_width = 4;
        assert_eq!(b.run(&bad, &x, 3, &mut out[..12]), Err(BackendError::Shape));
        let mut bad = model(
            &[37, 19, 5],
            Activation::Relu,
            true,
            OutputTransform::Identity,
            9,
        );
        bad.layers[0].layer_norm.as_mut().unwrap().gamma.pop();
        assert_eq!(b.run(&bad, &x, 3, &mut out), Err(BackendError::Shape));
        let mut bad = model(
            &[37, 19, 5],
            Activation::Relu,
            false,
            OutputTransform::Identity,
            9,
        );
        bad.layers[0].out_dim = 20;
        assert_eq!(b.run(&bad, &x, 3, &mut out), Err(BackendError::Shape));
    }
}

#[test]
fn scratch_is_reused_in_steady_state() {
    let ms = crate::model::demo::bench_models();
    for mut b in backends() {
        let x = input(64, 256, 5);
        let mut out = vec![0.0; 64 * 16];
        for m in &ms {
            b.run(m, &x, 64, &mut out).unwrap();
        }
        let ptrs = |b: &CpuBackend| {
            (
                b.kern.act[0].as_ptr(),
                b.kern.act[1].as_ptr(),
                b.kern.panel.as_ptr(),
            )
        };
        let before = ptrs(&b);
        for rows in [64, 1, 32, 8] {
            for m in &ms {
                b.run(m, &x[..rows * 256], rows, &mut out[..rows * 16])
                    .unwrap();
            }
        }
        assert_eq!(before, ptrs(&b), "{}: scratch was reallocated", b.name());
    }
}

#[test]
fn model_without_layers_applies_only_the_transform() {
    let mut m = model(
        &[4, 4],
        Activation::Identity,
        false,
        OutputTransform::Sigmoid,
        1,
    );
    m.layers.clear();
    let x = input(2, 4, 2);
    let want = forward_f64(&m, &x, 2);
    for mut b in backends() {
        assert_close(&run(&mut b, &m, &x, 2), &want, b.name());
    }
}

/// The vectorised activations (exp polynomial) against f64 over a wide range,
/// tails included, with a tolerance 100× tighter than the model tests.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_activations_match_f64_formulas() {
    use super::{GELU_CUBIC, GELU_SQRT_2_OVER_PI};
    if CpuKernel::detect() != CpuKernel::Avx2 {
        return;
    }
    let xs: Vec<f32> = (-20_000..=20_000)
        .map(|i| i as f32 * 0.005)
        .chain([-1e3, -100.0, -89.0, 89.0, 100.0, 1e3, 1e-7, -1e-7, 0.0])
        .collect();
    type Formula = fn(f64) -> f64;
    let cases: [(Activation, Formula); 3] = [
        (Activation::Gelu, |x| {
            0.5 * x * (1.0 + (GELU_SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x)).tanh())
        }),
        (Activation::Tanh, f64::tanh),
        (Activation::Sigmoid, |x| 1.0 / (1.0 + (-x).exp())),
    ];
    for (act, f) in cases {
        let mut v = xs.clone();
        // SAFETY: AVX2+FMA+F16C detected above.
        unsafe { super::avx2::activate(&mut v, act) };
        for (&x, &got) in xs.iter().zip(&v) {
            let want = f(x as f64);
            let err = (got as f64 - want).abs();
            assert!(
                err <= 2e-5 + 1e-5 * want.abs(),
                "{act:?}({x}) = {got}, want {want}"
            );
        }
    }
}

#[test]
fn registered_batches_match_run_and_reuse_their_staging() {
    use std::sync::Arc;
    use std::task::Poll;
    let ms: Vec<Arc<Model>> = crate::model::demo::bench_models()
        .into_iter()
        .map(Arc::new)
        .collect();
    for mut b in backends() {
        let ids: Vec<_> = ms.iter().map(|m| b.register(m).unwrap()).collect();
        let x = input(64, 256, 9);
        let (mut want, mut got) = (vec![0.0; 64 * 16], vec![0.0; 64 * 16]);
        let staging = |b: &CpuBackend| -> Vec<*const f32> {
            ids.iter()
                .flat_map(|&id| b.models.get(id).unwrap().out.iter().map(|o| o.as_ptr()))
                .collect()
        };
        let before = staging(&b);
        for rows in [64, 1, 7, 64] {
            for (m, &id) in ms.iter().zip(&ids) {
                let n = rows * m.output_width;
                b.run(m, &x[..rows * 256], rows, &mut want[..n]).unwrap();
                // Two in flight, polled in any order.
                let t1 = b.submit(id, &x[..rows * 256], rows).unwrap();
                let t2 = b.submit(id, &x[..rows * 256], rows).unwrap();
                assert_eq!(b.submit(id, &x, 64), Err(BackendError::Busy));
                for t in [t2, t1] {
                    got.fill(f32::NAN);
                    assert_eq!(b.poll(t, &mut got[..n]), Poll::Ready(Ok(())));
                    assert_eq!(got[..n], want[..n], "{} rows {rows}", m.name);
                }
            }
        }
        assert_eq!(before, staging(&b), "{}: staging was reallocated", b.name());
        // Shape errors release the slot; unregistered ids are refused.
        let t = b.submit(ids[0], &x[..256], 1).unwrap();
        assert_eq!(
            b.poll(t, &mut got[..3]),
            Poll::Ready(Err(BackendError::Shape))
        );
        assert_eq!(b.submit(ids[0], &x[..255], 1), Err(BackendError::Shape));
        b.unregister(ids[0]);
        assert_eq!(b.submit(ids[0], &x[..256], 1), Err(BackendError::Unknown));
        assert!(b.submit(ids[1], &x[..256], 1).is_ok());
    }
}
