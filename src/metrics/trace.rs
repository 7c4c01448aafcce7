//! Sampled request traces: a bounded ring of fixed-size records per shard.
//!
//! Owns: the sampling decision (a per-shard xorshift compared with a
//! threshold fixed at start, so no syscall and no shared state), the ring
//! (fixed capacity, the oldest record is overwritten, one writer: its
//! shard), and turning records into Chrome trace-event JSON.
//!
//! With `trace_sample_rate = 0` the ring has no storage and the request
//! path pays one predictable branch on an immutable field.
//!
//! Every field is an atomic, and each record carries a sequence number
//! (odd while being written), so the admin thread can copy records out
//! while the shard writes (a seqlock without `unsafe`): a torn copy is
//! detected and skipped, never returned.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// The instant trace timestamps count from, shared by every shard so
/// their records line up on one time axis.
pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds from [`epoch`] to `t` (0 if `t` is earlier).
pub fn since_epoch_ns(t: Instant) -> u64 {
    t.saturating_duration_since(epoch())
        .as_nanos()
        .min(u64::MAX as u128) as u64
}

#[derive(Debug, Default)]
struct Slot {
    /// Even: stable; odd: being written; 0: never written.
    seq: AtomicU64,
    arrival_ns: AtomicU64,
    id: AtomicU64,
    /// total_us << 32 | queue_us
    total_queue: AtomicU64,
    /// compute_us << 32 | target << 8 | status
    compute_target_status: AtomicU64,
}

/// One sampled request, copied out of a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceRecord {
    /// When the frame was read, in ns since [`epoch`].
    pub arrival_ns: u64,
    pub id: u64,
    /// Index into the shard's target list.
    pub target: u16,
    /// Wire status (`Status as u8`).
    pub status: u8,
    /// Arrival → response encoded.
    pub total_us: u32,
    /// Arrival → batch start (ensembles: the slowest member's).
    pub queue_us: u32,
    /// Backend time (ensembles: summed over members).
    pub compute_us: u32,
}

/// One shard's sampler and ring.
#[derive(Debug)]
pub struct TraceRing {
    /// 0: off. Otherwise a request is kept when the next xorshift value is
    /// <= threshold (u64::MAX keeps every request).
    threshold: u64,
    rng: AtomicU64,
    head: AtomicU64,
    slots: Box<[Slot]>,
}

impl Default for TraceRing {
    fn default() -> Self {
        TraceRing::new(0.0, 0, 0)
    }
}

impl TraceRing {
    /// `rate` in 0..=1; `capacity` records (no storage when `rate` is 0).
    pub fn new(rate: f64, capacity: usize, seed: u64) -> TraceRing {
        let threshold = if rate.is_nan() || rate <= 0.0 || capacity == 0 {
            0
        } else if rate >= 1.0 {
            u64::MAX
        } else {
            ((rate * u64::MAX as f64) as u64).max(1)
        };
        let cap = if threshold == 0 { 0 } else { capacity };
        TraceRing {
            threshold,
            // xorshift must not start at 0.
            rng: AtomicU64::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
            head: AtomicU64::new(0),
            slots: (0..cap).map(|_| Slot::default()).collect(),
        }
    }

    #[inline]
    pub fn enabled(&self) -> bool {
        self.threshold != 0
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Records written so far (including overwritten ones).
    pub fn written(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// Decide whether to keep this request and keep it. Call only when
    /// [`enabled`](Self::enabled), from the owning shard.
    #[inline(never)]
    pub fn sample(&self, r: &TraceRecord) {
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        if x <= self.threshold {
            self.push(r);
        }
    }

    fn push(&self, r: &TraceRecord) {
        let n = self.head.load(Ordering::Relaxed);
        let Some(s) = self
            .slots
            .get((n % self.slots.len().max(1) as u64) as usize)
        else {
            return;
        };
        let seq = s.seq.load(Ordering::Relaxed);
        s.seq.store(seq.wrapping_add(1) | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        s.arrival_ns.store(r.arrival_ns, Ordering::Relaxed);
        s.id.store(r.id, Ordering::Relaxed);
        s.total_queue.store(
            (r.total_us as u64) << 32 | r.queue_us as u64,
            Ordering::Relaxed,
        );
        s.compute_target_status.store(
            (r.compute_us as u64) << 32 | (r.target as u64) << 8 | r.status as u64,
            Ordering::Relaxed,
        );
        s.seq.store((seq | 1).wrapping_add(1), Ordering::Release);
        self.head.store(n + 1, Ordering::Release);
    }

    /// Copy out every stable record (any order). Safe to call from any
    /// thread while the shard writes.
    pub fn read(&self, out: &mut Vec<TraceRecord>) {
        for s in self.slots.iter() {
            let s1 = s.seq.load(Ordering::Acquire);
            if s1 == 0 || s1 & 1 == 1 {
                continue;
            }
            let arrival_ns = s.arrival_ns.load(Ordering::Relaxed);
            let id = s.id.load(Ordering::Relaxed);
            let tq = s.total_queue.load(Ordering::Relaxed);
            let cts = s.compute_target_status.load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            if s.seq.load(Ordering::Relaxed) != s1 {
                continue;
            }
            out.push(TraceRecord {
                arrival_ns,
                id,
                target: (cts >> 8) as u16,
                status: cts as u8,
                total_us: (tq >> 32) as u32,
                queue_us: tq as u32,
                compute_us: (cts >> 32) as u32,
            });
        }
    }
}

/// Chrome trace-event JSON (opens in Perfetto and chrome://tracing).
///
/// `records` are (core, record). Each request becomes a `request` slice
/// with `queue`, `compute` and `respond` slices nested in it (only
/// `request` for errors). Requests overlap on a core (many are in flight
/// at once) and trace viewers want slices on one thread to nest, so each
/// core's requests are packed into lanes: `tid = core * 1000 + lane`,
/// named "core N" / "core N lane K".
pub fn chrome_trace(
    records: &mut [(usize, TraceRecord)],
    target_name: &dyn Fn(u16) -> String,
    status_name: &dyn Fn(u8) -> &'static str,
) -> serde_json::Value {
    use serde_json::json;
    records.sort_by_key(|(core, r)| (*core, r.arrival_ns));
    let mut events = Vec::new();
    let mut lanes: Vec<u64> = Vec::new(); // end time (ns) of the last slice in each lane
    let mut current_core = usize::MAX;
    let mut named: std::collections::BTreeSet<u64> = Default::default();
    for (core, r) in records.iter() {
        if *core != current_core {
            current_core = *core;
            lanes.clear();
        }
        let end = r.arrival_ns + r.total_us as u64 * 1000;
        let lane = match lanes.iter().position(|&e| e <= r.arrival_ns) {
            Some(l) => l,
            None => {
                lanes.push(0);
                lanes.len() - 1
            }
        };
        lanes[lane] = end;
        let tid = (*core as u64) * 1000 + lane.min(999) as u64;
        if named.insert(tid) {
            let name = if lane == 0 {
                format!("core {core}")
            } else {
                format!("core {core} lane {lane}")
            };
            events.push(json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}}));
        }
        let ts = r.arrival_ns as f64 / 1000.0;
        let target = target_name(r.target);
        let status = status_name(r.status);
        let args = json!({"target": target, "id": r.id, "status": status});
        events.push(json!({"name": "request", "ph": "X", "ts": ts, "dur": r.total_us, "pid": 1, "tid": tid, "args": args}));
        if r.status == 0 {
            // Nest inside `request`: clamp each stage to what is left of it
            // (an ensemble's compute is summed over members and may exceed it).
            let total = r.total_us;
            let queue = r.queue_us.min(total);
            let compute = r.compute_us.min(total - queue);
            let respond = total - queue - compute;
            let stages = [
                ("queue", 0, queue),
                ("compute", queue, compute),
                ("respond", queue + compute, respond),
            ];
            for (name, off, dur) in stages {
                events.push(json!({"name": name, "ph": "X", "ts": ts + off as f64, "dur": dur, "pid": 1, "tid": tid, "args": args}));
            }
        }
    }
    json!({"traceEvents": events, "displayTimeUnit": "ms"})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: u64) -> TraceRecord {
        TraceRecord {
            arrival_ns: 1000 * i,
            id: i,
            target: 3,
            status: 0,
            total_us: 50,
            queue_us: 20,
            compute_us: 10,
        }
    }

    #[test]
    fn off_has_no_storage() {
        let r = TraceRing::new(0.0, 1024, 1);
        assert!(!r.enabled());
        assert_eq!(r.capacity(), 0);
    }

    #[test]
    fn ring_overwrites_oldest() {
        let r = TraceRing::new(1.0, 4, 1);
        for i in 1..=10 {
            r.sample(&rec(i));
        }
        let mut out = Vec::new();
        r.read(&mut out);
        let mut ids: Vec<u64> = out.iter().map(|x| x.id).collect();
        ids.sort();
        assert_eq!(ids, vec![7, 8, 9, 10]);
        assert_eq!(out[0], rec(out[0].id));
        assert_eq!(r.written(), 10);
    }

    #[test]
    fn rate_is_roughly_honoured() {
        let r = TraceRing::new(0.1, 100_000, 7);
        for i in 0..20_000 {
            r.sample(&rec(i));
        }
        let n = r.written();
        assert!((1_500..2_500).contains(&n), "{n}");
    }

    #[test]
    fn chrome_json_nests() {
        let mut v = vec![(0, rec(1)), (0, rec(2))];
        let j = chrome_trace(&mut v, &|_| "a".into(), &|_| "ok");
        let ev = j["traceEvents"].as_array().unwrap();
        let names: Vec<&str> = ev.iter().map(|e| e["name"].as_str().unwrap()).collect();
        for n in ["request", "queue", "compute", "respond"] {
            assert!(names.contains(&n), "{names:?}");
        }
        // The two requests overlap, so they land in two lanes.
        assert!(ev.iter().any(|e| e["tid"] == 1));
    }
}
