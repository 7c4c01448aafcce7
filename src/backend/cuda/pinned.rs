//! Page-locked host buffers for the staging of batches in flight: the
//! input is copied here and uploaded from here, the output downloaded
//! here, so the copies are truly asynchronous (from pageable memory the
//! driver stages them through a bounce buffer, synchronously).
//!
//! Our own small wrapper over `cuMemHostAlloc` rather than cudarc's
//! `PinnedHostSlice`, whose accessors synchronise on an event of their
//! own: here ordering is the batch's completion event's job (`poll` reads
//! the output only after it completed, `submit` writes an input slot only
//! while that slot is free).

use cudarc::driver::{result, CudaContext, DriverError};
use std::sync::Arc;

pub(super) struct Pinned {
    ptr: *mut f32,
    len: usize,
    ctx: Arc<CudaContext>,
}

impl Pinned {
    /// `len` f32, zeroed. Portable flag off, not write-combined (the host
    /// reads the outputs back).
    pub fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Pinned, DriverError> {
        let len = len.max(1);
        ctx.bind_to_thread()?;
        // SAFETY: a fresh allocation of len·4 bytes, checked not null,
        // zeroed before any read; freed once in Drop.
        let ptr = unsafe { result::malloc_host(len * std::mem::size_of::<f32>(), 0)? } as *mut f32;
        assert!(!ptr.is_null());
        unsafe { std::ptr::write_bytes(ptr, 0, len) };
        Ok(Pinned {
            ptr,
            len,
            ctx: ctx.clone(),
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: ptr holds len initialised f32 for our lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as above, and &mut self is the only handle.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: ptr came from malloc_host and is freed only here.
        let _ = unsafe { result::free_host(self.ptr as *mut std::ffi::c_void) };
    }
}
