//! Per-core coalescing of identical in-flight misses: the first request for
//! a key computes (the *leader*), later identical requests wait for its
//! answer (the *followers*) instead of computing again.
//!
//! Single-threaded (one per shard, `&mut self`) and preallocated: a
//! fixed-capacity open-addressing table (linear probing, backward-shift
//! deletion, so no tombstones pile up) maps a key to the head and tail of
//! its waiter list; waiters live in one slab of nodes threaded on an
//! intrusive free list. Nothing allocates after [`Coalescer::new`].
//!
//! Bounds: at most `keys_max` keys in flight and `waiters_per_key_max`
//! waiters per key. At a bound the answer is [`Begin::Full`] (or `Err(w)`
//! from [`Coalescer::add_waiter`]); the caller then computes on its own
//! (never waits unbounded, never grows).

use super::key::CacheKey;
use super::metrics::CoalesceStats;

/// Coalescer bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoalesceConfig {
    /// Keys in flight at once.
    pub keys_max: usize,
    /// Waiters queued behind one key.
    pub waiters_per_key_max: usize,
    /// Waiters queued in all (the node slab size).
    pub waiters_total_max: usize,
}

impl Default for CoalesceConfig {
    fn default() -> Self {
        CoalesceConfig {
            keys_max: 1024,
            waiters_per_key_max: 64,
            waiters_total_max: 8192,
        }
    }
}

/// What `begin` decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Begin {
    /// No identical request in flight: compute, then call `complete`.
    Leader,
    /// An identical request is in flight: `add_waiter` and wait.
    Follower,
    /// A bound is reached: compute without coalescing.
    Full,
}

const NIL: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct Entry {
    key: u128,
    used: bool,
    head: u32,
    tail: u32,
    count: u32,
}

const FREE_ENTRY: Entry = Entry {
    key: 0,
    used: false,
    head: NIL,
    tail: NIL,
    count: 0,
};

struct Node<W> {
    waiter: Option<W>,
    next: u32,
}

/// Key → FIFO of waiters, bounded and preallocated.
pub struct Coalescer<W> {
    table: Box<[Entry]>,
    mask: usize,
    nodes: Box<[Node<W>]>,
    free_head: u32,
    keys_max: usize,
    waiters_per_key_max: u32,
    stats: CoalesceStats,
}

impl<W> Coalescer<W> {
    /// Allocate the table and the waiter slab.
    pub fn new(cfg: CoalesceConfig) -> Result<Self, String> {
        if cfg.keys_max == 0
            || cfg.waiters_per_key_max == 0
            || cfg.waiters_total_max == 0
            || cfg.waiters_total_max >= NIL as usize
            || cfg.waiters_per_key_max >= NIL as usize
        {
            return Err(format!("beast: bad coalescer bounds {cfg:?}"));
        }
        // Load factor ≤ 1/2 keeps probe chains short.
        let cap = (cfg.keys_max * 2).next_power_of_two();
        let n = cfg.waiters_total_max;
        let nodes: Box<[Node<W>]> = (0..n)
            .map(|i| Node {
                waiter: None,
                next: if i + 1 < n { (i + 1) as u32 } else { NIL },
            })
            .collect();
        Ok(Coalescer {
            table: vec![FREE_ENTRY; cap].into_boxed_slice(),
            mask: cap - 1,
            nodes,
            free_head: 0,
            keys_max: cfg.keys_max,
            waiters_per_key_max: cfg.waiters_per_key_max as u32,
            stats: CoalesceStats::default(),
        })
    }

    #[inline]
    fn home(&self, key: &CacheKey) -> usize {
        (key.lo() as usize) & self.mask
    }

    fn lookup(&self, key: &CacheKey) -> Option<usize> {
        let mut i = self.home(key);
        loop {
            let e = &self.table[i];
            if !e.used {
                return None;
            }
            if e.key == key.0 {
                return Some(i);
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Register interest in `key`.
    pub fn begin(&mut self, key: CacheKey) -> Begin {
        if let Some(i) = self.lookup(&key) {
            return if self.table[i].count < self.waiters_per_key_max && self.free_head != NIL {
                Begin::Follower
            } else {
                self.stats.full += 1;
                Begin::Full
            };
        }
        if self.stats.in_flight as usize >= self.keys_max {
            self.stats.full += 1;
            return Begin::Full;
        }
        let mut i = self.home(&key);
        while self.table[i].used {
            i = (i + 1) & self.mask;
        }
        self.table[i] = Entry {
            key: key.0,
            used: true,
            ..FREE_ENTRY
        };
        self.stats.in_flight += 1;
        self.stats.leaders += 1;
        Begin::Leader
    }

    /// Queue `w` behind the leader of `key`. Gives `w` back when the key is
    /// not in flight or a bound is reached.
    pub fn add_waiter(&mut self, key: CacheKey, w: W) -> Result<(), W> {
        let Some(i) = self.lookup(&key) else {
            return Err(w);
        };
        if self.table[i].count >= self.waiters_per_key_max || self.free_head == NIL {
            self.stats.full += 1;
            return Err(w);
        }
        let n = self.free_head;
        let node = &mut self.nodes[n as usize];
        self.free_head = node.next;
        node.waiter = Some(w);
        node.next = NIL;
        let e = &mut self.table[i];
        if e.tail == NIL {
            e.head = n;
        } else {
            self.nodes[e.tail as usize].next = n;
        }
        e.tail = n;
        e.count += 1;
        self.stats.coalesced_waits += 1;
        Ok(())
    }

    /// How many requests wait on `key` (0 when it is not in flight).
    pub fn waiters(&self, key: &CacheKey) -> u32 {
        self.lookup(key).map_or(0, |i| self.table[i].count)
    }

    /// Whether `key` is in flight.
    pub fn in_flight(&self, key: &CacheKey) -> bool {
        self.lookup(key).is_some()
    }

    /// End the flight of `key` and hand back its waiters in arrival order.
    /// A key not in flight yields nothing. Dropping the drain early drops
    /// the remaining waiters.
    pub fn complete(&mut self, key: CacheKey) -> Drain<'_, W> {
        let head = match self.lookup(&key) {
            Some(i) => {
                let head = self.table[i].head;
                self.remove_at(i);
                self.stats.in_flight -= 1;
                head
            }
            None => NIL,
        };
        Drain {
            c: self,
            next: head,
        }
    }

    // Backward-shift deletion for linear probing.
    fn remove_at(&mut self, mut hole: usize) {
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            if !self.table[j].used {
                break;
            }
            let home = (self.table[j].key as u64 as usize) & self.mask;
            // Move j into the hole unless its home lies cyclically in (hole, j].
            let in_range = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !in_range {
                self.table[hole] = self.table[j];
                hole = j;
            }
        }
        self.table[hole] = FREE_ENTRY;
    }

    /// Counters.
    pub fn stats(&self) -> CoalesceStats {
        self.stats
    }
}

/// Waiters of a completed key, in arrival order.
pub struct Drain<'a, W> {
    c: &'a mut Coalescer<W>,
    next: u32,
}

impl<W> Iterator for Drain<'_, W> {
    type Item = W;
    fn next(&mut self) -> Option<W> {
        if self.next == NIL {
            return None;
        }
        let n = self.next;
        let node = &mut self.c.nodes[n as usize];
        self.next = node.next;
        let w = node.waiter.take();
        node.next = self.c.free_head;
        self.c.free_head = n;
        w
    }
}

impl<W> Drop for Drain<'_, W> {
    fn drop(&mut self) {
        for _ in self.by_ref() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> CacheKey {
        CacheKey(xxhash_rust::xxh3::xxh3_128(&i.to_le_bytes()))
    }

    fn cfg(keys: usize, per: usize, total: usize) -> CoalesceConfig {
        CoalesceConfig {
            keys_max: keys,
            waiters_per_key_max: per,
            waiters_total_max: total,
        }
    }

    #[test]
    fn cache_coalesce_leader_follower_order() {
        let mut c: Coalescer<u32> = Coalescer::new(cfg(4, 8, 32)).unwrap();
        assert_eq!(c.begin(key(1)), Begin::Leader);
        for w in 0..5 {
            assert_eq!(c.begin(key(1)), Begin::Follower);
            c.add_waiter(key(1), w).unwrap();
        }
        assert_eq!(c.begin(key(2)), Begin::Leader);
        c.add_waiter(key(2), 100).unwrap();
        let got: Vec<u32> = c.complete(key(1)).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        assert!(!c.in_flight(&key(1)));
        assert!(c.in_flight(&key(2)));
        assert_eq!(c.complete(key(2)).collect::<Vec<_>>(), vec![100]);
        assert_eq!(c.complete(key(3)).count(), 0);
        assert_eq!(c.add_waiter(key(9), 7), Err(7), "not in flight");
        let s = c.stats();
        assert_eq!((s.leaders, s.coalesced_waits, s.in_flight), (2, 6, 0));
    }

    #[test]
    fn cache_coalesce_bounds_full() {
        let mut c: Coalescer<u32> = Coalescer::new(cfg(2, 2, 3)).unwrap();
        assert_eq!(c.begin(key(1)), Begin::Leader);
        assert_eq!(c.begin(key(2)), Begin::Leader);
        assert_eq!(c.begin(key(3)), Begin::Full, "keys_max");
        c.add_waiter(key(1), 1).unwrap();
        c.add_waiter(key(1), 2).unwrap();
        assert_eq!(c.begin(key(1)), Begin::Full, "waiters_per_key_max");
        assert_eq!(c.add_waiter(key(1), 3), Err(3));
        c.add_waiter(key(2), 4).unwrap();
        assert_eq!(c.begin(key(2)), Begin::Full, "waiters_total_max");
        assert_eq!(c.add_waiter(key(2), 5), Err(5));
        // Dropping a drain early frees its nodes.
        drop(c.complete(key(1)));
        c.add_waiter(key(2), 6).unwrap();
        assert_eq!(c.complete(key(2)).collect::<Vec<_>>(), vec![4, 6]);
        assert_eq!(c.begin(key(3)), Begin::Leader);
    }

    #[test]
    fn cache_coalesce_table_churn() {
        // Many begin/complete cycles with colliding homes: backward-shift
        // deletion must keep every in-flight key findable.
        let mut c: Coalescer<u64> = Coalescer::new(cfg(64, 4, 256)).unwrap();
        let mut live: Vec<u64> = Vec::new();
        let mut rng = 12345u64;
        for step in 0..20_000u64 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if live.len() < 60 && (rng >> 33).is_multiple_of(2) {
                let k = step;
                assert_eq!(c.begin(key(k)), Begin::Leader);
                c.add_waiter(key(k), k).unwrap();
                live.push(k);
            } else if !live.is_empty() {
                let idx = ((rng >> 40) as usize) % live.len();
                let k = live.swap_remove(idx);
                assert_eq!(c.complete(key(k)).collect::<Vec<_>>(), vec![k]);
            }
            for &k in live.iter().take(3) {
                assert!(c.in_flight(&key(k)));
            }
        }
        assert_eq!(c.stats().in_flight as usize, live.len());
    }
}
