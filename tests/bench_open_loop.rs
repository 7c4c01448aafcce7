//! The lean engine's open loop coalesces wakes: one wake sends every
//! request due within the next `LOOKAHEAD` (50 µs) in one write, so the
//! timer wakes of a connection are more than 50 µs apart; and a request
//! sent ahead of its intended time has its latency counted from the
//! actual send. beast-bench runs with a timer slack of 1 ns (`prctl`,
//! inherited), so that the kernel's own 50 µs timer slack does not merge
//! wakes for it: without the look-ahead a wake comes as soon as the next
//! request is due.

mod common;

use common::json_num as num;

use beast::wire::{
    check_frame, decode_request, CacheControl, Encoder, FrameCheck, ResponseHeader, Status,
    Timings, FRAME_HEADER_LEN,
};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::Command;

fn server(silent: bool) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { return };
            std::thread::spawn(move || answer(conn, silent));
        }
    });
    addr
}

/// Answer every request (with `silent`, only the pre-flight one, which
/// bypasses the cache); each read's answers in one write.
fn answer(mut c: TcpStream, silent: bool) {
    c.set_nodelay(true).unwrap();
    let (mut buf, mut out) = (Vec::new(), Vec::new());
    let mut tmp = vec![0u8; 64 << 10];
    let mut enc = Encoder::new();
    let output = [0.5f32; 4];
    loop {
        let n = match c.read(&mut tmp) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&tmp[..n]);
        let mut at = 0;
        out.clear();
        while let FrameCheck::Complete { body_len } = check_frame(&buf[at..], 1 << 22) {
            let req = decode_request(&buf[at + FRAME_HEADER_LEN..at + FRAME_HEADER_LEN + body_len])
                .expect("a request");
            at += FRAME_HEADER_LEN + body_len;
            if silent && req.cache == CacheControl::Use {
                continue;
            }
            let h = ResponseHeader {
                id: req.id,
                status: Status::Ok,
                message: "",
                rows: 1,
                cols: 4,
                timings: Timings {
                    queue_us: 1,
                    compute_us: 1,
                    total_us: 2,
                },
                cached: true,
                partial: false,
                ticket: 0,
            };
            enc.response(&h, &[], &output, &mut out);
        }
        buf.drain(..at);
        if !out.is_empty() && c.write_all(&out).is_err() {
            return;
        }
    }
}

/// Run beast-bench (lean engine, one thread, one connection) against
/// `addr` with a timer slack of 1 ns; its JSON line.
fn bench(addr: SocketAddr, args: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_beast-bench"));
    cmd.args(["--server", &addr.to_string(), "--target", "a", "--width"])
        .args(["4", "-c", "1", "--threads", "1", "--warmup", "0"])
        .args(["--engine", "lean", "--json", "--max-error-fraction", "1"])
        .args(args);
    // SAFETY: prctl on the child between fork and exec touches only its
    // own timer slack (inherited by its threads).
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
            Ok(())
        });
    }
    let out = cmd.output().expect("run beast-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().find(|l| l.starts_with('{')).expect("JSON");
    serde_json::from_str(line).unwrap()
}

#[test]
fn lean_open_loop_wakes_at_most_once_per_look_ahead() {
    // 100k req/s on one connection, a request every 10 µs; the server
    // does not answer, so every wake is the timer's (or the watchdog's
    // nudge, every 250 ms). Timer wakes more than 50 µs apart: at most
    // one per 5 requests. Without the look-ahead, one per ~20-30 µs of
    // wake-up latency on the VM.
    let addr = server(true);
    let j = bench(
        addr,
        &[
            "--rate",
            "100000",
            "--arrivals",
            "uniform",
            "-k",
            "65536",
            "--duration",
            "0.3",
        ],
    );
    let sent = num(&j, &["sent"]);
    assert!(sent >= 29_000.0, "{j}");
    assert_eq!(num(&j, &["unsent"]), 0.0, "{j}");
    let wakes = num(&j, &["generator_wakes"]);
    assert!(
        wakes > 0.0 && wakes <= sent / 5.0 + 5.0,
        "{wakes} wakes for {sent} requests: {j}"
    );
}

#[test]
fn lean_open_loop_counts_latency_of_an_early_send_from_the_send() {
    // Pairs of requests 40 µs apart (one wake sends both), the pairs
    // 1.5 ms apart, against a server that answers each read in one write.
    const PAIRS: u64 = 300;
    let trace = std::env::temp_dir().join(format!("beast-pairs-{}.csv", std::process::id()));
    let mut csv = String::from("offset_us,target,row_index\n");
    for p in 0..PAIRS {
        let t = 1000 + p * 1500;
        csv += &format!("{t},a,0\n{},a,1\n", t + 40);
    }
    std::fs::write(&trace, csv).unwrap();
    let addr = server(false);
    let j = bench(addr, &["-k", "64", "--trace", trace.to_str().unwrap()]);
    let _ = std::fs::remove_file(&trace);
    assert_eq!(num(&j, &["sent"]), (2 * PAIRS) as f64, "{j}");
    assert_eq!(num(&j, &["ok"]), (2 * PAIRS) as f64, "{j}");
    assert_eq!(num(&j, &["unanswered"]), 0.0, "{j}");
    // Each request's latency counts from the earlier of its intended time
    // and its actual send: never shorter than from the actual send (the
    // second of a pair, sent ~40 µs early, would be otherwise).
    assert!(
        num(&j, &["latency_ms", "mean"]) >= num(&j, &["uncorrected_ms", "mean"]),
        "{j}"
    );
}
