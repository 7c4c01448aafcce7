//! Test only: a backend whose completions arrive later, like a device's.
//!
//! Wraps another backend (the CPU one): `submit` computes at once through
//! it, but the batch is reported ready only `delay` after the previous
//! batch of this backend became ready (or after its own submission, if
//! later) — one device, batches in submission order. The shard's core is
//! free meanwhile, which is what the tests of the asynchronous batcher
//! check on a real server without a GPU (config `backend_test_delay_us`,
//! docs/CUDA.md). Not for production: it only adds latency.

use super::{Backend, BackendError, ModelId, Ticket, IN_FLIGHT_PER_MODEL};
use crate::model::Model;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

/// Ready times of batches in flight, by (model index, slot).
pub struct Delayed<B> {
    inner: B,
    delay: Duration,
    name: String,
    /// When the last submitted batch is ready.
    last_ready: Instant,
    /// Per model index: the inner ticket and when it is ready, per slot.
    ready: Vec<[Option<(Ticket, Instant)>; IN_FLIGHT_PER_MODEL]>,
}

impl<B: Backend> Delayed<B> {
    pub fn new(inner: B, delay: Duration) -> Self {
        let name = format!("{}-delayed", inner.name());
        Delayed {
            inner,
            delay,
            name,
            last_ready: Instant::now(),
            ready: Vec::new(),
        }
    }
}

impl<B: Backend> Backend for Delayed<B> {
    fn name(&self) -> &str {
        &self.name
    }

    fn register(&mut self, model: &Arc<Model>) -> Result<ModelId, BackendError> {
        let id = self.inner.register(model)?;
        if self.ready.len() <= id.index() {
            self.ready
                .resize(id.index() + 1, [None; IN_FLIGHT_PER_MODEL]);
        }
        self.ready[id.index()] = [None; IN_FLIGHT_PER_MODEL];
        Ok(id)
    }

    fn unregister(&mut self, id: ModelId) {
        self.inner.unregister(id);
        if let Some(r) = self.ready.get_mut(id.index()) {
            *r = [None; IN_FLIGHT_PER_MODEL];
        }
    }

    fn submit(&mut self, id: ModelId, input: &[f32], rows: usize) -> Result<Ticket, BackendError> {
        let t = self.inner.submit(id, input, rows)?;
        let at = self.last_ready.max(Instant::now()) + self.delay;
        self.last_ready = at;
        self.ready[id.index()][t.slot()] = Some((t, at));
        Ok(t)
    }

    fn poll(&mut self, t: Ticket, output: &mut [f32]) -> Poll<Result<(), BackendError>> {
        let entry = self
            .ready
            .get(t.model.index())
            .and_then(|r| r[t.slot()])
            .filter(|(inner, _)| *inner == t);
        match entry {
            Some((_, at)) if Instant::now() < at => Poll::Pending,
            _ => {
                if let Some(r) = self.ready.get_mut(t.model.index()) {
                    r[t.slot()] = None;
                }
                self.inner.poll(t, output)
            }
        }
    }

    fn ready_hint(&self, t: Ticket) -> Option<Instant> {
        let (_, at) = self.ready.get(t.model.index())?[t.slot()]?;
        Some(at)
    }

    fn run(
        &mut self,
        model: &Model,
        input: &[f32],
        rows: usize,
        output: &mut [f32],
    ) -> Result<(), BackendError> {
        self.inner.run(model, input, rows, output)
    }
}
