//! One shard's member-selection state: the domain tables, what feedback
//! taught it (per ensemble), the feedback window, the latency profiles of
//! its models, the deadline heap of the straggler cutoff, and the saving
//! and loading of the learned part.
//!
//! Owned by one shard (`RefCell` in `Shard`), so nothing here locks.

use crate::config::{Config, ENSEMBLE_MEMBERS_MAX};
use crate::ensemble::bandit::BANDIT_PRIOR;
use crate::ensemble::cost::DomainTable;
use crate::ensemble::counters::{Counters, Key, Kind};
use crate::ensemble::feedback::{member_fingerprint, state_path, Accuracy, Learned, Window};
use crate::ensemble::profile::LatencyProfile;
use crate::ensemble::stacker::STACKER_ETA;
use crate::ensemble::EnsemblePlan;
use crate::model::Model;
use rand::SeedableRng;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::Path;
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

/// Entries of a shard's feedback window: none to remember without
/// ensembles or a canary (`tickets`).
pub fn window_cap(cfg: &Config, tickets: bool) -> usize {
    if tickets {
        cfg.feedback_window
    } else {
        1
    }
}

impl SelState {
    #[cfg(test)]
    pub fn new(shard: usize, cfg: &Config, plans: &[EnsemblePlan], models: &[&Arc<Model>]) -> Self {
        Self::with_window(shard, cfg, plans, models, None, false)
    }

    /// [`SelState::new`] with a feedback window built elsewhere (off the
    /// shard, by a reload), used when its shape is the one needed.
    /// `model_tickets`: a canary's answers get tickets too.
    pub fn with_window(
        shard: usize,
        cfg: &Config,
        plans: &[EnsemblePlan],
        models: &[&Arc<Model>],
        window: Option<Window>,
        model_tickets: bool,
    ) -> Self {
        let domains = cfg.selection_domains_max;
        let stride = plans
            .iter()
            .map(|p| p.members.len() * p.output_width)
            .max()
            .unwrap_or(0);
        let window_cap = window_cap(cfg, !plans.is_empty() || model_tickets);
        let deadlines_max = cfg.deadline_heap_max();
        SelState {
            domains: plans.iter().map(|_| DomainTable::new(domains)).collect(),
            learned: plans
                .iter()
                .map(|p| {
                    let fps = p
                        .members
                        .iter()
                        .map(|&slot| {
                            let m = &models[slot];
                            member_fingerprint(&m.name, m.version, m.digest)
                        })
                        .collect();
                    Learned::new(&p.by_cost, &p.flops_row, p.output_width, domains).with_fps(fps)
                })
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

    /// What this shard learned itself (its own counters), keyed by
    /// ensemble name, domain hash and fingerprint.
    pub fn own_counters(&self, plans: &[EnsemblePlan]) -> Counters {
        let mut c = Counters::default();
        for (p, plan) in plans.iter().enumerate() {
            let (l, d) = (&self.learned[p], &self.domains[p]);
            let key = |kind, domain, fp, class| Key {
                ensemble: plan.name.clone(),
                kind,
                domain,
                fp,
                class,
            };
            for slot in 0..d.capacity() {
                let hash = d.hash_of(slot);
                if slot > 0 && hash == 0 {
                    continue;
                }
                for (m, &fp) in l.fps.iter().enumerate() {
                    let a = l.accuracy[slot * l.members + m];
                    if a.total > 0.0 {
                        c.add(
                            key(Kind::Acc, hash, fp, 0),
                            [a.correct as f64, a.total as f64],
                        );
                    }
                }
                for (a, &fp) in l.arm_fps.iter().enumerate() {
                    let [s, f] = l.bandit.own(slot, a);
                    if s + f > 0.0 {
                        c.add(key(Kind::Arm, hash, fp, 0), [s as f64, f as f64]);
                    }
                }
            }
            for (m, &fp) in l.fps.iter().enumerate() {
                for class in 0..l.cols {
                    let s = l.stacker.own(m, class);
                    if s != 0.0 {
                        c.add(key(Kind::Stack, 0, fp, class as u32), [s as f64, 0.0]);
                    }
                }
            }
        }
        c
    }

    /// Add saved counters to this shard's own (a state file, or what the
    /// version this one replaces had learned). Counters about unknown
    /// ensembles or fingerprints are skipped. Returns the counters used.
    pub fn add_own(&mut self, plans: &[EnsemblePlan], c: &Counters) -> usize {
        let mut used = 0;
        for (k, v) in &c.map {
            let Some(p) = plans.iter().position(|p| p.name == k.ensemble) else {
                continue;
            };
            let l = &mut self.learned[p];
            let Some(i) = counter_index(l, k) else {
                continue;
            };
            match k.kind {
                Kind::Acc => {
                    let slot = self.domains[p].slot(k.domain);
                    add_accuracy(&mut l.accuracy[slot * l.members + i], v);
                }
                Kind::Arm => {
                    let slot = self.domains[p].slot(k.domain);
                    l.bandit.add_own(slot, i, [v[0] as f32, v[1] as f32]);
                }
                Kind::Stack => l.stacker.add_own(i, k.class as usize, v[0] as f32),
            }
            used += 1;
        }
        used
    }

    /// Replace what every other shard and node learned (the sync thread's
    /// `remote` for this shard). Counters about unknown ensembles or
    /// fingerprints (another version of a member) are not used.
    pub fn set_remote(&mut self, plans: &[EnsemblePlan], c: &Counters) {
        for (p, plan) in plans.iter().enumerate() {
            let l = &mut self.learned[p];
            let members = l.members;
            l.remote_accuracy.fill(Default::default());
            let mut arms = vec![None; l.bandit.arms.len() * self.domains[p].capacity()];
            let mut stack = vec![None; members * l.cols];
            let lo = Key {
                ensemble: plan.name.clone(),
                kind: Kind::Acc,
                domain: 0,
                fp: 0,
                class: 0,
            };
            for (k, v) in c
                .map
                .range(lo..)
                .take_while(|(k, _)| k.ensemble == plan.name)
            {
                let Some(i) = counter_index(l, k) else {
                    continue;
                };
                match k.kind {
                    Kind::Acc => {
                        let slot = self.domains[p].slot(k.domain);
                        add_accuracy(&mut l.remote_accuracy[slot * members + i], v);
                    }
                    Kind::Arm => {
                        let slot = self.domains[p].slot(k.domain);
                        let arms_n = l.arm_fps.len();
                        let e: &mut Option<[f32; 2]> = &mut arms[slot * arms_n + i];
                        let old = e.unwrap_or_default();
                        *e = Some([old[0] + v[0] as f32, old[1] + v[1] as f32]);
                    }
                    Kind::Stack if (k.class as usize) < l.cols => {
                        stack[i * l.cols + k.class as usize] = Some(v[0] as f32);
                    }
                    Kind::Stack => {}
                }
            }
            let (narms, cols) = (l.arm_fps.len(), l.cols);
            l.bandit.set_remote(|slot, a| arms[slot * narms + a]);
            l.stacker.set_remote(|m, class| stack[m * cols + class]);
        }
    }

    /// Save this shard's own counters (clean shutdown).
    pub fn save(&self, path: &Path, shard: usize, plans: &[EnsemblePlan]) -> Result<(), String> {
        let file = state_path(path, shard);
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, self.own_counters(plans).encode())
            .and_then(|_| std::fs::rename(&tmp, &file))
            .map_err(|e| format!("{}: {e}", file.display()))
    }

    /// Load what a previous run saved; counters about members whose
    /// version or digest changed (or unknown ensembles, or malformed
    /// lines) are skipped. Returns the counters used.
    pub fn load(&mut self, path: &Path, shard: usize, plans: &[EnsemblePlan]) -> usize {
        let Ok(text) = std::fs::read_to_string(state_path(path, shard)) else {
            return 0;
        };
        let (c, _) = Counters::decode(&text, BANDIT_PRIOR as f64, STACKER_ETA as f64);
        self.add_own(plans, &c)
    }
}

/// Which member (accuracy, stacker) or arm (bandit) of this version a
/// counter is about: `None` for another version of a member.
fn counter_index(l: &Learned, k: &Key) -> Option<usize> {
    let fps = if k.kind == Kind::Arm {
        &l.arm_fps
    } else {
        &l.fps
    };
    fps.iter().position(|&x| x == k.fp)
}

fn add_accuracy(a: &mut Accuracy, v: &[f64; 2]) {
    a.correct += v[0] as f32;
    a.total += v[1] as f32;
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
        let mut s = SelState::new(0, &cfg, &plans, &refs);
        let slot = s.domains[0].slot(crate::ensemble::cost::domain_hash(Some("shop")));
        // arms: a alone, b alone, both
        s.learned[0].bandit.observe(slot, 0, true);
        s.learned[0].bandit.observe(slot, 1, false);
        s.learned[0].accuracy[slot * 2 + 1].total = 5.0;
        s.save(&path, 0, &plans).unwrap();

        // Same versions: everything comes back, in the same domain.
        let mut t = SelState::new(0, &cfg, &plans, &refs);
        assert_eq!(t.load(&path, 0, &plans), 3);
        let slot2 = t.domains[0].slot(crate::ensemble::cost::domain_hash(Some("shop")));
        assert_eq!(t.learned[0].bandit.posterior(slot2, 0), (2.0, 1.0));
        assert_eq!(t.learned[0].bandit.posterior(slot2, 1), (1.0, 2.0));
        assert_eq!(t.learned[0].accuracy(slot2, 1).total, 5.0);

        // `b` changed version: what was learned about it (and the arm with
        // both) starts over; `a` keeps its state.
        let (cfg, plans, models2) = setup(2);
        let refs2: Vec<&Arc<Model>> = models2.iter().collect();
        let mut u = SelState::new(0, &cfg, &plans, &refs2);
        u.load(&path, 0, &plans);
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
        w.load(&path, 0, &plans);
        let slot4 = w.domains[0].slot(crate::ensemble::cost::domain_hash(Some("shop")));
        assert_eq!(w.learned[0].bandit.posterior(slot4, 0), (2.0, 1.0));
        assert_eq!(w.learned[0].bandit.posterior(slot4, 1), (1.0, 1.0));
        assert_eq!(w.learned[0].accuracy(slot4, 1).total, 0.0);
        // Another shard's file is not this one's.
        let mut v = SelState::new(1, &cfg, &plans, &refs2);
        assert_eq!(v.load(&path, 1, &plans), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn remote_counters_teach_another_shard_but_not_about_other_bytes() {
        use crate::ensemble::feedback::Entry;
        use crate::ensemble::MemberSet;
        let (cfg, plans, models) = setup(1);
        let refs: Vec<&Arc<Model>> = models.iter().collect();
        let mut a = SelState::new(0, &cfg, &plans, &refs);
        let shop = crate::ensemble::cost::domain_hash(Some("shop"));
        let slot = a.domains[0].slot(shop);
        let e = Entry {
            ran: MemberSet(0b11),
            domain_slot: slot as u16,
            ..Default::default()
        };
        // Member 0 says class 1, member 1 class 0; the truth is 1.
        for _ in 0..10 {
            a.learned[0].learn(&e, &[0.1, 0.9, 0.8, 0.2], 1);
        }
        let own = a.own_counters(&plans);
        // Another node's shard (its domain table fills in another order).
        let mut b = SelState::new(1, &cfg, &plans, &refs);
        b.domains[0].slot(crate::ensemble::cost::domain_hash(Some("other")));
        b.set_remote(&plans, &own);
        let bslot = b.domains[0].slot(shop);
        let (la, lb) = (&a.learned[0], &b.learned[0]);
        for m in 0..2 {
            assert_eq!(la.accuracy(slot, m), lb.accuracy(bslot, m));
            assert_eq!(la.stacker.weights(m), lb.stacker.weights(m));
        }
        for arm in 0..3 {
            assert_eq!(
                la.bandit.posterior(slot, arm),
                lb.bandit.posterior(bslot, arm)
            );
        }
        assert_eq!(lb.bandit.posterior(bslot, 0), (11.0, 1.0));
        // Its own counts are untouched: only remote.
        assert!(b.own_counters(&plans).is_empty());
        // Setting remote again replaces it (idempotent), never adds.
        b.set_remote(&plans, &own);
        assert_eq!(b.learned[0].accuracy(bslot, 0).total, 10.0);
        // A node whose member `b` has other bytes uses what was learned
        // about `a` alone, nothing about `b` nor the arm with both.
        let (cfg, plans, mut models3) = setup(1);
        Arc::get_mut(&mut models3[1]).unwrap().digest ^= 1;
        let refs3: Vec<&Arc<Model>> = models3.iter().collect();
        let mut c = SelState::new(2, &cfg, &plans, &refs3);
        c.set_remote(&plans, &own);
        let cslot = c.domains[0].slot(shop);
        let lc = &c.learned[0];
        assert_eq!(lc.accuracy(cslot, 0).total, 10.0);
        assert_eq!(lc.accuracy(cslot, 1).total, 0.0);
        assert_eq!(lc.bandit.posterior(cslot, 1), (1.0, 1.0));
        assert_eq!(lc.bandit.posterior(cslot, 2), (1.0, 1.0));
        assert_eq!(lc.stacker.weights(1), &[1.0, 1.0]);
        // What a shard learned survives being handed to a new version.
        let mut d = SelState::new(0, &cfg, &plans, &refs);
        assert_eq!(d.add_own(&plans, &own), own.len());
        assert_eq!(d.own_counters(&plans), own);
    }
}
