//! Cost accounting of member selection: per ensemble and per domain, the
//! FLOPs the chosen members ran against the FLOPs `all` would have run.
//!
//! Owns: [`SelectionCounters`], written by one shard only (relaxed atomics,
//! no locks) and read by any thread through `ServerHandle::selection_stats`,
//! and the domain table that maps a request's domain to a fixed slot.

use std::sync::atomic::{AtomicU64, Ordering};

/// Hash of a request's domain string; the empty / absent domain is 0.
pub fn domain_hash(domain: Option<&str>) -> u64 {
    match domain {
        None | Some("") => 0,
        Some(d) => xxhash_rust::xxh3::xxh3_64(d.as_bytes()) | 1,
    }
}

/// Fixed-capacity map of domain hash → slot, per ensemble. Slot 0 is the
/// default domain, and also where domains beyond the capacity are counted
/// (bounded: a client inventing domains cannot grow the server).
#[derive(Debug)]
pub struct DomainTable {
    hashes: Vec<u64>,
}

impl DomainTable {
    pub fn new(capacity: usize) -> Self {
        DomainTable {
            hashes: vec![0; capacity.max(1)],
        }
    }

    pub fn capacity(&self) -> usize {
        self.hashes.len()
    }

    /// The slot of `hash`, taking a free one on first sight.
    pub fn slot(&mut self, hash: u64) -> usize {
        if hash == 0 {
            return 0;
        }
        let n = self.hashes.len();
        if n == 1 {
            return 0;
        }
        // Open addressing over slots 1..n.
        let start = 1 + (hash as usize % (n - 1));
        for i in 0..n - 1 {
            let s = 1 + (start - 1 + i) % (n - 1);
            if self.hashes[s] == hash {
                return s;
            }
            if self.hashes[s] == 0 {
                self.hashes[s] = hash;
                return s;
            }
        }
        0
    }

    pub fn hash_of(&self, slot: usize) -> u64 {
        self.hashes[slot]
    }
}

/// Counters of one (ensemble, domain) on one shard.
#[derive(Debug, Default)]
pub struct DomainCounters {
    pub domain_hash: AtomicU64,
    /// The domain's name, set the first time the slot is used (bounded:
    /// one per slot); empty for the default slot.
    pub domain: std::sync::OnceLock<String>,
    pub requests: AtomicU64,
    /// Member answers computed (cache hits not counted).
    pub members_run: AtomicU64,
    pub flops_run: AtomicU64,
    /// What `all` would have run for the same requests.
    pub flops_all: AtomicU64,
    /// Answers cut short by a deadline (partial) or refused before compute.
    pub partial: AtomicU64,
    pub deadline_refused: AtomicU64,
    /// Feedback received, and how often the ensemble's answer was right.
    pub feedback: AtomicU64,
    pub feedback_correct: AtomicU64,
}

/// Every ensemble's counters on one shard: `[plan][domain slot]`.
#[derive(Debug)]
pub struct SelectionCounters {
    pub names: Vec<String>,
    pub domains: usize,
    pub counters: Vec<DomainCounters>,
    /// Counts for an ensemble added after start (not in `names`): kept
    /// nowhere visible until a restart.
    pub spare: DomainCounters,
}

impl SelectionCounters {
    pub fn new(names: Vec<String>, domains: usize) -> Self {
        let counters = (0..names.len() * domains)
            .map(|_| Default::default())
            .collect();
        SelectionCounters {
            names,
            domains,
            counters,
            spare: DomainCounters::default(),
        }
    }

    pub fn at(&self, plan: usize, slot: usize) -> &DomainCounters {
        &self.counters[plan * self.domains + slot]
    }
}

impl DomainCounters {
    /// One answered request: members computed, FLOPs run, FLOPs of `all`.
    pub fn record_request(&self, hash: u64, members_run: u64, run: u64, all: u64, partial: bool) {
        self.domain_hash.store(hash, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.members_run.fetch_add(members_run, Ordering::Relaxed);
        self.flops_run.fetch_add(run, Ordering::Relaxed);
        self.flops_all.fetch_add(all, Ordering::Relaxed);
        self.partial.fetch_add(partial as u64, Ordering::Relaxed);
    }
}

/// A snapshot of one (ensemble, domain), summed over shards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SelectionStat {
    pub ensemble: String,
    /// The domain's name ("" = the default domain, where domains beyond
    /// `selection_domains_max` are counted too).
    pub domain: String,
    /// `domain_hash` of the domain (0 = default, and overflow).
    pub domain_hash: u64,
    pub requests: u64,
    pub members_run: u64,
    pub flops_run: u64,
    pub flops_all: u64,
    pub partial: u64,
    pub deadline_refused: u64,
    pub feedback: u64,
    pub feedback_correct: u64,
}

impl SelectionStat {
    pub fn flops_saved(&self) -> u64 {
        self.flops_all.saturating_sub(self.flops_run)
    }
}

/// Sum every shard's counters per (ensemble, domain hash); rows with no
/// requests and no feedback are left out.
pub fn snapshot(shards: &[std::sync::Arc<SelectionCounters>]) -> Vec<SelectionStat> {
    let mut out: Vec<SelectionStat> = Vec::new();
    for s in shards {
        for (p, name) in s.names.iter().enumerate() {
            for d in 0..s.domains {
                let c = s.at(p, d);
                let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
                let (req, fb) = (get(&c.requests), get(&c.feedback));
                if req == 0 && fb == 0 && get(&c.deadline_refused) == 0 {
                    continue;
                }
                let hash = get(&c.domain_hash);
                let i = match out
                    .iter()
                    .position(|x| x.ensemble == *name && x.domain_hash == hash)
                {
                    Some(i) => i,
                    None => {
                        out.push(SelectionStat {
                            ensemble: name.clone(),
                            domain: c.domain.get().cloned().unwrap_or_default(),
                            domain_hash: hash,
                            ..Default::default()
                        });
                        out.len() - 1
                    }
                };
                let o = &mut out[i];
                o.requests += req;
                o.members_run += get(&c.members_run);
                o.flops_run += get(&c.flops_run);
                o.flops_all += get(&c.flops_all);
                o.partial += get(&c.partial);
                o.deadline_refused += get(&c.deadline_refused);
                o.feedback += fb;
                o.feedback_correct += get(&c.feedback_correct);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_slots_are_stable_and_bounded() {
        let mut t = DomainTable::new(3);
        assert_eq!(t.slot(0), 0);
        let a = t.slot(domain_hash(Some("a")));
        let b = t.slot(domain_hash(Some("b")));
        assert!(a != 0 && b != 0 && a != b);
        assert_eq!(t.slot(domain_hash(Some("a"))), a);
        // Full: a third domain is counted with the default one.
        assert_eq!(t.slot(domain_hash(Some("c"))), 0);
        assert_eq!(domain_hash(Some("")), 0);
    }
}
