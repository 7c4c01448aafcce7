//! The prediction cache on the request path, against a real server.

mod common;

use beast::client::Client;
use beast::wire::CacheControl;
use common::*;
use std::time::Duration;

#[test]
fn a_repeated_request_is_answered_from_the_cache() {
    let server = start_server();
    let client = Client::connect(server.addr).unwrap();
    let x = rows(77, 1, WIDTH);
    let first = client.predict(&spec("b", 1, WIDTH, &x)).unwrap();
    assert!(!first.cached);
    let second = client.predict(&spec("b", 1, WIDTH, &x)).unwrap();
    assert!(second.cached, "second identical request must hit");
    assert_eq!(second.outputs, first.outputs);
    assert_eq!(
        second.runs,
        vec![("b".to_string(), 1, 0)],
        "nothing computed on a hit"
    );
    // A different input, or the same input to another model, misses.
    let y = rows(78, 1, WIDTH);
    assert!(!client.predict(&spec("b", 1, WIDTH, &y)).unwrap().cached);
    assert!(!client.predict(&spec("a", 1, WIDTH, &x)).unwrap().cached);
    // Bypass and refresh compute afresh.
    let mut s = spec("b", 1, WIDTH, &x);
    s.cache = CacheControl::Bypass;
    let p = client.predict(&s).unwrap();
    assert!(!p.cached);
    assert_eq!(p.outputs, first.outputs);
    s.cache = CacheControl::Refresh;
    assert!(!client.predict(&s).unwrap().cached);
    let totals = server.shutdown();
    assert_eq!(totals.cache_hits_l1, 1);
}

#[test]
fn ensembles_reuse_member_entries() {
    let server = start_server();
    let client = Client::connect(server.addr).unwrap();
    let x = rows(5, 1, WIDTH);
    let ens = client.predict(&spec("ens", 1, WIDTH, &x)).unwrap();
    assert!(
        ens.runs.iter().all(|r| r.2 > 0),
        "all members computed: {:?}",
        ens.runs
    );
    // Member a alone: the ensemble left its entry.
    let a = client.predict(&spec("a", 1, WIDTH, &x)).unwrap();
    assert!(a.cached);
    assert_eq!(a.outputs, direct(&model("a"), &x, 1));
    // Another ensemble sharing members a and c computes nothing.
    let w = client.predict(&spec("wens", 1, WIDTH, &x)).unwrap();
    assert!(
        w.runs.iter().all(|r| r.2 == 0),
        "members came from the cache: {:?}",
        w.runs
    );
    let expect: Vec<f32> = direct(&model("a"), &x, 1)
        .iter()
        .zip(direct(&model("c"), &x, 1))
        .map(|(a, c)| (a + 3.0 * c) / 4.0)
        .collect();
    assert_close(&w.outputs, &expect, 1e-6);
    // And the ensemble itself now hits.
    assert!(client.predict(&spec("ens", 1, WIDTH, &x)).unwrap().cached);
    server.shutdown();
}

#[test]
fn identical_requests_in_flight_are_computed_once() {
    let server = start_server();
    let client = Client::connect(server.addr).unwrap();
    let x = rows(11, 1, WIDTH);
    // `slow` holds its batch 300 ms: all ten arrive while the first is queued.
    let pending: Vec<_> = (0..10)
        .map(|_| client.send(&spec("slow", 1, WIDTH, &x)).unwrap())
        .collect();
    let answers: Vec<_> = pending.into_iter().map(|p| p.wait().unwrap()).collect();
    assert!(answers.iter().all(|a| a.outputs == answers[0].outputs));
    assert_eq!(answers.iter().filter(|a| !a.cached).count(), 1);
    let totals = server.shutdown();
    assert_eq!(totals.cache_coalesced, 9);
    // Warm-up batches are not counted: this is the one computed row.
    assert_eq!(totals.batch_rows, 1, "one row computed for ten requests");
}

#[test]
fn purge_and_ttl() {
    let dir = temp_dir("ttl");
    let mut cfg = test_config();
    cfg.cache.l2_path = dir.join("l2.cache");
    cfg.cache.l2_bytes = 1 << 20;
    cfg.cache.targets.insert(
        "c".into(),
        beast::config::TargetCache {
            enabled: None,
            ttl_s: 1,
        },
    );
    cfg.cache.targets.insert(
        "b".into(),
        beast::config::TargetCache {
            enabled: Some(false),
            ttl_s: 0,
        },
    );
    let server = start_with(cfg, test_repository(300_000));
    let client = Client::connect(server.addr).unwrap();
    let x = rows(3, 1, WIDTH);
    // Purge: the next request misses.
    client.predict(&spec("a", 1, WIDTH, &x)).unwrap();
    assert!(client.predict(&spec("a", 1, WIDTH, &x)).unwrap().cached);
    server.cache.purge("a").unwrap();
    assert!(!client.predict(&spec("a", 1, WIDTH, &x)).unwrap().cached);
    assert!(server.cache.purge("no-such-target").is_err());
    // The same through the admin port, as `beast cache purge` does it.
    assert!(client.predict(&spec("a", 1, WIDTH, &x)).unwrap().cached);
    let admin = server.admin_addr.unwrap().to_string();
    let t = Duration::from_secs(5);
    let (code, body) =
        beast::server::admin::request("POST", &admin, "/v1/cache/purge?target=a", t).unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("l2_entries_removed"), "{body}");
    assert!(!client.predict(&spec("a", 1, WIDTH, &x)).unwrap().cached);
    assert_eq!(
        beast::server::admin::request("POST", &admin, "/v1/cache/purge?target=zzz", t)
            .unwrap()
            .0,
        404
    );
    assert_eq!(
        beast::server::admin::request("POST", &admin, "/v1/cache/purge", t)
            .unwrap()
            .0,
        400
    );
    // Disabled target: never cached.
    client.predict(&spec("b", 1, WIDTH, &x)).unwrap();
    assert!(!client.predict(&spec("b", 1, WIDTH, &x)).unwrap().cached);
    // TTL of 1 s: a hit at once, a miss after it expired. Expiry is whole
    // unix seconds (an entry written at S.999 is gone at S+1): the hit is
    // checked on a pair of requests inside one second.
    let unix_s = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    loop {
        let s = unix_s();
        client.predict(&spec("c", 1, WIDTH, &x)).unwrap();
        let hit = client.predict(&spec("c", 1, WIDTH, &x)).unwrap().cached;
        if unix_s() == s {
            assert!(hit, "a 1 s TTL entry missed inside its own second");
            break;
        }
    }
    // Expiry is in whole seconds: ask until the answer is computed afresh
    // (a hit inserts nothing, so asking does not extend the entry).
    let t0 = std::time::Instant::now();
    common::wait_until(
        Duration::from_secs(5),
        "the 1 s TTL to expire the entry",
        || !client.predict(&spec("c", 1, WIDTH, &x)).unwrap().cached,
    );
    assert!(
        t0.elapsed() < Duration::from_millis(2100),
        "expired late: {:?}",
        t0.elapsed()
    );
    server.shutdown();
}

/// Zipf(1.0) ranks over `n` keys, seeded.
fn zipf_trace(n: usize, len: usize, seed: u64) -> Vec<usize> {
    let weights: Vec<f64> = (1..=n).map(|r| 1.0 / r as f64).collect();
    let total: f64 = weights.iter().sum();
    let mut cdf = Vec::with_capacity(n);
    let mut acc = 0.0;
    for w in &weights {
        acc += w / total;
        cdf.push(acc);
    }
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            cdf.partition_point(|&c| c < u).min(n - 1)
        })
        .collect()
}

fn replay(client: &Client, trace: &[usize]) -> f64 {
    let mut hits = 0;
    for chunk in trace.chunks(256) {
        let inputs: Vec<Vec<f32>> = chunk
            .iter()
            .map(|&k| rows(k as u64 + 1, 1, WIDTH))
            .collect();
        let pending: Vec<_> = inputs
            .iter()
            .map(|x| client.send(&spec("a", 1, WIDTH, x)).unwrap())
            .collect();
        for p in pending {
            if p.wait().unwrap().cached {
                hits += 1;
            }
        }
    }
    hits as f64 / trace.len() as f64
}

#[test]
fn a_restarted_server_starts_warm() {
    let dir = temp_dir("restart");
    let mut cfg = test_config();
    cfg.cache.l2_path = dir.join("l2.cache");
    cfg.cache.l2_bytes = 1 << 20; // ~8k slots: smaller than the key space, so eviction matters
    cfg.cache.l1_entries = 8; // keep L1 out of the comparison
    let trace = zipf_trace(30_000, 20_000, 42);
    let server = start_with(cfg.clone(), test_repository(300_000));
    let client = Client::connect(server.addr).unwrap();
    replay(&client, &trace); // warm
    let before = replay(&client, &trace);
    drop(client);
    server.shutdown();
    let server = start_with(cfg, test_repository(300_000));
    let client = Client::connect(server.addr).unwrap();
    let after = replay(&client, &trace);
    server.shutdown();
    assert!(
        before > 0.3 && before < 0.99,
        "the test needs a partial hit ratio, got {before}"
    );
    assert!(
        (before - after).abs() <= 0.01,
        "hit ratio before restart {before:.4}, after {after:.4}"
    );
}

#[test]
fn a_new_model_version_never_gets_old_answers() {
    let dir = temp_dir("version");
    let mut cfg = test_config();
    cfg.cache.l2_path = dir.join("l2.cache");
    cfg.cache.l2_bytes = 1 << 20;
    let only_v1 = || {
        let mut r = test_repository(300_000);
        r.models.get_mut("m").unwrap().retain(|m| m.version == 1);
        r
    };
    let inputs: Vec<Vec<f32>> = (0..50).map(|i| rows(500 + i, 1, WIDTH)).collect();
    let server = start_with(cfg.clone(), only_v1());
    let client = Client::connect(server.addr).unwrap();
    for x in &inputs {
        assert_eq!(
            client.predict(&spec("m", 1, WIDTH, x)).unwrap().runs[0].1,
            1
        );
    }
    drop(client);
    server.shutdown();
    // Version 2 is deployed; the L2 file still holds version 1's answers.
    let server = start_with(cfg, test_repository(300_000));
    let client = Client::connect(server.addr).unwrap();
    let v2 = test_models(300_000)
        .into_iter()
        .find(|m| m.name == "m" && m.version == 2)
        .unwrap();
    for x in &inputs {
        let p = client.predict(&spec("m", 1, WIDTH, x)).unwrap();
        assert_eq!(p.runs[0].1, 2);
        assert!(
            !p.cached,
            "a version-2 request must not hit a version-1 entry"
        );
        assert_eq!(p.outputs, direct(&v2, x, 1));
    }
    // Version 1 asked explicitly still hits its persisted entries.
    let mut s = spec("m", 1, WIDTH, &inputs[0]);
    s.version = Some(1);
    let p = client.predict(&s).unwrap();
    assert!(p.cached);
    assert_eq!(p.outputs, direct(&model("m"), &inputs[0], 1));
    server.shutdown();
}

/// `cache.l1_ways` reaches the L1 table: with one set of one way, a second
/// input evicts the first (with the former fixed 8 ways both would stay).
#[test]
fn l1_ways_is_the_configured_associativity() {
    let mut cfg = test_config();
    cfg.cache.l1_entries = 1;
    cfg.cache.l1_ways = 1;
    let server = start_with(cfg, test_repository(300_000));
    let client = Client::connect(server.addr).unwrap();
    let (x, y) = (rows(31, 1, WIDTH), rows(32, 1, WIDTH));
    assert!(!client.predict(&spec("b", 1, WIDTH, &x)).unwrap().cached);
    assert!(client.predict(&spec("b", 1, WIDTH, &x)).unwrap().cached);
    assert!(!client.predict(&spec("b", 1, WIDTH, &y)).unwrap().cached);
    assert!(
        !client.predict(&spec("b", 1, WIDTH, &x)).unwrap().cached,
        "one slot: y evicted x"
    );
    assert!(client.predict(&spec("b", 1, WIDTH, &x)).unwrap().cached);
    let totals = server.shutdown();
    assert_eq!(totals.cache_hits_l1, 2);
}
