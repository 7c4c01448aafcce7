//! A connection's receive and send paths, once through the shard's own
//! io_uring (`uring_sockets = true`, the default) and once through
//! glommio's streams: many frames arriving in one read are all answered,
//! hits in the order they were sent; a read that ends mid-frame (inside
//! the length prefix or the body) waits for the rest; a peer that stops
//! reading is closed after the write stall limit.

mod common;

use beast::metrics::TimedOut;
use beast::wire::{Encoder, Status};
use common::*;
use std::io::Read;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

fn server(uring: bool) -> beast::server::ServerHandle {
    let mut cfg = test_config();
    cfg.uring_sockets = uring;
    start_with(cfg, test_repository(300_000))
}

fn frames_in_one_write_are_all_answered(uring: bool) {
    let server = server(uring);
    let m = model("a");
    // 8 distinct inputs; 200 requests cycling through them, all in one
    // write: the server reads them in a few large reads.
    let inputs: Vec<Vec<f32>> = (0..8).map(|i| rows(100 + i, 1, WIDTH)).collect();
    let mut raw = Raw::connect(server.addr);
    let mut enc = Encoder::new();
    let mut burst = Vec::new();
    let n = 200u64;
    for id in 0..n {
        enc.request(
            id,
            &spec("a", 1, WIDTH, &inputs[id as usize % 8]),
            &mut burst,
        );
    }
    raw.send_bytes(&burst);
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let r = raw.recv();
        assert_eq!(r.status, Status::Ok, "{}", r.message);
        assert!(!seen[r.id as usize], "id {} answered twice", r.id);
        seen[r.id as usize] = true;
        assert_close(&r.output, &direct(&m, &inputs[r.id as usize % 8], 1), 1e-3);
    }
    // Now every input is cached: a second burst is answered from the
    // cache as it is read, in the order it was sent.
    burst.clear();
    for id in 0..n {
        enc.request(
            1000 + id,
            &spec("a", 1, WIDTH, &inputs[id as usize % 8]),
            &mut burst,
        );
    }
    raw.send_bytes(&burst);
    for id in 0..n {
        let r = raw.recv();
        assert_eq!((r.id, r.status), (1000 + id, Status::Ok), "{}", r.message);
        assert_close(&r.output, &direct(&m, &inputs[id as usize % 8], 1), 1e-3);
    }
    server.shutdown();
}

fn a_read_ending_mid_frame_waits_for_the_rest(uring: bool) {
    let server = server(uring);
    let m = model("a");
    let x = rows(7, 1, WIDTH);
    let mut raw = Raw::connect(server.addr);
    let mut frame = Vec::new();
    Encoder::new().request(42, &spec("a", 1, WIDTH, &x), &mut frame);
    // Two frames: cut inside the first one's length prefix, then inside
    // the second one's body; each piece is taken by the server before the
    // next is sent.
    let two = [frame.clone(), frame].concat();
    let half = two.len() / 2;
    let cuts = [0, 2, half + 4 + 10, two.len()];
    for w in cuts.windows(2) {
        raw.send_bytes(&two[w[0]..w[1]]);
        wait_until(T, "the server to read the piece", || {
            server_has_read(&raw.s)
        });
    }
    for _ in 0..2 {
        let r = raw.recv();
        assert_eq!((r.id, r.status), (42, Status::Ok), "{}", r.message);
        assert_close(&r.output, &direct(&m, &x, 1), 1e-3);
    }
    server.shutdown();
}

fn a_peer_that_stops_reading_is_closed(uring: bool) {
    let mut cfg = test_config();
    cfg.uring_sockets = uring;
    cfg.write_stall_timeout_ms = 200;
    cfg.frame_bytes_max = 32 << 10;
    cfg.pending_bytes_per_connection_max = 64 << 10;
    let server = start_with(cfg, test_repository(300_000));
    let s = std::net::TcpStream::connect(server.addr).unwrap();
    // Answers of 500 rows (about 10 KB), never read.
    let x = rows(9, 500, WIDTH);
    let mut w = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut enc = Encoder::new();
        let mut frame = Vec::new();
        for id in 0..2000u64 {
            frame.clear();
            enc.request(id, &spec("a", 500, WIDTH, &x), &mut frame);
            if std::io::Write::write_all(&mut w, &frame).is_err() {
                break;
            }
        }
    });
    wait_until(T, "a write-stall close", || {
        server.totals().connections_timed_out[TimedOut::WriteStall as usize] == 1
    });
    sender.join().unwrap();
    let mut r = s;
    r.set_read_timeout(Some(T)).unwrap();
    let _ = r.read_to_end(&mut Vec::new());
    server.shutdown();
}

#[test]
fn uring_frames_in_one_write_are_all_answered() {
    frames_in_one_write_are_all_answered(true);
}

#[test]
fn streams_frames_in_one_write_are_all_answered() {
    frames_in_one_write_are_all_answered(false);
}

#[test]
fn uring_a_read_ending_mid_frame_waits_for_the_rest() {
    a_read_ending_mid_frame_waits_for_the_rest(true);
}

#[test]
fn streams_a_read_ending_mid_frame_waits_for_the_rest() {
    a_read_ending_mid_frame_waits_for_the_rest(false);
}

#[test]
fn uring_a_peer_that_stops_reading_is_closed() {
    a_peer_that_stops_reading_is_closed(true);
}

#[test]
fn streams_a_peer_that_stops_reading_is_closed() {
    a_peer_that_stops_reading_is_closed(false);
}
