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
        mut verdict: impl FnMut(&J) -> Option<Dropped>,
        jobs_out: &mut Vec<Queued<J>>,
        dropped_out: &mut Vec<(Queued<J>, Dropped)>,
        input_out: &mut Vec<f32>,
    ) -> usize {
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
        self.copy_rows(run.0, run.1, input_out);
        debug_assert_eq!(input_out.len(), rows * w);
        rows
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
mod tests {
    use super::*;

    fn limits(max_batch: usize, delay_us: u64, cap: usize) -> BatchLimits {
        BatchLimits {
            max_batch,
            min_batch: 1,
            max_queue_delay_us: delay_us,
            queue_rows_max: cap,
        }
    }

    #[test]
    fn a_lone_row_runs_at_once_whatever_the_delay() {
        // The backend is free and one row is queued: nothing else is
        // coming, so it runs now, not after `max_queue_delay_us`.
        let mut q = Queue::new(limits(64, 50_000, 128), 2);
        let t0 = Instant::now();
        assert_eq!(q.readiness(t0), Readiness::Empty);
        q.push(1, &[1.0, 2.0], t0, None).unwrap();
        assert_eq!(q.readiness(t0), Readiness::Now);
    }

    #[test]
    fn what_arrived_together_runs_as_one_batch() {
        // Jobs queued while the backend was busy (or in the same poll of
        // the reactor) are one batch when it is free, up to `max_batch`.
        let mut q = Queue::new(limits(4, 50_000, 16), 1);
        let t0 = Instant::now();
        for j in 0..6 {
            q.push(j, &[j as f32], t0, None).unwrap();
        }
        let (mut jobs, mut dropped, mut input) = (Vec::new(), Vec::new(), Vec::new());
        assert_eq!(q.readiness(t0), Readiness::Now);
        assert_eq!(
            q.take_batch(t0, |_| None, &mut jobs, &mut dropped, &mut input),
            4
        );
        // The rest runs at once too: no waiting for the batch to fill.
        assert_eq!(q.readiness(t0), Readiness::Now);
        assert_eq!(
            q.take_batch(t0, |_| None, &mut jobs, &mut dropped, &mut input),
            2
        );
        assert_eq!(q.readiness(t0), Readiness::Empty);
    }

    #[test]
    fn min_batch_waits_at_most_the_delay() {
        let mut l = limits(4, 100, 16);
        l.min_batch = 3;
        let mut q = Queue::new(l, 2);
        let t0 = Instant::now();
        q.push(1, &[1.0, 2.0], t0, None).unwrap();
        assert_eq!(
            q.readiness(t0),
            Readiness::At(t0 + Duration::from_micros(100))
        );
        assert_eq!(q.readiness(t0 + Duration::from_micros(100)), Readiness::Now);
        // Two rows more: `min_batch` is reached, it runs now.
        q.push(2, &[3.0, 4.0, 5.0, 6.0], t0, None).unwrap();
        assert_eq!(q.readiness(t0), Readiness::Now);
        // A `min_batch` above `max_batch` waits for no more than a full batch.
        l.min_batch = 10;
        let mut q = Queue::new(l, 1);
        q.push(1, &[1.0, 2.0, 3.0], t0, None).unwrap();
        assert!(matches!(q.readiness(t0), Readiness::At(_)));
        q.push(2, &[4.0], t0, None).unwrap();
        assert_eq!(q.readiness(t0), Readiness::Now);
    }

    #[test]
    fn full_queue_refuses_instead_of_growing() {
        let mut q = Queue::new(limits(2, 0, 3), 1);
        let t = Instant::now();
        q.push('a', &[1.0, 2.0], t, None).unwrap();
        assert_eq!(q.push('b', &[3.0, 4.0], t, None), Err(Full));
        q.push('c', &[3.0], t, None).unwrap();
        assert_eq!(q.push('d', &[4.0], t, None), Err(Full));
        assert_eq!(q.rows_queued(), 3);
    }

    #[test]
    fn batches_keep_order_and_wrap_around_the_ring() {
        let mut q = Queue::new(limits(3, 0, 5), 2);
        let (mut jobs, mut dropped, mut input) = (Vec::new(), Vec::new(), Vec::new());
        let t = Instant::now();
        let mut next = 0.0f32;
        let mut expect = Vec::new();
        let mut seen = Vec::new();
        for round in 0..20u32 {
            // push jobs of 1 or 2 rows while there is room
            loop {
                let rows = 1 + (round as usize + expect.len()) % 2;
                if !q.has_room(rows) {
                    break;
                }
                let data: Vec<f32> = (0..rows * 2)
                    .map(|_| {
                        next += 1.0;
                        next
                    })
                    .collect();
                expect.extend_from_slice(&data);
                q.push(round, &data, t, None).unwrap();
            }
            let rows = q.take_batch(t, |_| None, &mut jobs, &mut dropped, &mut input);
            assert!(rows <= 3 || jobs.len() == 1);
            assert_eq!(rows, jobs.iter().map(|j| j.rows).sum::<usize>());
            seen.extend_from_slice(&input);
        }
        while !q.is_empty() {
            q.take_batch(t, |_| None, &mut jobs, &mut dropped, &mut input);
            seen.extend_from_slice(&input);
        }
        assert_eq!(seen, expect);
    }

    #[test]
    fn a_job_larger_than_max_batch_runs_alone() {
        let mut q = Queue::new(limits(2, 0, 8), 1);
        let t = Instant::now();
        q.push(0, &[1.0], t, None).unwrap();
        q.push(1, &[2.0, 3.0, 4.0], t, None).unwrap();
        let (mut jobs, mut dropped, mut input) = (Vec::new(), Vec::new(), Vec::new());
        assert_eq!(
            q.take_batch(t, |_| None, &mut jobs, &mut dropped, &mut input),
            1
        );
        assert_eq!(
            q.take_batch(t, |_| None, &mut jobs, &mut dropped, &mut input),
            3
        );
        assert_eq!(input, vec![2.0, 3.0, 4.0]);
    }

    #[test]
    fn expired_jobs_are_dropped_not_computed() {
        let mut q = Queue::new(limits(4, 0, 16), 1);
        let t = Instant::now();
        let soon = Some(t + Duration::from_micros(10));
        let later = Some(t + Duration::from_secs(10));
        q.push('a', &[1.0], t, soon).unwrap();
        q.push('b', &[2.0, 3.0], t, later).unwrap();
        q.push('c', &[4.0], t, soon).unwrap();
        q.push('d', &[5.0], t, None).unwrap();
        let (mut jobs, mut dropped, mut input) = (Vec::new(), Vec::new(), Vec::new());
        // Before the deadline everything runs.
        let mut q2 = Queue::new(limits(4, 0, 16), 1);
        q2.push('a', &[1.0], t, soon).unwrap();
        assert_eq!(
            q2.take_batch(t, |_| None, &mut jobs, &mut dropped, &mut input),
            1
        );
        assert!(dropped.is_empty());
        // At the deadline: 'a' and 'c' are dropped, their rows skipped.
        let now = t + Duration::from_micros(10);
        assert_eq!(
            q.take_batch(now, |_| None, &mut jobs, &mut dropped, &mut input),
            3
        );
        assert_eq!(
            jobs.iter().map(|j| j.job).collect::<Vec<_>>(),
            vec!['b', 'd']
        );
        assert_eq!(input, vec![2.0, 3.0, 5.0]);
        let d: Vec<_> = dropped
            .iter()
            .map(|(j, why)| (j.job, j.rows, *why))
            .collect();
        assert_eq!(
            d,
            vec![('a', 1, Dropped::Expired), ('c', 1, Dropped::Expired)]
        );
        assert_eq!(q.rows_queued(), 0);
        assert!(q.is_empty());
    }

    #[test]
    fn cancelled_jobs_are_dropped_and_free_their_room() {
        let mut q = Queue::new(limits(2, 0, 4), 1);
        let t = Instant::now();
        for (j, x) in [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)] {
            q.push(j, &[x], t, None).unwrap();
        }
        assert!(!q.has_room(1));
        let (mut jobs, mut dropped, mut input) = (Vec::new(), Vec::new(), Vec::new());
        // Odd jobs are cancelled: the batch is the two even ones.
        let rows = q.take_batch(
            t,
            |j| (j % 2 == 1).then_some(Dropped::Cancelled),
            &mut jobs,
            &mut dropped,
            &mut input,
        );
        assert_eq!(rows, 2);
        assert_eq!(input, vec![2.0, 4.0]);
        assert_eq!(dropped.len(), 2);
        assert!(dropped.iter().all(|(_, why)| *why == Dropped::Cancelled));
        assert!(q.is_empty() && q.has_room(4));
        // The ring keeps working after skipped rows (wrap-around).
        q.push(5, &[5.0, 6.0, 7.0], t, None).unwrap();
        assert_eq!(
            q.take_batch(t, |_| None, &mut jobs, &mut dropped, &mut input),
            3
        );
        assert_eq!(input, vec![5.0, 6.0, 7.0]);
    }

    #[test]
    fn a_batch_carries_exactly_the_kept_jobs_rows_across_drops_and_wraps() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(7);
        let (w, cap) = (3, 13);
        let mut q = Queue::new(limits(5, 0, cap), w);
        let t = Instant::now();
        let mut inputs = std::collections::HashMap::new();
        let (mut jobs, mut dropped, mut input) = (Vec::new(), Vec::new(), Vec::new());
        let mut next = 0u32;
        for _ in 0..2000 {
            while rng.random_bool(0.7) {
                let n = rng.random_range(1..=4);
                let x: Vec<f32> = (0..n * w).map(|_| rng.random()).collect();
                if q.push(next, &x, t, None).is_err() {
                    break;
                }
                inputs.insert(next, x);
                next += 1;
            }
            let rows = q.take_batch(
                t,
                |j| (j % 3 == 0).then_some(Dropped::Cancelled),
                &mut jobs,
                &mut dropped,
                &mut input,
            );
            let want: Vec<f32> = jobs.iter().flat_map(|j| inputs[&j.job].clone()).collect();
            assert_eq!(input, want);
            assert_eq!(rows * w, want.len());
            assert!(jobs.iter().all(|j| j.job % 3 != 0));
            assert!(dropped.iter().all(|(j, _)| j.job % 3 == 0));
        }
    }

    #[test]
    fn a_batch_of_only_dropped_jobs_has_no_rows() {
        let mut q = Queue::new(limits(2, 0, 8), 1);
        let t = Instant::now();
        q.push(0, &[1.0], t, Some(t)).unwrap();
        let (mut jobs, mut dropped, mut input) = (Vec::new(), Vec::new(), Vec::new());
        assert_eq!(
            q.take_batch(t, |_| None, &mut jobs, &mut dropped, &mut input),
            0
        );
        assert!(jobs.is_empty() && input.is_empty());
        assert_eq!(dropped.len(), 1);
    }

    #[test]
    fn row_cost_learns_per_row_time() {
        let mut c = RowCost::new(100.0);
        for _ in 0..500 {
            c.observe(64, 640.0);
        }
        assert!((c.us_per_row() - 10.0).abs() < 0.1);
        c.observe(0, 1e9);
        assert!((c.us_per_row() - 10.0).abs() < 0.1);
        // An outlier (the core taken away) moves it by at most α × itself.
        c.observe(1, 1e6);
        assert!((c.us_per_row() - 10.5).abs() < 0.1, "{}", c.us_per_row());
        // A lasting slow-down is followed.
        for _ in 0..500 {
            c.observe(10, 1000.0);
        }
        assert!((c.us_per_row() - 100.0).abs() < 1.0);
    }

    #[test]
    fn predicted_wait_counts_the_turns_of_other_queues() {
        let b = |rows, us_per_row| Backlog {
            rows,
            max_batch: 10,
            us_per_row,
        };
        // Alone: rows ahead plus own, times the cost.
        assert_eq!(predict_wait_us(b(19, 2.0), [].into_iter(), 1), 40.0);
        // Two turns of its own queue: each other queue runs at most two
        // batches meanwhile (20 rows), or what it holds.
        let others = [b(100, 1.0), b(5, 3.0)];
        assert_eq!(
            predict_wait_us(b(19, 2.0), others.into_iter(), 1),
            40.0 + 20.0 + 15.0
        );
        // An empty queue of its own still waits one turn of the others.
        assert_eq!(
            predict_wait_us(b(0, 2.0), [b(100, 1.0)].into_iter(), 1),
            2.0 + 10.0
        );
    }
}
