//! A JSON snapshot of every shard's metrics (`/v1/stats`), small enough
//! to poll every second: what `beast-top` shows.
//!
//! Counters are lifetime totals; a viewer takes the difference of two
//! snapshots for rates, and of two `latency_buckets` for percentiles over
//! the interval ([`interval_quantile`]).

use super::histogram::{quantile, HistogramSnapshot, BATCH_BOUNDS_ROWS, DURATION_BOUNDS_US};
use super::process::Process;
use super::{CacheTier, ShardMetrics, Shed, TargetKind};
use crate::wire::Status;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    pub version: String,
    pub backend: String,
    /// Seconds since the server started (the clock for rates).
    pub uptime_seconds: f64,
    /// Upper bounds of `latency_buckets`, µs (one more bucket: above all).
    pub latency_bounds_us: Vec<u64>,
    pub cores: Vec<CoreStats>,
    pub targets: Vec<TargetStats>,
    /// OVERLOADED answers by reason.
    pub shed: BTreeMap<String, u64>,
    pub cache: CacheStats,
    pub process: Option<Process>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CoreStats {
    pub core: usize,
    /// Responses sent.
    pub requests: u64,
    pub in_flight: u64,
    pub connections_open: u64,
    pub connections_total: u64,
    pub batches: u64,
    pub batch_rows: u64,
    /// Request durations of every target on this core, per bucket.
    pub latency_buckets: Vec<u64>,
    pub p50_seconds: Option<f64>,
    pub p99_seconds: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TargetStats {
    pub name: String,
    pub kind: Option<TargetKind>,
    /// Responses by status label.
    pub by_status: BTreeMap<String, u64>,
    /// All responses.
    pub requests: u64,
    pub ok: u64,
    /// OVERLOADED responses.
    pub shed: u64,
    /// Neither ok nor OVERLOADED.
    pub errors: u64,
    pub latency_buckets: Vec<u64>,
    pub p50_seconds: Option<f64>,
    pub p99_seconds: Option<f64>,
    /// Mean queue time of successful requests.
    pub queue_mean_seconds: Option<f64>,
    /// Models only: batches run and their rows (all cores).
    pub batches: u64,
    pub batch_rows: u64,
    pub compute_seconds: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CacheStats {
    /// Hits by tier ("l1", "l2").
    pub hits: BTreeMap<String, u64>,
    pub misses: u64,
    pub coalesced: u64,
    pub inserts: u64,
}

fn seconds(us: Option<f64>) -> Option<f64> {
    us.map(|v| v / 1e6)
}

/// Build the snapshot (admin thread; allocates).
pub fn snapshot(
    shards: &[Arc<ShardMetrics>],
    version: &str,
    backend: &str,
    uptime_seconds: f64,
    process: Option<Process>,
) -> Stats {
    let targets = shards
        .first()
        .map(|s| s.targets.clone())
        .unwrap_or_default();
    let mut st = Stats {
        version: version.to_string(),
        backend: backend.to_string(),
        uptime_seconds,
        latency_bounds_us: DURATION_BOUNDS_US.to_vec(),
        process,
        ..Stats::default()
    };
    for s in shards {
        let mut lat = HistogramSnapshot::empty(DURATION_BOUNDS_US);
        for t in 0..targets.len() {
            if let Some(h) = s.request_duration_of(t) {
                lat.merge(&h);
            }
        }
        st.cores.push(CoreStats {
            core: s.core,
            requests: s.responses.iter().map(|c| c.get()).sum(),
            in_flight: s.in_flight(),
            connections_open: s.connections_open(),
            connections_total: s.connections_accepted.get(),
            batches: s.batches.get(),
            batch_rows: s.batch_rows.get(),
            p50_seconds: seconds(lat.quantile(0.5)),
            p99_seconds: seconds(lat.quantile(0.99)),
            latency_buckets: lat.counts,
        });
    }
    for (t, name) in targets.names.iter().enumerate() {
        let mut ts = TargetStats {
            name: name.clone(),
            kind: targets.kinds.get(t).copied(),
            ..TargetStats::default()
        };
        for status in Status::ALL {
            let n: u64 = shards.iter().map(|s| s.requests_of(t, status)).sum();
            ts.by_status.insert(status.label().to_string(), n);
            ts.requests += n;
            match status {
                Status::Ok => ts.ok += n,
                Status::Overloaded => ts.shed += n,
                _ => ts.errors += n,
            }
        }
        let mut lat = HistogramSnapshot::empty(DURATION_BOUNDS_US);
        let mut queue = HistogramSnapshot::empty(DURATION_BOUNDS_US);
        let mut compute = HistogramSnapshot::empty(DURATION_BOUNDS_US);
        let mut batch = HistogramSnapshot::empty(BATCH_BOUNDS_ROWS);
        for s in shards {
            s.request_duration_of(t).inspect(|h| lat.merge(h));
            s.queue_duration_of(t).inspect(|h| queue.merge(h));
            s.compute_duration_of(t).inspect(|h| compute.merge(h));
            s.batch_size_of(t).inspect(|h| batch.merge(h));
        }
        ts.p50_seconds = seconds(lat.quantile(0.5));
        ts.p99_seconds = seconds(lat.quantile(0.99));
        let qn = queue.count();
        ts.queue_mean_seconds = (qn > 0).then(|| queue.sum as f64 / qn as f64 / 1e6);
        ts.batches = batch.count();
        ts.batch_rows = batch.sum;
        ts.compute_seconds = compute.sum as f64 / 1e6;
        ts.latency_buckets = lat.counts;
        st.targets.push(ts);
    }
    for r in Shed::ALL {
        st.shed.insert(
            r.label().to_string(),
            shards.iter().map(|s| s.shed[r as usize].get()).sum(),
        );
    }
    for t in CacheTier::ALL {
        st.cache.hits.insert(
            t.label().to_string(),
            shards.iter().map(|s| s.cache_hits(t).get()).sum(),
        );
    }
    st.cache.misses = shards.iter().map(|s| s.cache_misses.get()).sum();
    st.cache.coalesced = shards.iter().map(|s| s.cache_coalesced.get()).sum();
    st.cache.inserts = shards.iter().map(|s| s.cache_inserts.get()).sum();
    st
}

/// The `q`-quantile in seconds of the requests that finished between two
/// snapshots' bucket counts (`prev` None: since start).
pub fn interval_quantile(
    bounds_us: &[u64],
    prev: Option<&[u64]>,
    cur: &[u64],
    q: f64,
) -> Option<f64> {
    let delta: Vec<u64> = match prev {
        Some(p) if p.len() == cur.len() => cur
            .iter()
            .zip(p)
            .map(|(c, p)| c.saturating_sub(*p))
            .collect(),
        _ => cur.to_vec(),
    };
    seconds(quantile(bounds_us, &delta, q))
}
