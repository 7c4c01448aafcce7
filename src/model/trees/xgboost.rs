//! XGBoost's JSON model format (`Booster.save_model("m.json")`, format
//! version 1.0 and later) → [`Forest`].
//!
//! Accepted: booster `gbtree`; objectives `binary:logistic`,
//! `multi:softprob`, `multi:softmax` (served as probabilities),
//! `reg:squarederror`, `reg:absoluteerror`, `reg:pseudohubererror`;
//! numerical splits with `default_left`; scalar leaves. Refused, naming the
//! feature: `dart` and `gblinear` boosters, categorical splits, vector
//! leaves (multi-target trees), every other objective (ranking, survival,
//! count, ...).
//!
//! The base score: XGBoost stores it in the objective's *output* space
//! (a probability for `binary:logistic`, `[0.5]` or an estimated value),
//! and from 3.x as a list (one per class for multiclass). Its margin is
//! `logit(p)` for `binary:logistic` and the value itself otherwise.

use super::{Child, Forest, ForestBuilder, Split, TreeFormat, TreeObjective};
use serde_json::Value;

pub fn parse(bytes: &[u8]) -> Result<Forest, String> {
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not an XGBoost JSON model: {e}"))?;
    let learner = v
        .get("learner")
        .ok_or("not an XGBoost JSON model: no \"learner\" (UBJSON or the old binary format? save with .json)")?;
    let obj_name = learner
        .pointer("/objective/name")
        .and_then(Value::as_str)
        .ok_or("learner.objective.name: missing")?;
    let objective = match obj_name {
        "binary:logistic" => TreeObjective::Binary,
        "multi:softprob" | "multi:softmax" => TreeObjective::Multiclass,
        "reg:squarederror" | "reg:linear" | "reg:absoluteerror" | "reg:pseudohubererror" => {
            TreeObjective::Regression
        }
        other => {
            return Err(format!(
                "learner.objective.name: objective \"{other}\" is not supported (supported: binary:logistic, multi:softprob, multi:softmax, reg:squarederror, reg:absoluteerror, reg:pseudohubererror){}",
                if other.starts_with("rank:") { "; ranking objectives are not served" } else { "" }
            ))
        }
    };
    let booster = learner
        .get("gradient_booster")
        .ok_or("learner.gradient_booster: missing")?;
    let bname = booster.get("name").and_then(Value::as_str).unwrap_or("");
    match bname {
        "gbtree" => {}
        "dart" => {
            return Err(
                "learner.gradient_booster.name: booster \"dart\" is not supported (DART's per-tree weights; train with gbtree)"
                    .into(),
            )
        }
        "gblinear" => {
            return Err(
                "learner.gradient_booster.name: booster \"gblinear\" is not supported (linear models are not trees)"
                    .into(),
            )
        }
        other => {
            return Err(format!(
                "learner.gradient_booster.name: booster \"{other}\" is not supported (only gbtree)"
            ))
        }
    }
    let params = learner
        .get("learner_model_param")
        .ok_or("learner.learner_model_param: missing")?;
    let pint = |k: &str| -> Result<usize, String> {
        let s = params
            .get(k)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("learner.learner_model_param.{k}: missing"))?;
        s.parse::<usize>()
            .map_err(|_| format!("learner.learner_model_param.{k}: \"{s}\" is not a count"))
    };
    let num_feature = pint("num_feature")?;
    let num_class = pint("num_class")?;
    if params.get("num_target").is_some() && pint("num_target")? > 1 {
        return Err(
            "learner.learner_model_param.num_target: multi-target models are not supported".into(),
        );
    }
    if num_feature == 0 || num_feature > crate::model::manifest::WIDTH_MAX {
        return Err(format!(
            "learner.learner_model_param.num_feature: {num_feature} must be in 1..={}",
            crate::model::manifest::WIDTH_MAX
        ));
    }
    let groups = match objective {
        TreeObjective::Multiclass => {
            if num_class < 2 {
                return Err(format!(
                    "learner.learner_model_param.num_class: {num_class} for a multiclass objective"
                ));
            }
            num_class
        }
        _ => 1,
    };
    let base_margin = base_margin(params, objective, groups)?;

    let model = booster
        .get("model")
        .ok_or("learner.gradient_booster.model: missing")?;
    let trees = model
        .get("trees")
        .and_then(Value::as_array)
        .ok_or("learner.gradient_booster.model.trees: missing")?;
    let info = model
        .get("tree_info")
        .and_then(Value::as_array)
        .ok_or("learner.gradient_booster.model.tree_info: missing")?;
    if info.len() != trees.len() {
        return Err(format!(
            "learner.gradient_booster.model.tree_info: {} entries for {} trees",
            info.len(),
            trees.len()
        ));
    }
    let mut b = ForestBuilder::new();
    for (t, tree) in trees.iter().enumerate() {
        let path = format!("learner.gradient_booster.model.trees[{t}]");
        let group = info[t]
            .as_u64()
            .filter(|&g| (g as usize) < groups)
            .ok_or_else(|| {
                format!("learner.gradient_booster.model.tree_info[{t}]: not a class below {groups}")
            })?;
        parse_tree(&mut b, tree, num_feature, group as u32).map_err(|e| format!("{path}.{e}"))?;
    }
    if b.roots.is_empty() {
        return Err("learner.gradient_booster.model.trees: no trees".into());
    }
    Ok(Forest {
        format: TreeFormat::XgboostJson,
        objective_name: obj_name.to_string(),
        objective,
        num_features: num_feature,
        num_groups: groups,
        base_margin,
        accumulate_f64: false,
        nodes: b.nodes,
        values: b.values,
        roots: b.roots,
        depths: b.depths,
        groups: b.groups,
        node_visits_per_row: b.visits,
    })
}

/// `base_score` (`"5E-1"` or `"[6.27E-1]"` or `"[a,b,c]"`) in margin space.
fn base_margin(
    params: &Value,
    objective: TreeObjective,
    groups: usize,
) -> Result<Vec<f32>, String> {
    let path = "learner.learner_model_param.base_score";
    let s = params
        .get("base_score")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{path}: missing"))?;
    let inner = s.trim().trim_start_matches('[').trim_end_matches(']');
    let vals: Vec<f32> = inner
        .split(',')
        .map(|x| x.trim().parse::<f32>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{path}: \"{s}\" is not a number or a list of numbers"))?;
    let vals = match vals.len() {
        1 => vec![vals[0]; groups],
        n if n == groups => vals,
        n => return Err(format!("{path}: {n} values for {groups} outputs")),
    };
    let mut out = Vec::with_capacity(groups);
    for v in vals {
        let m = match objective {
            TreeObjective::Binary => {
                if !(v > 0.0 && v < 1.0) {
                    return Err(format!(
                        "{path}: {v} is not a probability in (0, 1) (binary:logistic stores it as one)"
                    ));
                }
                // XGBoost's ProbToMargin: -log(1/p - 1), in f32.
                -(1.0f32 / v - 1.0).ln()
            }
            _ => v,
        };
        if !m.is_finite() {
            return Err(format!("{path}: {v} is not finite"));
        }
        out.push(m);
    }
    Ok(out)
}

fn arr<'a>(tree: &'a Value, k: &str) -> Result<&'a Vec<Value>, String> {
    tree.get(k)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("{k}: missing"))
}

fn parse_tree(
    b: &mut ForestBuilder,
    tree: &Value,
    num_feature: usize,
    group: u32,
) -> Result<(), String> {
    if let Some(p) = tree.pointer("/tree_param/size_leaf_vector") {
        let s = p.as_str().unwrap_or("1");
        if s != "1" && s != "0" {
            return Err(format!(
                "tree_param.size_leaf_vector: {s}: vector leaves (multi-target trees) are not supported"
            ));
        }
    }
    if let Some(c) = tree.get("categories_nodes").and_then(Value::as_array) {
        if !c.is_empty() {
            return Err(format!(
                "categories_nodes: node {} has a categorical split; categorical splits are not supported",
                c[0]
            ));
        }
    }
    let left = arr(tree, "left_children")?;
    let right = arr(tree, "right_children")?;
    let cond = arr(tree, "split_conditions")?;
    let feat = arr(tree, "split_indices")?;
    let dleft = arr(tree, "default_left")?;
    let hess = tree.get("sum_hessian").and_then(Value::as_array);
    let n = left.len();
    if n == 0 {
        return Err("left_children: empty tree".into());
    }
    for (k, a) in [
        ("right_children", right),
        ("split_conditions", cond),
        ("split_indices", feat),
        ("default_left", dleft),
    ] {
        if a.len() != n {
            return Err(format!(
                "{k}: {} entries but left_children has {n}",
                a.len()
            ));
        }
    }
    if let Some(st) = tree.get("split_type").and_then(Value::as_array) {
        if let Some(i) = st.iter().position(|x| x.as_u64() != Some(0)) {
            return Err(format!(
                "split_type[{i}]: a categorical split; categorical splits are not supported"
            ));
        }
    }
    // XGBoost numbers nodes 0..n, leaves are nodes with left == -1. Map
    // inner nodes and leaves to their own ranges for the builder.
    let int = |a: &Vec<Value>, i: usize, k: &str| -> Result<i64, String> {
        a[i].as_i64()
            .ok_or_else(|| format!("{k}[{i}]: not an integer"))
    };
    let mut kind = vec![Child::Leaf(0); n];
    let (mut ni, mut nl) = (0, 0);
    for (i, k) in kind.iter_mut().enumerate() {
        if int(left, i, "left_children")? == -1 {
            *k = Child::Leaf(nl);
            nl += 1;
        } else {
            *k = Child::Inner(ni);
            ni += 1;
        }
    }
    let child = |a: &Vec<Value>, i: usize, k: &str| -> Result<Child, String> {
        let c = int(a, i, k)?;
        if c <= 0 || c as usize >= n {
            return Err(format!("{k}[{i}]: {c} is not a node of this tree"));
        }
        Ok(kind[c as usize])
    };
    let mut splits = Vec::with_capacity(ni);
    let mut leaves = Vec::with_capacity(nl);
    for i in 0..n {
        let c = cond[i]
            .as_f64()
            .ok_or_else(|| format!("split_conditions[{i}]: not a number"))?;
        match kind[i] {
            Child::Leaf(_) => {
                if !c.is_finite() {
                    return Err(format!(
                        "split_conditions[{i}]: leaf value {c} is not finite"
                    ));
                }
                let w = hess.and_then(|h| h.get(i)).and_then(Value::as_f64);
                leaves.push((c as f32 as f64, w));
            }
            Child::Inner(_) => {
                let f = int(feat, i, "split_indices")?;
                if f < 0 || f as usize >= num_feature {
                    return Err(format!(
                        "split_indices[{i}]: feature {f} but the model has {num_feature} features"
                    ));
                }
                if c.is_nan() {
                    return Err(format!("split_conditions[{i}]: NaN threshold"));
                }
                splits.push(Split {
                    feature: f as u32,
                    thr: c as f32,
                    // 0/1 (XGBoost ≥ 1.6) or false/true (older writers).
                    default_left: match dleft[i].as_bool() {
                        Some(b) => b,
                        None => int(dleft, i, "default_left")? != 0,
                    },
                    zero_missing: false,
                    left: child(left, i, "left_children")?,
                    right: child(right, i, "right_children")?,
                });
            }
        }
    }
    b.push_tree(kind[0], &splits, &leaves, group)
}
