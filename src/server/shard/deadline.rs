//! Deadlines of ensemble requests: the member set the deadline policy picks
//! for a budget (`pick_for_deadline`), and the straggler cutoff that
//! answers an entry at its deadline with the members that finished (the
//! timer task `run_deadlines`, and `cut_off_due`, which every batcher also
//! calls before a batch).

use super::Shard;
use crate::config::ENSEMBLE_MEMBERS_MAX;
use crate::ensemble::MemberSet;
use crate::server::select::SelState;
use std::rc::Rc;
use std::time::Instant;

impl Shard {
    /// The best member set under the deadline policy whose predicted
    /// completion fits `budget_us`: most accurate (per-member accuracy from
    /// feedback in this domain, summed), cheapest on ties; `None` if even the
    /// fastest single member cannot make it.
    pub(super) fn pick_for_deadline(
        &self,
        sel: &SelState,
        p: usize,
        dslot: usize,
        rows: usize,
        budget_us: f32,
    ) -> Option<(MemberSet, f32)> {
        let plan = &self.plans[p];
        let n = plan.members.len();
        // What the profiles miss (scheduling, the other tasks of the core),
        // learned from answered requests.
        let slack = &sel.deadline_slack_us;
        let l = &sel.learned[p];
        // Predicted time of one member: its batching delay (only a turn of
        // the executor once `min_batch` rows are queued), then every batch
        // ahead of it and its own.
        let member_us = |i: usize| {
            let slot = plan.members[i];
            let s = &self.slots[slot];
            let q = s.queue.borrow();
            let ahead = (q.rows_queued() + rows) as u32;
            let b = s.model.batch;
            let delay = if ahead as usize >= b.min_batch.min(b.max_batch) {
                BATCHER_TURN_US
            } else {
                b.max_queue_delay_us as f32
            };
            (delay, sel.profiles[slot].predict_us(ahead))
        };
        let mut times = [(0f32, 0f32); ENSEMBLE_MEMBERS_MAX];
        for (i, t) in times.iter_mut().enumerate().take(n) {
            *t = member_us(i);
        }
        // Members share one core: their computes add up, their delays overlap.
        let predict = |set: MemberSet| {
            let (mut delay, mut compute) = (0f32, 0f32);
            for i in set.iter() {
                delay = delay.max(times[i].0);
                compute += times[i].1;
            }
            delay + compute + slack[set.len()]
        };
        let score = |set: MemberSet| -> f32 {
            set.iter()
                .map(|i| {
                    let a = l.accuracy(dslot, i);
                    // Without feedback, cost stands in for accuracy.
                    if a.total > 0.0 {
                        a.mean()
                    } else {
                        0.5 + 1e-3
                            * plan
                                .by_cost
                                .iter()
                                .position(|&m| m as usize == i)
                                .unwrap_or(0) as f32
                    }
                })
                .sum()
        };
        // Every subset of small ensembles; prefixes of the cost order otherwise.
        let mut best: Option<(f32, u64, MemberSet)> = None;
        let mut consider = |set: MemberSet| {
            if set.is_empty() || predict(set) > budget_us {
                return;
            }
            let (sc, cost) = (score(set), plan.flops_of(set));
            if best.is_none_or(|(bs, bc, _)| sc > bs || (sc == bs && cost < bc)) {
                best = Some((sc, cost, set));
            }
        };
        if n <= DEADLINE_SUBSETS_MEMBERS_MAX {
            for bits in 1..(1u32 << n) {
                consider(MemberSet(bits as u16));
            }
        } else {
            let mut set = MemberSet::default();
            for &m in &plan.by_cost {
                set.insert(m as usize);
                consider(set);
                consider(MemberSet::one(m as usize));
            }
        }
        // The entry keeps the profiles' own prediction (without the slack),
        // which is what the slack learns to correct.
        best.map(|b| (b.2, predict(b.2) - slack[b.2.len()]))
    }

    /// The straggler cutoff: answer deadline-policy ensemble requests whose
    /// deadline has come with the members that finished (`partial`).
    pub async fn run_deadlines(self: Rc<Self>) {
        loop {
            if self.winding_down() {
                // Everything in flight is answered by now or soon; items of
                // answered entries must not keep this task (and the shard) alive.
                let pending = self.pending.borrow();
                let mut sel = self.sel.borrow_mut();
                sel.deadlines.retain(|r| pending.is_live(r.0 .1, r.0 .2));
                if sel.deadlines.is_empty() {
                    return;
                }
            }
            let next = self.sel.borrow().deadlines.peek().map(|r| r.0 .0);
            match next {
                None => {
                    if self.winding_down() {
                        return;
                    }
                    self.deadline_wake.wait().await;
                    continue;
                }
                Some(t) => {
                    let now = Instant::now();
                    if t > now {
                        futures_lite::future::or(
                            glommio::timer::sleep(t - now),
                            self.deadline_wake.wait(),
                        )
                        .await;
                        continue;
                    }
                }
            }
            self.cut_off_due(Instant::now());
        }
    }

    /// Answer every watched ensemble request whose deadline is at or before
    /// `horizon` with the members that finished (`partial`); their queued
    /// members are then dropped, not computed. Returns how many were
    /// answered. Called by the timer task at the deadline and by every
    /// batcher before each batch, with the batch's predicted end as the
    /// horizon: a busy core still answers on time.
    pub(super) fn cut_off_due(&self, horizon: Instant) -> usize {
        let now = Instant::now();
        let mut answered = 0;
        loop {
            let item = {
                let mut sel = self.sel.borrow_mut();
                match sel.deadlines.peek() {
                    Some(r) if r.0 .0 <= horizon => sel.deadlines.pop(),
                    _ => None,
                }
            };
            let Some(std::cmp::Reverse((_, k, generation))) = item else {
                break;
            };
            if self.pending.borrow().is_live(k, generation) {
                self.pending.borrow_mut().get_mut(k).partial = true;
                self.finish_ensemble(k, now);
                answered += 1;
            }
        }
        answered
    }
}

/// A queued job waits at least this long for its batcher, even when the
/// backend is free: the connection task must yield and the batch task
/// queue get its turn (a few µs measured on an idle server).
const BATCHER_TURN_US: f32 = 5.0;

/// Ensembles of at most this many members have every subset considered
/// by the deadline policy (2^n − 1 sets); larger ones, prefixes of the cost order.
const DEADLINE_SUBSETS_MEMBERS_MAX: usize = 6;
