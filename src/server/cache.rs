//! The prediction cache as the request path uses it: one `ShardCache` per
//! shard (its L1 table, its coalescer, a value buffer) over the server-wide
//! `CacheShared` (the L2 file and the per-target purge generations).
//!
//! Order on the request path: key → L1 → L2 (a hit fills L1) → coalesce
//! (the first miss computes, identical later misses wait for it) → compute
//! → insert into L2 and L1 → answer the waiters.

use super::conn_state::Conn;
use crate::cache::l3::{L3Config, L3};
use crate::cache::{
    input_digest, target_tag, unix_now, Begin, CacheKey, CoalesceConfig, Coalescer, KeyBuilder,
    L1Cache, L1Config, L2Cache, L2Config,
};
use crate::config::Config;
use crate::metrics::ShardMetrics;
use crate::wire::{CacheControl, DType, RequestView};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Server-wide cache state: shared by every shard and the admin port.
pub struct CacheShared {
    pub l2: Option<Arc<L2Cache>>,
    /// The configured L2 file ("" = no L2 wanted).
    pub l2_path: std::path::PathBuf,
    /// Why the configured L2 file is not in use (the server runs with L1
    /// only); `None` when it is in use or none is configured.
    pub l2_disabled: Option<String>,
    /// The shared Redis/Valkey tier, when `[cache.l3]` is set.
    pub l3: Option<Arc<L3>>,
    /// Target name → purge generation (part of every key of the target).
    generations: BTreeMap<String, usize>,
    counters: Vec<AtomicU64>,
}

impl CacheShared {
    /// Open the L2 file (if configured) and index the targets. An L2 that
    /// cannot be opened (unwritable path, a full disk, held by another
    /// server) is logged and left out, with its reason kept for /readyz,
    /// /metrics and /v1/stats: the server still runs with its L1 tables.
    pub fn open(cfg: &Config, targets: impl Iterator<Item = String>) -> CacheShared {
        let mut l2 = None;
        let mut l2_disabled = None;
        let wanted = cfg.cache.enabled && !cfg.cache.l2_path.as_os_str().is_empty();
        if wanted {
            let l2cfg = L2Config {
                total_bytes: cfg.cache.l2_bytes,
                ways: 8,
                value_f32_max: cfg.cache.value_f32_max as u32,
            };
            match L2Cache::open(&cfg.cache.l2_path, l2cfg) {
                Ok((c, report)) => {
                    eprintln!(
                        "beast: cache: L2 {} ({} MiB): {}{} entries",
                        absolute(&cfg.cache.l2_path).display(),
                        cfg.cache.l2_bytes >> 20,
                        if report.created {
                            "created, "
                        } else {
                            "reopened, "
                        },
                        report.entries
                    );
                    l2 = Some(Arc::new(c));
                }
                Err(e) => {
                    let why = e.strip_prefix("beast: ").unwrap_or(&e).to_string();
                    // The absolute path: two servers started in one folder
                    // share the default relative one.
                    let rel = format!("L2 file {} ", cfg.cache.l2_path.display());
                    eprintln!(
                        "beast: cache: cannot use the L2 file {}: {}; running with L1 only \
                         (each server needs its own cache.l2_path)",
                        absolute(&cfg.cache.l2_path).display(),
                        match why.strip_prefix(&rel) {
                            Some(rest) => format!("it {rest}"),
                            None => why.clone(),
                        }
                    );
                    l2_disabled = Some(why);
                }
            }
        }
        let generations: BTreeMap<String, usize> =
            targets.enumerate().map(|(i, t)| (t, i)).collect();
        let l3 = match &cfg.cache.l3 {
            Some(l3) if cfg.cache.enabled => {
                let c = L3Config {
                    url: if l3.cluster_seeds.is_empty() {
                        l3.url.clone()
                    } else {
                        l3.cluster_seeds.join(",")
                    },
                    cluster_seeds: l3.cluster_seeds.clone(),
                    ttl_s: l3.ttl_s,
                    lookup_budget: std::time::Duration::from_micros(l3.lookup_budget_us),
                    shards: cfg.shard_cpus().len(),
                    always: l3.lookup == crate::config::L3Lookup::Always,
                };
                match L3::start(c) {
                    Ok(l3) => {
                        eprintln!(
                            "beast: cache: L3 {} (lookup budget {} us, ttl {} s)",
                            l3.cfg.url,
                            l3.cfg.lookup_budget.as_micros(),
                            l3.cfg.ttl_s
                        );
                        Some(l3)
                    }
                    Err(e) => {
                        eprintln!("beast: cache: L3 not used: {e}");
                        None
                    }
                }
            }
            _ => None,
        };
        CacheShared {
            l3,
            l2,
            l2_path: if wanted {
                cfg.cache.l2_path.clone()
            } else {
                Default::default()
            },
            l2_disabled,
            counters: (0..generations.len()).map(|_| AtomicU64::new(0)).collect(),
            generations,
        }
    }

    /// Why the server is not ready as far as the cache goes: the L2 file
    /// was configured but is not in use.
    pub fn not_ready_reason(&self) -> Option<String> {
        self.l2_disabled
            .as_ref()
            .map(|why| format!("l2 cache disabled: {why}"))
    }

    /// The L3 tier's state for /readyz and /v1/stats (`None` without one).
    /// An open breaker does not make the server unready: it computes.
    pub fn l3_status(&self) -> Option<String> {
        let l3 = self.l3.as_ref()?;
        Some(if l3.stats.is_open() {
            format!(
                "l3 {}: breaker open ({}); computing instead",
                l3.cfg.url,
                l3.stats.last_error()
            )
        } else {
            format!("l3 {}: breaker closed", l3.cfg.url)
        })
    }

    /// The L2 file's state for /v1/stats (`None` when no L2 is configured).
    pub fn l2_status(&self) -> Option<serde_json::Value> {
        if self.l2_path.as_os_str().is_empty() {
            return None;
        }
        Some(serde_json::json!({
            "path": self.l2_path.display().to_string(),
            "enabled": self.l2.is_some(),
            "reason": self.l2_disabled,
        }))
    }

    /// Drop every cached answer of `target` on every core: its generation
    /// moves on (older L1 entries become unreachable) and its L2 slots are
    /// cleared. Returns the L2 entries removed.
    pub fn purge(&self, target: &str) -> Result<u64, String> {
        let &g = self
            .generations
            .get(target)
            .ok_or_else(|| format!("unknown target '{target}'"))?;
        self.counters[g].fetch_add(1, Ordering::SeqCst);
        Ok(self
            .l2
            .as_ref()
            .map_or(0, |l2| l2.purge_target(target_tag(target))))
    }

    fn generation(&self, index: usize) -> u64 {
        self.counters
            .get(index)
            .map_or(0, |g| g.load(Ordering::Relaxed))
    }

    /// Write the L2 file back to disk (clean shutdown).
    pub fn flush(&self) {
        if let Some(l2) = &self.l2 {
            if let Err(e) = l2.flush() {
                eprintln!("beast: cache: L2 flush: {e}");
            }
        }
    }
}

/// How one target is cached, resolved once per shard.
#[derive(Clone, Copy)]
pub(crate) struct TargetPolicy {
    pub enabled: bool,
    pub ttl_s: u64,
    pub tag: u64,
    /// Index of the target's purge generation in `CacheShared`.
    generation: usize,
}

impl Default for TargetPolicy {
    fn default() -> Self {
        Self::disabled()
    }
}

impl TargetPolicy {
    pub fn disabled() -> Self {
        TargetPolicy {
            enabled: false,
            ttl_s: 0,
            tag: 0,
            generation: usize::MAX,
        }
    }
}

/// A request waiting for an identical one in flight.
pub(crate) struct Waiter {
    pub conn: Rc<Conn>,
    pub id: u64,
    pub arrival: Instant,
    pub deadline: Option<Instant>,
}

/// What `join` decided for a miss.
pub(crate) enum Joined {
    /// Queued behind an identical request: nothing more to do now.
    Waiting,
    /// First of its kind: compute, then release the waiters.
    Leader,
    /// Coalescing is full: compute without it.
    Alone,
}

pub(crate) struct ShardCache {
    enabled: bool,
    shared: Arc<CacheShared>,
    l1: RefCell<L1Cache>,
    pub coalescer: RefCell<Coalescer<Waiter>>,
    value_max: usize,
    /// A value read from L1/L2 lands here (value_max f32s).
    pub buf: RefCell<Vec<f32>>,
    /// The current request's input digest (address and length of the input
    /// it was taken from), so an ensemble and its members hash the input
    /// once; cleared by `begin_request`.
    digest: Cell<Option<(usize, usize, u128)>>,
}

impl ShardCache {
    pub fn new(cfg: &Config, shared: Arc<CacheShared>) -> Result<ShardCache, String> {
        let c = &cfg.cache;
        let l1 = L1Cache::new(L1Config {
            sets: (c.l1_entries / c.l1_ways).max(1),
            ways: c.l1_ways,
            value_f32_max: c.value_f32_max,
        })?;
        let coalescer = Coalescer::new(CoalesceConfig {
            keys_max: c.coalesce_keys_max,
            waiters_per_key_max: c.coalesce_waiters_per_key_max,
            waiters_total_max: cfg.coalesce_waiters_max(),
        })?;
        Ok(ShardCache {
            enabled: c.enabled,
            shared,
            l1: RefCell::new(l1),
            coalescer: RefCell::new(coalescer),
            value_max: c.value_f32_max,
            buf: RefCell::new(vec![0.0; c.value_f32_max]),
            digest: Cell::new(None),
        })
    }

    /// The policy of `target` from the config's per-target overrides.
    pub fn policy(&self, cfg: &Config, target: &str) -> TargetPolicy {
        let o = cfg.cache.targets.get(target).copied().unwrap_or_default();
        let enabled = self.enabled && o.enabled.unwrap_or(true);
        match self.shared.generations.get(target) {
            Some(&g) if enabled => TargetPolicy {
                enabled,
                ttl_s: o.ttl_s,
                tag: target_tag(target),
                generation: g,
            },
            _ => TargetPolicy::disabled(),
        }
    }

    /// The key of this request's input for `target` (the model or ensemble
    /// whose answer is cached: for ensemble members, the member) under
    /// `policy`, or `None` when the answer
    /// is not to be cached (disabled, bypass, or larger than a slot).
    /// `models` adds the exact models (and versions) behind the answer.
    pub fn key(
        &self,
        target: &str,
        policy: TargetPolicy,
        req: &RequestView<'_>,
        out_len: usize,
        models: impl FnOnce(KeyBuilder) -> KeyBuilder,
    ) -> Option<CacheKey> {
        if !policy.enabled || req.cache == CacheControl::Bypass || out_len > self.value_max {
            return None;
        }
        let dtype = match req.dtype {
            DType::F32 => 0,
            DType::F16 => 1,
        };
        let k = models(KeyBuilder::new(target))
            .generation(self.shared.generation(policy.generation))
            .shape(req.rows, req.cols, dtype)
            .input_digest(self.digest_of(req.input));
        Some(k.finish())
    }

    /// A new request begins: forget the previous one's input digest.
    pub fn begin_request(&self) {
        self.digest.set(None);
    }

    fn digest_of(&self, input: &[u8]) -> u128 {
        let at = (input.as_ptr() as usize, input.len());
        match self.digest.get() {
            Some((p, n, d)) if (p, n) == at => d,
            _ => {
                let d = input_digest(input);
                self.digest.set(Some((at.0, at.1, d)));
                d
            }
        }
    }

    /// Look `key` up in L1 then L2; a hit fills `out` exactly.
    pub fn get(
        &self,
        m: &ShardMetrics,
        key: CacheKey,
        policy: TargetPolicy,
        out: &mut [f32],
    ) -> bool {
        if self.get_local(m, key, policy, out) {
            return true;
        }
        m.cache_misses.inc();
        false
    }

    /// `get` without counting a miss (the caller asks L3 next).
    pub fn get_local(
        &self,
        m: &ShardMetrics,
        key: CacheKey,
        policy: TargetPolicy,
        out: &mut [f32],
    ) -> bool {
        // Targets with a TTL live in L2 only: L1 entries carry no expiry.
        if policy.ttl_s == 0 && self.l1.borrow_mut().get(&key, out) == Some(out.len()) {
            m.cache_hits_l1.inc();
            return true;
        }
        if let Some(l2) = &self.shared.l2 {
            if l2.get(&key, out) == Some(out.len()) {
                m.cache_hits_l2.inc();
                if policy.ttl_s == 0 {
                    self.l1.borrow_mut().insert(key, out);
                }
                return true;
            }
        }
        false
    }

    /// Store a computed answer in L2 and L1, and queue it for L3 (never
    /// waited for).
    pub fn insert(&self, m: &ShardMetrics, key: CacheKey, policy: TargetPolicy, value: &[f32]) {
        self.insert_local(key, policy, value);
        if let Some(l3) = &self.shared.l3 {
            l3.fill(key, value, policy.ttl_s);
        }
        m.cache_inserts.inc();
    }

    /// Store an answer in L2 and L1 only (an L3 hit filling the tiers below).
    pub fn insert_local(&self, key: CacheKey, policy: TargetPolicy, value: &[f32]) {
        if let Some(l2) = &self.shared.l2 {
            let expires = if policy.ttl_s > 0 {
                unix_now() + policy.ttl_s
            } else {
                0
            };
            l2.insert(&key, policy.tag, value, expires);
        }
        if policy.ttl_s == 0 {
            self.l1.borrow_mut().insert(key, value);
        }
    }

    /// After a miss: lead the computation of `key`, or wait behind the
    /// request already computing it.
    pub fn join(
        &self,
        m: &ShardMetrics,
        key: CacheKey,
        conn: &Rc<Conn>,
        id: u64,
        arrival: Instant,
        deadline: Option<Instant>,
    ) -> Joined {
        let mut co = self.coalescer.borrow_mut();
        match co.begin(key) {
            Begin::Leader => Joined::Leader,
            Begin::Full => Joined::Alone,
            Begin::Follower => {
                let w = Waiter {
                    conn: conn.clone(),
                    id,
                    arrival,
                    deadline,
                };
                match co.add_waiter(key, w) {
                    Ok(()) => {
                        conn.in_flight.set(conn.in_flight.get() + 1);
                        m.cache_coalesced.inc();
                        Joined::Waiting
                    }
                    Err(_) => Joined::Alone,
                }
            }
        }
    }
}

/// `p` made absolute against the working directory (as it was), for logs.
fn absolute(p: &std::path::Path) -> std::path::PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}
