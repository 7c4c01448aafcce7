//! Rows/s of the bench ensemble (bench_a, bench_b, bench_c on the same input,
//! ~1.76 MFLOP/row) on the CUDA backend (both precisions) and on the CPU
//! backend, through the server's path (models registered once; each round
//! submits one batch per model, and the previous round is polled to
//! completion after the next is submitted: two rounds in flight, as the
//! batchers keep them), one line per backend and batch size:
//!
//! `backend <name> batch <rows> rows_per_s <f> gflops <f> us_per_batch <f>`
//!
//! and, for the first CUDA backend, the cuBLAS-only reference on the same
//! shapes (FP16 GEMMs alone, `CudaBackend::gemm_only_rows_per_s`) with the
//! backend's share of it:
//!
//! `gemm_only batch <rows> rows_per_s <f> cuda_half_share <f> cuda_split_share <f>`
//!
//! `cargo run --release --features cuda --example cuda_throughput -- [--secs S] [--batches 1,32,...] [--no-cpu]`
//! Each line is the best of three trials of S/3 seconds (default S = 1).
//! Without a CUDA device it prints why and measures the CPU only.

use beast::backend::cpu::CpuBackend;
use beast::backend::cuda::{CudaBackend, Precision};
use beast::backend::{Backend, Ticket};
use beast::model::demo::bench_models;
use beast::model::Model;
use rand::{Rng, SeedableRng};
use std::hint::black_box;
use std::sync::Arc;
use std::task::Poll;
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

fn measure(backend: &mut dyn Backend, rows: usize, secs: f64) -> Option<f64> {
    // Staging sized for this batch size at registration.
    let models: Vec<Arc<Model>> = bench_models()
        .into_iter()
        .map(|mut m| {
            m.batch.max_batch = rows;
            Arc::new(m)
        })
        .collect();
    let width = models[0].input_width;
    let mut rng = rand::rngs::StdRng::seed_from_u64(rows as u64);
    let input: Vec<f32> = (0..rows * width)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let mut output = vec![0.0f32; rows * 16];
    let mut ids = Vec::new();
    for m in &models {
        match backend.register(m) {
            Ok(id) => ids.push((id, m.output_width)),
            Err(e) => {
                eprintln!("{} could not register {}: {e}", backend.name(), m.name);
                return None;
            }
        }
    }
    let mut pending: Vec<(Ticket, usize)> = Vec::with_capacity(2 * ids.len());
    // One round: submit a batch per model, then finish the previous round.
    let mut round = |backend: &mut dyn Backend, drain: bool| -> bool {
        let previous = pending.len();
        if !drain {
            for &(id, ow) in &ids {
                match backend.submit(id, black_box(&input), rows) {
                    Ok(t) => pending.push((t, ow)),
                    Err(e) => {
                        eprintln!("{} failed at batch {rows}: {e}", backend.name());
                        return false;
                    }
                }
            }
        }
        for (t, ow) in pending.drain(..previous) {
            loop {
                match backend.poll(t, &mut output[..rows * ow]) {
                    Poll::Pending => std::hint::spin_loop(),
                    Poll::Ready(Ok(())) => break,
                    Poll::Ready(Err(e)) => {
                        eprintln!("{} failed at batch {rows}: {e}", backend.name());
                        return false;
                    }
                }
            }
        }
        black_box(&output);
        true
    };
    for _ in 0..3 {
        if !round(backend, false) {
            return None;
        }
    }
    let trial = Duration::from_secs_f64(secs / 3.0);
    let mut best = 0.0f64;
    for _ in 0..3 {
        let start = Instant::now();
        let mut iters = 0u64;
        while iters == 0 || start.elapsed() < trial {
            if !round(backend, false) {
                return None;
            }
            iters += 1;
        }
        best = best.max((iters * rows as u64) as f64 / start.elapsed().as_secs_f64());
    }
    round(backend, true);
    for (id, _) in ids {
        backend.unregister(id);
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
    let mut reference: Option<CudaBackend> = None;
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
    if !backends.is_empty() {
        reference = CudaBackend::new(0).ok();
    }
    if with_cpu {
        backends.push(Box::new(CpuBackend::new()));
    }
    // rows/s per (backend name, batch)
    let mut seen: Vec<(String, usize, f64)> = Vec::new();
    for b in &mut backends {
        for &rows in &batches {
            match measure(b.as_mut(), rows, secs) {
                Some(rps) => {
                    println!(
                        "backend {} batch {rows} rows_per_s {rps:.1} gflops {:.3} us_per_batch {:.1}",
                        b.name(),
                        rps * flops_per_row as f64 / 1e9,
                        rows as f64 / rps * 1e6
                    );
                    seen.push((b.name().to_string(), rows, rps));
                }
                None => println!("backend {} batch {rows} FAILED", b.name()),
            }
        }
    }
    if let Some(mut r) = reference {
        let refs: Vec<&Model> = models.iter().collect();
        for &rows in &batches {
            match r.gemm_only_rows_per_s(&refs, rows, secs / 3.0) {
                Ok(g) => {
                    let share = |name: &str| {
                        seen.iter()
                            .find(|(n, b, _)| n == name && *b == rows)
                            .map_or(f64::NAN, |(_, _, v)| v / g)
                    };
                    println!(
                        "gemm_only batch {rows} rows_per_s {g:.1} cuda_half_share {:.3} cuda_split_share {:.3}",
                        share("cuda-half"),
                        share("cuda")
                    );
                }
                Err(e) => println!("gemm_only batch {rows} FAILED ({e})"),
            }
        }
    }
}
