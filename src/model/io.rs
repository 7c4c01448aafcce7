//! What a model's inputs and outputs mean, beside its layers: the task
//! (`task = "classification" | "regression"`), the class names
//! (`classes = [...]`), the per-feature input transform (`[preprocess]`:
//! standardize, min-max, clip) and the binary expansion (a classifier
//! declared with one sigmoid unit is served as two classes `[1 − p, p]`).
//!
//! Parsed from `model.toml` here (the layer and batching fields are in
//! `manifest`); applied on the request path only by
//! [`Preprocess::apply`], in place on a batch's f32 rows (no allocation).
//! Docs: docs/MODELS.md.

use super::fields::{deny_unknown, enum_field, float};
use super::{Activation, Dense, F16Storage, OutputTransform};
use half::f16;
use toml::{Table, Value};

/// What a model's output is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// One probability (or score) per class; answers are compared by argmax.
    #[default]
    Classification,
    /// Raw values (one per output column); ensembles combine them by mean,
    /// weighted mean or median.
    Regression,
}

/// The input transform of `[preprocess]`, applied to every f32 input row
/// before the first layer: the scaler (if any), then the clip (if any).
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocess {
    pub scaler: Option<Scaler>,
    /// Per-feature bounds applied after the scaler.
    pub clip: Option<Clip>,
}

/// A per-feature affine scaler, as scikit-learn stores it.
#[derive(Clone, Debug, PartialEq)]
pub enum Scaler {
    /// `x' = (x − mean) / scale` (StandardScaler's `mean_`, `scale_`).
    Standardize { mean: Vec<f32>, scale: Vec<f32> },
    /// `x' = x · scale + min` (MinMaxScaler's `scale_`, `min_`).
    MinMax { scale: Vec<f32>, min: Vec<f32> },
}

/// `x' = min(max(x, min), max)` per feature.
#[derive(Clone, Debug, PartialEq)]
pub struct Clip {
    pub min: Vec<f32>,
    pub max: Vec<f32>,
}

/// The parts of a model beside its layers that say what its inputs and
/// outputs mean.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelIo {
    /// One name per output column (empty: none declared).
    pub classes: Vec<String>,
    pub preprocess: Option<Preprocess>,
    /// Declared with one sigmoid unit and served as two classes
    /// `[1 − p, p]` ([`expand_binary`]).
    pub binary: bool,
}

impl ModelIo {
    /// What the start-up log adds after a model's shape: ", regression",
    /// ", binary (1 sigmoid unit served as 2 classes)", ", classes [..]",
    /// ", preprocess standardize+clip"; empty for a plain classifier.
    pub fn describe(&self, task: Task) -> String {
        let mut s = String::new();
        if task == Task::Regression {
            s += ", regression";
        }
        if self.binary {
            s += ", binary (1 sigmoid unit served as 2 classes)";
        }
        if !self.classes.is_empty() {
            s += &format!(", classes [{}]", self.classes.join(", "));
        }
        if let Some(p) = &self.preprocess {
            s += &format!(", preprocess {}", p.describe());
        }
        s
    }
}

impl Preprocess {
    /// Transform `rows` (row-major, `width` features each) in place.
    pub fn apply(&self, rows: &mut [f32], width: usize) {
        for row in rows.chunks_exact_mut(width.max(1)) {
            match &self.scaler {
                None => {}
                Some(Scaler::Standardize { mean, scale }) => {
                    for ((x, m), s) in row.iter_mut().zip(mean).zip(scale) {
                        *x = (*x - m) / s;
                    }
                }
                Some(Scaler::MinMax { scale, min }) => {
                    for ((x, s), m) in row.iter_mut().zip(scale).zip(min) {
                        *x = *x * s + m;
                    }
                }
            }
            if let Some(c) = &self.clip {
                for ((x, lo), hi) in row.iter_mut().zip(&c.min).zip(&c.max) {
                    // max/min, not clamp: a NaN input stays NaN, never panics.
                    *x = x.max(*lo).min(*hi);
                }
            }
        }
    }

    /// A short description for logs and /v1/models ("standardize+clip").
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        match self.scaler {
            Some(Scaler::Standardize { .. }) => parts.push("standardize"),
            Some(Scaler::MinMax { .. }) => parts.push("min_max"),
            None => {}
        }
        if self.clip.is_some() {
            parts.push("clip");
        }
        parts.join("+")
    }

    /// Feed every parameter into a digest (for models built in memory).
    pub fn hash_into(&self, h: &mut xxhash_rust::xxh3::Xxh3Default) {
        let mut v = |tag: u8, x: &[f32]| {
            h.update(&[tag]);
            h.update(bytemuck::cast_slice(x));
        };
        match &self.scaler {
            None => {}
            Some(Scaler::Standardize { mean, scale }) => {
                v(1, mean);
                v(2, scale);
            }
            Some(Scaler::MinMax { scale, min }) => {
                v(3, scale);
                v(4, min);
            }
        }
        if let Some(c) = &self.clip {
            v(5, &c.min);
            v(6, &c.max);
        }
    }

    /// The `[preprocess]` table text (values printed so they read back exactly).
    pub fn to_toml(&self) -> String {
        let list = |v: &[f32]| {
            let items: Vec<String> = v.iter().map(|x| format!("{x:?}")).collect();
            format!("[{}]", items.join(", "))
        };
        let mut s = String::from("\n[preprocess]\n");
        match &self.scaler {
            None => {}
            Some(Scaler::Standardize { mean, scale }) => {
                s += &format!(
                    "standardize = {{ mean = {}, scale = {} }}\n",
                    list(mean),
                    list(scale)
                )
            }
            Some(Scaler::MinMax { scale, min }) => {
                s += &format!(
                    "min_max = {{ scale = {}, min = {} }}\n",
                    list(scale),
                    list(min)
                )
            }
        }
        if let Some(c) = &self.clip {
            s += &format!(
                "clip = {{ min = {}, max = {} }}\n",
                list(&c.min),
                list(&c.max)
            );
        }
        s
    }
}

/// Whether a model is served as a two-class classifier built from one
/// sigmoid unit.
pub fn is_binary(task: Task, output: OutputTransform, last_units: usize) -> bool {
    task == Task::Classification && output == OutputTransform::Sigmoid && last_units == 1
}

/// The output width clients see: 2 for a binary model, else the last layer's units.
pub fn served_width(task: Task, output: OutputTransform, last_units: usize) -> usize {
    if is_binary(task, output, last_units) {
        2
    } else {
        last_units
    }
}

/// Parse `task`, `classes` and `[preprocess]` of a `model.toml` table.
/// `last` is the last layer's (index, units, activation, layer_norm).
pub fn parse_io(
    t: &Table,
    input_width: usize,
    output: OutputTransform,
    last: (usize, usize, Activation, bool),
) -> Result<(Task, ModelIo), String> {
    let task = enum_field::<Task>(t, "task", "task")?.unwrap_or_default();
    let (li, units, act, ln) = last;
    let binary = is_binary(task, output, units);
    if binary {
        // [0, z] under softmax is [1 − σ(z), σ(z)]: the added column must be
        // exactly 0 after the activation, and a layer norm over one unit is
        // a constant.
        if ln {
            return Err(format!(
                "layers[{li}].layer_norm: a layer norm over the one output unit of a binary classifier is constant (remove it)"
            ));
        }
        if act == Activation::Sigmoid {
            return Err(format!(
                "layers[{li}].activation: \"sigmoid\" before output \"sigmoid\" on one unit cannot be served as two classes (use identity)"
            ));
        }
    }
    let width = served_width(task, output, units);
    let classes = match t.get("classes") {
        None => Vec::new(),
        Some(_) if task == Task::Regression => {
            return Err("classes: a regression model has no classes (task = \"regression\")".into())
        }
        Some(Value::Array(a)) => {
            let mut names: Vec<String> = Vec::with_capacity(a.len());
            for (i, v) in a.iter().enumerate() {
                let name = match v {
                    Value::String(s) if !s.is_empty() => s.clone(),
                    Value::Integer(n) => n.to_string(),
                    other => {
                        return Err(format!(
                            "classes[{i}]: expected a non-empty name, found {}",
                            other.type_str()
                        ))
                    }
                };
                if names.contains(&name) {
                    return Err(format!("classes[{i}]: \"{name}\" listed twice"));
                }
                names.push(name);
            }
            if names.len() != width {
                let why = if binary {
                    " (one sigmoid unit is served as two classes: name both, the negative first)"
                } else {
                    ""
                };
                return Err(format!(
                    "classes: {} names but the model has {width} output columns{why}",
                    names.len()
                ));
            }
            names
        }
        Some(other) => {
            return Err(format!(
                "classes: expected an array of names, found {}",
                other.type_str()
            ))
        }
    };
    let preprocess = match t.get("preprocess") {
        None => None,
        Some(Value::Table(p)) => Some(parse_preprocess(p, input_width)?),
        Some(other) => {
            return Err(format!(
                "preprocess: expected a table, found {}",
                other.type_str()
            ))
        }
    };
    Ok((
        task,
        ModelIo {
            classes,
            preprocess,
            binary,
        },
    ))
}

fn parse_preprocess(p: &Table, width: usize) -> Result<Preprocess, String> {
    deny_unknown(p, "preprocess", &["standardize", "min_max", "clip"])?;
    let table = |key: &str, fields: &[&str]| -> Result<Option<&Table>, String> {
        match p.get(key) {
            None => Ok(None),
            Some(Value::Table(t)) => {
                let path = format!("preprocess.{key}");
                deny_unknown(t, &path, fields)?;
                for f in fields {
                    if !t.contains_key(*f) {
                        return Err(format!("{path}.{f}: missing"));
                    }
                }
                Ok(Some(t))
            }
            Some(other) => Err(format!(
                "preprocess.{key}: expected a table {{ {} }}, found {}",
                fields.join(", "),
                other.type_str()
            )),
        }
    };
    let std = table("standardize", &["mean", "scale"])?;
    let mm = table("min_max", &["scale", "min"])?;
    let scaler = match (std, mm) {
        (Some(_), Some(_)) => {
            return Err("preprocess: give standardize or min_max, not both".into());
        }
        (Some(t), None) => {
            let mean = per_feature(&t["mean"], "preprocess.standardize.mean", width, false)?;
            let scale = per_feature(&t["scale"], "preprocess.standardize.scale", width, false)?;
            if let Some(i) = scale.iter().position(|s| *s <= 0.0) {
                return Err(format!(
                    "preprocess.standardize.scale[{i}]: {} must be > 0",
                    scale[i]
                ));
            }
            Some(Scaler::Standardize { mean, scale })
        }
        (None, Some(t)) => Some(Scaler::MinMax {
            scale: per_feature(&t["scale"], "preprocess.min_max.scale", width, false)?,
            min: per_feature(&t["min"], "preprocess.min_max.min", width, false)?,
        }),
        (None, None) => None,
    };
    let clip = match table("clip", &["min", "max"])? {
        None => None,
        Some(t) => {
            let min = per_feature(&t["min"], "preprocess.clip.min", width, true)?;
            let max = per_feature(&t["max"], "preprocess.clip.max", width, true)?;
            if let Some(i) = (0..width).find(|&i| min[i] > max[i]) {
                return Err(format!(
                    "preprocess.clip: min {} > max {} (feature {i})",
                    min[i], max[i]
                ));
            }
            Some(Clip { min, max })
        }
    };
    if scaler.is_none() && clip.is_none() {
        return Err("preprocess: empty (expected standardize, min_max or clip)".into());
    }
    Ok(Preprocess { scaler, clip })
}

/// A list of `width` finite numbers, or (when `scalar_ok`) one number for every feature.
fn per_feature(v: &Value, path: &str, width: usize, scalar_ok: bool) -> Result<Vec<f32>, String> {
    let one = |x: &Value, p: &str| -> Result<f32, String> {
        let f = float(x, p)?;
        let g = f as f32;
        if !g.is_finite() {
            return Err(format!("{p}: {f} is not a finite f32"));
        }
        Ok(g)
    };
    match v {
        Value::Array(a) => {
            if a.len() != width {
                return Err(format!(
                    "{path}: {} values but input_width is {width}",
                    a.len()
                ));
            }
            a.iter()
                .enumerate()
                .map(|(i, x)| one(x, &format!("{path}[{i}]")))
                .collect()
        }
        x if scalar_ok => Ok(vec![one(x, path)?; width]),
        other => Err(format!(
            "{path}: expected an array of {width} numbers, found {}",
            other.type_str()
        )),
    }
}

/// Turn the last layer of a binary classifier (one unit under a sigmoid)
/// into two columns under a softmax: `[0, z]`, whose softmax is exactly
/// `[1 − σ(z), σ(z)]`. The checks of [`parse_io`] guarantee the added
/// column is 0 after the layer's activation (relu, tanh, gelu, identity
/// all map 0 to 0; no layer norm).
pub fn expand_binary(last: &mut Dense) {
    debug_assert_eq!(last.out_dim, 1);
    let w: Vec<f16> = last.weight().iter().flat_map(|&x| [f16::ZERO, x]).collect();
    last.weight = F16Storage::Owned(w);
    last.bias = vec![0.0, last.bias[0]];
    last.out_dim = 2;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::manifest::parse_toml;

    fn io(text: &str, units: usize, output: OutputTransform) -> Result<(Task, ModelIo), String> {
        parse_io(
            &parse_toml(text).unwrap(),
            3,
            output,
            (1, units, Activation::Identity, false),
        )
    }

    #[test]
    fn binary_classes_and_errors() {
        let (task, m) = io("classes = [\"no\", \"yes\"]", 1, OutputTransform::Sigmoid).unwrap();
        assert_eq!(task, Task::Classification);
        assert!(m.binary);
        assert_eq!(m.classes, ["no", "yes"]);
        let e = io("classes = [\"yes\"]", 1, OutputTransform::Sigmoid).unwrap_err();
        assert!(e.contains("served as two classes"), "{e}");
        // A regression model with one sigmoid output is not binary.
        let (task, m) = io("task = \"regression\"", 1, OutputTransform::Sigmoid).unwrap();
        assert_eq!(task, Task::Regression);
        assert!(!m.binary);
        let e = io(
            "task = \"regression\"\nclasses = [\"a\"]",
            1,
            OutputTransform::Identity,
        )
        .unwrap_err();
        assert!(e.starts_with("classes: a regression model"), "{e}");
        let e = io("task = \"ranking\"", 1, OutputTransform::Identity).unwrap_err();
        assert!(e.starts_with("task: unknown variant"), "{e}");
        let e = parse_io(
            &parse_toml("").unwrap(),
            3,
            OutputTransform::Sigmoid,
            (2, 1, Activation::Sigmoid, false),
        )
        .unwrap_err();
        assert!(e.starts_with("layers[2].activation"), "{e}");
    }

    #[test]
    fn preprocess_parses_applies_and_refuses() {
        let (_, m) = io(
            "[preprocess]\nstandardize = { mean = [1, 2, 3], scale = [2, 4, 0.5] }\nclip = { min = -1, max = 1 }",
            2,
            OutputTransform::Softmax,
        )
        .unwrap();
        let p = m.preprocess.unwrap();
        assert_eq!(p.describe(), "standardize+clip");
        let mut x = [3.0, 2.0, 2.0, -9.0, 6.0, 3.25];
        p.apply(&mut x, 3);
        assert_eq!(x, [1.0, 0.0, -1.0, -1.0, 1.0, 0.5]);
        // The canonical text reads back to the same transform.
        let again = io(&p.to_toml(), 2, OutputTransform::Softmax).unwrap().1;
        assert_eq!(again.preprocess.unwrap(), p);
        let (_, m) = io(
            "[preprocess]\nmin_max = { scale = [0.5, 1, 2], min = [0, -1, 0] }",
            2,
            OutputTransform::Softmax,
        )
        .unwrap();
        let mut x = [2.0, 1.0, 1.0];
        m.preprocess.unwrap().apply(&mut x, 3);
        assert_eq!(x, [1.0, 0.0, 2.0]);
        for (text, want) in [
            (
                "[preprocess]\nstandardize = { mean = [1, 2], scale = [1, 1, 1] }",
                "preprocess.standardize.mean: 2 values but input_width is 3",
            ),
            (
                "[preprocess]\nstandardize = { mean = [1, 2, 3], scale = [1, 0, 1] }",
                "preprocess.standardize.scale[1]: 0 must be > 0",
            ),
            (
                "[preprocess]\nstandardize = { mean = [1, 2, 3] }",
                "preprocess.standardize.scale: missing",
            ),
            (
                "[preprocess]\nclip = { min = 2, max = 1 }",
                "preprocess.clip: min 2 > max 1",
            ),
            ("[preprocess]\nscale = 1", "preprocess.scale: unknown field"),
            ("[preprocess]\n", "preprocess: empty"),
        ] {
            let e = io(text, 2, OutputTransform::Softmax).unwrap_err();
            assert!(e.starts_with(want), "{e}");
        }
    }

    #[test]
    fn expanded_binary_layer_is_sigmoid_under_softmax() {
        let mut d = Dense {
            in_dim: 2,
            out_dim: 1,
            weight: F16Storage::Owned(vec![f16::from_f32(0.5), f16::from_f32(-2.0)]),
            bias: vec![0.25],
            layer_norm: None,
            activation: Activation::Identity,
        };
        expand_binary(&mut d);
        assert_eq!(d.out_dim, 2);
        assert_eq!(d.bias, [0.0, 0.25]);
        let w: Vec<f32> = d.weight().iter().map(|x| x.to_f32()).collect();
        assert_eq!(w, [0.0, 0.5, 0.0, -2.0]);
    }
}
