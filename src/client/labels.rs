//! What an answer's columns mean, for tools that print answers (`beast
//! predict`): the target's task and class names, read from the server's
//! `/v1/models` on its admin port, and one answer row written with them.

use std::time::Duration;

/// A target's task and class names as `/v1/models` lists them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TargetInfo {
    pub regression: bool,
    /// One name per output column; empty when the model declares none.
    pub classes: Vec<String>,
}

/// Look `target` up in a `/v1/models` document (models and ensembles).
pub fn target_info(models_json: &serde_json::Value, target: &str) -> Option<TargetInfo> {
    let list = |k: &str| models_json[k].as_array().cloned().unwrap_or_default();
    let entry = list("models")
        .into_iter()
        .rev() // the latest version is listed last
        .chain(list("ensembles"))
        .find(|m| m["name"] == target)?;
    Some(TargetInfo {
        regression: entry["task"] == "regression",
        classes: entry["classes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// Ask the admin port at `admin` for `target`'s task and classes; `None`
/// when the port does not answer or does not know the target.
pub fn fetch_target_info(admin: &str, target: &str) -> Option<TargetInfo> {
    let (code, body) =
        crate::server::admin::get(admin, "/v1/models", Duration::from_secs(2)).ok()?;
    if code != 200 {
        return None;
    }
    target_info(&serde_json::from_str(&body).ok()?, target)
}

/// One answer row as `beast predict` prints it: the winning class (and its
/// name) for a classifier, the values for a regression.
pub fn describe_row(r: usize, row: &[f32], info: &TargetInfo) -> String {
    let vals: Vec<String> = row.iter().map(|v| format!("{v:.6}")).collect();
    if info.regression {
        return format!("row {r}: [{}]", vals.join(", "));
    }
    let best = row
        .iter()
        .enumerate()
        .max_by(|x, y| x.1.total_cmp(y.1))
        .map(|x| x.0)
        .unwrap_or(0);
    match info.classes.get(best) {
        Some(name) => format!("row {r}: class {best} ({name})  [{}]", vals.join(", ")),
        None => format!("row {r}: argmax {best}  [{}]", vals.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_described_with_names_or_values() {
        let doc = serde_json::json!({
            "models": [
                {"name": "bc", "task": "classification", "classes": ["malignant", "benign"]},
                {"name": "diab", "task": "regression", "classes": []},
            ],
            "ensembles": [{"name": "e", "task": "classification", "classes": []}],
        });
        let bc = target_info(&doc, "bc").unwrap();
        assert_eq!(
            describe_row(0, &[0.1, 0.9], &bc),
            "row 0: class 1 (benign)  [0.100000, 0.900000]"
        );
        let d = target_info(&doc, "diab").unwrap();
        assert_eq!(describe_row(2, &[151.5], &d), "row 2: [151.500000]");
        let e = target_info(&doc, "e").unwrap();
        assert_eq!(
            describe_row(0, &[0.7, 0.3], &e),
            "row 0: argmax 0  [0.700000, 0.300000]"
        );
        assert!(target_info(&doc, "nope").is_none());
    }
}
