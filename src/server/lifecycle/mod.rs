//! Model lifecycle without a restart: rescan, load, unload, drain.
//!
//! Every change goes through [`Lifecycle::apply`], one at a time (a
//! mutex serialises them; nothing here runs on a shard): scan the
//! repository (less what was unloaded by hand, plus what was loaded by
//! hand, under each model's version policy), validate (the loader's
//! checks: manifest, shapes, finite weights, digest; ensembles' members;
//! cascade calibration), warm up what is new on a backend of its own
//! (`warm.rs`: a batch at each batch size, outputs must be finite, and the
//! latency profile the deadline policy starts from), then publish the
//! new generation and wait until every shard serves it. Any refusal
//! refuses the whole change: the answer and the log name the file and the
//! reason, and the generation served does not change (never half-applied).
//!
//! Models unchanged since the generation served (same name, version and
//! digest) keep their `Arc`, so their cache keys, backend state and
//! latency profiles carry over.
//!
//! Triggers: SIGHUP (main.rs), `POST /v1/repository/reload`,
//! `POST /v1/models/NAME/load|unload` (admin/lifecycle.rs), the poll
//! thread (`repository_poll_s`, `poll.rs`) and `beast models ...`.

mod judge;
mod metrics;
mod poll;
mod warm;

use super::registry::{Hub, Registry};
use crate::config::Config;
use crate::ensemble::calibrate::calibrate_cascades;
use crate::model::load::{load_repository_filtered, Repository, ScanFilter};
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// What to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Rescan the repository and apply what changed on disk.
    Rescan,
    /// Load a model (again) that was unloaded, or one version of it
    /// (even one its version policy leaves out).
    Load { name: String, version: Option<u32> },
    /// Stop serving a model, or one version of it.
    Unload { name: String, version: Option<u32> },
}

/// What an applied change did.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// The generation served now (unchanged when nothing changed).
    pub generation: u64,
    /// "name vN" of each model version added, and of each removed.
    pub loaded: Vec<String>,
    pub unloaded: Vec<String>,
    /// Ensembles added, changed or removed.
    pub ensembles_changed: Vec<String>,
    /// Models whose rollout started, changed or ended.
    pub rollouts_changed: Vec<String>,
    /// Model versions that stayed as they were.
    pub unchanged: usize,
    /// Trigger → every shard serving the new generation.
    pub took_ms: f64,
}

impl Applied {
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "generation": self.generation,
            "loaded": self.loaded,
            "unloaded": self.unloaded,
            "ensembles_changed": self.ensembles_changed,
            "rollouts_changed": self.rollouts_changed,
            "unchanged": self.unchanged,
            "took_ms": self.took_ms,
        })
    }
}

/// Counters of lifecycle events, for `/metrics` and `/v1/models`.
#[derive(Debug, Default)]
pub struct Counters {
    pub applied: AtomicU64,
    pub unchanged: AtomicU64,
    pub refused: AtomicU64,
    /// Rollout decisions.
    pub promoted: AtomicU64,
    pub rolled_back: AtomicU64,
}

/// Who is told what a change did (the admin port's state, for `/v1/models`
/// and `/readyz`). A trait here, implemented in `admin/`, so that this
/// module does not import the admin port, which imports it.
pub(crate) trait Observer: Send + Sync {
    /// The repository served now, after a change applied.
    fn repository_changed(&self, repo: Arc<Repository>);
    /// A drain began: not ready from now on.
    fn draining(&self);
}

pub struct Lifecycle {
    cfg: Arc<Config>,
    hub: Arc<Hub>,
    stop: Arc<AtomicBool>,
    /// Weak: the admin state holds this lifecycle (and, through its
    /// `serving`, the cache and its L2 lock), so a strong hold would be a
    /// cycle that outlives the server.
    admin: Option<Weak<dyn Observer>>,
    /// The hand-made loads and unloads in force; held for the whole of a
    /// change, so changes apply one at a time.
    filter: Mutex<ScanFilter>,
    pub counters: Counters,
    /// The last refusal (trigger, reasons), for `/v1/models`.
    last_refusal: Mutex<Option<(String, Vec<String>)>>,
    draining: AtomicBool,
    /// Rollout decisions: (model, candidate version, digest) → promoted.
    decided: Mutex<std::collections::BTreeMap<(String, u32, u128), bool>>,
    /// The figures of each decided rollout at its decision, for `/v1/models`.
    decisions: Mutex<Vec<serde_json::Value>>,
}

/// The loader thread's nice value (higher: lower priority).
const LOADER_NICE: libc::c_int = 10;

/// How long a change waits for every shard to serve it.
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);

impl Lifecycle {
    pub(crate) fn new(
        cfg: Arc<Config>,
        hub: Arc<Hub>,
        stop: Arc<AtomicBool>,
        admin: Option<Arc<dyn Observer>>,
    ) -> Lifecycle {
        Lifecycle {
            cfg,
            hub,
            stop,
            admin: admin.as_ref().map(Arc::downgrade),
            filter: Mutex::new(ScanFilter::default()),
            counters: Counters::default(),
            last_refusal: Mutex::new(None),
            draining: AtomicBool::new(false),
            decided: Mutex::new(Default::default()),
            decisions: Mutex::new(Vec::new()),
        }
    }

    /// Start the poll thread when `repository_poll_s` is set.
    /// and the rollout judge.
    pub(crate) fn start_polling(self: &Arc<Self>) {
        if self.cfg.repository_poll_s > 0.0 {
            poll::spawn(self);
        }
        judge::spawn(self);
    }

    /// The generation served now.
    pub fn generation(&self) -> u64 {
        self.hub.latest().generation
    }

    /// The repository served now.
    pub fn repository(&self) -> Arc<Repository> {
        self.hub.latest().repo.clone()
    }

    /// Versions of shards alive (one per shard when no swap is finishing).
    pub fn versions_alive(&self) -> usize {
        self.hub.versions_alive()
    }

    /// Apply `change` (see the module comment); `trigger` names who asked,
    /// for the log. Err: every reason it was refused, one per line, each
    /// naming the file; the generation served is unchanged.
    pub fn apply(&self, change: &Change, trigger: &str) -> Result<Applied, String> {
        let t0 = Instant::now();
        if self.stopped() {
            return Err("the server is stopping: nothing applied".into());
        }
        let mut filter = self.filter.lock().unwrap_or_else(|e| e.into_inner());
        // The scan, calibration and warm-up run on a thread of lower
        // priority (nice 10), so that on a busy machine they take CPU time
        // from the shards' cores only when those have none to use.
        let mut f = filter.clone();
        let r = std::thread::scope(|sc| {
            let work = std::thread::Builder::new()
                .name("beast-loader".into())
                .spawn_scoped(sc, || {
                    // SAFETY: setpriority on the calling thread (who = 0 is
                    // this thread on Linux); no memory is touched.
                    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, LOADER_NICE) };
                    self.apply_locked(change, &mut f, t0)
                });
            match work {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err("the loader thread panicked".into())),
                Err(e) => Err(format!("cannot start the loader thread: {e}")),
            }
        });
        *filter = f;
        match &r {
            Ok(a)
                if a.loaded.is_empty()
                    && a.unloaded.is_empty()
                    && a.ensembles_changed.is_empty() =>
            {
                self.counters.unchanged.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "beast: {trigger}: nothing changed (generation {})",
                    a.generation
                );
            }
            Ok(a) => {
                self.counters.applied.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "beast: {trigger}: generation {} serving after {:.1} ms: loaded [{}], unloaded [{}], ensembles changed [{}], rollouts changed [{}], {} unchanged",
                    a.generation,
                    a.took_ms,
                    a.loaded.join(", "),
                    a.unloaded.join(", "),
                    a.ensembles_changed.join(", "),
                    a.rollouts_changed.join(", "),
                    a.unchanged
                );
            }
            Err(e) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                for line in e.lines() {
                    eprintln!("beast: {trigger}: refused: {line}");
                }
                eprintln!(
                    "beast: {trigger}: nothing applied; generation {} keeps serving",
                    self.generation()
                );
                *self.last_refusal.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((trigger.to_string(), e.lines().map(String::from).collect()));
            }
        }
        r
    }

    fn apply_locked(
        &self,
        change: &Change,
        filter: &mut ScanFilter,
        t0: Instant,
    ) -> Result<Applied, String> {
        let old = self.hub.latest();
        let dir = &self.cfg.models_dir;
        let mut next = filter.clone();
        match change {
            Change::Rescan => {}
            Change::Load { name, version } => {
                if !dir.join(name).join("model.toml").is_file() {
                    return Err(format!(
                        "{}: no such model folder (with a model.toml)",
                        dir.join(name).display()
                    ));
                }
                next.skip.remove(name);
                if let Some(v) = version {
                    if !dir.join(name).join(v.to_string()).is_dir() {
                        return Err(format!(
                            "{}: no such version folder",
                            dir.join(name).join(v.to_string()).display()
                        ));
                    }
                    next.skip_versions.remove(&(name.clone(), *v));
                    next.add_versions.insert((name.clone(), *v));
                } else {
                    next.skip_versions.retain(|(n, _)| n != name);
                }
            }
            Change::Unload { name, version } => {
                let Some(versions) = old.repo.models.get(name) else {
                    return Err(format!("model {name}: not loaded"));
                };
                match version {
                    None => {
                        next.skip.insert(name.clone());
                    }
                    Some(v) if versions.iter().any(|m| m.version == *v) => {
                        next.skip_versions.insert((name.clone(), *v));
                        next.add_versions.remove(&(name.clone(), *v));
                    }
                    Some(v) => return Err(format!("model {name}: version {v} is not loaded")),
                }
            }
        }
        let mut repo = load_repository_filtered(dir, &self.cfg.batch.limits(), &next)?;
        calibrate_cascades(&mut repo, dir);
        if !repo.errors.is_empty() {
            return Err(repo.errors.join("\n"));
        }
        self.apply_decisions(&mut repo);
        if repo.models.is_empty() {
            return Err(format!(
                "{}: no model left to serve (a change must leave at least one)",
                dir.display()
            ));
        }
        let mut out = Applied::default();
        keep_unchanged(&mut repo, &old.repo, &mut out);
        for (name, spec) in &repo.ensembles {
            let before = old.repo.ensembles.get(name).map(|s| format!("{s:?}"));
            if before.as_deref() != Some(format!("{spec:?}").as_str()) {
                out.ensembles_changed.push(name.clone());
            }
        }
        for name in old.repo.ensembles.keys() {
            if !repo.ensembles.contains_key(name) {
                out.ensembles_changed.push(name.clone());
            }
        }
        for name in repo.rollouts.keys().chain(old.repo.rollouts.keys()) {
            let (a, b) = (repo.rollouts.get(name), old.repo.rollouts.get(name));
            if a != b && !out.rollouts_changed.contains(name) {
                out.rollouts_changed.push(name.clone());
            }
        }
        *filter = next;
        if out.loaded.is_empty()
            && out.unloaded.is_empty()
            && out.ensembles_changed.is_empty()
            && out.rollouts_changed.is_empty()
        {
            out.generation = old.generation;
            out.took_ms = t0.elapsed().as_secs_f64() * 1e3;
            return Ok(out);
        }
        // Warm up what is new, off the shards.
        let profiles = warm::warm_up(&self.cfg, &repo, &old)?;
        let prebuilt = warm::prebuild(&self.cfg, &repo);
        let mut reg = Registry::new(old.generation + 1, Arc::new(repo), profiles, Some(&old));
        reg.prebuilt = prebuilt;
        let reg = Arc::new(reg);
        out.generation = reg.generation;
        self.hub.publish(reg.clone());
        if let Err(e) = self.hub.wait_applied(reg.generation, APPLY_TIMEOUT) {
            // The shards build deterministically, so none applied it:
            // publish the old content again under a newer number so every
            // shard agrees on what it serves.
            self.hub.publish(Arc::new(Registry::new(
                reg.generation + 1,
                old.repo.clone(),
                old.profiles.clone(),
                Some(&old),
            )));
            let _ = self.hub.wait_applied(reg.generation + 1, APPLY_TIMEOUT);
            return Err(e);
        }
        if let Some(a) = self.admin.as_ref().and_then(Weak::upgrade) {
            a.repository_changed(reg.repo.clone());
        }
        out.took_ms = t0.elapsed().as_secs_f64() * 1e3;
        Ok(out)
    }

    /// `/v1/models` "lifecycle": generation, counters, what was unloaded
    /// by hand, the last refusal.
    pub fn status_json(&self) -> serde_json::Value {
        let f = self
            .filter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let last = self
            .last_refusal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        json!({
            "generation": self.generation(),
            "versions_alive": self.versions_alive(),
            "applied": self.counters.applied.load(Ordering::Relaxed),
            "refused": self.counters.refused.load(Ordering::Relaxed),
            "unloaded": f.skip,
            "unloaded_versions": f.skip_versions.iter().map(|(n, v)| format!("{n} v{v}")).collect::<Vec<_>>(),
            "loaded_by_hand": f.add_versions.iter().map(|(n, v)| format!("{n} v{v}")).collect::<Vec<_>>(),
            "last_refusal": last.map(|(t, e)| json!({"trigger": t, "reasons": e})),
            "draining": self.draining.load(Ordering::Relaxed),
            "rollouts": self.hub.latest().rollouts.values().map(|r| r.to_json()).collect::<Vec<_>>(),
            "rollouts_decided": self.decisions.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            "rollout_decisions": {
                "promoted": self.counters.promoted.load(Ordering::Relaxed),
                "rolled_back": self.counters.rolled_back.load(Ordering::Relaxed),
            },
        })
    }

    /// Lifecycle lines for `/metrics`.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let c = &self.counters;
        let _ = writeln!(
            out,
            "# HELP beast_registry_generation The registry generation served (1 at start, +1 per applied change).\n# TYPE beast_registry_generation gauge\nbeast_registry_generation {}",
            self.generation()
        );
        let _ = writeln!(
            out,
            "# HELP beast_registry_versions_alive Shard versions alive (one per shard, more while a swap finishes).\n# TYPE beast_registry_versions_alive gauge\nbeast_registry_versions_alive {}",
            self.versions_alive()
        );
        let _ = writeln!(out, "# HELP beast_registry_changes_total Repository changes (reload, load, unload) by outcome.\n# TYPE beast_registry_changes_total counter");
        for (k, v) in [
            ("applied", &c.applied),
            ("unchanged", &c.unchanged),
            ("refused", &c.refused),
        ] {
            let _ = writeln!(
                out,
                "beast_registry_changes_total{{outcome=\"{k}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        metrics::render_rollouts(out, &self.hub.latest(), c);
        let _ = writeln!(
            out,
            "# HELP beast_draining 1 while draining (not ready, still serving).\n# TYPE beast_draining gauge\nbeast_draining {}",
            u8::from(self.draining.load(Ordering::Relaxed))
        );
    }

    /// Drain: `/readyz` answers 503 at once, requests are still served
    /// for `secs`, then the server stops (as on SIGINT). A second drain
    /// while one runs changes nothing; returns false then.
    pub fn drain(&self, secs: f64, trigger: &str) -> bool {
        if self.draining.swap(true, Ordering::SeqCst) {
            return false;
        }
        if let Some(a) = self.admin.as_ref().and_then(Weak::upgrade) {
            a.draining();
        }
        eprintln!("beast: {trigger}: draining: /readyz answers 503, serving for {secs} s more, then stopping");
        let stop = self.stop.clone();
        let secs = secs.max(0.0);
        let spawned = std::thread::Builder::new()
            .name("beast-drain".into())
            .spawn(move || {
                let end = Instant::now() + Duration::from_secs_f64(secs);
                while Instant::now() < end && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if !stop.swap(true, Ordering::SeqCst) {
                    eprintln!("beast: drain over: stopping (answering requests in flight)");
                }
            });
        if spawned.is_err() {
            self.stop.store(true, Ordering::SeqCst);
        }
        true
    }

    /// The configured drain delay (`drain_s`).
    pub fn drain_s(&self) -> f64 {
        self.cfg.drain_s
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// Give `repo` the `Arc`s of `old`'s models that did not change (same
/// name, version and digest) and note what was loaded and unloaded.
fn keep_unchanged(repo: &mut Repository, old: &Repository, out: &mut Applied) {
    for (name, versions) in repo.models.iter_mut() {
        for m in versions.iter_mut() {
            let same = old.models.get(name).and_then(|v| {
                v.iter()
                    .find(|o| o.version == m.version && o.digest == m.digest)
            });
            match same {
                Some(o) => {
                    *m = o.clone();
                    out.unchanged += 1;
                }
                None => out
                    .loaded
                    .push(format!("{name} v{} ({})", m.version, m.short_digest())),
            }
        }
    }
    for (name, versions) in &old.models {
        for o in versions {
            let kept = repo
                .models
                .get(name)
                .is_some_and(|v| v.iter().any(|m| std::sync::Arc::ptr_eq(m, o)));
            if !kept {
                out.unloaded
                    .push(format!("{name} v{} ({})", o.version, o.short_digest()));
            }
        }
    }
}
