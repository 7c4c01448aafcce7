//! The version policy of a model (`versions` in its `model.toml`): which
//! of the version folders present are served.
//!
//! - absent, or `versions = "all"`: every version folder;
//! - `versions = { latest = N }`: the N highest;
//! - `versions = [1, 3]`: exactly those (a listed version that is not on
//!   disk is refused, naming the folder).
//!
//! A request's `version` 0 (or none) means the highest version served.

use std::collections::BTreeSet;
use toml::Value;

/// What a scan leaves out or adds beyond the version policies: the models
/// and versions unloaded or loaded by hand (`POST /v1/models/NAME/load`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanFilter {
    /// Model folders not loaded.
    pub skip: BTreeSet<String>,
    /// Versions not loaded.
    pub skip_versions: BTreeSet<(String, u32)>,
    /// Versions loaded even where the model's policy leaves them out.
    pub add_versions: BTreeSet<(String, u32)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum VersionPolicy {
    #[default]
    All,
    Latest(usize),
    Specific(Vec<u32>),
}

impl VersionPolicy {
    /// `versions` from a parsed `model.toml` (`None`: absent).
    pub fn parse(v: Option<&Value>) -> Result<VersionPolicy, String> {
        const HELP: &str = "expected \"all\", { latest = N } or a list of versions [1, 3]";
        let Some(v) = v else {
            return Ok(VersionPolicy::All);
        };
        match v {
            Value::String(s) if s == "all" => Ok(VersionPolicy::All),
            Value::Table(t) => {
                if let Some(k) = t.keys().find(|k| *k != "latest") {
                    return Err(format!("versions.{k}: unknown field ({HELP})"));
                }
                match t.get("latest") {
                    Some(Value::Integer(n)) if *n >= 1 => Ok(VersionPolicy::Latest(*n as usize)),
                    Some(other) => Err(format!("versions.latest: {other} must be an integer >= 1")),
                    None => Err(format!("versions: {HELP}")),
                }
            }
            Value::Array(a) if !a.is_empty() => {
                let mut out = Vec::new();
                for (i, x) in a.iter().enumerate() {
                    match x {
                        Value::Integer(n) if *n >= 1 && *n <= u32::MAX as i64 => {
                            out.push(*n as u32)
                        }
                        other => {
                            return Err(format!(
                                "versions[{i}]: {other} is not a version (a positive integer)"
                            ))
                        }
                    }
                }
                out.sort_unstable();
                out.dedup();
                Ok(VersionPolicy::Specific(out))
            }
            other => Err(format!("versions: found {} ({HELP})", other.type_str())),
        }
    }

    /// Of the versions on disk (ascending), those to serve; a pinned
    /// version missing on disk is returned in the error list.
    pub fn select(&self, on_disk: &[u32]) -> (Vec<u32>, Vec<u32>) {
        match self {
            VersionPolicy::All => (on_disk.to_vec(), Vec::new()),
            VersionPolicy::Latest(n) => (
                on_disk[on_disk.len().saturating_sub(*n)..].to_vec(),
                Vec::new(),
            ),
            VersionPolicy::Specific(list) => (
                list.iter()
                    .copied()
                    .filter(|v| on_disk.contains(v))
                    .collect(),
                list.iter()
                    .copied()
                    .filter(|v| !on_disk.contains(v))
                    .collect(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<VersionPolicy, String> {
        let t: toml::Table = toml::from_str(s).unwrap();
        VersionPolicy::parse(t.get("versions"))
    }

    #[test]
    fn parses_and_selects() {
        assert_eq!(parse("").unwrap(), VersionPolicy::All);
        assert_eq!(
            parse("versions = { latest = 2 }").unwrap(),
            VersionPolicy::Latest(2)
        );
        assert_eq!(
            parse("versions = [3, 1, 3]").unwrap(),
            VersionPolicy::Specific(vec![1, 3])
        );
        assert!(parse("versions = { latest = 0 }")
            .unwrap_err()
            .contains("versions.latest"));
        assert!(parse("versions = [0]").unwrap_err().contains("versions[0]"));
        assert!(parse("versions = { newest = 1 }")
            .unwrap_err()
            .contains("versions.newest"));
        assert!(parse("versions = 3").unwrap_err().contains("versions:"));
        let disk = [1, 2, 5];
        assert_eq!(VersionPolicy::Latest(2).select(&disk), (vec![2, 5], vec![]));
        assert_eq!(
            VersionPolicy::Latest(9).select(&disk),
            (vec![1, 2, 5], vec![])
        );
        assert_eq!(
            VersionPolicy::Specific(vec![1, 4]).select(&disk),
            (vec![1], vec![4])
        );
    }
}
