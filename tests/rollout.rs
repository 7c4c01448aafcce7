//! Shadow, canary, automatic promote and roll back, and the manual
//! override, against a real server (docs/MODELS.md "Shadow, canary,
//! promote, roll back").

mod common;

use beast::client::Client;
use beast::model::demo::write_model;
use beast::model::load::load_repository;
use beast::model::{Activation, Model, OutputTransform};
use beast::server::admin::{get, request};
use common::{rows, spec, wait_until, CLASSES, WIDTH};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn model(version: u32, seed: u64) -> Model {
    let mut m = Model::random(
        "m",
        &[WIDTH, 16, CLASSES],
        Activation::Relu,
        OutputTransform::Softmax,
        seed,
    );
    m.version = version;
    m.batch.max_batch = 16;
    m
}

/// `m` v1 and v2 (v2 from `v2_seed`; the same seed gives the same
/// weights), and `rollout.toml`.
fn repository(name: &str, v2_seed: u64, rollout: &str) -> PathBuf {
    let dir = common::temp_dir(name);
    write_model(&dir, &model(1, 1)).unwrap();
    write_model(&dir, &model(2, v2_seed)).unwrap();
    std::fs::write(dir.join("m").join("rollout.toml"), rollout).unwrap();
    dir
}

fn start(dir: &Path) -> beast::server::ServerHandle {
    let mut cfg = common::test_config();
    cfg.models_dir = dir.to_path_buf();
    let repo = load_repository(dir, &cfg.batch.limits()).unwrap();
    assert!(repo.errors.is_empty(), "{:?}", repo.errors);
    common::start_with(cfg, repo)
}

/// The version of `m` that answered input `seed` (version 0: current).
fn version_for(c: &Client, seed: u64) -> u32 {
    let x = rows(seed, 1, WIDTH);
    c.predict(&spec("m", 1, WIDTH, &x)).unwrap().runs[0].1
}

fn lifecycle(admin: SocketAddr) -> serde_json::Value {
    let (code, body) = get(&admin.to_string(), "/v1/models", T).unwrap();
    assert_eq!(code, 200);
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["lifecycle"].clone()
}

#[test]
fn a_shadow_run_compares_answers_and_promotes_a_good_version() {
    let dir = repository(
        "rollout-promote",
        1,
        "mode = \"shadow\"\nfraction = 1.0\ncandidate = 2\n[promote]\nafter = 40\nagreement_min = 0.99\np99_ratio_max = 50.0\n",
    );
    let h = start(&dir);
    let admin = h.admin_addr.unwrap();
    let c = Client::connect(h.addr).unwrap();
    // Shadow: the current version (v1) answers; v2 only sees copies,
    // until the rule promotes it.
    let mut seed = 0;
    let mut before = 0;
    wait_until(T, "promotion of v2", || {
        seed += 1;
        let v = version_for(&c, seed);
        if v == 1 {
            before += 1;
        }
        v == 2
    });
    assert!(
        before >= 40,
        "v1 answered until enough were compared ({before})"
    );
    let l = lifecycle(admin);
    let d = &l["rollouts_decided"][0];
    assert!(
        d["decision"]
            .as_str()
            .unwrap()
            .starts_with("promoted by rollout rule"),
        "{d}"
    );
    assert!(d["compared"].as_u64().unwrap() >= 40, "{d}");
    assert_eq!(d["agreement"], 1.0, "{d}");
    assert_eq!(d["max_abs_diff"], 0.0, "{d}");
    assert_eq!(d["errors_candidate"], 0, "{d}");
    assert!(l["rollouts"].as_array().unwrap().is_empty(), "{l}");
    let (_, m) = get(&admin.to_string(), "/metrics", T).unwrap();
    assert!(
        m.contains("beast_rollout_decisions_total{decision=\"promoted\"} 1"),
        "{m}"
    );
    // From now on every answer is v2's; the inputs compared before the
    // promotion are already in the cache under v2's key (pre-warmed).
    let x = rows(1, 1, WIDTH);
    let p = c.predict(&spec("m", 1, WIDTH, &x)).unwrap();
    assert_eq!((p.runs[0].1, p.cached), (2, true), "{p:?}");
    for s in 0..20 {
        assert_eq!(version_for(&c, 10_000 + s), 2);
    }
    h.shutdown();
}

#[test]
fn a_version_with_corrupted_weights_is_rolled_back_automatically() {
    // v2's file is valid, its numbers are wrong (another network).
    let dir = repository(
        "rollout-rollback",
        99,
        "mode = \"shadow\"\nfraction = 0.5\n[promote]\nafter = 30\nagreement_min = 0.95\n",
    );
    let h = start(&dir);
    let admin = h.admin_addr.unwrap();
    let c = Client::connect(h.addr).unwrap();
    let mut seed = 0;
    wait_until(T, "a rollout decision", || {
        seed += 1;
        assert_eq!(
            version_for(&c, seed),
            1,
            "the current version answers throughout"
        );
        lifecycle(admin)["rollout_decisions"]["rolled_back"] == 1
    });
    let d = &lifecycle(admin)["rollouts_decided"][0];
    let why = d["decision"].as_str().unwrap();
    assert!(
        why.starts_with("rolled back by rollout rule: agreement"),
        "{why}"
    );
    assert!(d["agreement"].as_f64().unwrap() < 0.95, "{d}");
    // v2 is no longer served; v1 still is.
    wait_until(T, "v2 unloaded", || {
        let x = rows(1, 1, WIDTH);
        let mut s = spec("m", 1, WIDTH, &x);
        s.version = Some(2);
        c.predict(&s).is_err()
    });
    assert_eq!(version_for(&c, 5), 1);
    h.shutdown();
}

#[test]
fn a_canary_answers_its_share_of_inputs_and_each_input_sticks_to_one_version() {
    let dir = repository("rollout-canary", 2, "mode = \"canary\"\nfraction = 0.3\n");
    let h = start(&dir);
    let admin = h.admin_addr.unwrap();
    let c = Client::connect(h.addr).unwrap();
    let n = 600;
    let first: Vec<u32> = (0..n).map(|s| version_for(&c, s)).collect();
    let share = first.iter().filter(|&&v| v == 2).count() as f64 / n as f64;
    assert!((0.22..=0.38).contains(&share), "canary share {share}");
    for s in 0..100 {
        assert_eq!(
            version_for(&c, s),
            first[s as usize],
            "input {s} sticks to its version"
        );
    }
    // The canary's answers were compared with the current version's.
    wait_until(T, "canary comparisons", || {
        lifecycle(admin)["rollouts"][0]["compared"]
            .as_u64()
            .unwrap_or(0)
            > 0
    });
    let r = &lifecycle(admin)["rollouts"][0];
    assert_eq!(
        (r["mode"].as_str(), r["candidate"].as_u64()),
        (Some("canary"), Some(2)),
        "{r}"
    );
    assert!(
        r["canary_served"].as_u64().unwrap() >= (share * n as f64) as u64,
        "{r}"
    );
    h.shutdown();
}

#[test]
fn a_rollout_is_decided_by_hand_with_promote_or_rollback() {
    let dir = repository("rollout-manual", 3, "mode = \"shadow\"\nfraction = 0.1\n");
    let h = start(&dir);
    let admin = h.admin_addr.unwrap().to_string();
    let c = Client::connect(h.addr).unwrap();
    assert_eq!(version_for(&c, 1), 1);
    let (code, body) = request("POST", &admin, "/v1/models/m/rollback", T).unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"rollouts_changed\":[\"m\"]"), "{body}");
    assert!(body.contains("m v2"), "v2 unloaded: {body}");
    // Decided: a second decision is refused, naming why.
    let (code, body) = request("POST", &admin, "/v1/models/m/promote", T).unwrap();
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("no rollout is running"), "{body}");
    assert_eq!(version_for(&c, 1), 1);
    h.shutdown();
}
