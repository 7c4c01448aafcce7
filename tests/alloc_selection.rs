//! Steady-state allocations on the server's shard threads, per policy.
//! A counting global allocator counts only threads named `beast-shard-*`
//! (read with prctl, which does not allocate), and while tracing, takes a
//! backtrace of each to tell beast's own allocations from the runtime's:
//! glommio allocates per timer and per I/O source (its `sleep` and its
//! reactor), which the batchers already used before member selection.
//! The test holds beast's request path to zero: cache-bypassing requests
//! under every policy, cache hits, and identical requests coalescing on
//! one computation. An allocation whose backtrace names neither beast nor
//! glommio (backtraces that cannot be symbolised would make every
//! allocation look like nobody's, and the test pass vacuously) fails it, and
//! a self-check first proves that a known beast allocation is classified.

mod common;

use beast::client::Client;
use beast::wire::{CacheControl, Input, PolicyOverride, RequestSpec};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

struct Counting;

static SHARD_ALLOCS: AtomicU64 = AtomicU64::new(0);

fn on_shard_thread() -> bool {
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    name.starts_with(b"beast-shard")
}

static TRACE: AtomicBool = AtomicBool::new(false);
/// Allocations while tracing whose backtrace never passes through glommio.
static OURS: AtomicU64 = AtomicU64::new(0);
static OURS_EXAMPLE: Mutex<String> = Mutex::new(String::new());
/// Allocations while tracing whose backtrace names neither beast nor glommio.
static UNKNOWN: AtomicU64 = AtomicU64::new(0);
static UNKNOWN_EXAMPLE: Mutex<String> = Mutex::new(String::new());
thread_local! {
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

#[derive(Debug, PartialEq, Eq)]
enum Owner {
    Beast,
    Glommio,
    /// Neither: an unsymbolised backtrace, or code outside both.
    Unknown,
}

/// Whose allocation this is: the innermost frame that belongs to beast or
/// to glommio decides (every shard frame runs under glommio's executor, so
/// only the innermost one says who asked).
fn owner(bt: &str) -> Owner {
    for line in bt.lines() {
        let Some((n, name)) = line.trim().split_once(": ") else {
            continue;
        };
        if n.parse::<u32>().is_err() {
            continue;
        }
        if name.starts_with("glommio::") || name.starts_with("<glommio::") {
            return Owner::Glommio;
        }
        if name.contains("beast::") {
            return Owner::Beast;
        }
    }
    Owner::Unknown
}

fn classify() {
    if !TRACE.load(Ordering::Relaxed) {
        return;
    }
    INSIDE.with(|c| c.set(true));
    let bt = std::backtrace::Backtrace::force_capture().to_string();
    let (n, example) = match owner(&bt) {
        Owner::Glommio => (None, None),
        Owner::Beast => (Some(&OURS), Some(&OURS_EXAMPLE)),
        Owner::Unknown => (Some(&UNKNOWN), Some(&UNKNOWN_EXAMPLE)),
    };
    if let (Some(n), Some(example)) = (n, example) {
        n.fetch_add(1, Ordering::Relaxed);
        let mut e = example.lock().unwrap_or_else(|p| p.into_inner());
        if e.is_empty() {
            *e = bt;
        }
    }
    INSIDE.with(|c| c.set(false));
}

fn count() {
    if on_shard_thread() && !INSIDE.with(|c| c.get()) {
        SHARD_ALLOCS.fetch_add(1, Ordering::Relaxed);
        classify();
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// How a case uses the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Every request computed (cache bypassed).
    Bypass,
    /// Every measured request answered from L1 (its input seen before).
    Hit,
    /// Four identical requests at once, a fresh input each time: one
    /// computes, the others wait on it (coalescing).
    Coalesce,
}

/// The classifier works on this machine: on a thread named like a shard,
/// an allocation made by beast code is counted as beast's and one made by
/// the test itself as nobody's. Without symbols both would be nobody's.
fn classifier_self_check() {
    std::thread::Builder::new()
        .name("beast-shard-chk".into())
        .spawn(|| {
            TRACE.store(true, Ordering::SeqCst);
            let e = std::hint::black_box(beast::wire::Encoder::new());
            let v = std::hint::black_box(vec![1u8; 32]);
            TRACE.store(false, Ordering::SeqCst);
            drop((e, v));
        })
        .unwrap()
        .join()
        .unwrap();
    let (ours, unknown) = (
        OURS.swap(0, Ordering::SeqCst),
        UNKNOWN.swap(0, Ordering::SeqCst),
    );
    OURS_EXAMPLE.lock().unwrap().clear();
    let example = std::mem::take(&mut *UNKNOWN_EXAMPLE.lock().unwrap());
    assert!(
        ours >= 1,
        "a known beast allocation (Encoder::new) was not classified as beast's: \
         backtraces are not symbolised here (release profile needs debug info), \
         so the test below would pass vacuously; one was:\n{example}"
    );
    assert!(
        unknown >= 1,
        "the test's own allocation was not seen as nobody's"
    );
}

/// The tests here share the counters: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn selection_allocates_nothing_in_steady_state() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    classifier_self_check();
    let mut repo = common::test_repository(300_000);
    for (name, policy) in [
        ("e_cascade", beast::model::Policy::Cascade),
        ("e_bandit", beast::model::Policy::Bandit),
        ("e_deadline", beast::model::Policy::Deadline),
    ] {
        let mut e = beast::model::EnsembleSpec::mean(name, &["a", "b", "c"]);
        e.selection.policy = policy;
        e.selection.cascade_threshold = 0.6;
        repo.ensembles.insert(name.into(), e);
    }
    let mut vote = beast::model::EnsembleSpec::mean("e_vote", &["a", "b", "c"]);
    vote.combiner = beast::model::Combiner::Vote;
    repo.ensembles.insert("e_vote".into(), vote);
    let mut stacked = beast::model::EnsembleSpec::mean("e_stacked", &["a", "b", "c"]);
    stacked.combiner = beast::model::Combiner::Stacked;
    repo.ensembles.insert("e_stacked".into(), stacked);
    let mut cfg = common::test_config();
    cfg.feedback_window = 1024;
    let h = common::start_with(cfg, repo);
    let c = Client::connect(h.addr).unwrap();
    let w = common::WIDTH;
    let run = |target: &str, seed: u64, deadline: Option<u64>, feedback: bool, mode: Mode| {
        let x = common::rows(seed, 1, w);
        let r = RequestSpec {
            target,
            version: None,
            rows: 1,
            cols: w as u32,
            input: Input::F32(&x),
            deadline_us: deadline,
            domain: Some(["", "shop", "search"][seed as usize % 3]),
            cache: match mode {
                Mode::Bypass => CacheControl::Bypass,
                Mode::Hit | Mode::Coalesce => CacheControl::Use,
            },
            policy: PolicyOverride::Default,
        };
        if mode == Mode::Coalesce {
            let pending: Vec<_> = (0..4).map(|_| c.send(&r).unwrap()).collect();
            for p in pending {
                p.wait().unwrap();
            }
            return;
        }
        let p = c.predict(&r).unwrap();
        if feedback {
            c.feedback(p.ticket, (seed % 5) as u32).unwrap();
        }
    };
    use Mode::*;
    let cases: [(&str, Option<u64>, bool, Mode); 12] = [
        ("ens", None, false, Bypass),
        ("e_cascade", None, false, Bypass),
        ("e_bandit", None, true, Bypass),
        ("e_deadline", Some(1_000_000), false, Bypass),
        ("e_vote", None, false, Bypass),
        ("e_stacked", None, true, Bypass),
        ("ens", Some(1_000_000), false, Bypass),
        ("a", None, false, Hit),
        ("ens", None, false, Hit),
        ("e_cascade", None, false, Hit),
        ("a", None, false, Coalesce),
        ("ens", None, false, Coalesce),
    ];
    for (k, (target, deadline, fb, mode)) in cases.into_iter().enumerate() {
        // Hits reuse the warm-up's 30 inputs; the other modes never repeat one.
        let seed = |i: u64| match mode {
            Hit => 1_000_000 * k as u64 + i % 30,
            Bypass | Coalesce => 1_000_000 * k as u64 + i,
        };
        for i in 0..300 {
            run(target, seed(i), deadline, fb, mode);
        }
        let t0 = h.totals();
        let before = SHARD_ALLOCS.load(Ordering::Relaxed);
        TRACE.store(true, Ordering::Relaxed);
        for i in 300..330 {
            run(target, seed(i), deadline, fb, mode);
        }
        TRACE.store(false, Ordering::Relaxed);
        let t1 = h.totals();
        let n = SHARD_ALLOCS.load(Ordering::Relaxed) - before;
        let ours = OURS.swap(0, Ordering::Relaxed);
        let unknown = UNKNOWN.swap(0, Ordering::Relaxed);
        let (hits, coalesced) = (
            t1.cache_hits_l1 - t0.cache_hits_l1,
            t1.cache_coalesced - t0.cache_coalesced,
        );
        eprintln!("{target} ({mode:?}, deadline {deadline:?}, feedback {fb}): {n} allocations on the shard, {ours} by beast, {unknown} unclassified; {hits} L1 hits, {coalesced} coalesced");
        // The path meant is the path taken.
        match mode {
            Bypass => assert_eq!((hits, coalesced), (0, 0), "{target}: bypass used the cache"),
            Hit => assert!(hits >= 30, "{target}: {hits} hits of 30"),
            Coalesce => assert!(coalesced > 0, "{target}: nothing coalesced"),
        }
        assert_eq!(
            unknown,
            0,
            "{target} ({mode:?}): an allocation names neither beast nor glommio; first:\n{}",
            UNKNOWN_EXAMPLE.lock().unwrap()
        );
        assert_eq!(
            ours,
            0,
            "{target} ({mode:?}): beast allocated on the request path; first:\n{}",
            OURS_EXAMPLE.lock().unwrap()
        );
    }
    drop(c);
    h.shutdown();
}

/// The asynchronous backend path with batches in flight: the test-only
/// delayed backend (`backend_test_delay_us`) completes each batch 200 µs
/// after the previous one, so with eight requests sent at once each
/// member's batcher keeps two batches in flight, polls, sleeps until the
/// expected completion and answers in order. Beast allocates nothing there
/// either (glommio's timers may).
#[test]
fn batches_in_flight_allocate_nothing_in_steady_state() {
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    classifier_self_check();
    let mut cfg = common::test_config();
    cfg.backend_test_delay_us = 200;
    let h = common::start_with(cfg, common::test_repository(300_000));
    assert!(h.backend.ends_with("-delayed"), "{}", h.backend);
    let c = Client::connect(h.addr).unwrap();
    let w = common::WIDTH;
    let burst = |target: &str, seed: u64| {
        let xs: Vec<Vec<f32>> = (0..8).map(|i| common::rows(seed * 8 + i, 1, w)).collect();
        let pending: Vec<_> = xs
            .iter()
            .map(|x| {
                let r = RequestSpec {
                    target,
                    version: None,
                    rows: 1,
                    cols: w as u32,
                    input: Input::F32(x),
                    deadline_us: None,
                    domain: None,
                    cache: CacheControl::Bypass,
                    policy: PolicyOverride::Default,
                };
                c.send(&r).unwrap()
            })
            .collect();
        for p in pending {
            p.wait().unwrap();
        }
    };
    for target in ["a", "ens"] {
        for i in 0..100 {
            burst(target, i);
        }
        let before = SHARD_ALLOCS.load(Ordering::Relaxed);
        TRACE.store(true, Ordering::Relaxed);
        for i in 100..120 {
            burst(target, i);
        }
        TRACE.store(false, Ordering::Relaxed);
        let n = SHARD_ALLOCS.load(Ordering::Relaxed) - before;
        let ours = OURS.swap(0, Ordering::Relaxed);
        let unknown = UNKNOWN.swap(0, Ordering::Relaxed);
        eprintln!("{target} (batches in flight): {n} allocations on the shard, {ours} by beast, {unknown} unclassified");
        assert_eq!(
            unknown,
            0,
            "{target}: an allocation names neither beast nor glommio; first:\n{}",
            UNKNOWN_EXAMPLE.lock().unwrap()
        );
        assert_eq!(
            ours,
            0,
            "{target}: beast allocated on the asynchronous path; first:\n{}",
            OURS_EXAMPLE.lock().unwrap()
        );
    }
    drop(c);
    h.shutdown();
}
