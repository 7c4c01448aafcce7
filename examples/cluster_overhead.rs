//! The cluster client's cost against one plain connection, on one node:
//! the same closed-loop load (T threads, each one request at a time, the
//! same inputs) through `Client` (one connection) and through `Cluster`
//! (one node, one connection), alternating rounds A B A B ... so both
//! see the same machine. Prints per round and the median ratio.
//!
//!   cargo run --release --example cluster_overhead -- ADDR [THREADS] [SECS] [ROUNDS] [TARGET] [WIDTH]
//!
//! perf/cluster_client.sh runs it against a `beast serve`.

use beast::client::{Client, Cluster, ClusterConfig};
use beast::wire::RequestSpec;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn spec<'a>(target: &'a str, x: &'a [f32]) -> RequestSpec<'a> {
    RequestSpec::row(target, x)
}

/// One blocking call with one input.
type Call = Arc<dyn Fn(&[f32]) + Send + Sync>;

/// This process's CPU seconds (user + system), all threads.
fn cpu_s() -> f64 {
    // SAFETY: getrusage only fills the struct we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Requests per second, this process's CPU µs per request, and sorted
/// latencies (µs) of `threads` threads calling `call` for `secs`.
fn drive(
    threads: usize,
    secs: f64,
    inputs: &Arc<Vec<Vec<f32>>>,
    call: Call,
) -> (f64, f64, Vec<u32>) {
    let cpu0 = cpu_s();
    let stop = Arc::new(AtomicBool::new(false));
    let hs: Vec<_> = (0..threads)
        .map(|t| {
            let (stop, xs, call) = (stop.clone(), inputs.clone(), call.clone());
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(1 << 16);
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    i = (i + 1) % xs.len();
                    let t0 = Instant::now();
                    call(&xs[i]);
                    lat.push(t0.elapsed().as_micros() as u32);
                }
                lat
            })
        })
        .collect();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<u32> = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let took = t0.elapsed().as_secs_f64();
    let cpu_us = (cpu_s() - cpu0) * 1e6 / all.len().max(1) as f64;
    all.sort_unstable();
    (all.len() as f64 / took, cpu_us, all)
}

fn q(v: &[u32], p: f64) -> u32 {
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let addr = a
        .first()
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:7878".into());
    let threads: usize = a.get(1).map_or(4, |s| s.parse().unwrap());
    let secs: f64 = a.get(2).map_or(3.0, |s| s.parse().unwrap());
    let rounds: usize = a.get(3).map_or(3, |s| s.parse().unwrap());
    let target: Arc<str> = a.get(4).map_or("bench_a", |s| s.as_str()).into();
    let width: usize = a.get(5).map_or(256, |s| s.parse().unwrap());
    let inputs: Arc<Vec<Vec<f32>>> = Arc::new(
        (0..64)
            .map(|i| {
                (0..width)
                    .map(|j| ((i * 31 + j) % 97) as f32 / 97.0)
                    .collect()
            })
            .collect(),
    );
    let client = Arc::new(Client::connect(addr.as_str()).expect("connect"));
    let cluster = Arc::new(Cluster::connect(&addr, ClusterConfig::default()).expect("connect"));
    let one: Call = {
        let (c, t) = (client.clone(), target.clone());
        Arc::new(move |x| {
            c.predict(&spec(&t, x)).expect("client answer");
        })
    };
    let many: Call = {
        let (c, t) = (cluster.clone(), target.clone());
        Arc::new(move |x| {
            c.predict(&spec(&t, x)).expect("cluster answer");
        })
    };
    // Warm the cache and both paths.
    drive(threads, 0.5, &inputs, one.clone());
    drive(threads, 0.5, &inputs, many.clone());
    println!("| round | client req/s | cluster req/s | cluster / client | client CPU µs/req | cluster CPU µs/req | client p50 / p99 µs | cluster p50 / p99 µs |");
    println!("|---|---|---|---|---|---|---|---|");
    let (mut ratios, mut cpu_extra) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let (ra, ca, la) = drive(threads, secs, &inputs, one.clone());
        let (rb, cb, lb) = drive(threads, secs, &inputs, many.clone());
        ratios.push(rb / ra);
        cpu_extra.push(cb - ca);
        println!(
            "| {} | {ra:.0} | {rb:.0} | {:.3} | {ca:.1} | {cb:.1} | {} / {} | {} / {} |",
            r + 1,
            rb / ra,
            q(&la, 0.5),
            q(&la, 0.99),
            q(&lb, 0.5),
            q(&lb, 0.99)
        );
    }
    ratios.sort_by(f64::total_cmp);
    cpu_extra.sort_by(f64::total_cmp);
    println!();
    println!(
        "median extra client CPU per request, cluster - client: {:.1} µs",
        cpu_extra[cpu_extra.len() / 2]
    );
    println!(
        "median cluster / client throughput: {:.3} ({} rounds of {secs} s, {threads} threads, target {target})",
        ratios[ratios.len() / 2],
        rounds
    );
}
