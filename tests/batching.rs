//! Batching against a real server: a request alone on an idle server is
//! computed as soon as it is read, not after `max_queue_delay_us`; requests
//! that arrive together still run as one batch.

mod common;

use beast::client::Client;
use beast::model::load::Repository;
use beast::server::admin::get;
use beast::wire::Encoder;
use common::*;
use std::sync::Arc;
use std::time::Duration;

/// Every model but `slow` may wait this long for a fuller batch: far more
/// than a computation takes, so a request that waited for it is obvious.
const DELAY_US: u64 = 1_000_000;

/// A lone request's queue time stays far below [`DELAY_US`] (half of it:
/// room for a stall of a loaded test machine, none for a wait).
const QUEUE_US_MAX: u32 = 500_000;

fn repository() -> Repository {
    let mut repo = Repository {
        ensembles: test_repository(300_000).ensembles,
        ..Default::default()
    };
    for mut m in test_models(300_000) {
        if m.name != "slow" {
            assert_eq!(m.batch.min_batch, 1, "the default policy is tested");
            m.batch.max_queue_delay_us = DELAY_US;
        }
        repo.models
            .entry(m.name.clone())
            .or_default()
            .push(Arc::new(m));
    }
    repo
}

/// One sample of the server's /metrics (0 when absent).
fn metric(h: &beast::server::ServerHandle, name: &str, label: (&str, &str)) -> u64 {
    let (_, text) = get(
        &h.admin_addr.unwrap().to_string(),
        "/metrics",
        Duration::from_secs(5),
    )
    .unwrap();
    let series = format!("{name}{{{}=\"{}\"}} ", label.0, label.1);
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

#[test]
fn a_lone_request_does_not_wait_for_the_batching_delay() {
    let server = start_with(test_config(), repository());
    let c = Client::connect(server.addr).unwrap();
    // One request at a time (closed loop): each is alone on an idle
    // server. Distinct inputs: no cache hits.
    for (i, target) in ["a", "b", "ens", "a", "ens"].into_iter().enumerate() {
        let x = rows(100 + i as u64, 1, WIDTH);
        let p = c.predict(&spec(target, 1, WIDTH, &x)).unwrap();
        assert!(!p.cached);
        let t = p.timings;
        assert!(
            t.queue_us < QUEUE_US_MAX && t.total_us < QUEUE_US_MAX,
            "{target}: a lone request waited for the batching delay ({DELAY_US} µs): {t:?}"
        );
    }
    server.shutdown();
}

#[test]
fn requests_that_arrive_together_run_as_one_batch() {
    const N: u64 = 8;
    let server = start_with(test_config(), repository());
    let mut raw = Raw::connect(server.addr);
    // N requests in one write: read in one go, queued before the batcher
    // runs, computed together (max_batch is 16).
    let (mut enc, mut bytes, mut frame) = (Encoder::new(), Vec::new(), Vec::new());
    let inputs: Vec<Vec<f32>> = (0..N).map(|i| rows(200 + i, 1, WIDTH)).collect();
    for (id, x) in inputs.iter().enumerate() {
        frame.clear();
        beast::client::encode_request_frame(
            &mut enc,
            id as u64,
            &spec("a", 1, WIDTH, x),
            &mut frame,
        );
        bytes.extend_from_slice(&frame);
    }
    raw.send_bytes(&bytes);
    for _ in 0..N {
        let r = raw.recv();
        assert_eq!(r.status, beast::wire::Status::Ok);
    }
    let batches = metric(&server, "beast_batch_size_count", ("model", "a"));
    assert!(
        (1..=N / 2).contains(&batches),
        "{N} requests read together ran in {batches} batches"
    );
    server.shutdown();
}
