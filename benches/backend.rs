//! CPU backend on the `bench_ens` ensemble (bench_a, bench_b, bench_c run one
//! after another on the same input), at the batch sizes the batcher produces.
//!
//! `cargo bench --bench backend`: throughput in rows/s from criterion, plus a
//! GFLOP/s line per batch size (flops per row = Σ Model::flops_per_row).
//! `BEAST_BENCH_PORTABLE=1` also measures the portable kernel.

use beast::backend::cpu::CpuBackend;
use beast::backend::Backend;
use beast::model::demo::bench_models;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use std::hint::black_box;
use std::time::{Duration, Instant};

const BATCHES: [usize; 4] = [1, 8, 32, 128];

fn bench_ens(c: &mut Criterion) {
    let models = bench_models();
    let flops_per_row: u64 = models.iter().map(|m| m.flops_per_row()).sum();
    let width = models[0].input_width;
    let out_width = models.iter().map(|m| m.output_width).max().unwrap_or(0);
    let mut backends = vec![CpuBackend::new()];
    if std::env::var_os("BEAST_BENCH_PORTABLE").is_some() {
        backends.push(CpuBackend::portable());
    }

    let mut group = c.benchmark_group("bench_ens");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    let mut gflops = Vec::new();
    for backend in &mut backends {
        let name = backend.name().to_string();
        for rows in BATCHES {
            let mut rng = rand::rngs::StdRng::seed_from_u64(rows as u64);
            let input: Vec<f32> = (0..rows * width)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            let mut output = vec![0.0f32; rows * out_width];
            let (mut iters_total, mut time_total) = (0u64, Duration::ZERO);
            group.throughput(Throughput::Elements(rows as u64));
            group.bench_function(BenchmarkId::new(&name, rows), |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        for m in &models {
                            let out = &mut output[..rows * m.output_width];
                            backend.run(m, black_box(&input), rows, out).unwrap();
                        }
                        black_box(&output);
                    }
                    let t = start.elapsed();
                    iters_total += iters;
                    time_total += t;
                    t
                })
            });
            let secs = time_total.as_secs_f64();
            gflops.push((
                name.clone(),
                rows,
                (iters_total * rows as u64) as f64 / secs,
                (iters_total * rows as u64 * flops_per_row) as f64 / secs / 1e9,
            ));
        }
    }
    group.finish();
    println!("\nbench_ens: {flops_per_row} flop/row");
    println!(
        "{:<14} {:>6} {:>14} {:>9}",
        "kernel", "batch", "rows/s", "GFLOP/s"
    );
    for (name, rows, rps, gf) in gflops {
        println!("{name:<14} {rows:>6} {rps:>14.0} {gf:>9.2}");
    }
}

criterion_group!(benches, bench_ens);
criterion_main!(benches);
