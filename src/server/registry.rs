//! The registry: the models and ensembles every shard serves, published
//! as immutable generations. The loader (`lifecycle`) builds a
//! [`Registry`] off the request path and [`Hub::publish`]es it; each
//! shard's watcher task sees the new generation number (one atomic load
//! every few milliseconds, never on the request path), builds its new
//! version from it and swaps it in (`shard::Current`), then reports the
//! generation it applied. Nothing here is read per request.

use super::rollout::RolloutStats;
use crate::model::load::Repository;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Latency profile points (µs at batch sizes 1, min(8, max), max) the
/// loader's warm-up measured, by (name, version, digest).
pub type ProfileSeeds = HashMap<(String, u32, u128), [f32; 3]>;

/// One generation of what the server serves.
#[derive(Debug, Default)]
pub struct Registry {
    pub generation: u64,
    pub repo: Arc<Repository>,
    pub profiles: ProfileSeeds,
    /// Model name → the figures of its rollout (`repo.rollouts`).
    pub rollouts: BTreeMap<String, Arc<RolloutStats>>,
    /// Per shard: the large buffers of its next version, allocated and
    /// touched by the loader so the shard does not stall on them (taken by
    /// the shard; empty at start-up).
    pub prebuilt: Vec<Mutex<Option<Prebuilt>>>,
}

/// One shard's buffers for a new version, built off the shard.
#[derive(Debug, Default)]
pub struct Prebuilt {
    /// Each slot's queue ring, in slot order (models by name, versions
    /// ascending).
    pub rings: Vec<Vec<f32>>,
    pub window: Option<crate::ensemble::feedback::Window>,
}

impl Registry {
    /// Generation `generation` of `repo`; rollouts that `old` already
    /// runs (same model, candidate, digest, mode and fraction) keep their
    /// figures.
    pub fn new(
        generation: u64,
        repo: Arc<Repository>,
        profiles: ProfileSeeds,
        old: Option<&Registry>,
    ) -> Registry {
        let mut rollouts = BTreeMap::new();
        for (name, r) in &repo.rollouts {
            let versions = &repo.models[name];
            let Some(cand) = versions.iter().find(|m| Some(m.version) == r.candidate) else {
                continue;
            };
            let current = current_version(&repo, name).unwrap_or(0);
            let kept = old.and_then(|o| o.rollouts.get(name)).filter(|s| {
                s.candidate == cand.version
                    && s.candidate_digest == cand.digest
                    && s.current == current
                    && s.mode == r.mode
                    && s.fraction == r.fraction
            });
            let stats = match kept {
                Some(s) => s.clone(),
                None => Arc::new(RolloutStats::new(name, current, cand, r.mode, r.fraction)),
            };
            rollouts.insert(name.clone(), stats);
        }
        Registry {
            generation,
            repo,
            profiles,
            rollouts,
            prebuilt: Vec::new(),
        }
    }
}

/// The version a request without one gets: the highest, or under a
/// rollout the highest other than the candidate.
pub fn current_version(repo: &Repository, name: &str) -> Option<u32> {
    let cand = repo.rollouts.get(name).and_then(|r| r.candidate);
    repo.models
        .get(name)?
        .iter()
        .rev()
        .map(|m| m.version)
        .find(|&v| Some(v) != cand)
}

/// One shard's side of the hub.
#[derive(Default)]
pub(crate) struct ShardSlot {
    /// The generation this shard serves new requests from.
    pub applied: AtomicU64,
    /// Versions alive on the shard (the current one and retired ones
    /// still answering what they had queued).
    pub alive: AtomicUsize,
    /// Why the shard could not build the last generation, if it could not.
    pub error: Mutex<Option<(u64, String)>>,
}

/// Where generations are published and where shards report.
pub(crate) struct Hub {
    latest: Mutex<Arc<Registry>>,
    generation: AtomicU64,
    pub shards: Vec<ShardSlot>,
}

impl Hub {
    pub fn new(first: Arc<Registry>, shards: usize) -> Hub {
        Hub {
            generation: AtomicU64::new(first.generation),
            latest: Mutex::new(first),
            shards: (0..shards).map(|_| ShardSlot::default()).collect(),
        }
    }

    /// The newest generation number (what the watchers poll).
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn latest(&self) -> Arc<Registry> {
        self.latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Make `reg` the newest generation.
    pub fn publish(&self, reg: Arc<Registry>) {
        let g = reg.generation;
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = reg;
        self.generation.store(g, Ordering::Release);
    }

    /// Wait until every shard serves generation `g` (Ok) or one says why
    /// it cannot (Err), at most `within`.
    pub fn wait_applied(&self, g: u64, within: Duration) -> Result<(), String> {
        let end = Instant::now() + within;
        loop {
            for (i, s) in self.shards.iter().enumerate() {
                if let Some((eg, e)) = &*s.error.lock().unwrap_or_else(|e| e.into_inner()) {
                    if *eg == g {
                        return Err(format!("shard {i}: {e}"));
                    }
                }
            }
            if self
                .shards
                .iter()
                .all(|s| s.applied.load(Ordering::Acquire) >= g)
            {
                return Ok(());
            }
            if Instant::now() >= end {
                return Err(format!(
                    "generation {g}: not applied by every shard within {} ms",
                    within.as_millis()
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Versions alive, summed over shards.
    pub fn versions_alive(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.alive.load(Ordering::Relaxed))
            .sum()
    }
}
