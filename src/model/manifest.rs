//! `model.toml` and `ensembles.toml`: their shapes and their validation.
//!
//! The files are walked by hand over a `toml::Table` rather than derived with
//! serde, so that every error names the exact field (`layers[1].activation`)
//! and unknown keys (a typo such as `max_bach`) are refused instead of
//! silently ignored. Errors here do not name the file; `load` prefixes it.

pub(crate) use super::fields::deny_unknown;
use super::fields::{enum_field, float, uint};
use super::io::{self, ModelIo, Task};
use super::{
    Activation, BatchLimits, CascadeMetric, Combiner, EnsembleSpec, OutputTransform, Policy,
    SelectionSpec,
};
use toml::{Table, Value};

/// Largest batching delay a model may ask for: beyond a second it is a unit
/// mistake (ms or ns written as µs), not a latency policy.
pub const QUEUE_DELAY_US_MAX: u64 = 1_000_000;

/// Widest layer or input accepted; larger is a typo, and would overflow the
/// scratch sizing of the backends long before it became useful.
pub const WIDTH_MAX: usize = 1 << 20;

/// The layer-norm epsilon when `layer_norm_eps` is absent.
pub const LAYER_NORM_EPS_DEFAULT: f32 = 1e-5;

/// A parsed and validated `model.toml`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelManifest {
    pub input_width: usize,
    pub output: OutputTransform,
    pub layer_norm_eps: f32,
    pub layers: Vec<LayerSpec>,
    pub batch: BatchLimits,
    /// Which version folders are served (`versions`, src/model/versions.rs).
    pub versions: super::versions::VersionPolicy,
    /// `task` (default classification).
    pub task: Task,
    /// `classes`, `[preprocess]`, and whether one sigmoid unit is served
    /// as two classes (module `io`).
    pub io: ModelIo,
}

/// One `layers[i]` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSpec {
    pub units: usize,
    pub activation: Activation,
    pub layer_norm: bool,
}

impl ModelManifest {
    /// `[in, out]` of each layer, chaining from `input_width`.
    pub fn layer_dims(&self) -> Vec<(usize, usize)> {
        let mut prev = self.input_width;
        self.layers
            .iter()
            .map(|l| {
                let d = (prev, l.units);
                prev = l.units;
                d
            })
            .collect()
    }

    /// The last layer's units (the weights' shape).
    pub fn output_width(&self) -> usize {
        self.layers.last().map_or(self.input_width, |l| l.units)
    }

    /// The output width clients see: 2 for a binary classifier declared
    /// with one sigmoid unit, else [`ModelManifest::output_width`].
    pub fn served_width(&self) -> usize {
        io::served_width(self.task, self.output, self.output_width())
    }

    /// The canonical `model.toml` text for this manifest (deterministic).
    pub fn to_toml(&self) -> String {
        let mut s = format!(
            "input_width = {}\noutput = \"{}\"\n",
            self.input_width,
            output_name(self.output)
        );
        if self.task == Task::Regression {
            s += "task = \"regression\"\n";
        }
        if !self.io.classes.is_empty() {
            let names: Vec<String> = self.io.classes.iter().map(|c| format!("{c:?}")).collect();
            s += &format!("classes = [{}]\n", names.join(", "));
        }
        if self.layers.iter().any(|l| l.layer_norm) {
            s += &format!("layer_norm_eps = {:e}\n", self.layer_norm_eps);
        }
        s += "layers = [\n";
        for l in &self.layers {
            s += &format!(
                "  {{ units = {}, activation = \"{}\"{} }},\n",
                l.units,
                activation_name(l.activation),
                if l.layer_norm {
                    ", layer_norm = true"
                } else {
                    ""
                }
            );
        }
        s += &format!(
            "]\n\n[batching]\nmax_batch = {}\nmin_batch = {}\nmax_queue_delay_us = {}\nqueue_rows_max = {}\n",
            self.batch.max_batch,
            self.batch.min_batch,
            self.batch.max_queue_delay_us,
            self.batch.queue_rows_max
        );
        if let Some(p) = &self.io.preprocess {
            s += &p.to_toml();
        }
        s
    }
}

pub fn activation_name(a: Activation) -> &'static str {
    match a {
        Activation::Identity => "identity",
        Activation::Relu => "relu",
        Activation::Gelu => "gelu",
        Activation::Tanh => "tanh",
        Activation::Sigmoid => "sigmoid",
    }
}

pub fn output_name(o: OutputTransform) -> &'static str {
    match o {
        OutputTransform::Identity => "identity",
        OutputTransform::Softmax => "softmax",
        OutputTransform::Sigmoid => "sigmoid",
    }
}

/// Parse TOML text into a table; a syntax error reports line and column on one line.
pub fn parse_toml(text: &str) -> Result<Table, String> {
    toml::from_str::<Table>(text).map_err(|e| {
        let at = e
            .span()
            .map(|s| {
                let before = text.get(..s.start).unwrap_or(text);
                let line = before.matches('\n').count() + 1;
                let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(" at line {line}, column {col}")
            })
            .unwrap_or_default();
        format!("TOML syntax error{at}: {}", e.message().trim())
    })
}

/// Parse and validate a `model.toml`; absent batching fields come from `defaults`.
pub fn parse_model_manifest(text: &str, defaults: &BatchLimits) -> Result<ModelManifest, String> {
    let t = parse_toml(text)?;
    deny_unknown(
        &t,
        "",
        &[
            "input_width",
            "output",
            "layer_norm_eps",
            "layers",
            "batching",
            "versions",
            "task",
            "classes",
            "preprocess",
        ],
    )?;
    let versions = super::versions::VersionPolicy::parse(t.get("versions"))?;
    let input_width = width(&t, "input_width", "input_width")?
        .ok_or("input_width: missing (the number of input features)")?;
    let output = enum_field::<OutputTransform>(&t, "output", "output")?
        .ok_or("output: missing (softmax | sigmoid | identity)")?;
    let layer_norm_eps = match t.get("layer_norm_eps") {
        None => LAYER_NORM_EPS_DEFAULT,
        Some(v) => {
            let e = float(v, "layer_norm_eps")?;
            if !(e.is_finite() && e > 0.0) {
                return Err(format!("layer_norm_eps: {e} must be a finite number > 0"));
            }
            e as f32
        }
    };
    let layers_v = t
        .get("layers")
        .ok_or("layers: missing (a list of { units, activation })")?;
    let Value::Array(arr) = layers_v else {
        return Err(format!(
            "layers: expected an array of tables, found {}",
            layers_v.type_str()
        ));
    };
    if arr.is_empty() {
        return Err("layers: empty (a model needs at least one layer)".into());
    }
    let mut layers = Vec::with_capacity(arr.len());
    for (i, v) in arr.iter().enumerate() {
        let path = format!("layers[{i}]");
        let Value::Table(lt) = v else {
            return Err(format!(
                "{path}: expected a table {{ units, activation }}, found {}",
                v.type_str()
            ));
        };
        deny_unknown(lt, &path, &["units", "activation", "layer_norm"])?;
        let units = width(lt, "units", &format!("{path}.units"))?
            .ok_or_else(|| format!("{path}.units: missing"))?;
        let activation = enum_field::<Activation>(lt, "activation", &format!("{path}.activation"))?
            .ok_or_else(|| {
                format!("{path}.activation: missing (relu | gelu | tanh | sigmoid | identity)")
            })?;
        let layer_norm = match lt.get("layer_norm") {
            None => false,
            Some(Value::Boolean(b)) => *b,
            Some(other) => {
                return Err(format!(
                    "{path}.layer_norm: expected true or false, found {}",
                    other.type_str()
                ))
            }
        };
        layers.push(LayerSpec {
            units,
            activation,
            layer_norm,
        });
    }
    let batch = match t.get("batching") {
        None => *defaults,
        Some(Value::Table(bt)) => parse_batching(bt, defaults)?,
        Some(other) => {
            return Err(format!(
                "batching: expected a table, found {}",
                other.type_str()
            ))
        }
    };
    let last = layers.last().expect("at least one layer");
    let (task, io) = io::parse_io(
        &t,
        input_width,
        output,
        (
            layers.len() - 1,
            last.units,
            last.activation,
            last.layer_norm,
        ),
    )?;
    Ok(ModelManifest {
        versions,
        input_width,
        output,
        layer_norm_eps,
        layers,
        batch,
        task,
        io,
    })
}

pub(crate) fn parse_batching(bt: &Table, defaults: &BatchLimits) -> Result<BatchLimits, String> {
    deny_unknown(
        bt,
        "batching",
        &[
            "max_batch",
            "min_batch",
            "max_queue_delay_us",
            "queue_rows_max",
        ],
    )?;
    let mut b = *defaults;
    if let Some(v) = bt.get("max_batch") {
        b.max_batch = uint(v, "batching.max_batch")? as usize;
    }
    if let Some(v) = bt.get("min_batch") {
        b.min_batch = uint(v, "batching.min_batch")? as usize;
    }
    if let Some(v) = bt.get("max_queue_delay_us") {
        b.max_queue_delay_us = uint(v, "batching.max_queue_delay_us")?;
    }
    if let Some(v) = bt.get("queue_rows_max") {
        b.queue_rows_max = uint(v, "batching.queue_rows_max")? as usize;
    }
    validate_batch_limits(&b).map_err(|e| format!("batching.{e}"))?;
    Ok(b)
}

/// The relations between batching limits. Errors start with the field name.
pub fn validate_batch_limits(b: &BatchLimits) -> Result<(), String> {
    if b.max_batch == 0 {
        return Err("max_batch: must be >= 1".into());
    }
    if b.min_batch == 0 || b.min_batch > b.max_batch {
        return Err(format!(
            "min_batch: {} must be >= 1 and <= max_batch ({})",
            b.min_batch, b.max_batch
        ));
    }
    if b.queue_rows_max < b.max_batch {
        return Err(format!(
            "queue_rows_max: {} must be >= max_batch ({})",
            b.queue_rows_max, b.max_batch
        ));
    }
    if b.max_queue_delay_us > QUEUE_DELAY_US_MAX {
        return Err(format!(
            "max_queue_delay_us: {} exceeds {QUEUE_DELAY_US_MAX} (1 s)",
            b.max_queue_delay_us
        ));
    }
    Ok(())
}

/// One `[ensembles.<name>]` entry after parsing: either a spec whose members
/// still need checking against the loaded models, or its error.
pub type EnsembleEntry = (String, Result<EnsembleSpec, String>);

/// Parse `ensembles.toml`. A file-level error (syntax, wrong shape) is `Err`;
/// a bad entry is an `Err` inside the list so the others still load.
pub fn parse_ensembles(text: &str) -> Result<Vec<EnsembleEntry>, String> {
    let t = parse_toml(text)?;
    deny_unknown(&t, "", &["ensembles"])?;
    let Some(v) = t.get("ensembles") else {
        return Ok(Vec::new());
    };
    let Value::Table(et) = v else {
        return Err(format!(
            "ensembles: expected a table of [ensembles.<name>], found {}",
            v.type_str()
        ));
    };
    Ok(et
        .iter()
        .map(|(name, v)| (name.clone(), parse_ensemble(name, v)))
        .collect())
}

fn parse_ensemble(name: &str, v: &Value) -> Result<EnsembleSpec, String> {
    let path = format!("ensembles.{name}");
    let Value::Table(t) = v else {
        return Err(format!("{path}: expected a table, found {}", v.type_str()));
    };
    deny_unknown(
        t,
        &path,
        &[
            "members",
            "combiner",
            "weights",
            "policy",
            "cascade_threshold",
            "cascade_metric",
            "cascade_target_agreement",
            "calibration",
            "bandit_cost_weight",
        ],
    )?;
    let members_v = t
        .get("members")
        .ok_or_else(|| format!("{path}.members: missing"))?;
    let Value::Array(arr) = members_v else {
        return Err(format!(
            "{path}.members: expected an array of model names, found {}",
            members_v.type_str()
        ));
    };
    if arr.is_empty() {
        return Err(format!("{path}.members: empty"));
    }
    let mut members = Vec::with_capacity(arr.len());
    for (i, m) in arr.iter().enumerate() {
        let Value::String(s) = m else {
            return Err(format!(
                "{path}.members[{i}]: expected a model name, found {}",
                m.type_str()
            ));
        };
        if members.contains(s) {
            return Err(format!("{path}.members[{i}]: \"{s}\" listed twice"));
        }
        members.push(s.clone());
    }
    let combiner = enum_field::<Combiner>(t, "combiner", &format!("{path}.combiner"))?
        .unwrap_or(Combiner::Mean);
    let weights = match (combiner, t.get("weights")) {
        (Combiner::Mean | Combiner::Vote | Combiner::Stacked | Combiner::Median, None) => {
            vec![1.0; members.len()]
        }
        (Combiner::Mean | Combiner::Vote | Combiner::Stacked | Combiner::Median, Some(_)) => {
            return Err(format!(
                "{path}.weights: given but combiner is not \"weighted_mean\""
            ))
        }
        (Combiner::WeightedMean, None) => {
            return Err(format!(
                "{path}.weights: missing (combiner \"weighted_mean\" needs one weight per member)"
            ))
        }
        (Combiner::WeightedMean, Some(w)) => {
            let Value::Array(wa) = w else {
                return Err(format!(
                    "{path}.weights: expected an array of numbers, found {}",
                    w.type_str()
                ));
            };
            if wa.len() != members.len() {
                return Err(format!(
                    "{path}.weights: {} weights for {} members",
                    wa.len(),
                    members.len()
                ));
            }
            let mut ws = Vec::with_capacity(wa.len());
            for (i, x) in wa.iter().enumerate() {
                let f = float(x, &format!("{path}.weights[{i}]"))?;
                if !(f.is_finite() && f >= 0.0) {
                    return Err(format!(
                        "{path}.weights[{i}]: {f} must be a finite number >= 0"
                    ));
                }
                ws.push(f as f32);
            }
            if ws.iter().sum::<f32>() <= 0.0 {
                return Err(format!("{path}.weights: all zero"));
            }
            ws
        }
    };
    let selection = parse_selection(t, &path)?;
    Ok(EnsembleSpec {
        name: name.to_string(),
        members,
        combiner,
        weights,
        selection,
    })
}

fn parse_selection(t: &Table, path: &str) -> Result<SelectionSpec, String> {
    let mut s = SelectionSpec::default();
    if let Some(p) = enum_field::<Policy>(t, "policy", &format!("{path}.policy"))? {
        s.policy = p;
    }
    if let Some(m) =
        enum_field::<CascadeMetric>(t, "cascade_metric", &format!("{path}.cascade_metric"))?
    {
        s.cascade_metric = m;
    }
    let fraction = |key: &str, lo_open: bool| -> Result<Option<f32>, String> {
        let Some(v) = t.get(key) else {
            return Ok(None);
        };
        let f = float(v, &format!("{path}.{key}"))?;
        let ok = f.is_finite() && f <= 1.0 && if lo_open { f > 0.0 } else { f >= 0.0 };
        if !ok {
            let lo = if lo_open { "0 < x" } else { "0 <= x" };
            return Err(format!("{path}.{key}: {f} must be in {lo} <= 1"));
        }
        Ok(Some(f as f32))
    };
    if let Some(x) = fraction("cascade_threshold", false)? {
        s.cascade_threshold = x;
    }
    s.cascade_target_agreement = fraction("cascade_target_agreement", true)?;
    if let Some(x) = fraction("bandit_cost_weight", false)? {
        s.bandit_cost_weight = x;
    }
    match t.get("calibration") {
        None => {}
        Some(Value::String(p)) if !p.is_empty() => s.calibration = Some(p.into()),
        Some(v) => {
            return Err(format!(
                "{path}.calibration: expected a non-empty file name, found {}",
                v.type_str()
            ))
        }
    }
    match (
        s.cascade_target_agreement.is_some(),
        s.calibration.is_some(),
    ) {
        (true, false) => {
            return Err(format!(
            "{path}.cascade_target_agreement: needs a calibration file (calibration = \"...csv\")"
        ))
        }
        (false, true) => {
            return Err(format!(
                "{path}.calibration: given without cascade_target_agreement"
            ))
        }
        _ => {}
    }
    if s.cascade_target_agreement.is_some() && t.contains_key("cascade_threshold") {
        return Err(format!(
            "{path}.cascade_threshold: give either a threshold or cascade_target_agreement, not both"
        ));
    }
    Ok(s)
}

// ---- field helpers (the others are in `fields.rs`) ----

/// A width field: an integer in 1..=WIDTH_MAX; `None` when absent.
pub(crate) fn width(t: &Table, key: &str, path: &str) -> Result<Option<usize>, String> {
    let Some(v) = t.get(key) else {
        return Ok(None);
    };
    let n = uint(v, path)?;
    if n == 0 {
        return Err(format!("{path}: must be >= 1"));
    }
    if n > WIDTH_MAX as u64 {
        return Err(format!("{path}: {n} exceeds {WIDTH_MAX}"));
    }
    Ok(Some(n as usize))
}

#[cfg(test)]
#[path = "manifest_tests.rs"]
mod tests;
