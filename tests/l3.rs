//! The L3 tier on a real `redis-server` (Debian package `redis-server`;
//! `.ci/run` installs it): an answer computed on one node is a hit on
//! another; a Redis that dies or hangs fails no request and opens the
//! breaker; a Redis that comes back closes it. Prints `SKIP:` without
//! redis-server.

mod common;
#[path = "common/redis_server.rs"]
mod redis_server;

use common::*;
use redis_server::{redis_or_skip, Redis};
use std::time::Duration;

/// A node with its own L2 file and the shared L3 at `url`.
fn node(name: &str, url: &str) -> beast::server::ServerHandle {
    let mut cfg = test_config();
    cfg.cache.l2_path = temp_dir(name).join("l2.cache");
    cfg.cache.l2_bytes = 1 << 20;
    cfg.cache.l3 = Some(beast::config::L3Settings {
        url: url.into(),
        // The test models compute in µs: `auto` would rather compute.
        lookup: beast::config::L3Lookup::Always,
        // A loaded CI machine must not turn a hit into a timeout (the
        // budget itself is exercised by the hung-Redis test).
        lookup_budget_us: 200_000,
        ..Default::default()
    });
    start_with(cfg, test_repository(300_000))
}

/// One series of `name` with exactly `labels` (e.g. `{tier="l3"}`).
fn series(admin: std::net::SocketAddr, name_labels: &str) -> Option<f64> {
    let (code, text) =
        beast::server::admin::get(&admin.to_string(), "/metrics", Duration::from_secs(5)).ok()?;
    assert_eq!(code, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(name_labels)?.strip_prefix(' ')?.parse().ok())
}

fn breaker(admin: std::net::SocketAddr) -> Option<f64> {
    series(admin, "beast_cache_l3_breaker_open")
}

fn ask(conn: &mut Raw, id: u64, seed: u64) -> Owned {
    let x = rows(seed, 1, WIDTH);
    conn.send(id, &spec("a", 1, WIDTH, &x));
    conn.recv()
}

#[test]
fn an_answer_computed_on_one_node_is_an_l3_hit_on_another() {
    let Some(redis) = redis_or_skip() else {
        return;
    };
    let (a, b) = (node("l3-a", &redis.url()), node("l3-b", &redis.url()));
    let (aa, ba) = (a.admin_addr.unwrap(), b.admin_addr.unwrap());
    for admin in [aa, ba] {
        wait_until(Duration::from_secs(10), "the L3 breaker closes", || {
            breaker(admin) == Some(0.0)
        });
    }
    let mut ca = Raw::connect(a.addr);
    let first = ask(&mut ca, 1, 42);
    assert_eq!(first.status, beast::wire::Status::Ok, "{}", first.message);
    assert_eq!(series(aa, "beast_cache_hits_total{tier=\"l3\"}"), Some(0.0));
    wait_until(
        Duration::from_secs(10),
        "node A writes its answer to L3",
        || series(aa, "beast_cache_l3_fills_total") == Some(1.0),
    );

    assert_eq!(
        series(aa, "beast_batch_size_count{model=\"a\"}"),
        Some(1.0),
        "A computed it"
    );

    let mut cb = Raw::connect(b.addr);
    let second = ask(&mut cb, 2, 42);
    assert_eq!(second.status, beast::wire::Status::Ok, "{}", second.message);
    assert_eq!(second.output, first.output, "B answers what A computed");
    assert_eq!(
        series(ba, "beast_cache_hits_total{tier=\"l3\"}"),
        Some(1.0),
        "B's answer came from L3"
    );
    assert_eq!(
        series(ba, "beast_batch_size_count{model=\"a\"}"),
        Some(0.0),
        "B computed nothing"
    );
    assert_eq!(
        metric(ba, "beast_in_flight_requests"),
        Some(0.0),
        "an L3 hit leaves nothing in flight"
    );
    // B filled its own L2/L1 from the hit: asked again, it does not go to L3.
    let third = ask(&mut cb, 3, 42);
    assert_eq!(third.output, first.output);
    assert_eq!(series(ba, "beast_cache_hits_total{tier=\"l1\"}"), Some(1.0));

    // A different input misses L3 on B and is computed there.
    let other = ask(&mut cb, 4, 43);
    assert_eq!(other.status, beast::wire::Status::Ok);
    assert_close(
        &other.output,
        &direct(&model("a"), &rows(43, 1, WIDTH), 1),
        1e-2,
    );
    assert_eq!(
        series(ba, "beast_cache_l3_lookups_total{result=\"miss\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(ba, "beast_in_flight_requests"),
        Some(0.0),
        "a request computed after an L3 miss is counted once"
    );
    let readyz =
        beast::server::admin::get(&ba.to_string(), "/readyz", Duration::from_secs(5)).unwrap();
    assert_eq!(readyz.0, 200);
    assert!(readyz.1.contains("breaker closed"), "{}", readyz.1);
}

#[test]
fn an_ensemble_answer_is_shared_too_with_its_members_named() {
    let Some(redis) = redis_or_skip() else {
        return;
    };
    let (a, b) = (
        node("l3-ens-a", &redis.url()),
        node("l3-ens-b", &redis.url()),
    );
    let (aa, ba) = (a.admin_addr.unwrap(), b.admin_addr.unwrap());
    for admin in [aa, ba] {
        wait_until(Duration::from_secs(10), "the L3 breaker closes", || {
            breaker(admin) == Some(0.0)
        });
    }
    let x = rows(77, 1, WIDTH);
    let mut ca = Raw::connect(a.addr);
    ca.send(1, &spec("ens", 1, WIDTH, &x));
    let first = ca.recv();
    assert_eq!(first.status, beast::wire::Status::Ok, "{}", first.message);
    wait_until(
        Duration::from_secs(10),
        "A writes the ensemble's answer and its three members'",
        // Four entries: waiting for one let B ask while the ensemble's was
        // still queued (B then took the three members from L3 instead).
        || series(aa, "beast_cache_l3_fills_total") >= Some(4.0),
    );
    let mut cb = Raw::connect(b.addr);
    cb.send(2, &spec("ens", 1, WIDTH, &x));
    let second = cb.recv();
    assert_eq!(second.status, beast::wire::Status::Ok, "{}", second.message);
    assert_eq!(second.output, first.output);
    assert_eq!(series(ba, "beast_cache_hits_total{tier=\"l3\"}"), Some(1.0));
    let names: Vec<&str> = second.runs.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"], "the members behind the answer");
    for m in ["a", "b", "c"] {
        let q = format!("beast_batch_size_count{{model=\"{m}\"}}");
        assert_eq!(series(ba, &q), Some(0.0), "B ran no member");
    }
}

/// Member-level lookups: node A computed member `a` for an input (asked
/// directly); node B, asked the ensemble `ens` (members a, b, c) for that
/// input, misses the ensemble's key in L3, takes `a`'s answer from L3 and
/// computes only `b` and `c`. Its answer equals a node without L3's.
#[test]
fn an_ensemble_member_computed_on_one_node_is_not_computed_again_on_another() {
    let Some(redis) = redis_or_skip() else {
        return;
    };
    let (a, b) = (
        node("l3-mem-a", &redis.url()),
        node("l3-mem-b", &redis.url()),
    );
    let alone = start_server();
    let (aa, ba) = (a.admin_addr.unwrap(), b.admin_addr.unwrap());
    for admin in [aa, ba] {
        wait_until(Duration::from_secs(10), "the L3 breaker closes", || {
            breaker(admin) == Some(0.0)
        });
    }
    let x = rows(4242, 1, WIDTH);
    let mut ca = Raw::connect(a.addr);
    ca.send(1, &spec("a", 1, WIDTH, &x));
    assert_eq!(ca.recv().status, beast::wire::Status::Ok);
    wait_until(Duration::from_secs(10), "A writes a's answer", || {
        series(aa, "beast_cache_l3_fills_total") == Some(1.0)
    });
    let mut cl = Raw::connect(alone.addr);
    cl.send(1, &spec("ens", 1, WIDTH, &x));
    let want = cl.recv();
    assert_eq!(want.status, beast::wire::Status::Ok, "{}", want.message);

    let mut cb = Raw::connect(b.addr);
    cb.send(2, &spec("ens", 1, WIDTH, &x));
    let got = cb.recv();
    assert_eq!(got.status, beast::wire::Status::Ok, "{}", got.message);
    assert_close(&got.output, &want.output, 1e-6);
    let ran = |m: &str| series(ba, &format!("beast_batch_size_count{{model=\"{m}\"}}"));
    assert_eq!(ran("a"), Some(0.0), "B took member a from L3");
    assert_eq!(
        (ran("b"), ran("c")),
        (Some(1.0), Some(1.0)),
        "B computed b and c"
    );
    assert_eq!(series(ba, "beast_cache_hits_total{tier=\"l3\"}"), Some(1.0));
    assert_eq!(
        series(ba, "beast_cache_l3_lookups_total{result=\"miss\"}"),
        Some(3.0),
        "the ensemble's key, b and c missed"
    );
    assert_eq!(metric(ba, "beast_in_flight_requests"), Some(0.0));
    // B now holds a's answer in L1: a direct request for it is an L1 hit.
    cb.send(3, &spec("a", 1, WIDTH, &x));
    assert_eq!(cb.recv().status, beast::wire::Status::Ok);
    assert_eq!(ran("a"), Some(0.0));
}

#[test]
fn concurrent_lookups_share_round_trips() {
    let Some(redis) = redis_or_skip() else {
        return;
    };
    let (a, b) = (
        node("l3-batch-a", &redis.url()),
        node("l3-batch-b", &redis.url()),
    );
    let (aa, ba) = (a.admin_addr.unwrap(), b.admin_addr.unwrap());
    for admin in [aa, ba] {
        wait_until(Duration::from_secs(10), "the L3 breaker closes", || {
            breaker(admin) == Some(0.0)
        });
    }
    let n = 64u64;
    let mut ca = Raw::connect(a.addr);
    for i in 0..n {
        assert_eq!(ask(&mut ca, i, 7000 + i).status, beast::wire::Status::Ok);
    }
    wait_until(Duration::from_secs(10), "A's answers written", || {
        series(aa, "beast_cache_l3_fills_total") == Some(n as f64)
    });
    // All 64 sent in one write: B parks them together, and the L3 thread
    // asks for whatever is queued in one MGET.
    let mut frames = Vec::new();
    let inputs: Vec<Vec<f32>> = (0..n).map(|i| rows(7000 + i, 1, WIDTH)).collect();
    let mut enc = beast::wire::Encoder::new();
    for (i, x) in inputs.iter().enumerate() {
        enc.request(i as u64 + 1, &spec("a", 1, WIDTH, x), &mut frames);
    }
    let mut cb = Raw::connect(b.addr);
    cb.send_bytes(&frames);
    for _ in 0..n {
        let r = cb.recv();
        assert_eq!(r.status, beast::wire::Status::Ok, "{}", r.message);
        let i = r.id as usize - 1;
        assert_close(&r.output, &direct(&model("a"), &inputs[i], 1), 1e-2);
    }
    assert_eq!(
        series(ba, "beast_cache_hits_total{tier=\"l3\"}"),
        Some(n as f64)
    );
    let batches = series(ba, "beast_cache_l3_batches_total").unwrap();
    assert!(
        batches < n as f64,
        "{n} concurrent lookups took {batches} round trips"
    );
}

/// One request of the same input to each node (the one asked first
/// alternating), both answers checked; the client-side times, µs.
fn pair(c: &mut Raw, cb: &mut Raw, i: u64) -> (f64, f64) {
    let x = rows(100_000 + i, 1, WIDTH);
    let one = |conn: &mut Raw| {
        let t = std::time::Instant::now();
        conn.send(i + 1, &spec("a", 1, WIDTH, &x));
        let r = conn.recv();
        let us = t.elapsed().as_secs_f64() * 1e6;
        assert_eq!(r.status, beast::wire::Status::Ok, "pair {i}: {}", r.message);
        (r.output, us)
    };
    let ((o1, u1), (o2, u2)) = if i.is_multiple_of(2) {
        let a = one(c);
        (a, one(cb))
    } else {
        let b = one(cb);
        (one(c), b)
    };
    assert_eq!(
        o1, o2,
        "pair {i}: the L3 node answers what the other computes"
    );
    if i.is_multiple_of(500) {
        assert_close(&o1, &direct(&model("a"), &x, 1), 1e-2);
    }
    (u1, u2)
}

/// p99 of `us` (sorted in place).
fn p99(us: &mut [f64]) -> f64 {
    us.sort_by(f64::total_cmp);
    us[(us.len() * 99 / 100).min(us.len() - 1)]
}

/// Redis killed (SIGKILL) mid-run while a client keeps two nodes busy: one
/// with L3 (`lookup = "always"`, so every request had a lookup on its way
/// to Redis when it died: the worst case) and one without. The client
/// alternates requests between them (same inputs, the node asked first
/// alternating), so both see the same load and the same VM noise. From the
/// kill on: no request fails, answers match the no-L3 node's, and the L3
/// node's p99 stays within 1.2× the no-L3 node's p99 plus a 250 µs floor
/// (a scheduler stall on the loaded 2-core CI VM, where a p99 of ~100 µs
/// moves by ms between runs), over a window of 3000 requests each that
/// starts at the kill; on a miss, up to two more windows (Redis still
/// down) are measured and the best one judged: a slowdown due to L3 would
/// show in every window, a stall of the shared VM rarely hits three. Then
/// the breaker is open in /metrics and /readyz; Redis restarted on the
/// same port closes it.
#[test]
fn redis_dying_under_load_fails_no_request_keeps_p99_and_the_breaker_moves() {
    let Some(redis) = redis_or_skip() else {
        return;
    };
    let port = redis.port;
    let mut cfg = test_config();
    cfg.cache.l2_path = temp_dir("l3-down").join("l2.cache");
    cfg.cache.l2_bytes = 1 << 20;
    let mut base_cfg = cfg.clone();
    base_cfg.cache.l2_path = temp_dir("l3-down-base").join("l2.cache");
    cfg.cache.l3 = Some(beast::config::L3Settings {
        url: redis.url(),
        lookup: beast::config::L3Lookup::Always,
        // Above a loaded CI VM's stalls, so the breaker is closed until
        // the kill; a killed Redis fails the lookups in flight at once
        // (connection reset), it does not make them wait the budget.
        lookup_budget_us: 20_000,
        ..Default::default()
    });
    let n = start_with(cfg, test_repository(300_000));
    let base = start_with(base_cfg, test_repository(300_000));
    let admin = n.admin_addr.unwrap();
    wait_until(Duration::from_secs(10), "the L3 breaker closes", || {
        breaker(admin) == Some(0.0)
    });
    let (mut c, mut cb) = (Raw::connect(n.addr), Raw::connect(base.addr));
    let pairs = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let killed_at = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    // Kills Redis from another thread while requests are in flight.
    let killer = {
        let (pairs, killed_at) = (pairs.clone(), killed_at.clone());
        std::thread::spawn(move || {
            let mut redis = Some(redis);
            while pairs.load(std::sync::atomic::Ordering::Relaxed) < 500 {
                std::thread::yield_now();
            }
            redis.take().unwrap().signal("-KILL");
            let at = pairs.load(std::sync::atomic::Ordering::Relaxed);
            killed_at.store(at, std::sync::atomic::Ordering::Relaxed);
            drop(redis);
        })
    };
    let window = 3000u64;
    let (mut l3_us, mut base_us) = (Vec::new(), Vec::new());
    let mut i = 0u64;
    let mut tries = Vec::new();
    loop {
        let k = killed_at.load(std::sync::atomic::Ordering::Relaxed);
        let (u1, u2) = pair(&mut c, &mut cb, i);
        if k != u64::MAX && i >= k {
            l3_us.push(u1);
            base_us.push(u2);
        }
        i += 1;
        pairs.store(i, std::sync::atomic::Ordering::Relaxed);
        if l3_us.len() as u64 == window {
            let (p_l3, p_base) = (p99(&mut l3_us), p99(&mut base_us));
            println!(
                "redis killed at pair {k}; pairs {}..{i}: p99 L3 node {p_l3:.0} us, no-L3 node {p_base:.0} us",
                i - window
            );
            tries.push((p_l3, p_base));
            // A slowdown from L3 shows in every window; a scheduler
            // stall on the shared VM rarely hits three in a row.
            if p_l3 <= 1.2 * p_base + 250.0 || tries.len() == 3 {
                break;
            }
            l3_us.clear();
            base_us.clear();
        }
    }
    killer.join().unwrap();
    assert!(
        tries.iter().any(|&(l3, base)| l3 <= 1.2 * base + 250.0),
        "p99 (us, with L3, without) in windows of {window} requests after Redis died: {tries:?}"
    );
    assert_eq!(breaker(admin), Some(1.0), "the breaker is open in /metrics");
    assert!(
        series(admin, "beast_cache_l3_lookups_total{result=\"sent\"}") >= Some(100.0),
        "L3 was in use before Redis died"
    );
    assert!(series(admin, "beast_cache_l3_lookups_total{result=\"skipped\"}") >= Some(1000.0));
    let readyz =
        beast::server::admin::get(&admin.to_string(), "/readyz", Duration::from_secs(5)).unwrap();
    assert_eq!(readyz.0, 200, "an open breaker leaves the node ready");
    assert!(readyz.1.contains("breaker open"), "{}", readyz.1);

    let _back = Redis::start(port).expect("redis-server restarts");
    let mut id = 1_000_000;
    wait_until(Duration::from_secs(10), "the breaker closes again", || {
        id += 1;
        assert_eq!(ask(&mut c, id, id).status, beast::wire::Status::Ok);
        breaker(admin) == Some(0.0)
    });
    assert_eq!(ask(&mut c, id + 1, id + 1).status, beast::wire::Status::Ok);
    assert!(series(admin, "beast_cache_l3_breaker_opens_total") >= Some(1.0));
    let readyz =
        beast::server::admin::get(&admin.to_string(), "/readyz", Duration::from_secs(5)).unwrap();
    assert!(readyz.1.contains("breaker closed"), "{}", readyz.1);
}

#[test]
fn a_hung_redis_costs_at_most_the_lookup_budget_and_opens_the_breaker() {
    let Some(redis) = redis_or_skip() else {
        return;
    };
    let n = node("l3-hung", &redis.url());
    let admin = n.admin_addr.unwrap();
    wait_until(Duration::from_secs(10), "the L3 breaker closes", || {
        breaker(admin) == Some(0.0)
    });
    let mut c = Raw::connect(n.addr);
    redis.signal("-STOP");
    let mut id = 0;
    wait_until(Duration::from_secs(10), "the breaker opens", || {
        id += 1;
        let r = ask(&mut c, id, 5000 + id);
        assert_eq!(r.status, beast::wire::Status::Ok, "{}", r.message);
        breaker(admin) == Some(1.0)
    });
    assert!(
        series(admin, "beast_cache_l3_lookups_total{result=\"timeout\"}") >= Some(1.0),
        "the first lookups ran out of budget and were computed"
    );
    redis.signal("-CONT");
    wait_until(Duration::from_secs(10), "the breaker closes again", || {
        breaker(admin) == Some(0.0)
    });
}

#[test]
fn auto_lookup_stops_asking_l3_for_a_model_that_computes_faster_than_a_round_trip() {
    let Some(redis) = redis_or_skip() else {
        return;
    };
    let mut cfg = test_config();
    cfg.cache.l3 = Some(beast::config::L3Settings {
        url: redis.url(),
        ..Default::default()
    });
    assert_eq!(
        cfg.cache.l3.as_ref().unwrap().lookup,
        beast::config::L3Lookup::Auto
    );
    let n = start_with(cfg, test_repository(300_000));
    let admin = n.admin_addr.unwrap();
    wait_until(Duration::from_secs(10), "the L3 breaker closes", || {
        breaker(admin) == Some(0.0)
    });
    let mut c = Raw::connect(n.addr);
    let mut id = 0;
    // `a` computes in a few µs; a Redis round trip through the L3 thread
    // takes tens: once both are measured, requests compute without asking.
    wait_until(
        Duration::from_secs(10),
        "lookups judged not worth it",
        || {
            id += 1;
            let r = ask(&mut c, id, 9000 + id);
            assert_eq!(r.status, beast::wire::Status::Ok, "{}", r.message);
            series(admin, "beast_cache_l3_lookups_total{result=\"cheaper\"}") >= Some(1.0)
        },
    );
    let sent = series(admin, "beast_cache_l3_lookups_total{result=\"sent\"}");
    for _ in 0..20 {
        id += 1;
        assert_eq!(ask(&mut c, id, 9000 + id).status, beast::wire::Status::Ok);
    }
    assert_eq!(
        series(admin, "beast_cache_l3_lookups_total{result=\"sent\"}"),
        sent,
        "no more lookups for a model cheaper than L3"
    );
}

/// perf/l3.md: p50/p99 of one request at a time on one connection — a
/// compute on a node without L3, a compute after an L3 miss, an L3 hit, an
/// L1 hit — for the tiny test model `a` and a 256→1024→1024→16 MLP.
/// `cargo test --release --test l3 -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_l3_hit_against_compute() {
    use beast::model::{Activation, Model, OutputTransform};
    let Some(redis) = redis_or_skip() else {
        return;
    };
    let n = 2000u64;
    let big = || {
        let mut m = Model::random(
            "big",
            &[256, 1024, 1024, 16],
            Activation::Relu,
            OutputTransform::Softmax,
            9,
        );
        m.batch.max_queue_delay_us = 0;
        std::sync::Arc::new(m)
    };
    let repo = || {
        let mut r = test_repository(300_000);
        r.models.insert("big".into(), vec![big()]);
        r
    };
    let mk = |name: &str, l3: bool| {
        let mut cfg = test_config();
        cfg.cache.l2_path = temp_dir(name).join("l2.cache");
        cfg.cache.l2_bytes = 16 << 20;
        if l3 {
            cfg.cache.l3 = Some(beast::config::L3Settings {
                url: redis.url(),
                lookup: beast::config::L3Lookup::Always,
                ..Default::default()
            });
        }
        start_with(cfg, repo())
    };
    let (a, b, c) = (mk("p-a", true), mk("p-b", true), mk("p-c", false));
    for h in [&a, &b] {
        let admin = h.admin_addr.unwrap();
        wait_until(Duration::from_secs(10), "breaker closed", || {
            breaker(admin) == Some(0.0)
        });
    }
    for (target, width) in [("a", WIDTH), ("big", 256)] {
        let run = |h: &beast::server::ServerHandle, seed0: u64| {
            let mut conn = Raw::connect(h.addr);
            let mut us = Vec::new();
            for i in 0..n {
                let x = rows(seed0 + i, 1, width);
                let t = std::time::Instant::now();
                conn.send(i, &spec(target, 1, width, &x));
                let r = conn.recv();
                us.push(t.elapsed().as_secs_f64() * 1e6);
                assert_eq!(r.status, beast::wire::Status::Ok, "{}", r.message);
            }
            us.sort_by(f64::total_cmp);
            let p = |q: f64| us[((us.len() as f64 * q) as usize).min(us.len() - 1)];
            format!("p50 {:7.1} us  p99 {:7.1} us", p(0.5), p(0.99))
        };
        let seed = if target == "a" { 1_000_000 } else { 2_000_000 };
        println!("{target}: compute, no L3:        {}", run(&c, seed));
        println!("{target}: compute after L3 miss: {}", run(&a, seed));
        wait_until(Duration::from_secs(10), "fills written", || {
            series(a.admin_addr.unwrap(), "beast_cache_l3_fills_total").unwrap_or(0.0)
                >= if target == "a" {
                    n as f64
                } else {
                    2.0 * n as f64
                }
        });
        println!("{target}: L3 hit:                {}", run(&b, seed));
        println!("{target}: L1 hit:                {}", run(&b, seed));
    }
}
