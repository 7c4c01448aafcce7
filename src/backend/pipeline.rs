//! The batches one batcher has in flight on its backend, in order.
//!
//! Owns: a ring of at most `depth` submitted batches (ticket, rows, when
//! submitted, and the caller's payload — the batch's jobs), polled front
//! first so batches complete in the order they were submitted, each exactly
//! once. A batch the backend refused at `submit` completes at once with
//! that error. Plain Rust over the `Backend` trait: tested below with a
//! fake backend whose completions arrive when the test says. Allocates
//! nothing after `new`.

use super::{Backend, BackendError, ModelId, Ticket};
use std::collections::VecDeque;
use std::task::Poll;
use std::time::{Duration, Instant};

struct InFlight<T> {
    ticket: Result<Ticket, BackendError>,
    rows: usize,
    submitted: Instant,
    payload: T,
}

/// A completed batch.
#[derive(Debug)]
pub struct Done<T> {
    pub payload: T,
    pub rows: usize,
    /// The backend's verdict for every row of the batch.
    pub result: Result<(), BackendError>,
    pub submitted: Instant,
    /// The batch's own time on the backend: from when it was submitted or
    /// the previous batch completed, whichever is later, to its completion.
    pub compute: Duration,
}

pub struct Pipeline<T> {
    ring: VecDeque<InFlight<T>>,
    depth: usize,
    last_done: Option<Instant>,
}

impl<T> Pipeline<T> {
    /// At most `depth` (>= 1) batches in flight.
    pub fn new(depth: usize) -> Self {
        let depth = depth.max(1);
        Pipeline {
            ring: VecDeque::with_capacity(depth),
            depth,
            last_done: None,
        }
    }

    pub fn len(&self) -> usize {
        self.ring.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }
    pub fn is_full(&self) -> bool {
        self.ring.len() >= self.depth
    }
    /// Rows submitted and not yet completed.
    pub fn rows_in_flight(&self) -> usize {
        self.ring.iter().map(|f| f.rows).sum()
    }

    /// Submit a batch (the caller checked `!is_full()`); a refusal is kept
    /// as the batch's verdict and comes back from the next `poll`.
    pub fn submit(
        &mut self,
        backend: &mut dyn Backend,
        id: ModelId,
        input: &[f32],
        rows: usize,
        payload: T,
        now: Instant,
    ) {
        debug_assert!(!self.is_full());
        let ticket = backend.submit(id, input, rows);
        self.ring.push_back(InFlight {
            ticket,
            rows,
            submitted: now,
            payload,
        });
    }

    /// The oldest batch, if it has completed: its output is in `output`
    /// (resized to `rows × out_width`; its capacity is kept).
    pub fn poll(
        &mut self,
        backend: &mut dyn Backend,
        output: &mut Vec<f32>,
        out_width: usize,
        now: Instant,
    ) -> Option<Done<T>> {
        let front = self.ring.front()?;
        let result = match front.ticket {
            Err(e) => Err(e),
            Ok(t) => {
                output.clear();
                output.resize(front.rows * out_width, 0.0);
                match backend.poll(t, output) {
                    Poll::Pending => return None,
                    Poll::Ready(r) => r,
                }
            }
        };
        let f = self.ring.pop_front().expect("front exists");
        let began = self.last_done.map_or(f.submitted, |d| d.max(f.submitted));
        self.last_done = Some(now);
        Some(Done {
            payload: f.payload,
            rows: f.rows,
            result,
            submitted: f.submitted,
            compute: now.saturating_duration_since(began),
        })
    }

    /// When the oldest batch is expected to be ready, if the backend knows.
    pub fn ready_hint(&self, backend: &dyn Backend) -> Option<Instant> {
        match self.ring.front()?.ticket {
            Ok(t) => backend.ready_hint(t),
            Err(_) => Some(Instant::now()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::registry::Registry;
    use crate::model::Model;
    use std::sync::Arc;

    /// Each batch's output is its first input value, repeated; a batch
    /// completes only when the test calls `complete`, and fails when its
    /// first input value is negative.
    #[derive(Default)]
    struct Fake {
        models: Registry<()>,
        /// (ticket, value, completed) per batch in flight.
        flight: Vec<(Ticket, f32, bool)>,
        max_in_flight: usize,
        refuse_next: bool,
    }

    impl Fake {
        fn complete_all(&mut self) {
            self.flight.iter_mut().for_each(|f| f.2 = true);
        }
        fn complete_newest(&mut self) {
            if let Some(f) = self.flight.last_mut() {
                f.2 = true;
            }
        }
    }

    impl Backend for Fake {
        fn name(&self) -> &str {
            "fake"
        }
        fn register(&mut self, _m: &Arc<Model>) -> Result<ModelId, BackendError> {
            Ok(self.models.insert(()))
        }
        fn unregister(&mut self, id: ModelId) {
            self.models.remove(id);
        }
        fn submit(
            &mut self,
            id: ModelId,
            input: &[f32],
            rows: usize,
        ) -> Result<Ticket, BackendError> {
            if std::mem::take(&mut self.refuse_next) {
                return Err(BackendError::Device);
            }
            let t = self.models.acquire(id, rows)?;
            self.flight.push((t, input[0], false));
            self.max_in_flight = self.max_in_flight.max(self.flight.len());
            Ok(t)
        }
        fn poll(&mut self, t: Ticket, out: &mut [f32]) -> Poll<Result<(), BackendError>> {
            let i = self.flight.iter().position(|f| f.0 == t).expect("known");
            if !self.flight[i].2 {
                return Poll::Pending;
            }
            let (_, v, _) = self.flight.remove(i);
            self.models.release(t);
            if v < 0.0 {
                return Poll::Ready(Err(BackendError::Device));
            }
            out.fill(v);
            Poll::Ready(Ok(()))
        }
        fn run(
            &mut self,
            _: &Model,
            _: &[f32],
            _: usize,
            _: &mut [f32],
        ) -> Result<(), BackendError> {
            unreachable!()
        }
    }

    fn model() -> Arc<Model> {
        Arc::new(crate::model::demo::bench_models().remove(0))
    }

    #[test]
    fn two_batches_in_flight_complete_in_order_each_once() {
        let mut b = Fake::default();
        let id = b.register(&model()).unwrap();
        let mut p = Pipeline::new(crate::backend::IN_FLIGHT_PER_MODEL);
        let mut out = Vec::new();
        let t = Instant::now();
        p.submit(&mut b, id, &[1.0], 1, "first", t);
        assert!(!p.is_full());
        p.submit(&mut b, id, &[2.0, 0.0], 2, "second", t);
        assert!(p.is_full(), "the batcher keeps two in flight");
        assert_eq!(p.rows_in_flight(), 3);
        assert_eq!(b.max_in_flight, 2);
        assert!(p.poll(&mut b, &mut out, 1, t).is_none());
        // The second completes first: still nothing, the first is owed.
        b.complete_newest();
        assert!(p.poll(&mut b, &mut out, 1, t).is_none());
        b.complete_all();
        let d = p.poll(&mut b, &mut out, 1, t).unwrap();
        assert_eq!((d.payload, d.rows, d.result), ("first", 1, Ok(())));
        assert_eq!(out, vec![1.0]);
        let d = p.poll(&mut b, &mut out, 1, t).unwrap();
        assert_eq!((d.payload, d.rows, d.result), ("second", 2, Ok(())));
        assert_eq!(out, vec![2.0, 2.0]);
        assert!(p.is_empty());
        assert!(p.poll(&mut b, &mut out, 1, t).is_none());
    }

    #[test]
    fn failures_come_back_as_the_batch_verdict_in_order() {
        let mut b = Fake::default();
        let id = b.register(&model()).unwrap();
        let mut p = Pipeline::new(2);
        let mut out = Vec::new();
        let t = Instant::now();
        // The device fails the first batch; the backend refuses the second.
        p.submit(&mut b, id, &[-1.0], 1, 1, t);
        b.refuse_next = true;
        p.submit(&mut b, id, &[5.0], 1, 2, t);
        assert!(p.poll(&mut b, &mut out, 1, t).is_none());
        b.complete_all();
        let d = p.poll(&mut b, &mut out, 1, t).unwrap();
        assert_eq!((d.payload, d.result), (1, Err(BackendError::Device)));
        let d = p.poll(&mut b, &mut out, 1, t).unwrap();
        assert_eq!((d.payload, d.result), (2, Err(BackendError::Device)));
        // Nothing leaked: both staging slots are free again.
        p.submit(&mut b, id, &[3.0], 1, 3, t);
        p.submit(&mut b, id, &[4.0], 1, 4, t);
        b.complete_all();
        let got: Vec<_> = std::iter::from_fn(|| p.poll(&mut b, &mut out, 1, t))
            .map(|d| (d.payload, d.result))
            .collect();
        assert_eq!(got, vec![(3, Ok(())), (4, Ok(()))]);
    }

    #[test]
    fn no_batch_is_lost_over_many_rounds() {
        let mut b = Fake::default();
        let id = b.register(&model()).unwrap();
        let mut p = Pipeline::new(2);
        let mut out = Vec::new();
        let t = Instant::now();
        let (mut next, mut seen) = (0u32, Vec::new());
        for round in 0..200u32 {
            while !p.is_full() && next < 150 {
                p.submit(&mut b, id, &[next as f32], 1, next, t);
                next += 1;
            }
            if round % 3 == 0 {
                b.complete_newest();
            } else {
                b.complete_all();
            }
            while let Some(d) = p.poll(&mut b, &mut out, 1, t) {
                assert_eq!(out, vec![d.payload as f32]);
                seen.push(d.payload);
            }
        }
        assert_eq!(seen, (0..150).collect::<Vec<_>>());
    }

    #[test]
    fn compute_time_counts_from_the_previous_completion() {
        let mut b = Fake::default();
        let id = b.register(&model()).unwrap();
        let mut p = Pipeline::new(2);
        let mut out = Vec::new();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        p.submit(&mut b, id, &[1.0], 1, (), t0);
        p.submit(&mut b, id, &[1.0], 1, (), t0);
        b.complete_all();
        assert_eq!(
            p.poll(&mut b, &mut out, 1, t0 + ms(4)).unwrap().compute,
            ms(4)
        );
        // The second waited for the first: its own time is 3 ms, not 7.
        assert_eq!(
            p.poll(&mut b, &mut out, 1, t0 + ms(7)).unwrap().compute,
            ms(3)
        );
    }

    #[test]
    fn the_cpu_backend_is_ready_at_the_first_poll() {
        let mut b = crate::backend::cpu::CpuBackend::new();
        let m = model();
        let id = b.register(&m).unwrap();
        let mut p = Pipeline::new(2);
        let mut out = Vec::new();
        let x = vec![0.5f32; 3 * m.input_width];
        p.submit(&mut b, id, &x, 3, (), Instant::now());
        let d = p.poll(&mut b, &mut out, m.output_width, Instant::now());
        assert_eq!(d.map(|d| d.result), Some(Ok(())));
        let mut direct = vec![0.0; 3 * m.output_width];
        b.run(&m, &x, 3, &mut direct).unwrap();
        assert_eq!(out, direct);
        // An unregistered id is refused, as the batch's verdict.
        b.unregister(id);
        p.submit(&mut b, id, &x, 3, (), Instant::now());
        let d = p.poll(&mut b, &mut out, m.output_width, Instant::now());
        assert_eq!(d.map(|d| d.result), Some(Err(BackendError::Unknown)));
    }
}
