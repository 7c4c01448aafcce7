//! A batch's path through the CUDA backend: `submit` (checks, the rows
//! into the ticket's pinned input, upload, layers as a graph replay or
//! direct launches, download, completion event) and `poll` (the event
//! queried; the output copied out once it fired), and the blocking `run`.

use super::device::{CudaBackend, Precision};
use super::launch::{capture, enqueue_layers, Shape};
use super::pinned::Pinned;
use super::plan::{bucket_index, check_shapes, degenerate, graph_bucket, rows_fit};
use crate::backend::{Backend, BackendError, ModelId, Ticket};
use crate::model::Model;
use cudarc::driver::{result, DevicePtr, DevicePtrMut};
use std::sync::Arc;
use std::task::Poll;

impl CudaBackend {
    /// Queue one batch of `id` into ticket `t`'s staging.
    fn enqueue(&mut self, t: Ticket, input: &[f32], rows: usize) -> Result<(), BackendError> {
        self.tick += 1;
        let id = t.model;
        let (meta, model) = {
            let m = self.models.get_mut(id).ok_or(BackendError::Unknown)?;
            m.last_used = self.tick;
            (m.meta, m.model.clone())
        };
        let (in_w, out_w) = (meta.input_width, meta.output_width);
        if rows.checked_mul(in_w) != Some(input.len()) || rows.checked_mul(out_w).is_none() {
            return Err(BackendError::Shape);
        }
        if rows == 0 || meta.degenerate {
            // The CPU twin, into the ticket's staging: ready at once.
            let ctx = self.ctx.clone();
            let m = self.models.get_mut(id).ok_or(BackendError::Unknown)?;
            let st = &mut m.staging[t.slot()];
            if st.output.len() < rows * out_w {
                match Pinned::new(&ctx, rows * out_w) {
                    Ok(p) => st.output = p,
                    Err(e) => return Err(self.fail("pinned memory", e)),
                }
            }
            let m = self.models.get_mut(id).ok_or(BackendError::Unknown)?;
            let st = &mut m.staging[t.slot()];
            st.host_ready = true;
            if rows == 0 {
                return Ok(());
            }
            let model = model.ok_or(BackendError::Unknown)?;
            let out = &mut st.output.as_mut_slice()[..rows * out_w];
            return self.cpu.run(&model, input, rows, out);
        }
        self.make_resident(id, None)?;
        let bucket = if self.graphs {
            graph_bucket(rows)
        } else {
            None
        };
        let dev_rows = bucket.unwrap_or(rows);
        if !rows_fit(meta.max_dim, dev_rows) {
            return Err(BackendError::Shape);
        }
        self.reserve(&meta, dev_rows)?;
        // The rows into the ticket's pinned input (grown for a batch larger
        // than max_batch: one job over it), then uploaded from there.
        {
            let ctx = self.ctx.clone();
            let m = self.models.get_mut(id).ok_or(BackendError::Unknown)?;
            let st = &mut m.staging[t.slot()];
            let grow = |p: &mut Pinned, len: usize| -> Result<(), String> {
                if p.len() < len {
                    *p = Pinned::new(&ctx, len).map_err(|e| format!("pinned memory: {e}"))?;
                }
                Ok(())
            };
            let grown =
                grow(&mut st.input, rows * in_w).and_then(|()| grow(&mut st.output, rows * out_w));
            if let Err(e) = grown {
                return Err(self.fail("staging", e));
            }
            let st = &mut self
                .models
                .get_mut(id)
                .ok_or(BackendError::Unknown)?
                .staging[t.slot()];
            st.host_ready = false;
            st.input.as_mut_slice()[..input.len()].copy_from_slice(input);
        }
        if let Err(e) = self.queue_device_work(t, rows, bucket) {
            self.last_error = Some(e);
            return Err(BackendError::Device);
        }
        Ok(())
    }

    /// Upload, layers (graph or direct), download, event: all queued.
    fn queue_device_work(
        &mut self,
        t: Ticket,
        rows: usize,
        bucket: Option<usize>,
    ) -> Result<(), String> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| format!("binding the context: {e}"))?;
        let split = self.precision == Precision::Split;
        let stream = self.stream.clone();
        let cu_stream = stream.cu_stream();
        let m = self.models.get_mut(t.model).ok_or("model not registered")?;
        let shape = Shape {
            input_width: m.meta.input_width,
            output: m.meta.output,
        };
        let (in_len, out_len) = (rows * m.meta.input_width, rows * m.meta.output_width);
        let st = &m.staging[t.slot()];
        {
            let (dst, _s) = self.bufs.in32.device_ptr_mut(&stream);
            // SAFETY: in32 ≥ dev_rows·input_width ≥ in_len (reserve); the
            // pinned input holds in_len rows and is not written again until
            // this ticket completes (the slot is busy until then).
            unsafe { result::memcpy_htod_async(dst, &st.input.as_slice()[..in_len], cu_stream) }
                .map_err(|e| format!("copying the input: {e}"))?;
        }
        let graph_slot = bucket.and_then(bucket_index);
        let mut replayed = false;
        if let (Some(b), Some(gi)) = (bucket, graph_slot) {
            if m.graphs[gi].is_none() {
                match capture(
                    &stream,
                    &self.blas,
                    &self.kernels,
                    &mut self.bufs,
                    &m.layers,
                    shape,
                    b,
                    split,
                ) {
                    Ok(g) => m.graphs[gi] = Some(g),
                    Err(e) => {
                        // Launch directly from now on, and say why once.
                        self.graphs = false;
                        self.last_error = Some(format!("CUDA graphs off: {e}"));
                    }
                }
            }
            if let Some(g) = &m.graphs[gi] {
                g.launch().map_err(|e| format!("launching a graph: {e}"))?;
                replayed = true;
            }
        }
        if !replayed {
            enqueue_layers(
                &stream,
                &self.blas,
                &self.kernels,
                &mut self.bufs,
                &m.layers,
                shape,
                rows,
                split,
            )?;
        }
        let st = &mut m.staging[t.slot()];
        {
            let (src, _s) = self.bufs.y32.device_ptr(&stream);
            // SAFETY: y32 holds ≥ out_len f32 of this batch's output; the
            // pinned output is read by the host only after `done` fired.
            unsafe {
                result::memcpy_dtoh_async(&mut st.output.as_mut_slice()[..out_len], src, cu_stream)
            }
            .map_err(|e| format!("copying the output: {e}"))?;
        }
        st.done
            .record(&stream)
            .map_err(|e| format!("recording the completion event: {e}"))
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &str {
        &self.name
    }

    /// Uploads the weights and allocates the pinned staging and events.
    fn register(&mut self, model: &Arc<Model>) -> Result<ModelId, BackendError> {
        self.register_model(model, Some(model.clone()))
    }

    fn unregister(&mut self, id: ModelId) {
        // Device memory is freed in stream order, pinned memory at once:
        // wait for what is queued so no copy lands in freed host memory.
        if self.models.get(id).is_some() {
            let _ = self.stream.synchronize();
            self.models.remove(id);
        }
    }

    fn submit(&mut self, id: ModelId, input: &[f32], rows: usize) -> Result<Ticket, BackendError> {
        let t = self.models.acquire(id, rows)?;
        match self.enqueue(t, input, rows) {
            Ok(()) => Ok(t),
            Err(e) => {
                self.models.release(t);
                Err(e)
            }
        }
    }

    fn poll(&mut self, t: Ticket, output: &mut [f32]) -> Poll<Result<(), BackendError>> {
        let (rows, m) = match (self.models.rows(t), self.models.get(t.model)) {
            (Ok(rows), Some(m)) => (rows, m),
            _ => return Poll::Ready(Err(BackendError::Unknown)),
        };
        let st = &m.staging[t.slot()];
        let need = rows * m.meta.output_width;
        let r = if st.host_ready {
            Ok(())
        } else {
            match st.done.try_is_complete() {
                Ok(false) => return Poll::Pending,
                Ok(true) => Ok(()),
                Err(e) => Err(format!("batch failed on the device: {e}")),
            }
        };
        let r = match r {
            Ok(()) if output.len() != need => Err(BackendError::Shape),
            Ok(()) => {
                output.copy_from_slice(&st.output.as_slice()[..need]);
                Ok(())
            }
            Err(msg) => {
                self.last_error = Some(msg);
                Err(BackendError::Device)
            }
        };
        self.models.release(t);
        Poll::Ready(r)
    }

    /// Registers a copy of `model`, runs the batch, waits, unregisters:
    /// tools and tests only (weights uploaded per call).
    fn run(
        &mut self,
        model: &Model,
        input: &[f32],
        rows: usize,
        output: &mut [f32],
    ) -> Result<(), BackendError> {
        check_shapes(model, input.len(), rows, output.len())?;
        if rows == 0 {
            return Ok(());
        }
        if degenerate(model) {
            return self.cpu.run(model, input, rows, output);
        }
        // No graph capture for a one-off registration.
        let graphs = std::mem::replace(&mut self.graphs, false);
        let r = self.register_model(model, None).and_then(|id| {
            let r = crate::backend::run_registered(self, id, input, rows, output);
            self.unregister(id);
            r
        });
        self.graphs = graphs;
        r
    }
}
