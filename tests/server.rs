//! End-to-end behaviour against a real server on an ephemeral port.

mod common;

use beast::client::{Client, ClientError};
use beast::wire::{Input, Status};
use common::*;
use std::time::{Duration, Instant};

#[test]
fn prediction_equals_the_cpu_backend() {
    let server = start_server();
    let client = Client::connect(server.addr).unwrap();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        for n in [1usize, 3, 16, 40] {
            let x = rows(100 + i as u64 * 10 + n as u64, n, WIDTH);
            let p = client.predict(&spec(name, n, WIDTH, &x)).unwrap();
            assert_eq!((p.rows as usize, p.cols as usize), (n, CLASSES));
            // One request alone forms its own batch, so the server runs
            // exactly what a direct call runs: the same bits.
            assert_eq!(
                p.outputs,
                direct(&model(name), &x, n),
                "model {name}, {n} rows"
            );
            assert_eq!(
                p.runs,
                vec![(name.to_string(), 1, model(name).flops_per_row() * n as u64)]
            );
        }
    }
    server.shutdown();
}

#[test]
fn f16_input_is_converted() {
    let server = start_server();
    let client = Client::connect(server.addr).unwrap();
    let x = rows(5, 2, WIDTH);
    let bits: Vec<u16> = x
        .iter()
        .map(|&v| half::f16::from_f32(v).to_bits())
        .collect();
    let rounded: Vec<f32> = bits
        .iter()
        .map(|&b| half::f16::from_bits(b).to_f32())
        .collect();
    let mut s = spec("a", 2, WIDTH, &x);
    s.input = Input::F16(&bits);
    let p = client.predict(&s).unwrap();
    assert_eq!(p.outputs, direct(&model("a"), &rounded, 2));
    server.shutdown();
}

#[test]
fn ensemble_is_the_mean_of_its_members() {
    let server = start_server();
    let client = Client::connect(server.addr).unwrap();
    let x = rows(9, 4, WIDTH);
    let p = client.predict(&spec("ens", 4, WIDTH, &x)).unwrap();
    let members: Vec<Vec<f32>> = ["a", "b", "c"]
        .iter()
        .map(|m| direct(&model(m), &x, 4))
        .collect();
    let mean: Vec<f32> = (0..4 * CLASSES)
        .map(|i| members.iter().map(|m| m[i]).sum::<f32>() / 3.0)
        .collect();
    assert_close(&p.outputs, &mean, 1e-6);
    let names: Vec<&str> = p.runs.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"]);
    // Rows of a probability ensemble still sum to one.
    for r in p.outputs.chunks(CLASSES) {
        assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    }
    // Weighted: (1·a + 3·c) / 4.
    let p = client.predict(&spec("wens", 4, WIDTH, &x)).unwrap();
    let w: Vec<f32> = (0..4 * CLASSES)
        .map(|i| (members[0][i] + 3.0 * members[2][i]) / 4.0)
        .collect();
    assert_close(&p.outputs, &w, 1e-6);
    server.shutdown();
}

#[test]
fn versions_are_served_as_asked() {
    let server = start_server();
    let client = Client::connect(server.addr).unwrap();
    let x = rows(3, 1, WIDTH);
    let latest = client.predict(&spec("m", 1, WIDTH, &x)).unwrap();
    assert_eq!(latest.runs[0].1, 2);
    let mut s = spec("m", 1, WIDTH, &x);
    s.version = Some(1);
    let v1 = client.predict(&s).unwrap();
    assert_eq!(v1.runs[0].1, 1);
    assert_eq!(v1.outputs, direct(&model("m"), &x, 1));
    assert_ne!(v1.outputs, latest.outputs);
    s.version = Some(9);
    assert!(matches!(client.predict(&s), Err(ClientError::NotFound(m)) if m.contains("version 9")));
    server.shutdown();
}

#[test]
fn many_requests_in_flight_on_one_connection_come_back_matched() {
    // All 2000 may be in flight at once (the server can read faster than it
    // computes): allow that, so the test checks matching, not shedding.
    let mut cfg = test_config();
    cfg.in_flight_per_connection_max = 4096;
    let server = start_with(cfg, test_repository(300_000));
    let mut raw = Raw::connect(server.addr);
    let targets = ["a", "b", "c", "ens"];
    let n = 2000u64;
    let inputs: Vec<Vec<f32>> = (0..n).map(|i| rows(1000 + i, 1, WIDTH)).collect();
    // Write everything before reading anything: the server must multiplex.
    let writer = {
        let mut w = Raw::from_stream(raw.s.try_clone().unwrap());
        let inputs = inputs.clone();
        std::thread::spawn(move || {
            for i in 0..n {
                let t = targets[(i % 4) as usize];
                w.send(i * 7 + 1, &spec(t, 1, WIDTH, &inputs[i as usize]));
            }
        })
    };
    let mut seen = vec![false; n as usize];
    let models = [model("a"), model("b"), model("c")];
    for _ in 0..n {
        let r = raw.recv();
        assert_eq!(r.status, Status::Ok, "{}", r.message);
        assert_eq!((r.id - 1) % 7, 0);
        let i = ((r.id - 1) / 7) as usize;
        assert!(!seen[i], "id {} answered twice", r.id);
        seen[i] = true;
        let x = &inputs[i];
        let expect = match i % 4 {
            3 => {
                let m: Vec<Vec<f32>> = models.iter().map(|m| direct(m, x, 1)).collect();
                (0..CLASSES)
                    .map(|k| m.iter().map(|v| v[k]).sum::<f32>() / 3.0)
                    .collect()
            }
            j => direct(&models[j], x, 1),
        };
        // Batched with others, a row may take another kernel path: compare
        // within the backend's stated tolerance, not bit for bit.
        assert_close(&r.output, &expect, 2e-3);
    }
    writer.join().unwrap();
    assert!(seen.iter().all(|&s| s));
    let totals = server.shutdown();
    assert!(
        totals.batches < totals.batch_rows,
        "requests were batched together"
    );
}

#[test]
fn bad_requests_get_a_status_and_the_connection_keeps_serving() {
    let server = start_server();
    let mut raw = Raw::connect(server.addr);
    let x = rows(1, 1, WIDTH);

    // Unknown target.
    raw.send(1, &spec("nope", 1, WIDTH, &x));
    let r = raw.recv();
    assert_eq!((r.id, r.status), (1, Status::NotFound));
    assert!(r.message.contains("nope"), "{}", r.message);

    // Wrong input width.
    let wide = rows(1, 1, WIDTH + 1);
    raw.send(2, &spec("a", 1, WIDTH + 1, &wide));
    let r = raw.recv();
    assert_eq!((r.id, r.status), (2, Status::BadRequest));
    assert!(r.message.contains("columns"), "{}", r.message);

    // NaN and infinity.
    for (id, bad) in [(3u64, f32::NAN), (4, f32::INFINITY)] {
        let mut y = x.clone();
        y[5] = bad;
        raw.send(id, &spec("ens", 1, WIDTH, &y));
        let r = raw.recv();
        assert_eq!((r.id, r.status), (id, Status::BadRequest));
        assert!(r.message.contains("not finite"), "{}", r.message);
    }

    // A version on an ensemble.
    let mut s = spec("ens", 1, WIDTH, &x);
    s.version = Some(1);
    raw.send(5, &s);
    assert_eq!(raw.recv().status, Status::BadRequest);

    // A frame whose body fails flatbuffers verification: random bytes.
    let mut seed = 0x1234_5678u64;
    for _ in 0..50 {
        let len = 8 + (seed % 200) as usize;
        let mut frame = (len as u32).to_le_bytes().to_vec();
        for _ in 0..len {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            frame.push((seed >> 56) as u8);
        }
        raw.send_bytes(&frame);
        let r = raw.recv();
        assert_eq!(
            r.status,
            Status::BadRequest,
            "random body answered {:?}",
            r.status
        );
    }

    // A valid frame, truncated inside its body, then completed: framing
    // waits for the rest instead of failing.
    let mut frame = Vec::new();
    beast::wire::Encoder::new().request(6, &spec("a", 1, WIDTH, &x), &mut frame);
    raw.send_bytes(&frame[..7]);
    common::wait_until(
        Duration::from_secs(10),
        "the server to read the first 7 bytes",
        || common::server_has_read(&raw.s),
    );
    raw.send_bytes(&frame[7..]);
    let r = raw.recv();
    assert_eq!((r.id, r.status), (6, Status::Ok));
    assert_eq!(r.output, direct(&model("a"), &x, 1));

    // Still serving on the same connection.
    raw.send(7, &spec("ens", 1, WIDTH, &x));
    assert_eq!(raw.recv().status, Status::Ok);
    server.shutdown();
}

#[test]
fn a_bad_length_prefix_closes_only_that_connection() {
    let server = start_server();
    let x = rows(1, 1, WIDTH);
    let good = Client::connect(server.addr).unwrap();

    // Oversized declared length.
    let mut raw = Raw::connect(server.addr);
    raw.send_bytes(&(u32::MAX).to_le_bytes());
    assert!(raw.is_closed(), "oversized frame must close the connection");

    // Zero length.
    let mut raw = Raw::connect(server.addr);
    raw.send_bytes(&[0, 0, 0, 0]);
    assert!(raw.is_closed());

    // A request in flight before the bad prefix is still answered.
    let mut raw = Raw::connect(server.addr);
    raw.send(11, &spec("ens", 1, WIDTH, &x));
    raw.send_bytes(&(1u32 << 31).to_le_bytes());
    let r = raw.recv();
    assert_eq!((r.id, r.status), (11, Status::Ok));
    assert!(raw.is_closed());

    // A truncated frame followed by the client closing: nothing to answer,
    // and the server is unharmed.
    let mut raw = Raw::connect(server.addr);
    raw.send_bytes(&[100, 0, 0, 0, 1, 2, 3]);
    raw.s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(raw.is_closed());

    assert!(good.predict(&spec("a", 1, WIDTH, &x)).is_ok());
    assert!(Client::connect(server.addr)
        .unwrap()
        .predict(&spec("ens", 1, WIDTH, &x))
        .is_ok());
    let totals = server.shutdown();
    assert!(totals.connections_dropped >= 3);
}

#[test]
fn too_many_in_flight_on_a_connection_is_overloaded() {
    let mut cfg = test_config();
    cfg.in_flight_per_connection_max = 4;
    let server = start_with(cfg, test_repository(200_000));
    let mut raw = Raw::connect(server.addr);
    let x = rows(1, 1, WIDTH);
    // `slow` holds requests 200 ms in its queue, so they stay in flight.
    for id in 0..10 {
        raw.send(id, &spec("slow", 1, WIDTH, &x));
    }
    let mut ok = 0;
    let mut overloaded = 0;
    for _ in 0..10 {
        match raw.recv().status {
            Status::Ok => ok += 1,
            Status::Overloaded => overloaded += 1,
            s => panic!("unexpected {s:?}"),
        }
    }
    assert_eq!((ok, overloaded), (4, 6));
    server.shutdown();
}

#[test]
fn a_full_queue_answers_overloaded_at_once() {
    let mut repo = test_repository(500_000);
    // Shrink `slow`'s queue to 8 rows.
    let slow = repo.models.get_mut("slow").unwrap();
    let mut m = beast::model::Model::random(
        "slow",
        &[WIDTH, 8, CLASSES],
        beast::model::Activation::Relu,
        beast::model::OutputTransform::Softmax,
        7,
    );
    m.batch = beast::model::BatchLimits {
        max_batch: 8,
        min_batch: 8,
        max_queue_delay_us: 2_000_000,
        queue_rows_max: 8,
    };
    slow[0] = std::sync::Arc::new(m);
    let server = start_with(test_config(), repo);
    let mut raw = Raw::connect(server.addr);
    let t0 = Instant::now();
    for id in 0..4 {
        // Distinct inputs: identical ones would wait on each other (coalescing), not queue.
        let x = rows(id, 3, WIDTH);
        raw.send(id, &spec("slow", 3, WIDTH, &x));
    }
    // 3 + 3 rows fit; the third and fourth requests (9 and 12 rows) do not.
    let first = raw.recv();
    assert_eq!(first.status, Status::Overloaded);
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "OVERLOADED must not wait for the queue (2 s delay): {:?}",
        t0.elapsed()
    );
    assert_eq!(raw.recv().status, Status::Overloaded);
    assert_eq!(raw.recv().status, Status::Ok);
    assert_eq!(raw.recv().status, Status::Ok);
    server.shutdown();
}

#[test]
fn deadline_exceeded_when_the_answer_is_late() {
    let server = start_server();
    let client = Client::connect(server.addr).unwrap();
    let x = rows(1, 1, WIDTH);
    // `slow` waits 300 ms to fill a batch: a 20 ms budget cannot be met.
    let mut s = spec("slow", 1, WIDTH, &x);
    s.deadline_us = Some(20_000);
    assert!(matches!(
        client.predict(&s),
        Err(ClientError::DeadlineExceeded(_))
    ));
    // A generous budget is met.
    let mut s = spec("a", 1, WIDTH, &x);
    s.deadline_us = Some(5_000_000);
    assert!(client.predict(&s).is_ok());
    server.shutdown();
}

#[test]
fn shutdown_answers_every_request_in_flight() {
    let server = start_server();
    let client = Client::connect(server.addr).unwrap();
    let x = rows(42, 1, WIDTH);
    // `slow` holds requests for 300 ms: they are in flight when stop comes.
    let pending: Vec<_> = (0..50)
        .map(|_| client.send(&spec("slow", 1, WIDTH, &x)).unwrap())
        .collect();
    let admin = server.admin_addr.unwrap();
    common::wait_until(Duration::from_secs(10), "50 requests in flight", || {
        common::metric(admin, "beast_in_flight_requests") == Some(50.0)
    });
    let t0 = Instant::now();
    server.stop();
    for p in pending {
        let r = p
            .wait()
            .expect("in-flight request answered during shutdown");
        // 50 rows ran as one batch: same numbers within the backend tolerance.
        assert_close(&r.outputs, &direct(&model("slow"), &x, 1), 2e-3);
    }
    let addr = server.addr;
    let totals = server.wait();
    assert_eq!(totals.responses[0], 50);
    assert!(t0.elapsed() < Duration::from_secs(4));
    // Nothing listens any more.
    assert!(std::net::TcpStream::connect(addr).is_err());
}

#[test]
fn two_shards_share_the_port() {
    if std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        < 2
    {
        return;
    }
    let mut cfg = test_config();
    cfg.cores = vec![0, 1];
    let server = start_with(cfg, test_repository(300_000));
    let x = rows(8, 1, WIDTH);
    let clients: Vec<Client> = (0..8)
        .map(|_| Client::connect(server.addr).unwrap())
        .collect();
    for c in &clients {
        assert_eq!(c.predict(&spec("ens", 1, WIDTH, &x)).unwrap().rows, 1);
    }
    let totals = server.shutdown();
    assert_eq!(totals.connections_accepted, 8);
}

#[test]
fn a_port_in_use_is_refused() {
    let server = start_server();
    let mut cfg = test_config();
    cfg.listen = server.addr.to_string();
    let err = beast::server::start(cfg, std::sync::Arc::new(test_repository(300_000)))
        .err()
        .expect("a second server on the same port must not start");
    assert!(err.contains("listen"), "{err}");
    server.shutdown();
}

#[test]
fn a_peer_that_resets_with_requests_in_flight_frees_its_connection() {
    // The write of one answer fails (the peer reset), another answer is
    // still in flight: when it came, the dead connection's writer was never
    // woken again, so the connection (and its slot) leaked forever.
    let mut repo = test_repository(300_000);
    let mut slower = beast::model::Model::random(
        "slower",
        &[WIDTH, 8, CLASSES],
        beast::model::Activation::Relu,
        beast::model::OutputTransform::Softmax,
        9,
    );
    slower.batch = beast::model::BatchLimits {
        max_batch: 16,
        min_batch: 16,
        max_queue_delay_us: 900_000,
        queue_rows_max: 64,
    };
    repo.models
        .insert("slower".into(), vec![std::sync::Arc::new(slower)]);
    let mut cfg = test_config();
    cfg.connections_per_shard_max = 1;
    let server = start_with(cfg, repo);
    let mut raw = Raw::connect(server.addr);
    let x = rows(3, 1, WIDTH);
    raw.send(1, &spec("slow", 1, WIDTH, &x));
    raw.send(2, &spec("slower", 1, WIDTH, &x));
    raw.send(3, &spec("a", 1, WIDTH, &x));
    assert_eq!(raw.recv().id, 3);
    // Reset: SO_LINGER 0, then close.
    socket2::SockRef::from(&raw.s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(raw);
    // Both slow answers come (and go nowhere), and the slot is released.
    let admin = server.admin_addr.unwrap();
    common::wait_until(
        Duration::from_secs(10),
        "the reset connection closed",
        || {
            common::metric(admin, "beast_connections_open") == Some(0.0)
                && common::metric(admin, "beast_in_flight_requests") == Some(0.0)
        },
    );
    let client = Client::connect(server.addr).unwrap();
    let r = client.predict(&spec("a", 1, WIDTH, &x));
    assert!(r.is_ok(), "the only connection slot is free again: {r:?}");
    drop(client);
    let t0 = Instant::now();
    server.shutdown();
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "no connection left open"
    );
}

// a_declared_frame_length_alone_does_not_allocate_the_frame: tests/frame_memory.rs
// (its own binary: it counts bytes in a global allocator).

#[test]
fn a_cut_off_ensemble_request_does_not_fail_identical_ones_without_a_deadline() {
    // Identical ensemble requests wait on the first (coalescing). When the
    // first had a deadline and the straggler cutoff answered it before any
    // member did, every request waiting on it got INTERNAL ("backend
    // failed"), even ones from other clients with no deadline at all.
    let mut repo = test_repository(300_000);
    repo.ensembles.insert(
        "sens".into(),
        beast::model::EnsembleSpec {
            name: "sens".into(),
            members: vec!["slow".into(), "a".into()],
            combiner: beast::model::Combiner::Mean,
            weights: vec![],
            selection: Default::default(),
        },
    );
    let server = start_with(test_config(), repo);
    let x = rows(77, 1, WIDTH);
    let mut hasty = Raw::connect(server.addr);
    let mut s = spec("sens", 1, WIDTH, &x);
    s.deadline_us = Some(1);
    hasty.send(1, &s);
    let mut patient = Raw::connect(server.addr);
    patient.send(2, &spec("sens", 1, WIDTH, &x));
    let r = hasty.recv();
    assert_eq!(r.status, Status::DeadlineExceeded, "{}", r.message);
    let r = patient.recv();
    assert_eq!((r.id, r.status), (2, Status::Ok), "{}", r.message);
    assert_eq!(r.runs.len(), 2, "a full answer, not a cut-off one");
    server.shutdown();
}

#[test]
fn shutdown_answers_a_cascade_whose_next_member_is_idle() {
    // A cascade enqueues its next member only when the previous one has
    // answered. During shutdown the next member's batcher could already
    // have returned (queue empty, stopping): the step was queued for
    // nobody and the request was never answered.
    let mut repo = test_repository(300_000);
    let mut mid = beast::model::Model::random(
        "mid",
        &[WIDTH, 64, CLASSES],
        beast::model::Activation::Relu,
        beast::model::OutputTransform::Softmax,
        11,
    );
    mid.batch = beast::model::BatchLimits {
        max_batch: 16,
        min_batch: 16,
        max_queue_delay_us: 150_000,
        queue_rows_max: 64,
    };
    repo.models
        .insert("mid".into(), vec![std::sync::Arc::new(mid)]);
    repo.ensembles.insert(
        "casc".into(),
        beast::model::EnsembleSpec {
            name: "casc".into(),
            // `slow` is cheaper: it runs first (300 ms), then `mid`.
            members: vec!["mid".into(), "slow".into()],
            combiner: beast::model::Combiner::Mean,
            weights: vec![],
            selection: beast::model::SelectionSpec {
                policy: beast::model::Policy::Cascade,
                // Never confident: always take the second step.
                cascade_threshold: 2.0,
                ..Default::default()
            },
        },
    );
    let mut cfg = test_config();
    cfg.shutdown_grace_ms = 2000;
    let server = start_with(cfg, repo);
    let x = rows(12, 1, WIDTH);
    let mut casc = Raw::connect(server.addr);
    casc.send(1, &spec("casc", 1, WIDTH, &x));
    // `mid` runs a batch at 150 ms, after the stop: its batcher then sees
    // an empty queue while stopping.
    // (Another input: the same one would serve the step from the cache.)
    let y = rows(13, 1, WIDTH);
    let mut direct = Raw::connect(server.addr);
    direct.send(2, &spec("mid", 1, WIDTH, &y));
    let admin = server.admin_addr.unwrap();
    common::wait_until(Duration::from_secs(10), "both requests in flight", || {
        common::metric(admin, "beast_in_flight_requests") == Some(2.0)
    });
    server.stop();
    assert_eq!(direct.recv().status, Status::Ok);
    let r = casc
        .recv_body()
        .map(|b| Owned::from(&b))
        .expect("the cascade is answered before the connection closes");
    assert_eq!((r.id, r.status), (1, Status::Ok), "{}", r.message);
    assert_eq!(r.runs.len(), 2);
    server.wait();
}

#[test]
fn an_ensemble_listing_a_member_twice_is_refused() {
    // Room in each member's queue was checked member by member, then every
    // share was pushed: with room for one share of `a` but not two, the
    // second push failed silently and the request was never answered (its
    // ensemble slot and in-flight count leaked for good).
    let mut repo = test_repository(300_000);
    repo.ensembles.insert(
        "twice".into(),
        beast::model::EnsembleSpec {
            name: "twice".into(),
            members: vec!["a".into(), "c".into(), "a".into()],
            combiner: beast::model::Combiner::Mean,
            weights: vec![],
            selection: Default::default(),
        },
    );
    match beast::server::start(test_config(), std::sync::Arc::new(repo)) {
        Ok(s) => {
            s.shutdown();
            panic!("an ensemble with a repeated member was accepted");
        }
        Err(e) => assert!(e.contains("more than once"), "{e}"),
    }
}

#[test]
fn a_frame_larger_than_the_read_buffer_is_served_and_the_buffer_given_back() {
    let mut cfg = test_config();
    cfg.rows_per_request_max = 4096;
    let server = start_with(cfg, test_repository(300_000));
    let mut raw = Raw::connect(server.addr);
    // 2000 rows × 12 f32 ≈ 96 KiB: larger than the 64 KiB initial buffer.
    let big = rows(31, 2000, WIDTH);
    let mut s = spec("c", 2000, WIDTH, &big);
    s.cache = beast::wire::CacheControl::Bypass;
    raw.send(1, &s);
    let r = raw.recv();
    assert_eq!(
        (r.id, r.status, r.rows),
        (1, Status::Ok, 2000),
        "{}",
        r.message
    );
    assert_close(&r.output, &direct(&model("c"), &big, 2000), 2e-3);
    // Small requests keep working on the same connection afterwards.
    for id in 2..5 {
        let x = rows(id, 1, WIDTH);
        raw.send(id, &spec("c", 1, WIDTH, &x));
        let r = raw.recv();
        assert_eq!((r.id, r.status), (id, Status::Ok));
    }
    server.shutdown();
}
