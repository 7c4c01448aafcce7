//! The ensemble state machine: a request's chosen members are enqueued (or
//! read from the member-level cache) into a pending entry, each member's
//! result is combined as it finishes (`member_done`), a cascade takes its
//! next step (`advance`), and the entry is answered and freed
//! (`finish_ensemble`). Owns the shard's `pending` slab.

use super::answer::{refusal, Extra};
use super::l3::ParkReq;
use super::state::{EnsemblePending, Job};
use super::Shard;
use crate::batch::Readiness;
use crate::config::ENSEMBLE_MEMBERS_MAX;
use crate::ensemble::cascade::confident;
use crate::ensemble::cost::domain_hash;
use crate::ensemble::feedback::Entry;
use crate::ensemble::{argmax, effective_policy, MemberSet, Weight};
use crate::metrics::Shed;
use crate::model::{Combiner, Policy};
use crate::server::cache::Joined;
use crate::server::conn_state::Conn;
use crate::wire::{CacheControl, RequestView, RunInfo, Status, Timings};
use std::rc::Rc;
use std::time::{Duration, Instant};

impl Shard {
    pub(super) fn submit_ensemble(
        &self,
        conn: &Rc<Conn>,
        req: &RequestView<'_>,
        p: usize,
        arrival: Instant,
        body: &[u8],
    ) {
        let plan = &self.plans[p];
        let policy = effective_policy(req.policy, plan.selection.policy);
        if !policy.fits(plan.task) {
            return self.respond_error_fmt(
                conn,
                req.id,
                Status::BadRequest,
                arrival,
                format_args!(
                    "policy {} needs class probabilities; '{}' is a regression ensemble (use all or deadline)",
                    if policy == Policy::Cascade { "cascade" } else { "bandit" },
                    plan.name
                ),
            );
        }
        let rows = req.rows as usize;
        let deadline = Self::deadline(req, arrival);
        let dhash = domain_hash(req.domain);
        let mut predicted_us = 0.0;
        let (dslot, set, arm) = {
            let mut sel = self.sel.borrow_mut();
            let dslot = sel.domains[p].slot(dhash);
            if dslot != 0 {
                // Allocates once per slot, the first time (bounded).
                self.sel_counters(p, dslot)
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
                                self.sel_counters(p, dslot)
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
                .get_local(&self.metrics, k, self.plan_cache[p], &mut buf[..out_len])
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
            drop(buf);
            let park = ParkReq {
                body,
                key: k,
                slots: &plan.members,
                output_width: plan.output_width,
                policy: self.plan_cache[p],
                out_len,
                rows,
                id: req.id,
                arrival,
            };
            if self.l3_park(conn, park) {
                return;
            }
            self.metrics.cache_misses.inc();
        }
        let members = set.iter().map(|i| plan.members[i]);
        if !self.admit(conn, req.id, members, rows, deadline, arrival) {
            return;
        }
        // NaN is a missing value only where every member is a tree model.
        let missing_ok = plan
            .members
            .iter()
            .all(|&m| self.slots[m].model.forest.is_some());
        if !self.read_input(conn, req, arrival, missing_ok) {
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
            e.acc.reset_for(rows, plan.output_width, plan.combiner);
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
        if self.run_members(k, set, true, arrival).is_err() {
            // Room was checked above. Were that ever wrong, nothing was
            // enqueued: the entry is answered INTERNAL below, not left
            // waiting for members that never run.
            eprintln!(
                "beast: internal error: a member queue of '{}' refused a job it had room for",
                plan.name
            );
            self.pending.borrow_mut().get_mut(k).failed = true;
        }
        if self.pending.borrow_mut().get_mut(k).remaining == 0 {
            self.advance(k, Instant::now());
        }
    }

    /// Enqueue the members of `set` for pending entry `k`, or combine them
    /// from the member-level cache. `from_scratch`: the request's rows are
    /// still in the shard scratch (first step); later cascade steps use the
    /// entry's own copy. Err(member) when that member's queue is full
    /// (nothing enqueued).
    pub(super) fn run_members(
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
        let mut kept = std::mem::take(&mut e.input);
        let mut parked = false;
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
                drop(buf);
                if self.l3_park_member(e, k, i, plan.members[i]) {
                    parked = true; // enqueued from `e.input` if it misses
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
            if q.push(job, input, enqueued, None).is_err() {
                // Room was checked above. Were that ever wrong, the entry
                // must not wait for this member: it is answered INTERNAL.
                eprintln!(
                    "beast: internal error: queue of '{}' refused a member job it had room for",
                    s.model.name
                );
                e.failed = true;
                continue;
            }
            e.remaining += 1;
            if q.readiness(enqueued) == Readiness::Now || q.rows_queued() == rows {
                s.wake.notify();
            }
        }
        if parked && from_scratch && e.policy != Policy::Cascade {
            kept.clear();
            kept.extend_from_slice(&scratch[..n_in]);
        }
        drop(scratch);
        e.input = kept;
        Ok(())
    }

    /// Add one member's output to the entry's combination.
    pub(super) fn combine_member(&self, e: &mut EnsemblePending, member: usize, out: &[f32]) {
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
    pub(super) fn advance(&self, k: usize, now: Instant) {
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

    #[allow(clippy::too_many_arguments)]
    pub(super) fn member_done(
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
        // Checked in release builds too: a wrapped count would never reach 0
        // and the request would never be answered.
        match e.remaining.checked_sub(1) {
            Some(r) => e.remaining = r,
            None => {
                eprintln!("beast: internal error: a member result for an entry waiting for none");
                e.failed = true;
            }
        }
        if e.remaining == 0 {
            drop(pending);
            self.advance(k, now);
        }
    }

    /// Every chosen member has answered (or came from the cache, or the
    /// deadline cut the rest off): combine, cache, account, answer the
    /// waiters and the request, free the entry.
    pub(super) fn finish_ensemble(&self, k: usize, now: Instant) {
        let mut pending = self.pending.borrow_mut();
        let e = pending.get_mut(k);
        let plan = &self.plans[e.plan];
        self.metrics.set_target(self.plan_target[e.plan]);
        let Some(conn) = e.conn.take() else {
            return;
        };
        let arrival = e.arrival.expect("pending entry has an arrival");
        conn.request_done();
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
        let c = self.sel_counters(e.plan, e.domain_slot as usize);
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
}

/// A cut-off (partial) answer may leave this long after its deadline: the
/// timer fires at the deadline, not before it.
const PARTIAL_GRACE: Duration = Duration::from_millis(1);
