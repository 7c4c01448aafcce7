//! L2: the cache shared by every core — one fixed-size file mapped (shared,
//! read-write) into the process. The file IS the cache: it survives a
//! restart, so a restarted server starts warm.
//!
//! # Layout
//!
//! ```text
//! [ header: 4096 bytes ][ bucket 0: W slots ][ bucket 1 ] ... [ bucket B-1 ]
//! header: magic "BEASTL2\0" | format u32 | slot_size u32 | value_f32_max u32
//!         | ways u32 | bucket_count u64 | created_unix u64 | file_bytes u64
//!         | xxh3-64 of the 48 bytes before it
//! slot (slot_size = round_up(64 + 4·value_f32_max, 64) bytes, 64-aligned):
//!   0 seq u64 (seqlock: odd = being written)   8 key lo   16 key hi
//!  24 target tag u64   32 expires_at (unix s, 0 = never)
//!  40 len u32 | flags u32 (bit 0: occupied)    48 checksum u64
//!  56 meta u64 (eviction bits; readers bump it; outside seq and checksum)
//!  64 value: len f32s
//! ```
//!
//! # Concurrency (seqlock per slot)
//!
//! Every access to the mapped slots goes through `AtomicU64`/`AtomicU32`
//! (relaxed for the payload), so concurrent readers and writers are never a
//! data race in the Rust memory model; the seqlock only decides whether
//! what a reader copied is one consistent version.
//!
//! - Writer: `compare_exchange(seq, s → s+1, Acquire)` with `s` even claims
//!   the slot (a failed CAS means another writer has it: pick another slot
//!   or drop the insert — writers never wait); `fence(Release)`; relaxed
//!   payload stores; `seq.store(s+2, Release)`.
//! - Reader: `s1 = seq.load(Acquire)` (odd → retry); relaxed payload loads
//!   into the caller's buffer; `fence(Acquire)`; `s2 = seq.load(Relaxed)`;
//!   `s1 != s2` → retry (bounded, then a miss). Then the checksum must match
//!   (xxh3-64 over key, tag, expiry, len/flags and the value); a mismatch is
//!   counted and served as a miss, never as a value.
//!
//! # Crashes
//!
//! A writer killed mid-write leaves its slot odd; [`L2Cache::open`] clears
//! such slots (and any whose checksum fails) before serving. The file is
//! locked with `flock(LOCK_EX)` while open, so one process owns it; `open`
//! takes the lock before it reads, sizes or moves the file, so a second
//! opener can never truncate the owner's mapping.
//!
//! # Disk space
//!
//! Every block of the file is reserved (`posix_fallocate`) at create and
//! again at open, before the mapping is touched: a store (or, on tmpfs, a
//! load) into an unbacked page of a full disk would kill the process with
//! SIGBUS. Where the disk cannot hold the file, `open` fails with the
//! reason and the caller runs without L2.
//!
//! # Eviction
//!
//! Per bucket, frequency with aging (a per-slot saturating counter in
//! `meta`, bumped by readers with relaxed atomics): the victim is the slot
//! with the lowest counter (newcomers start at 0, so a one-hit wonder goes
//! first); when even the victim was warm, the whole bucket is aged by the
//! victim's count (a GCLOCK sweep in one step). See docs/CACHE.md for the
//! measurement against an exact LRU.
//!
//! # Files
//!
//! - [`layout`]: the on-disk format — constants, [`L2Config`], [`Geometry`],
//!   the header;
//! - `slots`: the seqlocked slot words (atomic access, checksum, claim);
//! - this file: [`L2Cache`] and the request path (`get`, `insert`, `remove`,
//!   purges, stats);
//! - `file`: the file's lifecycle (open, lock, reserve, move aside, repair
//!   scan, flush);
//! - `inspect`: [`inspect`], a read-only report on a file.

mod file;
mod inspect;
pub mod layout;
mod slots;
#[cfg(test)]
mod tests;

pub use inspect::inspect;
pub use layout::{
    decode_header, unix_now, Geometry, Header, L2Config, OpenReport, FORMAT_VERSION, HEADER_BYTES,
    MAGIC,
};

use super::key::CacheKey;
use super::metrics::{bump, L2Counters, L2Stats};
use layout::{
    FLAG_OCCUPIED, FREQ_MAX, READ_RETRIES, W_CHECKSUM, W_EXPIRES, W_KEY_HI, W_KEY_LO, W_LEN_FLAGS,
    W_META, W_SEQ, W_TAG,
};
use memmap2::MmapMut;
use slots::{checksum, Slots};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};

/// The shared, persistent L2 cache. `Send + Sync`: share one `Arc<L2Cache>`.
pub struct L2Cache {
    slots: Slots,
    counters: L2Counters,
    path: PathBuf,
    // Keeps the mapping (and the flock on the file) alive; all access to
    // the slot area goes through `slots.base`.
    mmap: MmapMut,
    _file: File,
}

// SAFETY: `slots.base` points into `mmap`, which is owned by the same struct
// and never remapped; after `open` returns, every access to the mapped bytes
// is an atomic load/store/CAS, so sharing across threads is data-race free.
unsafe impl Send for L2Cache {}
// SAFETY: as above: `&L2Cache` only gives atomic access to the mapping.
unsafe impl Sync for L2Cache {}

impl L2Cache {
    /// Geometry in use.
    pub fn geometry(&self) -> Geometry {
        self.slots.geo
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    #[inline]
    fn bucket_of(&self, key: &CacheKey) -> u64 {
        // Multiply-shift: any bucket count, no modulo. Uses the high half so
        // it is independent of the bits L1 sets use.
        ((key.hi() as u128 * self.slots.geo.bucket_count as u128) >> 64) as u64
    }

    /// Look `key` up; on a hit copy the value into `out` and return its
    /// length. Entries with a TTL are checked against the wall clock.
    #[inline]
    pub fn get(&self, key: &CacheKey, out: &mut [f32]) -> Option<usize> {
        self.get_at(key, out, None)
    }

    /// As [`get`](Self::get), with `now` (unix seconds) given by the caller
    /// (a coarse per-shard clock); `None` reads the clock only when the
    /// entry has a TTL.
    pub fn get_at(&self, key: &CacheKey, out: &mut [f32], now: Option<u64>) -> Option<usize> {
        let s = self.slots;
        let ways = s.geo.ways as u64;
        let first = self.bucket_of(key) * ways;
        let (want_lo, want_hi) = (key.lo(), key.hi());
        for idx in first..first + ways {
            let slot = s.slot_ptr(idx);
            let seq = s.word(slot, W_SEQ);
            let mut attempt = 0;
            loop {
                let s1 = seq.load(Ordering::Acquire);
                if s1 & 1 == 1 {
                    attempt += 1;
                    bump(&self.counters.torn_read_retries);
                    if attempt >= READ_RETRIES {
                        bump(&self.counters.torn_read_misses);
                        break;
                    }
                    std::hint::spin_loop();
                    continue;
                }
                // A different key (even if torn) is simply not this slot.
                if s.word(slot, W_KEY_LO).load(Ordering::Relaxed) != want_lo
                    || s.word(slot, W_KEY_HI).load(Ordering::Relaxed) != want_hi
                {
                    break;
                }
                let lf = s.word(slot, W_LEN_FLAGS).load(Ordering::Relaxed);
                let len = lf as u32 as usize;
                if (lf >> 32) as u32 & FLAG_OCCUPIED == 0
                    || len > out.len()
                    || len > s.geo.value_f32_max as usize
                {
                    // Not live here, or too long for `out`, or corrupt: a miss
                    // either way (a corrupt length is caught by the scans).
                    break;
                }
                let tag = s.word(slot, W_TAG).load(Ordering::Relaxed);
                let expires = s.word(slot, W_EXPIRES).load(Ordering::Relaxed);
                let ck = s.word(slot, W_CHECKSUM).load(Ordering::Relaxed);
                for (i, v) in out[..len].iter_mut().enumerate() {
                    *v = f32::from_bits(s.value_word(slot, i).load(Ordering::Relaxed));
                }
                fence(Ordering::Acquire);
                if seq.load(Ordering::Relaxed) != s1 {
                    attempt += 1;
                    bump(&self.counters.torn_read_retries);
                    if attempt >= READ_RETRIES {
                        bump(&self.counters.torn_read_misses);
                        break;
                    }
                    continue;
                }
                if checksum(want_lo, want_hi, tag, expires, lf, &out[..len]) != ck {
                    bump(&self.counters.checksum_failures);
                    break;
                }
                if expires != 0 && expires <= now.unwrap_or_else(unix_now) {
                    bump(&self.counters.expired);
                    break;
                }
                // Frequency bit: racy on purpose (a lost bump only costs
                // eviction precision), relaxed, outside the seqlock.
                let meta = s.word(slot, W_META);
                let m = meta.load(Ordering::Relaxed);
                if m < FREQ_MAX {
                    meta.store(m + 1, Ordering::Relaxed);
                }
                bump(&self.counters.hits);
                return Some(len);
            }
        }
        bump(&self.counters.misses);
        None
    }

    /// Insert or replace the value of `key` for target `tag`
    /// (see [`crate::cache::target_tag`]), expiring at `expires_at`
    /// (unix seconds, 0 = never). Returns false when the value is too long
    /// or every candidate slot was being written by another core (the
    /// insert is dropped rather than waited for).
    pub fn insert(&self, key: &CacheKey, tag: u64, value: &[f32], expires_at: u64) -> bool {
        let s = self.slots;
        if value.len() > s.geo.value_f32_max as usize {
            return false;
        }
        let ways = s.geo.ways as u64;
        let first = self.bucket_of(key) * ways;
        let (lo, hi) = (key.lo(), key.hi());
        for _round in 0..2 {
            // Choose: same key, else a free or expired slot, else the victim
            // with the lowest frequency (start at a key-dependent way so ties
            // spread). Peeks are racy; the claim below settles races.
            let mut same = None;
            let mut free = None;
            let mut victim = None;
            let mut victim_freq = u64::MAX;
            let start = lo % ways;
            let mut now = None;
            for j in 0..ways {
                let idx = first + (start + j) % ways;
                let slot = s.slot_ptr(idx);
                let lf = s.word(slot, W_LEN_FLAGS).load(Ordering::Relaxed);
                let occupied = (lf >> 32) as u32 & FLAG_OCCUPIED != 0;
                if occupied
                    && s.word(slot, W_KEY_LO).load(Ordering::Relaxed) == lo
                    && s.word(slot, W_KEY_HI).load(Ordering::Relaxed) == hi
                {
                    same = Some(idx);
                    break;
                }
                let expired = occupied && {
                    let e = s.word(slot, W_EXPIRES).load(Ordering::Relaxed);
                    e != 0 && e <= *now.get_or_insert_with(unix_now)
                };
                if !occupied || expired {
                    if free.is_none() {
                        free = Some(idx);
                    }
                    continue;
                }
                let f = s.word(slot, W_META).load(Ordering::Relaxed);
                if f < victim_freq {
                    victim_freq = f;
                    victim = Some(idx);
                }
            }
            let (idx, evicting) = match (same, free, victim) {
                (Some(i), _, _) => (i, false),
                (None, Some(i), _) => (i, false),
                (None, None, Some(i)) => (i, true),
                (None, None, None) => continue,
            };
            let slot = s.slot_ptr(idx);
            let Some(v) = s.claim(slot) else { continue };
            if evicting {
                bump(&self.counters.evictions);
                // Age the bucket only when no slot was cold: every slot
                // loses what the victim had (a GCLOCK sweep in one step), so
                // favourites keep their lead and stale ones drift down.
                if victim_freq > 0 {
                    for j in first..first + ways {
                        let m = s.word(s.slot_ptr(j), W_META);
                        let f = m.load(Ordering::Relaxed);
                        m.store(f.saturating_sub(victim_freq), Ordering::Relaxed);
                    }
                }
            }
            // Under the claim the slot's state is settled: count a fill.
            let was = s.word(slot, W_LEN_FLAGS).load(Ordering::Relaxed);
            if (was >> 32) as u32 & FLAG_OCCUPIED == 0 {
                bump(&self.counters.occupancy);
            }
            let lf = ((FLAG_OCCUPIED as u64) << 32) | value.len() as u64;
            s.word(slot, W_KEY_LO).store(lo, Ordering::Relaxed);
            s.word(slot, W_KEY_HI).store(hi, Ordering::Relaxed);
            s.word(slot, W_TAG).store(tag, Ordering::Relaxed);
            s.word(slot, W_EXPIRES).store(expires_at, Ordering::Relaxed);
            s.word(slot, W_LEN_FLAGS).store(lf, Ordering::Relaxed);
            for (i, x) in value.iter().enumerate() {
                s.value_word(slot, i).store(x.to_bits(), Ordering::Relaxed);
            }
            s.word(slot, W_CHECKSUM).store(
                checksum(lo, hi, tag, expires_at, lf, value),
                Ordering::Relaxed,
            );
            if same.is_none() {
                // A newcomer starts cold: it must earn a hit to outlive the
                // next eviction in its bucket (keeps one-hit wonders out).
                s.word(slot, W_META).store(0, Ordering::Relaxed);
            }
            s.release(slot, v);
            bump(&self.counters.inserts);
            return true;
        }
        bump(&self.counters.insert_contended);
        false
    }

    /// Remove `key`; returns whether an entry was removed.
    pub fn remove(&self, key: &CacheKey) -> bool {
        let s = self.slots;
        let ways = s.geo.ways as u64;
        let first = self.bucket_of(key) * ways;
        let mut removed = false;
        for idx in first..first + ways {
            let slot = s.slot_ptr(idx);
            if s.word(slot, W_KEY_LO).load(Ordering::Relaxed) != key.lo()
                || s.word(slot, W_KEY_HI).load(Ordering::Relaxed) != key.hi()
            {
                continue;
            }
            if let Some(v) = self.claim_spin(slot) {
                // Re-check under the claim: the slot may have changed.
                if s.word(slot, W_KEY_LO).load(Ordering::Relaxed) == key.lo()
                    && s.word(slot, W_KEY_HI).load(Ordering::Relaxed) == key.hi()
                    && (s.word(slot, W_LEN_FLAGS).load(Ordering::Relaxed) >> 32) as u32
                        & FLAG_OCCUPIED
                        != 0
                {
                    s.clear_claimed(slot);
                    self.counters.occupancy.fetch_sub(1, Ordering::Relaxed);
                    removed = true;
                }
                s.release(slot, v);
            }
        }
        removed
    }

    // Maintenance paths (remove, purge) may wait a little for a writer.
    fn claim_spin(&self, slot: *mut u8) -> Option<u64> {
        for _ in 0..1000 {
            if let Some(v) = self.slots.claim(slot) {
                return Some(v);
            }
            std::hint::spin_loop();
        }
        None
    }

    /// Remove every entry stored with target tag `tag` (e.g. after the
    /// target's models change). O(slots). Returns how many were removed.
    pub fn purge_target(&self, tag: u64) -> u64 {
        self.purge_where(|t| t == tag)
    }

    /// Remove every entry whose target tag satisfies `pred`. O(slots).
    pub fn purge_where(&self, pred: impl Fn(u64) -> bool) -> u64 {
        let s = self.slots;
        let mut n = 0;
        for idx in 0..s.geo.slots() {
            let slot = s.slot_ptr(idx);
            let live = |s: &Slots| {
                (s.word(slot, W_LEN_FLAGS).load(Ordering::Relaxed) >> 32) as u32 & FLAG_OCCUPIED
                    != 0
                    && pred(s.word(slot, W_TAG).load(Ordering::Relaxed))
            };
            if !live(&s) {
                continue;
            }
            if let Some(v) = self.claim_spin(slot) {
                if live(&s) {
                    s.clear_claimed(slot);
                    n += 1;
                }
                s.release(slot, v);
            }
        }
        self.counters.purged.fetch_add(n, Ordering::Relaxed);
        self.counters.occupancy.fetch_sub(n, Ordering::Relaxed);
        n
    }

    /// Counters and occupancy: O(1), whatever the file size (occupancy is
    /// a counter kept by every path that fills or empties a slot).
    pub fn stats(&self) -> L2Stats {
        self.counters.snapshot(self.slots.geo.slots())
    }
}
