//! beast-bench: an open-loop load generator for beast.
//!
//! Each connection sends requests on a fixed schedule (the offered rate
//! split evenly over connections), at most `--in-flight` outstanding at a
//! time. Latency is measured from each request's *intended* send time, so a
//! server (or client) that falls behind is charged for the queueing it
//! causes (coordinated-omission correction, as wrk2 does); the uncorrected
//! figure (from the actual send) is printed beside it. If the generator
//! itself could not keep the schedule, the report says so.

use beast::wire::{
    check_frame, decode_response, CacheControl, Encoder, FrameCheck, Input, RequestSpec, Status,
    FRAME_HEADER_LEN,
};
use clap::Parser;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use mimalloc::MiMalloc;
use std::cell::{Cell, RefCell};
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::ExitCode;
use std::rc::Rc;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

#[derive(Parser, Clone, Debug)]
#[command(
    name = "beast-bench",
    about = "Open-loop load generator for beast (coordinated-omission corrected)"
)]
struct Args {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:7878")]
    server: String,
    /// Model or ensemble to ask.
    #[arg(long, default_value = "bench_ens")]
    target: String,
    /// Input width of the target.
    #[arg(long, default_value_t = 256)]
    width: usize,
    /// Rows per request.
    #[arg(long, default_value_t = 1)]
    rows: usize,
    /// Offered rate, requests per second (all connections together).
    #[arg(long, default_value_t = 10_000.0)]
    rate: f64,
    /// Connections.
    #[arg(long, short = 'c', default_value_t = 32)]
    connections: usize,
    /// Requests in flight per connection, at most.
    #[arg(long, short = 'k', default_value_t = 16)]
    in_flight: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring (excluded from the results).
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// CPUs for the generator's threads (one thread each), e.g. "1" or "1,3".
    #[arg(long, default_value = "")]
    cpus: String,
    /// Distinct input rows to draw from (seeded; cycled in order).
    #[arg(long, default_value_t = 4096)]
    distinct: usize,
    /// Send inputs as FP16.
    #[arg(long)]
    f16: bool,
    /// Ask the server to bypass its cache.
    #[arg(long)]
    no_cache: bool,
    /// Fail (exit 1) when more than this fraction of requests erred or went unanswered.
    #[arg(long, default_value_t = 0.001)]
    max_error_fraction: f64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// What one thread measured.
struct Report {
    corrected: Histogram<u64>,
    uncorrected: Histogram<u64>,
    sent: u64,
    ok: u64,
    by_status: [u64; 6],
    unanswered: u64,
    /// Largest lag between a request's intended and actual send (µs).
    send_lag_max_us: u64,
    server_queue_us: u64,
    server_compute_us: u64,
}

impl Report {
    fn new() -> Self {
        Report {
            corrected: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
            uncorrected: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
            sent: 0,
            ok: 0,
            by_status: [0; 6],
            unanswered: 0,
            send_lag_max_us: 0,
            server_queue_us: 0,
            server_compute_us: 0,
        }
    }
    fn merge(&mut self, o: &Report) {
        self.corrected.add(&o.corrected).unwrap();
        self.uncorrected.add(&o.uncorrected).unwrap();
        self.sent += o.sent;
        self.ok += o.ok;
        for i in 0..6 {
            self.by_status[i] += o.by_status[i];
        }
        self.unanswered += o.unanswered;
        self.send_lag_max_us = self.send_lag_max_us.max(o.send_lag_max_us);
        self.server_queue_us += o.server_queue_us;
        self.server_compute_us += o.server_compute_us;
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cpus: Vec<usize> = if args.cpus.trim().is_empty() {
        vec![usize::MAX]
    } else {
        match args
            .cpus
            .split(',')
            .map(|s| s.trim().parse::<usize>())
            .collect()
        {
            Ok(v) => v,
            Err(_) => {
                eprintln!("beast-bench: --cpus: expected e.g. 1 or 1,3");
                return ExitCode::FAILURE;
            }
        }
    };
    if args.connections < cpus.len() || args.in_flight == 0 || args.rate <= 0.0 {
        eprintln!("beast-bench: need connections >= threads, in-flight >= 1, rate > 0");
        return ExitCode::FAILURE;
    }
    let addr = match std::net::ToSocketAddrs::to_socket_addrs(&args.server)
        .ok()
        .and_then(|mut a| a.next())
    {
        Some(a) => a,
        None => {
            eprintln!("beast-bench: cannot resolve {}", args.server);
            return ExitCode::FAILURE;
        }
    };
    let start = Instant::now() + Duration::from_millis(200);
    let threads: Vec<_> = cpus
        .iter()
        .enumerate()
        .map(|(t, &cpu)| {
            let args = args.clone();
            let nthreads = cpus.len();
            let placement = if cpu == usize::MAX {
                Placement::Unbound
            } else {
                Placement::Fixed(cpu)
            };
            LocalExecutorBuilder::new(placement)
                .name("beast-bench")
                .io_memory(512 << 10)
                .spawn(move || async move { run_thread(t, nthreads, args, addr, start).await })
                .expect("start generator thread")
        })
        .collect();
    let cpu0 = cpu_time();
    let mut total = Report::new();
    for t in threads {
        match t.join() {
            Ok(Ok(r)) => total.merge(&r),
            Ok(Err(e)) => {
                eprintln!("beast-bench: {e}");
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("beast-bench: thread failed: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let cpu_s = cpu_time() - cpu0;
    print_report(&args, &total, cpu_s);
    let bad = total.sent - total.ok + total.unanswered;
    if total.sent == 0 || bad as f64 > args.max_error_fraction * total.sent as f64 {
        eprintln!(
            "beast-bench: FAIL: {bad} of {} requests erred or went unanswered",
            total.sent
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn cpu_time() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn input_pool(args: &Args) -> Vec<f32> {
    let n = args.distinct.max(1) * args.rows * args.width;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Per-connection bookkeeping shared by its sender and receiver tasks.
struct ConnState {
    /// Slot → (intended send, actual send, measured?) of an outstanding request.
    slots: RefCell<Vec<Option<(Instant, Instant, bool)>>>,
    free: RefCell<Vec<usize>>,
    freed: beast_notify::Notify,
    report: RefCell<Report>,
    done_sending: Cell<bool>,
}

async fn run_thread(
    t: usize,
    nthreads: usize,
    args: Args,
    addr: std::net::SocketAddr,
    start: Instant,
) -> Result<Report, String> {
    let pool = Rc::new(input_pool(&args));
    let my_conns: Vec<usize> = (0..args.connections)
        .filter(|c| c % nthreads == t)
        .collect();
    let per_conn_rate = args.rate / args.connections as f64;
    let mut tasks = Vec::new();
    for c in my_conns {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (args, pool) = (args.clone(), pool.clone());
        tasks.push(glommio::spawn_local(async move {
            run_conn(c, stream, args, pool, per_conn_rate, start).await
        }));
    }
    let mut report = Report::new();
    for task in tasks {
        report.merge(&task.await?);
    }
    Ok(report)
}

async fn run_conn(
    c: usize,
    reader: TcpStream,
    args: Args,
    pool: Rc<Vec<f32>>,
    rate: f64,
    start: Instant,
) -> Result<Report, String> {
    // SAFETY: dup gives us a second fd on the socket for the writer half.
    let wfd = unsafe { libc::dup(reader.as_raw_fd()) };
    if wfd < 0 {
        return Err("dup failed".into());
    }
    // SAFETY: fresh fd, owned by this stream alone.
    let mut writer = unsafe { TcpStream::from_raw_fd(wfd) };
    let k = args.in_flight;
    let st = Rc::new(ConnState {
        slots: RefCell::new(vec![None; k]),
        free: RefCell::new((0..k).rev().collect()),
        freed: Default::default(),
        report: RefCell::new(Report::new()),
        done_sending: Cell::new(false),
    });
    let recv = glommio::spawn_local(receive(reader, st.clone()));
    let period = Duration::from_secs_f64(1.0 / rate);
    // Stagger connections so they do not all fire at the same instant.
    let offset = period.mul_f64(c as f64 / args.connections as f64);
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let mut enc = Encoder::new();
    let mut out = Vec::with_capacity(64 << 10);
    let f16_pool: Vec<u16> = if args.f16 {
        pool.iter()
            .map(|&x| half::f16::from_f32(x).to_bits())
            .collect()
    } else {
        Vec::new()
    };
    let row_len = args.rows * args.width;
    let mut i: u64 = 0;
    loop {
        let intended = start + offset + period.mul_f64(i as f64);
        if intended >= end {
            break;
        }
        let now = Instant::now();
        if intended > now {
            glommio::timer::sleep(intended - now).await;
        }
        // Send everything that is due and fits in the window, in one write.
        out.clear();
        let now = Instant::now();
        loop {
            let intended = start + offset + period.mul_f64(i as f64);
            if intended > now || intended >= end {
                break;
            }
            let Some(slot) = st.free.borrow_mut().pop() else {
                break;
            };
            let p = (i as usize % args.distinct.max(1)) * row_len;
            let input = if args.f16 {
                Input::F16(&f16_pool[p..p + row_len])
            } else {
                Input::F32(&pool[p..p + row_len])
            };
            let spec = RequestSpec {
                target: &args.target,
                version: None,
                rows: args.rows as u32,
                cols: args.width as u32,
                input,
                deadline_us: None,
                domain: None,
                cache: if args.no_cache {
                    CacheControl::Bypass
                } else {
                    CacheControl::Use
                },
                policy: beast::wire::PolicyOverride::Default,
            };
            let measured = intended >= measure_from;
            st.slots.borrow_mut()[slot] = Some((intended, now, measured));
            enc.request(slot as u64, &spec, &mut out);
            if measured {
                let mut r = st.report.borrow_mut();
                r.sent += 1;
                r.send_lag_max_us = r
                    .send_lag_max_us
                    .max(now.duration_since(intended).as_micros() as u64);
            }
            i += 1;
        }
        if out.is_empty() {
            // Window full: wait for a response to free a slot.
            st.freed.wait().await;
            continue;
        }
        writer
            .write_all(&out)
            .await
            .map_err(|e| format!("write: {e}"))?;
    }
    st.done_sending.set(true);
    // Give outstanding requests a grace period, then count them unanswered.
    let grace = Instant::now() + Duration::from_secs(2);
    while st.free.borrow().len() < k && Instant::now() < grace {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    let unanswered = st
        .slots
        .borrow()
        .iter()
        .filter(|s| matches!(s, Some((_, _, true))))
        .count() as u64;
    // SAFETY: the fd is valid; shutting down ends the receiver's read.
    unsafe { libc::shutdown(writer.as_raw_fd(), libc::SHUT_RDWR) };
    let _ = recv.await;
    let mut r = std::mem::replace(&mut *st.report.borrow_mut(), Report::new());
    r.unanswered = unanswered;
    Ok(r)
}

async fn receive(mut reader: TcpStream, st: Rc<ConnState>) {
    let mut buf = vec![0u8; 1 << 20];
    let (mut start, mut end) = (0usize, 0usize);
    loop {
        let n = match reader.read(&mut buf[end..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        end += n;
        let now = Instant::now();
        loop {
            match check_frame(&buf[start..end], usize::MAX >> 1) {
                FrameCheck::Complete { body_len } => {
                    let body = &buf[start + FRAME_HEADER_LEN..start + FRAME_HEADER_LEN + body_len];
                    if let Ok(v) = decode_response(body) {
                        let slot = v.id as usize;
                        let entry = st.slots.borrow_mut().get_mut(slot).and_then(|s| s.take());
                        if let Some((intended, sent, measured)) = entry {
                            st.free.borrow_mut().push(slot);
                            st.freed.notify();
                            if measured {
                                let mut r = st.report.borrow_mut();
                                r.by_status[v.status as usize] += 1;
                                if v.status == Status::Ok {
                                    r.ok += 1;
                                    let _ = r.corrected.record(
                                        now.duration_since(intended).as_micros().max(1) as u64,
                                    );
                                    let _ = r
                                        .uncorrected
                                        .record(now.duration_since(sent).as_micros().max(1) as u64);
                                    r.server_queue_us += v.timings.queue_us as u64;
                                    r.server_compute_us += v.timings.compute_us as u64;
                                }
                            }
                        }
                    }
                    start += FRAME_HEADER_LEN + body_len;
                }
                FrameCheck::Incomplete => break,
                FrameCheck::Invalid { .. } => return,
            }
        }
        if start == end {
            start = 0;
            end = 0;
        } else if start > 0 {
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
        }
        if end == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

fn print_report(args: &Args, r: &Report, cpu_s: f64) {
    let achieved = r.ok as f64 / args.duration;
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let qs = [0.5, 0.9, 0.95, 0.99, 0.999];
    let lag_ms = r.send_lag_max_us as f64 / 1000.0;
    // The generator kept its schedule if no send lagged by more than 1 ms.
    let generator_limited =
        lag_ms > 1.0 && r.corrected.value_at_quantile(0.5) as f64 / 1000.0 <= lag_ms;
    if args.json {
        let pct = |h: &Histogram<u64>| {
            qs.iter()
                .map(|&q| format!("\"p{}\": {:.3}", q * 100.0, ms(h, q)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "{{\"target\": \"{}\", \"rows\": {}, \"connections\": {}, \"in_flight\": {}, \"offered_rps\": {:.1}, \"achieved_rps\": {:.1}, \"sent\": {}, \"ok\": {}, \"errors\": {{{}}}, \"unanswered\": {}, \"latency_ms\": {{{}, \"max\": {:.3}}}, \"uncorrected_ms\": {{{}, \"max\": {:.3}}}, \"send_lag_max_ms\": {:.3}, \"client_cpu_s\": {:.2}, \"server_mean_queue_us\": {:.1}, \"server_mean_compute_us\": {:.1}}}",
            args.target,
            args.rows,
            args.connections,
            args.in_flight,
            args.rate,
            achieved,
            r.sent,
            r.ok,
            Status::ALL.iter().skip(1).map(|s| format!("\"{}\": {}", s.label(), r.by_status[*s as usize])).collect::<Vec<_>>().join(", "),
            r.unanswered,
            pct(&r.corrected),
            r.corrected.max() as f64 / 1000.0,
            pct(&r.uncorrected),
            r.uncorrected.max() as f64 / 1000.0,
            lag_ms,
            cpu_s,
            r.server_queue_us as f64 / r.ok.max(1) as f64,
            r.server_compute_us as f64 / r.ok.max(1) as f64,
        );
        return;
    }
    println!("beast-bench: target {} ({} row(s)/request), {} connections x {} in flight, {:.0}s measured after {:.0}s warm-up", args.target, args.rows, args.connections, args.in_flight, args.duration, args.warmup);
    println!("  offered   {:>12.0} req/s", args.rate);
    println!(
        "  achieved  {:>12.0} req/s ({} ok of {} sent)",
        achieved, r.ok, r.sent
    );
    println!("  latency (ms)      p50      p90      p95      p99    p99.9      max");
    for (name, h) in [("corrected", &r.corrected), ("uncorrected", &r.uncorrected)] {
        println!(
            "  {:<12} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
            name,
            ms(h, 0.5),
            ms(h, 0.9),
            ms(h, 0.95),
            ms(h, 0.99),
            ms(h, 0.999),
            h.max() as f64 / 1000.0
        );
    }
    let errs: Vec<String> = Status::ALL
        .iter()
        .skip(1)
        .filter(|s| r.by_status[**s as usize] > 0)
        .map(|s| format!("{} {}", s.label(), r.by_status[*s as usize]))
        .collect();
    println!(
        "  errors    {}; unanswered {}",
        if errs.is_empty() {
            "none".to_string()
        } else {
            errs.join(", ")
        },
        r.unanswered
    );
    println!(
        "  server    mean queue {:.1} us, mean compute {:.1} us (per request, as reported)",
        r.server_queue_us as f64 / r.ok.max(1) as f64,
        r.server_compute_us as f64 / r.ok.max(1) as f64
    );
    println!(
        "  generator cpu {:.2} s, max send lag {:.3} ms{}",
        cpu_s,
        lag_ms,
        if generator_limited {
            "  <-- the generator could not keep the schedule: results are a lower bound on the server"
        } else {
            ""
        }
    );
}

/// The same single-waiter notify the server uses, local to this tool.
mod beast_notify {
    use std::cell::Cell;
    use std::future::poll_fn;
    use std::task::{Poll, Waker};

    #[derive(Default)]
    pub struct Notify {
        flag: Cell<bool>,
        waker: Cell<Option<Waker>>,
    }

    impl Notify {
        pub fn notify(&self) {
            self.flag.set(true);
            if let Some(w) = self.waker.take() {
                w.wake();
            }
        }
        pub async fn wait(&self) {
            poll_fn(|cx| {
                if self.flag.replace(false) {
                    Poll::Ready(())
                } else {
                    self.waker.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            })
            .await
        }
    }
}
