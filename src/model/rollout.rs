//! A model's rollout (`<model>/rollout.toml`): a candidate version tried
//! on live traffic beside the current one, and the rule that promotes it
//! or rolls it back (docs/MODELS.md "Shadow, canary, promote, roll back").
//!
//! ```toml
//! candidate = 3        # the version on trial (default: the highest)
//! mode = "shadow"      # shadow: copies of requests, answers not returned
//!                      # canary: answers a share of inputs (sticky by input)
//! fraction = 0.1       # share of requests copied (shadow) or answered (canary)
//! [promote]            # optional: decide automatically
//! after = 500          # compared requests before deciding
//! agreement_min = 0.99 # argmax agreement with the current version
//! p99_ratio_max = 2.0  # candidate compute p99 <= this x the current one's
//! max_abs_diff_max = 1.0  # optional: largest |difference| of any output
//! ```
//!
//! Kept out of `model.toml` on purpose: a model's digest covers its
//! `model.toml`, so starting or ending a rollout there would give every
//! version a new digest and start their cached answers cold.

use super::Model;
use std::path::Path;
use std::sync::Arc;
use toml::Value;

/// The name of the file, beside `model.toml`.
pub const ROLLOUT_FILE: &str = "rollout.toml";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutMode {
    Shadow,
    Canary,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PromoteRule {
    pub after: u64,
    pub agreement_min: f64,
    pub p99_ratio_max: f64,
    pub max_abs_diff_max: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RolloutSpec {
    /// `None`: the highest version served.
    pub candidate: Option<u32>,
    pub mode: RolloutMode,
    pub fraction: f64,
    pub promote: Option<PromoteRule>,
}

fn num(t: &toml::Table, key: &str, path: &str) -> Result<Option<f64>, String> {
    match t.get(key) {
        None => Ok(None),
        Some(Value::Float(f)) => Ok(Some(*f)),
        Some(Value::Integer(i)) => Ok(Some(*i as f64)),
        Some(other) => Err(format!(
            "{path}: expected a number, found {}",
            other.type_str()
        )),
    }
}

fn deny(t: &toml::Table, prefix: &str, known: &[&str]) -> Result<(), String> {
    match t.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(format!(
            "{prefix}{k}: unknown field (known: {})",
            known.join(", ")
        )),
        None => Ok(()),
    }
}

/// Parse a `rollout.toml`; errors name the field.
pub fn parse_rollout(text: &str) -> Result<RolloutSpec, String> {
    let t = super::manifest::parse_toml(text)?;
    deny(&t, "", &["candidate", "mode", "fraction", "promote"])?;
    let candidate = match t.get("candidate") {
        None => None,
        Some(Value::Integer(v)) if *v >= 1 && *v <= u32::MAX as i64 => Some(*v as u32),
        Some(other) => {
            return Err(format!(
                "candidate: {other} is not a version (a positive integer)"
            ))
        }
    };
    let mode = match t.get("mode") {
        Some(Value::String(s)) if s == "shadow" => RolloutMode::Shadow,
        Some(Value::String(s)) if s == "canary" => RolloutMode::Canary,
        None => return Err("mode: missing (shadow | canary)".into()),
        Some(other) => return Err(format!("mode: {other} (expected shadow | canary)")),
    };
    let fraction =
        num(&t, "fraction", "fraction")?.ok_or("fraction: missing (0 < fraction <= 1)")?;
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(format!("fraction: {fraction} must be within (0, 1]"));
    }
    let promote = match t.get("promote") {
        None => None,
        Some(Value::Table(p)) => {
            deny(
                p,
                "promote.",
                &[
                    "after",
                    "agreement_min",
                    "p99_ratio_max",
                    "max_abs_diff_max",
                ],
            )?;
            let after = match p.get("after") {
                Some(Value::Integer(n)) if *n >= 1 => *n as u64,
                Some(other) => {
                    return Err(format!("promote.after: {other} must be an integer >= 1"))
                }
                None => {
                    return Err("promote.after: missing (compared requests before deciding)".into())
                }
            };
            let agreement_min = num(p, "agreement_min", "promote.agreement_min")?.unwrap_or(0.99);
            if !(0.0..=1.0).contains(&agreement_min) {
                return Err(format!(
                    "promote.agreement_min: {agreement_min} must be within 0..=1"
                ));
            }
            let p99_ratio_max = num(p, "p99_ratio_max", "promote.p99_ratio_max")?.unwrap_or(2.0);
            if !(p99_ratio_max > 0.0 && p99_ratio_max.is_finite()) {
                return Err(format!(
                    "promote.p99_ratio_max: {p99_ratio_max} must be > 0"
                ));
            }
            let max_abs_diff_max = num(p, "max_abs_diff_max", "promote.max_abs_diff_max")?;
            Some(PromoteRule {
                after,
                agreement_min,
                p99_ratio_max,
                max_abs_diff_max,
            })
        }
        Some(other) => {
            return Err(format!(
                "promote: expected a table, found {}",
                other.type_str()
            ))
        }
    };
    Ok(RolloutSpec {
        candidate,
        mode,
        fraction,
        promote,
    })
}

/// `<model dir>/rollout.toml`, if there is one, checked against the
/// versions `loaded`: the candidate must be served, and some other version
/// beside it. Errors name the file.
pub fn read_rollout(mdir: &Path, loaded: &[Arc<Model>]) -> Result<Option<RolloutSpec>, String> {
    let path = mdir.join(ROLLOUT_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let check = |mut r: RolloutSpec| {
        let highest = loaded.last().map_or(0, |m| m.version);
        let c = *r.candidate.get_or_insert(highest);
        if !loaded.iter().any(|m| m.version == c) {
            return Err(format!(
                "candidate: version {c} is not served (not on disk, refused, or left out by versions)"
            ));
        }
        if loaded.len() < 2 {
            return Err(format!(
                "candidate: version {c} is the only version served: nothing to compare it with"
            ));
        }
        Ok(r)
    };
    parse_rollout(&text)
        .and_then(check)
        .map(Some)
        .map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_naming_the_field() {
        let r = parse_rollout(
            "mode = \"canary\"\nfraction = 0.25\ncandidate = 2\n[promote]\nafter = 10\n",
        )
        .unwrap();
        assert_eq!(
            (r.mode, r.fraction, r.candidate),
            (RolloutMode::Canary, 0.25, Some(2))
        );
        assert_eq!(r.promote.unwrap().agreement_min, 0.99);
        for (text, field) in [
            ("fraction = 0.1", "mode"),
            ("mode = \"blue\"\nfraction = 0.1", "mode"),
            ("mode = \"shadow\"\nfraction = 1.5", "fraction"),
            (
                "mode = \"shadow\"\nfraction = 0.5\ncandidate = 0",
                "candidate",
            ),
            (
                "mode = \"shadow\"\nfraction = 0.5\n[promote]\nagreement_min = 0.9",
                "promote.after",
            ),
            ("mode = \"shadow\"\nfraction = 0.5\nfoo = 1", "foo"),
        ] {
            let e = parse_rollout(text).unwrap_err();
            assert!(e.starts_with(field), "{text}: {e}");
        }
    }
}
