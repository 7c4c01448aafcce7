//! The batcher of each model slot and what a finished batch answers: take
//! a batch (dropping expired jobs and members nobody waits for), run it on
//! the shard's backend, and dispatch each job's rows to its connection, its
//! coalesced waiters or its ensemble entry. Owns the shard's `backend`.

use super::answer::{micros, refusal, Extra};
use super::state::Job;
use super::Shard;
use crate::batch::{Dropped, Queued, Readiness};
use crate::cache::CacheKey;
use crate::wire::{RunInfo, Status, Timings};
use std::rc::Rc;
use std::time::{Duration, Instant};

impl Shard {
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
                    if self.winding_down() && self.pending.borrow().in_use() == 0 {
                        return;
                    }
                    if self.retired.get() {
                        // A pending ensemble may still queue rows here (a
                        // cascade step); look again shortly.
                        futures_lite::future::or(
                            glommio::timer::sleep(RETIRED_POLL),
                            s.wake.wait(),
                        )
                        .await;
                    } else {
                        s.wake.wait().await;
                    }
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
            self.metrics
                .record_batch_of(self.slot_target[slot], rows, compute);
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

    /// Answer the jobs `take_batch` dropped: an expired direct request gets
    /// DEADLINE_EXCEEDED (a cancelled member needs nothing: its ensemble
    /// was answered).
    pub(super) fn answer_dropped(&self, slot: usize, dropped: &mut Vec<(Queued<Job>, Dropped)>) {
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
                self.metrics.set_target(self.slot_target[slot]);
                conn.request_done();
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
    pub(super) fn dispatch(
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
                    self.metrics.set_target(self.slot_target[slot]);
                    conn.request_done();
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
                    if let Some((status, message)) = refusal(ok, deadline, now) {
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
    pub(super) fn release_waiters(
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
            w.conn.request_done();
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
}

/// Ensembles whose deadline falls within this much after the end of the
/// next batch are answered before it (their answer must still be written).
const CUTOFF_MARGIN: Duration = Duration::from_micros(300);

/// How often the batcher of a retired version with pending ensembles looks
/// whether it may exit.
const RETIRED_POLL: Duration = Duration::from_millis(10);
