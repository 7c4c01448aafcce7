//! L3: a prediction cache tier shared between nodes, on Redis or Valkey
//! (docs/CACHE.md, "L3"). Optional: `[cache.l3] url = "redis://HOST:PORT"`.
//!
//! One I/O thread per process talks to Redis with the `redis` crate's
//! synchronous client; shards never block on it. A shard sends a lookup
//! (`try_send` on a bounded channel: a full channel means "compute") and
//! polls its own bounded reply channel; it computes anyway once the lookup
//! budget is spent. The thread drains whatever lookups are queued and
//! sends them as one `MGET` (to a Redis Cluster: one pipeline of `GET`s,
//! grouped per master, `l3_conn.rs`), then writes the fills queued
//! meanwhile as one pipeline of `SET … EX`. Keys are the same 128-bit keys as L1/L2 (model
//! digests and versions, purge generation, input digest inside), so two
//! nodes share an answer only when they would compute the same one.
//!
//! A circuit breaker keeps a slow or absent Redis off the request path:
//! an error, or [`SLOW_BATCHES`] round trips in a row over the budget, opens
//! it (shards then skip L3 entirely); the thread probes with `PING` every
//! [`PROBE_EVERY`] (doubling, up to 32×, while it keeps reopening within
//! 10 s of closing) and closes it when Redis answers. Each transition is
//! logged once.
//!
//! Value layout (little endian): `b"BL3v"`, `n: u32`, `n × f32`,
//! `xxh3_64(key ‖ n ‖ floats): u64`. A value whose length or checksum does
//! not match is a miss (counted as corrupt), never an answer.

pub use super::l3_conn::L3Config;
use super::l3_conn::{Client, Con};
use super::CacheKey;
use crossbeam::channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Round trips over the budget in a row that open the breaker.
pub const SLOW_BATCHES: u32 = 3;
/// How often an open breaker probes Redis.
pub const PROBE_EVERY: Duration = Duration::from_millis(200);
/// Lookups or fills queued from all shards at once; beyond, shards compute.
const QUEUE_MAX: usize = 4096;
/// Replies waiting for one shard.
const REPLIES_MAX: usize = 4096;
/// Keys in one MGET.
const BATCH_MAX: usize = 512;
const MAGIC: &[u8; 4] = b"BL3v";

/// Breaker state (`beast_cache_l3_breaker_open`).
pub const CLOSED: u8 = 0;
pub const OPEN: u8 = 1;

/// Counters and breaker state, written by the I/O thread and shards,
/// read by the admin thread.
#[derive(Default)]
pub struct L3Stats {
    pub breaker: AtomicU8,
    pub lookups: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Lookups answered after their budget (the request computed).
    pub timeouts: AtomicU64,
    /// Lookups not sent: breaker open or queue full.
    pub skipped: AtomicU64,
    /// Lookups not sent because computing was predicted to be quicker.
    pub cheaper: AtomicU64,
    pub corrupt: AtomicU64,
    pub fills: AtomicU64,
    /// Lookup round trips: MGETs, or pipelines on a cluster (each carries
    /// the lookups queued at the time, at most 512).
    pub batches: AtomicU64,
    pub fills_dropped: AtomicU64,
    pub errors: AtomicU64,
    pub breaker_opens: AtomicU64,
    /// Why the breaker last opened (kept for /readyz; never on the request path).
    last_error: std::sync::Mutex<String>,
}

impl L3Stats {
    pub fn is_open(&self) -> bool {
        self.breaker.load(Ordering::Relaxed) == OPEN
    }
    /// The last error that opened the breaker (admin thread only).
    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }
}

/// A lookup reply for one shard: `token` is the shard's own, `key` lets it
/// drop a reply whose request already went on to compute.
pub struct Reply {
    pub token: u32,
    pub key: CacheKey,
    pub value: Option<Vec<u8>>,
}

enum Msg {
    Get {
        shard: u16,
        token: u32,
        key: CacheKey,
    },
    Put {
        key: CacheKey,
        value: Vec<u8>,
        ttl_s: u64,
    },
}

/// Per shard: the waker of its L3 task while it waits for replies (a
/// glommio waker may be woken from another thread). Locked once per wait
/// and once per reply batch, never per request.
type Wakers = Arc<Vec<std::sync::Mutex<Option<std::task::Waker>>>>;

/// The process's handle on the L3 thread.
pub struct L3 {
    tx: Sender<Msg>,
    wakers: Wakers,
    replies: std::sync::Mutex<Vec<Option<Receiver<Reply>>>>,
    pub stats: Arc<L3Stats>,
    pub cfg: L3Config,
}

impl L3 {
    /// Start the I/O thread. Never fails on an unreachable Redis: the
    /// breaker starts open and the thread keeps probing.
    pub fn start(cfg: L3Config) -> Result<Arc<L3>, String> {
        let client = Client::open(&cfg, io_timeout(cfg.lookup_budget))?;
        let (tx, rx) = bounded(QUEUE_MAX);
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..cfg.shards {
            let (s, r) = bounded(REPLIES_MAX);
            senders.push(s);
            receivers.push(Some(r));
        }
        let stats = Arc::new(L3Stats::default());
        stats.breaker.store(OPEN, Ordering::Relaxed);
        let wakers: Wakers = Arc::new((0..cfg.shards).map(|_| Default::default()).collect());
        let st = stats.clone();
        let c = cfg.clone();
        let w = wakers.clone();
        std::thread::Builder::new()
            .name("beast-l3".into())
            .spawn(move || io_loop(client, c, rx, senders, w, st))
            .map_err(|e| format!("cannot start the L3 thread: {e}"))?;
        Ok(Arc::new(L3 {
            tx,
            wakers,
            replies: std::sync::Mutex::new(receivers),
            stats,
            cfg,
        }))
    }

    /// Shard `shard`'s reply channel (taken once, at shard start).
    pub fn take_replies(&self, shard: usize) -> Option<Receiver<Reply>> {
        self.replies.lock().ok()?.get_mut(shard)?.take()
    }

    /// Wake `waker` when replies for `shard` are posted.
    pub fn register(&self, shard: usize, waker: &std::task::Waker) {
        if let Some(Ok(mut w)) = self.wakers.get(shard).map(|m| m.lock()) {
            match &*w {
                Some(old) if old.will_wake(waker) => {}
                _ => *w = Some(waker.clone()),
            }
        }
    }

    /// Queue a lookup; false when it was not sent (breaker open, queue
    /// full): the caller computes.
    pub fn lookup(&self, shard: usize, token: u32, key: CacheKey) -> bool {
        if self.stats.is_open() {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let m = Msg::Get {
            shard: shard as u16,
            token,
            key,
        };
        match self.tx.try_send(m) {
            Ok(()) => {
                self.stats.lookups.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Queue a fill (dropped when the breaker is open or the queue full).
    pub fn fill(&self, key: CacheKey, value: &[f32], ttl_s: u64) {
        if self.stats.is_open() {
            return;
        }
        let ttl_s = match (ttl_s, self.cfg.ttl_s) {
            (0, t) | (t, 0) => t,
            (a, b) => a.min(b),
        };
        let m = Msg::Put {
            key,
            value: encode(key, value),
            ttl_s,
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(m) {
            self.stats.fills_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn checksum(key: CacheKey, body: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&key.0.to_le_bytes());
    h.update(body);
    h.digest()
}

/// The stored form of `value` under `key`.
pub fn encode(key: CacheKey, value: &[f32]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + 4 * value.len());
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&(value.len() as u32).to_le_bytes());
    for x in value {
        v.extend_from_slice(&x.to_le_bytes());
    }
    let sum = checksum(key, &v[4..]);
    v.extend_from_slice(&sum.to_le_bytes());
    v
}

/// Decode a stored value into `out` (exactly `out.len()` floats); false
/// when it is not a value of that length under `key`.
pub fn decode(key: CacheKey, bytes: &[u8], out: &mut [f32]) -> bool {
    let n = out.len();
    if bytes.len() != 16 + 4 * n || &bytes[..4] != MAGIC {
        return false;
    }
    if u32::from_le_bytes(bytes[4..8].try_into().unwrap_or_default()) as usize != n {
        return false;
    }
    let body_end = 8 + 4 * n;
    let sum = u64::from_le_bytes(bytes[body_end..].try_into().unwrap_or_default());
    if checksum(key, &bytes[4..body_end]) != sum {
        return false;
    }
    for (o, c) in out.iter_mut().zip(bytes[8..body_end].chunks_exact(4)) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    true
}

/// Round-trip timeout: a stalled Redis must fail fast enough that the
/// breaker opens (lookups already fell back to compute at the budget).
fn io_timeout(lookup_budget: Duration) -> Duration {
    (lookup_budget * 20).clamp(Duration::from_millis(20), Duration::from_secs(1))
}

struct Io {
    client: Client,
    cfg: L3Config,
    con: Option<Con>,
    stats: Arc<L3Stats>,
    slow: u32,
    next_probe: Instant,
    /// The first probe's outcome was logged.
    announced: bool,
    /// When the breaker last closed, and how many times in a row it
    /// opened again soon after (the probe interval's doubling).
    closed_at: Option<Instant>,
    reopens: u32,
}

impl Io {
    fn open(&mut self, why: String) {
        self.con = None;
        self.slow = 0;
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        // A Redis that keeps failing soon after each close (slow, not
        // down) is probed less and less often: 0.2 s doubling up to 6.4 s.
        let flapping = self
            .closed_at
            .is_some_and(|t| t.elapsed() < Duration::from_secs(10));
        self.reopens = if flapping {
            (self.reopens + 1).min(5)
        } else {
            0
        };
        self.next_probe = Instant::now() + PROBE_EVERY * (1 << self.reopens);
        if self.stats.breaker.swap(OPEN, Ordering::Relaxed) != OPEN {
            self.stats.breaker_opens.fetch_add(1, Ordering::Relaxed);
            eprintln!(
                "beast: cache: L3 {} breaker open: {why}; computing instead",
                self.cfg.url
            );
        }
        if let Ok(mut e) = self.stats.last_error.lock() {
            *e = why;
        }
    }

    /// Connect and PING; closes the breaker on success.
    fn probe(&mut self) {
        self.next_probe = Instant::now() + PROBE_EVERY * (1 << self.reopens);
        match self.client.connect(io_timeout(self.cfg.lookup_budget)) {
            Ok(c) => {
                self.con = Some(c);
                self.slow = 0;
                self.announced = true;
                self.closed_at = Some(Instant::now());
                if self.stats.breaker.swap(CLOSED, Ordering::Relaxed) != CLOSED {
                    eprintln!(
                        "beast: cache: L3 {} breaker closed: reachable",
                        self.cfg.url
                    );
                }
            }
            Err(e) => {
                if !self.announced {
                    eprintln!(
                        "beast: cache: L3 {} breaker open: {e}; computing instead, probing every {} ms",
                        self.cfg.url,
                        PROBE_EVERY.as_millis()
                    );
                }
                self.announced = true;
                if let Ok(mut l) = self.stats.last_error.lock() {
                    *l = e.to_string();
                }
            }
        }
    }

    fn get_batch(
        &mut self,
        gets: &[(u16, u32, CacheKey)],
        replies: &[Sender<Reply>],
        wakers: &Wakers,
    ) {
        let Some(con) = self.con.as_mut() else {
            return;
        };
        let t0 = Instant::now();
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        match con.get_many(gets.iter().map(|g| g.2)) {
            Ok(values) => {
                let mut woken = [false; 64];
                for (&(shard, token, key), value) in gets.iter().zip(values) {
                    if let Some(s) = replies.get(shard as usize) {
                        let _ = s.try_send(Reply { token, key, value });
                        let i = shard as usize;
                        if i >= 64 || !std::mem::replace(&mut woken[i], true) {
                            wake(wakers, i);
                        }
                    }
                }
                self.note_time(t0.elapsed());
            }
            Err(e) => {
                // The batch's requests compute now rather than at their budget.
                for &(shard, token, key) in gets {
                    if let Some(s) = replies.get(shard as usize) {
                        let _ = s.try_send(Reply {
                            token,
                            key,
                            value: None,
                        });
                    }
                }
                for i in 0..replies.len() {
                    wake(wakers, i);
                }
                self.open(e.to_string())
            }
        }
    }

    fn put_batch(&mut self, puts: &mut Vec<(CacheKey, Vec<u8>, u64)>) {
        let Some(con) = self.con.as_mut() else {
            puts.clear();
            return;
        };
        let n = puts.len() as u64;
        let r = con.put_many(puts);
        puts.clear();
        match r {
            Ok(()) => {
                self.stats.fills.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => self.open(e.to_string()),
        }
    }

    fn note_time(&mut self, took: Duration) {
        if took > self.cfg.lookup_budget {
            self.slow += 1;
            if self.slow >= SLOW_BATCHES {
                let why = format!(
                    "{SLOW_BATCHES} round trips in a row over the {} us lookup budget (last {} us)",
                    self.cfg.lookup_budget.as_micros(),
                    took.as_micros()
                );
                self.open(why);
            }
        } else {
            self.slow = 0;
        }
    }
}

fn wake(wakers: &Wakers, shard: usize) {
    let w = wakers.get(shard).and_then(|m| m.lock().ok()?.take());
    if let Some(w) = w {
        w.wake();
    }
}

fn io_loop(
    client: Client,
    cfg: L3Config,
    rx: Receiver<Msg>,
    replies: Vec<Sender<Reply>>,
    wakers: Wakers,
    stats: Arc<L3Stats>,
) {
    let mut io = Io {
        client,
        cfg,
        con: None,
        stats,
        slow: 0,
        next_probe: Instant::now(),
        announced: false,
        closed_at: None,
        reopens: 0,
    };
    let mut gets = Vec::with_capacity(BATCH_MAX);
    let mut puts = Vec::with_capacity(BATCH_MAX);
    loop {
        if io.stats.is_open() && Instant::now() >= io.next_probe {
            io.probe();
        }
        let first = match rx.recv_timeout(PROBE_EVERY / 2) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Msg::Get { shard, token, key } => gets.push((shard, token, key)),
                Msg::Put { key, value, ttl_s } => puts.push((key, value, ttl_s)),
            }
            if gets.len() < BATCH_MAX && puts.len() < BATCH_MAX {
                next = rx.try_recv().ok();
            }
        }
        if io.stats.is_open() {
            // Sent before the breaker opened: the shards time them out.
            gets.clear();
            puts.clear();
            continue;
        }
        if !gets.is_empty() {
            io.get_batch(&gets, &replies, &wakers);
            gets.clear();
        }
        if !puts.is_empty() {
            io.put_batch(&mut puts);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_round_trips_and_a_damaged_one_is_refused() {
        let k = CacheKey(0x1234_5678_9abc_def0_1122_3344_5566_7788);
        let v = [1.5f32, -2.0, 3.25];
        let mut b = encode(k, &v);
        let mut out = [0f32; 3];
        assert!(decode(k, &b, &mut out));
        assert_eq!(out, v);
        assert!(!decode(CacheKey(k.0 ^ 1), &b, &mut out), "other key");
        assert!(!decode(k, &b, &mut [0f32; 2]), "other length");
        b[9] ^= 0x40;
        assert!(!decode(k, &b, &mut out), "flipped bit");
    }
}
