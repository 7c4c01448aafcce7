//! Admission: decode a frame, validate it against its target, answer from
//! the cache, refuse by predicted wait, convert and check the input, and
//! queue a model request (ensembles continue in `ensemble.rs`). Fills the
//! shard's `scratch` input buffer (read again by `ensemble.rs`).

use super::answer::{Clip, Extra};
use super::l3::ParkReq;
use super::state::{Job, ModelSlot, TargetRef, Trial};
use super::Shard;
use crate::batch::{predict_wait_us, Backlog, Readiness};
use crate::metrics::Shed;
use crate::model::rollout::RolloutMode;
use crate::server::cache::Joined;
use crate::server::conn_state::Conn;
use crate::wire::{self, CacheControl, Incoming, RequestView, RunInfo, Status, Timings};
use std::rc::Rc;
use std::time::{Duration, Instant};

impl Shard {
    /// One whole frame body from a connection. Never panics on bad bytes:
    /// every problem becomes a response with a status.
    pub fn handle_frame(&self, conn: &Rc<Conn>, body: &[u8], arrival: Instant) {
        if self.l3.as_ref().is_some_and(|s| s.skip.get()) {
            // Handed back by L3 after a miss: counted when it arrived.
            self.metrics.resume_request();
        } else {
            self.metrics.begin_request();
        }
        self.cache.begin_request();
        let req = match wire::decode_incoming_with_id(body) {
            Ok(Incoming::Request(r)) => r,
            Ok(Incoming::Feedback(f)) => return self.handle_feedback(conn, &f, arrival),
            // The request's id when the body verified; 0 when it is
            // unreadable (docs/PROTOCOL.md).
            Err(r) => {
                return self.respond_error(
                    conn,
                    r.id,
                    Status::BadRequest,
                    r.error.message(),
                    arrival,
                )
            }
        };
        if conn.in_flight.get() >= self.cfg.in_flight_per_connection_max {
            self.metrics.record_shed(Shed::ConnInFlight);
            return self.respond_error(
                conn,
                req.id,
                Status::Overloaded,
                "too many requests in flight on this connection",
                arrival,
            );
        }
        if self.stopping.get() {
            self.metrics.record_shed(Shed::ShuttingDown);
            return self.respond_error(
                conn,
                req.id,
                Status::Overloaded,
                "server is shutting down",
                arrival,
            );
        }
        let rows = req.rows as usize;
        if rows > self.cfg.rows_per_request_max {
            return self.respond_error_fmt(
                conn,
                req.id,
                Status::BadRequest,
                arrival,
                format_args!(
                    "{rows} rows exceed the limit of {} per request",
                    self.cfg.rows_per_request_max
                ),
            );
        }
        match self.targets.get(req.target) {
            None => self.respond_error_fmt(
                conn,
                req.id,
                Status::NotFound,
                arrival,
                format_args!("unknown target '{}'", Clip(req.target)),
            ),
            Some(TargetRef::Model {
                versions,
                current,
                trial,
            }) => {
                self.metrics.set_target(self.slot_target[*current]);
                let (slot, sample, labelled) = match req.version {
                    None => match trial {
                        Some(t) => self.trial_route(t, *current, &req),
                        None => (Some(*current), None, false),
                    },
                    Some(want) => (
                        versions.iter().find(|v| v.0 == want).map(|v| v.1),
                        None,
                        false,
                    ),
                };
                let Some(slot) = slot else {
                    return self.respond_error_fmt(
                        conn,
                        req.id,
                        Status::NotFound,
                        arrival,
                        format_args!(
                            "model '{}' has no version {}",
                            Clip(req.target),
                            req.version.unwrap_or(0)
                        ),
                    );
                };
                if !self.check_width(conn, &req, self.slots[slot].model.input_width, arrival) {
                    return;
                }
                let cap = self.slots[slot].queue.borrow().limits().queue_rows_max;
                if rows > cap {
                    // Never fits, however idle the server: not OVERLOADED.
                    return self.respond_error_fmt(
                        conn,
                        req.id,
                        Status::BadRequest,
                        arrival,
                        format_args!(
                            "{rows} rows exceed the {cap} rows model '{}' can queue \
                             (its queue_rows_max): send at most {cap} rows per request",
                            Clip(req.target)
                        ),
                    );
                }
                if let Some(t) = sample {
                    self.trial_sample(t, *current, &req);
                }
                self.submit_model(conn, &req, slot, arrival, labelled, body);
            }
            Some(TargetRef::Ensemble(p)) => {
                self.metrics.set_target(self.plan_target[*p]);
                if req.version.is_some() {
                    return self.respond_error(
                        conn,
                        req.id,
                        Status::BadRequest,
                        "a version applies to a model, not to an ensemble",
                        arrival,
                    );
                }
                if !self.check_width(conn, &req, self.plans[*p].input_width, arrival) {
                    return;
                }
                let (cap, member) = self.plan_rows_max[*p];
                if rows > cap {
                    // Any member may run (cascade steps, bandit arms): the
                    // smallest member queue bounds every request.
                    return self.respond_error_fmt(
                        conn,
                        req.id,
                        Status::BadRequest,
                        arrival,
                        format_args!(
                            "{rows} rows exceed the {cap} rows member '{}' of '{}' can queue \
                             (its queue_rows_max): send at most {cap} rows per request",
                            Clip(&self.slots[member].model.name),
                            Clip(req.target)
                        ),
                    );
                }
                self.submit_ensemble(conn, &req, *p, arrival, body);
            }
        }
    }

    /// Check the request's width against the target's; answers the error
    /// and returns false when they differ.
    pub(super) fn check_width(
        &self,
        conn: &Conn,
        req: &RequestView<'_>,
        width: usize,
        arrival: Instant,
    ) -> bool {
        if req.cols as usize != width {
            self.respond_error_fmt(
                conn,
                req.id,
                Status::BadRequest,
                arrival,
                format_args!(
                    "input has {} columns but '{}' takes {width}",
                    req.cols,
                    Clip(req.target)
                ),
            );
            return false;
        }
        true
    }

    /// Convert the input into `scratch` and check it is finite; answers the
    /// error and returns false when it is not. Called only once the cache
    /// has missed: an answer in the cache was computed from these very
    /// bytes, which were checked then, so a hit skips the conversion.
    /// `missing_ok`: every model that may run is a tree model, for which
    /// NaN is a missing value (infinities are still refused).
    pub(super) fn read_input(
        &self,
        conn: &Conn,
        req: &RequestView<'_>,
        arrival: Instant,
        missing_ok: bool,
    ) -> bool {
        let width = req.cols as usize;
        let mut scratch = self.scratch.borrow_mut();
        let n = req.rows as usize * width;
        scratch.resize(n, 0.0);
        req.read_f32_into(&mut scratch[..n]);
        if let Some(i) = crate::batch::first_bad_value(&scratch[..n], missing_ok) {
            drop(scratch);
            self.respond_error_fmt(
                conn,
                req.id,
                Status::BadRequest,
                arrival,
                format_args!(
                    "input is not finite (NaN or infinity) at row {}, column {}",
                    i / width,
                    i % width
                ),
            );
            return false;
        }
        true
    }

    pub(super) fn deadline(req: &RequestView<'_>, arrival: Instant) -> Option<Instant> {
        req.deadline_us
            .map(|us| arrival + Duration::from_micros(us))
    }

    /// One slot's queue as admission sees it.
    pub(super) fn backlog(s: &ModelSlot) -> Backlog {
        Backlog {
            rows: s.queue.borrow().rows_queued(),
            max_batch: s.model.batch.max_batch,
            us_per_row: s.row_cost.get().us_per_row(),
        }
    }

    /// Predicted µs until `rows` more rows queued for `slot` are computed,
    /// with every other queue of the shard taking its turns meanwhile.
    pub(crate) fn predicted_wait_us(&self, slot: usize, rows: usize) -> f32 {
        let others = self
            .slots
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != slot)
            .map(|(_, s)| Self::backlog(s));
        predict_wait_us(Self::backlog(&self.slots[slot]), others, rows)
    }

    /// Admission by predicted wait: refuse at once (DEADLINE_EXCEEDED with a
    /// deadline, OVERLOADED over `queue_wait_max_us` without one) a request
    /// whose slowest queue (`slots`) is predicted to take longer than
    /// [`ADMIT_BUDGET_FRACTION`] of its budget, instead of computing an
    /// answer nobody can use. Answers the
    /// refusal and returns false.
    pub(super) fn admit(
        &self,
        conn: &Conn,
        id: u64,
        slots: impl Iterator<Item = usize>,
        rows: usize,
        deadline: Option<Instant>,
        arrival: Instant,
    ) -> bool {
        let (budget_us, limit_us) = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now()).as_secs_f32() * 1e6;
                (left, ADMIT_BUDGET_FRACTION * left)
            }
            None if self.cfg.queue_wait_max_us > 0 => {
                let max = self.cfg.queue_wait_max_us as f32;
                (max, max)
            }
            None => return true,
        };
        let wait_us = slots
            .map(|s| self.predicted_wait_us(s, rows))
            .fold(0.0f32, f32::max);
        if wait_us <= limit_us {
            return true;
        }
        if deadline.is_some() {
            self.metrics.admission_refused_deadline.inc();
            self.respond_error_fmt(
                conn,
                id,
                Status::DeadlineExceeded,
                arrival,
                format_args!(
                    "predicted queue wait {} us is over {}% of the {} us left of the deadline",
                    wait_us as u64,
                    (ADMIT_BUDGET_FRACTION * 100.0) as u32,
                    budget_us as u64
                ),
            );
        } else {
            self.metrics.admission_refused_overloaded.inc();
            self.respond_error_fmt(
                conn,
                id,
                Status::Overloaded,
                arrival,
                format_args!(
                    "predicted queue wait {} us exceeds queue_wait_max_us {}",
                    wait_us as u64, budget_us as u64
                ),
            );
        }
        false
    }

    pub(super) fn submit_model(
        &self,
        conn: &Rc<Conn>,
        req: &RequestView<'_>,
        slot: usize,
        arrival: Instant,
        labelled: bool,
        body: &[u8],
    ) {
        let s = &self.slots[slot];
        let rows = req.rows as usize;
        if !s.queue.borrow().has_room(rows) {
            self.metrics.record_shed(Shed::QueueFull);
            return self.respond_error_fmt(
                conn,
                req.id,
                Status::Overloaded,
                arrival,
                format_args!("queue of model '{}' is full", s.model.name),
            );
        }
        let deadline = Self::deadline(req, arrival);
        let out_len = rows * s.model.output_width;
        let key = self.cache.key(&s.model.name, s.cache, req, out_len, |k| {
            k.model(&s.model.name, s.model.version as u64, s.model.digest)
        });
        let mut leader = false;
        if let (Some(k), CacheControl::Use) = (key, req.cache) {
            let mut buf = self.cache.buf.borrow_mut();
            if self
                .cache
                .get_local(&self.metrics, k, s.cache, &mut buf[..out_len])
            {
                let runs = [RunInfo {
                    model: &s.model.name,
                    version: s.model.version,
                    flops: 0,
                }];
                let t = Timings::default();
                let ticket = self.model_ticket(labelled, conn, slot, &buf[..out_len]);
                return self.respond_ok(
                    conn,
                    req.id,
                    rows,
                    s.model.output_width,
                    &buf[..out_len],
                    &runs,
                    arrival,
                    t,
                    true,
                    Extra {
                        ticket,
                        partial: false,
                    },
                );
            }
            drop(buf);
            let park = ParkReq {
                body,
                key: k,
                slots: &[slot],
                output_width: s.model.output_width,
                policy: s.cache,
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
        if !self.admit(conn, req.id, std::iter::once(slot), rows, deadline, arrival) {
            return;
        }
        // Before joining: a request refused here must not leave a leader
        // entry behind (nothing can join in between on this thread).
        if !self.read_input(conn, req, arrival, s.model.forest.is_some()) {
            return;
        }
        if let (Some(k), CacheControl::Use) = (key, req.cache) {
            match self
                .cache
                .join(&self.metrics, k, conn, req.id, arrival, deadline)
            {
                Joined::Waiting => return,
                Joined::Leader => leader = true,
                Joined::Alone => {}
            }
        }
        let scratch = self.scratch.borrow();
        let input = &scratch[..rows * s.model.input_width];
        let job = Job::Direct {
            conn: conn.clone(),
            id: req.id,
            arrival,
            deadline,
            key,
            leader,
            labelled,
        };
        // A leader's deadline is checked when its batch is taken, since
        // requests waiting on it may have none (see `run_batcher`).
        let queue_deadline = if leader { None } else { deadline };
        let mut q = s.queue.borrow_mut();
        if q.push(job, input, arrival, queue_deadline).is_err() {
            // Room was checked above. Were that ever wrong, the request and
            // those waiting on it must still be answered, not left hanging.
            drop((q, scratch));
            eprintln!(
                "beast: internal error: queue of '{}' refused a job it had room for",
                s.model.name
            );
            if let (true, Some(k)) = (leader, key) {
                let t = Timings::default();
                self.release_waiters(k, false, false, 0, 0, &[], &[], t);
            }
            return self.respond_error(
                conn,
                req.id,
                Status::Internal,
                "internal error: the request could not be queued",
                arrival,
            );
        }
        conn.in_flight.set(conn.in_flight.get() + 1);
        if q.readiness(arrival) == Readiness::Now || q.rows_queued() == rows {
            s.wake.notify();
        }
    }
}

/// Admission lets in a request whose predicted queue wait is at most this
/// share of its budget: the rest absorbs what the prediction does not see
/// (the connections' own work, the OS taking the core). Under overload a
/// queue of half the budget still keeps the core busy.
const ADMIT_BUDGET_FRACTION: f32 = 0.5;

impl Shard {
    /// Under a rollout: the slot a request without a version goes to
    /// (canary: the candidate for a `fraction` of inputs, by input hash, so
    /// one input always sees one version), and whether to sample it for
    /// comparison (shadow: a `fraction` of requests, by count; canary:
    /// every request the candidate answers), and whether its answer gets
    /// a feedback ticket (canary: either version's, for the accuracy rule).
    fn trial_route<'t>(
        &self,
        t: &'t Trial,
        current: usize,
        req: &RequestView<'_>,
    ) -> (Option<usize>, Option<&'t Trial>, bool) {
        use std::sync::atomic::Ordering::Relaxed;
        t.stats.requests.fetch_add(1, Relaxed);
        match t.mode {
            RolloutMode::Canary => {
                let h = xxhash_rust::xxh3::xxh3_64(req.input);
                if h % 1_000_000 < t.ppm {
                    t.stats.canary_served.fetch_add(1, Relaxed);
                    (Some(t.slot), Some(t), t.labelled)
                } else {
                    (Some(current), None, t.labelled)
                }
            }
            RolloutMode::Shadow => {
                let n = self.shadow_tick.get() + 1;
                self.shadow_tick.set(n);
                let sampled = n * t.ppm / 1_000_000 != (n - 1) * t.ppm / 1_000_000;
                (Some(current), sampled.then_some(t), false)
            }
        }
    }

    /// Copy the request's rows for the comparer (bounded; a full queue
    /// drops the sample and counts it), with the candidate's cache key in
    /// shadow mode (pre-warming for a promotion).
    fn trial_sample(&self, t: &Trial, current: usize, req: &RequestView<'_>) {
        let (a, cand) = (&self.slots[current].model, &self.slots[t.slot]);
        let b = &cand.model;
        let rows = req.rows as usize;
        let warm = match t.mode {
            RolloutMode::Shadow => self
                .cache
                .key(&b.name, cand.cache, req, rows * b.output_width, |k| {
                    k.model(&b.name, b.version as u64, b.digest)
                })
                .map(|k| (k, cand.cache)),
            // The canary's own answers are cached as they are given.
            RolloutMode::Canary => None,
        };
        self.shadow
            .push(a, b, &t.stats, rows, warm, |buf| req.read_f32_into(buf));
    }
}
