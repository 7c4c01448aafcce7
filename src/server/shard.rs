//! One shard: everything one core owns — its models' batch queues, its
//! backend, its pending ensemble requests, its encoder — and the request
//! path from a decoded frame to an encoded response.
//!
//! Nothing here is shared with another core except the immutable models
//! (`Arc<Model>`) and the metrics counters this shard alone writes.

use super::cache::{CacheShared, Joined, ShardCache, TargetPolicy};
use super::conn::Conn;
use super::notify::Notify;
use super::slab::Slab;
use crate::backend::Backend;
use crate::batch::{Queue, Queued, Readiness};
use crate::cache::CacheKey;
use crate::config::{Config, ENSEMBLE_MEMBERS_MAX};
use crate::ensemble::{Accumulator, EnsemblePlan, MemberSet};
use crate::metrics::{ShardMetrics, Shed};
use crate::model::load::Repository;
use crate::model::Model;
use crate::wire::{
    self, CacheControl, Encoder, RequestView, ResponseHeader, RunInfo, Status, Timings,
};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Whose rows these are: a token in a batch queue.
pub(crate) enum Job {
    /// A request for one model: answer the connection directly.
    Direct {
        conn: Rc<Conn>,
        id: u64,
        arrival: Instant,
        deadline: Option<Instant>,
        /// Cache the answer under this key.
        key: Option<CacheKey>,
        /// Identical requests wait on this one (coalescing).
        leader: bool,
    },
    /// One member's share of an ensemble request.
    Member {
        pending: usize,
        member: u8,
        /// The member-level cache key.
        key: Option<CacheKey>,
    },
}

/// One loaded (model, version) on this shard.
pub(crate) struct ModelSlot {
    pub model: Arc<Model>,
    pub queue: RefCell<Queue<Job>>,
    pub wake: Notify,
    cache: TargetPolicy,
}

/// What a target name resolves to.
enum TargetRef {
    /// Slots of each loaded version, ascending by version.
    Model(Vec<(u32, usize)>),
    Ensemble(usize),
}

/// An ensemble request waiting for its members.
#[derive(Default)]
struct EnsemblePending {
    conn: Option<Rc<Conn>>,
    id: u64,
    plan: usize,
    rows: u32,
    remaining: u8,
    /// Members whose output was computed (not read from the cache).
    computed: MemberSet,
    failed: bool,
    arrival: Option<Instant>,
    deadline: Option<Instant>,
    queue_us: u32,
    compute_us: u32,
    key: Option<CacheKey>,
    leader: bool,
    acc: Accumulator,
}

pub(crate) struct Shard {
    /// Index of this shard (0-based), for logs.
    pub id: usize,
    pub cfg: Arc<Config>,
    pub slots: Vec<ModelSlot>,
    targets: HashMap<String, TargetRef>,
    plans: Vec<EnsemblePlan>,
    /// Cache policy of each plan (same index).
    plan_cache: Vec<TargetPolicy>,
    cache: ShardCache,
    backend: RefCell<Box<dyn Backend>>,
    encoder: RefCell<Encoder>,
    pending: RefCell<Slab<EnsemblePending>>,
    /// Request input converted to f32 (grown once to the largest request).
    scratch: RefCell<Vec<f32>>,
    /// Error messages are formatted here instead of in a fresh String.
    message: RefCell<String>,
    pub metrics: Arc<ShardMetrics>,
    pub stopping: Cell<bool>,
}

impl Shard {
    pub fn new(
        id: usize,
        cfg: Arc<Config>,
        repo: &Repository,
        backend: Box<dyn Backend>,
        metrics: Arc<ShardMetrics>,
        cache_shared: Arc<CacheShared>,
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
                    cache: cache.policy(&cfg, name),
                });
            }
            targets.insert(name.clone(), TargetRef::Model(v));
        }
        let mut plans = Vec::new();
        let mut plan_cache = Vec::new();
        for (name, spec) in &repo.ensembles {
            let mut members = Vec::new();
            for m in &spec.members {
                match targets.get(m.as_str()) {
                    Some(TargetRef::Model(v)) if !v.is_empty() => members.push(v.last().unwrap().1),
                    _ => return Err(format!("ensemble {name}: member {m} is not a loaded model")),
                }
            }
            let first = &slots[members[0]].model;
            let plan = EnsemblePlan::new(spec, members, first.input_width, first.output_width)?;
            targets.insert(name.clone(), TargetRef::Ensemble(plans.len()));
            plans.push(plan);
            plan_cache.push(cache.policy(&cfg, name));
        }
        Ok(Shard {
            id,
            pending: RefCell::new(Slab::with_capacity(cfg.ensemble_in_flight_per_shard_max)),
            cfg,
            slots,
            targets,
            plans,
            plan_cache,
            cache,
            backend: RefCell::new(backend),
            encoder: RefCell::new(Encoder::new()),
            scratch: RefCell::new(Vec::new()),
            message: RefCell::new(String::with_capacity(256)),
            metrics,
            stopping: Cell::new(false),
        })
    }

    /// Run every model once at its largest batch so scratch buffers reach
    /// their steady size before the first request.
    pub fn warm_up(&self) -> Result<(), String> {
        let mut backend = self.backend.borrow_mut();
        for s in &self.slots {
            let m = &s.model;
            let rows = m.batch.max_batch;
            let input = vec![0.0f32; rows * m.input_width];
            let mut output = vec![0.0f32; rows * m.output_width];
            backend
                .run(m, &input, rows, &mut output)
                .map_err(|e| format!("warm-up of {} v{}: {e}", m.name, m.version))?;
        }
        Ok(())
    }

    pub fn backend_name(&self) -> String {
        self.backend.borrow().name().to_string()
    }

    /// Answer an error at once.
    pub fn respond_error(
        &self,
        conn: &Conn,
        id: u64,
        status: Status,
        message: &str,
        arrival: Instant,
    ) {
        let total_us = micros(arrival.elapsed());
        self.metrics
            .record_response(id, status, arrival, total_us, 0, 0);
        if conn.dead.get() {
            return;
        }
        let h = ResponseHeader {
            id,
            status,
            message,
            rows: 0,
            cols: 0,
            timings: Timings {
                total_us,
                ..Timings::default()
            },
            cached: false,
            partial: false,
        };
        self.encoder
            .borrow_mut()
            .response(&h, &[], &[], &mut conn.out.borrow_mut());
        conn.writer_wake.notify();
    }

    fn respond_error_fmt(
        &self,
        conn: &Conn,
        id: u64,
        status: Status,
        arrival: Instant,
        args: std::fmt::Arguments<'_>,
    ) {
        let mut msg = self.message.borrow_mut();
        msg.clear();
        let _ = msg.write_fmt(args);
        self.respond_error(conn, id, status, &msg, arrival);
    }

    /// One whole frame body from a connection. Never panics on bad bytes:
    /// every problem becomes a response with a status.
    pub fn handle_frame(&self, conn: &Rc<Conn>, body: &[u8], arrival: Instant) {
        self.metrics.begin_request();
        let req = match wire::decode_request(body) {
            Ok(r) => r,
            // The id is unreadable: answer with id 0 (docs/PROTOCOL.md).
            Err(e) => return self.respond_error(conn, 0, Status::BadRequest, e.message(), arrival),
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
                format_args!("unknown target '{}'", req.target),
            ),
            Some(TargetRef::Model(versions)) => {
                if let Some(&(_, s)) = versions.first() {
                    self.metrics.set_target_slot(s);
                }
                let slot = match req.version {
                    None => versions.last().map(|v| v.1),
                    Some(want) => versions.iter().find(|v| v.0 == want).map(|v| v.1),
                };
                let Some(slot) = slot else {
                    return self.respond_error_fmt(
                        conn,
                        req.id,
                        Status::NotFound,
                        arrival,
                        format_args!(
                            "model '{}' has no version {}",
                            req.target,
                            req.version.unwrap_or(0)
                        ),
                    );
                };
                if !self.read_input(conn, &req, self.slots[slot].model.input_width, arrival) {
                    return;
                }
                self.submit_model(conn, &req, slot, arrival);
            }
            Some(TargetRef::Ensemble(p)) => {
                self.metrics.set_target_plan(*p);
                if req.version.is_some() {
                    return self.respond_error(
                        conn,
                        req.id,
                        Status::BadRequest,
                        "a version applies to a model, not to an ensemble",
                        arrival,
                    );
                }
                if !self.read_input(conn, &req, self.plans[*p].input_width, arrival) {
                    return;
                }
                self.submit_ensemble(conn, &req, *p, arrival);
            }
        }
    }

    /// Check the width and convert the input into `scratch`; answers the
    /// error and returns false when the input is unusable.
    fn read_input(
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
                    req.cols, req.target
                ),
            );
            return false;
        }
        let mut scratch = self.scratch.borrow_mut();
        let n = req.rows as usize * width;
        scratch.resize(n, 0.0);
        req.read_f32_into(&mut scratch[..n]);
        if let Some(i) = scratch[..n].iter().position(|x| !x.is_finite()) {
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

    fn deadline(req: &RequestView<'_>, arrival: Instant) -> Option<Instant> {
        req.deadline_us
            .map(|us| arrival + Duration::from_micros(us))
    }

    fn submit_model(&self, conn: &Rc<Conn>, req: &RequestView<'_>, slot: usize, arrival: Instant) {
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
            k.model(&s.model.name, s.model.version as u64)
        });
        let mut leader = false;
        if let (Some(k), CacheControl::Use) = (key, req.cache) {
            let mut buf = self.cache.buf.borrow_mut();
            if self
                .cache
                .get(&self.metrics, k, s.cache, &mut buf[..out_len])
            {
                let runs = [RunInfo {
                    model: &s.model.name,
                    version: s.model.version,
                    flops: 0,
                }];
                let t = Timings::default();
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
                );
            }
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
        };
        let mut q = s.queue.borrow_mut();
        let pushed = q.push(job, input, arrival);
        debug_assert!(pushed.is_ok(), "room was checked");
        conn.in_flight.set(conn.in_flight.get() + 1);
        if q.readiness(arrival) == Readiness::Now || q.rows_queued() == rows {
            s.wake.notify();
        }
    }

    fn submit_ensemble(&self, conn: &Rc<Conn>, req: &RequestView<'_>, p: usize, arrival: Instant) {
        let plan = &self.plans[p];
        let set = plan.select();
        let rows = req.rows as usize;
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
        let deadline = Self::deadline(req, arrival);
        let out_len = rows * plan.output_width;
        let key = self
            .cache
            .key(&plan.name, self.plan_cache[p], req, out_len, |mut k| {
                k = k.ensemble(plan.fingerprint);
                for &m in &plan.members {
                    let m = &self.slots[m].model;
                    k = k.model(&m.name, m.version as u64);
                }
                k
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
                );
            }
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
        if let (Some(key), CacheControl::Use) = (key, req.cache) {
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
        {
            let mut pending = self.pending.borrow_mut();
            let e = pending.get_mut(k);
            e.conn = Some(conn.clone());
            e.id = req.id;
            e.plan = p;
            e.rows = req.rows;
            e.remaining = set.len() as u8;
            e.computed = MemberSet::default();
            e.failed = false;
            e.arrival = Some(arrival);
            e.deadline = deadline;
            e.queue_us = 0;
            e.compute_us = 0;
            e.key = key;
            e.leader = leader;
            e.acc.reset(out_len);
        }
        conn.in_flight.set(conn.in_flight.get() + 1);
        let scratch = self.scratch.borrow();
        let input = &scratch[..rows * plan.input_width];
        let mut done_from_cache = 0;
        for i in set.iter() {
            let s = &self.slots[plan.members[i]];
            // Member-level entries are the ones a direct request to the
            // member would use, so ensembles sharing a member share them.
            let member_key = self.cache.key(
                &s.model.name,
                s.cache,
                req,
                rows * s.model.output_width,
                |k| k.model(&s.model.name, s.model.version as u64),
            );
            if let (Some(mk), CacheControl::Use) = (member_key, req.cache) {
                let mut buf = self.cache.buf.borrow_mut();
                let n = rows * s.model.output_width;
                if self.cache.get(&self.metrics, mk, s.cache, &mut buf[..n]) {
                    let mut pending = self.pending.borrow_mut();
                    let e = pending.get_mut(k);
                    e.acc.add(&buf[..n], plan.weights[i]);
                    e.remaining -= 1;
                    done_from_cache += 1;
                    continue;
                }
            }
            let mut q = s.queue.borrow_mut();
            let job = Job::Member {
                pending: k,
                member: i as u8,
                key: member_key,
            };
            let pushed = q.push(job, input, arrival);
            debug_assert!(pushed.is_ok(), "room was checked");
            if q.readiness(arrival) == Readiness::Now || q.rows_queued() == rows {
                s.wake.notify();
            }
        }
        if done_from_cache == set.len() {
            drop(scratch);
            self.finish_ensemble(k, Instant::now());
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
                        self.release_waiters(k, ok, q.rows, out_w, out, &runs, t, now);
                    }
                    if !ok {
                        self.respond_error(&conn, id, Status::Internal, "backend failed", arrival);
                    } else if deadline.is_some_and(|d| now > d) {
                        self.respond_error(
                            &conn,
                            id,
                            Status::DeadlineExceeded,
                            "deadline passed before the answer was ready",
                            arrival,
                        );
                    } else {
                        let t = Timings {
                            queue_us,
                            compute_us,
                            total_us: 0,
                        };
                        self.respond_ok(&conn, id, q.rows, out_w, out, &runs, arrival, t, false);
                    }
                }
                Job::Member {
                    pending,
                    member,
                    key,
                } => {
                    if let (true, Some(k)) = (ok, key) {
                        self.cache.insert(&self.metrics, k, s.cache, out);
                    }
                    self.member_done(pending, member as usize, out, ok, queue_us, compute_us, now)
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
        rows: usize,
        cols: usize,
        out: &[f32],
        runs: &[RunInfo<'_>],
        t: Timings,
        now: Instant,
    ) {
        let mut co = self.cache.coalescer.borrow_mut();
        for w in co.complete(key) {
            w.conn.in_flight.set(w.conn.in_flight.get() - 1);
            if !ok {
                self.respond_error(&w.conn, w.id, Status::Internal, "backend failed", w.arrival);
            } else if w.deadline.is_some_and(|d| now > d) {
                self.respond_error(
                    &w.conn,
                    w.id,
                    Status::DeadlineExceeded,
                    "deadline passed before the answer was ready",
                    w.arrival,
                );
            } else {
                self.respond_ok(&w.conn, w.id, rows, cols, out, runs, w.arrival, t, true);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn member_done(
        &self,
        k: usize,
        member: usize,
        out: &[f32],
        ok: bool,
        queue_us: u32,
        compute_us: u32,
        now: Instant,
    ) {
        let mut pending = self.pending.borrow_mut();
        let e = pending.get_mut(k);
        let plan = &self.plans[e.plan];
        if ok {
            e.acc.add(out, plan.weights[member]);
        } else {
            e.failed = true;
        }
        e.computed.0 |= 1 << member;
        e.queue_us = e.queue_us.max(queue_us);
        e.compute_us = e.compute_us.saturating_add(compute_us);
        e.remaining -= 1;
        if e.remaining == 0 {
            drop(pending);
            self.finish_ensemble(k, now);
        }
    }

    /// Every selected member has answered (or came from the cache):
    /// combine, cache, answer the waiters and the request, free the entry.
    fn finish_ensemble(&self, k: usize, now: Instant) {
        let mut pending = self.pending.borrow_mut();
        let e = pending.get_mut(k);
        let plan = &self.plans[e.plan];
        self.metrics.set_target_plan(e.plan);
        let conn = e.conn.take().expect("pending entry has a connection");
        let arrival = e.arrival.expect("pending entry has an arrival");
        conn.in_flight.set(conn.in_flight.get() - 1);
        let mut runs = [RunInfo {
            model: "",
            version: 0,
            flops: 0,
        }; ENSEMBLE_MEMBERS_MAX];
        let n = plan.members.len();
        for (i, (r, &slot)) in runs.iter_mut().zip(&plan.members).enumerate() {
            let m = &self.slots[slot].model;
            let computed = e.computed.contains(i);
            *r = RunInfo {
                model: &m.name,
                version: m.version,
                flops: if computed {
                    m.flops_per_row() * e.rows as u64
                } else {
                    0
                },
            };
        }
        let (id, rows, out_w, failed) = (e.id, e.rows as usize, plan.output_width, e.failed);
        let t = Timings {
            queue_us: e.queue_us,
            compute_us: e.compute_us,
            total_us: 0,
        };
        let (key, leader, deadline) = (e.key, e.leader, e.deadline);
        let combined = e.acc.finish();
        if let (false, Some(key)) = (failed, key) {
            self.cache
                .insert(&self.metrics, key, self.plan_cache[e.plan], combined);
        }
        if let (true, Some(key)) = (leader, key) {
            self.release_waiters(key, !failed, rows, out_w, combined, &runs[..n], t, now);
        }
        if failed {
            self.respond_error(&conn, id, Status::Internal, "backend failed", arrival);
        } else if deadline.is_some_and(|d| now > d) {
            self.respond_error(
                &conn,
                id,
                Status::DeadlineExceeded,
                "deadline passed before the answer was ready",
                arrival,
            );
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
            );
        }
        pending.release(k);
    }

    #[allow(clippy::too_many_arguments)]
    fn respond_ok(
        &self,
        conn: &Conn,
        id: u64,
        rows: usize,
        cols: usize,
        out: &[f32],
        runs: &[RunInfo<'_>],
        arrival: Instant,
        t: Timings,
        cached: bool,
    ) {
        let total_us = micros(arrival.elapsed());
        self.metrics
            .record_response(id, Status::Ok, arrival, total_us, t.queue_us, t.compute_us);
        if conn.dead.get() {
            return;
        }
        let h = ResponseHeader {
            id,
            status: Status::Ok,
            message: "",
            rows: rows as u32,
            cols: cols as u32,
            timings: Timings { total_us, ..t },
            cached,
            partial: false,
        };
        self.encoder
            .borrow_mut()
            .response(&h, runs, out, &mut conn.out.borrow_mut());
        conn.writer_wake.notify();
    }

    /// The batcher of one model slot: wait for the policy to say "now",
    /// run the batch, answer its jobs, let the connections read, repeat.
    pub async fn run_batcher(self: Rc<Self>, slot: usize) {
        let s = &self.slots[slot];
        let limits = s.model.batch;
        let mut jobs: Vec<Queued<Job>> = Vec::with_capacity(limits.max_batch);
        let mut input: Vec<f32> = Vec::with_capacity(limits.max_batch * s.model.input_width);
        let mut output: Vec<f32> = Vec::with_capacity(limits.max_batch * s.model.output_width);
        loop {
            let readiness = s.queue.borrow().readiness(Instant::now());
            match readiness {
                Readiness::Empty => {
                    if self.stopping.get() {
                        // Shutdown: nothing queued, nothing can arrive.
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
            let rows = s.queue.borrow_mut().take_batch(&mut jobs, &mut input);
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
            self.dispatch(slot, &mut jobs, &output, started, compute, ok);
            // Let connections read what arrived during the compute, so the
            // next batch is as full as the load allows.
            futures_lite::future::yield_now().await;
        }
    }
}

#[inline]
fn micros(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}
