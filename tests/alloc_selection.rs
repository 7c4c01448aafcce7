//! Steady-state allocations on the server's shard threads, per policy.
//! A counting global allocator counts only threads named `beast-shard-*`
//! (read with prctl, which does not allocate), and while tracing, takes a
//! backtrace of each to tell beast's own allocations from the runtime's:
//! glommio allocates per timer and per I/O source (its `sleep` and its
//! reactor), which the batchers already used before member selection.
//! The test holds beast's request path to zero.

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
thread_local! {
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Whose allocation this is: the innermost frame that belongs to beast or
/// to glommio decides (every shard frame runs under glommio's executor, so
/// only the innermost one says who asked).
fn allocated_by_beast(bt: &str) -> bool {
    for line in bt.lines() {
        let Some((n, name)) = line.trim().split_once(": ") else {
            continue;
        };
        if n.parse::<u32>().is_err() {
            continue;
        }
        if name.starts_with("glommio::") || name.starts_with("<glommio::") {
            return false;
        }
        if name.contains("beast::") {
            return true;
        }
    }
    false
}

fn classify() {
    if !TRACE.load(Ordering::Relaxed) {
        return;
    }
    INSIDE.with(|c| c.set(true));
    let bt = std::backtrace::Backtrace::force_capture().to_string();
    if allocated_by_beast(&bt) {
        OURS.fetch_add(1, Ordering::Relaxed);
        let mut e = OURS_EXAMPLE.lock().unwrap_or_else(|p| p.into_inner());
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

#[test]
fn selection_allocates_nothing_in_steady_state() {
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
    let run = |target: &str, seed: u64, deadline: Option<u64>, feedback: bool| {
        let x = common::rows(seed, 1, w);
        let r = RequestSpec {
            target,
            version: None,
            rows: 1,
            cols: w as u32,
            input: Input::F32(&x),
            deadline_us: deadline,
            domain: Some(["", "shop", "search"][seed as usize % 3]),
            cache: CacheControl::Bypass,
            policy: PolicyOverride::Default,
        };
        let p = c.predict(&r).unwrap();
        if feedback {
            c.feedback(p.ticket, (seed % 5) as u32).unwrap();
        }
    };
    let cases: [(&str, Option<u64>, bool); 7] = [
        ("ens", None, false),
        ("e_cascade", None, false),
        ("e_bandit", None, true),
        ("e_deadline", Some(1_000_000), false),
        ("e_vote", None, false),
        ("e_stacked", None, true),
        ("ens", Some(1_000_000), false),
    ];
    for (target, deadline, fb) in cases {
        for i in 0..300 {
            run(target, i, deadline, fb);
        }
        let before = SHARD_ALLOCS.load(Ordering::Relaxed);
        TRACE.store(true, Ordering::Relaxed);
        for i in 300..330 {
            run(target, i, deadline, fb);
        }
        TRACE.store(false, Ordering::Relaxed);
        let n = SHARD_ALLOCS.load(Ordering::Relaxed) - before;
        let ours = OURS.swap(0, Ordering::Relaxed);
        eprintln!("{target} (deadline {deadline:?}, feedback {fb}): 30 requests, {n} allocations on the shard, {ours} outside glommio");
        assert_eq!(
            ours,
            0,
            "{target}: beast allocated on the request path; first:\n{}",
            OURS_EXAMPLE.lock().unwrap()
        );
    }
    drop(c);
    h.shutdown();
}
