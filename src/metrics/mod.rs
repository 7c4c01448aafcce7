//! Metrics: per-shard counters and histograms, summed when read.
//!
//! Owns: everything a shard records about its requests — counters,
//! fixed-bucket histograms ([`histogram`]) and the sampled trace ring
//! ([`trace`]) — and the reader side: Prometheus text ([`prometheus`]),
//! the JSON stats snapshot ([`stats`]) and process figures ([`process`]).
//!
//! Each shard has its own [`ShardMetrics`], sized once at start from the
//! names it serves ([`Targets`]). Every value has a single writer (its
//! shard), so an increment is a relaxed load + store, not a locked
//! read-modify-write; the admin thread sums relaxed loads across shards.
//! The hot path neither allocates nor locks.
//!
//! How the shard reports a request: [`ShardMetrics::begin_request`] when a
//! frame arrives, [`ShardMetrics::set_target_slot`] /
//! [`ShardMetrics::set_target_plan`] once it knows (or, when finishing
//! work, again) whom the request is for, then exactly one
//! [`ShardMetrics::record_response`] when its response is encoded. The
//! "current target" is a shard-local register: everything between setting
//! it and responding runs without an await, so it cannot be interleaved.

pub mod histogram;
pub mod process;
pub mod prometheus;
pub mod stats;
pub mod trace;

use crate::model::load::Repository;
use crate::wire::Status;
use histogram::{Histogram, BATCH_BOUNDS_ROWS, DURATION_BOUNDS_US};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use trace::{TraceRecord, TraceRing};

/// A counter written by one thread, read by any.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        // Single writer: no lost updates without an atomic RMW.
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }
    #[inline]
    pub fn inc(&self) {
        self.add(1)
    }
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Why a request was answered OVERLOADED (label `reason` of
/// `beast_requests_shed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// A model's (or an ensemble member's) batch queue is full.
    QueueFull = 0,
    /// The connection has `in_flight_per_connection_max` requests in flight.
    ConnInFlight = 1,
    /// The shard has `ensemble_in_flight_per_shard_max` ensemble requests in flight.
    EnsembleSlots = 2,
    /// The server is shutting down.
    ShuttingDown = 3,
}

impl Shed {
    pub const ALL: [Shed; 4] = [
        Shed::QueueFull,
        Shed::ConnInFlight,
        Shed::EnsembleSlots,
        Shed::ShuttingDown,
    ];
    pub fn label(self) -> &'static str {
        match self {
            Shed::QueueFull => "queue_full",
            Shed::ConnInFlight => "conn_in_flight",
            Shed::EnsembleSlots => "ensemble_slots",
            Shed::ShuttingDown => "shutting_down",
        }
    }
}

/// Why a connection was closed on a timer (label `reason` of
/// `beast_connections_timed_out_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimedOut {
    /// A frame began and did not complete within `frame_timeout_ms`.
    Frame = 0,
    /// Nothing received and nothing in flight for `idle_timeout_ms`.
    Idle = 1,
    /// The peer read nothing of pending answers for `write_stall_timeout_ms`.
    WriteStall = 2,
}

impl TimedOut {
    pub const ALL: [TimedOut; 3] = [TimedOut::Frame, TimedOut::Idle, TimedOut::WriteStall];
    pub fn label(self) -> &'static str {
        match self {
            TimedOut::Frame => "frame",
            TimedOut::Idle => "idle",
            TimedOut::WriteStall => "write_stall",
        }
    }
}

/// Prediction cache tier (label `tier` of `beast_cache_hits_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheTier {
    L1 = 0,
    L2 = 1,
    /// The shared Redis/Valkey tier (`[cache.l3]`).
    L3 = 2,
}

impl CacheTier {
    pub const ALL: [CacheTier; 3] = [CacheTier::L1, CacheTier::L2, CacheTier::L3];
    pub fn label(self) -> &'static str {
        match self {
            CacheTier::L1 => "l1",
            CacheTier::L2 => "l2",
            CacheTier::L3 => "l3",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    Model,
    Ensemble,
    /// Requests whose target is unknown or unreadable.
    Unknown,
}

/// Label of the pseudo-target for requests that name no known target.
pub const UNKNOWN_TARGET: &str = "_unknown";

/// The label values a shard records under, fixed at start: one per model
/// name (all versions share it), one per ensemble, then [`UNKNOWN_TARGET`].
///
/// Model targets come first, so a model's target index is also its index
/// for the per-model metrics (compute time, batch size).
#[derive(Debug, Default, Clone)]
pub struct Targets {
    pub names: Vec<String>,
    pub kinds: Vec<TargetKind>,
    /// Number of model names (targets `0..models`).
    pub models: usize,
    /// Shard slot (each (model, version), in repository order) → target.
    slot_target: Vec<u16>,
    /// Ensemble plan (repository order) → target.
    plan_target: Vec<u16>,
}

impl Targets {
    /// Built in the order `server::shard::Shard::new` lays out its slots
    /// and plans: models by name, each version in order, then ensembles.
    pub fn from_repo(repo: &Repository) -> Targets {
        let mut t = Targets::default();
        for (name, versions) in &repo.models {
            let idx = t.names.len() as u16;
            t.names.push(name.clone());
            t.kinds.push(TargetKind::Model);
            t.slot_target.extend(versions.iter().map(|_| idx));
        }
        t.models = t.names.len();
        for name in repo.ensembles.keys() {
            t.plan_target.push(t.names.len() as u16);
            t.names.push(name.clone());
            t.kinds.push(TargetKind::Ensemble);
        }
        t.names.push(UNKNOWN_TARGET.to_string());
        t.kinds.push(TargetKind::Unknown);
        t
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Index of the unknown pseudo-target.
    pub fn unknown(&self) -> u16 {
        self.names.len().saturating_sub(1) as u16
    }

    #[inline]
    pub fn slot(&self, slot: usize) -> u16 {
        self.slot_target
            .get(slot)
            .copied()
            .unwrap_or_else(|| self.unknown())
    }

    #[inline]
    pub fn plan(&self, plan: usize) -> u16 {
        self.plan_target
            .get(plan)
            .copied()
            .unwrap_or_else(|| self.unknown())
    }

    pub fn name(&self, t: u16) -> &str {
        self.names
            .get(t as usize)
            .map(String::as_str)
            .unwrap_or(UNKNOWN_TARGET)
    }
}

/// Number of wire statuses (index = `Status as usize`).
pub const STATUSES: usize = Status::ALL.len();

/// One shard's metrics. Aligned so two shards' hot counters never share
/// a cache line (each is written by a different core).
#[derive(Debug)]
#[repr(align(128))]
pub struct ShardMetrics {
    /// The CPU this shard was configured for (label `core`).
    pub core: usize,
    pub targets: Arc<Targets>,
    /// Responses sent, by wire status (index = `Status as usize`).
    pub responses: [Counter; STATUSES],
    /// Frames handed to the request path (each gets exactly one response).
    pub requests_received: Counter,
    pub connections_accepted: Counter,
    pub connections_closed: Counter,
    pub connections_refused: Counter,
    /// Connections closed for a protocol violation (bad length prefix).
    pub connections_dropped: Counter,
    /// Connections closed on a timer, by [`TimedOut`] reason.
    pub connections_timed_out: [Counter; 3],
    /// Most answer bytes one connection of this shard has held at once
    /// (encoded and not yet written); bounded by
    /// `pending_bytes_per_connection_max`.
    pub pending_bytes_peak: Counter,
    pub batches: Counter,
    pub batch_rows: Counter,
    pub queue_us: Counter,
    pub compute_us: Counter,
    /// By [`Shed`] reason.
    pub shed: [Counter; 4],
    /// Queued rows dropped before compute: their deadline had passed (or
    /// would pass during the batch).
    pub rows_dropped_expired: Counter,
    /// Queued rows dropped before compute: nobody would read the answer
    /// (an ensemble answered already, a closed connection).
    pub rows_dropped_cancelled: Counter,
    /// Requests refused at admission because their predicted queue wait
    /// exceeded their budget: answered DEADLINE_EXCEEDED (a deadline) ...
    pub admission_refused_deadline: Counter,
    /// ... or OVERLOADED (no deadline, over `queue_wait_max_us`).
    pub admission_refused_overloaded: Counter,
    pub cache_hits_l1: Counter,
    pub cache_hits_l2: Counter,
    pub cache_hits_l3: Counter,
    pub cache_misses: Counter,
    /// Requests answered by waiting on an identical one in flight.
    pub cache_coalesced: Counter,
    pub cache_inserts: Counter,
    /// Target of the request being handled (see the module doc).
    current: AtomicU64,
    /// target × status.
    requests: Box<[Counter]>,
    /// Per target: arrival → response encoded, µs.
    request_duration: Box<[Histogram]>,
    /// Per target: arrival → batch start, µs (successful requests).
    queue_duration: Box<[Histogram]>,
    /// Per model: backend time of one batch, µs.
    compute_duration: Box<[Histogram]>,
    /// Per model: rows per batch.
    batch_size: Box<[Histogram]>,
    pub trace: TraceRing,
}

impl Default for ShardMetrics {
    fn default() -> Self {
        ShardMetrics::new(0, Arc::new(Targets::default()), 0.0, 0)
    }
}

impl ShardMetrics {
    /// Everything is allocated here, once.
    pub fn new(
        core: usize,
        targets: Arc<Targets>,
        trace_sample_rate: f64,
        trace_ring_records: usize,
    ) -> ShardMetrics {
        let hists = |n: usize, bounds: &'static [u64]| {
            (0..n)
                .map(|_| Histogram::new(bounds))
                .collect::<Box<[Histogram]>>()
        };
        let n = targets.len();
        let models = targets.models;
        ShardMetrics {
            core,
            requests: (0..n * STATUSES).map(|_| Counter::default()).collect(),
            request_duration: hists(n, DURATION_BOUNDS_US),
            queue_duration: hists(n, DURATION_BOUNDS_US),
            compute_duration: hists(models, DURATION_BOUNDS_US),
            batch_size: hists(models, BATCH_BOUNDS_ROWS),
            current: AtomicU64::new(targets.unknown() as u64),
            targets,
            responses: Default::default(),
            requests_received: Counter::default(),
            connections_accepted: Counter::default(),
            connections_closed: Counter::default(),
            connections_refused: Counter::default(),
            connections_dropped: Counter::default(),
            connections_timed_out: Default::default(),
            pending_bytes_peak: Counter::default(),
            batches: Counter::default(),
            batch_rows: Counter::default(),
            queue_us: Counter::default(),
            compute_us: Counter::default(),
            shed: Default::default(),
            rows_dropped_expired: Counter::default(),
            rows_dropped_cancelled: Counter::default(),
            admission_refused_deadline: Counter::default(),
            admission_refused_overloaded: Counter::default(),
            cache_hits_l1: Counter::default(),
            cache_hits_l2: Counter::default(),
            cache_hits_l3: Counter::default(),
            cache_misses: Counter::default(),
            cache_coalesced: Counter::default(),
            cache_inserts: Counter::default(),
            trace: TraceRing::new(trace_sample_rate, trace_ring_records, core as u64 + 1),
        }
    }

    // ---- hot path: called by the owning shard only ----

    /// A frame arrived; until a target is set it counts as unknown.
    #[inline]
    pub fn begin_request(&self) {
        self.requests_received.inc();
        self.current.store(self.targets.unknown() as u64, Relaxed);
    }

    /// A frame counted by `begin_request` is handled again (its L3
    /// lookup missed): not a new request.
    #[inline]
    pub fn resume_request(&self) {
        self.current.store(self.targets.unknown() as u64, Relaxed);
    }

    /// The responses that follow are for target `t` (an index into
    /// `targets`; shards map their slots and plans to it by name).
    #[inline]
    pub fn set_target(&self, t: u16) {
        self.current.store(t as u64, Relaxed);
    }

    /// The responses that follow are for the model in shard slot `slot`.
    #[inline]
    pub fn set_target_slot(&self, slot: usize) {
        self.current.store(self.targets.slot(slot) as u64, Relaxed);
    }

    /// The responses that follow are for ensemble plan `plan`.
    #[inline]
    pub fn set_target_plan(&self, plan: usize) {
        self.current.store(self.targets.plan(plan) as u64, Relaxed);
    }

    /// One response was encoded (or dropped for a dead connection).
    /// `total_us`: arrival → now; `queue_us`/`compute_us`: 0 for errors.
    #[inline]
    pub fn record_response(
        &self,
        id: u64,
        status: Status,
        arrival: Instant,
        total_us: u32,
        queue_us: u32,
        compute_us: u32,
    ) {
        let t = self.current.load(Relaxed) as usize;
        self.responses[status as usize].inc();
        if let Some(c) = self.requests.get(t * STATUSES + status as usize) {
            c.inc();
        }
        if let Some(h) = self.request_duration.get(t) {
            h.observe(total_us as u64);
        }
        if status == Status::Ok {
            self.queue_us.add(queue_us as u64);
            if let Some(h) = self.queue_duration.get(t) {
                h.observe(queue_us as u64);
            }
        }
        if self.trace.enabled() {
            self.trace.sample(&TraceRecord {
                arrival_ns: trace::since_epoch_ns(arrival),
                id,
                target: t as u16,
                status: status as u8,
                total_us,
                queue_us,
                compute_us,
            });
        }
    }

    /// The batcher of shard slot `slot` (in start-up layout) ran `rows`
    /// rows in `compute`.
    #[inline]
    pub fn record_batch(&self, slot: usize, rows: usize, compute: Duration) {
        self.record_batch_of(self.targets.slot(slot), rows, compute)
    }

    /// A batcher of a model of target `target` ran `rows` rows in `compute`.
    #[inline]
    pub fn record_batch_of(&self, target: u16, rows: usize, compute: Duration) {
        let us = compute.as_micros().min(u64::MAX as u128) as u64;
        self.batches.inc();
        self.batch_rows.add(rows as u64);
        self.compute_us.add(us);
        let m = target as usize;
        if let Some(h) = self.compute_duration.get(m) {
            h.observe(us);
        }
        if let Some(h) = self.batch_size.get(m) {
            h.observe(rows as u64);
        }
    }

    /// A request is about to be answered OVERLOADED for `reason`.
    #[inline]
    pub fn record_timed_out(&self, reason: TimedOut) {
        self.connections_timed_out[reason as usize].inc();
    }

    /// A connection holds `bytes` of answers: keep the peak.
    #[inline]
    pub fn record_pending(&self, bytes: usize) {
        if bytes as u64 > self.pending_bytes_peak.get() {
            self.pending_bytes_peak.set(bytes as u64);
        }
    }

    #[inline]
    pub fn record_shed(&self, reason: Shed) {
        self.shed[reason as usize].inc();
    }

    #[inline]
    pub fn record_cache_hit(&self, tier: CacheTier) {
        self.cache_hits(tier).inc();
    }

    /// The hit counter of `tier`.
    pub fn cache_hits(&self, tier: CacheTier) -> &Counter {
        match tier {
            CacheTier::L1 => &self.cache_hits_l1,
            CacheTier::L2 => &self.cache_hits_l2,
            CacheTier::L3 => &self.cache_hits_l3,
        }
    }

    #[inline]
    pub fn record_cache_miss(&self) {
        self.cache_misses.inc();
    }

    /// A request joined an identical one already in flight.
    #[inline]
    pub fn record_cache_coalesced(&self) {
        self.cache_coalesced.inc();
    }

    /// Kept for callers that count a response without timing it.
    #[inline]
    pub fn response(&self, s: Status) {
        self.responses[s as usize].inc();
    }

    // ---- readers (any thread) ----

    /// Responses for target `t` with `status`.
    pub fn requests_of(&self, t: usize, status: Status) -> u64 {
        self.requests
            .get(t * STATUSES + status as usize)
            .map_or(0, Counter::get)
    }

    pub fn request_duration_of(&self, t: usize) -> Option<histogram::HistogramSnapshot> {
        self.request_duration.get(t).map(Histogram::snapshot)
    }

    pub fn queue_duration_of(&self, t: usize) -> Option<histogram::HistogramSnapshot> {
        self.queue_duration.get(t).map(Histogram::snapshot)
    }

    pub fn compute_duration_of(&self, model: usize) -> Option<histogram::HistogramSnapshot> {
        self.compute_duration.get(model).map(Histogram::snapshot)
    }

    pub fn batch_size_of(&self, model: usize) -> Option<histogram::HistogramSnapshot> {
        self.batch_size.get(model).map(Histogram::snapshot)
    }

    pub fn connections_open(&self) -> u64 {
        self.connections_accepted
            .get()
            .saturating_sub(self.connections_closed.get())
    }

    /// Requests received and not yet answered.
    pub fn in_flight(&self) -> u64 {
        // Read the responses first: a response counted after this read
        // can only make the difference smaller, never negative.
        let answered: u64 = self.responses.iter().map(Counter::get).sum();
        self.requests_received.get().saturating_sub(answered)
    }
}

/// Sum of all shards, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub responses: [u64; 6],
    pub connections_accepted: u64,
    pub connections_dropped: u64,
    /// By [`TimedOut`] reason.
    pub connections_timed_out: [u64; 3],
    /// Largest over shards.
    pub pending_bytes_peak: u64,
    pub batches: u64,
    pub batch_rows: u64,
    pub cache_hits_l1: u64,
    pub cache_hits_l2: u64,
    pub cache_misses: u64,
    pub cache_coalesced: u64,
}

impl Totals {
    pub fn sum(shards: &[Arc<ShardMetrics>]) -> Totals {
        let mut t = Totals::default();
        for m in shards {
            for (i, c) in m.responses.iter().enumerate() {
                t.responses[i] += c.get();
            }
            t.connections_accepted += m.connections_accepted.get();
            t.connections_dropped += m.connections_dropped.get();
            for (i, c) in m.connections_timed_out.iter().enumerate() {
                t.connections_timed_out[i] += c.get();
            }
            t.pending_bytes_peak = t.pending_bytes_peak.max(m.pending_bytes_peak.get());
            t.batches += m.batches.get();
            t.batch_rows += m.batch_rows.get();
            t.cache_hits_l1 += m.cache_hits_l1.get();
            t.cache_hits_l2 += m.cache_hits_l2.get();
            t.cache_misses += m.cache_misses.get();
            t.cache_coalesced += m.cache_coalesced.get();
        }
        t
    }
    pub fn requests(&self) -> u64 {
        self.responses.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_metrics_ignore_unknown_indices() {
        let m = ShardMetrics::default();
        m.begin_request();
        m.set_target_slot(5);
        m.record_response(1, Status::Ok, Instant::now(), 10, 1, 1);
        m.record_batch(3, 4, Duration::from_micros(5));
        assert_eq!(m.responses[0].get(), 1);
        assert_eq!(m.in_flight(), 0);
    }
}
