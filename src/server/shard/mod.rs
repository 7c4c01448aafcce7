//! One shard: everything one core owns — its models' batch queues, its
//! backend, its pending ensemble requests, its encoder — and the request
//! path from a decoded frame to an encoded response.
//!
//! The pieces, one file each (all `impl Shard` blocks over the struct
//! below, except the two leaves):
//! - `admit.rs`: decode, validate, cache lookup, admission by predicted
//!   wait, input conversion, and a model request queued (`handle_frame`);
//! - `ensemble.rs`: the ensemble state machine (`submit_ensemble`,
//!   `run_members`, `member_done`, `advance`, `finish_ensemble`);
//! - `deadline.rs`: the deadline policy's member set
//!   (`pick_for_deadline`) and the straggler cutoff (`run_deadlines`,
//!   `cut_off_due`);
//! - `batcher.rs`: the batcher per model slot and what a batch answers
//!   (`run_batcher`, `dispatch`, `release_waiters`, `answer_dropped`);
//! - `feedback.rs`: feedback messages and saving the selection state;
//! - `l3.rs`: requests parked while the shared L3 tier (Redis) is asked;
//! - `share.rs`: publishing what this shard learned to the node's sync
//!   thread and applying what the other shards and nodes learned;
//! - `respond.rs`: `respond_ok` / `respond_error`, the only writers of a
//!   connection's output;
//! - `state.rs` (leaf): the data — jobs, model slots, target names,
//!   pending ensemble entries;
//! - `answer.rs` (leaf): answer helpers — `refusal`, sizes, name clipping.
//!
//! Imports go one way: every piece imports `Shard` from here and types
//! from the two leaves; this file imports only the leaves, and the pieces
//! call one another as methods of `Shard`, never by importing each other.
//!
//! Nothing here is shared with another core except the immutable models
//! (`Arc<Model>`) and the metrics and selection counters this shard alone
//! writes.

use super::cache::{CacheShared, ShardCache, TargetPolicy};
use super::notify::Notify;
use super::select::SelState;
use super::slab::Slab;
use crate::backend::{Backend, ModelId};
use crate::batch::{Queue, RowCost};
use crate::config::Config;
use crate::ensemble::cost::SelectionCounters;
use crate::ensemble::EnsemblePlan;
use crate::metrics::ShardMetrics;
use crate::model::Model;
use crate::server::registry::{current_version, Registry};
use crate::server::rollout::ShadowQueue;
use crate::wire::Encoder;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod admit;
mod answer;
mod batcher;
mod deadline;
mod ensemble;
mod feedback;
mod l3;
mod respond;
mod share;
mod state;
mod version;

pub(crate) use l3::run_l3;
pub(crate) use share::run_share;
pub(crate) use version::{watch, Current};

use answer::largest_answer;
use state::ModelSlot;
use state::{EnsemblePending, TargetRef, Trial};

/// What every version of one shard shares: the executor's backend, cache,
/// encoder and buffers, its metrics and selection counters. Cloned (`Rc`s)
/// into each [`Shard`] version built on the executor.
#[derive(Clone)]
pub(crate) struct Shared {
    pub id: usize,
    pub cfg: Arc<Config>,
    pub cache: Rc<ShardCache>,
    pub backend: Rc<RefCell<Box<dyn Backend>>>,
    pub encoder: Rc<RefCell<Encoder>>,
    pub scratch: Rc<RefCell<Vec<f32>>>,
    pub message: Rc<RefCell<String>>,
    pub metrics: Arc<ShardMetrics>,
    pub stopping: Rc<Cell<bool>>,
    pub conn_serial: Rc<Cell<u32>>,
    pub selection: Arc<SelectionCounters>,
    /// Versions of this shard alive now (built and not yet dropped).
    pub alive: Rc<Cell<usize>>,
    /// Rollout samples for the comparer task (`server/rollout.rs`).
    pub shadow: Rc<ShadowQueue>,
    /// Backend model ids in use, and how many versions hold each.
    pub registered: Rc<RefCell<HashMap<ModelId, usize>>>,
    /// Requests parked on the shared L3 tier (`l3.rs`), when configured.
    pub l3: Option<Rc<l3::L3Shard>>,
}

impl Shared {
    pub fn new(
        id: usize,
        cfg: Arc<Config>,
        backend: Box<dyn Backend>,
        metrics: Arc<ShardMetrics>,
        cache_shared: Arc<CacheShared>,
        selection: Arc<SelectionCounters>,
    ) -> Result<Shared, String> {
        let l3 = cache_shared
            .l3
            .as_ref()
            .and_then(|l3| l3::L3Shard::new(l3, id))
            .map(Rc::new);
        Ok(Shared {
            id,
            l3,
            cache: Rc::new(ShardCache::new(&cfg, cache_shared)?),
            cfg,
            backend: Rc::new(RefCell::new(backend)),
            encoder: Rc::new(RefCell::new(Encoder::new())),
            scratch: Rc::new(RefCell::new(Vec::new())),
            message: Rc::new(RefCell::new(String::with_capacity(256))),
            metrics,
            stopping: Rc::new(Cell::new(false)),
            conn_serial: Rc::new(Cell::new(0)),
            selection,
            alive: Rc::new(Cell::new(0)),
            shadow: Rc::new(ShadowQueue::default()),
            registered: Rc::new(RefCell::new(HashMap::new())),
        })
    }
}

/// One version of a shard: the models and ensembles of one registry
/// generation, with their batch queues, plans and selection state. A
/// request runs on the version that was current when its frame arrived
/// (its queued rows and pending ensemble entries live here); a retired
/// version's tasks exit once it has nothing left, and the last `Rc`
/// dropped unloads its models (`version.rs`).
pub(crate) struct Shard {
    /// Index of this shard (0-based), for logs.
    pub id: usize,
    /// The registry generation this version was built from.
    pub generation: u64,
    pub cfg: Arc<Config>,
    pub slots: Vec<ModelSlot>,
    /// Looked up once per request: xxh3, not SipHash (the names are the
    /// operator's, not an attacker's choice of keys).
    targets: HashMap<String, TargetRef, xxhash_rust::xxh3::Xxh3DefaultBuilder>,
    plans: Vec<EnsemblePlan>,
    /// Cache policy of each plan (same index).
    plan_cache: Vec<TargetPolicy>,
    /// Most rows a request to each plan may carry (same index): the
    /// smallest member queue, and that member's slot.
    plan_rows_max: Vec<(usize, usize)>,
    /// Metrics target of each slot and each plan (names known at start;
    /// others count as `unknown`), and each plan's selection counters.
    slot_target: Vec<u16>,
    plan_target: Vec<u16>,
    plan_selection: Vec<Option<usize>>,
    cache: Rc<ShardCache>,
    /// Run only by the batchers (`batcher.rs`; `warm_up` before them).
    backend: Rc<RefCell<Box<dyn Backend>>>,
    /// Used only by `respond.rs`.
    encoder: Rc<RefCell<Encoder>>,
    /// Ensemble entries: written by `ensemble.rs` (and the cutoff in
    /// `deadline.rs`, which finishes entries through it); the batchers
    /// only ask `is_live`.
    pending: RefCell<Slab<EnsemblePending>>,
    /// Request input converted to f32 (grown once to the largest request):
    /// filled by `admit.rs`, read by `ensemble.rs` for the first step.
    scratch: Rc<RefCell<Vec<f32>>>,
    /// Error messages are formatted here instead of in a fresh String
    /// (`respond.rs` only).
    message: Rc<RefCell<String>>,
    /// Bytes of the largest answer (whole frame) any request may get here:
    /// each request in flight holds this much of its connection's
    /// `pending_bytes_per_connection_max`.
    pub response_bytes_max: usize,
    pub metrics: Arc<ShardMetrics>,
    pub stopping: Rc<Cell<bool>>,
    /// A newer version took over: finish what is queued and pending, then exit.
    pub retired: Cell<bool>,
    alive: Rc<Cell<usize>>,
    shadow: Rc<ShadowQueue>,
    registered: Rc<RefCell<HashMap<ModelId, usize>>>,
    /// Requests to models under a shadow rollout (sampling by count).
    shadow_tick: Cell<u64>,
    sel: RefCell<SelState>,
    /// Per-ensemble, per-domain cost counters (read by `selection_stats`).
    pub selection: Arc<SelectionCounters>,
    /// Wakes the straggler-cutoff task when a deadline is added.
    pub deadline_wake: Notify,
    /// Requests waiting on the shared L3 tier (`l3.rs`), when configured
    /// (one per executor, shared by its versions).
    l3: Option<Rc<l3::L3Shard>>,
}

impl Shard {
    /// Build the version of registry generation `reg`. `prev`, the
    /// version it replaces, lends the latency profiles and admission costs
    /// of the models both hold; the loader's warm-up measurements
    /// (`reg.profiles`) seed the others.
    pub fn new(sh: &Shared, reg: &Registry, prev: Option<&Shard>) -> Result<Shard, String> {
        let (repo, generation) = (&*reg.repo, reg.generation);
        let (id, cfg, cache) = (sh.id, &sh.cfg, &sh.cache);
        let pre = reg.prebuilt.get(id).and_then(|m| m.lock().ok()?.take());
        let (mut rings, window) = match pre {
            Some(p) => (p.rings.into_iter(), p.window),
            None => (Vec::new().into_iter(), None),
        };
        let mut slots = Vec::new();
        let mut targets = HashMap::with_hasher(Default::default());
        for (name, versions) in &repo.models {
            let mut v = Vec::new();
            let current_v = current_version(repo, name);
            let mut current = 0;
            let mut trial = None;
            for m in versions {
                if Some(m.version) == current_v {
                    current = slots.len();
                }
                if let (Some(r), Some(stats)) = (repo.rollouts.get(name), reg.rollouts.get(name)) {
                    if r.candidate == Some(m.version) {
                        trial = Some(Trial {
                            slot: slots.len(),
                            mode: r.mode,
                            ppm: (r.fraction * 1e6).round() as u64,
                            stats: stats.clone(),
                            labelled: r.mode == crate::model::rollout::RolloutMode::Canary
                                && m.task == crate::model::Task::Classification,
                        });
                    }
                }
                v.push((m.version, slots.len()));
                let backend_id = version::backend_id(sh, prev, m)?;
                slots.push(ModelSlot {
                    model: m.clone(),
                    backend_id,
                    queue: RefCell::new(Queue::with_ring(
                        m.batch,
                        m.input_width,
                        rings.next().unwrap_or_default(),
                    )),
                    wake: Notify::default(),
                    row_cost: Cell::new(RowCost::new(0.0)),
                    cache: cache.policy(cfg, name),
                });
            }
            targets.insert(
                name.clone(),
                TargetRef::Model {
                    versions: v,
                    current,
                    trial,
                },
            );
        }
        if id == 0 && prev.is_none() {
            for s in &slots {
                let cap = s.model.batch.queue_rows_max;
                if cap < cfg.rows_per_request_max {
                    eprintln!(
                        "beast: model '{}' v{} queues at most {cap} rows (queue_rows_max), fewer than rows_per_request_max ({}): larger requests to it are answered BAD_REQUEST",
                        s.model.name, s.model.version, cfg.rows_per_request_max
                    );
                }
            }
        }
        let mut plans = Vec::new();
        let mut plan_cache = Vec::new();
        let mut plan_rows_max = Vec::new();
        for (name, spec) in &repo.ensembles {
            let mut members = Vec::new();
            for m in &spec.members {
                match targets.get(m.as_str()) {
                    Some(TargetRef::Model { current, .. }) => members.push(*current),
                    _ => return Err(format!("ensemble {name}: member {m} is not a loaded model")),
                }
            }
            let first = &slots[members[0]].model;
            let flops = members
                .iter()
                .map(|&m| slots[m].model.flops_per_row())
                .collect();
            let rows_max = members
                .iter()
                .map(|&m| (slots[m].model.batch.queue_rows_max, m))
                .min()
                .expect("an ensemble has members");
            plan_rows_max.push(rows_max);
            let mut plan =
                EnsemblePlan::new(spec, members, flops, first.input_width, first.output_width)?;
            plan.task = first.task;
            // The loader checked this for a repository from files; an
            // in-memory one is checked here.
            crate::model::load::check_task_fit(spec, first.task)
                .map_err(|e| format!("ensemble {name}: {e}"))?;
            targets.insert(name.clone(), TargetRef::Ensemble(plans.len()));
            plans.push(plan);
            plan_cache.push(cache.policy(cfg, name));
        }
        let response_bytes_max = largest_answer(cfg, &slots, &plans, &plan_rows_max)?;
        let models: Vec<&Arc<Model>> = slots.iter().map(|s| &s.model).collect();
        let canary = repo
            .rollouts
            .values()
            .any(|r| r.mode == crate::model::rollout::RolloutMode::Canary);
        let mut sel = SelState::with_window(id, cfg, &plans, &models, window, canary);
        if prev.is_none() && !cfg.selection_state_path.as_os_str().is_empty() {
            let used = sel.load(&cfg.selection_state_path, id, &plans);
            if used > 0 {
                eprintln!("beast: shard {id}: selection state: {used} entries loaded");
            }
        }
        if let Some(prev) = prev {
            // What the version this one replaces learned, for the members
            // that did not change.
            sel.add_own(&plans, &prev.sel.borrow().own_counters(&prev.plans));
        }
        version::seed_profiles(&slots, &mut sel, prev, &reg.profiles);
        let names = &sh.metrics.targets;
        let target_of = |n: &str| {
            names.names[..names.len().saturating_sub(1)]
                .iter()
                .position(|x| x == n)
                .map_or(names.unknown(), |t| t as u16)
        };
        let slot_target = slots.iter().map(|s| target_of(&s.model.name)).collect();
        let plan_target = plans.iter().map(|p| target_of(&p.name)).collect();
        let plan_selection = plans
            .iter()
            .map(|p| sh.selection.names.iter().position(|n| *n == p.name))
            .collect();
        sh.alive.set(sh.alive.get() + 1);
        Ok(Shard {
            id,
            generation,
            sel: RefCell::new(sel),
            selection: sh.selection.clone(),
            deadline_wake: Notify::default(),
            l3: sh.l3.clone(),
            pending: RefCell::new(Slab::with_capacity(cfg.ensemble_in_flight_per_shard_max)),
            cfg: cfg.clone(),
            slots,
            targets,
            plans,
            plan_cache,
            plan_rows_max,
            slot_target,
            plan_target,
            plan_selection,
            cache: cache.clone(),
            backend: sh.backend.clone(),
            encoder: sh.encoder.clone(),
            scratch: sh.scratch.clone(),
            message: sh.message.clone(),
            response_bytes_max,
            metrics: sh.metrics.clone(),
            stopping: sh.stopping.clone(),
            retired: Cell::new(false),
            alive: sh.alive.clone(),
            shadow: sh.shadow.clone(),
            registered: sh.registered.clone(),
            shadow_tick: Cell::new(0),
        })
    }

    /// Run every model once at its largest batch, through the registered
    /// path the batchers use, so scratch and staging buffers reach their
    /// steady size before the first request.
    pub fn warm_up(&self) -> Result<(), String> {
        let mut backend = self.backend.borrow_mut();
        let backend = &mut **backend;
        let mut sel = self.sel.borrow_mut();
        for (slot, s) in self.slots.iter().enumerate() {
            let m = &s.model;
            let rows = m.batch.max_batch;
            let input = vec![0.0f32; rows * m.input_width];
            let mut output = vec![0.0f32; rows * m.output_width];
            let id = s.backend_id;
            let failed = |e| format!("warm-up of {} v{}: {e}", m.name, m.version);
            // Every staging slot at this size (the batchers keep that many
            // batches in flight), then each batch polled to completion.
            let mut tickets = [None; crate::backend::IN_FLIGHT_PER_MODEL];
            for t in &mut tickets {
                *t = Some(backend.submit(id, &input, rows).map_err(failed)?);
            }
            for t in tickets.into_iter().flatten() {
                loop {
                    match backend.poll(t, &mut output) {
                        std::task::Poll::Pending => std::thread::yield_now(),
                        std::task::Poll::Ready(r) => break r.map_err(failed)?,
                    }
                }
            }
            // The latency profile: best of three at each measured size.
            let profile = &mut sel.profiles[slot];
            for i in 0..3 {
                let n = profile.sizes[i] as usize;
                let mut best = f32::INFINITY;
                for _ in 0..3 {
                    let t = Instant::now();
                    crate::backend::run_registered(
                        backend,
                        id,
                        &input[..n * m.input_width],
                        n,
                        &mut output[..n * m.output_width],
                    )
                    .map_err(failed)?;
                    best = best.min(t.elapsed().as_secs_f32() * 1e6);
                }
                profile.set(i, best);
            }
            // Admission starts from the largest batch's cost per row.
            s.row_cost
                .set(RowCost::new(profile.us[2] / profile.sizes[2].max(1) as f32));
        }
        Ok(())
    }

    pub fn backend_name(&self) -> String {
        self.backend.borrow().name().to_string()
    }
}

/// Start the shard's tasks: one batcher per model slot, in a task queue of
/// their own, and the straggler-cutoff timer task. The batch queue's
/// latency requirement keeps glommio's preemption timer short: without it
/// busy batchers would run back to back for glommio's default 100 ms before
/// timers fired or sockets were read (straggler cutoffs 100 ms late).
pub(crate) fn spawn_tasks(shard: &Rc<Shard>) {
    let tq = glommio::executor().create_task_queue(
        glommio::Shares::default(),
        glommio::Latency::Matters(BATCH_PREEMPT),
        "beast-batch",
    );
    for slot in 0..shard.slots.len() {
        let batcher = shard.clone().run_batcher(slot);
        match glommio::spawn_local_into(batcher, tq) {
            Ok(t) => drop(t.detach()),
            Err(_) => drop(glommio::spawn_local(shard.clone().run_batcher(slot)).detach()),
        }
    }
    glommio::spawn_local(shard.clone().run_deadlines()).detach();
    if let Some(l3) = &shard.l3 {
        l3.register_version(shard);
    }
}

/// How long busy batchers may run before the executor polls for I/O and
/// timers.
const BATCH_PREEMPT: Duration = Duration::from_micros(500);
