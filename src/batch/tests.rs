//! The batch queue's policy, bounds, drops and ring; the row cost and
//! the predicted wait.

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

/// `take_batch_rows` (what the batcher uses) leaves an unbroken,
/// non-wrapping run in the ring and copies otherwise; either way the rows
/// are exactly the kept jobs' rows, across random drops and wraps.
#[test]
fn take_batch_rows_leaves_unbroken_runs_in_the_ring() {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(11);
    let (w, cap) = (3, 13);
    let mut q = Queue::new(limits(5, 0, cap), w);
    let t = Instant::now();
    let mut inputs = std::collections::HashMap::new();
    let (mut jobs, mut dropped, mut input) = (Vec::new(), Vec::new(), Vec::new());
    let (mut next, mut in_ring, mut copied) = (0u32, 0, 0);
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
        let (rows, at) = q.take_batch_rows(
            t,
            |j| (j % 5 == 0).then_some(Dropped::Cancelled),
            &mut jobs,
            &mut dropped,
            &mut input,
        );
        let want: Vec<f32> = jobs.iter().flat_map(|j| inputs[&j.job].clone()).collect();
        let got: Vec<f32> = match at {
            BatchRows::Ring(start) => {
                assert!(input.is_empty() && start + rows <= cap);
                in_ring += 1;
                q.ring_rows_mut(start, rows).to_vec()
            }
            BatchRows::Input => {
                copied += (rows > 0) as usize;
                input.clone()
            }
        };
        assert_eq!(got, want);
    }
    assert!(
        in_ring > 100 && copied > 100,
        "{in_ring} in the ring, {copied} copied"
    );
}

#[test]
fn first_bad_value_finds_infinities_and_nans() {
    let mut x = vec![0.5f32; 300];
    assert_eq!(first_bad_value(&x, false), None);
    for (i, v) in [
        (0, f32::INFINITY),
        (63, f32::NEG_INFINITY),
        (64, f32::NAN),
        (299, f32::NAN),
    ] {
        x[i] = v;
        let old = x.iter().position(|v| !v.is_finite());
        assert_eq!(first_bad_value(&x, false), old, "{i}");
        let old = x.iter().position(|v| !(v.is_finite() || v.is_nan()));
        assert_eq!(first_bad_value(&x, true), old, "{i} nan ok");
        x[i] = 0.5;
    }
    x[200] = f32::NAN;
    x[250] = f32::INFINITY;
    assert_eq!(first_bad_value(&x, false), Some(200));
    assert_eq!(first_bad_value(&x, true), Some(250));
    assert_eq!(
        first_bad_value(&[f32::MAX, f32::MIN, 0.0, -0.0], false),
        None
    );
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
