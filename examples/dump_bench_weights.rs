//! Writes the bench models' weights as `<DIR>/<model>/1/weights.safetensors`
//! (tensors `layers.{i}.weight` [in, out] F16 and `layers.{i}.bias` [out] F32,
//! the repository layout) so `perf/ort_compare.py` can build the same models
//! for ONNX Runtime without depending on the `beast demo-models` command.
//!
//! `cargo run --release --example dump_bench_weights -- DIR`

use beast::model::demo::bench_models;
use safetensors::tensor::{Dtype, TensorView};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .ok_or("usage: dump_bench_weights DIR")?,
    );
    for m in bench_models() {
        let bytes: Vec<(Vec<u8>, Vec<u8>)> = m
            .layers
            .iter()
            .map(|l| {
                let w: &[u8] = bytemuck::cast_slice(l.weight());
                (w.to_vec(), bytemuck::cast_slice(&l.bias).to_vec())
            })
            .collect();
        let mut tensors = Vec::new();
        for (i, (l, (w, b))) in m.layers.iter().zip(&bytes).enumerate() {
            let shape = vec![l.in_dim, l.out_dim];
            tensors.push((
                format!("layers.{i}.weight"),
                TensorView::new(Dtype::F16, shape, w)?,
            ));
            tensors.push((
                format!("layers.{i}.bias"),
                TensorView::new(Dtype::F32, vec![l.out_dim], b)?,
            ));
        }
        let out = dir.join(&m.name).join("1");
        std::fs::create_dir_all(&out)?;
        safetensors::serialize_to_file(tensors, None, &out.join("weights.safetensors"))?;
        println!("{}", out.join("weights.safetensors").display());
    }
    Ok(())
}
