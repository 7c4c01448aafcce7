//! One shard's member-selection state: the domain tables, what feedback
//! taught it (per ensemble), the feedback window, the latency profiles of
//! its models, the deadline heap of the straggler cutoff, and the saving
//! and loading of the learned part.
//!
//! Owned by one shard (`RefCell` in `Shard`), so nothing here locks.

use crate::config::{Config, ENSEMBLE_MEMBERS_MAX};
use crate::ensemble::cost::DomainTable;
use crate::ensemble::feedback::{member_fingerprint, state_path, Learned, Window};
use crate::ensemble::profile::LatencyProfile;
use crate::ensemble::{EnsemblePlan, MemberSet};
use crate::model::Model;
use rand::SeedableRng;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

/// Weight of one answered request in the deadline slack.
pub const DEADLINE_SLACK_EWMA_ALPHA: f32 = 0.05;
/// The slack never exceeds this (µs): one pathological stall must not
/// make every later budget look impossible for long.
pub const DEADLINE_SLACK_US_MAX: f32 = 100_000.0;

pub(crate) struct SelState {
    pub domains: Vec<DomainTable>,
    pub learned: Vec<Learned>,
    pub window: Window,
    pub rng: rand::rngs::StdRng,
    /// Per model slot.
    pub profiles: Vec<LatencyProfile>,
    /// (deadline, pending entry, its generation) of ensemble requests under
    /// the deadline policy. Bounded: `deadlines_max`; stale items (answered
    /// entries) are dropped when it fills.
    pub deadlines: BinaryHeap<Reverse<(Instant, usize, u32)>>,
    pub deadlines_max: usize,
    /// EWMA of (time taken − time predicted) of deadline-policy requests,
    /// µs, never below 0, by the number of members run (more members, more
    /// batchers to schedule): added to every prediction.
    pub deadline_slack_us: [f32; ENSEMBLE_MEMBERS_MAX + 1],
}

impl SelState {
    #[cfg(test)]
    pub fn new(shard: usize, cfg: &Config, plans: &[EnsemblePlan], models: &[&Arc<Model>]) -> Self {
        Self::with_window(shard, cfg, plans, models, None)
    }

    /// [`SelState::new`] with a feedback window built elsewhere (off the
    /// shard, by a reload), used when its shape is the one needed.
    pub fn with_window(
        shard: usize,
        cfg: &Config,
        plans: &[EnsemblePlan],
        models: &[&Arc<Model>],
        window: Option<Window>,
    ) -> Self {
        let domains = cfg.selection_domains_max;
        let stride = plans
            .iter()
            .map(|p| p.members.len() * p.output_width)
            .max()
            .unwrap_or(0);
        // No ensembles, no answers to remember.
        let window_cap = if plans.is_empty() {
            1
        } else {
            cfg.feedback_window
        };
        let deadlines_max = cfg.deadline_heap_max();
        SelState {
            domains: plans.iter().map(|_| DomainTable::new(domains)).collect(),
            learned: plans
                .iter()
                .map(|p| Learned::new(&p.by_cost, &p.flops_row, p.output_width, domains))
                .collect(),
            window: window
                .filter(|w| w.shape() == (window_cap.max(1), stride))
                .unwrap_or_else(|| Window::new(shard, window_cap, stride)),
            rng: rand::rngs::StdRng::seed_from_u64(0x5EED ^ shard as u64),
            profiles: models
                .iter()
                .map(|m| LatencyProfile::new(m.batch.max_batch))
                .collect(),
            deadlines: BinaryHeap::with_capacity(deadlines_max),
            deadlines_max,
            deadline_slack_us: [0.0; ENSEMBLE_MEMBERS_MAX + 1],
        }
    }

    /// A deadline-policy request of `members` members was answered after
    /// `took_us`; the profiles had predicted `predicted_us`.
    pub fn observe_deadline(&mut self, members: usize, took_us: f32, predicted_us: f32) {
        let Some(slack) = self.deadline_slack_us.get_mut(members) else {
            return;
        };
        *slack += DEADLINE_SLACK_EWMA_ALPHA * (took_us - predicted_us - *slack);
        *slack = slack.clamp(0.0, DEADLINE_SLACK_US_MAX);
    }

    /// A request was refused as unable to make its deadline. Refusals
    /// teach nothing, so without this a slack grown in a burst of load
    /// would refuse such budgets forever: each refusal shrinks every slack
    /// a little, and a request is tried again once they have shrunk enough.
    pub fn deadline_refused(&mut self) {
        for s in &mut self.deadline_slack_us {
            *s *= 1.0 - DEADLINE_SLACK_EWMA_ALPHA;
        }
    }

    /// Watch a deadline; `is_live` tells whether an item still matters.
    pub fn watch(
        &mut self,
        at: Instant,
        k: usize,
        generation: u32,
        is_live: impl Fn(usize, u32) -> bool,
    ) {
        if self.deadlines.len() >= self.deadlines_max {
            self.deadlines.retain(|Reverse((_, k, g))| is_live(*k, *g));
        }
        // Entries in flight are fewer than the capacity (`deadline_heap_max`
        // >= `ensemble_in_flight_per_shard_max`, checked at start), and this
        // one's entry is among them, so after the purge there is room.
        if self.deadlines.len() < self.deadlines_max {
            self.deadlines.push(Reverse((at, k, generation)));
        }
    }

    /// Save the learned state (clean shutdown).
    pub fn save(
        &self,
        path: &std::path::Path,
        shard: usize,
        plans: &[EnsemblePlan],
        model_of: impl Fn(usize) -> (String, u32, u128),
    ) -> Result<(), String> {
        let mut s = String::new();
        for (p, plan) in plans.iter().enumerate() {
            let l = &self.learned[p];
            let fps: Vec<u64> = plan
                .members
                .iter()
                .map(|&slot| {
                    let (n, v, d) = model_of(slot);
                    member_fingerprint(&n, v, d)
                })
                .collect();
            let d = &self.domains[p];
            for slot in 0..d.capacity() {
                let hash = d.hash_of(slot);
                if slot > 0 && hash == 0 {
                    continue;
                }
                for (m, fp) in fps.iter().enumerate() {
                    let a = l.accuracy(slot, m);
                    if a.total > 0.0 {
                        let _ =
                            writeln!(s, "acc {} {hash} {fp} {} {}", plan.name, a.correct, a.total);
                    }
                }
                for (a, set) in l.bandit.arms.iter().enumerate() {
                    let (al, be) = l.bandit.posterior(slot, a);
                    if al + be > 2.0 * crate::ensemble::bandit::BANDIT_PRIOR {
                        let _ = writeln!(
                            s,
                            "arm {} {hash} {} {al} {be}",
                            plan.name,
                            arm_fp(*set, &fps)
                        );
                    }
                }
            }
            for (m, fp) in fps.iter().enumerate() {
                let _ = write!(s, "stack {} {fp}", plan.name);
                for w in l.stacker.weights(m) {
                    let _ = write!(s, " {w}");
                }
                s.push('\n');
            }
        }
        let file = state_path(path, shard);
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, s)
            .and_then(|_| std::fs::rename(&tmp, &file))
            .map_err(|e| format!("{}: {e}", file.display()))
    }

    /// Load what a previous run saved; lines about members whose version
    /// changed (or unknown ensembles, or malformed lines) are skipped.
    /// Returns the lines used.
    pub fn load(
        &mut self,
        path: &std::path::Path,
        shard: usize,
        plans: &[EnsemblePlan],
        model_of: impl Fn(usize) -> (String, u32, u128),
    ) -> usize {
        let Ok(text) = std::fs::read_to_string(state_path(path, shard)) else {
            return 0;
        };
        let mut used = 0;
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 3 {
                continue;
            }
            let Some(p) = plans.iter().position(|p| p.name == f[1]) else {
                continue;
            };
            let plan = &plans[p];
            let fps: Vec<u64> = plan
                .members
                .iter()
                .map(|&slot| {
                    let (n, v, d) = model_of(slot);
                    member_fingerprint(&n, v, d)
                })
                .collect();
            let num = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok());
            let int = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok());
            match f[0] {
                "acc" => {
                    let (Some(h), Some(fp), Some(c), Some(t)) = (int(2), int(3), num(4), num(5))
                    else {
                        continue;
                    };
                    let Some(m) = fps.iter().position(|&x| x == fp) else {
                        continue;
                    };
                    let slot = self.domains[p].slot(h);
                    let l = &mut self.learned[p];
                    let a = &mut l.accuracy[slot * l.members + m];
                    a.correct = c as f32;
                    a.total = t as f32;
                    used += 1;
                }
                "arm" => {
                    let (Some(h), Some(fp), Some(al), Some(be)) = (int(2), int(3), num(4), num(5))
                    else {
                        continue;
                    };
                    let l = &mut self.learned[p];
                    let Some(a) = l.bandit.arms.iter().position(|s| arm_fp(*s, &fps) == fp) else {
                        continue;
                    };
                    let slot = self.domains[p].slot(h);
                    l.bandit.set_posterior(slot, a, al as f32, be as f32);
                    used += 1;
                }
                "stack" => {
                    let Some(fp) = int(2) else { continue };
                    let Some(m) = fps.iter().position(|&x| x == fp) else {
                        continue;
                    };
                    let w: Vec<f32> = f[3..].iter().filter_map(|x| x.parse().ok()).collect();
                    self.learned[p].stacker.set_weights(m, &w);
                    used += 1;
                }
                _ => {}
            }
        }
        used
    }
}

/// An arm's fingerprint: its members' fingerprints combined, so it
/// changes when any member's version does.
fn arm_fp(set: MemberSet, fps: &[u64]) -> u64 {
    set.iter()
        .fold(0x9E37_79B9_7F4A_7C15u64, |h, m| h.rotate_left(5) ^ fps[m])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Activation, EnsembleSpec, OutputTransform};

    fn setup(version_b: u32) -> (Config, Vec<EnsemblePlan>, Vec<Arc<Model>>) {
        let mk = |name: &str, v: u32| {
            let mut m = Model::random(name, &[4, 2], Activation::Relu, OutputTransform::Softmax, 1);
            m.version = v;
            Arc::new(m)
        };
        let models = vec![mk("a", 1), mk("b", version_b)];
        let spec = EnsembleSpec::mean("e", &["a", "b"]);
        let plan = EnsemblePlan::new(&spec, vec![0, 1], vec![1, 2], 4, 2).unwrap();
        let cfg = Config {
            selection_domains_max: 4,
            feedback_window: 8,
            ..Config::default()
        };
        (cfg, vec![plan], models)
    }

    #[test]
    fn deadline_slack_learns_per_set_size_and_decays_on_refusal() {
        let (cfg, plans, models) = setup(1);
        let refs: Vec<&Arc<Model>> = models.iter().collect();
        let mut s = SelState::new(0, &cfg, &plans, &refs);
        for _ in 0..200 {
            s.observe_deadline(2, 150.0, 100.0);
        }
        assert!((s.deadline_slack_us[2] - 50.0).abs() < 1.0);
        assert_eq!(s.deadline_slack_us[1], 0.0);
        // Faster than predicted never makes the slack negative.
        s.observe_deadline(1, 10.0, 100.0);
        assert_eq!(s.deadline_slack_us[1], 0.0);
        for _ in 0..100 {
            s.deadline_refused();
        }
        assert!(s.deadline_slack_us[2] < 1.0);
        s.observe_deadline(99, 1.0, 0.0); // out of range: ignored
    }

    #[test]
    fn state_survives_a_restart_and_resets_a_changed_member() {
        let dir = std::env::temp_dir().join(format!("beast-select-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state");
        let (cfg, plans, models) = setup(1);
        let refs: Vec<&Arc<Model>> = models.iter().collect();
        let name_of = |models: &[Arc<Model>], slot: usize| {
            let m = &models[slot];
            (m.name.clone(), m.version, m.digest)
        };
        let mut s = SelState::new(0, &cfg, &plans, &refs);
        let slot = s.domains[0].slot(crate::ensemble::cost::domain_hash(Some("shop")));
        // arms: a alone, b alone, both
        s.learned[0].bandit.observe(slot, 0, true);
        s.learned[0].bandit.observe(slot, 1, false);
        s.learned[0].accuracy[slot * 2 + 1].total = 5.0;
        s.save(&path, 0, &plans, |i| name_of(&models, i)).unwrap();

        // Same versions: everything comes back, in the same domain.
        let mut t = SelState::new(0, &cfg, &plans, &refs);
        assert!(t.load(&path, 0, &plans, |i| name_of(&models, i)) >= 4);
        let slot2 = t.domains[0].slot(crate::ensemble::cost::domain_hash(Some("shop")));
        assert_eq!(t.learned[0].bandit.posterior(slot2, 0), (2.0, 1.0));
        assert_eq!(t.learned[0].bandit.posterior(slot2, 1), (1.0, 2.0));
        assert_eq!(t.learned[0].accuracy(slot2, 1).total, 5.0);

        // `b` changed version: what was learned about it (and the arm with
        // both) starts over; `a` keeps its state.
        let (cfg, plans, models2) = setup(2);
        let refs2: Vec<&Arc<Model>> = models2.iter().collect();
        let mut u = SelState::new(0, &cfg, &plans, &refs2);
        u.load(&path, 0, &plans, |i| name_of(&models2, i));
        let slot3 = u.domains[0].slot(crate::ensemble::cost::domain_hash(Some("shop")));
        assert_eq!(u.learned[0].bandit.posterior(slot3, 0), (2.0, 1.0));
        assert_eq!(u.learned[0].bandit.posterior(slot3, 1), (1.0, 1.0));
        assert_eq!(u.learned[0].accuracy(slot3, 1).total, 0.0);
        // `b` got new weights under the same version (another digest): the
        // same, what was learned about the old bytes is not carried over.
        let (cfg, plans, mut models3) = setup(1);
        Arc::get_mut(&mut models3[1]).unwrap().digest ^= 1;
        let refs3: Vec<&Arc<Model>> = models3.iter().collect();
        let mut w = SelState::new(0, &cfg, &plans, &refs3);
        w.load(&path, 0, &plans, |i| name_of(&models3, i));
        let slot4 = w.domains[0].slot(crate::ensemble::cost::domain_hash(Some("shop")));
        assert_eq!(w.learned[0].bandit.posterior(slot4, 0), (2.0, 1.0));
        assert_eq!(w.learned[0].bandit.posterior(slot4, 1), (1.0, 1.0));
        assert_eq!(w.learned[0].accuracy(slot4, 1).total, 0.0);
        // Another shard's file is not this one's.
        let mut v = SelState::new(1, &cfg, &plans, &refs2);
        assert_eq!(v.load(&path, 1, &plans, |i| name_of(&models2, i)), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
