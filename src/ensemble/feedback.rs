//! Feedback: the window of recent ensemble answers a later feedback
//! message can name by ticket, and the learned state feedback updates
//! (per-member, per-domain accuracy; the stacker's weights; the bandit's
//! posteriors), with its persistence across restarts.
//!
//! Bounded: the window is a ring of `feedback_window` entries per shard
//! with the members' first-row outputs in one flat buffer allocated at
//! start-up; an entry is overwritten after `feedback_window` newer answers
//! (its ticket then reads NOT_FOUND). Per shard, so lock-free.

use super::bandit::Bandit;
use super::stacker::Stacker;
use super::{argmax, MemberSet};

/// One answer in the window.
#[derive(Debug, Clone, Copy, Default)]
pub struct Entry {
    pub ticket: u64,
    /// Serial of the connection that got the answer: only it may give
    /// feedback for the ticket (tickets are sequential, so otherwise any
    /// client on the shard could spend or forge another client's).
    pub conn: u32,
    pub plan: u16,
    pub domain_slot: u16,
    /// Members whose outputs are in the window (those that answered).
    pub ran: MemberSet,
    /// Bandit arm that chose the members, if the bandit did.
    pub arm: Option<u8>,
    /// The ensemble's answer (argmax of its first row).
    pub answer: u16,
    pub used: bool,
}

#[derive(Debug)]
pub struct Window {
    entries: Vec<Entry>,
    /// `capacity × stride`: each member's first output row.
    rows: Vec<f32>,
    stride: usize,
    /// Top 16 bits of every ticket this shard issues.
    shard_bits: u64,
    next: u64,
}

/// Ticket layout: shard index in the top 16 bits, a sequence number (from 1) below.
pub const TICKET_SHARD_SHIFT: u32 = 48;

impl Window {
    /// `stride`: members × classes of the widest ensemble.
    pub fn new(shard: usize, capacity: usize, stride: usize) -> Self {
        let capacity = capacity.max(1);
        let mut rows = vec![0.0f32; capacity * stride];
        // Touch every page now: a zeroed allocation is mapped lazily, and
        // the first lap of the ring would otherwise fault its pages in on
        // the request path (~1 % of a saturated shard, perf/issue10-table.md).
        for x in rows.iter_mut().step_by(1024) {
            *x = std::hint::black_box(0.0);
        }
        Window {
            entries: vec![Entry::default(); capacity],
            rows,
            stride,
            shard_bits: (shard as u64 & 0xFFFF) << TICKET_SHARD_SHIFT,
            next: 1,
        }
    }

    /// (capacity, stride).
    pub fn shape(&self) -> (usize, usize) {
        (self.entries.len(), self.stride)
    }

    /// Record an answer; `row(m)` is member m's first output row for each m
    /// in `ran`. Returns the ticket.
    pub fn push<'a>(&mut self, mut e: Entry, cols: usize, row: impl Fn(usize) -> &'a [f32]) -> u64 {
        let seq = self.next;
        self.next = (self.next + 1) & ((1 << TICKET_SHARD_SHIFT) - 1);
        if self.next == 0 {
            self.next = 1;
        }
        let i = (seq % self.entries.len() as u64) as usize;
        e.ticket = self.shard_bits | seq;
        e.used = false;
        let base = i * self.stride;
        for m in e.ran.iter() {
            let at = base + m * cols;
            if at + cols <= base + self.stride {
                self.rows[at..at + cols].copy_from_slice(&row(m)[..cols]);
            }
        }
        self.entries[i] = e;
        e.ticket
    }

    /// The entry of `ticket` (and its rows), marked used; `None` if unknown,
    /// expired or already used.
    pub fn take(&mut self, ticket: u64, conn: u32) -> Option<(Entry, &[f32])> {
        if ticket & !((1 << TICKET_SHARD_SHIFT) - 1) != self.shard_bits {
            return None;
        }
        let i = ((ticket & ((1 << TICKET_SHARD_SHIFT) - 1)) % self.entries.len() as u64) as usize;
        let e = &mut self.entries[i];
        if e.ticket != ticket || e.used || ticket == 0 || e.conn != conn {
            return None;
        }
        e.used = true;
        let base = i * self.stride;
        Some((*e, &self.rows[base..base + self.stride]))
    }
}

impl Window {
    /// Undo a `take` whose feedback was refused.
    pub fn restore(&mut self, ticket: u64) {
        let i = ((ticket & ((1 << TICKET_SHARD_SHIFT) - 1)) % self.entries.len() as u64) as usize;
        if self.entries[i].ticket == ticket {
            self.entries[i].used = false;
        }
    }
}

/// Right/total counts of one member in one domain.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Accuracy {
    pub correct: f32,
    pub total: f32,
}

impl Accuracy {
    /// Posterior mean with a Beta(1, 1) prior, so an unseen member is 0.5.
    pub fn mean(self) -> f32 {
        (self.correct + 1.0) / (self.total + 2.0)
    }
}

/// What one shard has learned about one ensemble: its own counts, and
/// (with `[learning.share]`) everyone else's, used summed.
#[derive(Debug)]
pub struct Learned {
    pub members: usize,
    pub cols: usize,
    /// `[domain slot × members]`: this shard's counts.
    pub accuracy: Vec<Accuracy>,
    /// `[domain slot × members]`: every other shard's and node's.
    pub remote_accuracy: Vec<Accuracy>,
    pub stacker: Stacker,
    pub bandit: Bandit,
    /// Fingerprint of each member (`member_fingerprint`) and of each arm
    /// (`arm_fingerprint`): the keys of what is saved and shared.
    pub fps: Vec<u64>,
    pub arm_fps: Vec<u64>,
    /// Feedback messages learned from (the sync task publishes when it moves).
    pub lessons: u64,
}

impl Learned {
    pub fn new(by_cost: &[u8], flops_row: &[u64], cols: usize, domains: usize) -> Self {
        let members = flops_row.len();
        let bandit = Bandit::new(by_cost, flops_row, domains);
        Learned {
            members,
            cols,
            accuracy: vec![Accuracy::default(); domains.max(1) * members],
            remote_accuracy: vec![Accuracy::default(); domains.max(1) * members],
            stacker: Stacker::new(members, cols),
            arm_fps: vec![0; bandit.arms.len()],
            bandit,
            fps: vec![0; members],
            lessons: 0,
        }
    }

    /// Key the learned state by these member fingerprints.
    pub fn with_fps(mut self, fps: Vec<u64>) -> Self {
        self.arm_fps = self
            .bandit
            .arms
            .iter()
            .map(|&set| arm_fingerprint(set, &fps))
            .collect();
        self.fps = fps;
        self
    }

    /// Member m's counts in a domain slot, every source summed.
    pub fn accuracy(&self, slot: usize, m: usize) -> Accuracy {
        let (o, r) = (
            self.accuracy[slot * self.members + m],
            self.remote_accuracy[slot * self.members + m],
        );
        Accuracy {
            correct: o.correct + r.correct,
            total: o.total + r.total,
        }
    }

    /// Apply one feedback: `rows` holds each member's first output row at
    /// `m * cols`. Returns whether the ensemble's answer was right.
    pub fn learn(&mut self, e: &Entry, rows: &[f32], label: usize) -> bool {
        let cols = self.cols;
        let slot = e.domain_slot as usize;
        let row = |m: usize| &rows[m * cols..(m + 1) * cols];
        self.lessons += 1;
        for m in e.ran.iter() {
            let a = &mut self.accuracy[slot * self.members + m];
            a.total += 1.0;
            a.correct += (argmax(row(m)) == label) as u8 as f32;
        }
        self.stacker
            .update(label, e.ran.iter().map(|m| (m, row(m)[label])));
        // Every arm whose members all answered learns whether its mean was right.
        let mut mean = [0f32; 256];
        let mean = &mut mean[..cols.min(256)];
        for a in 0..self.bandit.arms.len() {
            let set = self.bandit.arms[a];
            if !set.is_subset(e.ran) || cols > 256 {
                continue;
            }
            mean.iter_mut().for_each(|x| *x = 0.0);
            for m in set.iter() {
                for (x, p) in mean.iter_mut().zip(row(m)) {
                    *x += p;
                }
            }
            self.bandit.observe(slot, a, argmax(mean) == label);
        }
        e.answer as usize == label
    }
}

/// Fingerprint of a member (name, version and content digest, see
/// `Model::digest`): learned state about a member is kept across restarts
/// only while this matches, so new weights under the same version start over.
pub fn member_fingerprint(name: &str, version: u32, digest: u128) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    h.update(name.as_bytes());
    h.update(&version.to_le_bytes());
    h.update(&digest.to_le_bytes());
    h.digest()
}

/// An arm's fingerprint: its members' fingerprints combined, so it
/// changes when any member's version or digest does.
pub fn arm_fingerprint(set: MemberSet, fps: &[u64]) -> u64 {
    set.iter().fold(0x9E37_79B9_7F4A_7C15u64, |h, m| {
        h.rotate_left(5) ^ fps.get(m).copied().unwrap_or(0)
    })
}

/// The state file of one shard: this shard's own counters in the text
/// form of [`super::counters::Counters`]. Counters whose fingerprint no
/// longer matches (a member's version or digest changed) are dropped.
pub fn state_path(base: &std::path::Path, shard: usize) -> std::path::PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(format!(".{shard}"));
    s.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_expire_and_are_used_once() {
        let mut w = Window::new(3, 2, 4);
        let e = Entry {
            ran: MemberSet(0b11),
            answer: 1,
            conn: 7,
            ..Default::default()
        };
        let rows = [[0.2f32, 0.8], [0.6, 0.4]];
        let t1 = w.push(e, 2, |m| &rows[m]);
        assert_eq!(t1 >> TICKET_SHARD_SHIFT, 3);
        assert!(
            w.take(t1, 8).is_none(),
            "another connection cannot spend it"
        );
        let (got, r) = w.take(t1, 7).unwrap();
        assert_eq!(got.answer, 1);
        assert_eq!(r, &[0.2, 0.8, 0.6, 0.4]);
        assert!(w.take(t1, 7).is_none(), "used once");
        let t2 = w.push(e, 2, |m| &rows[m]);
        let _t3 = w.push(e, 2, |m| &rows[m]);
        let _t4 = w.push(e, 2, |m| &rows[m]);
        assert!(w.take(t2, 7).is_none(), "overwritten");
        assert!(w.take(0, 7).is_none());
        assert!(
            w.take((4 << TICKET_SHARD_SHIFT) | 4, 7).is_none(),
            "other shard"
        );
    }

    #[test]
    fn learning_counts_members_and_arms() {
        let mut l = Learned::new(&[0, 1], &[1, 2], 2, 1);
        let e = Entry {
            ran: MemberSet(0b11),
            answer: 1,
            ..Default::default()
        };
        let rows = [0.2, 0.8, 0.6, 0.4];
        assert!(l.learn(&e, &rows, 1));
        assert_eq!(l.accuracy(0, 0).correct, 1.0);
        assert_eq!(l.accuracy(0, 1).correct, 0.0);
        assert_eq!(l.bandit.posterior(0, 0), (2.0, 1.0)); // member 0 alone: right
        assert_eq!(l.bandit.posterior(0, 1), (1.0, 2.0)); // member 1 alone: wrong
        assert_eq!(l.bandit.posterior(0, 2), (2.0, 1.0)); // mean (0.4, 0.6): right
    }
}
