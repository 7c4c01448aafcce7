//! One shard: everything one core owns — its models' batch queues, its
//! backend, its pending ensemble requests, its encoder — and the request
//! path from a decoded frame to an encoded response.
//!
//! Ensemble requests pass member selection (`ensemble`): the policy picks
//! the members, a cascade steps through them from `member_done`, the
//! straggler task (`run_deadlines`) answers what a deadline cuts off, and
//! every computed answer gets a ticket that a later feedback message
//! (`handle_feedback`) can name.
//!
//! Nothing here is shared with another core except the immutable models
//! (`Arc<Model>`) and the metrics and selection counters this shard alone
//! writes.

use super::cache::{CacheShared, ShardCache, TargetPolicy};
use super::conn_state::Conn;
use super::notify::Notify;
use super::select::SelState;
use super::slab::Slab;
use crate::backend::Backend;
use crate::batch::{Dropped, Queue, Queued, Readiness, RowCost};
use crate::cache::CacheKey;
use crate::config::Config;
use crate::ensemble::cost::SelectionCounters;
use crate::ensemble::EnsemblePlan;
use crate::metrics::ShardMetrics;
use crate::model::load::Repository;
use crate::model::Model;
use crate::wire::{Encoder, FeedbackView, RunInfo, Status, Timings};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod admit;
mod answer;
mod deadline;
mod ensemble;
mod respond;
mod state;

use answer::{largest_answer, micros, refusal, Extra};
use state::{EnsemblePending, TargetRef};
use state::{Job, ModelSlot};

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
    backend: RefCell<Box<dyn Backend>>,
    encoder: RefCell<Encoder>,
    pending: RefCell<Slab<EnsemblePending>>,
    /// Request input converted to f32 (grown once to the largest request).
    scratch: RefCell<Vec<f32>>,
    /// Error messages are formatted here instead of in a fresh String.
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
}

impl Shard {
    pub fn new(
        id: usize,
        cfg: Arc<Config>,
        repo: &Repository,
        backend: Box<dyn Backend>,
        metrics: Arc<ShardMetrics>,
        cache_shared: Arc<CacheShared>,
        selection: Arc<SelectionCounters>,
    ) -> Result<Shard, String> {
        let cache = ShardCache::new(&cfg, cache_shared)?;
        let mut slots = Vec::new();
        let mut targets = HashMap::new();
        for (name, versions) in &repo.models {
            let mut v = Vec::new();
            for m in versions {
                v.push((m.version, slots.len()));
                slots.push(ModelSlot {
                    model: m.clone(),
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
            let plan =
                EnsemblePlan::new(spec, members, flops, first.input_width, first.output_width)?;
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

    /// Run every model once at its largest batch so scratch buffers reach
    /// their steady size before the first request.
    pub fn warm_up(&self) -> Result<(), String> {
        let mut backend = self.backend.borrow_mut();
        let mut sel = self.sel.borrow_mut();
        for (slot, s) in self.slots.iter().enumerate() {
            let m = &s.model;
            let rows = m.batch.max_batch;
            let input = vec![0.0f32; rows * m.input_width];
            let mut output = vec![0.0f32; rows * m.output_width];
            backend
                .run(m, &input, rows, &mut output)
                .map_err(|e| format!("warm-up of {} v{}: {e}", m.name, m.version))?;
            // The latency profile: best of three at each measured size.
            let profile = &mut sel.profiles[slot];
            for i in 0..3 {
                let n = profile.sizes[i] as usize;
                let mut best = f32::INFINITY;
                for _ in 0..3 {
                    let t = Instant::now();
                    backend
                        .run(
                            m,
                            &input[..n * m.input_width],
                            n,
                            &mut output[..n * m.output_width],
                        )
                        .map_err(|e| format!("warm-up of {} v{}: {e}", m.name, m.version))?;
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

    /// A feedback message: learn from it and answer OK, or NOT_FOUND.
    fn handle_feedback(&self, conn: &Conn, f: &FeedbackView, arrival: Instant) {
        let mut sel = self.sel.borrow_mut();
        let sel = &mut *sel;
        let Some((entry, rows)) = sel.window.take(f.ticket, conn.serial) else {
            return self.respond_error(
                conn,
                f.id,
                Status::NotFound,
                "unknown ticket: expired, already given feedback, or issued to another connection (send feedback on the connection that got the answer)",
                arrival,
            );
        };
        let p = entry.plan as usize;
        let plan = &self.plans[p];
        if f.label as usize >= plan.output_width {
            // A bad label does not spend the ticket.
            sel.window.restore(f.ticket);
            return self.respond_error_fmt(
                conn,
                f.id,
                Status::BadRequest,
                arrival,
                format_args!(
                    "label {} is not a class of '{}' ({} classes)",
                    f.label, plan.name, plan.output_width
                ),
            );
        }
        let correct = sel.learned[p].learn(&entry, rows, f.label as usize);
        let c = self.selection.at(p, entry.domain_slot as usize);
        c.feedback
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        c.feedback_correct
            .fetch_add(correct as u64, std::sync::atomic::Ordering::Relaxed);
        self.respond_ok(
            conn,
            f.id,
            0,
            0,
            &[],
            &[],
            arrival,
            Timings::default(),
            false,
            Extra::default(),
        );
    }

    /// Answer the jobs `take_batch` dropped: an expired direct request gets
    /// DEADLINE_EXCEEDED (a cancelled member needs nothing: its ensemble
    /// was answered).
    fn answer_dropped(&self, slot: usize, dropped: &mut Vec<(Queued<Job>, Dropped)>) {
        for (q, why) in dropped.drain(..) {
            match why {
                Dropped::Expired => self.metrics.rows_dropped_expired.add(q.rows as u64),
                Dropped::Cancelled => self.metrics.rows_dropped_cancelled.add(q.rows as u64),
            }
            if let Job::Direct {
                conn,
                id,
                arrival,
                key,
                leader,
                ..
            } = q.job
            {
                self.metrics.set_target_slot(slot);
                conn.in_flight.set(conn.in_flight.get() - 1);
                if let (true, Some(k)) = (leader, key) {
                    // Dropped only without waiters: this ends the flight.
                    drop(self.cache.coalescer.borrow_mut().complete(k));
                }
                self.respond_error(
                    &conn,
                    id,
                    Status::DeadlineExceeded,
                    "deadline passed before the request was computed",
                    arrival,
                );
            }
        }
    }

    /// Answer each job of a finished batch. `output` holds the batch's
    /// rows in job order; `ok` is the backend's verdict for all of them.
    fn dispatch(
        &self,
        slot: usize,
        jobs: &mut Vec<Queued<Job>>,
        output: &[f32],
        started: Instant,
        compute: Duration,
        ok: bool,
    ) {
        let s = &self.slots[slot];
        let out_w = s.model.output_width;
        let compute_us = micros(compute);
        let flops_row = s.model.flops_per_row();
        let mut off = 0;
        let now = Instant::now();
        for q in jobs.drain(..) {
            let out = &output[off..off + q.rows * out_w];
            off += q.rows * out_w;
            let queue_us = micros(started.saturating_duration_since(q.enqueued));
            match q.job {
                Job::Direct {
                    conn,
                    id,
                    arrival,
                    deadline,
                    key,
                    leader,
                } => {
                    self.metrics.set_target_slot(slot);
                    conn.in_flight.set(conn.in_flight.get() - 1);
                    let runs = [RunInfo {
                        model: &s.model.name,
                        version: s.model.version,
                        flops: flops_row * q.rows as u64,
                    }];
                    if let (true, Some(k)) = (ok, key) {
                        self.cache.insert(&self.metrics, k, s.cache, out);
                    }
                    if let (true, Some(k)) = (leader, key) {
                        let t = Timings {
                            queue_us,
                            compute_us,
                            total_us: 0,
                        };
                        self.release_waiters(k, ok, false, q.rows, out_w, out, &runs, t);
                    }
                    if let Some((status, message)) = refusal(ok, deadline, Instant::now()) {
                        self.respond_error(&conn, id, status, message, arrival);
                    } else {
                        let t = Timings {
                            queue_us,
                            compute_us,
                            total_us: 0,
                        };
                        self.respond_ok(
                            &conn,
                            id,
                            q.rows,
                            out_w,
                            out,
                            &runs,
                            arrival,
                            t,
                            false,
                            Extra::default(),
                        );
                    }
                }
                Job::Member {
                    pending,
                    generation,
                    member,
                    key,
                } => {
                    if let (true, Some(k)) = (ok, key) {
                        self.cache.insert(&self.metrics, k, s.cache, out);
                    }
                    self.member_done(
                        pending,
                        generation,
                        member as usize,
                        out,
                        ok,
                        queue_us,
                        compute_us,
                        now,
                    )
                }
            }
        }
    }

    /// Answer the requests that waited on an identical one (coalescing).
    #[allow(clippy::too_many_arguments)]
    fn release_waiters(
        &self,
        key: CacheKey,
        ok: bool,
        partial: bool,
        rows: usize,
        cols: usize,
        out: &[f32],
        runs: &[RunInfo<'_>],
        t: Timings,
    ) {
        let mut co = self.cache.coalescer.borrow_mut();
        for w in co.complete(key) {
            w.conn.in_flight.set(w.conn.in_flight.get() - 1);
            if let Some((status, message)) = refusal(ok, w.deadline, Instant::now()) {
                self.respond_error(&w.conn, w.id, status, message, w.arrival);
            } else {
                self.respond_ok(
                    &w.conn,
                    w.id,
                    rows,
                    cols,
                    out,
                    runs,
                    w.arrival,
                    t,
                    true,
                    Extra { ticket: 0, partial },
                );
            }
        }
    }

    /// The batcher of one model slot: answer the ensembles this batch would
    /// make late (straggler cutoff), wait for the policy to say "now", take
    /// a batch (dropping jobs that expire before it ends and members nobody
    /// waits for), run it, answer its jobs, then yield the batch task queue
    /// so connections read, write and time out before the next batch.
    pub async fn run_batcher(self: Rc<Self>, slot: usize) {
        let s = &self.slots[slot];
        let limits = s.model.batch;
        let mut jobs: Vec<Queued<Job>> = Vec::with_capacity(limits.max_batch);
        let mut dropped: Vec<(Queued<Job>, Dropped)> = Vec::with_capacity(limits.queue_rows_max);
        let mut input: Vec<f32> = Vec::with_capacity(limits.max_batch * s.model.input_width);
        let mut output: Vec<f32> = Vec::with_capacity(limits.max_batch * s.model.output_width);
        loop {
            let now = Instant::now();
            // When the next batch would end, were it taken now.
            let batch_end = {
                let rows = s.queue.borrow().rows_queued().min(limits.max_batch);
                let us = rows as f32 * s.row_cost.get().us_per_row();
                now + Duration::from_micros(if us.is_finite() { us as u64 } else { 0 })
            };
            if self.cut_off_due(batch_end + CUTOFF_MARGIN) > 0 {
                // Let the writers send those answers before computing.
                glommio::executor().yield_task_queue_now().await;
                continue;
            }
            let readiness = s.queue.borrow().readiness(now);
            match readiness {
                Readiness::Empty => {
                    // Shutdown: nothing queued, and nothing can arrive once
                    // no ensemble is pending (a cascade enqueues its next
                    // step only when the previous one has answered).
                    if self.stopping.get() && self.pending.borrow().in_use() == 0 {
                        return;
                    }
                    s.wake.wait().await;
                    continue;
                }
                Readiness::At(t) => {
                    let wait = t.saturating_duration_since(Instant::now());
                    futures_lite::future::or(glommio::timer::sleep(wait), s.wake.wait()).await;
                    continue;
                }
                Readiness::Now => {}
            }
            let rows = {
                let pending = self.pending.borrow();
                let co = self.cache.coalescer.borrow();
                let verdict = |j: &Job| match *j {
                    Job::Member {
                        pending: k,
                        generation,
                        ..
                    } => (!pending.is_live(k, generation)).then_some(Dropped::Cancelled),
                    // A leader is queued without its deadline: it is
                    // dropped for it only while nobody waits on it.
                    Job::Direct {
                        leader: true,
                        deadline: Some(d),
                        key: Some(k),
                        ..
                    } if d <= batch_end && co.waiters(&k) == 0 => Some(Dropped::Expired),
                    Job::Direct { .. } => None,
                };
                s.queue.borrow_mut().take_batch(
                    batch_end,
                    verdict,
                    &mut jobs,
                    &mut dropped,
                    &mut input,
                )
            };
            if !dropped.is_empty() {
                self.answer_dropped(slot, &mut dropped);
            }
            if rows == 0 {
                glommio::executor().yield_task_queue_now().await;
                continue;
            }
            output.clear();
            output.resize(rows * s.model.output_width, 0.0);
            let started = Instant::now();
            let ok = self
                .backend
                .borrow_mut()
                .run(&s.model, &input, rows, &mut output)
                .is_ok();
            let compute = started.elapsed();
            self.metrics.record_batch(slot, rows, compute);
            self.sel.borrow_mut().profiles[slot].observe(rows as u32, compute.as_secs_f32() * 1e6);
            self.dispatch(slot, &mut jobs, &output, started, compute, ok);
            // What a row costs this shard, answering included (admission).
            let mut cost = s.row_cost.get();
            cost.observe(rows, started.elapsed().as_secs_f32() * 1e6);
            s.row_cost.set(cost);
            // Let connections read what arrived during the compute (so the
            // next batch is as full as the load allows) and write what this
            // batch answered: the other task queue runs before the next batch.
            glommio::executor().yield_task_queue_now().await;
        }
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
}

/// How long busy batchers may run before the executor polls for I/O and
/// timers.
const BATCH_PREEMPT: Duration = Duration::from_micros(500);

/// Ensembles whose deadline falls within this much after the end of the
/// next batch are answered before it (their answer must still be written).
const CUTOFF_MARGIN: Duration = Duration::from_micros(300);

impl Shard {
    /// Save what selection learned (clean shutdown).
    pub fn save_selection_state(&self) {
        let path = &self.cfg.selection_state_path;
        if path.as_os_str().is_empty() {
            return;
        }
        let r = self.sel.borrow().save(path, self.id, &self.plans, |slot| {
            let m = &self.slots[slot].model;
            (m.name.clone(), m.version, m.digest)
        });
        if let Err(e) = r {
            eprintln!("beast: shard {}: saving selection state: {e}", self.id);
        }
    }
}
