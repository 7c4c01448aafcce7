//! f64 reference forward pass, for tests: the obvious loops, no blocking, no
//! SIMD, every intermediate in f64, so it is easy to trust. Uses exactly the
//! formulas of the CPU backend (GELU: tanh approximation, see `cpu.rs`;
//! layer norm: biased variance; softmax: max-subtracted).
use super::cpu::{GELU_CUBIC, GELU_SQRT_2_OVER_PI};
use crate::model::{Activation, Model, OutputTransform};

/// Forward `rows` rows through `model` in f64 (weights read from FP16).
/// Returns `rows × model.output_width`, row-major.
///
/// # Panics
/// If `input.len() != rows * model.input_width` or the layers do not chain
/// (this is test code; the backends return `BackendError::Shape` instead).
pub fn forward_f64(model: &Model, input: &[f32], rows: usize) -> Vec<f64> {
    assert_eq!(
        input.len(),
        rows * model.input_width,
        "input is not rows × input_width"
    );
    let mut cur: Vec<f64> = input.iter().map(|&v| v as f64).collect();
    let mut width = model.input_width;
    for layer in &model.layers {
        assert_eq!(layer.in_dim, width, "layers do not chain");
        let (k, n) = (layer.in_dim, layer.out_dim);
        let w = layer.weight();
        let mut next = vec![0.0f64; rows * n];
        for r in 0..rows {
            let x = &cur[r * k..(r + 1) * k];
            let y = &mut next[r * n..(r + 1) * n];
            for (j, yj) in y.iter_mut().enumerate() {
                let mut acc = layer.bias[j] as f64;
                for (p, &xp) in x.iter().enumerate() {
                    acc += xp * w[p * n + j].to_f64();
                }
                *yj = acc;
            }
            if let Some(ln) = &layer.layer_norm {
                let mean = y.iter().sum::<f64>() / n as f64;
                let var = y.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
                let inv = 1.0 / (var + ln.eps as f64).sqrt();
                for (j, v) in y.iter_mut().enumerate() {
                    *v = (*v - mean) * inv * ln.gamma[j] as f64 + ln.beta[j] as f64;
                }
            }
            for v in y.iter_mut() {
                *v = activate(*v, layer.activation);
            }
        }
        cur = next;
        width = n;
    }
    assert_eq!(
        width, model.output_width,
        "last layer is not output_width wide"
    );
    if width > 0 {
        for row in cur.chunks_exact_mut(width) {
            match model.output {
                OutputTransform::Identity => {}
                OutputTransform::Sigmoid => row.iter_mut().for_each(|v| *v = sigmoid(*v)),
                OutputTransform::Softmax => {
                    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    row.iter_mut().for_each(|v| *v = (*v - max).exp());
                    let sum: f64 = row.iter().sum();
                    row.iter_mut().for_each(|v| *v /= sum);
                }
            }
        }
    }
    cur
}

fn activate(x: f64, act: Activation) -> f64 {
    match act {
        Activation::Identity => x,
        Activation::Relu => x.max(0.0),
        Activation::Gelu => {
            0.5 * x * (1.0 + (GELU_SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x)).tanh())
        }
        Activation::Tanh => x.tanh(),
        Activation::Sigmoid => sigmoid(x),
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}
