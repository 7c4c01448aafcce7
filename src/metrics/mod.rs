//! Metrics: per-shard counters, summed when read.
//!
//! Owns: counters each shard bumps on its own thread. Each counter has a
//! single writer (its shard), so an increment is a relaxed load + store,
//! not a locked read-modify-write; readers on other threads (shutdown
//! summary, later the admin port) sum relaxed loads across shards.

use crate::wire::Status;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// One shard's counters.
#[derive(Debug, Default)]
pub struct ShardMetrics {
    /// Responses sent, by wire status (index = `Status as usize`).
    pub responses: [Counter; 6],
    pub connections_accepted: Counter,
    pub connections_refused: Counter,
    /// Connections closed for a protocol violation (bad length prefix).
    pub connections_dropped: Counter,
    pub batches: Counter,
    pub batch_rows: Counter,
    pub queue_us: Counter,
    pub compute_us: Counter,
    pub cache_hits_l1: Counter,
    pub cache_hits_l2: Counter,
    pub cache_misses: Counter,
    /// Requests answered by waiting on an identical one in flight.
    pub cache_coalesced: Counter,
    pub cache_inserts: Counter,
}

impl ShardMetrics {
    #[inline]
    pub fn response(&self, s: Status) {
        self.responses[s as usize].inc();
    }
}

/// Sum of all shards, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub responses: [u64; 6],
    pub connections_accepted: u64,
    pub connections_dropped: u64,
    pub batches: u64,
    pub batch_rows: u64,
    pub cache_hits_l1: u64,
    pub cache_hits_l2: u64,
    pub cache_misses: u64,
    pub cache_coalesced: u64,
}

impl Totals {
    pub fn sum(shards: &[std::sync::Arc<ShardMetrics>]) -> Totals {
        let mut t = Totals::default();
        for m in shards {
            for (i, c) in m.responses.iter().enumerate() {
                t.responses[i] += c.get();
            }
            t.connections_accepted += m.connections_accepted.get();
            t.connections_dropped += m.connections_dropped.get();
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
