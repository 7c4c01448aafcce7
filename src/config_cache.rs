//! `[cache]` and `[cache.l3]` of the server config (docs/CONFIG.md,
//! docs/CACHE.md); checked with the rest in `Config::validate`.

use serde::Deserialize;
use std::path::PathBuf;

/// Prediction cache settings (docs/CACHE.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSettings {
    /// Master switch; per-target switches are in `targets`.
    pub enabled: bool,
    /// L1 entries per core (rounded to whole `l1_ways`-way sets).
    pub l1_entries: usize,
    /// L1 associativity: keys one set holds (1..=64); a lookup compares up
    /// to this many keys.
    pub l1_ways: usize,
    /// L2 file shared by all cores and kept across restarts; "" = no L2.
    /// A relative path is relative to the working directory.
    pub l2_path: PathBuf,
    /// Size of the L2 file.
    pub l2_bytes: u64,
    /// Largest cacheable answer in f32s (rows × outputs); larger answers are computed every time.
    pub value_f32_max: usize,
    /// Distinct keys being computed at once per core that later identical requests can wait on.
    pub coalesce_keys_max: usize,
    /// Requests that may wait on one in-flight key.
    pub coalesce_waiters_per_key_max: usize,
    /// Requests waiting on in-flight keys at once per core, all keys
    /// together; beyond it requests compute on their own. `None`:
    /// 4 × `coalesce_keys_max`.
    pub coalesce_waiters_max: Option<usize>,
    /// Per-target overrides: `[cache.targets.NAME] enabled = false`, `ttl_s = 60`.
    pub targets: std::collections::BTreeMap<String, TargetCache>,
    /// Optional L3 tier shared between nodes on Redis/Valkey (`[cache.l3]`).
    pub l3: Option<L3Settings>,
}

/// `[cache.l3]`: a Redis/Valkey tier looked up after an L2 miss (docs/CACHE.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct L3Settings {
    /// `redis://HOST:PORT[/DB]` (standalone Redis or Valkey).
    pub url: String,
    /// Seeds of a Redis Cluster, `redis://HOST:PORT` each (instead of `url`).
    pub cluster_seeds: Vec<String>,
    /// Expiry of entries written, seconds (0 = none; a target's `ttl_s` wins when shorter).
    pub ttl_s: u64,
    /// Longest a request waits for an L3 answer before computing, µs.
    pub lookup_budget_us: u64,
    /// `auto`: look a request up only when its predicted queue wait and
    /// compute exceed the shard's measured L3 round trip; `always`.
    pub lookup: L3Lookup,
}

/// When a request is looked up in L3 (`cache.l3.lookup`).
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum L3Lookup {
    #[default]
    Auto,
    Always,
}

impl Default for L3Settings {
    fn default() -> Self {
        L3Settings {
            url: String::new(),
            cluster_seeds: Vec::new(),
            ttl_s: 3600,
            lookup_budget_us: 1000,
            lookup: L3Lookup::Auto,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TargetCache {
    /// `None`: follow `cache.enabled`.
    pub enabled: Option<bool>,
    /// Entries expire this many seconds after insertion (0 = never). Targets
    /// with a TTL are kept in L2 only (L1 entries carry no expiry).
    pub ttl_s: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            enabled: true,
            l1_entries: 16 * 1024,
            l1_ways: 8,
            l2_path: PathBuf::from("beast-l2.cache"),
            l2_bytes: 64 << 20,
            value_f32_max: 16,
            coalesce_keys_max: 4096,
            coalesce_waiters_per_key_max: 256,
            coalesce_waiters_max: None,
            targets: Default::default(),
            l3: None,
        }
    }
}
