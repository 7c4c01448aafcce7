//! Rollout decisions: the judge thread applies each rollout's `[promote]`
//! rule once enough requests were compared, and `POST
//! /v1/models/NAME/promote|rollback` decides by hand. A decision is logged
//! with its figures, counted (`beast_rollout_decisions_total`), shown in
//! `/v1/models`, and applied as a change: promoted, the candidate becomes
//! the current version; rolled back, it is no longer served. The decision
//! is kept (by model, candidate version and digest) for as long as the
//! process runs, so later rescans do not restart the rollout.

use super::{Applied, Change, Lifecycle};
use crate::model::rollout::PromoteRule;
use crate::server::rollout::RolloutStats;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How often the judge looks at the figures.
const JUDGE_EVERY: Duration = Duration::from_millis(20);

pub(super) fn spawn(l: &Arc<Lifecycle>) {
    let l = l.clone();
    let _ = std::thread::Builder::new()
        .name("beast-rollout".into())
        .spawn(move || {
            while !l.stopped() {
                std::thread::sleep(JUDGE_EVERY);
                let reg = l.hub.latest();
                for (name, st) in &reg.rollouts {
                    let Some(rule) = reg.repo.rollouts.get(name).and_then(|r| r.promote.as_ref())
                    else {
                        continue;
                    };
                    if st
                        .decision
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .is_some()
                        || st.compared.load(Ordering::Relaxed) < rule.after
                    {
                        continue;
                    }
                    let (promote, why) = verdict(rule, st);
                    let _ = l.decide(name, promote, &why, "rollout rule");
                }
            }
        });
}

/// The rule's verdict on the figures: (promote?, the figures and the
/// reason).
fn verdict(rule: &PromoteRule, st: &RolloutStats) -> (bool, String) {
    let (ea, eb) = (
        st.errors_current.load(Ordering::Relaxed),
        st.errors_candidate.load(Ordering::Relaxed),
    );
    let agreement = st.agreement();
    let diff = st.max_abs_diff();
    let (pa, pb) = (
        st.lat_current.quantile_us(0.99),
        st.lat_candidate.quantile_us(0.99),
    );
    let failed = if eb > ea {
        Some(format!("errors {eb} > current's {ea}"))
    } else if agreement < rule.agreement_min {
        Some(format!(
            "agreement {agreement:.4} < agreement_min {}",
            rule.agreement_min
        ))
    } else if rule.max_abs_diff_max.is_some_and(|m| diff > m) {
        Some(format!(
            "max |diff| {diff:.4} > max_abs_diff_max {}",
            rule.max_abs_diff_max.unwrap_or(0.0)
        ))
    } else if pb > rule.p99_ratio_max * pa.max(1.0) {
        Some(format!(
            "p99 {pb} us > {} x current's {pa} us",
            rule.p99_ratio_max
        ))
    } else {
        None
    };
    let figures = format!(
        "compared {}, agreement {agreement:.4}, max |diff| {diff:.4}, p99 {pb} us vs {pa} us, errors {eb} vs {ea}",
        st.compared.load(Ordering::Relaxed)
    );
    match failed {
        Some(why) => (false, format!("{why} ({figures})")),
        None => (true, format!("rule met ({figures})")),
    }
}

impl Lifecycle {
    /// Decide model `name`'s rollout: promote the candidate or roll it
    /// back, log and count it, and apply it.
    pub fn decide(
        &self,
        name: &str,
        promote: bool,
        why: &str,
        trigger: &str,
    ) -> Result<Applied, String> {
        let reg = self.hub.latest();
        let Some(st) = reg.rollouts.get(name) else {
            return Err(format!("model {name}: no rollout is running (no {}/{name}/rollout.toml, or already decided)", self.cfg.models_dir.display()));
        };
        let word = if promote { "promoted" } else { "rolled back" };
        {
            let mut d = st.decision.lock().unwrap_or_else(|e| e.into_inner());
            if d.is_some() {
                return Err(format!(
                    "model {name}: already decided: {}",
                    d.as_deref().unwrap_or("")
                ));
            }
            *d = Some(format!("{word} by {trigger}: {why}"));
        }
        self.decisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(st.to_json());
        self.decided
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                (name.to_string(), st.candidate, st.candidate_digest),
                promote,
            );
        let c = if promote {
            &self.counters.promoted
        } else {
            &self.counters.rolled_back
        };
        c.fetch_add(1, Ordering::Relaxed);
        eprintln!(
            "beast: rollout {name}: v{} {word} by {trigger} (current was v{}): {why}",
            st.candidate, st.current
        );
        self.apply(&Change::Rescan, &format!("rollout {name} {word}"))
    }

    /// Drop decided rollouts from a freshly scanned repository; a rolled
    /// back candidate is not served.
    pub(super) fn apply_decisions(&self, repo: &mut crate::model::load::Repository) {
        let decided = self.decided.lock().unwrap_or_else(|e| e.into_inner());
        let names: Vec<String> = repo.rollouts.keys().cloned().collect();
        for name in names {
            let cand = repo.rollouts[&name].candidate;
            let Some(versions) = repo.models.get_mut(&name) else {
                continue;
            };
            let Some(m) = versions.iter().find(|m| Some(m.version) == cand) else {
                continue;
            };
            match decided.get(&(name.clone(), m.version, m.digest)) {
                None => {}
                Some(true) => {
                    repo.rollouts.remove(&name);
                }
                Some(false) => {
                    let v = m.version;
                    versions.retain(|m| m.version != v);
                    repo.rollouts.remove(&name);
                }
            }
        }
    }
}
