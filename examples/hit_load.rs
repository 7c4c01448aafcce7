//! A lean closed-loop load client for the cache-hit path, built like
//! redis-benchmark: one thread, epoll, pre-encoded frames, and on every
//! connection `depth` requests sent in one write, the next `depth` only
//! once all their answers are back (redis-benchmark's `-P`). It exists to
//! compare the server with Redis under the same kind of client: beast-bench
//! waits through glommio's io_uring polls, whose wake-ups the *server*
//! pays for (perf/profile-hit.md); redis-benchmark's epoll does not.
//!
//! Checks: every answer's frame is read whole; one in 64 is decoded in
//! full (status OK, `cached`, 16 floats); the others must have the length
//! of the first OK answer (a hit of one shape always encodes to the same
//! length; anything else is decoded and counted as an error if not OK).
//!
//!   cargo build --release --example hit_load
//!   taskset -c 1 target/release/examples/hit_load 127.0.0.1:7995 [conns 50] [depth 16] [secs 3] [width 256]
//! Prints one line: `answers_per_s=… errors=… cpu_pct=…` (cpu: this
//! process over the measured window; near 100 means the client was the limit).

use beast::wire::{self, CacheControl, Encoder, Input, PolicyOverride, RequestSpec, Status};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
    /// Bytes in `buf` not yet framed.
    len: usize,
    outstanding: usize,
    next: usize,
}

fn cpu_secs() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: fills a zeroed struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let addr = a.get(1).map(String::as_str).unwrap_or("127.0.0.1:7995");
    let arg = |i: usize, d: usize| a.get(i).map(|s| s.parse().unwrap()).unwrap_or(d);
    let (conns, depth, secs, width) = (arg(2, 50), arg(3, 16), arg(4, 3), arg(5, 256));
    let warmup = Duration::from_secs(1);

    // 64 distinct rows, each a pre-encoded frame; a pipeline of `depth`
    // frames is one contiguous slice of `burst`.
    let mut enc = Encoder::new();
    let mut frames: Vec<Vec<u8>> = Vec::new();
    for r in 0..64u32 {
        let x: Vec<f32> = (0..width)
            .map(|i| ((r as usize * 31 + i) % 97) as f32 / 97.0)
            .collect();
        let spec = RequestSpec {
            target: "bench_a",
            version: None,
            rows: 1,
            cols: width as u32,
            input: Input::F32(&x),
            deadline_us: None,
            domain: None,
            cache: CacheControl::Use,
            policy: PolicyOverride::Default,
        };
        let mut f = Vec::new();
        enc.request(r as u64, &spec, &mut f);
        frames.push(f);
    }
    let burst: Vec<u8> = (0..64 + depth)
        .flat_map(|i| frames[i % 64].clone())
        .collect();
    let offsets: Vec<usize> = (0..=64 + depth)
        .scan(0, |o, i| {
            let at = *o;
            if i < 64 + depth {
                *o += frames[i % 64].len();
            }
            Some(at)
        })
        .collect();

    // SAFETY: plain syscall.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0, "epoll_create1");
    let mut cs: Vec<Conn> = (0..conns)
        .map(|i| {
            let s = TcpStream::connect(addr).expect("connect");
            s.set_nodelay(true).unwrap();
            s.set_nonblocking(true).unwrap();
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            // SAFETY: registers a live fd with our epoll fd.
            let r = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) };
            assert_eq!(r, 0, "epoll_ctl");
            Conn {
                s,
                buf: vec![0; 1 << 20],
                len: 0,
                outstanding: 0,
                next: i % 64,
            }
        })
        .collect();
    let send = |c: &mut Conn| {
        let b = &burst[offsets[c.next]..offsets[c.next + depth]];
        // A pipeline is at most depth KiB: the socket buffer takes it.
        let mut s = &c.s;
        s.write_all(b).expect("send");
        c.outstanding = depth;
        c.next = (c.next + depth) % 64;
    };
    for c in cs.iter_mut() {
        send(c);
    }
    let start = Instant::now();
    let (mut counting, mut answers, mut errors, mut ok_len, mut seen) =
        (false, 0u64, 0u64, 0usize, 0u64);
    let mut t0 = start;
    let mut cpu0 = 0.0;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    loop {
        // SAFETY: `events` is a live buffer of its length.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 100) };
        let now = Instant::now();
        if !counting && now >= start + warmup {
            counting = true;
            answers = 0;
            errors = 0;
            t0 = now;
            cpu0 = cpu_secs();
        }
        if counting && now >= t0 + Duration::from_secs(secs as u64) {
            let el = now.duration_since(t0).as_secs_f64();
            let cpu = cpu_secs() - cpu0;
            println!(
                "answers_per_s={:.0} errors={errors} cpu_pct={:.0}",
                answers as f64 / el,
                100.0 * cpu / el
            );
            return;
        }
        for e in &events[..n.max(0) as usize] {
            let c = &mut cs[e.u64 as usize];
            loop {
                let l = c.len;
                match (&c.s).read(&mut c.buf[l..]) {
                    Ok(0) => panic!("server closed a connection"),
                    Ok(k) => c.len += k,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("read: {e}"),
                }
            }
            let mut at = 0;
            while c.len - at >= 4 {
                let body_len = u32::from_le_bytes(c.buf[at..at + 4].try_into().unwrap()) as usize;
                if c.len - at < 4 + body_len {
                    break;
                }
                let body = &c.buf[at + 4..at + 4 + body_len];
                seen += 1;
                if body_len != ok_len || seen % 64 == 0 {
                    match wire::decode_response(body) {
                        Ok(r) if r.status == Status::Ok && r.cached && r.output.len() == 64 => {
                            ok_len = body_len
                        }
                        _ => errors += 1,
                    }
                }
                answers += 1;
                c.outstanding -= 1;
                at += 4 + body_len;
            }
            c.buf.copy_within(at..c.len, 0);
            c.len -= at;
            if c.outstanding == 0 {
                send(c);
            }
        }
    }
}
