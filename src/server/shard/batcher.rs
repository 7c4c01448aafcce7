//! The batcher of each model slot and what a finished batch answers: take
//! a batch (dropping expired jobs and members nobody waits for), submit it
//! to the shard's backend (at most `IN_FLIGHT_PER_MODEL` in flight per
//! slot, `backend::pipeline`), and when it completes dispatch each job's
//! rows to its connection, its coalesced waiters or its ensemble entry.
//! Owns the shard's `backend`.

use super::answer::{micros, refusal, Extra};
use super::state::Job;
use super::Shard;
use crate::backend::pipeline::Pipeline;
use crate::backend::IN_FLIGHT_PER_MODEL;
use crate::batch::{BatchRows, Dropped, Queued, Readiness};
use crate::cache::CacheKey;
use crate::wire::{RunInfo, Status, Timings};
use std::rc::Rc;
use std::time::{Duration, Instant};

impl Shard {
    /// The batcher of one model slot. Each turn it first answers the
    /// oldest batch in flight if the backend has completed it; then, while
    /// fewer than [`IN_FLIGHT_PER_MODEL`] batches are in flight, it answers
    /// the ensembles the next batch would make late (straggler cutoff), asks
    /// the policy, takes a batch (dropping jobs that expire before it ends
    /// and members nobody waits for) and submits it; otherwise it waits for
    /// the oldest batch (until the backend's expected time, or new rows,
    /// or just a turn of the other tasks). It yields the batch task queue
    /// after each answered batch so connections read, write and time out
    /// meanwhile. On the CPU a batch computes inside `submit` and is ready
    /// at once, so the order is the blocking one: compute, answer, next;
    /// on a device the next batch's upload and compute are queued while the
    /// previous one finishes and the core keeps serving sockets.
    pub async fn run_batcher(self: Rc<Self>, slot: usize) {
        let s = &self.slots[slot];
        let limits = s.model.batch;
        let out_w = s.model.output_width;
        // One job list per batch in flight and one being filled: reused.
        let mut spare: Vec<Vec<Queued<Job>>> = (0..=IN_FLIGHT_PER_MODEL)
            .map(|_| Vec::with_capacity(limits.max_batch))
            .collect();
        let mut flight: Pipeline<Vec<Queued<Job>>> = Pipeline::new(IN_FLIGHT_PER_MODEL);
        let mut dropped: Vec<(Queued<Job>, Dropped)> = Vec::with_capacity(limits.queue_rows_max);
        let mut input: Vec<f32> = Vec::with_capacity(limits.max_batch * s.model.input_width);
        let mut output: Vec<f32> = Vec::with_capacity(limits.max_batch * out_w);
        loop {
            // 1. The oldest batch in flight, if complete: answer its jobs.
            if !flight.is_empty() {
                let done = flight.poll(
                    &mut **self.backend.borrow_mut(),
                    &mut output,
                    out_w,
                    Instant::now(),
                );
                if let Some(done) = done {
                    let mut jobs = done.payload;
                    let (rows, compute) = (done.rows, done.compute);
                    self.metrics
                        .record_batch_of(self.slot_target[slot], rows, compute);
                    self.sel.borrow_mut().profiles[slot]
                        .observe(rows as u32, compute.as_secs_f32() * 1e6);
                    let answering = Instant::now();
                    let ok = done.result.is_ok();
                    self.dispatch(slot, &mut jobs, &output, done.submitted, compute, ok);
                    spare.push(jobs);
                    // What a row costs this shard, answering included (admission).
                    let mut cost = s.row_cost.get();
                    let us = (compute + answering.elapsed()).as_secs_f32() * 1e6;
                    cost.observe(rows, us);
                    s.row_cost.set(cost);
                    // Let connections read what arrived during the compute
                    // (so the next batch is as full as the load allows) and
                    // write what this batch answered.
                    glommio::executor().yield_task_queue_now().await;
                    continue;
                }
            }
            // 2. Room for another batch: ask the policy.
            let mut wake_at = None;
            if !flight.is_full() {
                let now = Instant::now();
                // When the next batch would end, were it taken now (after
                // the batches in flight).
                let batch_end = {
                    let rows = s.queue.borrow().rows_queued().min(limits.max_batch)
                        + flight.rows_in_flight();
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
                    Readiness::Empty if flight.is_empty() => {
                        // Shutdown: nothing queued or in flight, and nothing
                        // can arrive once no ensemble is pending (a cascade
                        // enqueues its next step only when the previous one
                        // has answered).
                        if self.winding_down() && self.pending.borrow().in_use() == 0 {
                            return;
                        }
                        if self.retired.get() {
                            // A pending ensemble may still queue rows here
                            // (a cascade step); look again shortly.
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
                    Readiness::At(t) if flight.is_empty() => {
                        let wait = t.saturating_duration_since(Instant::now());
                        futures_lite::future::or(glommio::timer::sleep(wait), s.wake.wait()).await;
                        continue;
                    }
                    Readiness::At(t) => wake_at = Some(t),
                    Readiness::Empty => {}
                    Readiness::Now => {
                        let mut jobs = spare.pop().expect("a spare job list per batch");
                        let (rows, at) =
                            self.take_batch(slot, batch_end, &mut jobs, &mut dropped, &mut input);
                        if rows == 0 {
                            spare.push(jobs);
                            glommio::executor().yield_task_queue_now().await;
                            continue;
                        }
                        // The rows, in the queue's ring when they are one
                        // unbroken run (no copy), else in `input`. The
                        // ring stays borrowed until `submit` has read them
                        // (nothing is pushed meanwhile: no await).
                        let mut queue = s.queue.borrow_mut();
                        let x: &mut [f32] = match at {
                            BatchRows::Ring(start) => queue.ring_rows_mut(start, rows),
                            BatchRows::Input => &mut input[..rows * s.model.input_width],
                        };
                        // The model's input transform ([preprocess]), in
                        // place on the batch's f32 rows: after the cache key
                        // was taken from the raw rows, before any backend
                        // sees them.
                        if let Some(pre) = &s.model.io.preprocess {
                            pre.apply(x, s.model.input_width);
                        }
                        let started = Instant::now();
                        let mut backend = self.backend.borrow_mut();
                        flight.submit(&mut **backend, s.backend_id, x, rows, jobs, started);
                        continue;
                    }
                }
            }
            // 3. Wait for the oldest batch in flight: until the backend
            //    expects it (or the policy's time, or new rows), else one
            //    turn of the other tasks before polling again.
            let hint = flight.ready_hint(&**self.backend.borrow());
            let until = match (hint, wake_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            match until {
                Some(t) if t > Instant::now() => {
                    let wait = t.saturating_duration_since(Instant::now());
                    futures_lite::future::or(glommio::timer::sleep(wait), s.wake.wait()).await;
                }
                _ => glommio::executor().yield_task_queue_now().await,
            }
        }
    }

    /// Take the next batch of `slot` into `jobs` (dropping, and answering,
    /// jobs that expire before `batch_end` and members nobody waits for);
    /// returns its rows and where they are (the queue's ring, or `input`).
    fn take_batch(
        &self,
        slot: usize,
        batch_end: Instant,
        jobs: &mut Vec<Queued<Job>>,
        dropped: &mut Vec<(Queued<Job>, Dropped)>,
        input: &mut Vec<f32>,
    ) -> (usize, BatchRows) {
        let s = &self.slots[slot];
        let taken = {
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
            s.queue
                .borrow_mut()
                .take_batch_rows(batch_end, verdict, jobs, dropped, input)
        };
        if !dropped.is_empty() {
            self.answer_dropped(slot, dropped);
        }
        taken
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
                    labelled,
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
                            Extra {
                                ticket: self.model_ticket(labelled, &conn, slot, out),
                                partial: false,
                            },
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
