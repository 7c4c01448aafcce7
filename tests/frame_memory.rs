//! A declared frame length alone must not make the server allocate the
//! frame. Four bytes declaring a large frame made each connection allocate
//! (and zero) the whole frame at once: a few bytes per connection pinned
//! `frame_bytes_max` of memory each.
//!
//! Counted in the allocator, not by RSS: an eager `vec![0; declared]` maps
//! zeroed pages that are not resident until touched, so an RSS bound would
//! pass it. A counting global allocator (its own test binary, so no other
//! test's allocations mix in) records, for threads named `beast-shard-*`
//! (read with prctl, which does not allocate), the largest single request
//! and the bytes allocated and not freed.

mod common;

use common::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

struct Counting;

static MEASURE: AtomicBool = AtomicBool::new(false);
/// Largest single allocation (or reallocation's new size) on a shard thread.
static LARGEST: AtomicUsize = AtomicUsize::new(0);
/// Bytes allocated minus bytes freed on shard threads.
static NET: AtomicI64 = AtomicI64::new(0);

fn on_shard_thread() -> bool {
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    name.starts_with(b"beast-shard")
}

fn record(alloc: usize, freed: usize) {
    if MEASURE.load(Ordering::Relaxed) && on_shard_thread() {
        LARGEST.fetch_max(alloc, Ordering::Relaxed);
        NET.fetch_add(alloc as i64 - freed as i64, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        record(l.size(), 0);
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        record(l.size(), 0);
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        record(0, l.size());
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        record(n, l.size());
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn a_declared_frame_length_alone_does_not_allocate_the_frame() {
    const DECLARED: u32 = (32 << 20) - 1;
    let mut cfg = test_config();
    cfg.frame_bytes_max = 32 << 20;
    cfg.pending_bytes_per_connection_max = 32 << 20;
    // The 1000-row request below must grow the read buffer.
    cfg.read_buffer_bytes = 4096;
    let server = start_with(cfg, test_repository(300_000));
    let client = beast::client::Client::connect(server.addr).unwrap();
    let x = rows(8, 1, WIDTH);
    client.predict(&spec("a", 1, WIDTH, &x)).unwrap();

    MEASURE.store(true, Ordering::SeqCst);
    let conns: Vec<Raw> = (0..16)
        .map(|_| {
            let mut r = Raw::connect(server.addr);
            r.send_bytes(&DECLARED.to_le_bytes());
            r
        })
        .collect();
    for r in &conns {
        wait_until(
            Duration::from_secs(10),
            "the server to read 4 bytes",
            || server_has_read(&r.s),
        );
    }
    // The reads have completed; two round trips on the same single shard
    // let its executor run every connection task woken before them.
    for _ in 0..2 {
        client.predict(&spec("a", 1, WIDTH, &x)).unwrap();
    }
    MEASURE.store(false, Ordering::SeqCst);
    let (largest, net) = (LARGEST.load(Ordering::SeqCst), NET.load(Ordering::SeqCst));
    eprintln!("16 connections declaring {DECLARED} bytes: largest shard allocation {largest} B, net {net} B");
    assert!(
        largest < 1 << 20,
        "a shard allocated {largest} bytes at once for a frame that only declared its length"
    );
    assert!(
        net < 4 << 20,
        "16 connections that sent 4 bytes each hold {net} bytes on the shard"
    );
    // The counter does count on shard threads: the connections and requests
    // above allocated something.
    assert!(
        largest > 0,
        "no shard allocation seen: the counter is broken"
    );

    // A real large frame still goes through.
    let x = rows(8, 1000, WIDTH);
    let r = client.predict(&spec("a", 1000, WIDTH, &x)).unwrap();
    assert_eq!(r.outputs.len(), 1000 * CLASSES);
    drop(conns);
    server.shutdown();
}
