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
        // p99 rule off (1e9): with ~50 samples the p99 is the slowest compute,
        // and one preemption on a loaded machine would decide the rollout.
        "mode = \"shadow\"\nfraction = 1.0\ncandidate = 2\n[promote]\nafter = 40\nagreement_min = 0.99\np99_ratio_max = 1e9\n",
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

/// Canary with feedback: every answer of `m` without a version carries a
/// ticket; the label sent for it is v1's answer (the "truth" here), asked
/// for by version. Returns the rollout's decision once made.
fn canary_with_labels(name: &str, v2_seed: u64) -> serde_json::Value {
    // agreement_min = 0: only the accuracy part of the rule can object.
    let dir = repository(
        name,
        v2_seed,
        // p99 rule off (1e9): with ~50 samples the p99 is the slowest compute,
        // and one preemption on a loaded machine would decide the rollout.
        "mode = \"canary\"\nfraction = 0.5\ncandidate = 2\n[promote]\nafter = 5\nagreement_min = 0.0\np99_ratio_max = 1e9\naccuracy_drop_max_points = 10\nlabels_min = 25\n",
    );
    let h = start(&dir);
    let admin = h.admin_addr.unwrap();
    let c = Client::connect(h.addr).unwrap();
    let mut seed = 0;
    wait_until(T, "a rollout decision", || {
        seed += 1;
        let x = rows(seed, 1, WIDTH);
        let p = c.predict(&spec("m", 1, WIDTH, &x)).unwrap();
        let mut s1 = spec("m", 1, WIDTH, &x);
        s1.version = Some(1);
        let truth = c.predict(&s1).unwrap();
        let label = beast::ensemble::argmax(&truth.outputs) as u32;
        let decided = lifecycle(admin)["rollouts_decided"]
            .as_array()
            .is_some_and(|d| !d.is_empty());
        if !decided {
            assert_ne!(p.ticket, 0, "a canary's answer carries a ticket: {p:?}");
            // The rollout may end between the answer and its feedback.
            let _ = c.feedback(p.ticket, label);
        }
        decided
    });
    let d = lifecycle(admin)["rollouts_decided"][0].clone();
    // Not decided before each version had labels_min labels.
    assert!(d["labels_current"].as_u64().unwrap() >= 25, "{d}");
    assert!(d["labels_candidate"].as_u64().unwrap() >= 25, "{d}");
    let (_, m) = get(&admin.to_string(), "/metrics", T).unwrap();
    assert!(m.contains("beast_rollout_decisions_total"), "{m}");
    h.shutdown();
    d
}

#[test]
fn a_canary_that_answers_worse_on_labelled_feedback_is_rolled_back() {
    let d = canary_with_labels("rollout-accuracy-bad", 99);
    let why = d["decision"].as_str().unwrap();
    assert!(
        why.starts_with("rolled back by rollout rule: accuracy"),
        "{why}"
    );
    assert_eq!(d["accuracy_current"], 100.0, "{d}");
    assert!(d["accuracy_candidate"].as_f64().unwrap() < 90.0, "{d}");
}

#[test]
fn a_canary_that_answers_as_well_on_labelled_feedback_is_promoted() {
    // v2: the same weights under another version.
    let d = canary_with_labels("rollout-accuracy-good", 1);
    let why = d["decision"].as_str().unwrap();
    assert!(why.starts_with("promoted by rollout rule"), "{why}");
    assert!(why.contains("accuracy 100.0% vs 100.0%"), "{why}");
}
