//! The `model.toml` of a tree model, and loading one version of it.
//!
//! ```toml
//! kind = "trees"
//! format = "xgboost-json"      # or "lightgbm-text"
//! input_width = 30
//! task = "classification"      # or "regression"; must agree with the objective
//! classes = ["malignant", "benign"]   # optional, one per output column
//! [batching]                   # optional, as for an MLP
//! ```
//!
//! The version folder holds the library's own file: `<N>/model.json`
//! (XGBoost) or `<N>/model.txt` (LightGBM). The model's digest is the
//! xxh3-128 of `model.toml` and that file, as for an MLP's weights.

use super::{Forest, TreeFormat, TreeObjective};
use crate::model::manifest::{deny_unknown, parse_batching, parse_toml, width};
use crate::model::{BatchLimits, Model, OutputTransform};
use std::path::Path;
use std::sync::Arc;
use toml::Value;

/// What a `model.toml` declares with `kind` (absent: an MLP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    Mlp,
    Trees,
}

/// The `kind` of a `model.toml`, read without validating anything else.
/// A file that does not parse is an MLP here (its parser reports the error).
pub fn declared_kind(text: &str) -> Result<ModelKind, String> {
    let Ok(t) = parse_toml(text) else {
        return Ok(ModelKind::Mlp);
    };
    match t.get("kind") {
        None => Ok(ModelKind::Mlp),
        Some(Value::String(s)) if s == "mlp" => Ok(ModelKind::Mlp),
        Some(Value::String(s)) if s == "trees" => Ok(ModelKind::Trees),
        Some(v) => Err(format!(
            "kind: {} is not a model kind (expected \"mlp\" or \"trees\")",
            v
        )),
    }
}

/// Classification or regression (`task` in `model.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeTask {
    Classification,
    Regression,
}

impl TreeTask {
    pub fn name(self) -> &'static str {
        match self {
            TreeTask::Classification => "classification",
            TreeTask::Regression => "regression",
        }
    }

    pub fn of(o: TreeObjective) -> TreeTask {
        match o {
            TreeObjective::Regression => TreeTask::Regression,
            _ => TreeTask::Classification,
        }
    }
}

/// A parsed and validated tree `model.toml`.
#[derive(Debug, Clone, PartialEq)]
pub struct TreesManifest {
    pub format: TreeFormat,
    pub input_width: usize,
    /// `None` when absent (then whatever the objective is).
    pub task: Option<TreeTask>,
    pub classes: Option<Vec<String>>,
    pub batch: BatchLimits,
}

impl TreesManifest {
    /// The canonical text (what `beast import-trees` writes).
    pub fn to_toml(&self) -> String {
        let mut s = format!(
            "kind = \"trees\"\nformat = \"{}\"\ninput_width = {}\n",
            self.format.name(),
            self.input_width
        );
        if let Some(t) = self.task {
            s += &format!("task = \"{}\"\n", t.name());
        }
        if let Some(c) = &self.classes {
            let q: Vec<String> = c.iter().map(|x| format!("{x:?}")).collect();
            s += &format!("classes = [{}]\n", q.join(", "));
        }
        s += &format!(
            "\n[batching]\nmax_batch = {}\nmin_batch = {}\nmax_queue_delay_us = {}\nqueue_rows_max = {}\n",
            self.batch.max_batch, self.batch.min_batch, self.batch.max_queue_delay_us, self.batch.queue_rows_max
        );
        s
    }
}

/// Parse a tree model's `model.toml`; errors name the field.
pub fn parse(text: &str, defaults: &BatchLimits) -> Result<TreesManifest, String> {
    let t = parse_toml(text)?;
    deny_unknown(
        &t,
        "",
        &[
            "kind",
            "format",
            "input_width",
            "task",
            "classes",
            "batching",
        ],
    )?;
    let format = match t.get("format") {
        None => return Err("format: missing (\"xgboost-json\" or \"lightgbm-text\")".into()),
        Some(Value::String(s)) => TreeFormat::from_name(s).ok_or_else(|| {
            format!("format: \"{s}\" unknown (expected \"xgboost-json\" or \"lightgbm-text\")")
        })?,
        Some(v) => return Err(format!("format: expected a string, found {}", v.type_str())),
    };
    let input_width = width(&t, "input_width", "input_width")?
        .ok_or("input_width: missing (the number of input features)")?;
    let task = match t.get("task") {
        None => None,
        Some(Value::String(s)) if s == "classification" => Some(TreeTask::Classification),
        Some(Value::String(s)) if s == "regression" => Some(TreeTask::Regression),
        Some(v) => {
            return Err(format!(
                "task: {v} unknown (expected \"classification\" or \"regression\")"
            ))
        }
    };
    let classes = match t.get("classes") {
        None => None,
        Some(Value::Array(a)) => {
            let mut out = Vec::with_capacity(a.len());
            for (i, v) in a.iter().enumerate() {
                match v {
                    Value::String(s) if !s.is_empty() => out.push(s.clone()),
                    _ => return Err(format!("classes[{i}]: expected a non-empty string")),
                }
            }
            Some(out)
        }
        Some(v) => {
            return Err(format!(
                "classes: expected an array of names, found {}",
                v.type_str()
            ))
        }
    };
    let batch = match t.get("batching") {
        None => *defaults,
        Some(Value::Table(bt)) => parse_batching(bt, defaults)?,
        Some(v) => {
            return Err(format!(
                "batching: expected a table, found {}",
                v.type_str()
            ))
        }
    };
    Ok(TreesManifest {
        format,
        input_width,
        task,
        classes,
        batch,
    })
}

/// Check a parsed forest against its manifest: widths, task, classes.
/// Errors name the `model.toml` field.
pub fn check(man: &TreesManifest, forest: &Forest) -> Result<(), String> {
    if forest.num_features != man.input_width {
        return Err(format!(
            "input_width: model.toml says {} but the model file has {} features",
            man.input_width, forest.num_features
        ));
    }
    let task = TreeTask::of(forest.objective);
    if let Some(t) = man.task {
        if t != task {
            return Err(format!(
                "task: model.toml says \"{}\" but the model file's objective \"{}\" is {}",
                t.name(),
                forest.objective_name,
                task.name()
            ));
        }
    }
    if let Some(c) = &man.classes {
        if task == TreeTask::Regression {
            return Err("classes: given for a regression model".into());
        }
        if c.len() != forest.output_width() {
            return Err(format!(
                "classes: {} names but the model has {} classes",
                c.len(),
                forest.output_width()
            ));
        }
    }
    Ok(())
}

/// Load `<version>/<model file>` at `path` as a [`Model`]. Errors do not
/// name the file (the caller prefixes it) unless they are about model.toml.
pub fn load_version(
    path: &Path,
    name: &str,
    version: u32,
    man: &TreesManifest,
    manifest_bytes: &[u8],
) -> Result<Model, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let digest = crate::model::weights::model_digest(manifest_bytes, &bytes);
    let forest = man.format.parse(&bytes)?;
    check(man, &forest).map_err(|e| format!("model.toml {e}"))?;
    let mut m = Model::from_forest(name, version, forest, man.batch, digest);
    m.io.classes = man.classes.clone().unwrap_or_default();
    Ok(m)
}

impl Model {
    /// A tree model: no layers, the forest evaluated by the CPU backend.
    pub fn from_forest(
        name: &str,
        version: u32,
        forest: Forest,
        batch: BatchLimits,
        digest: u128,
    ) -> Model {
        let output = match forest.objective {
            TreeObjective::Regression => OutputTransform::Identity,
            _ => OutputTransform::Softmax,
        };
        let mut m = Model {
            name: name.to_string(),
            version,
            input_width: forest.num_features,
            output_width: forest.output_width(),
            layers: Vec::new(),
            output,
            batch,
            digest,
            task: match forest.objective {
                TreeObjective::Regression => crate::model::Task::Regression,
                _ => crate::model::Task::Classification,
            },
            io: Default::default(),
            forest: Some(Arc::new(forest)),
        };
        if digest == 0 {
            m.digest = m.params_digest();
        }
        m
    }
}
