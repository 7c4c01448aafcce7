//! Cache counters. L1 and the coalescer are per core and count with plain
//! `u64`s behind `&mut self`; L2 is shared by every core and counts with
//! relaxed `AtomicU64`s, each on its own cache line so that two cores
//! bumping different counters do not share a line.
//!
//! The snapshot structs are plain data, summed across cores by the metrics
//! scraper.

use crossbeam::utils::CachePadded;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// L1 (per core) counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L1Stats {
    pub hits: u64,
    pub misses: u64,
    pub inserts: u64,
    pub evictions: u64,
    /// Inserts refused because the value was longer than the slot.
    pub rejected_too_long: u64,
    /// Live entries now.
    pub occupancy: u64,
    /// Total slots.
    pub capacity: u64,
}

/// Coalescer (per core) counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoalesceStats {
    /// `begin` answered Leader.
    pub leaders: u64,
    /// Waiters queued behind a leader (requests that did not compute).
    pub coalesced_waits: u64,
    /// `begin`/`add_waiter` refused because a bound was reached.
    pub full: u64,
    /// Keys in flight now.
    pub in_flight: u64,
}

/// L2 counters snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L2Stats {
    pub hits: u64,
    pub misses: u64,
    pub inserts: u64,
    /// Inserts that replaced a live entry of another key.
    pub evictions: u64,
    /// Slots whose seqlock read was consistent but whose checksum failed
    /// (never served).
    pub checksum_failures: u64,
    /// Seqlock reads retried because a writer was in the slot.
    pub torn_read_retries: u64,
    /// Lookups given up as a miss after the retry bound.
    pub torn_read_misses: u64,
    /// Entries found past their TTL (served as a miss).
    pub expired: u64,
    /// Inserts dropped because every candidate slot was being written.
    pub insert_contended: u64,
    /// Entries removed by `purge_target`.
    pub purged: u64,
    /// Occupied slots: live entries, expired ones not yet replaced
    /// included. A counter kept by inserts, removals and purges (and set by
    /// the open-time scan), so reading it costs the same at any file size.
    pub occupancy: u64,
    /// Total slots.
    pub capacity: u64,
}

/// The live atomic counters of an L2 cache.
#[derive(Default)]
pub(crate) struct L2Counters {
    pub hits: CachePadded<AtomicU64>,
    pub misses: CachePadded<AtomicU64>,
    pub inserts: CachePadded<AtomicU64>,
    pub evictions: CachePadded<AtomicU64>,
    pub checksum_failures: CachePadded<AtomicU64>,
    pub torn_read_retries: CachePadded<AtomicU64>,
    pub torn_read_misses: CachePadded<AtomicU64>,
    pub expired: CachePadded<AtomicU64>,
    pub insert_contended: CachePadded<AtomicU64>,
    pub purged: CachePadded<AtomicU64>,
    /// Occupied slots (see [`L2Stats::occupancy`]).
    pub occupancy: CachePadded<AtomicU64>,
}

#[inline]
pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

impl L2Counters {
    pub(crate) fn snapshot(&self, capacity: u64) -> L2Stats {
        L2Stats {
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            inserts: self.inserts.load(Relaxed),
            evictions: self.evictions.load(Relaxed),
            checksum_failures: self.checksum_failures.load(Relaxed),
            torn_read_retries: self.torn_read_retries.load(Relaxed),
            torn_read_misses: self.torn_read_misses.load(Relaxed),
            expired: self.expired.load(Relaxed),
            insert_contended: self.insert_contended.load(Relaxed),
            purged: self.purged.load(Relaxed),
            occupancy: self.occupancy.load(Relaxed),
            capacity,
        }
    }
}
