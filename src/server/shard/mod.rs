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

use super::cache::{CacheShared, Joined, ShardCache, TargetPolicy};
use super::conn_state::Conn;
use super::notify::Notify;
use super::select::SelState;
use super::slab::Slab;
use crate::backend::Backend;
use crate::batch::{Dropped, Queue, Queued, Readiness, RowCost};
use crate::cache::CacheKey;
use crate::config::{Config, ENSEMBLE_MEMBERS_MAX};
use crate::ensemble::cascade::confident;
use crate::ensemble::cost::{domain_hash, SelectionCounters};
use crate::ensemble::feedback::Entry;
use crate::ensemble::{argmax, effective_policy, EnsemblePlan, MemberSet, Weight};
use crate::metrics::{ShardMetrics, Shed};
use crate::model::load::Repository;
use crate::model::{Combiner, Model, Policy};
use crate::wire::{CacheControl, Encoder, FeedbackView, RequestView, RunInfo, Status, Timings};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod admit;
mod answer;
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

    fn submit_ensemble(&self, conn: &Rc<Conn>, req: &RequestView<'_>, p: usize, arrival: Instant) {
        let plan = &self.plans[p];
        let policy = effective_policy(req.policy, plan.selection.policy);
        let rows = req.rows as usize;
        let deadline = Self::deadline(req, arrival);
        let dhash = domain_hash(req.domain);
        let mut predicted_us = 0.0;
        let (dslot, set, arm) = {
            let mut sel = self.sel.borrow_mut();
            let dslot = sel.domains[p].slot(dhash);
            if dslot != 0 {
                // Allocates once per slot, the first time (bounded).
                self.selection
                    .at(p, dslot)
                    .domain
                    .get_or_init(|| req.domain.unwrap_or_default().to_string());
            }
            let (set, arm) = match policy {
                Policy::All => (plan.all(), None),
                Policy::Cascade => (MemberSet::one(plan.by_cost[0] as usize), None),
                Policy::Bandit => {
                    let sel = &mut *sel;
                    let l = &sel.learned[p];
                    let a = l
                        .bandit
                        .pick(dslot, plan.selection.bandit_cost_weight, &mut sel.rng);
                    (l.bandit.arms[a], Some(a as u8))
                }
                Policy::Deadline => match deadline {
                    None => (plan.all(), None),
                    Some(d) => {
                        let budget_us =
                            d.saturating_duration_since(Instant::now()).as_secs_f32() * 1e6;
                        match self.pick_for_deadline(&sel, p, dslot, rows, budget_us) {
                            Some((set, us)) => {
                                predicted_us = us;
                                (set, None)
                            }
                            None => {
                                sel.deadline_refused();
                                drop(sel);
                                self.selection
                                    .at(p, dslot)
                                    .deadline_refused
                                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                return self.respond_error(
                                    conn,
                                    req.id,
                                    Status::DeadlineExceeded,
                                    "no member of the ensemble can answer within the budget",
                                    arrival,
                                );
                            }
                        }
                    }
                },
            };
            (dslot, set, arm)
        };
        // Single-threaded: checking every queue first makes the enqueue all-or-nothing.
        if let Some(i) = set
            .iter()
            .find(|&i| !self.slots[plan.members[i]].queue.borrow().has_room(rows))
        {
            let name = &self.slots[plan.members[i]].model.name;
            self.metrics.record_shed(Shed::QueueFull);
            return self.respond_error_fmt(
                conn,
                req.id,
                Status::Overloaded,
                arrival,
                format_args!("queue of member '{name}' of '{}' is full", plan.name),
            );
        }
        let out_len = rows * plan.output_width;
        let key = plan.cache_fingerprint(policy).and_then(|fp| {
            self.cache
                .key(&plan.name, self.plan_cache[p], req, out_len, |mut k| {
                    k = k.ensemble(fp);
                    for &m in &plan.members {
                        let m = &self.slots[m].model;
                        k = k.model(&m.name, m.version as u64, m.digest);
                    }
                    k
                })
        });
        let mut leader = false;
        if let (Some(k), CacheControl::Use) = (key, req.cache) {
            let mut buf = self.cache.buf.borrow_mut();
            if self
                .cache
                .get(&self.metrics, k, self.plan_cache[p], &mut buf[..out_len])
            {
                let mut runs = [RunInfo {
                    model: "",
                    version: 0,
                    flops: 0,
                }; ENSEMBLE_MEMBERS_MAX];
                for (r, &slot) in runs.iter_mut().zip(&plan.members) {
                    let m = &self.slots[slot].model;
                    *r = RunInfo {
                        model: &m.name,
                        version: m.version,
                        flops: 0,
                    };
                }
                let t = Timings::default();
                return self.respond_ok(
                    conn,
                    req.id,
                    rows,
                    plan.output_width,
                    &buf[..out_len],
                    &runs[..plan.members.len()],
                    arrival,
                    t,
                    true,
                    Extra::default(),
                );
            }
        }
        let members = set.iter().map(|i| plan.members[i]);
        if !self.admit(conn, req.id, members, rows, deadline, arrival) {
            return;
        }
        if !self.read_input(conn, req, arrival) {
            return;
        }
        let mut pending = self.pending.borrow_mut();
        let Some(k) = pending.acquire() else {
            drop(pending);
            self.metrics.record_shed(Shed::EnsembleSlots);
            return self.respond_error(
                conn,
                req.id,
                Status::Overloaded,
                "too many ensemble requests in flight on this shard",
                arrival,
            );
        };
        drop(pending);
        // A request with a deadline may be cut off (partial, or no answer
        // at all): it neither leads nor joins, so requests identical but
        // for the deadline never get its cut-off answer.
        if let (Some(key), CacheControl::Use, None) = (key, req.cache, deadline) {
            match self
                .cache
                .join(&self.metrics, key, conn, req.id, arrival, deadline)
            {
                Joined::Waiting => {
                    self.pending.borrow_mut().release(k);
                    return;
                }
                Joined::Leader => leader = true,
                Joined::Alone => {}
            }
        }
        let generation = {
            let mut pending = self.pending.borrow_mut();
            let e = pending.get_mut(k);
            e.conn = Some(conn.clone());
            e.id = req.id;
            e.plan = p;
            e.rows = req.rows;
            e.remaining = 0;
            e.computed = MemberSet::default();
            e.ran = MemberSet::default();
            e.failed = false;
            e.arrival = Some(arrival);
            e.deadline = deadline;
            e.queue_us = 0;
            e.compute_us = 0;
            e.key = key;
            e.leader = leader;
            e.policy = policy;
            e.domain_slot = dslot as u16;
            e.domain_hash = dhash;
            e.step = 1;
            e.arm = arm;
            e.predicted_us = predicted_us;
            e.partial = false;
            e.cache_control = req.cache;
            for (i, &slot) in plan.members.iter().enumerate() {
                let s = &self.slots[slot];
                // Member-level entries are the ones a direct request to the
                // member would use, so ensembles sharing a member share them.
                e.member_keys[i] = self.cache.key(
                    &s.model.name,
                    s.cache,
                    req,
                    rows * s.model.output_width,
                    |k| k.model(&s.model.name, s.model.version as u64, s.model.digest),
                );
            }
            e.input.clear();
            if policy == Policy::Cascade {
                e.input
                    .extend_from_slice(&self.scratch.borrow()[..rows * plan.input_width]);
            }
            e.first_rows.clear();
            e.first_rows
                .resize(plan.members.len() * plan.output_width, 0.0);
            e.acc.reset(rows, plan.output_width);
            e.generation
        };
        conn.in_flight.set(conn.in_flight.get() + 1);
        // Every ensemble request with a budget gets the straggler cutoff.
        if let Some(d) = deadline {
            let pending = self.pending.borrow();
            self.sel
                .borrow_mut()
                .watch(d, k, generation, |k, g| pending.is_live(k, g));
            drop(pending);
            self.deadline_wake.notify();
        }
        let started = self.run_members(k, set, true, arrival);
        debug_assert!(started.is_ok(), "room was checked");
        if self.pending.borrow_mut().get_mut(k).remaining == 0 {
            self.advance(k, Instant::now());
        }
    }

    /// The best member set under the deadline policy whose predicted
    /// completion fits `budget_us`: most accurate (per-member accuracy from
    /// feedback in this domain, summed), cheapest on ties; `None` if even the
    /// fastest single member cannot make it.
    fn pick_for_deadline(
        &self,
        sel: &SelState,
        p: usize,
        dslot: usize,
        rows: usize,
        budget_us: f32,
    ) -> Option<(MemberSet, f32)> {
        let plan = &self.plans[p];
        let n = plan.members.len();
        // What the profiles miss (scheduling, the other tasks of the core),
        // learned from answered requests.
        let slack = &sel.deadline_slack_us;
        let l = &sel.learned[p];
        // Predicted time of one member: its batching delay (only a turn of
        // the executor once `min_batch` rows are queued), then every batch
        // ahead of it and its own.
        let member_us = |i: usize| {
            let slot = plan.members[i];
            let s = &self.slots[slot];
            let q = s.queue.borrow();
            let ahead = (q.rows_queued() + rows) as u32;
            let b = s.model.batch;
            let delay = if ahead as usize >= b.min_batch.min(b.max_batch) {
                BATCHER_TURN_US
            } else {
                b.max_queue_delay_us as f32
            };
            (delay, sel.profiles[slot].predict_us(ahead))
        };
        let mut times = [(0f32, 0f32); ENSEMBLE_MEMBERS_MAX];
        for (i, t) in times.iter_mut().enumerate().take(n) {
            *t = member_us(i);
        }
        // Members share one core: their computes add up, their delays overlap.
        let predict = |set: MemberSet| {
            let (mut delay, mut compute) = (0f32, 0f32);
            for i in set.iter() {
                delay = delay.max(times[i].0);
                compute += times[i].1;
            }
            delay + compute + slack[set.len()]
        };
        let score = |set: MemberSet| -> f32 {
            set.iter()
                .map(|i| {
                    let a = l.accuracy(dslot, i);
                    // Without feedback, cost stands in for accuracy.
                    if a.total > 0.0 {
                        a.mean()
                    } else {
                        0.5 + 1e-3
                            * plan
                                .by_cost
                                .iter()
                                .position(|&m| m as usize == i)
                                .unwrap_or(0) as f32
                    }
                })
                .sum()
        };
        // Every subset of small ensembles; prefixes of the cost order otherwise.
        let mut best: Option<(f32, u64, MemberSet)> = None;
        let mut consider = |set: MemberSet| {
            if set.is_empty() || predict(set) > budget_us {
                return;
            }
            let (sc, cost) = (score(set), plan.flops_of(set));
            if best.is_none_or(|(bs, bc, _)| sc > bs || (sc == bs && cost < bc)) {
                best = Some((sc, cost, set));
            }
        };
        if n <= DEADLINE_SUBSETS_MEMBERS_MAX {
            for bits in 1..(1u32 << n) {
                consider(MemberSet(bits as u16));
            }
        } else {
            let mut set = MemberSet::default();
            for &m in &plan.by_cost {
                set.insert(m as usize);
                consider(set);
                consider(MemberSet::one(m as usize));
            }
        }
        // The entry keeps the profiles' own prediction (without the slack),
        // which is what the slack learns to correct.
        best.map(|b| (b.2, predict(b.2) - slack[b.2.len()]))
    }

    /// Enqueue the members of `set` for pending entry `k`, or combine them
    /// from the member-level cache. `from_scratch`: the request's rows are
    /// still in the shard scratch (first step); later cascade steps use the
    /// entry's own copy. Err(member) when that member's queue is full
    /// (nothing enqueued).
    fn run_members(
        &self,
        k: usize,
        set: MemberSet,
        from_scratch: bool,
        enqueued: Instant,
    ) -> Result<(), usize> {
        let mut pending = self.pending.borrow_mut();
        let e = pending.get_mut(k);
        let plan = &self.plans[e.plan];
        let rows = e.rows as usize;
        if let Some(i) = set
            .iter()
            .find(|&i| !self.slots[plan.members[i]].queue.borrow().has_room(rows))
        {
            return Err(i);
        }
        // Taken out (not copied) so the entry can be updated while reading it.
        let kept = std::mem::take(&mut e.input);
        let scratch = self.scratch.borrow();
        let n_in = rows * plan.input_width;
        let input = if from_scratch {
            &scratch[..n_in]
        } else {
            &kept[..n_in]
        };
        for i in set.iter() {
            let s = &self.slots[plan.members[i]];
            let member_key = e.member_keys[i];
            if let (Some(mk), CacheControl::Use) = (member_key, e.cache_control) {
                let mut buf = self.cache.buf.borrow_mut();
                let n = rows * s.model.output_width;
                if self.cache.get(&self.metrics, mk, s.cache, &mut buf[..n]) {
                    self.combine_member(e, i, &buf[..n]);
                    continue;
                }
            }
            let mut q = s.queue.borrow_mut();
            let job = Job::Member {
                pending: k,
                generation: e.generation,
                member: i as u8,
                key: member_key,
            };
            // A member is not dropped for its deadline in the queue: the
            // straggler cutoff answers the entry, and that cancels it.
            let pushed = q.push(job, input, enqueued, None);
            debug_assert!(pushed.is_ok(), "room was checked");
            e.remaining += 1;
            if q.readiness(enqueued) == Readiness::Now || q.rows_queued() == rows {
                s.wake.notify();
            }
        }
        drop(scratch);
        e.input = kept;
        Ok(())
    }

    /// Add one member's output to the entry's combination.
    fn combine_member(&self, e: &mut EnsemblePending, member: usize, out: &[f32]) {
        let plan = &self.plans[e.plan];
        let cols = plan.output_width;
        if plan.combiner == Combiner::Stacked {
            let sel = self.sel.borrow();
            e.acc.add(
                out,
                Weight::PerClass(sel.learned[e.plan].stacker.weights(member)),
            );
        } else {
            e.acc.add(out, Weight::Scalar(plan.weights[member]));
        }
        e.ran.insert(member);
        e.first_rows[member * cols..(member + 1) * cols].copy_from_slice(&out[..cols]);
    }

    /// The current step's members have all answered: take the next cascade
    /// step, or answer.
    fn advance(&self, k: usize, now: Instant) {
        loop {
            let next = {
                let mut pending = self.pending.borrow_mut();
                let e = pending.get_mut(k);
                let plan = &self.plans[e.plan];
                let sel = &plan.selection;
                let done = e.failed
                    || e.policy != Policy::Cascade
                    || e.step as usize >= plan.by_cost.len()
                    || confident(
                        e.acc.combine(plan.combiner),
                        plan.output_width,
                        sel.cascade_metric,
                        sel.cascade_threshold,
                    );
                if done {
                    None
                } else {
                    let m = plan.by_cost[e.step as usize] as usize;
                    e.step += 1;
                    Some(MemberSet::one(m))
                }
            };
            let Some(set) = next else {
                return self.finish_ensemble(k, now);
            };
            if self.run_members(k, set, false, now).is_err() {
                // The next member's queue is full: answer with what ran.
                self.pending.borrow_mut().get_mut(k).partial = true;
                return self.finish_ensemble(k, now);
            }
            if self.pending.borrow_mut().get_mut(k).remaining > 0 {
                return;
            }
        }
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

    /// The straggler cutoff: answer deadline-policy ensemble requests whose
    /// deadline has come with the members that finished (`partial`).
    pub async fn run_deadlines(self: Rc<Self>) {
        loop {
            if self.stopping.get() {
                // Everything in flight is answered by now or soon; items of
                // answered entries must not keep this task (and the shard) alive.
                let pending = self.pending.borrow();
                let mut sel = self.sel.borrow_mut();
                sel.deadlines.retain(|r| pending.is_live(r.0 .1, r.0 .2));
                if sel.deadlines.is_empty() {
                    return;
                }
            }
            let next = self.sel.borrow().deadlines.peek().map(|r| r.0 .0);
            match next {
                None => {
                    if self.stopping.get() {
                        return;
                    }
                    self.deadline_wake.wait().await;
                    continue;
                }
                Some(t) => {
                    let now = Instant::now();
                    if t > now {
                        futures_lite::future::or(
                            glommio::timer::sleep(t - now),
                            self.deadline_wake.wait(),
                        )
                        .await;
                        continue;
                    }
                }
            }
            self.cut_off_due(Instant::now());
        }
    }

    /// Answer every watched ensemble request whose deadline is at or before
    /// `horizon` with the members that finished (`partial`); their queued
    /// members are then dropped, not computed. Returns how many were
    /// answered. Called by the timer task at the deadline and by every
    /// batcher before each batch, with the batch's predicted end as the
    /// horizon: a busy core still answers on time.
    fn cut_off_due(&self, horizon: Instant) -> usize {
        let now = Instant::now();
        let mut answered = 0;
        loop {
            let item = {
                let mut sel = self.sel.borrow_mut();
                match sel.deadlines.peek() {
                    Some(r) if r.0 .0 <= horizon => sel.deadlines.pop(),
                    _ => None,
                }
            };
            let Some(std::cmp::Reverse((_, k, generation))) = item else {
                break;
            };
            if self.pending.borrow().is_live(k, generation) {
                self.pending.borrow_mut().get_mut(k).partial = true;
                self.finish_ensemble(k, now);
                answered += 1;
            }
        }
        answered
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

    #[allow(clippy::too_many_arguments)]
    fn member_done(
        &self,
        k: usize,
        generation: u32,
        member: usize,
        out: &[f32],
        ok: bool,
        queue_us: u32,
        compute_us: u32,
        now: Instant,
    ) {
        let mut pending = self.pending.borrow_mut();
        if !pending.is_live(k, generation) {
            // Answered without it (straggler cutoff).
            return;
        }
        let e = pending.get_mut(k);
        if ok {
            self.combine_member(e, member, out);
        } else {
            e.failed = true;
        }
        e.computed.insert(member);
        e.queue_us = e.queue_us.max(queue_us);
        e.compute_us = e.compute_us.saturating_add(compute_us);
        e.remaining -= 1;
        if e.remaining == 0 {
            drop(pending);
            self.advance(k, now);
        }
    }

    /// Every chosen member has answered (or came from the cache, or the
    /// deadline cut the rest off): combine, cache, account, answer the
    /// waiters and the request, free the entry.
    fn finish_ensemble(&self, k: usize, now: Instant) {
        let mut pending = self.pending.borrow_mut();
        let e = pending.get_mut(k);
        let plan = &self.plans[e.plan];
        self.metrics.set_target_plan(e.plan);
        let Some(conn) = e.conn.take() else {
            return;
        };
        let arrival = e.arrival.expect("pending entry has an arrival");
        conn.in_flight.set(conn.in_flight.get() - 1);
        let mut runs = [RunInfo {
            model: "",
            version: 0,
            flops: 0,
        }; ENSEMBLE_MEMBERS_MAX];
        let mut n = 0;
        let mut flops_run = 0;
        for i in e.ran.iter() {
            let m = &self.slots[plan.members[i]].model;
            let flops = if e.computed.contains(i) {
                m.flops_per_row() * e.rows as u64
            } else {
                0
            };
            flops_run += flops;
            runs[n] = RunInfo {
                model: &m.name,
                version: m.version,
                flops,
            };
            n += 1;
        }
        let (id, rows, out_w) = (e.id, e.rows as usize, plan.output_width);
        let partial = e.partial;
        // Nothing answered before the cutoff: there is no answer to give.
        let late = partial && e.ran.is_empty();
        let failed = e.failed;
        let t = Timings {
            queue_us: e.queue_us,
            compute_us: e.compute_us,
            total_us: 0,
        };
        let (key, leader, deadline) = (e.key, e.leader, e.deadline);
        let c = self.selection.at(e.plan, e.domain_slot as usize);
        c.record_request(
            e.domain_hash,
            e.computed.len() as u64,
            flops_run,
            plan.flops_of(plan.all()) * e.rows as u64,
            partial,
        );
        if e.predicted_us > 0.0 && !failed {
            // A cut-off answer took at least its budget: a lower bound of
            // what the members would have taken.
            let took = now.saturating_duration_since(arrival).as_secs_f32() * 1e6;
            let members = e.ran.len() + e.remaining as usize;
            self.sel
                .borrow_mut()
                .observe_deadline(members, took, e.predicted_us);
        }
        let combined = e.acc.combine(plan.combiner);
        let ticket = if failed || late {
            0
        } else {
            let entry = Entry {
                ticket: 0,
                conn: conn.serial,
                plan: e.plan as u16,
                domain_slot: e.domain_slot,
                ran: e.ran,
                arm: e.arm,
                answer: argmax(&combined[..out_w]) as u16,
                used: false,
            };
            let first_rows = &e.first_rows;
            self.sel
                .borrow_mut()
                .window
                .push(entry, out_w, |m| &first_rows[m * out_w..(m + 1) * out_w])
        };
        if let (false, false, Some(key)) = (failed, partial, key) {
            self.cache
                .insert(&self.metrics, key, self.plan_cache[e.plan], combined);
        }
        if let (true, Some(key)) = (leader, key) {
            let ok = !failed && !late;
            self.release_waiters(key, ok, partial, rows, out_w, combined, &runs[..n], t);
        }
        // A partial answer is the deadline's own answer, given at the
        // deadline: late only when the cutoff itself came over
        // PARTIAL_GRACE after it (the core was taken away, say).
        let refused = if late && !failed {
            Some((
                Status::DeadlineExceeded,
                "deadline passed before any member answered",
            ))
        } else {
            let by = deadline.map(|d| if partial { d + PARTIAL_GRACE } else { d });
            refusal(!failed, by, Instant::now())
        };
        if let Some((status, message)) = refused {
            self.respond_error(&conn, id, status, message, arrival);
        } else {
            self.respond_ok(
                &conn,
                id,
                rows,
                out_w,
                combined,
                &runs[..n],
                arrival,
                t,
                false,
                Extra { ticket, partial },
            );
        }
        e.generation = e.generation.wrapping_add(1);
        pending.release(k);
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

/// A cut-off (partial) answer may leave this long after its deadline: the
/// timer fires at the deadline, not before it.
const PARTIAL_GRACE: Duration = Duration::from_millis(1);

/// How long busy batchers may run before the executor polls for I/O and
/// timers.
const BATCH_PREEMPT: Duration = Duration::from_micros(500);

/// A queued job waits at least this long for its batcher, even when the
/// backend is free: the connection task must yield and the batch task
/// queue get its turn (a few µs measured on an idle server).
const BATCHER_TURN_US: f32 = 5.0;

/// Ensembles whose deadline falls within this much after the end of the
/// next batch are answered before it (their answer must still be written).
const CUTOFF_MARGIN: Duration = Duration::from_micros(300);

/// Ensembles of at most this many members have every subset considered
/// by the deadline policy (2^n − 1 sets); larger ones, prefixes of the cost order.
const DEADLINE_SUBSETS_MEMBERS_MAX: usize = 6;

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
