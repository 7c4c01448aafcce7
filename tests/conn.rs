//! Connections against a real server on a socket: what a client gets back
//! for bodies that verified but are wrong (its id, a bounded message), and
//! clients that hold resources (stalled frames, idle connections, peers
//! that do not read) under small limits set through the config.

mod common;

use beast::metrics::TimedOut;
use beast::wire::{Encoder, Input, PolicyOverride, Status};
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

#[test]
fn bad_requests_that_verified_echo_their_id() {
    let server = start_server();
    let mut raw = Raw::connect(server.addr);
    let x = rows(1, 2, WIDTH);
    // Zero rows.
    let mut s = spec("a", 0, WIDTH, &[]);
    s.rows = 0;
    raw.send(41, &s);
    // Input length not rows × cols.
    raw.send(42, &spec("a", 2, WIDTH, &x[..WIDTH]));
    // Zero columns.
    let mut s = spec("a", 1, WIDTH, &x[..WIDTH]);
    s.cols = 0;
    raw.send(43, &s);
    // F16 input whose length is that of F32 rows.
    let bits = vec![0u16; 4 * WIDTH];
    let mut s = spec("a", 1, WIDTH, &x);
    s.input = Input::F16(&bits);
    raw.send(44, &s);
    // An unknown policy value: two encodings that differ only in the
    // policy byte locate it.
    let with = |policy| {
        let mut s = spec("ens", 1, WIDTH, &x[..WIDTH]);
        s.policy = policy;
        let mut out = Vec::new();
        Encoder::new().request(45, &s, &mut out);
        out
    };
    let (mut g, h) = (with(PolicyOverride::Bandit), with(PolicyOverride::Cascade));
    let at = (0..g.len()).find(|&i| g[i] != h[i]).unwrap();
    g[at] = 200;
    raw.send_bytes(&g);
    for id in 41..=45 {
        let r = raw.recv();
        assert_eq!((r.id, r.status), (id, Status::BadRequest), "{}", r.message);
        assert!(!r.message.is_empty());
    }
    // A body that fails verification has no readable id: 0.
    raw.send_bytes(&[8, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
    let r = raw.recv();
    assert_eq!((r.id, r.status), (0, Status::BadRequest), "{}", r.message);
    server.shutdown();
}

#[test]
fn error_messages_are_bounded_whatever_the_name() {
    let server = start_server();
    let mut raw = Raw::connect(server.addr);
    let x = rows(1, 1, WIDTH);
    // A multi-byte character straddles the 256-byte cut.
    let long = format!("{}é{}", "x".repeat(255), "y".repeat(3 << 20));
    raw.send(7, &spec(&long, 1, WIDTH, &x));
    let r = raw.recv();
    assert_eq!((r.id, r.status), (7, Status::NotFound));
    assert!(r.message.len() <= 512, "{} bytes", r.message.len());
    assert!(r.message.contains(&"x".repeat(255)), "{}", r.message);
    // A long name on a width error too.
    let narrow = rows(1, 1, WIDTH - 1);
    let long = "z".repeat(100_000);
    let mut s = spec(&long, 1, WIDTH - 1, &narrow);
    s.version = Some(3);
    raw.send(8, &s);
    let r = raw.recv();
    assert_eq!(r.id, 8);
    assert!(r.message.len() <= 512, "{} bytes", r.message.len());
    // The connection is still usable.
    raw.send(9, &spec("a", 1, WIDTH, &x));
    assert_eq!(raw.recv().status, Status::Ok);
    server.shutdown();
}

#[test]
fn more_rows_than_a_queue_holds_is_a_bad_request_not_overloaded() {
    let mut repo = test_repository(300_000);
    // `a` queues at most 32 rows; requests may carry 1024.
    let mut a = test_models(300_000)
        .into_iter()
        .find(|m| m.name == "a")
        .unwrap();
    a.batch.queue_rows_max = 32;
    repo.models.insert("a".into(), vec![std::sync::Arc::new(a)]);
    let server = start_with(test_config(), repo);
    let mut raw = Raw::connect(server.addr);
    let x = rows(3, 40, WIDTH);
    raw.send(1, &spec("a", 40, WIDTH, &x));
    let r = raw.recv();
    assert_eq!((r.id, r.status), (1, Status::BadRequest), "{}", r.message);
    assert!(r.message.contains("32"), "{}", r.message);
    // The same through an ensemble that has `a` as a member.
    raw.send(2, &spec("ens", 40, WIDTH, &x));
    let r = raw.recv();
    assert_eq!((r.id, r.status), (2, Status::BadRequest), "{}", r.message);
    // 32 rows still go through.
    raw.send(3, &spec("a", 32, WIDTH, &x[..32 * WIDTH]));
    assert_eq!(raw.recv().status, Status::Ok);
    server.shutdown();
}

const T: Duration = Duration::from_secs(10);

/// Poll `f` until it returns true or `T` passes.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn timed_out(server: &beast::server::ServerHandle, r: TimedOut) -> u64 {
    server.totals().connections_timed_out[r as usize]
}

/// One request on a fresh connection: its answer, or None when the server
/// closed the connection (refused at the connection limit).
fn try_predict(addr: std::net::SocketAddr, x: &[f32]) -> Option<Owned> {
    let mut raw = Raw::connect(addr);
    let mut frame = Vec::new();
    Encoder::new().request(5, &spec("a", 1, WIDTH, x), &mut frame);
    raw.s.write_all(&frame).ok()?;
    let mut len = [0u8; 4];
    raw.s.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    raw.s.read_exact(&mut body).ok()?;
    Some(Owned::from(&body))
}

/// A connection whose receive buffer is small, so the server's answers
/// back up quickly when it does not read.
fn connect_small_rcvbuf(addr: std::net::SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect(&addr.into()).unwrap();
    let s: TcpStream = s.into();
    s.set_nodelay(true).unwrap();
    s
}

fn timeout_config(frame_ms: u64, idle_ms: u64, stall_ms: u64) -> beast::config::Config {
    let mut cfg = test_config();
    cfg.frame_timeout_ms = frame_ms;
    cfg.idle_timeout_ms = idle_ms;
    cfg.write_stall_timeout_ms = stall_ms;
    cfg
}

#[test]
fn stalled_connections_beyond_the_limit_do_not_lock_out_a_new_client() {
    // Every stalled connection used to be kept forever: 4 of them (the
    // limit here) locked every later client out.
    let mut cfg = timeout_config(300, 300, 300);
    cfg.connections_per_shard_max = 4;
    let server = start_with(cfg, test_repository(300_000));
    let x = rows(1, 1, WIDTH);
    let mut frame = Vec::new();
    Encoder::new().request(1, &spec("a", 1, WIDTH, &x), &mut frame);
    // Twelve stalled clients: half a frame, a length prefix alone,
    // nothing at all.
    let mut stalled = Vec::new();
    for i in 0..12 {
        let mut s = TcpStream::connect(server.addr).unwrap();
        let _ = match i % 3 {
            0 => s.write_all(&frame[..frame.len() / 2]),
            1 => s.write_all(&frame[..4]),
            _ => Ok(()),
        };
        stalled.push(s);
    }
    wait_for("the stalled connections to be accepted", || {
        server.totals().connections_accepted >= 4
    });
    // A well-behaved client is served once the stalled ones time out
    // (refused until then: it retries).
    let started = Instant::now();
    let mut tries = 0;
    let answer = loop {
        tries += 1;
        if let Some(a) = try_predict(server.addr, &x) {
            break a;
        }
        assert!(
            started.elapsed() < T,
            "a new client was locked out for {:?} ({tries} tries)",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(answer.status, Status::Ok, "{}", answer.message);
    // The room was made by timeouts: at least one had fired when the new
    // client got in, and every one of the first four stalled connections
    // times out (each on its own timer tick, so the count is polled).
    let closed = || timed_out(&server, TimedOut::Frame) + timed_out(&server, TimedOut::Idle);
    assert!(
        closed() >= 1,
        "served before any stalled connection timed out"
    );
    wait_for("the four stalled connections to time out", || closed() >= 4);
    drop(stalled);
    server.shutdown();
}

#[test]
fn an_idle_connection_is_closed_but_not_one_waiting_for_an_answer() {
    // `slow` answers after 600 ms, longer than the idle timeout.
    let server = start_with(
        timeout_config(60_000, 200, 60_000),
        test_repository(600_000),
    );
    let mut idle = Raw::connect(server.addr);
    let mut busy = Raw::connect(server.addr);
    let x = rows(2, 1, WIDTH);
    busy.send(3, &spec("slow", 1, WIDTH, &x));
    let r = busy.recv();
    assert_eq!((r.id, r.status), (3, Status::Ok), "{}", r.message);
    assert!(idle.is_closed());
    // The busy one is closed too once idle.
    assert!(busy.is_closed());
    wait_for("two idle closes", || {
        timed_out(&server, TimedOut::Idle) == 2
    });
    assert_eq!(timed_out(&server, TimedOut::Frame), 0);
    assert_eq!(timed_out(&server, TimedOut::WriteStall), 0);
    server.shutdown();
}

#[test]
fn a_frame_that_does_not_complete_in_time_closes_the_connection() {
    let server = start_with(
        timeout_config(200, 60_000, 60_000),
        test_repository(300_000),
    );
    let x = rows(3, 1, WIDTH);
    let mut frame = Vec::new();
    Encoder::new().request(1, &spec("a", 1, WIDTH, &x), &mut frame);
    let mut raw = Raw::connect(server.addr);
    // A whole request, then the start of another that never completes:
    // the first is answered, then the connection is closed.
    raw.send_bytes(&frame);
    raw.send_bytes(&frame[..frame.len() - 1]);
    assert_eq!(raw.recv().status, Status::Ok);
    assert!(raw.is_closed());
    wait_for("a frame timeout", || {
        timed_out(&server, TimedOut::Frame) == 1
    });
    assert_eq!(timed_out(&server, TimedOut::Idle), 0);
    // Others are still served.
    assert_eq!(try_predict(server.addr, &x).unwrap().status, Status::Ok);
    server.shutdown();
}

/// Send `n` requests of `rows` rows to `target` on `s` from a thread,
/// ignoring write errors (the server may close the connection).
fn send_many(
    s: &TcpStream,
    target: &'static str,
    n: u64,
    rows_n: usize,
) -> std::thread::JoinHandle<u64> {
    let mut w = s.try_clone().unwrap();
    std::thread::spawn(move || {
        let x = rows(9, rows_n, WIDTH);
        let mut enc = Encoder::new();
        let mut frame = Vec::new();
        for id in 0..n {
            frame.clear();
            enc.request(id, &spec(target, rows_n, WIDTH, &x), &mut frame);
            if w.write_all(&frame).is_err() {
                return id;
            }
        }
        n
    })
}

#[test]
fn a_peer_that_does_not_read_is_closed() {
    let mut cfg = timeout_config(60_000, 60_000, 300);
    cfg.frame_bytes_max = 32 << 10;
    cfg.pending_bytes_per_connection_max = 64 << 10;
    let server = start_with(cfg, test_repository(300_000));
    let s = connect_small_rcvbuf(server.addr);
    // 2000 answers of 500 rows (10 KB each) that are never read.
    let sender = send_many(&s, "a", 2000, 500);
    wait_for("a write-stall close", || {
        timed_out(&server, TimedOut::WriteStall) == 1
    });
    sender.join().unwrap();
    // The server closed it: reading ends (after whatever was in flight).
    let mut sink = Vec::new();
    let mut r = s;
    r.set_read_timeout(Some(T)).unwrap();
    let _ = r.read_to_end(&mut sink);
    assert_eq!(timed_out(&server, TimedOut::Idle), 0);
    server.shutdown();
}

#[test]
fn pending_answers_never_exceed_the_per_connection_bound() {
    // Answers of requests already in flight were appended past the bound
    // (the reader only stopped taking new frames): in flight x largest
    // answer over it. Now each request in flight holds room for its answer.
    let bound = 128 << 10;
    let mut cfg = test_config();
    cfg.frame_bytes_max = 64 << 10;
    cfg.pending_bytes_per_connection_max = bound;
    // A queue deep enough that nothing is shed: requests stay in flight.
    let mut repo = test_repository(300_000);
    let mut a = test_models(300_000)
        .into_iter()
        .find(|m| m.name == "a")
        .unwrap();
    a.batch.queue_rows_max = 1 << 16;
    repo.models.insert("a".into(), vec![std::sync::Arc::new(a)]);
    let server = start_with(cfg, repo);
    let s = connect_small_rcvbuf(server.addr);
    // 8 MB of answers (20 KB each): more than the socket buffers hold.
    let n = 400;
    let sender = send_many(&s, "a", n, 1000);
    // Read slowly at first, so answers back up in the server.
    let mut raw = Raw::from_stream(s);
    raw.s.set_read_timeout(Some(T)).unwrap();
    wait_for("answers to back up", || server.totals().requests() >= 20);
    for _ in 0..n {
        let r = raw.recv();
        assert_eq!(r.status, Status::Ok, "{}", r.message);
    }
    assert_eq!(sender.join().unwrap(), n);
    let peak = server.totals().pending_bytes_peak;
    assert!(
        peak <= bound as u64,
        "a connection held {peak} bytes, over {bound}"
    );
    server.shutdown();
}
