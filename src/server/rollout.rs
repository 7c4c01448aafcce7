//! Shadow and canary comparisons (docs/MODELS.md "Shadow, canary,
//! promote, roll back").
//!
//! The request path only *samples*: for a model under a rollout it copies
//! a sampled request's input into a buffer taken from a fixed pool
//! ([`ShadowQueue`], per shard, bounded: a full queue drops the sample and
//! counts it). A low-priority task per shard ([`run_comparer`]) runs each
//! sample on both the current and the candidate version, on the shard's
//! backend between batches, and folds the result into the rollout's
//! [`RolloutStats`]: argmax agreement, the largest |difference| of any
//! output, each version's compute time and errors (a backend error or a
//! non-finite output). The lifecycle's judge thread reads those counters
//! and applies the rollout's rule. In shadow mode the candidate's answer
//! is also put in the prediction cache under its own key (its version and
//! digest), so a promotion starts with the sampled inputs warm.

use super::cache::{ShardCache, TargetPolicy};
use crate::backend::Backend;
use crate::cache::CacheKey;
use crate::metrics::ShardMetrics;
use crate::model::rollout::RolloutMode;
use crate::model::Model;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Samples waiting per shard, at most (beyond: dropped and counted).
pub const SHADOW_QUEUE_MAX: usize = 64;

/// Compute-time buckets: upper bounds 2^k µs, k = 0..31.
const BUCKETS: usize = 32;

/// A latency histogram several shards add to (relaxed atomics).
#[derive(Debug, Default)]
pub struct LatHist {
    buckets: [AtomicU64; BUCKETS],
}

impl LatHist {
    pub fn observe(&self, us: f64) {
        let k = (us.max(1.0).log2().ceil() as usize).min(BUCKETS - 1);
        self.buckets[k].fetch_add(1, Ordering::Relaxed);
    }

    /// The upper bound (µs) of the bucket holding quantile `q`; 0 when empty.
    pub fn quantile_us(&self, q: f64) -> f64 {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let want = (q * total as f64).ceil() as u64;
        let mut seen = 0;
        for (k, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return (1u64 << k) as f64;
            }
        }
        (1u64 << (BUCKETS - 1)) as f64
    }
}

/// One rollout's figures, summed over shards; kept by the lifecycle
/// across generations while the rollout lasts.
#[derive(Debug)]
pub struct RolloutStats {
    pub model: String,
    pub current: u32,
    pub candidate: u32,
    pub candidate_digest: u128,
    pub mode: RolloutMode,
    pub fraction: f64,
    /// Requests compared, and their rows; rows whose argmax agreed.
    pub compared: AtomicU64,
    pub rows: AtomicU64,
    pub agree: AtomicU64,
    /// The largest |difference| of any output (f32 bits; non-negative
    /// floats order like their bits).
    pub max_abs_diff: AtomicU32,
    pub errors_current: AtomicU64,
    pub errors_candidate: AtomicU64,
    /// Samples dropped because a shard's queue was full.
    pub dropped: AtomicU64,
    /// Canary: requests the candidate answered, and all requests to the
    /// model without a version while the rollout ran.
    pub canary_served: AtomicU64,
    pub requests: AtomicU64,
    pub lat_current: LatHist,
    pub lat_candidate: LatHist,
    /// Set once decided: "promoted" or "rolled back", and why.
    pub decision: Mutex<Option<String>>,
}

impl RolloutStats {
    pub fn new(
        model: &str,
        current: u32,
        candidate: &Model,
        mode: RolloutMode,
        fraction: f64,
    ) -> RolloutStats {
        RolloutStats {
            model: model.to_string(),
            current,
            candidate: candidate.version,
            candidate_digest: candidate.digest,
            mode,
            fraction,
            compared: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            agree: AtomicU64::new(0),
            max_abs_diff: AtomicU32::new(0),
            errors_current: AtomicU64::new(0),
            errors_candidate: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            canary_served: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            lat_current: LatHist::default(),
            lat_candidate: LatHist::default(),
            decision: Mutex::new(None),
        }
    }

    pub fn agreement(&self) -> f64 {
        let rows = self.rows.load(Ordering::Relaxed);
        if rows == 0 {
            return 1.0;
        }
        self.agree.load(Ordering::Relaxed) as f64 / rows as f64
    }

    pub fn max_abs_diff(&self) -> f64 {
        f32::from_bits(self.max_abs_diff.load(Ordering::Relaxed)) as f64
    }

    pub fn to_json(&self) -> serde_json::Value {
        let l = |x: &AtomicU64| x.load(Ordering::Relaxed);
        serde_json::json!({
            "model": self.model,
            "current": self.current,
            "candidate": self.candidate,
            "mode": match self.mode { RolloutMode::Shadow => "shadow", RolloutMode::Canary => "canary" },
            "fraction": self.fraction,
            "compared": l(&self.compared),
            "rows": l(&self.rows),
            "agreement": self.agreement(),
            "max_abs_diff": self.max_abs_diff(),
            "errors_current": l(&self.errors_current),
            "errors_candidate": l(&self.errors_candidate),
            "p99_us_current": self.lat_current.quantile_us(0.99),
            "p99_us_candidate": self.lat_candidate.quantile_us(0.99),
            "dropped": l(&self.dropped),
            "canary_served": l(&self.canary_served),
            "requests": l(&self.requests),
            "decision": self.decision.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        })
    }
}

/// One sample: the input rows and the two versions to run them on.
struct Sample {
    /// Shadow: the candidate's answer goes into the cache under this key,
    /// so that a promotion starts with the sampled (popular) inputs warm.
    warm: Option<(CacheKey, TargetPolicy)>,
    current: Arc<Model>,
    candidate: Arc<Model>,
    stats: Arc<RolloutStats>,
    rows: usize,
    input: Vec<f32>,
}

/// A shard's samples waiting for the comparer, and a pool of input buffers
/// (a buffer keeps its capacity: no allocation once grown).
#[derive(Default)]
pub(crate) struct ShadowQueue {
    samples: RefCell<VecDeque<Sample>>,
    pool: RefCell<Vec<Vec<f32>>>,
    pub wake: super::notify::Notify,
}

impl ShadowQueue {
    /// Queue `rows` rows written by `fill` for comparison, or count a drop.
    pub fn push(
        &self,
        current: &Arc<Model>,
        candidate: &Arc<Model>,
        stats: &Arc<RolloutStats>,
        rows: usize,
        warm: Option<(CacheKey, TargetPolicy)>,
        fill: impl FnOnce(&mut [f32]),
    ) {
        let mut q = self.samples.borrow_mut();
        if q.len() >= SHADOW_QUEUE_MAX {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut input = self.pool.borrow_mut().pop().unwrap_or_default();
        input.resize(rows * current.input_width, 0.0);
        fill(&mut input);
        q.push_back(Sample {
            warm,
            current: current.clone(),
            candidate: candidate.clone(),
            stats: stats.clone(),
            rows,
            input,
        });
        drop(q);
        self.wake.notify();
    }
}

/// The comparer task of one shard: run each sample on both versions, fold
/// the result into its rollout's figures, yield between samples.
pub(crate) async fn run_comparer(
    queue: Rc<ShadowQueue>,
    backend: Rc<RefCell<Box<dyn Backend>>>,
    cache: Rc<ShardCache>,
    metrics: Arc<ShardMetrics>,
    stop: Arc<AtomicBool>,
) {
    let (mut out_a, mut out_b) = (Vec::new(), Vec::new());
    loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let next = queue.samples.borrow_mut().pop_front();
        let Some(s) = next else {
            futures_lite::future::or(
                queue.wake.wait(),
                glommio::timer::sleep(Duration::from_millis(50)),
            )
            .await;
            continue;
        };
        let n = s.rows * s.current.output_width;
        out_a.resize(n, 0.0);
        out_b.resize(n, 0.0);
        let run = |m: &Model, out: &mut [f32]| -> (bool, f64) {
            let t = Instant::now();
            let r = backend.borrow_mut().run(m, &s.input, s.rows, out);
            let us = t.elapsed().as_secs_f64() * 1e6;
            (r.is_ok() && out.iter().all(|x| x.is_finite()), us)
        };
        let (ok_a, us_a) = run(&s.current, &mut out_a);
        let (ok_b, us_b) = run(&s.candidate, &mut out_b);
        let st = &s.stats;
        st.compared.fetch_add(1, Ordering::Relaxed);
        st.lat_current.observe(us_a);
        st.lat_candidate.observe(us_b);
        if !ok_a {
            st.errors_current.fetch_add(1, Ordering::Relaxed);
        }
        if !ok_b {
            st.errors_candidate.fetch_add(1, Ordering::Relaxed);
        }
        if let (true, Some((key, policy))) = (ok_b, s.warm) {
            cache.insert(&metrics, key, policy, &out_b);
        }
        if ok_a && ok_b {
            let w = s.current.output_width.max(1);
            let mut agree = 0;
            let mut diff = 0f32;
            for (a, b) in out_a.chunks(w).zip(out_b.chunks(w)) {
                agree += u64::from(argmax(a) == argmax(b));
                for (x, y) in a.iter().zip(b) {
                    diff = diff.max((x - y).abs());
                }
            }
            st.rows.fetch_add(s.rows as u64, Ordering::Relaxed);
            st.agree.fetch_add(agree, Ordering::Relaxed);
            st.max_abs_diff.fetch_max(diff.to_bits(), Ordering::Relaxed);
        }
        queue.pool.borrow_mut().push(s.input);
        glommio::executor().yield_task_queue_now().await;
    }
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}
