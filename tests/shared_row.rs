//! An ensemble request's rows as each member reads them: every member
//! reads the request as sent whatever another member's input transform did
//! to its own batch, in either member order; the pending ensemble entries
//! are bounded (a full set answers OVERLOADED), and a request cut off at
//! its deadline frees its entry while its members' jobs are still queued
//! (they are dropped unread later), as does one refused for its input.
//! Written for a design where the members share one copy of the rows in
//! the pending entry (tried on 2026-12-01, not merged: no CPU gain this
//! machine could resolve, perf/request_path.md); it holds for the per-member
//! copies main makes and guards any later sharing.

mod common;

use beast::model::io::{Preprocess, Scaler};
use beast::model::load::Repository;
use beast::model::{Activation, BatchLimits, Combiner, EnsembleSpec, Model, OutputTransform};
use beast::wire::{CacheControl, Status};
use common::{Raw, CLASSES, WIDTH};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

fn member(name: &str, dims: &[usize], seed: u64, batch: BatchLimits) -> Model {
    let mut m = Model::random(name, dims, Activation::Relu, OutputTransform::Softmax, seed);
    m.batch = batch;
    m
}

fn ensemble(name: &str, members: &[&str]) -> EnsembleSpec {
    EnsembleSpec {
        name: name.into(),
        members: members.iter().map(|m| m.to_string()).collect(),
        combiner: Combiner::Mean,
        weights: vec![],
        selection: Default::default(),
    }
}

fn repository(models: Vec<Model>, ensembles: Vec<EnsembleSpec>) -> Repository {
    let mut repo = Repository::default();
    for m in models {
        repo.models
            .entry(m.name.clone())
            .or_default()
            .push(Arc::new(m));
    }
    for e in ensembles {
        repo.ensembles.insert(e.name.clone(), e);
    }
    repo
}

const BATCH: BatchLimits = BatchLimits {
    max_batch: 16,
    min_batch: 1,
    max_queue_delay_us: 50,
    queue_rows_max: 4096,
};

/// `p` standardizes its input in place on its batch before computing; `q`
/// takes the raw rows. Were `p`'s transform applied to a copy `q` also
/// reads (or a member handed another
/// request's rows), `q`'s share of the answer would change. Many requests
/// in flight at once on one connection, so batches hold several entries'
/// rows and one member's batch runs while the other's jobs wait.
#[test]
fn members_with_different_input_transforms_each_read_the_request_as_sent() {
    let mut p = member("p", &[WIDTH, 16, CLASSES], 31, BATCH);
    p.io.preprocess = Some(Preprocess {
        scaler: Some(Scaler::Standardize {
            mean: vec![0.5; WIDTH],
            scale: vec![0.125; WIDTH],
        }),
        clip: None,
    });
    let q = member("q", &[WIDTH, 24, CLASSES], 32, BATCH);
    let repo = repository(
        vec![p, q],
        vec![ensemble("pq", &["p", "q"]), ensemble("qp", &["q", "p"])],
    );
    let h = common::start_with(common::test_config(), repo);
    let mut raw = Raw::connect(h.addr);
    let spec = |target: &'static str, rows: usize, x: &'static [f32]| {
        let mut s = common::spec(target, rows, WIDTH, x);
        s.cache = CacheControl::Bypass;
        s
    };
    // Requests of 1–3 rows; each sent to both ensembles and both members.
    let inputs: Vec<(usize, &'static [f32])> = (0..48)
        .map(|i| {
            let rows = 1 + i % 3;
            let x: &'static [f32] =
                Box::leak(common::rows(100 + i as u64, rows, WIDTH).into_boxed_slice());
            (rows, x)
        })
        .collect();
    let targets = ["pq", "qp", "p", "q"];
    let mut id = 0u64;
    for &(rows, x) in &inputs {
        for t in targets {
            raw.send(id, &spec(t, rows, x));
            id += 1;
        }
    }
    let mut got = HashMap::new();
    for _ in 0..id {
        let r = raw.recv();
        assert_eq!(r.status, Status::Ok, "{}", r.message);
        got.insert(r.id, r.output);
    }
    for (i, _) in inputs.iter().enumerate() {
        let base = (i * targets.len()) as u64;
        let (p_out, q_out) = (&got[&(base + 2)], &got[&(base + 3)]);
        let want: Vec<f32> = p_out
            .iter()
            .zip(q_out)
            .map(|(a, b)| (a + b) / 2.0)
            .collect();
        // Mean of the members' own answers; the raw rows' q answer differs
        // from a standardized one by far more than this.
        common::assert_close(&got[&base], &want, 1e-5);
        common::assert_close(&got[&(base + 1)], &want, 1e-5);
    }
    h.shutdown();
}

/// The pending ensemble entries are bounded: past
/// `ensemble_in_flight_per_shard_max` a request is answered OVERLOADED at
/// once, not queued. A request cut off at its deadline while its slow
/// member's job still waits in the queue frees its entry at once (the next
/// rounds fit again: a leaked entry would make them OVERLOADED), and the
/// waiting job is later dropped unread (cancelled).
#[test]
fn a_full_set_of_entries_answers_overloaded_and_cut_off_requests_free_theirs() {
    const SLOTS: usize = 4;
    // `slow` waits for a full batch, up to 300 ms: its jobs sit queued.
    let mut slow = member("slow", &[WIDTH, 8, CLASSES], 7, BATCH);
    slow.batch.max_batch = 1024;
    slow.batch.min_batch = 1024;
    slow.batch.max_queue_delay_us = 300_000;
    let a = member("a", &[WIDTH, 16, CLASSES], 1, BATCH);
    let repo = repository(vec![slow, a], vec![ensemble("sa", &["slow", "a"])]);
    let mut cfg = common::test_config();
    cfg.ensemble_in_flight_per_shard_max = SLOTS;
    let h = common::start_with(cfg, repo);
    let admin = h.admin_addr.expect("admin listener");
    let x = common::rows(5, 1, WIDTH);
    let mut raw = Raw::connect(h.addr);
    let mut spec = common::spec("sa", 1, WIDTH, &x);
    spec.cache = CacheControl::Bypass;

    // 1. Twice the slots at once, no deadline: SLOTS wait for `slow`, the
    //    rest are refused at once.
    for id in 0..2 * SLOTS as u64 {
        raw.send(id, &spec);
    }
    let (mut ok, mut overloaded) = (0, 0);
    for _ in 0..2 * SLOTS {
        let r = raw.recv();
        match r.status {
            Status::Ok => ok += 1,
            Status::Overloaded => {
                assert!(
                    r.message.contains("too many ensemble requests"),
                    "{}",
                    r.message
                );
                overloaded += 1;
            }
            other => panic!("{other:?}: {}", r.message),
        }
    }
    assert_eq!((ok, overloaded), (SLOTS, SLOTS));

    // 2. Rounds of SLOTS requests with a 20 ms budget: each is cut off
    //    (answered with `a` alone, or DEADLINE_EXCEEDED) while its `slow`
    //    job stays queued; every round fits only if the last one's entries
    //    were freed.
    spec.deadline_us = Some(20_000);
    let mut id = 100;
    for round in 0..3 {
        for _ in 0..SLOTS {
            raw.send(id, &spec);
            id += 1;
        }
        for _ in 0..SLOTS {
            let r = raw.recv();
            assert!(
                matches!(r.status, Status::Ok | Status::DeadlineExceeded),
                "round {round}: {:?}: {}",
                r.status,
                r.message
            );
        }
    }
    // The cut-off requests' `slow` jobs are dropped unread when `slow`'s
    // batch is taken (members are never dropped for a deadline: these
    // are the cancelled ones).
    common::wait_until(Duration::from_secs(10), "the cancelled member rows", || {
        common::metric(admin, "beast_batch_rows_dropped_total").unwrap_or(0.0) >= (3 * SLOTS) as f64
    });
    // 3. Rounds of requests refused for their input (answered BAD_REQUEST):
    //    none keeps an entry.
    let bad = vec![f32::INFINITY; WIDTH];
    let mut bad_spec = common::spec("sa", 1, WIDTH, &bad);
    bad_spec.cache = CacheControl::Bypass;
    for _ in 0..3 {
        for _ in 0..SLOTS {
            raw.send(id, &bad_spec);
            id += 1;
        }
        for _ in 0..SLOTS {
            let r = raw.recv();
            assert_eq!(r.status, Status::BadRequest, "{}", r.message);
        }
    }
    // And the entries are all free: a full set is admitted again.
    spec.deadline_us = None;
    for _ in 0..SLOTS {
        raw.send(id, &spec);
        id += 1;
    }
    for _ in 0..SLOTS {
        let r = raw.recv();
        assert_eq!(r.status, Status::Ok, "{}", r.message);
    }
    h.shutdown();
}
