//! beast-bench's engines count what the server answered, however the
//! answers arrive: a scripted server on a real socket answers every fifth
//! request with an error and writes its answers many to one write, split
//! inside a frame's length prefix, and split inside a body, with a pause
//! between the pieces so that the client reads them apart. The report must
//! hold exactly what the server sent (OK and errors), nothing unanswered,
//! and the server timings it wrote. Then the lean engine's closed loop
//! against the real server.

mod common;

use common::json_num as num;

use beast::wire::{
    check_frame, decode_request, CacheControl, Encoder, FrameCheck, ResponseHeader, Status,
    Timings, FRAME_HEADER_LEN,
};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What the scripted server sent to the benchmark's requests (not the
/// pre-flight one, which asks to bypass the cache).
#[derive(Default)]
struct Sent {
    ok: AtomicU64,
    errors: AtomicU64,
    /// Writes that carried more than one whole answer.
    coalesced: AtomicU64,
    /// Answers written in two pieces.
    split: AtomicU64,
}

const TOTAL_US: u32 = 777;
const QUEUE_US: u32 = 100;
const COMPUTE_US: u32 = 200;

fn scripted_server() -> (SocketAddr, Arc<Sent>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let sent = Arc::new(Sent::default());
    let s = sent.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { return };
            let s = s.clone();
            std::thread::spawn(move || answer(conn, &s));
        }
    });
    (addr, sent)
}

/// Answer every request on `c`; each read's answers go out in one of
/// three ways, in turn.
fn answer(mut c: TcpStream, sent: &Sent) {
    c.set_nodelay(true).unwrap();
    let (mut buf, mut out) = (Vec::new(), Vec::new());
    let mut tmp = vec![0u8; 64 << 10];
    let mut enc = Encoder::new();
    let output = [0.5f32; 16];
    let mut turn = 0u64;
    loop {
        let n = match c.read(&mut tmp) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&tmp[..n]);
        let (mut at, mut answers) = (0, 0);
        out.clear();
        while let FrameCheck::Complete { body_len } = check_frame(&buf[at..], 1 << 22) {
            let req = decode_request(&buf[at + FRAME_HEADER_LEN..at + FRAME_HEADER_LEN + body_len])
                .expect("a request");
            let bench = req.cache == CacheControl::Use;
            let n = if bench {
                sent.ok.load(Ordering::Relaxed) + sent.errors.load(Ordering::Relaxed)
            } else {
                0
            };
            let status = if bench && n % 5 == 4 {
                Status::Overloaded
            } else {
                Status::Ok
            };
            if bench {
                let counter = if status == Status::Ok {
                    &sent.ok
                } else {
                    &sent.errors
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            let ok = status == Status::Ok;
            let h = ResponseHeader {
                id: req.id,
                status,
                message: if ok { "" } else { "scripted overload" },
                rows: if ok { 1 } else { 0 },
                cols: if ok { 16 } else { 0 },
                timings: Timings {
                    queue_us: QUEUE_US,
                    compute_us: COMPUTE_US,
                    total_us: TOTAL_US,
                },
                cached: true,
                partial: false,
                ticket: 0,
            };
            enc.response(&h, &[], if ok { &output } else { &[] }, &mut out);
            at += FRAME_HEADER_LEN + body_len;
            answers += 1;
        }
        buf.drain(..at);
        if out.is_empty() {
            continue;
        }
        turn += 1;
        let cut = match turn % 3 {
            // All answers of this read in one write.
            0 => out.len(),
            // Inside the first frame's length prefix.
            1 => 2,
            // Inside the last frame's body.
            _ => out.len() - 3,
        };
        if cut == out.len() {
            if answers > 1 {
                sent.coalesced.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            sent.split.fetch_add(1, Ordering::Relaxed);
        }
        if c.write_all(&out[..cut]).is_err() {
            return;
        }
        if cut < out.len() {
            // The scripted server's own pacing (not a test waiting on a
            // condition): the two pieces reach the client apart.
            std::thread::sleep(Duration::from_micros(500));
            if c.write_all(&out[cut..]).is_err() {
                return;
            }
        }
    }
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON line\nstdout: {stdout}\nstderr: {stderr}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON ({e}): {line}"))
}

#[test]
fn every_answer_is_counted_however_the_server_splits_or_coalesces_them() {
    for (engine, mode, threads) in [
        ("lean", &["--closed"][..], "1"),
        ("lean", &["--closed"][..], "2"),
        ("lean", &["--rate", "3000"][..], "1"),
        ("glommio", &["--closed"][..], "1"),
    ] {
        let (addr, sent) = scripted_server();
        let out = Command::new(env!("CARGO_BIN_EXE_beast-bench"))
            .args(["--server", &addr.to_string(), "--target", "a", "--width"])
            .args(["12", "-c", "4", "-k", "8", "--warmup", "0", "--duration"])
            .args(["0.6", "--json", "--max-error-fraction", "1", "--engine"])
            .args([engine, "--threads", threads])
            .args(mode)
            .output()
            .expect("run beast-bench");
        let what = format!("{engine} {mode:?} threads {threads}");
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let j = json_of(&out);
        let (ok, errors) = (
            sent.ok.load(Ordering::Relaxed) as f64,
            sent.errors.load(Ordering::Relaxed) as f64,
        );
        assert!(ok > 100.0, "{what}: only {ok} answers sent");
        // (An open loop at this rate sends one request at a time: nothing
        // to coalesce there.)
        let closed = mode == ["--closed"];
        assert!(
            sent.split.load(Ordering::Relaxed) > 10
                && (!closed || sent.coalesced.load(Ordering::Relaxed) > 10),
            "{what}: the script split {} and coalesced {} writes",
            sent.split.load(Ordering::Relaxed),
            sent.coalesced.load(Ordering::Relaxed)
        );
        // With no warm-up every request is measured: the report holds
        // exactly what the server sent, nothing left unanswered.
        assert_eq!(num(&j, &["ok"]), ok, "{what}: {j}");
        assert_eq!(num(&j, &["error_count"]), errors, "{what}: {j}");
        assert_eq!(num(&j, &["errors", "overloaded"]), errors, "{what}: {j}");
        assert_eq!(num(&j, &["sent"]), ok + errors, "{what}: {j}");
        assert_eq!(num(&j, &["unanswered"]), 0.0, "{what}: {j}");
        assert_eq!(num(&j, &["cached_fraction"]), 1.0, "{what}: {j}");
        // The server's own timings, read from every OK answer.
        assert_eq!(num(&j, &["server", "mean_queue_us"]), QUEUE_US as f64);
        assert_eq!(num(&j, &["server", "mean_compute_us"]), COMPUTE_US as f64);
        let p50 = num(&j, &["server", "total_p50_us"]);
        assert!((p50 - TOTAL_US as f64).abs() <= 1.0, "{what}: {j}");
        // Latency was recorded for every OK answer: at least the pause
        // of a split write sits in some.
        assert!(num(&j, &["latency_ms", "max"]) >= 0.5, "{what}: {j}");
        assert!(num(&j, &["latency_ms", "p50"]) > 0.0, "{what}: {j}");
        assert_eq!(num(&j, &["threads"]), threads.parse::<f64>().unwrap());
    }
}

#[test]
fn lean_closed_loop_against_the_server_counts_its_answers_and_its_cpu() {
    let server = common::start_server();
    let before = server.totals().responses[0];
    let out = Command::new(env!("CARGO_BIN_EXE_beast-bench"))
        .args(["--server", &server.addr.to_string(), "--target", "a"])
        .args([
            "--width",
            "12",
            "-c",
            "4",
            "-k",
            "16",
            "--closed",
            "--distinct",
        ])
        .args(["16", "--warmup", "0.2", "--duration", "0.5", "--json"])
        .output()
        .expect("run beast-bench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json_of(&out);
    assert_eq!(j["mode"].as_str(), Some("closed"), "{j}");
    let ok = num(&j, &["ok"]);
    assert!(ok > 500.0, "{j}");
    assert_eq!(num(&j, &["error_count"]), 0.0, "{j}");
    assert_eq!(num(&j, &["unanswered"]), 0.0, "{j}");
    // Warm-up and the pre-flight request come on top of the measured answers.
    let answered = (server.totals().responses[0] - before) as f64;
    assert!(
        answered >= ok,
        "server answered {answered}, bench counted {ok}"
    );
    // 16 distinct rows, warmed: (nearly) all hits, with the server's time read.
    assert!(num(&j, &["cached_fraction"]) > 0.9, "{j}");
    assert!(num(&j, &["server", "total_p50_us"]) >= 1.0, "{j}");
    // The generator measured its own thread and gave a verdict.
    let cpu = num(&j, &["client_thread_cpu_max_pct"]);
    assert!(cpu > 0.0 && cpu <= 110.0, "{j}");
    assert_eq!(
        j["generator_limited"].as_bool(),
        Some(cpu >= 90.0),
        "closed loop: a thread at >= 90% CPU is the limit: {j}"
    );
}
