//! Rows/s of the CPU backend on `bench_ens` (bench_a, bench_b, bench_c on
//! the same input), one line per batch size, easy to parse
//! (`perf/ort_compare.py` reads it).
//!
//! `cargo run --release --example backend_throughput -- [--portable] [--secs S] [--batches 1,8,32,128] [--act gelu]`
//! Output lines: `batch <rows> rows_per_s <f> gflops <f> rows_per_cpu_s <f>`;
//! the best of three trials of S/3 seconds each is printed (the least
//! disturbed by neighbours). `rows_per_cpu_s` divides by this thread's CPU
//! time instead of wall time, so time slices lost to other processes on a
//! shared core do not count (cache pollution by them still does).

use beast::backend::cpu::CpuBackend;
use beast::backend::Backend;
use beast::model::demo::bench_models;
use rand::{Rng, SeedableRng};
use std::hint::black_box;
use std::time::{Duration, Instant};

fn main() {
    let mut portable = false;
    let mut act: Option<String> = None;
    let mut secs = 3.0f64;
    let mut batches = vec![1usize, 8, 32, 128];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--portable" => portable = true,
            "--act" => act = args.next(),
            "--secs" => secs = args.next().and_then(|s| s.parse().ok()).expect("--secs S"),
            "--batches" => {
                batches = args
                    .next()
                    .map(|s| {
                        s.split(',')
                            .map(|b| b.parse().expect("batch size"))
                            .collect()
                    })
                    .expect("--batches 1,8,...")
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let mut models = bench_models();
    if let Some(act) = &act {
        // Same shapes and weights, another hidden activation (e.g. `gelu`).
        let act: beast::model::Activation =
            serde::Deserialize::deserialize(serde::de::value::StrDeserializer::<
                serde::de::value::Error,
            >::new(act))
            .expect("--act identity|relu|gelu|tanh|sigmoid");
        for m in &mut models {
            let last = m.layers.len() - 1;
            m.layers[..last].iter_mut().for_each(|l| l.activation = act);
        }
    }
    let flops_per_row: u64 = models.iter().map(|m| m.flops_per_row()).sum();
    let width = models[0].input_width;
    let mut backend = if portable {
        CpuBackend::portable()
    } else {
        CpuBackend::new()
    };
    println!("kernel {} flops_per_row {flops_per_row}", backend.name());
    for rows in batches {
        let mut rng = rand::rngs::StdRng::seed_from_u64(rows as u64);
        let input: Vec<f32> = (0..rows * width)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let mut output = vec![0.0f32; rows * 16];
        let mut run_once = |backend: &mut CpuBackend| {
            for m in &models {
                let out = &mut output[..rows * m.output_width];
                backend.run(m, black_box(&input), rows, out).unwrap();
            }
            black_box(&output);
        };
        for _ in 0..10 {
            run_once(&mut backend);
        }
        let trial = Duration::from_secs_f64(secs / 3.0);
        let (mut best, mut best_cpu) = (0.0f64, 0.0f64);
        for _ in 0..3 {
            let start = Instant::now();
            let cpu_start = thread_cpu_s();
            let mut iters = 0u64;
            while start.elapsed() < trial {
                for _ in 0..8 {
                    run_once(&mut backend);
                }
                iters += 8;
            }
            let done = (iters * rows as u64) as f64;
            best = best.max(done / start.elapsed().as_secs_f64());
            best_cpu = best_cpu.max(done / (thread_cpu_s() - cpu_start));
        }
        println!(
            "batch {rows} rows_per_s {best:.1} gflops {:.3} rows_per_cpu_s {best_cpu:.1}",
            best * flops_per_row as f64 / 1e9
        );
    }
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}
