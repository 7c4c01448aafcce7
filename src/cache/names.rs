//! Target names for `beast cache inspect`: the L2 file keeps only a 64-bit
//! tag per target ([`super::target_tag`]); the names come from a model
//! repository (the one the server that wrote the file serves).

use super::key::target_tag;
use std::path::Path;

/// Every name a request may ask for in the repository at `dir`: its model
/// folders and the ensembles of its `ensembles.toml` (errors are ignored:
/// this only labels tags, the server is what validates).
pub fn repository_targets(dir: &Path) -> Result<Vec<String>, String> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("--models {}: {e}", dir.display()))?;
    let mut names: Vec<String> = rd
        .flatten()
        .filter(|e| e.path().join("model.toml").is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    if let Ok(text) = std::fs::read_to_string(dir.join("ensembles.toml")) {
        if let Ok(entries) = crate::model::manifest::parse_ensembles(&text) {
            names.extend(entries.into_iter().map(|(n, _)| n));
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// `report` (from [`super::inspect`]) with each `tag XXXXXXXXXXXXXXXX  N`
/// line shown as the target's name where one of `names` has that tag.
pub fn label_targets(report: &str, names: &[String], repo: &Path) -> String {
    let mut out = String::with_capacity(report.len());
    for line in report.lines() {
        let labelled = line.trim_start().strip_prefix("tag ").and_then(|rest| {
            let (hex, count) = rest.split_once(char::is_whitespace)?;
            let tag = u64::from_str_radix(hex, 16).ok()?;
            Some(match names.iter().find(|n| target_tag(n) == tag) {
                Some(name) => format!("  {name:<24} {}  (tag {hex})", count.trim()),
                None => format!(
                    "  {:<24} {}  (tag {hex}: no model or ensemble of {} has it)",
                    "?",
                    count.trim(),
                    repo.display()
                ),
            })
        });
        out.push_str(labelled.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_become_names() {
        let t = target_tag("digits");
        let report = format!("targets        2\n  tag {t:016x}  7\n  tag 00000000000000ff  1\n");
        let out = label_targets(
            &report,
            &["digits".into(), "other".into()],
            Path::new("models"),
        );
        assert!(out.contains("  digits"), "{out}");
        assert!(out.contains(" 7  (tag "), "{out}");
        assert!(
            out.contains("no model or ensemble of models has it"),
            "{out}"
        );
        assert!(out.starts_with("targets        2\n"));
    }
}
