//! L1: the per-core prediction table. No atomics, no locks: it is owned by
//! one shard and used through `&mut self` (and marked `!Sync`).
//!
//! Set-associative: `sets × ways` slots, all allocated at construction
//! (keys, lengths, reference bits and one flat `f32` slab of
//! `value_f32_max` floats per slot). A lookup hashes to one set and compares
//! at most `ways` keys. Eviction is CLOCK inside a set: a hit sets the
//! slot's reference bit, the per-set hand clears bits until it finds a slot
//! without one. Nothing allocates after [`L1Cache::new`].

use super::key::CacheKey;
use super::metrics::L1Stats;
use std::cell::Cell;
use std::marker::PhantomData;

/// L1 geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L1Config {
    /// Number of sets (rounded up to a power of two).
    pub sets: usize,
    /// Ways per set (1..=64).
    pub ways: usize,
    /// Largest value, in f32s, that an entry can hold.
    pub value_f32_max: usize,
}

impl Default for L1Config {
    fn default() -> Self {
        L1Config {
            sets: 1024,
            ways: 4,
            value_f32_max: 16,
        }
    }
}

const EMPTY: u32 = u32::MAX;

/// Per-core set-associative cache of f32 predictions.
pub struct L1Cache {
    set_mask: usize,
    ways: usize,
    value_max: usize,
    keys: Box<[u128]>,
    /// Value length in f32s, or `EMPTY`.
    lens: Box<[u32]>,
    referenced: Box<[bool]>,
    hands: Box<[u8]>,
    values: Box<[f32]>,
    stats: L1Stats,
    // One shard owns it; `!Sync` says so to the type system.
    _not_sync: PhantomData<Cell<()>>,
}

impl L1Cache {
    /// Allocate every slot now. Returns an error for a degenerate geometry.
    pub fn new(cfg: L1Config) -> Result<Self, String> {
        if cfg.sets == 0 || cfg.ways == 0 || cfg.ways > 64 || cfg.value_f32_max == 0 {
            return Err(format!("beast: bad L1 geometry {cfg:?}"));
        }
        if cfg.value_f32_max > u32::MAX as usize / 2 {
            return Err("beast: L1 value_f32_max too large".into());
        }
        let sets = cfg.sets.next_power_of_two();
        let slots = sets.checked_mul(cfg.ways).ok_or("beast: L1 too large")?;
        let floats = slots
            .checked_mul(cfg.value_f32_max)
            .ok_or("beast: L1 too large")?;
        Ok(L1Cache {
            set_mask: sets - 1,
            ways: cfg.ways,
            value_max: cfg.value_f32_max,
            keys: vec![0u128; slots].into_boxed_slice(),
            lens: vec![EMPTY; slots].into_boxed_slice(),
            referenced: vec![false; slots].into_boxed_slice(),
            hands: vec![0u8; sets].into_boxed_slice(),
            values: vec![0f32; floats].into_boxed_slice(),
            stats: L1Stats {
                capacity: slots as u64,
                ..L1Stats::default()
            },
            _not_sync: PhantomData,
        })
    }

    #[inline]
    fn set_of(&self, key: &CacheKey) -> usize {
        // The key is a uniform hash: its low bits are as good as any.
        (key.lo() as usize) & self.set_mask
    }

    #[inline]
    fn find(&self, set: usize, key: &CacheKey) -> Option<usize> {
        let base = set * self.ways;
        (base..base + self.ways).find(|&i| self.lens[i] != EMPTY && self.keys[i] == key.0)
    }

    /// Copy the value for `key` into `out` and return its length. A value
    /// longer than `out` is reported as a miss (nothing is written).
    #[inline]
    pub fn get(&mut self, key: &CacheKey, out: &mut [f32]) -> Option<usize> {
        let set = self.set_of(key);
        match self.find(set, key) {
            Some(i) => {
                let len = self.lens[i] as usize;
                if len > out.len() {
                    self.stats.misses += 1;
                    return None;
                }
                let off = i * self.value_max;
                out[..len].copy_from_slice(&self.values[off..off + len]);
                self.referenced[i] = true;
                self.stats.hits += 1;
                Some(len)
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// Insert or replace. Returns false (and stores nothing) when the value
    /// is longer than `value_f32_max`.
    pub fn insert(&mut self, key: CacheKey, value: &[f32]) -> bool {
        if value.len() > self.value_max {
            self.stats.rejected_too_long += 1;
            return false;
        }
        let set = self.set_of(&key);
        let base = set * self.ways;
        let slot = match self.find(set, &key) {
            Some(i) => i,
            None => match (base..base + self.ways).find(|&i| self.lens[i] == EMPTY) {
                Some(i) => {
                    self.stats.occupancy += 1;
                    i
                }
                None => {
                    // CLOCK: at most two turns of the hand find a victim.
                    let mut hand = self.hands[set] as usize;
                    let victim = loop {
                        let i = base + hand;
                        hand = (hand + 1) % self.ways;
                        if self.referenced[i] {
                            self.referenced[i] = false;
                        } else {
                            break i;
                        }
                    };
                    self.hands[set] = hand as u8;
                    self.stats.evictions += 1;
                    victim
                }
            },
        };
        self.keys[slot] = key.0;
        self.lens[slot] = value.len() as u32;
        self.referenced[slot] = false;
        let off = slot * self.value_max;
        self.values[off..off + value.len()].copy_from_slice(value);
        self.stats.inserts += 1;
        true
    }

    /// Drop one entry; returns whether it was there.
    pub fn remove(&mut self, key: &CacheKey) -> bool {
        let set = self.set_of(key);
        match self.find(set, key) {
            Some(i) => {
                self.lens[i] = EMPTY;
                self.referenced[i] = false;
                self.stats.occupancy -= 1;
                true
            }
            None => false,
        }
    }

    /// Drop everything (e.g. after a model reload purges a target).
    pub fn clear(&mut self) {
        self.lens.fill(EMPTY);
        self.referenced.fill(false);
        self.stats.occupancy = 0;
    }

    /// Counters.
    pub fn stats(&self) -> L1Stats {
        self.stats
    }

    /// Largest value length accepted.
    pub fn value_f32_max(&self) -> usize {
        self.value_max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> CacheKey {
        // Spread like a real hash, but deterministic.
        CacheKey(xxhash_rust::xxh3::xxh3_128(&i.to_le_bytes()))
    }

    #[test]
    fn cache_l1_hit_miss_replace() {
        let mut c = L1Cache::new(L1Config {
            sets: 4,
            ways: 2,
            value_f32_max: 4,
        })
        .unwrap();
        let mut out = [0f32; 4];
        assert_eq!(c.get(&key(1), &mut out), None);
        assert!(c.insert(key(1), &[1.0, 2.0]));
        assert_eq!(c.get(&key(1), &mut out), Some(2));
        assert_eq!(&out[..2], &[1.0, 2.0]);
        assert!(c.insert(key(1), &[3.0, 4.0, 5.0]));
        assert_eq!(c.get(&key(1), &mut out), Some(3));
        assert_eq!(&out[..3], &[3.0, 4.0, 5.0]);
        assert!(!c.insert(key(2), &[0.0; 5]), "too long must be refused");
        let mut short = [0f32; 2];
        assert_eq!(c.get(&key(1), &mut short), None, "out too short is a miss");
        let s = c.stats();
        assert_eq!((s.hits, s.occupancy, s.rejected_too_long), (2, 1, 1));
        assert!(c.remove(&key(1)));
        assert_eq!(c.get(&key(1), &mut out), None);
    }

    #[test]
    fn cache_l1_eviction_keeps_referenced() {
        // One set, 4 ways: every key lands in the same set.
        let mut c = L1Cache::new(L1Config {
            sets: 1,
            ways: 4,
            value_f32_max: 1,
        })
        .unwrap();
        let mut out = [0f32; 1];
        for i in 0..4 {
            c.insert(key(i), &[i as f32]);
        }
        // Touch key 0: CLOCK must keep it over the untouched ones.
        assert_eq!(c.get(&key(0), &mut out), Some(1));
        for i in 4..7 {
            c.insert(key(i), &[i as f32]);
        }
        assert_eq!(
            c.get(&key(0), &mut out),
            Some(1),
            "referenced entry evicted"
        );
        assert_eq!(out[0], 0.0);
        let s = c.stats();
        assert_eq!(s.evictions, 3);
        assert_eq!(s.occupancy, 4);
        // Every stored value still matches its key.
        let mut live = 0;
        for i in 0..7 {
            if c.get(&key(i), &mut out).is_some() {
                assert_eq!(out[0], i as f32);
                live += 1;
            }
        }
        assert_eq!(live, 4);
    }
}
