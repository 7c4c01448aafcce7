//! Rows/s of the bench ensemble (bench_a, bench_b, bench_c on the same input,
//! ~1.76 MFLOP/row) on the CUDA backend (both precisions) and on the CPU
//! backend, one line per backend and batch size:
//!
//! `backend <name> batch <rows> rows_per_s <f> gflops <f> us_per_batch <f>`
//!
//! `cargo run --release --features cuda --example cuda_throughput -- [--secs S] [--batches 1,32,...] [--no-cpu]`
//! Each line is the best of three trials of S/3 seconds (default S = 1).
//! Without a CUDA device it prints why and measures the CPU only.

use beast::backend::cpu::CpuBackend;
use beast::backend::cuda::{CudaBackend, Precision};
use beast::backend::Backend;
use beast::model::demo::bench_models;
use beast::model::Model;
use rand::{Rng, SeedableRng};
use std::hint::black_box;
use std::time::{Duration, Instant};

fn parse_args() -> Result<(f64, Vec<usize>, bool), String> {
    let mut secs = 1.0f64;
    let mut batches = vec![1usize, 32, 128, 1024, 8192];
    let mut cpu = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--secs" => secs = args.next().and_then(|s| s.parse().ok()).ok_or("--secs S")?,
            "--batches" => {
                batches = args
                    .next()
                    .ok_or("--batches 1,32,...")?
                    .split(',')
                    .map(|b| b.parse().map_err(|_| format!("bad batch size {b:?}")))
                    .collect::<Result<_, _>>()?
            }
            "--no-cpu" => cpu = false,
            "--bench" => {} // passed by `cargo bench`-style runners; ignored
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok((secs, batches, cpu))
}

fn measure(backend: &mut dyn Backend, models: &[Model], rows: usize, secs: f64) -> Option<f64> {
    let width = models[0].input_width;
    let mut rng = rand::rngs::StdRng::seed_from_u64(rows as u64);
    let input: Vec<f32> = (0..rows * width)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let mut output = vec![0.0f32; rows * 16];
    let mut run_once = |backend: &mut dyn Backend| -> bool {
        for m in models {
            let out = &mut output[..rows * m.output_width];
            if let Err(e) = backend.run(m, black_box(&input), rows, out) {
                eprintln!("{} failed at batch {rows}: {e}", backend.name());
                return false;
            }
        }
        black_box(&output);
        true
    };
    for _ in 0..3 {
        if !run_once(backend) {
            return None;
        }
    }
    let trial = Duration::from_secs_f64(secs / 3.0);
    let mut best = 0.0f64;
    for _ in 0..3 {
        let start = Instant::now();
        let mut iters = 0u64;
        while iters == 0 || start.elapsed() < trial {
            if !run_once(backend) {
                return None;
            }
            iters += 1;
        }
        best = best.max((iters * rows as u64) as f64 / start.elapsed().as_secs_f64());
    }
    Some(best)
}

fn main() {
    let (secs, batches, with_cpu) = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cuda_throughput: {e}");
            std::process::exit(2);
        }
    };
    let models = bench_models();
    let flops_per_row: u64 = models.iter().map(|m| m.flops_per_row()).sum();
    println!("bench_ens flops_per_row {flops_per_row}");

    let mut backends: Vec<Box<dyn Backend>> = Vec::new();
    for p in [Precision::Split, Precision::Half] {
        match CudaBackend::with_precision(0, p) {
            Ok(b) => {
                println!("cuda device {} precision {p:?}", b.device_name());
                backends.push(Box::new(b));
            }
            Err(reason) => {
                println!("cuda unavailable ({reason})");
                break;
            }
        }
    }
    if with_cpu {
        backends.push(Box::new(CpuBackend::new()));
    }
    for b in &mut backends {
        for &rows in &batches {
            match measure(b.as_mut(), &models, rows, secs) {
                Some(rps) => println!(
                    "backend {} batch {rows} rows_per_s {rps:.1} gflops {:.3} us_per_batch {:.1}",
                    b.name(),
                    rps * flops_per_row as f64 / 1e9,
                    rows as f64 / rps * 1e6
                ),
                None => println!("backend {} batch {rows} FAILED", b.name()),
            }
        }
    }
}
