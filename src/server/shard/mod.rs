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
use crate::backend::Backend;
use crate::batch::{Queue, RowCost};
use crate::config::Config;
use crate::ensemble::cost::SelectionCounters;
use crate::ensemble::EnsemblePlan;
use crate::metrics::ShardMetrics;
use crate::model::load::Repository;
use crate::model::Model;
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
mod state;

use answer::largest_answer;
use state::ModelSlot;
use state::{EnsemblePending, TargetRef};

pub(crate) struct Shard {
    /// Index of this shard (0-based), for logs.
    pub id: usize,
    pub cfg: Arc<Config>,
    pub slots: Vec<ModelSlot>,
    targets: HashMap<String, TargetRef>,
    plans: Vec<EnsemblePlan>,
    /// Cache policy of each plan (same index).
    plan_cache: Vec<TargetPolicy>,
    /// Most rows a request to each plan may carry (same index): the
    /// smallest member queue, and that member's slot.
    plan_rows_max: Vec<(usize, usize)>,
    cache: ShardCache,
    /// Run only by the batchers (`batcher.rs`; `warm_up` before them).
    backend: RefCell<Box<dyn Backend>>,
    /// Used only by `respond.rs`.
    encoder: RefCell<Encoder>,
    /// Ensemble entries: written by `ensemble.rs` (and the cutoff in
    /// `deadline.rs`, which finishes entries through it); the batchers
    /// only ask `is_live`.
    pending: RefCell<Slab<EnsemblePending>>,
    /// Request input converted to f32 (grown once to the largest request):
    /// filled by `admit.rs`, read by `ensemble.rs` for the first step.
    scratch: RefCell<Vec<f32>>,
    /// Error messages are formatted here instead of in a fresh String
    /// (`respond.rs` only).
    message: RefCell<String>,
    /// Bytes of the largest answer (whole frame) any request may get here:
    /// each request in flight holds this much of its connection's
    /// `pending_bytes_per_connection_max`.
    pub response_bytes_max: usize,
    pub metrics: Arc<ShardMetrics>,
    pub stopping: Cell<bool>,
    /// Numbers connections (wrapping; 0 is never used).
    conn_serial: Cell<u32>,
    sel: RefCell<SelState>,
    /// Per-ensemble, per-domain cost counters (read by `selection_stats`).
    pub selection: Arc<SelectionCounters>,
    /// Wakes the straggler-cutoff task when a deadline is added.
    pub deadline_wake: Notify,
    /// Requests waiting on the shared L3 tier (`l3.rs`), when configured.
    l3: Option<l3::L3Shard>,
}

impl Shard {
    pub fn new(
        id: usize,
        cfg: Arc<Config>,
        repo: &Repository,
        mut backend: Box<dyn Backend>,
        metrics: Arc<ShardMetrics>,
        cache_shared: Arc<CacheShared>,
        selection: Arc<SelectionCounters>,
    ) -> Result<Shard, String> {
        let l3 = cache_shared
            .l3
            .as_ref()
            .and_then(|l3| l3::L3Shard::new(l3, id));
        let cache = ShardCache::new(&cfg, cache_shared)?;
        let mut slots = Vec::new();
        let mut targets = HashMap::new();
        for (name, versions) in &repo.models {
            let mut v = Vec::new();
            for m in versions {
                v.push((m.version, slots.len()));
                let backend_id = backend.register(m).map_err(|e| {
                    format!(
                        "model {} v{}: backend {}: {e}",
                        m.name,
                        m.version,
                        backend.name()
                    )
                })?;
                slots.push(ModelSlot {
                    model: m.clone(),
                    backend_id,
                    queue: RefCell::new(Queue::new(m.batch, m.input_width)),
                    wake: Notify::default(),
                    row_cost: Cell::new(RowCost::new(0.0)),
                    cache: cache.policy(&cfg, name),
                });
            }
            targets.insert(name.clone(), TargetRef::Model(v));
        }
        if id == 0 {
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
                    Some(TargetRef::Model(v)) if !v.is_empty() => members.push(v.last().unwrap().1),
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
            plan_cache.push(cache.policy(&cfg, name));
        }
        let response_bytes_max = largest_answer(&cfg, &slots, &plans, &plan_rows_max)?;
        let models: Vec<&Arc<Model>> = slots.iter().map(|s| &s.model).collect();
        let mut sel = SelState::new(id, &cfg, &plans, &models);
        if !cfg.selection_state_path.as_os_str().is_empty() {
            let used = sel.load(&cfg.selection_state_path, id, &plans, |slot| {
                let m = &slots[slot].model;
                (m.name.clone(), m.version, m.digest)
            });
            if used > 0 {
                eprintln!("beast: shard {id}: selection state: {used} entries loaded");
            }
        }
        Ok(Shard {
            id,
            sel: RefCell::new(sel),
            selection,
            deadline_wake: Notify::default(),
            l3,
            pending: RefCell::new(Slab::with_capacity(cfg.ensemble_in_flight_per_shard_max)),
            cfg,
            slots,
            targets,
            plans,
            plan_cache,
            plan_rows_max,
            cache,
            backend: RefCell::new(backend),
            encoder: RefCell::new(Encoder::new()),
            scratch: RefCell::new(Vec::new()),
            message: RefCell::new(String::with_capacity(256)),
            response_bytes_max,
            metrics,
            stopping: Cell::new(false),
            conn_serial: Cell::new(0),
        })
    }

    /// A fresh number for a new connection.
    pub fn next_conn_serial(&self) -> u32 {
        let n = self.conn_serial.get().wrapping_add(1).max(1);
        self.conn_serial.set(n);
        n
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
    if shard.l3.is_some() {
        glommio::spawn_local(shard.clone().run_l3()).detach();
    }
}

/// How long busy batchers may run before the executor polls for I/O and
/// timers.
const BATCH_PREEMPT: Duration = Duration::from_micros(500);
