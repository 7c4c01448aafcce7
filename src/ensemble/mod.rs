//! Ensembles: which members run for a request and how their outputs combine.
//!
//! Owns: the combiners (mean, weighted mean of member outputs) and the
//! selection step. Today the only policy is `all`; a policy decides a
//! [`MemberSet`] per request from the request and the plan, so cascades,
//! deadline- and cost-aware choice and bandits slot in as new
//! [`Selection`] variants without touching the server.
//! Knows nothing of devices or sockets: it sees member outputs as f32 rows.

use crate::config::ENSEMBLE_MEMBERS_MAX;
use crate::model::{Combiner, EnsembleSpec};

/// A set of member indices (bit i = member i), fixed-size so choosing
/// members never allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemberSet(pub u16);

const _: () = assert!(ENSEMBLE_MEMBERS_MAX <= 16, "MemberSet is a u16 bitmask");

impl MemberSet {
    pub fn all(n: usize) -> Self {
        MemberSet(((1u32 << n) - 1) as u16)
    }
    pub fn contains(self, i: usize) -> bool {
        self.0 & (1 << i) != 0
    }
    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn iter(self) -> impl Iterator<Item = usize> {
        (0..16).filter(move |&i| self.contains(i))
    }
}

/// How members are chosen per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Every member.
    All,
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
    pub selection: Selection,
    pub input_width: usize,
    pub output_width: usize,
    /// Hash of the definition (members, combiner, weights, selection):
    /// part of the ensemble's cache key, so a changed definition never
    /// answers from entries of the old one.
    pub fingerprint: u64,
}

impl EnsemblePlan {
    pub fn new(
        spec: &EnsembleSpec,
        members: Vec<usize>,
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
        let weights = match spec.combiner {
            Combiner::Mean => vec![1.0; members.len()],
            Combiner::WeightedMean => spec.weights.clone(),
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
            selection: Selection::All,
            input_width,
            output_width,
        })
    }

    /// The members to run for one request.
    pub fn select(&self) -> MemberSet {
        match self.selection {
            Selection::All => MemberSet::all(self.members.len()),
        }
    }
}

/// Accumulates member outputs for one request: `acc += w * out`.
/// The buffer is reused across requests (cleared, capacity kept).
#[derive(Debug, Default)]
pub struct Accumulator {
    acc: Vec<f32>,
    weight_sum: f32,
}

impl Accumulator {
    pub fn reset(&mut self, len: usize) {
        self.acc.clear();
        self.acc.resize(len, 0.0);
        self.weight_sum = 0.0;
    }

    pub fn add(&mut self, output: &[f32], weight: f32) {
        debug_assert_eq!(output.len(), self.acc.len());
        for (a, o) in self.acc.iter_mut().zip(output) {
            *a += weight * o;
        }
        self.weight_sum += weight;
    }

    /// The combined output (weighted mean of what was added).
    pub fn finish(&mut self) -> &[f32] {
        if self.weight_sum > 0.0 {
            let inv = 1.0 / self.weight_sum;
            for a in &mut self.acc {
                *a *= inv;
            }
        }
        &self.acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_mean_is_exact() {
        let mut a = Accumulator::default();
        a.reset(2);
        a.add(&[1.0, 0.0], 1.0);
        a.add(&[0.0, 1.0], 3.0);
        assert_eq!(a.finish(), &[0.25, 0.75]);
        a.reset(2);
        a.add(&[0.5, 0.5], 2.0);
        assert_eq!(a.finish(), &[0.5, 0.5]);
    }

    #[test]
    fn plan_validates_weights() {
        let spec = EnsembleSpec {
            name: "e".into(),
            members: vec!["a".into(), "b".into()],
            combiner: Combiner::WeightedMean,
            weights: vec![1.0],
        };
        assert!(EnsemblePlan::new(&spec, vec![0, 1], 4, 2).is_err());
        let spec = EnsembleSpec {
            weights: vec![1.0, 2.0],
            ..spec
        };
        let p = EnsemblePlan::new(&spec, vec![0, 1], 4, 2).unwrap();
        assert_eq!(p.select(), MemberSet(0b11));
        assert_eq!(p.select().iter().collect::<Vec<_>>(), vec![0, 1]);
    }
}
