//! Connections against a real server on a socket: what a client gets back
//! for bodies that verified but are wrong (its id, a bounded message), and
//! clients that hold resources (stalled frames, idle connections, peers
//! that do not read) under small limits set through the config.

mod common;

use beast::wire::{Encoder, Input, PolicyOverride, Status};
use common::*;

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
