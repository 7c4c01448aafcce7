//! The engine: one glommio executor per generator CPU, each driving its
//! share of the connections. Per connection a sender task follows the
//! schedule (open loop: uniform/Poisson arrivals or a trace; closed loop:
//! refill the window as responses return) and a receiver task matches
//! responses to their slot and records latencies. Nothing on the per-request
//! path allocates: the encoder, the output buffer, the slot table and the
//! histograms are sized up front.

use super::dist::{Arrivals, Mix, Rng, TargetSpec, Zipf};
use super::frames::{connections_of, TargetFrames, PREBUILT_BYTES_MAX};
use super::inputs::Pool;
use super::watchdog;
use beast::wire::{
    check_frame, CacheControl, Encoder, FrameCheck, HeadReader, Input, RequestSpec, ResponseHead,
    Status, FRAME_HEADER_LEN,
};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How requests are scheduled.
#[derive(Clone)]
pub enum Mode {
    /// Open loop at `rate` req/s in total.
    Open { rate: f64, arrivals: Arrivals },
    /// Each connection keeps `in_flight` outstanding.
    Closed,
    /// Replay: per connection, (offset µs from start, target index, row).
    Trace(Vec<Vec<(u64, u32, u32)>>),
}

/// Which input row a request carries (when not from a trace).
#[derive(Clone)]
pub enum RowDist {
    Uniform(usize),
    Zipf(Arc<Zipf>),
}

/// Everything a run needs, shared read-only by the generator threads.
#[derive(Clone)]
pub struct Plan {
    /// The server, or the nodes of `--server a,b,c`: each connection then
    /// has one socket per node and sends each request to the node that
    /// `beast::client::route` picks for it.
    pub addrs: Vec<SocketAddr>,
    /// With several nodes: per target, the node of each pool row.
    pub route: Option<Arc<Vec<Vec<u8>>>>,
    pub targets: Vec<TargetSpec>,
    /// Input pool of each target (targets of one width share one).
    pub pools: Vec<Arc<Pool>>,
    pub rows: usize,
    pub f16: bool,
    pub no_cache: bool,
    /// Every request's `deadline_us`.
    pub deadline_us: Option<u64>,
    pub connections: usize,
    pub in_flight: usize,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub seed: u64,
    pub row_dist: RowDist,
    pub mode: Mode,
    pub record_trace: bool,
    pub cpus: Vec<Option<usize>>,
    /// Copy frames encoded once before the run (see `frames.rs`) when they fit.
    pub prebuilt: bool,
}

pub(super) fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds")
}

/// What one thread (or, merged, the whole run) measured. Times in µs.
pub struct Report {
    pub corrected: Histogram<u64>,
    pub uncorrected: Histogram<u64>,
    /// The server's own `total_us` per OK response.
    pub server_total: Histogram<u64>,
    /// The generator's own lateness per send: actual send minus the later
    /// of the intended time and the moment a window slot was free. Lag
    /// caused by a full window (the server being slow) is not counted.
    pub send_lag: Histogram<u64>,
    pub sent: u64,
    pub ok: u64,
    pub cached: u64,
    /// OK answers marked `partial` (an ensemble cut off by its deadline).
    pub partial: u64,
    /// OK answers received later than the deadline + [`LATE_SLACK_US`]
    /// after their actual send (with `--deadline-us`).
    pub late: u64,
    /// OK answers whose server-side time (`total_us`) exceeds the deadline
    /// + [`LATE_SLACK_US`].
    pub late_server: u64,
    /// A connection found the server gone (closed or reset) before the end.
    pub server_gone: bool,
    pub by_status: [u64; 6],
    pub unanswered: u64,
    /// Requests due in the measured window that never got a window slot
    /// before the run ended (the schedule fell behind).
    pub unsent: u64,
    /// Times a due request found its connection's window full.
    pub window_full: u64,
    /// Returns of the generator's wait over the measured window (the lean
    /// engine's `epoll_pwait2`; `None` with the glommio engine).
    pub wakes: Option<u64>,
    pub server_queue_us: u64,
    pub server_compute_us: u64,
    /// CPU seconds of each generator thread over the measured window.
    pub thread_cpu_s: Vec<f64>,
    pub trace: Vec<(u64, u32, u32)>,
    /// Per target of a mix (empty when there is one target).
    pub per_target: Vec<TargetStats>,
    /// Per node of `--server a,b,c` (empty with one server).
    pub per_node: Vec<NodeStats>,
}

/// One node's share of a run against several.
pub struct NodeStats {
    pub corrected: Histogram<u64>,
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    pub unanswered: u64,
}

impl NodeStats {
    /// A node's figures from its own report.
    fn of(r: &Report) -> Self {
        let mut corrected = hist();
        let _ = corrected.add(&r.corrected);
        NodeStats {
            corrected,
            sent: r.sent,
            ok: r.ok,
            errors: r.errors(),
            unanswered: r.unanswered,
        }
    }
}

/// One target's share of a mixed run.
pub struct TargetStats {
    pub corrected: Histogram<u64>,
    pub ok: u64,
    pub errors: u64,
}

impl TargetStats {
    pub(super) fn new() -> Self {
        TargetStats {
            corrected: hist(),
            ok: 0,
            errors: 0,
        }
    }
}

impl Report {
    pub fn new() -> Self {
        Report {
            corrected: hist(),
            uncorrected: hist(),
            server_total: hist(),
            send_lag: hist(),
            sent: 0,
            ok: 0,
            cached: 0,
            partial: 0,
            late: 0,
            late_server: 0,
            server_gone: false,
            by_status: [0; 6],
            unanswered: 0,
            unsent: 0,
            window_full: 0,
            wakes: None,
            server_queue_us: 0,
            server_compute_us: 0,
            thread_cpu_s: Vec::new(),
            trace: Vec::new(),
            per_target: Vec::new(),
            per_node: Vec::new(),
        }
    }
    pub fn merge(&mut self, o: Report) {
        // Same bounds everywhere, so add cannot fail.
        let _ = self.corrected.add(&o.corrected);
        let _ = self.uncorrected.add(&o.uncorrected);
        let _ = self.server_total.add(&o.server_total);
        let _ = self.send_lag.add(&o.send_lag);
        self.sent += o.sent;
        self.ok += o.ok;
        self.cached += o.cached;
        self.partial += o.partial;
        self.late += o.late;
        self.late_server += o.late_server;
        self.server_gone |= o.server_gone;
        for i in 0..6 {
            self.by_status[i] += o.by_status[i];
        }
        self.unanswered += o.unanswered;
        self.unsent += o.unsent;
        self.window_full += o.window_full;
        if let Some(w) = o.wakes {
            self.wakes = Some(self.wakes.unwrap_or(0) + w);
        }
        self.server_queue_us += o.server_queue_us;
        self.server_compute_us += o.server_compute_us;
        self.thread_cpu_s.extend(o.thread_cpu_s);
        self.trace.extend(o.trace);
        if self.per_target.is_empty() {
            self.per_target = o.per_target;
        } else {
            for (a, b) in self.per_target.iter_mut().zip(o.per_target) {
                let _ = a.corrected.add(&b.corrected);
                a.ok += b.ok;
                a.errors += b.errors;
            }
        }
        if self.per_node.is_empty() {
            self.per_node = o.per_node;
        } else {
            for (a, b) in self.per_node.iter_mut().zip(o.per_node) {
                let _ = a.corrected.add(&b.corrected);
                a.sent += b.sent;
                a.ok += b.ok;
                a.errors += b.errors;
                a.unanswered += b.unanswered;
            }
        }
    }
    pub fn errors(&self) -> u64 {
        self.by_status[1..].iter().sum()
    }
}

/// An OK answer later than its deadline by more than this is late.
pub const LATE_SLACK_US: u64 = 1000;

/// Measured window of the plan, in seconds from the start.
pub fn window(plan: &Plan) -> (f64, f64) {
    (plan.warmup_s, plan.warmup_s + plan.duration_s)
}

/// Run the plan once; returns the merged report and the process CPU seconds.
pub fn run(plan: Arc<Plan>) -> Result<(Report, f64), String> {
    // Connections need a moment to open before the schedule starts.
    let start = Instant::now() + Duration::from_millis(100 + 20 * plan.connections.min(50) as u64);
    let cpu0 = process_cpu_s();
    let nthreads = plan.cpus.len();
    let frames = prebuild(&plan);
    let mut handles = Vec::new();
    let threads = watchdog::Threads::default();
    let (_, w1) = window(&plan);
    // The run's end plus the 2 s grace for outstanding answers.
    let _watchdog =
        watchdog::Watchdog::start(threads.clone(), start + Duration::from_secs_f64(w1 + 2.0));
    for (t, cpu) in plan.cpus.iter().enumerate() {
        let plan = plan.clone();
        let frames = frames.clone();
        let threads = threads.clone();
        let placement = match cpu {
            Some(c) => Placement::Fixed(*c),
            None => Placement::Unbound,
        };
        let h = LocalExecutorBuilder::new(placement)
            .name("beast-bench")
            .io_memory(512 << 10)
            .spawn(move || async move {
                let _watched = watchdog::register(&threads);
                run_thread(t, nthreads, plan, frames, start).await
            })
            .map_err(|e| format!("--cpus: cannot start a generator thread on {cpu:?}: {e}"))?;
        handles.push(h);
    }
    let joined = handles.into_iter().map(|h| {
        h.join()
            .map_err(|e| format!("generator thread failed: {e}"))
    });
    Ok((merge_joined(joined)?, process_cpu_s() - cpu0))
}

/// Every generator thread's report merged into one, or the first error
/// (joining them all either way: each engine's threads end on their own).
pub fn merge_joined(
    joined: impl Iterator<Item = Result<Result<Report, String>, String>>,
) -> Result<Report, String> {
    let mut total = Report::new();
    let mut err = None;
    for j in joined {
        match j.and_then(|r| r) {
            Ok(r) => total.merge(r),
            Err(e) => err = err.or(Some(e)),
        }
    }
    err.map_or(Ok(total), Err)
}

pub fn process_cpu_s() -> f64 {
    rusage_s(libc::RUSAGE_SELF)
}

pub(super) fn rusage_s(who: libc::c_int) -> f64 {
    // SAFETY: getrusage only fills the struct we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Every target's requests encoded once, one frame per pool row (rows are
/// drawn modulo the pool, as `Pool::get` does); `None` when turned off
/// (`--encode-each`) or when they would not fit in `PREBUILT_BYTES_MAX`.
pub(super) fn prebuild(plan: &Plan) -> Option<Arc<Vec<TargetFrames>>> {
    if !plan.prebuilt {
        return None;
    }
    let mut total = 0usize;
    for (t, pool) in plan.targets.iter().zip(&plan.pools) {
        let elem = if plan.f16 { 2 } else { 4 };
        total = total.saturating_add(pool.len().saturating_mul(plan.rows * t.width * elem + 256));
    }
    if total > PREBUILT_BYTES_MAX {
        return None;
    }
    let cache = if plan.no_cache {
        CacheControl::Bypass
    } else {
        CacheControl::Use
    };
    let mut scratch = Vec::new();
    let mut half = Vec::new();
    let mut all = Vec::with_capacity(plan.targets.len());
    for (target, pool) in plan.targets.iter().zip(&plan.pools) {
        let f = TargetFrames::build(pool.len(), |row, k| {
            let x = pool.get(row, &mut scratch);
            let input = if plan.f16 {
                half.clear();
                half.extend(x.iter().map(|&v| ::half::f16::from_f32(v).to_bits()));
                Input::F16(&half)
            } else {
                Input::F32(x)
            };
            k(&request(plan, target, input, cache))
        })?;
        all.push(f);
    }
    Some(Arc::new(all))
}

async fn run_thread(
    t: usize,
    nthreads: usize,
    plan: Arc<Plan>,
    frames: Option<Arc<Vec<TargetFrames>>>,
    start: Instant,
) -> Result<Report, String> {
    let mut tasks = Vec::new();
    for c in connections_of(t, nthreads, plan.connections) {
        let mut streams = Vec::with_capacity(plan.addrs.len());
        for addr in &plan.addrs {
            let stream = TcpStream::connect(*addr)
                .await
                .map_err(|e| format!("connect {addr}: {e}"))?;
            stream
                .set_nodelay(true)
                .map_err(|e| format!("set_nodelay: {e}"))?;
            streams.push(stream);
        }
        tasks.push(glommio::spawn_local(run_conn(
            c,
            streams,
            plan.clone(),
            frames.clone(),
            start,
        )));
    }
    // Sample this thread's CPU over the measured window (or until the
    // server went away, when that ends the run early).
    let (w0, w1) = window(&plan);
    let c0 = Rc::new(Cell::new(None));
    let c0_set = c0.clone();
    let _sampler = glommio::spawn_local(async move {
        sleep_until(start + Duration::from_secs_f64(w0)).await;
        c0_set.set(Some(rusage_s(libc::RUSAGE_THREAD)));
    });
    let mut report = Report::new();
    let mut err = None;
    for task in tasks {
        match task.await {
            Ok(r) => report.merge(r),
            Err(e) => err = err.or(Some(e)),
        }
    }
    if !report.server_gone {
        sleep_until(start + Duration::from_secs_f64(w1)).await;
    }
    let cpu = c0
        .get()
        .map_or(0.0, |c0| rusage_s(libc::RUSAGE_THREAD) - c0);
    report.thread_cpu_s.push(cpu);
    match err {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

async fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        glommio::timer::sleep(t - now).await;
    }
}

/// (intended send, actual send, measured?, target index).
pub(super) type Outstanding = (Instant, Instant, bool, u32);

/// Per-socket bookkeeping shared by its connection's sender and the
/// socket's receiver task (one socket per node).
struct ConnState {
    /// Slot → (intended send, actual send, measured?, target) of an
    /// outstanding request; the wire id is slot + 1 (the protocol reserves
    /// id 0).
    slots: RefCell<Vec<Option<Outstanding>>>,
    free: RefCell<Vec<usize>>,
    /// Shared by the connection's sockets: the sender waits on any.
    freed: Rc<Notify>,
    report: RefCell<Report>,
    /// The request budget, for counting late answers.
    deadline_us: Option<u64>,
    /// The receiver saw the connection end (the server went away).
    closed: Cell<bool>,
}

/// The connection's schedule: yields (intended offset s, target, row).
pub(super) enum Schedule<'a> {
    Open {
        next_s: f64,
        rate: f64,
        arrivals: Arrivals,
    },
    Closed,
    Trace {
        entries: &'a [(u64, u32, u32)],
        i: usize,
    },
}

async fn run_conn(
    c: usize,
    readers: Vec<TcpStream>,
    plan: Arc<Plan>,
    frames: Option<Arc<Vec<TargetFrames>>>,
    start: Instant,
) -> Result<Report, String> {
    let k = plan.in_flight;
    let freed = Rc::new(Notify::default());
    let (mut writers, mut states, mut recvs) = (Vec::new(), Vec::new(), Vec::new());
    for reader in readers {
        // SAFETY: dup gives the writer half its own fd on the same socket.
        let wfd = unsafe { libc::dup(reader.as_raw_fd()) };
        if wfd < 0 {
            return Err("dup failed".into());
        }
        // SAFETY: a fresh fd owned by this stream alone.
        writers.push(unsafe { TcpStream::from_raw_fd(wfd) });
        let st = Rc::new(ConnState {
            slots: RefCell::new(vec![None; k]),
            free: RefCell::new((0..k).rev().collect()),
            freed: freed.clone(),
            report: RefCell::new({
                let mut r = Report::new();
                if plan.targets.len() > 1 {
                    r.per_target = plan.targets.iter().map(|_| TargetStats::new()).collect();
                }
                r
            }),
            deadline_us: plan.deadline_us,
            closed: Cell::new(false),
        });
        recvs.push(glommio::spawn_local(receive(reader, st.clone())));
        states.push(st);
    }
    // One output buffer per node, written after each burst.
    let mut outs: Vec<Vec<u8>> = states
        .iter()
        .map(|_| Vec::with_capacity(64 << 10))
        .collect();
    let (w0, w1) = window(&plan);
    let measure_from = start + Duration::from_secs_f64(w0);
    let mut rng = Rng::new(plan.seed.wrapping_add(c as u64 * 0x1000_0000_01B3));
    let mix = Mix::new(&plan.targets);
    let (mut sched, end) = schedule(&plan, c, start, &mut rng);
    let mut trace = Vec::new();
    if plan.record_trace {
        let expect = match &plan.mode {
            Mode::Open { rate, .. } => (rate / plan.connections as f64 * w1 * 1.1) as usize + 16,
            _ => 1024,
        };
        trace.reserve(expect.min(1 << 24));
    }
    let mut enc = Encoder::new();
    let mut scratch = Vec::new();
    let mut half = Vec::new();
    let cache = if plan.no_cache {
        CacheControl::Bypass
    } else {
        CacheControl::Use
    };
    let mut unblocked_at = start;
    let draw = |rng: &mut Rng| draw(&plan, &mix, rng);
    let mut due: Option<(Instant, u32, u32)> = None;
    loop {
        // The next request on the schedule.
        if due.is_none() {
            due = match &mut sched {
                Schedule::Open { next_s, .. } => {
                    let (t, r) = draw(&mut rng);
                    Some((start + Duration::from_secs_f64(*next_s), t, r))
                }
                Schedule::Closed => {
                    let (t, r) = draw(&mut rng);
                    Some((Instant::now().max(start), t, r))
                }
                Schedule::Trace { entries, i } => entries
                    .get(*i)
                    .map(|&(o, t, r)| (start + Duration::from_micros(o), t, r)),
            };
        }
        let Some((intended, _, _)) = due else { break };
        if intended >= end {
            break;
        }
        sleep_until(intended).await;
        for out in outs.iter_mut() {
            out.clear();
        }
        let now = Instant::now();
        let mut stalled = false;
        let closed = matches!(sched, Schedule::Closed);
        while let Some((intended, t, row)) = due {
            if intended > now || intended >= end {
                break;
            }
            // Closed loop: a request is due when its slot frees, so it is never late.
            let intended = if closed { now } else { intended };
            let node = match &plan.route {
                Some(r) => r[t as usize][row as usize % r[t as usize].len()] as usize,
                None => 0,
            };
            let (st, out) = (&states[node], &mut outs[node]);
            let Some(slot) = st.free.borrow_mut().pop() else {
                stalled = true;
                break;
            };
            let measured = intended >= measure_from;
            st.slots.borrow_mut()[slot] = Some((intended, now, measured, t));
            if let Some(f) = &frames {
                f[t as usize].push(row as usize, slot as u64 + 1, out);
            } else {
                let target = &plan.targets[t as usize];
                let x = plan.pools[t as usize].get(row as usize, &mut scratch);
                let input = if plan.f16 {
                    half.clear();
                    half.extend(x.iter().map(|&v| ::half::f16::from_f32(v).to_bits()));
                    Input::F16(&half)
                } else {
                    Input::F32(x)
                };
                let spec = request(&plan, target, input, cache);
                enc.request(slot as u64 + 1, &spec, out);
            }
            if measured {
                let mut r = st.report.borrow_mut();
                r.sent += 1;
                let _ = r.send_lag.record(
                    now.saturating_duration_since(intended.max(unblocked_at))
                        .as_micros() as u64,
                );
            }
            if plan.record_trace {
                trace.push((
                    intended.saturating_duration_since(start).as_micros() as u64,
                    t,
                    row,
                ));
            }
            due = advance(&mut sched, &mut rng, &draw, start, now);
        }
        let mut gone = false;
        for ((out, writer), st) in outs.iter().zip(writers.iter_mut()).zip(&states) {
            // The server went away (broken pipe, reset): stop sending and
            // report what was answered; the rest is unanswered or unsent.
            if (!out.is_empty() && writer.write_all(out).await.is_err()) || st.closed.get() {
                st.report.borrow_mut().server_gone = true;
                gone = true;
            }
        }
        if gone {
            break;
        }
        if stalled || closed {
            if stalled && !closed && due.is_some_and(|d| d.0 >= measure_from) {
                states[0].report.borrow_mut().window_full += 1;
            }
            // Wait for a response to free a slot (or the end of the run).
            let now = Instant::now();
            if now >= end {
                break;
            }
            futures_lite::future::or(freed.wait(), glommio::timer::sleep(end - now)).await;
            unblocked_at = Instant::now();
        }
    }
    // Requests the schedule wanted sent in the measured window but that were
    // still waiting for a window slot when the run ended.
    let mut unsent = 0;
    if !matches!(sched, Schedule::Closed) {
        while let Some((intended, _, _)) = due {
            if intended >= end {
                break;
            }
            unsent += (intended >= measure_from) as u64;
            due = advance(&mut sched, &mut rng, &draw, start, end);
        }
    }
    // Give outstanding requests a grace period, then count them unanswered.
    let grace = Instant::now() + Duration::from_secs(2);
    while states
        .iter()
        .any(|st| st.free.borrow().len() < k && !st.closed.get())
        && Instant::now() < grace
    {
        glommio::timer::sleep(Duration::from_millis(2)).await;
    }
    let mut r = Report::new();
    let mut per_node = Vec::new();
    for ((st, writer), recv) in states.iter().zip(&writers).zip(recvs) {
        let unanswered = st
            .slots
            .borrow()
            .iter()
            .filter(|s| matches!(s, Some((_, _, true, _))))
            .count() as u64;
        // SAFETY: the fd is valid; shutting it down ends the receiver's read.
        unsafe { libc::shutdown(writer.as_raw_fd(), libc::SHUT_RDWR) };
        let _ = recv.await;
        let mut node = std::mem::replace(&mut *st.report.borrow_mut(), Report::new());
        node.unanswered = unanswered;
        if plan.addrs.len() > 1 {
            per_node.push(NodeStats::of(&node));
        }
        r.merge(node);
    }
    r.per_node = per_node;
    r.unsent = unsent;
    r.trace = trace;
    Ok(r)
}

/// With several nodes, the node of every (target, pool row): the
/// rendezvous rule of `beast::client::route` on the bytes sent.
pub fn route_table(
    addrs: &[SocketAddr],
    targets: &[TargetSpec],
    pools: &[Arc<Pool>],
    f16: bool,
) -> Option<Arc<Vec<Vec<u8>>>> {
    use beast::client::route;
    if addrs.len() < 2 {
        return None;
    }
    let seeds: Vec<u64> = addrs
        .iter()
        .map(|a| route::node_seed(&a.to_string()))
        .collect();
    let (mut scratch, mut half) = (Vec::new(), Vec::new());
    let table = targets
        .iter()
        .zip(pools)
        .map(|(t, pool)| {
            (0..pool.len())
                .map(|row| {
                    let x = pool.get(row, &mut scratch);
                    let input = if f16 {
                        half.clear();
                        half.extend(x.iter().map(|&v| ::half::f16::from_f32(v).to_bits()));
                        Input::F16(&half)
                    } else {
                        Input::F32(x)
                    };
                    let key = route::request_key(&t.name, &input);
                    route::best(key, &seeds, |_| true).unwrap_or(0) as u8
                })
                .collect()
        })
        .collect();
    Some(Arc::new(table))
}

/// Connection `c`'s schedule and the end of its sending (the measured
/// window's end; a trace's last request).
pub(super) fn schedule<'a>(
    plan: &'a Plan,
    c: usize,
    start: Instant,
    rng: &mut Rng,
) -> (Schedule<'a>, Instant) {
    let mut end = start + Duration::from_secs_f64(window(plan).1);
    let sched = match &plan.mode {
        Mode::Open { rate, arrivals } => {
            let rate = rate / plan.connections as f64;
            // Stagger uniform connections so they do not all fire at once.
            let first = match arrivals {
                Arrivals::Uniform => c as f64 / plan.connections as f64 / rate,
                Arrivals::Poisson => arrivals.gap_s(rate, rng),
            };
            Schedule::Open {
                next_s: first,
                rate,
                arrivals: *arrivals,
            }
        }
        Mode::Closed => Schedule::Closed,
        Mode::Trace(per_conn) => {
            // A trace ends with its last request, not after --duration.
            if let Some(last) = per_conn.iter().filter_map(|v| v.last()).map(|e| e.0).max() {
                end = start + Duration::from_micros(last + 1);
            }
            Schedule::Trace {
                entries: &per_conn[c],
                i: 0,
            }
        }
    };
    (sched, end)
}

/// Draw (target, row) for the next request.
pub(super) fn draw(plan: &Plan, mix: &Mix, rng: &mut Rng) -> (u32, u32) {
    let t = mix.pick(rng);
    let row = match &plan.row_dist {
        RowDist::Uniform(n) => rng.below(*n),
        RowDist::Zipf(z) => z.sample(rng),
    };
    (t as u32, row as u32)
}

/// The request after the one just sent (`now`: its send time, for the closed loop).
pub(super) fn advance(
    sched: &mut Schedule,
    rng: &mut Rng,
    draw: &impl Fn(&mut Rng) -> (u32, u32),
    start: Instant,
    now: Instant,
) -> Option<(Instant, u32, u32)> {
    match sched {
        Schedule::Open {
            next_s,
            rate,
            arrivals,
        } => {
            *next_s += arrivals.gap_s(*rate, rng);
            let (t, r) = draw(rng);
            Some((start + Duration::from_secs_f64(*next_s), t, r))
        }
        Schedule::Closed => {
            let (t, r) = draw(rng);
            Some((now, t, r))
        }
        Schedule::Trace { entries, i } => {
            *i += 1;
            entries
                .get(*i)
                .map(|&(o, t, r)| (start + Duration::from_micros(o), t, r))
        }
    }
}

async fn receive(reader: TcpStream, st: Rc<ConnState>) {
    receive_frames(reader, &st).await;
    st.closed.set(true);
    // Wake a sender waiting for a free slot: none will come.
    st.freed.notify();
}

async fn receive_frames(mut reader: TcpStream, st: &ConnState) {
    let mut buf = vec![0u8; 1 << 20];
    let mut heads = HeadReader::new();
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
                    if let Ok(v) = heads.read(body) {
                        let slot = (v.id as usize).wrapping_sub(1);
                        let entry = st.slots.borrow_mut().get_mut(slot).and_then(|s| s.take());
                        if let Some(entry) = entry {
                            st.free.borrow_mut().push(slot);
                            st.freed.notify();
                            account(&mut st.report.borrow_mut(), entry, &v, now, st.deadline_us);
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

/// Count the answer `v`, received at `now`, of the outstanding request
/// `entry` into `r` (nothing when the request was sent before the measured
/// window). Both engines count through here.
pub(super) fn account(
    r: &mut Report,
    entry: Outstanding,
    v: &ResponseHead,
    now: Instant,
    deadline_us: Option<u64>,
) {
    let (intended, sent, measured, t) = entry;
    if !measured {
        return;
    }
    r.by_status[v.status as usize] += 1;
    let corrected = now.duration_since(intended).as_micros().max(1) as u64;
    if let Some(ts) = r.per_target.get_mut(t as usize) {
        if v.status == Status::Ok {
            ts.ok += 1;
            let _ = ts.corrected.record(corrected);
        } else {
            ts.errors += 1;
        }
    }
    if v.status == Status::Ok {
        r.ok += 1;
        r.cached += v.cached as u64;
        r.partial += v.partial as u64;
        if let Some(d) = deadline_us {
            let limit = d + LATE_SLACK_US;
            let took = now.duration_since(sent).as_micros() as u64;
            r.late += (took > limit) as u64;
            r.late_server += (v.timings.total_us as u64 > limit) as u64;
        }
        let _ = r.corrected.record(corrected);
        let _ = r
            .uncorrected
            .record(now.duration_since(sent).as_micros().max(1) as u64);
        let _ = r.server_total.record((v.timings.total_us as u64).max(1));
        r.server_queue_us += v.timings.queue_us as u64;
        r.server_compute_us += v.timings.compute_us as u64;
    }
}

/// A single-waiter notify (the same shape the server uses).
#[derive(Default)]
struct Notify {
    flag: Cell<bool>,
    waker: Cell<Option<std::task::Waker>>,
}

impl Notify {
    fn notify(&self) {
        self.flag.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
    async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.flag.replace(false) {
                std::task::Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                std::task::Poll::Pending
            }
        })
        .await
    }
}

/// The request the plan sends for `target` with this input.
pub(super) fn request<'a>(
    plan: &Plan,
    target: &'a TargetSpec,
    input: Input<'a>,
    cache: CacheControl,
) -> RequestSpec<'a> {
    RequestSpec {
        target: &target.name,
        version: None,
        rows: plan.rows as u32,
        cols: target.width as u32,
        input,
        deadline_us: plan.deadline_us,
        domain: None,
        cache,
        policy: beast::wire::PolicyOverride::Default,
    }
}
