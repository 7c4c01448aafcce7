//! Pieces of the request path outside the kernel, each old vs new in the
//! same run (issue #10, CPU per request outside the kernel):
//!
//! - `finite_check/256`: the input check of a bench request (256 values):
//!   the old `position(!finite)` scan vs `batch::first_bad_value`.
//! - `take_batch/64x256`: 64 one-row jobs of width 256 queued then taken as
//!   one batch: `take_batch` (rows copied out of the ring, as before) vs
//!   `take_batch_rows` (rows left in the ring when unbroken, as the batcher
//!   does now). Both include the 64 pushes.
//! - `ensemble_answer/3runs_1x16`: bench_ens's answer (1 x 16 outputs,
//!   three runs): built with the flatbuffers builder (as every ensemble
//!   answer was) vs written from its template (`wire/template.rs`).
//! - `accumulate/mean_3x1x16`: bench_ens's combine (reset, three members'
//!   1 x 16 outputs added, mean): the old `Accumulator` (kept below: every
//!   add also counts votes and keeps the output for a median) vs
//!   `Accumulator::reset_for` (only what the mean reads).
//!
//! `cargo bench --bench request_path`; the ratios are in perf/request_path.md.

use beast::batch::{first_bad_value, Queue};
use beast::ensemble::{argmax, Accumulator, Weight};
use beast::model::{BatchLimits, Combiner};
use beast::wire::{Encoder, ResponseHeader, RunInfo, Status, Timings};
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::time::{Duration, Instant};

const W: usize = 256;

fn old_check(x: &[f32], nan_ok: bool) -> Option<usize> {
    x.iter()
        .position(|v| !(v.is_finite() || (nan_ok && v.is_nan())))
}

/// `Accumulator` as it was before `reset_for` (scalar weights, mean only).
#[derive(Default)]
struct OldAcc {
    sum: Vec<f32>,
    weight_sum: Vec<f32>,
    votes: Vec<f32>,
    vals: Vec<f32>,
    out: Vec<f32>,
    cols: usize,
}

impl OldAcc {
    fn reset(&mut self, rows: usize, cols: usize) {
        let len = rows * cols;
        for v in [&mut self.sum, &mut self.votes] {
            v.clear();
            v.resize(len, 0.0);
        }
        self.weight_sum.clear();
        self.weight_sum.resize(cols, 0.0);
        self.vals.clear();
        self.cols = cols.max(1);
    }

    fn add(&mut self, output: &[f32], w: f32) {
        let cols = self.cols;
        for ((s, v), o) in self
            .sum
            .chunks_exact_mut(cols)
            .zip(self.votes.chunks_exact_mut(cols))
            .zip(output.chunks_exact(cols))
        {
            for (a, x) in s.iter_mut().zip(o) {
                *a += w * x;
            }
            v[argmax(o)] += 1.0;
        }
        self.vals.extend_from_slice(output);
        self.weight_sum.iter_mut().for_each(|a| *a += w);
    }

    fn mean(&mut self) -> &[f32] {
        let cols = self.cols;
        self.out.clear();
        self.out.resize(self.sum.len(), 0.0);
        for (i, o) in self.out.iter_mut().enumerate() {
            let w = self.weight_sum[i % cols];
            *o = if w > 0.0 { self.sum[i] / w } else { 0.0 };
        }
        &self.out
    }
}

fn benches(c: &mut Criterion) {
    let row: Vec<f32> = (0..W).map(|i| (i as f32 * 0.37).sin()).collect();
    assert_eq!(old_check(&row, false), first_bad_value(&row, false));
    let mut g = c.benchmark_group("finite_check");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    g.bench_function("old_position", |b| {
        b.iter(|| old_check(black_box(&row), black_box(false)))
    });
    g.bench_function("new_first_bad_value", |b| {
        b.iter(|| first_bad_value(black_box(&row), black_box(false)))
    });
    g.finish();

    let limits = BatchLimits {
        max_batch: 64,
        min_batch: 1,
        max_queue_delay_us: 0,
        queue_rows_max: 1024,
    };
    let mut q: Queue<u32> = Queue::new(limits, W);
    let (mut jobs, mut dropped, mut input) = (Vec::new(), Vec::new(), Vec::new());
    let now = Instant::now();
    let mut g = c.benchmark_group("take_batch");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    g.bench_function("old_copy", |b| {
        b.iter(|| {
            for j in 0..64 {
                q.push(j, &row, now, None).unwrap();
            }
            let n = q.take_batch(now, |_| None, &mut jobs, &mut dropped, &mut input);
            black_box(&input[..n * W]);
        })
    });
    g.bench_function("new_in_ring", |b| {
        b.iter(|| {
            for j in 0..64 {
                q.push(j, &row, now, None).unwrap();
            }
            let (n, at) = q.take_batch_rows(now, |_| None, &mut jobs, &mut dropped, &mut input);
            let x: &[f32] = match at {
                beast::batch::BatchRows::Ring(s) => q.ring_rows_mut(s, n),
                beast::batch::BatchRows::Input => &input[..n * W],
            };
            black_box(x);
        })
    });
    g.finish();

    let output: Vec<f32> = (0..16).map(|i| i as f32 / 16.0).collect();
    let runs = ["bench_a", "bench_b", "bench_c"].map(|m| RunInfo {
        model: m,
        version: 1,
        flops: 1_000_000,
    });
    let mut h = ResponseHeader {
        id: 1,
        status: Status::Ok,
        message: "",
        rows: 1,
        cols: 16,
        timings: Timings {
            queue_us: 300,
            compute_us: 900,
            total_us: 0,
        },
        cached: false,
        partial: false,
        ticket: 5,
    };
    let (mut enc, mut out) = (Encoder::new(), Vec::with_capacity(4096));
    let mut g = c.benchmark_group("ensemble_answer");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    g.bench_function("3runs_1x16/old_builder", |b| {
        b.iter(|| {
            out.clear();
            h.id += 1;
            enc.response_built(black_box(&h), black_box(&runs), &output, &mut out, false);
            black_box(&out);
        })
    });
    g.bench_function("3runs_1x16/new_template", |b| {
        b.iter(|| {
            out.clear();
            h.id += 1;
            enc.response(black_box(&h), black_box(&runs), &output, &mut out);
            black_box(&out);
        })
    });
    g.finish();

    let members: Vec<Vec<f32>> = (0..3)
        .map(|m| {
            (0..16)
                .map(|i| ((m * 16 + i) as f32 * 0.71).sin().abs())
                .collect()
        })
        .collect();
    let (mut old, mut new) = (OldAcc::default(), Accumulator::default());
    old.reset(1, 16);
    new.reset_for(1, 16, Combiner::Mean);
    for o in &members {
        old.add(o, 1.0);
        new.add(o, Weight::Scalar(1.0));
    }
    assert_eq!(old.mean(), new.combine(Combiner::Mean));
    let mut g = c.benchmark_group("accumulate");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    g.bench_function("mean_3x1x16/old_all_kept", |b| {
        b.iter(|| {
            old.reset(1, 16);
            for o in &members {
                old.add(black_box(o), black_box(1.0));
            }
            black_box(old.mean());
        })
    });
    g.bench_function("mean_3x1x16/new_reset_for", |b| {
        b.iter(|| {
            new.reset_for(1, 16, black_box(Combiner::Mean));
            for o in &members {
                new.add(black_box(o), Weight::Scalar(black_box(1.0)));
            }
            black_box(new.combine(Combiner::Mean));
        })
    });
    g.finish();
}

criterion_group!(request_path, benches);
criterion_main!(request_path);
