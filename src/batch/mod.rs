//! Batching: one bounded queue per model per shard, and the policy that
//! decides when a batch closes.
//!
//! Owns: queued rows (copied into a preallocated ring of f32 rows) and the
//! job tokens that say whose rows they are, each with its deadline. The
//! policy ([`Queue::readiness`]) is asked when the model's backend is free:
//! it runs what is queued now (at most `max_batch` rows), so a lone request
//! never waits for company that is not coming, and under load a batch is
//! what arrived while the previous one computed. Only a model that asks for
//! fuller batches (`min_batch` > 1) waits, for at most `max_queue_delay_us`
//! after its oldest row. At `queue_rows_max` queued rows `push` refuses (the
//! caller answers OVERLOADED) instead of growing. When a batch is taken,
//! jobs whose deadline has passed, or that the caller says nobody will read
//! (an ensemble already answered), are handed back as dropped instead of
//! being computed. [`predict_wait_us`] estimates how long a new job would
//! wait, for admission. Single-threaded: one shard owns it. Knows nothing
//! of sockets or of what a job token means.

use crate::model::BatchLimits;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The queue is at `queue_rows_max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// What the batching policy says about the queue now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Empty,
    /// Run a batch now.
    Now,
    /// Wait until then (or until more rows arrive).
    At(Instant),
}

/// A queued job: the caller's token, its row count, when it arrived and
/// when its answer stops being useful.
#[derive(Debug)]
pub struct Queued<J> {
    pub job: J,
    pub rows: usize,
    pub enqueued: Instant,
    /// Past this the job is dropped, not computed.
    pub deadline: Option<Instant>,
}

/// Where a taken batch's rows are ([`Queue::take_batch_rows`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchRows {
    /// Copied into the caller's input buffer.
    Input,
    /// Still in the ring, from this ring row on, unbroken and not wrapping.
    Ring(usize),
}

/// Index of the first value of `x` that a request may not carry: an
/// infinity, or a NaN unless `nan_ok` (a missing value, for models that
/// handle one). Checks 64 values at a time without a branch per value (the
/// compiler vectorises it), then finds the index only in a chunk that has
/// one: about 4x faster than `position` on a clean 256-value row
/// (`cargo bench --bench request_path`).
pub fn first_bad_value(x: &[f32], nan_ok: bool) -> Option<usize> {
    const EXP: u32 = 0x7f80_0000;
    let bad = |v: f32| {
        let b = v.to_bits();
        if nan_ok {
            b & 0x7fff_ffff == EXP
        } else {
            b & EXP == EXP
        }
    };
    for (c, chunk) in x.chunks(64).enumerate() {
        if chunk.iter().fold(false, |a, &v| a | bad(v)) {
            return chunk.iter().position(|&v| bad(v)).map(|i| c * 64 + i);
        }
    }
    None
}

/// Why a job was dropped instead of computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Its deadline had passed when its batch was taken.
    Expired,
    /// The caller said nobody will read its answer.
    Cancelled,
}

pub struct Queue<J> {
    limits: BatchLimits,
    width: usize,
    jobs: VecDeque<Queued<J>>,
    /// Ring of `queue_rows_max` rows × `width` f32.
    ring: Vec<f32>,
    head_row: usize,
    rows: usize,
}

impl<J> Queue<J> {
    /// Allocates the ring and job list once (`queue_rows_max` rows).
    pub fn new(limits: BatchLimits, width: usize) -> Self {
        Self::with_ring(limits, width, Vec::new())
    }

    /// A queue whose row ring is `ring` (allocated elsewhere, e.g. off the
    /// shard by a reload; resized when its length is not
    /// `queue_rows_max × width`).
    pub fn with_ring(limits: BatchLimits, width: usize, mut ring: Vec<f32>) -> Self {
        ring.resize(limits.queue_rows_max * width, 0.0);
        Queue {
            limits,
            width,
            jobs: VecDeque::with_capacity(limits.queue_rows_max),
            ring,
            head_row: 0,
            rows: 0,
        }
    }

    pub fn limits(&self) -> BatchLimits {
        self.limits
    }
    pub fn rows_queued(&self) -> usize {
        self.rows
    }
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }
    /// Could `rows` more rows be queued now?
    pub fn has_room(&self, rows: usize) -> bool {
        self.rows + rows <= self.limits.queue_rows_max
    }

    /// Queue `rows` rows (`input.len() == rows * width`). Refuses at the limit.
    pub fn push(
        &mut self,
        job: J,
        input: &[f32],
        now: Instant,
        deadline: Option<Instant>,
    ) -> Result<(), Full> {
        let rows = input.len() / self.width;
        debug_assert_eq!(rows * self.width, input.len());
        if rows == 0 || !self.has_room(rows) {
            return Err(Full);
        }
        let cap = self.limits.queue_rows_max;
        let tail = (self.head_row + self.rows) % cap;
        let first = rows.min(cap - tail);
        let w = self.width;
        self.ring[tail * w..(tail + first) * w].copy_from_slice(&input[..first * w]);
        if first < rows {
            self.ring[..(rows - first) * w].copy_from_slice(&input[first * w..]);
        }
        self.rows += rows;
        self.jobs.push_back(Queued {
            job,
            rows,
            enqueued: now,
            deadline,
        });
        Ok(())
    }

    /// The policy, asked when the backend is free: run now whatever is
    /// queued once it holds `min_batch` rows (1 by default: anything), or
    /// when the oldest row has waited `max_queue_delay_us`; else say when.
    pub fn readiness(&self, now: Instant) -> Readiness {
        let Some(oldest) = self.jobs.front() else {
            return Readiness::Empty;
        };
        if self.rows >= self.limits.min_batch.min(self.limits.max_batch) {
            return Readiness::Now;
        }
        let due = oldest.enqueued + Duration::from_micros(self.limits.max_queue_delay_us);
        if due <= now {
            Readiness::Now
        } else {
            Readiness::At(due)
        }
    }

    /// Move whole live jobs totalling at most `max_batch` rows (or one
    /// larger job alone) into `jobs_out`, and their rows, in order, into
    /// `input_out` (resized to rows × width; it keeps its capacity between
    /// batches). Jobs met on the way whose deadline is at or before `now`,
    /// or for which `verdict` gives a reason, leave the queue into
    /// `dropped_out` (with the reason) and their rows are skipped. Returns the batch's row
    /// count (0 when every job met was dropped). Neither output allocates
    /// when its capacity is `queue_rows_max`.
    pub fn take_batch(
        &mut self,
        now: Instant,
        verdict: impl FnMut(&J) -> Option<Dropped>,
        jobs_out: &mut Vec<Queued<J>>,
        dropped_out: &mut Vec<(Queued<J>, Dropped)>,
        input_out: &mut Vec<f32>,
    ) -> usize {
        let (rows, at) = self.take_batch_rows(now, verdict, jobs_out, dropped_out, input_out);
        if let BatchRows::Ring(start) = at {
            self.copy_rows(start, rows, input_out);
        }
        rows
    }

    /// [`Queue::take_batch`] without the copy where it can be spared: when
    /// the kept jobs' rows are one unbroken run that does not wrap (no
    /// dropped job between them: the usual case), they stay in the ring
    /// ([`BatchRows::Ring`], read with [`Queue::ring_rows_mut`] before the
    /// next `push`); otherwise they are copied into `input_out`.
    pub fn take_batch_rows(
        &mut self,
        now: Instant,
        mut verdict: impl FnMut(&J) -> Option<Dropped>,
        jobs_out: &mut Vec<Queued<J>>,
        dropped_out: &mut Vec<(Queued<J>, Dropped)>,
        input_out: &mut Vec<f32>,
    ) -> (usize, BatchRows) {
        jobs_out.clear();
        dropped_out.clear();
        input_out.clear();
        let w = self.width;
        let cap = self.limits.queue_rows_max;
        let mut rows = 0;
        // Kept jobs sit back to back in the ring: copy each unbroken run of
        // them with one copy (two where it wraps), not one per job.
        // (first ring row, rows) of the run not yet copied.
        let mut run = (self.head_row, 0usize);
        while let Some(front) = self.jobs.front() {
            let why = if front.deadline.is_some_and(|d| d <= now) {
                Some(Dropped::Expired)
            } else {
                verdict(&front.job)
            };
            if why.is_none() && rows > 0 && rows + front.rows > self.limits.max_batch {
                break;
            }
            let q = self.jobs.pop_front().expect("front exists");
            let n = q.rows;
            match why {
                Some(why) => {
                    // A dropped job breaks the run: copy what came before it.
                    self.copy_rows(run.0, run.1, input_out);
                    run = ((self.head_row + n) % cap, 0);
                    dropped_out.push((q, why));
                }
                None => {
                    run.1 += n;
                    rows += n;
                    jobs_out.push(q);
                }
            }
            self.head_row = (self.head_row + n) % cap;
            self.rows -= n;
            if rows >= self.limits.max_batch {
                break;
            }
        }
        if input_out.is_empty() && run.1 == rows && run.0 + rows <= cap {
            return (rows, BatchRows::Ring(run.0));
        }
        self.copy_rows(run.0, run.1, input_out);
        debug_assert_eq!(input_out.len(), rows * w);
        (rows, BatchRows::Input)
    }

    /// The `rows` rows a [`BatchRows::Ring`] batch left at ring row
    /// `start` (mutable: the model's input transform runs in place). Valid
    /// until the next `push`, which may reuse them.
    pub fn ring_rows_mut(&mut self, start: usize, rows: usize) -> &mut [f32] {
        let w = self.width;
        &mut self.ring[start * w..(start + rows) * w]
    }

    /// Append `n` ring rows from row `start` (they may wrap around the ring).
    fn copy_rows(&self, start: usize, n: usize, out: &mut Vec<f32>) {
        let (w, cap) = (self.width, self.limits.queue_rows_max);
        let first = n.min(cap - start);
        out.extend_from_slice(&self.ring[start * w..(start + first) * w]);
        if first < n {
            out.extend_from_slice(&self.ring[..(n - first) * w]);
        }
    }
}

/// Per-row cost of a model on one shard, learned from real batches: an EWMA
/// of (batch wall time, compute and answering) / rows.
#[derive(Debug, Clone, Copy)]
pub struct RowCost {
    us: f32,
}

/// Weight of a new batch in [`RowCost`].
pub const ROW_COST_EWMA_ALPHA: f32 = 0.05;

impl RowCost {
    /// Starts from a measured (warm-up) figure.
    pub fn new(us_per_row: f32) -> Self {
        RowCost {
            us: us_per_row.max(0.0),
        }
    }
    pub fn us_per_row(&self) -> f32 {
        self.us
    }
    /// Fold in one batch of `rows` rows that took `us` µs. One observation
    /// counts at most twice the current figure: a batch stretched by the OS
    /// taking the core away (tens of ms) must not make admission refuse
    /// everything for the next hundred batches; a lasting slow-down still
    /// doubles the figure within about 15 batches.
    pub fn observe(&mut self, rows: usize, us: f32) {
        if rows == 0 || !us.is_finite() {
            return;
        }
        let mut per_row = us / rows as f32;
        if self.us > 0.0 {
            per_row = per_row.min(2.0 * self.us);
        }
        self.us += ROW_COST_EWMA_ALPHA * (per_row - self.us);
    }
}

/// One model's queue as admission sees it.
#[derive(Debug, Clone, Copy)]
pub struct Backlog {
    /// Rows queued now.
    pub rows: usize,
    /// Rows per batch, at most.
    pub max_batch: usize,
    /// µs per row ([`RowCost`]).
    pub us_per_row: f32,
}

/// Predicted µs until a job of `rows` rows joining queue `target` has been
/// computed, when one core's batchers take turns, one batch each, over
/// `target` and the `others` queues of the shard: its own queue's rows
/// ahead and its own, plus what each other queue runs in as many turns (at
/// most what it holds). An ensemble waits for the slowest of its members'
/// predictions.
pub fn predict_wait_us(target: Backlog, others: impl Iterator<Item = Backlog>, rows: usize) -> f32 {
    let mine = target.rows + rows;
    let turns = mine.div_ceil(target.max_batch.max(1));
    let mut us = mine as f32 * target.us_per_row;
    for o in others {
        us += o.rows.min(turns * o.max_batch) as f32 * o.us_per_row;
    }
    us
}

#[cfg(test)]
mod tests;
