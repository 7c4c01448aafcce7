//! Batching: one bounded queue per model per shard, and the policy that
//! decides when a batch closes.
//!
//! Owns: queued rows (copied into a preallocated ring of f32 rows) and the
//! job tokens that say whose rows they are. A batch closes when it holds
//! `max_batch` rows or its oldest row has waited `max_queue_delay_us`.
//! At `queue_rows_max` queued rows `push` refuses (the caller answers
//! OVERLOADED) instead of growing. Single-threaded: one shard owns it.
//! Knows nothing of sockets or of what a job token means.

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

/// A queued job: the caller's token, its row count and when it arrived.
#[derive(Debug)]
pub struct Queued<J> {
    pub job: J,
    pub rows: usize,
    pub enqueued: Instant,
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
        Queue {
            limits,
            width,
            jobs: VecDeque::with_capacity(limits.queue_rows_max),
            ring: vec![0.0; limits.queue_rows_max * width],
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
    pub fn push(&mut self, job: J, input: &[f32], now: Instant) -> Result<(), Full> {
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
        });
        Ok(())
    }

    /// The policy: run now when a full batch is queued or the oldest row
    /// has waited its delay; else say when.
    pub fn readiness(&self, now: Instant) -> Readiness {
        let Some(oldest) = self.jobs.front() else {
            return Readiness::Empty;
        };
        if self.rows >= self.limits.max_batch {
            return Readiness::Now;
        }
        let due = oldest.enqueued + Duration::from_micros(self.limits.max_queue_delay_us);
        if due <= now {
            Readiness::Now
        } else {
            Readiness::At(due)
        }
    }

    /// Move whole jobs totalling at most `max_batch` rows (or one larger job
    /// alone) into `jobs_out`, and their rows, in order, into `input_out`
    /// (resized to rows × width; it keeps its capacity between batches).
    /// Returns the batch's row count.
    pub fn take_batch(&mut self, jobs_out: &mut Vec<Queued<J>>, input_out: &mut Vec<f32>) -> usize {
        jobs_out.clear();
        let mut rows = 0;
        while let Some(front) = self.jobs.front() {
            if rows > 0 && rows + front.rows > self.limits.max_batch {
                break;
            }
            rows += front.rows;
            jobs_out.push(self.jobs.pop_front().expect("front exists"));
            if rows >= self.limits.max_batch {
                break;
            }
        }
        let w = self.width;
        let cap = self.limits.queue_rows_max;
        input_out.resize(rows * w, 0.0);
        let first = rows.min(cap - self.head_row);
        input_out[..first * w]
            .copy_from_slice(&self.ring[self.head_row * w..(self.head_row + first) * w]);
        if first < rows {
            input_out[first * w..].copy_from_slice(&self.ring[..(rows - first) * w]);
        }
        self.head_row = (self.head_row + rows) % cap;
        self.rows -= rows;
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_batch: usize, delay_us: u64, cap: usize) -> BatchLimits {
        BatchLimits {
            max_batch,
            max_queue_delay_us: delay_us,
            queue_rows_max: cap,
        }
    }

    #[test]
    fn closes_on_size_or_delay() {
        let mut q = Queue::new(limits(4, 100, 16), 2);
        let t0 = Instant::now();
        assert_eq!(q.readiness(t0), Readiness::Empty);
        q.push(1, &[1.0, 2.0], t0).unwrap();
        assert_eq!(
            q.readiness(t0),
            Readiness::At(t0 + Duration::from_micros(100))
        );
        assert_eq!(q.readiness(t0 + Duration::from_micros(100)), Readiness::Now);
        q.push(2, &[3.0, 4.0, 5.0, 6.0, 7.0, 8.0], t0).unwrap();
        assert_eq!(q.readiness(t0), Readiness::Now);
    }

    #[test]
    fn full_queue_refuses_instead_of_growing() {
        let mut q = Queue::new(limits(2, 0, 3), 1);
        let t = Instant::now();
        q.push('a', &[1.0, 2.0], t).unwrap();
        assert_eq!(q.push('b', &[3.0, 4.0], t), Err(Full));
        q.push('c', &[3.0], t).unwrap();
        assert_eq!(q.push('d', &[4.0], t), Err(Full));
        assert_eq!(q.rows_queued(), 3);
    }

    #[test]
    fn batches_keep_order_and_wrap_around_the_ring() {
        let mut q = Queue::new(limits(3, 0, 5), 2);
        let (mut jobs, mut input) = (Vec::new(), Vec::new());
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
                q.push(round, &data, t).unwrap();
            }
            let rows = q.take_batch(&mut jobs, &mut input);
            assert!(rows <= 3 || jobs.len() == 1);
            assert_eq!(rows, jobs.iter().map(|j| j.rows).sum::<usize>());
            seen.extend_from_slice(&input);
        }
        while !q.is_empty() {
            q.take_batch(&mut jobs, &mut input);
            seen.extend_from_slice(&input);
        }
        assert_eq!(seen, expect);
    }

    #[test]
    fn a_job_larger_than_max_batch_runs_alone() {
        let mut q = Queue::new(limits(2, 0, 8), 1);
        let t = Instant::now();
        q.push(0, &[1.0], t).unwrap();
        q.push(1, &[2.0, 3.0, 4.0], t).unwrap();
        let (mut jobs, mut input) = (Vec::new(), Vec::new());
        assert_eq!(q.take_batch(&mut jobs, &mut input), 1);
        assert_eq!(q.take_batch(&mut jobs, &mut input), 3);
        assert_eq!(input, vec![2.0, 3.0, 4.0]);
    }
}
