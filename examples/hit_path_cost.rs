//! The user-space pieces of a cache hit, each timed alone on one core
//! (ns per call): decode (verify) a bench_a request (256 f32 inputs) with
//! the flatbuffers verifier and with the server's fast path (src/wire/fast.rs), the
//! cache key over it, and the response (16 f32 outputs, one run) encoded by
//! the flatbuffers builder vs from a template.
//!
//!   taskset -c 0 target/release/examples/hit_path_cost [--secs 1]
use beast::cache::KeyBuilder;
use beast::wire::{
    decode_incoming_with_id, decode_request, CacheControl, Encoder, Input, PolicyOverride,
    RequestSpec, ResponseHeader, RunInfo, Status, Timings, FRAME_HEADER_LEN,
};
use std::hint::black_box;
use std::time::{Duration, Instant};

fn time(name: &str, secs: f64, mut f: impl FnMut()) {
    for _ in 0..1000 {
        f();
    }
    let (mut n, t0) = (0u64, Instant::now());
    let end = Duration::from_secs_f64(secs);
    while t0.elapsed() < end {
        for _ in 0..1000 {
            f();
        }
        n += 1000;
    }
    println!(
        "{name:<40} {:>8.1} ns",
        t0.elapsed().as_nanos() as f64 / n as f64
    );
}

fn main() {
    let secs: f64 = std::env::args()
        .skip_while(|a| a != "--secs")
        .nth(1)
        .map_or(1.0, |s| s.parse().expect("--secs N"));
    let x: Vec<f32> = (0..256).map(|i| i as f32 * 0.01).collect();
    let mut frame = Vec::new();
    Encoder::new().request(
        42,
        &RequestSpec {
            target: "bench_a",
            version: None,
            rows: 1,
            cols: 256,
            input: Input::F32(&x),
            deadline_us: None,
            domain: None,
            cache: CacheControl::Use,
            policy: PolicyOverride::Default,
        },
        &mut frame,
    );
    let body = &frame[FRAME_HEADER_LEN..];
    time("decode_request (flatbuffers verifier)", secs, || {
        black_box(decode_request(black_box(body)).is_ok());
    });
    time("decode_incoming_with_id (fast path)", secs, || {
        black_box(decode_incoming_with_id(black_box(body)).is_ok());
    });
    time("cache key (xxh3-128 over 1 KiB)", secs, || {
        black_box(
            KeyBuilder::new("bench_a")
                .input(black_box(bytemuck::cast_slice(&x)))
                .finish(),
        );
    });
    let out = [0.25f32; 16];
    let h = ResponseHeader {
        id: 42,
        status: Status::Ok,
        message: "",
        rows: 1,
        cols: 16,
        timings: Timings::default(),
        cached: true,
        partial: false,
        ticket: 0,
    };
    let runs = [RunInfo {
        model: "bench_a",
        version: 1,
        flops: 0,
    }];
    let mut enc = Encoder::new();
    let mut buf = Vec::with_capacity(4096);
    time("response, flatbuffers builder", secs, || {
        buf.clear();
        enc.response_built(&h, &runs, black_box(&out), &mut buf, false);
    });
    time("response, template", secs, || {
        buf.clear();
        enc.response(&h, &runs, black_box(&out), &mut buf);
    });
}
