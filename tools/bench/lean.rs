//! The lean engine (the default against one server): per generator thread
//! one epoll loop over its share of the connections, built like
//! redis-benchmark and examples/hit_load.rs rather than on glommio's
//! streams. Why: a glommio executor waits through io_uring polls whose
//! every completion the kernel signals with an IPI, paid by the *server*
//! that sends the answer (perf/profile-hit.md), and its per-connection
//! sender and receiver tasks with their wakers made one thread top out at
//! ~0.5–0.65 M answers/s on the shared VM while the server had room.
//!
//! Per wake of `epoll_wait`, for each connection with something to read:
//! one `read` into the connection's own buffer (again only if it filled
//! the buffer), every whole frame in it read in place (`wire::HeadReader`:
//! the flatbuffers verifier runs once per layout of answer) and counted
//! (`load::account`, the same figures as the glommio engine), what is left
//! of a split frame moved to the front; then every request the schedule
//! allows (closed loop: one per freed slot; open loop and traces: those
//! due within the next [`LOOKAHEAD`], so that one wake serves several)
//! appended from the pre-encoded frames (`frames.rs`) to one output
//! buffer and sent with one `write`. A write the socket does not take
//! whole waits for `EPOLLOUT`. Nothing on this path allocates once the
//! buffers have grown to the largest burst.
//!
//! The schedule, the slot table (wire id = slot + 1), send lag, window-full
//! counts, unanswered/unsent and the thread CPU over the measured window
//! are kept exactly as `load.rs` keeps them; the watchdog nudges these
//! threads too (an `EINTR` from `epoll_wait` is one more turn).

use super::dist::{Mix, Rng};
use super::frames::{connections_of, TargetFrames};
use super::load::{
    account, advance, draw, prebuild, request, rusage_s, schedule, window, Outstanding, Plan,
    Report, Schedule, TargetStats,
};
use super::watchdog;
use beast::wire::{
    check_frame, CacheControl, Encoder, FrameCheck, HeadReader, Input, FRAME_HEADER_LEN,
};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// First size of a connection's read buffer (it doubles when a frame does
/// not fit).
const READ_BUF: usize = 64 << 10;

/// Open loop and traces: a wake sends every request due up to this far
/// ahead, so that one wake (and one write per connection) covers the
/// requests of the next few tens of µs instead of waking for each. A
/// request goes out at most this much before its intended time; its
/// latency then counts from the actual send (the earlier of the two), and
/// its send lag is 0, so an early send never makes a figure look better.
/// 50 µs: the kernel's default timer slack, by which a wake can already
/// come late.
pub const LOOKAHEAD: Duration = Duration::from_micros(50);

/// Whether the lean engine runs this plan: one server (with several,
/// each connection holds a socket per node and the glommio engine routes).
pub fn applies(plan: &Plan) -> bool {
    plan.addrs.len() == 1
}

struct Conn<'a> {
    s: TcpStream,
    /// Received bytes not yet framed: `rbuf[..rlen]`.
    rbuf: Vec<u8>,
    rlen: usize,
    /// Reads answers, verifying each layout once.
    heads: HeadReader,
    /// Frames to send: `out[out_at..]` (written when the socket takes them).
    out: Vec<u8>,
    out_at: usize,
    /// Registered for EPOLLOUT (a write was left over).
    want_out: bool,
    slots: Vec<Option<Outstanding>>,
    free: Vec<usize>,
    sched: Schedule<'a>,
    rng: Rng,
    due: Option<(Instant, u32, u32)>,
    /// The window was full at the last attempt to send.
    stalled: bool,
    /// When a slot last freed after a stall (send lag is counted from the
    /// later of this and the intended time, as in `load.rs`).
    unblocked_at: Instant,
    closed: bool,
}

/// Run the plan once on the lean engine; the merged report and the process
/// CPU seconds.
pub fn run(plan: Arc<Plan>) -> Result<(Report, f64), String> {
    let start = Instant::now() + Duration::from_millis(100 + 20 * plan.connections.min(50) as u64);
    let cpu0 = super::load::process_cpu_s();
    let nthreads = plan.cpus.len();
    let frames = prebuild(&plan);
    let threads = watchdog::Threads::default();
    let (_, w1) = window(&plan);
    let _watchdog =
        watchdog::Watchdog::start(threads.clone(), start + Duration::from_secs_f64(w1 + 2.0));
    let mut handles = Vec::new();
    for (t, cpu) in plan.cpus.iter().copied().enumerate() {
        let (plan, frames, threads) = (plan.clone(), frames.clone(), threads.clone());
        let h = std::thread::Builder::new()
            .name("beast-bench".into())
            .spawn(move || {
                if let Some(c) = cpu {
                    pin(c)?;
                }
                let _watched = watchdog::register(&threads);
                run_thread(
                    t,
                    nthreads,
                    &plan,
                    frames.as_ref().map(|f| f.as_slice()),
                    start,
                )
            })
            .map_err(|e| format!("cannot start a generator thread: {e}"))?;
        handles.push(h);
    }
    let joined = handles.into_iter().map(|h| {
        h.join()
            .map_err(|_| "generator thread panicked".to_string())
    });
    Ok((
        super::load::merge_joined(joined)?,
        super::load::process_cpu_s() - cpu0,
    ))
}

fn pin(cpu: usize) -> Result<(), String> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls only
    // read and write the set we own and this thread's affinity.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
            return Err(format!("--cpus: no CPU {cpu}"));
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(format!(
                "--cpus: cannot pin a generator thread to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

struct Epoll(i32);

impl Epoll {
    fn new() -> Result<Epoll, String> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(format!(
                "epoll_create1: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Epoll(fd))
    }
    fn ctl(&self, op: i32, fd: i32, events: u32, key: usize) {
        let mut ev = libc::epoll_event {
            events,
            u64: key as u64,
        };
        // SAFETY: `fd` is a live socket this thread owns; a failure (only
        // possible for a closed fd) leaves the set as it was.
        unsafe { libc::epoll_ctl(self.0, op, fd, &mut ev) };
    }
    /// Wait for events until `until` at the latest (nanosecond timeout).
    fn wait(&self, events: &mut [libc::epoll_event], until: Instant) -> usize {
        let d = until.saturating_duration_since(Instant::now());
        let ts = libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `events` is a live buffer of its length; no signal mask.
        let n = unsafe {
            libc::epoll_pwait2(
                self.0,
                events.as_mut_ptr(),
                events.len() as i32,
                &ts,
                std::ptr::null(),
            )
        };
        // EINTR (the watchdog's nudge) is one more turn.
        n.max(0) as usize
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: our own fd, closed once.
        unsafe { libc::close(self.0) };
    }
}

/// What stays the same for every connection of a thread while it sends.
struct Sender<'a> {
    plan: &'a Plan,
    frames: Option<&'a [TargetFrames]>,
    mix: Mix,
    start: Instant,
    measure_from: Instant,
    end: Instant,
    closed_loop: bool,
    enc: Encoder,
    scratch: Vec<f32>,
    half: Vec<u16>,
    cache: CacheControl,
    trace: Vec<(u64, u32, u32)>,
}

fn run_thread(
    t: usize,
    nthreads: usize,
    plan: &Plan,
    frames: Option<&[TargetFrames]>,
    start: Instant,
) -> Result<Report, String> {
    let addr = plan.addrs[0];
    let k = plan.in_flight;
    let ep = Epoll::new()?;
    let mut conns: Vec<Conn> = Vec::new();
    let mut send_end = start;
    for c in connections_of(t, nthreads, plan.connections) {
        let s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_nodelay(true)
            .and_then(|_| s.set_nonblocking(true))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        ep.ctl(
            libc::EPOLL_CTL_ADD,
            s.as_raw_fd(),
            libc::EPOLLIN as u32,
            conns.len(),
        );
        let mut rng = Rng::new(plan.seed.wrapping_add(c as u64 * 0x1000_0000_01B3));
        let (sched, end) = schedule(plan, c, start, &mut rng);
        send_end = send_end.max(end);
        conns.push(Conn {
            s,
            rbuf: vec![0; READ_BUF],
            rlen: 0,
            heads: HeadReader::new(),
            out: Vec::with_capacity(64 << 10),
            out_at: 0,
            want_out: false,
            slots: vec![None; k],
            free: (0..k).rev().collect(),
            sched,
            rng,
            due: None,
            stalled: false,
            unblocked_at: start,
            closed: false,
        });
    }
    let mut report = Report::new();
    if plan.targets.len() > 1 {
        report.per_target = plan.targets.iter().map(|_| TargetStats::new()).collect();
    }
    let (w0, _) = window(plan);
    let mut tx = Sender {
        plan,
        frames,
        mix: Mix::new(&plan.targets),
        start,
        measure_from: start + Duration::from_secs_f64(w0),
        end: send_end,
        closed_loop: matches!(plan.mode, super::load::Mode::Closed),
        enc: Encoder::new(),
        scratch: Vec::new(),
        half: Vec::new(),
        cache: if plan.no_cache {
            CacheControl::Bypass
        } else {
            CacheControl::Use
        },
        trace: Vec::new(),
    };
    if plan.record_trace {
        // As load.rs reserves it: the expected count, so that recording
        // does not allocate while sending.
        let expect = match &plan.mode {
            super::load::Mode::Open { rate, .. } => (rate * window(plan).1 * 1.1) as usize + 16,
            _ => 1024,
        };
        tx.trace.reserve((expect / nthreads).min(1 << 24));
    }
    for c in conns.iter_mut() {
        c.due = first_due(&mut tx, c);
    }
    let now = Instant::now();
    if start > now {
        std::thread::sleep(start - now);
    }
    let mut cpu0 = None;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut touched: Vec<usize> = Vec::with_capacity(conns.len());
    // Sending: every connection sends what it may, then waits for answers
    // or its next due time.
    let mut now = Instant::now();
    let mut live = conns.len();
    let mut wakes = 0u64;
    for (i, c) in conns.iter_mut().enumerate() {
        if !fill_and_write(&mut tx, c, &mut report, now, &ep, i) {
            gone(c, &mut report, &mut live, &ep);
        }
    }
    while live > 0 {
        let mut until = tx.end;
        if cpu0.is_none() {
            until = until.min(tx.measure_from);
        }
        if !tx.closed_loop {
            for c in &conns {
                if let Some((d, _, _)) = c.due {
                    if !c.stalled && !c.closed {
                        until = until.min(d);
                    }
                }
            }
        }
        let n = ep.wait(&mut events, until);
        now = Instant::now();
        if cpu0.is_none() && now >= tx.measure_from {
            cpu0 = Some(rusage_s(libc::RUSAGE_THREAD));
        }
        wakes += (cpu0.is_some() && now < tx.end) as u64;
        touched.clear();
        for e in &events[..n] {
            let i = e.u64 as usize;
            if event(
                &mut conns[i],
                e,
                i,
                &ep,
                &mut report,
                &mut live,
                now,
                plan.deadline_us,
            ) {
                touched.push(i);
            }
        }
        // Requests due before the end go out even when this wake came
        // after it (a trace's last one is due 1 µs before its end).
        if tx.closed_loop {
            for &i in &touched {
                if !fill_and_write(&mut tx, &mut conns[i], &mut report, now, &ep, i) {
                    gone(&mut conns[i], &mut report, &mut live, &ep);
                }
            }
        } else {
            for (i, c) in conns.iter_mut().enumerate() {
                // A stalled connection waits for an answer to free a slot.
                if !c.closed
                    && !c.stalled
                    && c.due.is_some_and(|d| d.0 <= now + LOOKAHEAD)
                    && !fill_and_write(&mut tx, c, &mut report, now, &ep, i)
                {
                    gone(c, &mut report, &mut live, &ep);
                }
            }
        }
        if now >= tx.end {
            break;
        }
    }
    // The thread's CPU over the measured window (or up to the moment
    // every connection was gone).
    let cpu = cpu0.map(|c0| rusage_s(libc::RUSAGE_THREAD) - c0);
    // Requests the schedule wanted sent in the measured window but that
    // were still waiting for a window slot when the run ended.
    let mut unsent = 0;
    if !tx.closed_loop {
        for c in conns.iter_mut() {
            while let Some((intended, _, _)) = c.due {
                if intended >= tx.end {
                    break;
                }
                unsent += (intended >= tx.measure_from) as u64;
                let draw_fn = |rng: &mut Rng| draw(plan, &tx.mix, rng);
                c.due = advance(&mut c.sched, &mut c.rng, &draw_fn, start, tx.end);
            }
        }
    }
    // Outstanding answers get a grace period, then count as unanswered.
    let grace = Instant::now() + Duration::from_secs(2);
    loop {
        let waiting = conns.iter().any(|c| !c.closed && c.free.len() < k);
        now = Instant::now();
        if !waiting || now >= grace {
            break;
        }
        let n = ep.wait(&mut events, grace);
        now = Instant::now();
        for e in &events[..n] {
            let i = e.u64 as usize;
            event(
                &mut conns[i],
                e,
                i,
                &ep,
                &mut report,
                &mut live,
                now,
                plan.deadline_us,
            );
        }
    }
    for c in &conns {
        report.unanswered += c
            .slots
            .iter()
            .filter(|s| matches!(s, Some((_, _, true, _))))
            .count() as u64;
    }
    report.unsent = unsent;
    report.wakes = Some(wakes);
    report.trace = std::mem::take(&mut tx.trace);
    report.thread_cpu_s.push(cpu.unwrap_or(0.0));
    Ok(report)
}

/// The server went away on this connection: it sends no more, and what
/// it had outstanding counts as unanswered.
/// One epoll event on connection `i`: flush what waits to be written,
/// read and count what arrived. False when the connection is (now) closed.
#[allow(clippy::too_many_arguments)]
fn event(
    c: &mut Conn,
    e: &libc::epoll_event,
    i: usize,
    ep: &Epoll,
    report: &mut Report,
    live: &mut usize,
    now: Instant,
    deadline_us: Option<u64>,
) -> bool {
    if c.closed {
        return false;
    }
    let bits = e.events;
    if bits & libc::EPOLLOUT as u32 != 0 && !flush(c, ep, i) {
        gone(c, report, live, ep);
        return false;
    }
    if bits & (libc::EPOLLIN | libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0
        && !receive(c, report, now, deadline_us)
    {
        gone(c, report, live, ep);
        return false;
    }
    true
}

fn gone(c: &mut Conn, report: &mut Report, live: &mut usize, ep: &Epoll) {
    c.closed = true;
    report.server_gone = true;
    *live -= 1;
    // Out of the set, or a shut socket would wake every wait.
    ep.ctl(libc::EPOLL_CTL_DEL, c.s.as_raw_fd(), 0, 0);
    // SAFETY: shutting down a live fd we own; it is closed on drop.
    unsafe { libc::shutdown(c.s.as_raw_fd(), libc::SHUT_RDWR) };
}

fn first_due(tx: &mut Sender, c: &mut Conn) -> Option<(Instant, u32, u32)> {
    match &mut c.sched {
        Schedule::Open { next_s, .. } => {
            let (t, r) = draw(tx.plan, &tx.mix, &mut c.rng);
            Some((tx.start + Duration::from_secs_f64(*next_s), t, r))
        }
        Schedule::Closed => {
            let (t, r) = draw(tx.plan, &tx.mix, &mut c.rng);
            Some((tx.start, t, r))
        }
        Schedule::Trace { entries, i } => entries
            .get(*i)
            .map(|&(o, t, r)| (tx.start + Duration::from_micros(o), t, r)),
    }
}

/// Read what the socket has and count every whole answer. `false` when the
/// server went away (closed, reset, or a frame that cannot be read).
fn receive(c: &mut Conn, report: &mut Report, now: Instant, deadline_us: Option<u64>) -> bool {
    loop {
        if c.rlen == c.rbuf.len() {
            let n = c.rbuf.len() * 2;
            c.rbuf.resize(n, 0);
        }
        let room = c.rbuf.len() - c.rlen;
        let n = match c.s.read(&mut c.rbuf[c.rlen..]) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return false,
        };
        c.rlen += n;
        let mut at = 0;
        loop {
            match check_frame(&c.rbuf[at..c.rlen], usize::MAX >> 1) {
                FrameCheck::Complete { body_len } => {
                    let body = &c.rbuf[at + FRAME_HEADER_LEN..at + FRAME_HEADER_LEN + body_len];
                    if let Ok(v) = c.heads.read(body) {
                        let slot = (v.id as usize).wrapping_sub(1);
                        if let Some(entry) = c.slots.get_mut(slot).and_then(|s| s.take()) {
                            c.free.push(slot);
                            account(report, entry, &v, now, deadline_us);
                        }
                    }
                    at += FRAME_HEADER_LEN + body_len;
                }
                FrameCheck::Incomplete => break,
                FrameCheck::Invalid { .. } => return false,
            }
        }
        // What is left of a split frame moves to the front.
        c.rbuf.copy_within(at..c.rlen, 0);
        c.rlen -= at;
        if c.stalled && !c.free.is_empty() {
            c.stalled = false;
            c.unblocked_at = now;
        }
        // A read that did not fill the room took all there was (level
        // triggered: anything later wakes the loop again).
        if n < room {
            return true;
        }
    }
}

/// Write what is pending; `false` when the server went away.
fn flush(c: &mut Conn, ep: &Epoll, key: usize) -> bool {
    while c.out_at < c.out.len() {
        match c.s.write(&c.out[c.out_at..]) {
            Ok(n) => c.out_at += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    let left = c.out_at < c.out.len();
    if !left {
        c.out.clear();
        c.out_at = 0;
    }
    if left != c.want_out {
        let ev = libc::EPOLLIN as u32 | if left { libc::EPOLLOUT as u32 } else { 0 };
        ep.ctl(libc::EPOLL_CTL_MOD, c.s.as_raw_fd(), ev, key);
        c.want_out = left;
    }
    true
}

/// Append every request the schedule allows now (open loop and traces:
/// due by `now + LOOKAHEAD`), then write them at once. `false` when the
/// server went away.
fn fill_and_write(
    tx: &mut Sender,
    c: &mut Conn,
    report: &mut Report,
    now: Instant,
    ep: &Epoll,
    key: usize,
) -> bool {
    if c.closed {
        return true;
    }
    let plan = tx.plan;
    let before = c.out.len();
    while let Some((intended, t, row)) = c.due {
        if intended > now + LOOKAHEAD || intended >= tx.end || (tx.closed_loop && now >= tx.end) {
            break;
        }
        // Closed loop: a request is due when its slot frees, so it is never late.
        let intended = if tx.closed_loop { now } else { intended };
        let Some(slot) = c.free.pop() else {
            if !c.stalled && !tx.closed_loop && intended >= tx.measure_from {
                report.window_full += 1;
            }
            c.stalled = true;
            break;
        };
        let measured = intended >= tx.measure_from;
        // Latency counts from the earlier of the intended time and the
        // actual send: a late send is charged its lateness, one sent ahead
        // of time (LOOKAHEAD) is not credited with it.
        c.slots[slot] = Some((intended.min(now), now, measured, t));
        let id = slot as u64 + 1;
        if let Some(f) = tx.frames {
            f[t as usize].push(row as usize, id, &mut c.out);
        } else {
            let target = &plan.targets[t as usize];
            let x = plan.pools[t as usize].get(row as usize, &mut tx.scratch);
            let input = if plan.f16 {
                tx.half.clear();
                tx.half
                    .extend(x.iter().map(|&v| ::half::f16::from_f32(v).to_bits()));
                Input::F16(&tx.half)
            } else {
                Input::F32(x)
            };
            let spec = request(plan, target, input, tx.cache);
            tx.enc.request(id, &spec, &mut c.out);
        }
        if measured {
            report.sent += 1;
            // An early send (LOOKAHEAD) is 0 lag, not a negative one.
            let _ = report.send_lag.record(
                now.saturating_duration_since(intended.max(c.unblocked_at))
                    .as_micros() as u64,
            );
        }
        if plan.record_trace {
            tx.trace.push((
                intended.saturating_duration_since(tx.start).as_micros() as u64,
                t,
                row,
            ));
        }
        let draw_fn = |rng: &mut Rng| draw(plan, &tx.mix, rng);
        c.due = advance(&mut c.sched, &mut c.rng, &draw_fn, tx.start, now);
    }
    c.out.len() == before || c.want_out || flush(c, ep, key)
}
