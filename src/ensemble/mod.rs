//! Ensembles: which members run for a request and how their outputs combine.
//!
//! Owns: the combiners ([`Accumulator`]: mean, weighted mean, majority vote,
//! learned per-class weights), the per-request selection policies
//! (`all`, [`cascade`], [`bandit`], deadline via [`profile`]), the feedback
//! window and the per-domain accuracy it feeds ([`feedback`]), the learned
//! weights ([`stacker`]), the cost counters ([`cost`]), and what was
//! learned as additive counters that shards and nodes sum ([`counters`]).
//! Knows nothing of devices or sockets: it sees member outputs as f32 rows.
//! The one exception runs once before serving: [`calibrate`], the start-up
//! step that runs a cascade's members over its calibration rows on the CPU
//! backend to set the threshold.
//! Everything here that runs per request works in buffers sized at start-up.

pub mod bandit;
pub mod calibrate;
pub mod cascade;
pub mod cost;
pub mod counters;
pub mod feedback;
pub mod profile;
pub mod stacker;

use crate::config::ENSEMBLE_MEMBERS_MAX;
use crate::model::{Combiner, EnsembleSpec, Policy, SelectionSpec, Task};
use crate::wire::PolicyOverride;

/// A set of member indices (bit i = member i), fixed-size so choosing
/// members never allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct MemberSet(pub u16);

const _: () = assert!(ENSEMBLE_MEMBERS_MAX <= 16, "MemberSet is a u16 bitmask");

impl MemberSet {
    pub fn all(n: usize) -> Self {
        MemberSet(((1u32 << n) - 1) as u16)
    }
    pub fn one(i: usize) -> Self {
        MemberSet(1 << i)
    }
    pub fn contains(self, i: usize) -> bool {
        self.0 & (1 << i) != 0
    }
    pub fn insert(&mut self, i: usize) {
        self.0 |= 1 << i;
    }
    pub fn is_subset(self, of: MemberSet) -> bool {
        self.0 & !of.0 == 0
    }
    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn iter(self) -> impl Iterator<Item = usize> + Clone {
        (0..16).filter(move |&i| self.contains(i))
    }
}

/// The policy that applies to one request: the request's override, or
/// else the ensemble's own.
pub fn effective_policy(over: PolicyOverride, own: Policy) -> Policy {
    match over {
        PolicyOverride::Default => own,
        PolicyOverride::All => Policy::All,
        PolicyOverride::Cascade => Policy::Cascade,
        PolicyOverride::Deadline => Policy::Deadline,
        PolicyOverride::Bandit => Policy::Bandit,
    }
}

/// An ensemble resolved against one shard's models: member indices are
/// the shard's model slots.
#[derive(Debug, Clone)]
pub struct EnsemblePlan {
    pub name: String,
    /// Shard model slot of each member.
    pub members: Vec<usize>,
    pub weights: Vec<f32>,
    pub combiner: Combiner,
    pub selection: SelectionSpec,
    /// FLOPs per row of each member (same order as `members`).
    pub flops_row: Vec<u64>,
    /// Member indices, cheapest first (the cascade order).
    pub by_cost: Vec<u8>,
    pub input_width: usize,
    pub output_width: usize,
    /// Hash of the definition (members, combiner, weights): part of the
    /// ensemble's cache key, so a changed definition never answers from
    /// entries of the old one.
    pub fingerprint: u64,
    /// The members' task (set by the shard from its first member; the
    /// loader checks they agree): a regression ensemble refuses the
    /// policies that need class probabilities, and feedback.
    pub task: Task,
}

impl EnsemblePlan {
    pub fn new(
        spec: &EnsembleSpec,
        members: Vec<usize>,
        flops_row: Vec<u64>,
        input_width: usize,
        output_width: usize,
    ) -> Result<Self, String> {
        if members.is_empty() || members.len() > ENSEMBLE_MEMBERS_MAX {
            return Err(format!(
                "ensemble {}: needs 1..={ENSEMBLE_MEMBERS_MAX} members, has {}",
                spec.name,
                members.len()
            ));
        }
        // A member twice would have two shares in one queue, whose room is
        // checked per member (and a weight is what repeating would mean).
        if let Some(i) = (1..members.len()).find(|&i| members[..i].contains(&members[i])) {
            return Err(format!(
                "ensemble {}: member {} is listed more than once",
                spec.name,
                spec.members.get(i).map_or("?", |m| m.as_str())
            ));
        }
        let weights = match spec.combiner {
            Combiner::WeightedMean => spec.weights.clone(),
            Combiner::Mean | Combiner::Vote | Combiner::Stacked | Combiner::Median => {
                vec![1.0; members.len()]
            }
        };
        if weights.len() != members.len()
            || weights.iter().any(|w| !w.is_finite() || *w < 0.0)
            || weights.iter().sum::<f32>() <= 0.0
        {
            return Err(format!(
                "ensemble {}: weights must be {} finite non-negative numbers with a positive sum",
                spec.name,
                members.len()
            ));
        }
        debug_assert_eq!(flops_row.len(), members.len());
        let mut by_cost: Vec<u8> = (0..members.len() as u8).collect();
        // Stable: equal costs keep the declared order.
        by_cost.sort_by_key(|&i| flops_row[i as usize]);
        let mut fp = xxhash_rust::xxh3::Xxh3Default::new();
        for m in &spec.members {
            fp.update(&(m.len() as u64).to_le_bytes());
            fp.update(m.as_bytes());
        }
        fp.update(&[spec.combiner as u8]);
        for w in &weights {
            fp.update(&w.to_le_bytes());
        }
        Ok(EnsemblePlan {
            fingerprint: fp.digest(),
            name: spec.name.clone(),
            members,
            weights,
            combiner: spec.combiner,
            selection: spec.selection.clone(),
            flops_row,
            by_cost,
            input_width,
            output_width,
            task: Task::Classification,
        })
    }

    pub fn all(&self) -> MemberSet {
        MemberSet::all(self.members.len())
    }

    /// FLOPs per row of a set of members.
    pub fn flops_of(&self, set: MemberSet) -> u64 {
        set.iter().map(|i| self.flops_row[i]).sum()
    }

    /// The fingerprint under which answers of `policy` may be cached, or
    /// `None` when its answers are not a function of the input alone
    /// (learned weights, bandit draws, deadlines).
    pub fn cache_fingerprint(&self, policy: Policy) -> Option<u64> {
        if self.combiner == Combiner::Stacked {
            return None;
        }
        match policy {
            Policy::All => Some(self.fingerprint),
            Policy::Cascade => {
                let s = &self.selection;
                let mut fp = xxhash_rust::xxh3::Xxh3Default::new();
                fp.update(&self.fingerprint.to_le_bytes());
                fp.update(b"cascade");
                fp.update(&[s.cascade_metric as u8]);
                fp.update(&s.cascade_threshold.to_le_bytes());
                Some(fp.digest())
            }
            Policy::Deadline | Policy::Bandit => None,
        }
    }
}

/// How a member's output is weighted in the accumulator.
#[derive(Debug, Clone, Copy)]
pub enum Weight<'a> {
    /// One weight for every class.
    Scalar(f32),
    /// One weight per class (`cols` long): the stacker's learned weights.
    PerClass(&'a [f32]),
}

/// Accumulates member outputs for one request. Buffers are reused across
/// requests (cleared, capacity kept). The combined output is computed on
/// demand without consuming the sums, so a cascade can look at it after
/// each step and go on adding. [`Accumulator::reset_for`] keeps only what
/// one combiner reads (the votes for a vote, each member's output for a
/// median), so a mean's `add` is the weighted sum alone.
#[derive(Debug, Default)]
pub struct Accumulator {
    /// `rows × cols`: Σ w·p.
    sum: Vec<f32>,
    /// Σ w of the scalar weights (every class).
    weight_total: f32,
    /// `cols`: Σ w per class of the per-class weights.
    weight_sum: Vec<f32>,
    /// `rows × cols`: members whose argmax is this class (kept for a vote).
    votes: Vec<f32>,
    /// Each added member's output, one after the other (kept for a median).
    vals: Vec<f32>,
    out: Vec<f32>,
    cols: usize,
    added: u32,
    keep_votes: bool,
    keep_vals: bool,
}

impl Accumulator {
    /// Start a request of `rows × cols`, keeping what every combiner reads.
    pub fn reset(&mut self, rows: usize, cols: usize) {
        self.reset_with(rows, cols, true, true);
    }

    /// Start a request of `rows × cols` to be combined by `combiner` only
    /// (`combine` with another combiner that needs votes or members'
    /// outputs would read them empty).
    pub fn reset_for(&mut self, rows: usize, cols: usize, combiner: Combiner) {
        let (votes, vals) = (combiner == Combiner::Vote, combiner == Combiner::Median);
        self.reset_with(rows, cols, votes, vals);
    }

    fn reset_with(&mut self, rows: usize, cols: usize, votes: bool, vals: bool) {
        let len = rows * cols;
        self.sum.clear();
        self.sum.resize(len, 0.0);
        self.votes.clear();
        if votes {
            self.votes.resize(len, 0.0);
        }
        self.weight_total = 0.0;
        self.weight_sum.clear();
        self.weight_sum.resize(cols, 0.0);
        self.vals.clear();
        self.cols = cols.max(1);
        self.added = 0;
        (self.keep_votes, self.keep_vals) = (votes, vals);
    }

    pub fn added(&self) -> u32 {
        self.added
    }

    pub fn add(&mut self, output: &[f32], weight: Weight<'_>) {
        debug_assert_eq!(output.len(), self.sum.len());
        let cols = self.cols;
        match weight {
            Weight::Scalar(w) => {
                for (a, x) in self.sum.iter_mut().zip(output) {
                    *a += w * x;
                }
                self.weight_total += w;
            }
            Weight::PerClass(w) => {
                for (s, o) in self
                    .sum
                    .chunks_exact_mut(cols)
                    .zip(output.chunks_exact(cols))
                {
                    for ((a, x), w) in s.iter_mut().zip(o).zip(w) {
                        *a += w * x;
                    }
                }
                for (a, w) in self.weight_sum.iter_mut().zip(w) {
                    *a += w
                }
            }
        }
        if self.keep_votes {
            for (v, o) in self
                .votes
                .chunks_exact_mut(cols)
                .zip(output.chunks_exact(cols))
            {
                v[argmax(o)] += 1.0;
            }
        }
        if self.keep_vals {
            // Capacity is kept across requests: no allocation once warm.
            self.vals.extend_from_slice(output);
        }
        self.added += 1;
    }

    /// The combined output of what was added so far.
    pub fn combine(&mut self, combiner: Combiner) -> &[f32] {
        let cols = self.cols;
        self.out.clear();
        self.out.resize(self.sum.len(), 0.0);
        for (o, s) in self
            .out
            .chunks_exact_mut(cols)
            .zip(self.sum.chunks_exact(cols))
        {
            for ((o, s), ws) in o.iter_mut().zip(s).zip(&self.weight_sum) {
                let w = self.weight_total + ws;
                *o = if w > 0.0 { s / w } else { 0.0 };
            }
        }
        debug_assert!(
            combiner != Combiner::Vote || self.keep_votes,
            "votes not kept"
        );
        debug_assert!(
            combiner != Combiner::Median || self.keep_vals,
            "outputs not kept"
        );
        match combiner {
            Combiner::Mean | Combiner::WeightedMean => {}
            Combiner::Median => {
                let len = self.out.len();
                // Members whose outputs were kept (none unless `reset_for`
                // said median, or `reset`).
                let n = (self.vals.len() / len.max(1)).min(MEDIAN_MEMBERS_MAX);
                let mut buf = [0f32; MEDIAN_MEMBERS_MAX];
                for (i, o) in self.out.iter_mut().enumerate() {
                    let b = &mut buf[..n];
                    for (m, x) in b.iter_mut().enumerate() {
                        *x = self.vals[m * len + i];
                    }
                    b.sort_unstable_by(f32::total_cmp);
                    *o = match n {
                        0 => 0.0,
                        _ if n % 2 == 1 => b[n / 2],
                        _ => 0.5 * (b[n / 2 - 1] + b[n / 2]),
                    };
                }
            }
            Combiner::Stacked => {
                // Per-class weights break the rows' sums: renormalise.
                for row in self.out.chunks_exact_mut(cols) {
                    let t: f32 = row.iter().sum();
                    if t > 0.0 {
                        row.iter_mut().for_each(|x| *x /= t);
                    }
                }
            }
            Combiner::Vote => {
                let n = self.added.max(1) as f32;
                for (o, v) in self.out.iter_mut().zip(&self.votes) {
                    // Vote fractions; the tiny mean-probability term only
                    // decides between classes with equal votes.
                    *o = v / n + VOTE_TIE_BREAK * *o;
                }
            }
        }
        &self.out
    }
}

/// Members the median looks at (every ensemble has at most this many).
const MEDIAN_MEMBERS_MAX: usize = ENSEMBLE_MEMBERS_MAX;

/// Weight of the mean probability in a vote's output (a tie breaker).
pub const VOTE_TIE_BREAK: f32 = 1e-4;

/// Index of the largest value (the first on ties); 0 for an empty row.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_mean_is_exact() {
        let mut a = Accumulator::default();
        a.reset(1, 2);
        a.add(&[1.0, 0.0], Weight::Scalar(1.0));
        a.add(&[0.0, 1.0], Weight::Scalar(3.0));
        assert_eq!(a.combine(Combiner::WeightedMean), &[0.25, 0.75]);
        // Combining does not consume: more members can be added after.
        a.add(&[0.0, 1.0], Weight::Scalar(4.0));
        assert_eq!(a.combine(Combiner::WeightedMean), &[0.125, 0.875]);
        a.reset(1, 2);
        a.add(&[0.5, 0.5], Weight::Scalar(2.0));
        assert_eq!(a.combine(Combiner::Mean), &[0.5, 0.5]);
    }

    #[test]
    fn vote_counts_argmax_and_breaks_ties_by_mean() {
        let mut a = Accumulator::default();
        a.reset(2, 3);
        a.add(&[0.6, 0.4, 0.0, 0.0, 0.1, 0.9], Weight::Scalar(1.0));
        a.add(&[0.4, 0.6, 0.0, 0.0, 0.2, 0.8], Weight::Scalar(1.0));
        a.add(&[0.9, 0.1, 0.0, 0.0, 0.9, 0.1], Weight::Scalar(1.0));
        let out = a.combine(Combiner::Vote).to_vec();
        // Row 0: class 0 has 2 of 3 votes.
        assert!((out[0] - 2.0 / 3.0).abs() < 1e-3 && argmax(&out[..3]) == 0);
        // Row 1: class 2 has 2 votes, class 1 one.
        assert_eq!(argmax(&out[3..]), 2);
        // A tie (one vote each) goes to the larger mean probability.
        a.reset(1, 2);
        a.add(&[0.55, 0.45], Weight::Scalar(1.0));
        a.add(&[0.1, 0.9], Weight::Scalar(1.0));
        assert_eq!(argmax(a.combine(Combiner::Vote)), 1);
    }

    #[test]
    fn median_takes_the_middle_value_per_output() {
        let mut a = Accumulator::default();
        a.reset(2, 1);
        a.add(&[1.0, 10.0], Weight::Scalar(1.0));
        a.add(&[100.0, 20.0], Weight::Scalar(1.0));
        // Two members: the mean of the middle two.
        assert_eq!(a.combine(Combiner::Median), &[50.5, 15.0]);
        a.add(&[3.0, -5.0], Weight::Scalar(1.0));
        // Three: the middle one, whatever the outlier.
        assert_eq!(a.combine(Combiner::Median), &[3.0, 10.0]);
        // The mean of the same three is pulled by the outlier.
        assert!((a.combine(Combiner::Mean)[0] - 104.0 / 3.0).abs() < 1e-4);
    }

    #[test]
    fn keeping_only_what_the_combiner_reads_gives_the_same_answer() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(12);
        let combiners = [
            Combiner::Mean,
            Combiner::WeightedMean,
            Combiner::Vote,
            Combiner::Median,
            Combiner::Stacked,
        ];
        let (mut all, mut only) = (Accumulator::default(), Accumulator::default());
        for _ in 0..500 {
            let c = combiners[rng.random_range(0..combiners.len())];
            let (rows, cols) = (rng.random_range(1..5), rng.random_range(1..20));
            let members = rng.random_range(1..=ENSEMBLE_MEMBERS_MAX);
            all.reset(rows, cols);
            only.reset_for(rows, cols, c);
            for _ in 0..members {
                let out: Vec<f32> = (0..rows * cols).map(|_| rng.random()).collect();
                let per_class: Vec<f32> = (0..cols).map(|_| rng.random_range(0.1..3.0)).collect();
                let w = match c {
                    Combiner::Stacked => Weight::PerClass(&per_class),
                    _ => Weight::Scalar(rng.random_range(0.0..4.0)),
                };
                all.add(&out, w);
                only.add(&out, w);
                // Bit for bit: the same sums in the same order.
                assert_eq!(all.combine(c), only.combine(c), "{c:?} {rows}x{cols}");
            }
        }
    }

    #[test]
    fn per_class_weights_renormalise() {
        let mut a = Accumulator::default();
        a.reset(1, 2);
        a.add(&[1.0, 0.0], Weight::PerClass(&[3.0, 1.0]));
        a.add(&[0.0, 1.0], Weight::PerClass(&[1.0, 1.0]));
        let out = a.combine(Combiner::Stacked);
        // class 0: 3/4, class 1: 1/2, renormalised: 0.6, 0.4
        assert!((out[0] - 0.6).abs() < 1e-6 && (out[1] - 0.4).abs() < 1e-6);
    }

    #[test]
    fn plan_validates_weights_and_orders_by_cost() {
        let spec = EnsembleSpec {
            name: "e".into(),
            members: vec!["a".into(), "b".into()],
            combiner: Combiner::WeightedMean,
            weights: vec![1.0],
            selection: Default::default(),
        };
        assert!(EnsemblePlan::new(&spec, vec![0, 1], vec![1, 1], 4, 2).is_err());
        let spec = EnsembleSpec {
            weights: vec![1.0, 2.0],
            ..spec
        };
        let p = EnsemblePlan::new(&spec, vec![0, 1], vec![10, 5], 4, 2).unwrap();
        assert_eq!(p.all(), MemberSet(0b11));
        assert_eq!(p.all().iter().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(p.by_cost, vec![1, 0]);
        assert_eq!(p.flops_of(p.all()), 15);
        assert_ne!(
            p.cache_fingerprint(Policy::All),
            p.cache_fingerprint(Policy::Cascade)
        );
        assert_eq!(p.cache_fingerprint(Policy::Bandit), None);
    }
}
