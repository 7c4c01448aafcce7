//! LightGBM's text model format (`Booster.save_model("m.txt")`) → [`Forest`].
//!
//! Accepted: objectives `binary` (with `sigmoid:1`), `multiclass`
//! (softmax), `regression`, `regression_l1`, `huber`, `fair`, `quantile`;
//! numerical splits with `decision_type`'s default-left bit (2) and
//! missing type (bits 3–4: none, zero, NaN). The init score is already
//! folded into the leaves by LightGBM. Refused, naming the feature:
//! categorical splits, linear trees, DART and random-forest boosting
//! (`average_output`), `multiclassova`, ranking and every other objective.
//!
//! A split sends `x` left when `x <= threshold` in double; see
//! [`super::lightgbm_threshold`] for the equivalent f32 test.

use super::{lightgbm_threshold, Child, Forest, ForestBuilder, Split, TreeFormat, TreeObjective};

pub fn parse(bytes: &[u8]) -> Result<Forest, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not a LightGBM text model: not UTF-8")?;
    let mut lines = text.lines().enumerate().peekable();
    match lines.next() {
        Some((_, "tree")) => {}
        _ => return Err("not a LightGBM text model: the first line is not \"tree\"".into()),
    }
    // Header: key=value lines up to the first "Tree=" line.
    let mut header = std::collections::BTreeMap::new();
    while let Some(&(_, l)) = lines.peek() {
        if l.starts_with("Tree=") || l == "end of trees" {
            break;
        }
        if let Some((k, v)) = l.split_once('=') {
            header.insert(k.to_string(), v.to_string());
        } else if l == "average_output" {
            return Err("average_output: random-forest boosting (rf) is not supported".into());
        }
        lines.next();
    }
    let get = |k: &str| {
        header
            .get(k)
            .map(String::as_str)
            .ok_or_else(|| format!("header {k}: missing"))
    };
    let count = |k: &str| -> Result<usize, String> {
        let s = get(k)?;
        s.parse()
            .map_err(|_| format!("header {k}: \"{s}\" is not a count"))
    };
    let num_class = count("num_class")?;
    let per_iter = count("num_tree_per_iteration")?;
    let max_feature_idx: usize = count("max_feature_idx")?;
    let num_features = max_feature_idx + 1;
    if num_features > crate::model::manifest::WIDTH_MAX {
        return Err(format!(
            "header max_feature_idx: {max_feature_idx} is too large"
        ));
    }
    let obj_line = get("objective")?;
    let mut parts = obj_line.split_whitespace();
    let obj = parts.next().unwrap_or("");
    let objective = match obj {
        "binary" => {
            for p in parts {
                if let Some(s) = p.strip_prefix("sigmoid:") {
                    if s.parse::<f64>() != Ok(1.0) {
                        return Err(format!(
                            "header objective: sigmoid:{s} is not supported (only sigmoid:1)"
                        ));
                    }
                }
            }
            TreeObjective::Binary
        }
        "multiclass" | "softmax" => TreeObjective::Multiclass,
        "regression" | "regression_l2" | "l2" | "mse" | "regression_l1" | "l1" | "huber"
        | "fair" | "quantile" => TreeObjective::Regression,
        other => {
            let why = match other {
                "lambdarank" | "rank_xendcg" => "; ranking objectives are not served",
                "multiclassova" => "; one-vs-all multiclass (sigmoid per class) is not supported",
                _ => "",
            };
            return Err(format!(
                "header objective: \"{other}\" is not supported (supported: binary, multiclass, regression, regression_l1, huber, fair, quantile){why}"
            ));
        }
    };
    let groups = match objective {
        TreeObjective::Multiclass => {
            if num_class < 2 || per_iter != num_class {
                return Err(format!(
                    "header num_class: {num_class} with num_tree_per_iteration {per_iter}"
                ));
            }
            num_class
        }
        _ => {
            if num_class != 1 || per_iter != 1 {
                return Err(format!(
                    "header num_class: {num_class} (num_tree_per_iteration {per_iter}) for a single-output objective"
                ));
            }
            1
        }
    };
    // The parameters section (after the trees) says which boosting trained it.
    if let Some(p) = text.find("\n[boosting: ") {
        let rest = &text[p + 12..];
        let b = rest.split(']').next().unwrap_or("");
        if b != "gbdt" && b != "gbrt" && b != "goss" {
            return Err(format!(
                "parameters boosting: \"{b}\" is not supported (DART, rf: only gbdt/goss)"
            ));
        }
    }
    if header.contains_key("linear_tree") {
        // Older writers mark linear trees in the header; newer ones per tree.
        let v = &header["linear_tree"];
        if v != "0" {
            return Err("header linear_tree: linear trees are not supported".into());
        }
    }

    let mut b = ForestBuilder::new();
    let mut t = 0usize;
    loop {
        let Some((ln, l)) = lines.next() else {
            return Err("no \"end of trees\" line (file cut short?)".into());
        };
        if l == "end of trees" {
            break;
        }
        if l.is_empty() {
            continue;
        }
        let Some(id) = l.strip_prefix("Tree=") else {
            return Err(format!(
                "line {}: expected \"Tree=N\", found \"{l}\"",
                ln + 1
            ));
        };
        if id.parse::<usize>() != Ok(t) {
            return Err(format!(
                "line {}: \"Tree={id}\" out of order (expected Tree={t})",
                ln + 1
            ));
        }
        let mut fields = std::collections::BTreeMap::new();
        while let Some(&(_, l)) = lines.peek() {
            if l.is_empty() || l.starts_with("Tree=") || l == "end of trees" {
                break;
            }
            if let Some((k, v)) = l.split_once('=') {
                fields.insert(k, v);
            }
            lines.next();
        }
        parse_tree(&mut b, &fields, num_features, (t % groups) as u32)
            .map_err(|e| format!("Tree={t}: {e}"))?;
        t += 1;
    }
    if b.roots.is_empty() {
        return Err("no trees".into());
    }
    Ok(Forest {
        format: TreeFormat::LightgbmText,
        objective_name: obj.to_string(),
        objective,
        num_features,
        num_groups: groups,
        base_margin: vec![0.0; groups],
        accumulate_f64: true,
        nodes: b.nodes,
        values: b.values,
        roots: b.roots,
        depths: b.depths,
        groups: b.groups,
        node_visits_per_row: b.visits,
    })
}

fn parse_tree(
    b: &mut ForestBuilder,
    f: &std::collections::BTreeMap<&str, &str>,
    num_features: usize,
    group: u32,
) -> Result<(), String> {
    let get = |k: &str| f.get(k).copied().ok_or_else(|| format!("{k}: missing"));
    let list = |k: &str| -> Result<Vec<&str>, String> { Ok(get(k)?.split_whitespace().collect()) };
    let num_leaves: usize = get("num_leaves")?
        .parse()
        .map_err(|_| "num_leaves: not a count".to_string())?;
    if f.get("is_linear").is_some_and(|v| *v != "0") {
        return Err("is_linear: linear trees are not supported".into());
    }
    if f.get("num_cat").is_some_and(|v| *v != "0") {
        return Err("num_cat: categorical splits are not supported".into());
    }
    let num = |k: &str, s: &str, i: usize| -> Result<f64, String> {
        s.parse::<f64>()
            .map_err(|_| format!("{k}[{i}]: \"{s}\" is not a number"))
    };
    let leaf_value = list("leaf_value")?;
    if leaf_value.len() != num_leaves {
        return Err(format!(
            "leaf_value: {} values for num_leaves={num_leaves}",
            leaf_value.len()
        ));
    }
    let leaf_count = f
        .get("leaf_count")
        .map(|s| s.split_whitespace().collect::<Vec<_>>());
    let mut leaves = Vec::with_capacity(num_leaves);
    for (i, s) in leaf_value.iter().enumerate() {
        let v = num("leaf_value", s, i)?;
        if !v.is_finite() {
            return Err(format!("leaf_value[{i}]: {v} is not finite"));
        }
        let w = leaf_count
            .as_ref()
            .and_then(|c| c.get(i))
            .and_then(|c| c.parse::<f64>().ok());
        leaves.push((v, w));
    }
    if num_leaves == 1 {
        return b.push_tree(Child::Leaf(0), &[], &leaves, group);
    }
    let n = num_leaves - 1;
    let feat = list("split_feature")?;
    let thr = list("threshold")?;
    let dt = list("decision_type")?;
    let lc = list("left_child")?;
    let rc = list("right_child")?;
    for (k, a) in [
        ("split_feature", &feat),
        ("threshold", &thr),
        ("decision_type", &dt),
        ("left_child", &lc),
        ("right_child", &rc),
    ] {
        if a.len() != n {
            return Err(format!(
                "{k}: {} entries for num_leaves={num_leaves}",
                a.len()
            ));
        }
    }
    let child = |k: &str, s: &str, i: usize| -> Result<Child, String> {
        let c: i64 = s
            .parse()
            .map_err(|_| format!("{k}[{i}]: \"{s}\" is not an integer"))?;
        if c >= 0 {
            if c as usize >= n {
                return Err(format!("{k}[{i}]: node {c} does not exist"));
            }
            Ok(Child::Inner(c as usize))
        } else {
            let l = (!c) as usize; // -1 → leaf 0
            if l >= num_leaves {
                return Err(format!("{k}[{i}]: leaf {l} does not exist"));
            }
            Ok(Child::Leaf(l))
        }
    };
    let mut splits = Vec::with_capacity(n);
    for i in 0..n {
        let d: u32 = dt[i]
            .parse()
            .map_err(|_| format!("decision_type[{i}]: \"{}\" is not an integer", dt[i]))?;
        if d & 1 != 0 {
            return Err(format!(
                "decision_type[{i}]: node {i} is a categorical split; categorical splits are not supported"
            ));
        }
        let default_left = d & 2 != 0;
        let missing = (d >> 2) & 3;
        let fi: usize = feat[i]
            .parse()
            .map_err(|_| format!("split_feature[{i}]: \"{}\" is not a feature index", feat[i]))?;
        if fi >= num_features {
            return Err(format!(
                "split_feature[{i}]: feature {fi} but the model has {num_features} features"
            ));
        }
        let t = num("threshold", thr[i], i)?;
        // LightGBM writes +inf for a split whose left side takes every
        // value: `x < inf` agrees for every input but +inf itself.
        if t.is_nan() {
            return Err(format!("threshold[{i}]: NaN"));
        }
        let (default_left, zero_missing) = match missing {
            // None: NaN is read as 0.0 and compared as usual.
            0 => (0.0 <= t, false),
            // Zero: NaN and |x| <= 1e-35 take the default direction.
            1 => (default_left, true),
            // NaN: NaN takes the default direction.
            2 => (default_left, false),
            _ => {
                return Err(format!(
                    "decision_type[{i}]: missing type {missing} unknown"
                ))
            }
        };
        splits.push(Split {
            feature: fi as u32,
            thr: lightgbm_threshold(t),
            default_left,
            zero_missing,
            left: child("left_child", lc[i], i)?,
            right: child("right_child", rc[i], i)?,
        });
    }
    b.push_tree(Child::Inner(0), &splits, &leaves, group)
}
